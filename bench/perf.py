"""perf_analyzer against anomaly_pipeline, over gRPC and HTTP (`make perf`).

perf_analyzer comes from the tritonclient==2.51.0 wheel unpacked in .triton/ (`make triton`), with the
two libraries it links against (libb64 from Debian, libcudart from nvidia-cuda-runtime-cu12) beside it.
Its input data is perf/input_data.json: real JPEG frames, each BYTES element written as perf_analyzer
reads it, base64 of (4-byte little-endian length + bytes). Regenerate it with `--write-input`.

Uses a Triton already answering on TRITON_HOST/ports, else starts one for the run.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from anomaly.config import REPO_ROOT, load_settings
from anomaly.serving.triton_server import running_server

INPUT_DATA = REPO_ROOT / "perf" / "input_data.json"
FRAMES = ("bridge_deck.jpg", "tunnel_wall_exif.jpg")  # a 1080p frame and a portrait phone photo
PERF_ANALYZER = REPO_ROOT / ".triton" / "pkgs" / "bin" / "perf_analyzer"
LIBRARY_DIRS = (
    REPO_ROOT / ".triton" / "deb" / "root" / "usr" / "lib" / "x86_64-linux-gnu",
    REPO_ROOT / ".triton" / "pkgs" / "nvidia" / "cuda_runtime" / "lib",
)


def bytes_element(data: bytes) -> dict:
    return {"b64": base64.b64encode(struct.pack("<I", len(data)) + data).decode("ascii")}


def write_input_data(path: Path = INPUT_DATA) -> Path:
    frames = [(REPO_ROOT / "samples" / name).read_bytes() for name in FRAMES]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": [{"IMAGE": bytes_element(f)} for f in frames]}, indent=1) + "\n")
    return path


def perf_env() -> dict:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*map(str, LIBRARY_DIRS), env.get("LD_LIBRARY_PATH", "")])
    return env


def run_perf_analyzer(
    url: str,
    protocol: str,
    csv_path: Path,
    concurrency: int = 1,
    request_count: int = 12,
    stability: float | None = None,
) -> list[dict]:
    """One perf_analyzer run at one concurrency level; returns its CSV rows.

    By default it sends exactly `request_count` requests and reports them (`--request-count`): on a shared
    machine perf_analyzer's stability search (three windows within a few percent) may never settle, and
    then it exits with an error. With `stability` (percent) it searches as usual, windows of
    `request_count` requests, at most 10 of them.
    """
    if not PERF_ANALYZER.is_file():
        raise SystemExit(f"{PERF_ANALYZER} is missing: run `make triton`")
    cmd = [str(PERF_ANALYZER), "-m", "anomaly_pipeline", "-i", protocol, "-u", url]
    cmd += ["--input-data", str(INPUT_DATA), "--concurrency-range", f"{concurrency}:{concurrency}"]
    if stability is None:
        cmd += ["--request-count", str(request_count)]
    else:
        cmd += ["--measurement-mode", "count_windows", "--measurement-request-count", str(request_count)]
        cmd += ["--stability-percentage", str(stability), "--max-trials", "10"]
    cmd += ["-f", str(csv_path)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=perf_env(), check=True)
    with open(csv_path) as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__)
    parser.add_argument("--write-input", action="store_true", help="regenerate perf/input_data.json and stop")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2], help="concurrency levels to run")
    parser.add_argument("--requests", type=int, default=12, help="requests per level (per window with --stability)")
    parser.add_argument(
        "--stability", type=float, help="use perf_analyzer's stability search with this percentage (quiet machines)"
    )
    args = parser.parse_args(argv)
    if args.write_input:
        print(f"wrote {write_input_data()}")
        return 0
    settings = load_settings()
    out = REPO_ROOT / "perf_output"
    out.mkdir(exist_ok=True)
    with running_server(settings, out / "triton.log") as server:
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            for level in args.concurrency:
                csv_path = out / f"{protocol}_c{level}.csv"
                (row,) = run_perf_analyzer(url, protocol, csv_path, level, args.requests, args.stability)
                print(
                    f"{protocol}: concurrency {row['Concurrency']}: {float(row['Inferences/Second']):.3f} infer/s, "
                    f"p50 {int(row['p50 latency']) / 1000:.0f} ms, p99 {int(row['p99 latency']) / 1000:.0f} ms"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
