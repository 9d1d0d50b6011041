"""`make bench`: the numbers the issues ask for, each beside a baseline measured in the same run.

1. geometry: 20 masks of a 1080p inspection frame (bench/scenes.py) measured on their box crops, against
   the same masks measured on full 1080p frames (what a pipeline that upsamples every mask would do).
2. latency: one 1080p frame through the Triton ensemble (gRPC) against the same models and stages run
   in this process (anomaly.pipeline.InProcessPipeline), alternated, median of N.
3. memory: resident set size of tritonserver and its model processes after the runs.
Results go to stdout and bench_output/bench.json. This machine is shared and noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from anomaly.config import REPO_ROOT, load_settings
from anomaly.geometry import measure
from anomaly.options import RequestOptions
from bench.scenes import inspection_masks


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_geometry(repeats: int = 7) -> dict:
    crops = inspection_masks()
    frames = []
    for i, crop in enumerate(crops):  # the same masks, each in a 1080p frame of its own
        frame = np.zeros((1080, 1920), bool)
        h, w = min(crop.shape[0], 1080), min(crop.shape[1], 1920)
        y, x = (i * 37) % (1080 - h + 1), (i * 91) % (1920 - w + 1)
        frame[y : y + h, x : x + w] = crop[:h, :w]
        frames.append(frame)
    for m in crops:
        measure(m)  # warm caches and lazy imports
    crop_s = best_of(lambda: [measure(m) for m in crops], repeats)
    frame_s = best_of(lambda: [measure(m) for m in frames], max(2, repeats // 3))
    return {
        "masks": len(crops),
        "crops_ms": round(crop_s * 1000, 1),
        "full_frames_ms": round(frame_s * 1000, 1),
        "speedup_vs_full_frames": round(frame_s / crop_s, 2),
    }


def bench_latency(image: str, threshold: float, repeats: int) -> dict:
    from anomaly.pipeline import InProcessPipeline
    from anomaly.triton_server import running_server
    from client import AnomalyClient

    settings = load_settings()
    data = (REPO_ROOT / "samples" / image).read_bytes()
    out = REPO_ROOT / "bench_output"
    with running_server(settings, out / "triton.log") as server:
        local = InProcessPipeline(settings)
        options = RequestOptions(threshold)
        with AnomalyClient(server.grpc_url, "grpc") as client:
            first = client.detect(data, confidence_threshold=threshold)  # warm-up both
            local(data, options)
            served, in_process, server_side = [], [], []
            for _ in range(repeats):
                t = time.perf_counter()
                r = client.detect(data, confidence_threshold=threshold)
                served.append(time.perf_counter() - t)
                server_side.append(r["processing_time_ms"])
                t = time.perf_counter()
                local(data, options)
                in_process.append(time.perf_counter() - t)
        memory = server.memory_mib()
    s, p = statistics.median(served), statistics.median(in_process)
    return {
        "image": image,
        "threshold": threshold,
        "defects_segmented": first["anomaly_count"],
        "structures": len(first["structures"]),
        "triton_grpc_ms": round(s * 1000, 1),
        "triton_server_side_ms": round(statistics.median(server_side), 1),
        "in_process_ms": round(p * 1000, 1),
        "triton_over_in_process": round(s / p, 3),
        "server_rss": memory,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench", description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image", default="bridge_deck.jpg")
    parser.add_argument("--threshold", type=float, default=0.2)  # 15 defects on the deck frame: SAM works
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args(argv)
    results = {"geometry": bench_geometry()}
    print(json.dumps(results["geometry"]), flush=True)
    if not args.skip_latency:
        results["latency"] = bench_latency(args.image, args.threshold, args.repeats)
        print(json.dumps(results["latency"], indent=1), flush=True)
    out = REPO_ROOT / "bench_output"
    out.mkdir(exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
