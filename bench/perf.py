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
from anomaly.triton_server import running_server

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
    url: str, protocol: str, csv_path: Path, concurrency: str = "1:2", requests_per_window: int = 4, extra=()
) -> list[dict]:
    """One perf_analyzer run; returns its CSV rows (one per concurrency level)."""
    if not PERF_ANALYZER.is_file():
        raise SystemExit(f"{PERF_ANALYZER} is missing: run `make triton`")
    cmd = [
        str(PERF_ANALYZER),
        "-m",
        "anomaly_pipeline",
        "-i",
        protocol,
        "-u",
        url,
        "--input-data",
        str(INPUT_DATA),
        "--concurrency-range",
        concurrency,
        "--measurement-mode",
        "count_windows",
        "--measurement-request-count",
        str(requests_per_window),
        "--max-trials",
        "4",
        "--stability-percentage",
        "50",
        "-f",
        str(csv_path),
        *extra,
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=perf_env(), check=True)
    with open(csv_path) as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__)
    parser.add_argument("--write-input", action="store_true", help="regenerate perf/input_data.json and stop")
    parser.add_argument("--concurrency", default="1:2", help="perf_analyzer --concurrency-range")
    parser.add_argument("--requests", type=int, default=4, help="requests per measurement window")
    args = parser.parse_args(argv)
    if args.write_input:
        print(f"wrote {write_input_data()}")
        return 0
    settings = load_settings()
    out = REPO_ROOT / "perf_output"
    out.mkdir(exist_ok=True)
    with running_server(settings, out / "triton.log") as server:
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            rows = run_perf_analyzer(url, protocol, out / f"{protocol}.csv", args.concurrency, args.requests)
            for row in rows:
                print(
                    f"{protocol}: concurrency {row['Concurrency']}: {float(row['Inferences/Second']):.3f} infer/s, "
                    f"p50 {int(row['p50 latency']) / 1000:.0f} ms, p99 {int(row['p99 latency']) / 1000:.0f} ms"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
