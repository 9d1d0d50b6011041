"""`make soak`: a long run at concurrency 8 over Triton gRPC, good frames mixed with 10% bad inputs.

It must show: no error on a good request, every bad input answered as the caller's mistake
(INVALID_ARGUMENT), and memory flat after warm-up: each process, and Triton's total, grows by less than 5%
from the end of the warm-up to the end (or by less than 16 MiB: allocator noise in a 70 MiB process is not
a leak). Prints p50/p99 of the good requests and the memory of tritonserver and of every model process at
start, after warm-up and at the end; writes bench_output/soak.json; exits 1 when a check fails. Not part
of `make test` (10 minutes by default).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import threading
import time

import numpy as np
from PIL import Image

from anomaly.config import REPO_ROOT, load_settings

GOOD_FRAMES = ("bridge_deck.jpg", "pier_spalling.png", "tunnel_wall_exif.jpg")
MAX_GROWTH = 0.05
# A process may also move by a few MiB however it is used (allocator arenas, thread stacks touched late):
# growth below this many MiB is not counted against the 5%, whatever the process's size.
NOISE_MIB = 16.0


def bad_inputs() -> list[tuple[str, bytes, dict]]:
    """(what, image bytes, options) that the service must refuse as the caller's mistake."""
    jpeg = (REPO_ROOT / "samples" / "bridge_deck.jpg").read_bytes()
    png = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png, format="PNG")
    bomb = bytearray(png.getvalue())
    bomb[16:24] = (100_000).to_bytes(4, "big") * 2  # the header claims 100000 x 100000 pixels
    return [
        ("empty image", b"", {}),
        ("not an image", b"this is text, not a picture", {}),
        ("truncated JPEG", jpeg[: len(jpeg) // 3], {}),
        ("decompression-bomb header", bytes(bomb), {}),
        ("threshold out of range", jpeg, {"confidence_threshold": 2.0}),
        ("frame_id with a newline", jpeg, {"frame_id": "frame-1\n"}),
        ("include_masks not a boolean", jpeg, {"include_masks": "perhaps"}),
        ("negative pixel size", jpeg, {"mm_per_pixel": -1.0}),
    ]


def memory(server) -> dict:
    return server.memory_mib() or {}


def growth(before: dict, after: dict) -> dict:
    """Relative growth of each process and of the total, with whether it exceeds the limit."""
    pairs = {
        name: (before.get("processes_mib", {}).get(name), mib) for name, mib in after.get("processes_mib", {}).items()
    }
    pairs["total"] = (before.get("total_mib"), after.get("total_mib"))
    rows = {}
    for name, (start, end) in pairs.items():
        if start and end is not None:
            share = (end - start) / start
            rows[name] = {"share": round(share, 4), "mib": round(end - start, 1),
                          "too_much": share >= MAX_GROWTH and end - start >= NOISE_MIB}  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-minutes", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--bad-share", type=float, default=0.1)
    parser.add_argument("--out", default=str(REPO_ROOT / "bench_output" / "soak.json"))
    args = parser.parse_args(argv)

    from anomaly.serving.triton_server import running_server
    from client import AnomalyClient, AnomalyServiceError

    settings = load_settings()
    frames = [(REPO_ROOT / "samples" / name).read_bytes() for name in GOOD_FRAMES]
    bad = bad_inputs()
    lock = threading.Lock()
    stats = {"good": 0, "bad": 0, "errors_on_good": [], "bad_not_refused": [], "latency_s": []}
    start = time.monotonic()
    warm_end, end = start + args.warmup_minutes * 60, start + args.minutes * 60

    with running_server(settings, REPO_ROOT / "bench_output" / "triton.log") as server:
        mem = {"start": memory(server)}

        def worker(seed: int):
            rng = random.Random(seed)
            with AnomalyClient(server.grpc_url, "grpc") as client:
                while time.monotonic() < end:
                    if rng.random() < args.bad_share:
                        what, data, options = rng.choice(bad)
                        try:
                            client.detect(data, **options)
                            outcome = f"{what}: accepted"
                        except AnomalyServiceError as exc:
                            outcome = None if exc.bad_input else f"{what}: {exc.status} {exc}"
                        with lock:
                            stats["bad"] += 1
                            if outcome:
                                stats["bad_not_refused"].append(outcome)
                        continue
                    t = time.perf_counter()
                    try:
                        client.detect(rng.choice(frames))
                        error = None
                    except AnomalyServiceError as exc:
                        error = f"{exc.status} {exc}"
                    with lock:
                        stats["good"] += 1
                        if error:
                            stats["errors_on_good"].append(error)
                        elif time.monotonic() > warm_end:
                            stats["latency_s"].append(time.perf_counter() - t)

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.concurrency)]
        for t in threads:
            t.start()
        time.sleep(max(0.0, warm_end - time.monotonic()))
        mem["after_warmup"] = memory(server)
        for t in threads:
            t.join()
        mem["end"] = memory(server)

    grew = growth(mem["after_warmup"], mem["end"])
    latencies = np.asarray(stats["latency_s"]) * 1000
    result = {
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "good_requests": stats["good"],
        "bad_requests": stats["bad"],
        "errors_on_good": stats["errors_on_good"][:20],
        "errors_on_good_count": len(stats["errors_on_good"]),
        "bad_not_refused": stats["bad_not_refused"][:20],
        "p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies.size else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies.size else None,
        "memory_mib": mem,
        "growth_after_warmup": grew,
    }
    ok = not stats["errors_on_good"] and not stats["bad_not_refused"] and not any(g["too_much"] for g in grew.values())
    result["passed"] = ok
    print(json.dumps({k: v for k, v in result.items() if k != "memory_mib"}, indent=1))
    for when, m in mem.items():
        print(f"memory {when:>13}: total {m.get('total_mib')} MiB  {m.get('processes_mib')}")
    (REPO_ROOT / "bench_output").mkdir(exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(("PASSED" if ok else "FAILED") + f": wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
