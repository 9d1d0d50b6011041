"""`make bench`: the numbers docs/performance.md reports for this machine, each beside a baseline of the same run.

1. geometry: 20 masks of a 1080p inspection frame (bench/scenes.py) measured on their box crops, against
   the same masks measured on full 1080p frames (what a pipeline that upsamples every mask would do).
   Also one typical crack crop (~400 x 300 px, 5 px wide) alone, and 10 of them measured in this process
   against shared with worker processes (GEOMETRY_WORKERS 2 and 4; alternated, medians).
   The response of one frame (10 defects, 227 structures) without masks against with them (include_masks).
2. preprocessing of one 1080p JPEG per frame: decoded once for both models (one process) against what the
   steps do on a CPU (header check; decode + exact resize in the detector; decode + SAM's transform in the
   segmenter) and against the same torch functions the GPU path runs, here on the CPU.
3. latency: one 1080p frame through the Triton ensemble (gRPC) against the same models and stages run
   in this process (anomaly.pipeline.InProcessPipeline), alternated, median of N.
4. memory: resident set size of tritonserver and its model processes after the runs.
5. crack width from the photo (anomaly.crack_width): per crack beside the mask's geometry alone, and the geometry
   step's work on a 1080p frame with 10 cracks (its decoding included) with SUBPIXEL_WIDTH on against off.
6. tiling: a 24-megapixel photo (6000 x 4000, the deck frame enlarged) in this process, tiled against not
   tiled: time per frame and per megapixel, split into detector windows, SAM and the rest.
Results go to stdout and bench_output/bench.json. This machine is shared and noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import cv2
import numpy as np

from anomaly.config import REPO_ROOT, load_settings
from anomaly.geometry import measure
from anomaly.options import RequestOptions
from bench.scenes import inspection_masks, large_photo


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def typical_crack() -> np.ndarray:
    """A crack crop of about 400 x 300 px: 500 px long, 5 px wide, gently curving."""
    from anomaly.synthetic import thick_segments

    rng = np.random.default_rng(1)
    heading, points = math.atan2(280, 380), [np.zeros(2)]
    for _ in range(12):
        heading += rng.normal(0, 0.15)
        points.append(points[-1] + 40 * np.array([math.cos(heading), math.sin(heading)]))
    return thick_segments([np.array(points)], 5, margin=3)


def bench_geometry(repeats: int = 7) -> dict:
    cv2.setNumThreads(1)  # one core, as in the geometry step
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
    crack = typical_crack()
    out = {
        "masks": len(crops),
        "crops_ms": round(crop_s * 1000, 1),
        "full_frames_ms": round(frame_s * 1000, 1),
        "speedup_vs_full_frames": round(frame_s / crop_s, 2),
    } | bench_typical_crack()
    out |= bench_geometry_workers([crack] * 10)
    return out


def bench_typical_crack(rounds: int = 300) -> dict:
    """One typical crack crop (the 1 ms per mask target), best and median of `rounds` calls in a row, as the
    geometry step measures a frame's masks."""
    crack = typical_crack()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        measure(crack)
        times.append(time.perf_counter() - t)
    return {
        "typical_crack_crop": list(crack.shape),
        "typical_crack_ms": round(min(times) * 1000, 3),
        "typical_crack_median_ms": round(statistics.median(times) * 1000, 3),
    }


def bench_crack_width(rounds: int = 20) -> dict:
    """A crack's width read from the photo (anomaly.crack_width) beside the mask's geometry alone: per crack, on
    rendered cracks (110 px long, 0.5-4 px wide) and on the typical crack (500 px long, 5 px wide) drawn into
    concrete, medians of `rounds`; then the geometry step's work on a frame with 10 cracks, on and off."""
    import dataclasses

    from anomaly import synthetic
    from anomaly.crack_width import measure_width
    from anomaly.masks import box_crop
    from anomaly.pipeline import gray_frame, measure_frame

    rng = np.random.default_rng(0)
    cases = {}
    for width in (0.5, 1.0, 2.0, 4.0):
        scene = synthetic.width_scene(rng, width, curved=True)
        cases[f"rendered_{width}px"] = (cv2.cvtColor(scene.rgb, cv2.COLOR_RGB2GRAY), *box_crop(scene.instances[0].mask))
    crack = typical_crack()
    surface = synthetic.concrete(rng, (crack.shape[0] + 40, crack.shape[1] + 40))[..., 0]
    surface[20:-20, 20:-20][crack] *= 0.3
    cases["typical_crack_5px"] = (
        np.clip(surface, 0, 255).astype(np.uint8),
        crack,
        (20, 20, 20 + crack.shape[1], 20 + crack.shape[0]),
    )
    per_crack = {}
    for name, (gray, crop, box) in cases.items():
        mask_ms, photo_ms = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            measure(crop)
            mask_ms.append(time.perf_counter() - t)
            t = time.perf_counter()
            got = measure_width(gray, crop, box)
            photo_ms.append(time.perf_counter() - t)
        mask, photo = statistics.median(mask_ms), statistics.median(photo_ms)
        per_crack[name] = {"mask_ms": round(mask * 1000, 2), "photo_width_ms": round(photo * 1000, 2),
                           "method": got.method, "with_photo_over_mask": round((mask + photo) / mask, 2)}  # fmt: skip

    # One 1080p JPEG with 10 cracks of 0.5-4 px, their true masks as SAM would send them: the geometry step's work
    # on that frame (decoding it included) with SUBPIXEL_WIDTH on and off, alternated.
    settings = load_settings()
    photo = synthetic.concrete(rng, (1080, 1920))
    crops, boxes = [], []
    for _ in range(10):
        start = np.array([rng.uniform(200, 1700), rng.uniform(150, 900)])
        line = synthetic.crack_line(rng, start, rng.uniform(150, 400))
        found = synthetic.draw_crack(rng, photo, line, float(rng.uniform(0.5, 4.0)), core=0.3, min_mask_width=1.6)
        crop, box = box_crop(found.mask)
        crops.append(crop)
        boxes.append(box)
    data = cv2.imencode(".jpg", np.clip(photo, 0, 255).astype(np.uint8)[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])[1]
    data = data.tobytes()
    boxes = np.asarray(boxes, np.int32)
    modes = {
        "on": dataclasses.replace(settings, subpixel_width=True),
        "off": dataclasses.replace(settings, subpixel_width=False),
    }
    frame, read = {mode: [] for mode in modes}, 0
    for _ in range(rounds):
        for mode, s in modes.items():
            t = time.perf_counter()
            _, widths = measure_frame(crops, boxes, [True] * len(crops), lambda s=s: gray_frame(data, s), s)
            frame[mode].append(time.perf_counter() - t)
            read = int((widths[:, 0] == 1).sum()) if mode == "on" else read
    on, off = statistics.median(frame["on"]), statistics.median(frame["off"])
    return {
        "per_crack": per_crack,
        "frame": "1920x1080 JPEG, 10 cracks of 0.5-4 px",
        "widths_from_the_photo": read,
        "decode_grey_ms": round(best_of(lambda: gray_frame(data, settings), 3) * 1000, 1),
        "geometry_step_on_ms": round(on * 1000, 1),
        "geometry_step_off_ms": round(off * 1000, 1),
        "on_over_off": round(on / off, 2),
    }


def bench_geometry_workers(crops: list[np.ndarray], rounds: int = 30) -> dict:
    """One frame's masks measured in this process against shared with 1 and 3 worker processes, alternated
    round by round so that the machine's noise falls on all three; medians. The gain needs idle cores."""
    from anomaly.geometry_workers import GeometryWorkers
    from anomaly.pipeline import measure_all

    pools = {n: GeometryWorkers(n) for n in (2, 4)}
    try:
        times: dict[int, list[float]] = {1: [], 2: [], 4: []}
        for _ in range(rounds):
            for n in times:
                t = time.perf_counter()
                measure_all(crops, pools.get(n))
                times[n].append(time.perf_counter() - t)
    finally:
        for pool in pools.values():
            pool.close()
    ms = {n: statistics.median(t) * 1000 for n, t in times.items()}
    return {
        f"{len(crops)}_cracks_ms_by_processes": {str(n): round(v, 2) for n, v in ms.items()},
        "cores": os.cpu_count(),
    }


def bench_response(rounds: int = 200) -> dict:
    """The result step's response for one frame with 10 crack masks on 227 structures (what untrained RF-DETR
    reports on the deck frame), without masks against with them (include_masks: each mask's COCO RLE),
    alternated; medians."""
    from anomaly.detector import Detections, DetectorMetadata, export_files
    from anomaly.result import Findings, build_response

    meta = DetectorMetadata.load(export_files(REPO_ROOT / "model_repository")[1])
    defect, structure = meta.roles.index("defect"), meta.roles.index("structure")
    rng = np.random.default_rng(0)
    crack = typical_crack()
    corners = rng.uniform(0, 1000, (237, 2))
    sizes = np.concatenate([np.tile(crack.shape[::-1], (10, 1)), rng.uniform(10, 400, (227, 2))])
    boxes = np.concatenate([corners, corners + sizes], axis=1).astype(np.float32)
    class_ids = np.array([defect] * 10 + [structure] * 227, np.int32)
    det = Detections(boxes, rng.uniform(0.2, 0.9, 237).astype(np.float32), class_ids)
    mask_boxes = np.asarray(boxes[:10], np.int32)
    geometry = {"area_pixels": 900, "length_pixels": 300.0, "width_pixels": 3.0, "orientation_degrees": 40.0,
                "max_width_pixels": 5.0}  # fmt: skip
    scores = np.full(10, 0.8, np.float32)
    findings = Findings(det, np.arange(10, dtype=np.int32), mask_boxes, [crack] * 10, scores, [geometry] * 10)
    kwargs = dict(image_hw=(1500, 1500), findings=findings, metadata=meta, severity_thresholds_mm=(0.1, 0.3, 1.0),
                  warnings=[], processing_time_ms=1.0)  # fmt: skip
    options = {"no_masks": RequestOptions(0.3), "with_masks": RequestOptions(0.3, include_masks=True)}
    times: dict[str, list[float]] = {name: [] for name in options}
    for _ in range(rounds):
        for name, option in options.items():
            t = time.perf_counter()
            build_response(options=option, **kwargs)
            times[name].append(time.perf_counter() - t)
    ms = {name: round(statistics.median(t) * 1000, 3) for name, t in times.items()}
    return {"defects": 10, "structures": 227, "response_ms": ms["no_masks"], "with_masks_ms": ms["with_masks"],
            "masks_over_no_masks": round(ms["with_masks"] / ms["no_masks"], 2)}  # fmt: skip


def bench_preprocess(image: str, repeats: int = 7) -> dict:
    """Per frame, ms: decoded once for both models (as one process could); the CPU path over all steps (each
    model's step decodes where it runs); the GPU path's torch code on this CPU (on a GPU it decodes with nvJPEG
    and resizes there: not measurable here)."""
    import torch

    from anomaly.detector import DetectorMetadata, export_files
    from anomaly.images import decode_image, decode_to_tensor, read_header, rfdetr_input, rfdetr_preprocess, sam_input

    settings = load_settings()
    meta = DetectorMetadata.load(export_files(settings.model_repository)[1])
    data = (REPO_ROOT / "samples" / image).read_bytes()
    big = 1 << 40
    torch.set_num_threads(settings.compute_threads)

    def decoded_once():
        rgb = decode_image(data, big, big)
        rfdetr_preprocess(rgb, meta.resolution, meta.means, meta.stds)
        sam_input(torch.from_numpy(rgb).permute(2, 0, 1))

    def now_cpu():
        read_header(data, big, big)  # preprocess step
        rgb = decode_image(data, big, big)  # detector step
        rfdetr_preprocess(rgb, meta.resolution, meta.means, meta.stds)
        rgb = decode_image(data, big, big)  # segmenter step
        sam_input(torch.from_numpy(rgb).permute(2, 0, 1))

    def torch_path():
        chw = decode_to_tensor(data, "cpu", big, big)
        rfdetr_input(chw, meta.resolution, meta.means, meta.stds)
        sam_input(decode_to_tensor(data, "cpu", big, big))

    return {
        "image": image,
        "decoded_once_ms": round(best_of(decoded_once, repeats) * 1000, 1),
        "now_cpu_path_ms": round(best_of(now_cpu, repeats) * 1000, 1),
        "torch_path_on_this_cpu_ms": round(best_of(torch_path, repeats) * 1000, 1),
        "header_check_ms": round(best_of(lambda: read_header(data, big, big), repeats) * 1000, 2),
    }


def bench_latency(image: str, threshold: float, repeats: int) -> dict:
    from anomaly.pipeline import InProcessPipeline
    from anomaly.serving.triton_server import running_server
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


def bench_tiling(image: str, threshold: float, repeats: int = 2) -> dict:
    """The cost of tiling a large photo, in one process: the whole pipeline, and its detector windows alone."""
    from anomaly.pipeline import InProcessPipeline, tile_plan

    settings = load_settings()
    data, megapixels = large_photo(REPO_ROOT / "samples" / image), 6000 * 4000 / 1e6
    local = InProcessPipeline(settings)
    out = {"photo": "6000x4000", "threshold": threshold}
    for mode in ("off", "on"):
        options = RequestOptions(threshold, tiling=mode)
        response = local(data, options)  # warm-up
        total = best_of(lambda o=options: local(data, o), repeats)
        plan = tile_plan((4000, 6000), options, settings, local.meta.resolution)
        detector = best_of(lambda p=plan: local.detector.run_all(local.detector.prepare_windows(data, p.windows)[0]), 1)
        out[mode] = {
            "detector_windows": len(plan.windows),
            "sam_windows": response["tiling"]["sam_windows"],
            "defects_segmented": response["anomaly_count"],
            "frame_s": round(total, 2),
            "detector_s": round(detector, 2),
            "ms_per_megapixel": round(total * 1000 / megapixels, 1),
            "detector_ms_per_window": round(detector * 1000 / len(plan.windows), 1),
        }
    out["tiled_over_untiled"] = round(out["on"]["frame_s"] / out["off"]["frame_s"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench", description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image", default="bridge_deck.jpg")
    parser.add_argument("--threshold", type=float, default=0.2)  # 15 defects on the deck frame: SAM works
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-tiling", action="store_true")
    args = parser.parse_args(argv)
    results = {"geometry": bench_geometry()}
    print(json.dumps(results["geometry"]), flush=True)
    results["response"] = bench_response()
    print(json.dumps(results["response"]), flush=True)
    results["preprocess"] = bench_preprocess(args.image)
    print(json.dumps(results["preprocess"]), flush=True)
    results["crack_width"] = bench_crack_width()
    print(json.dumps(results["crack_width"], indent=1), flush=True)
    if not args.skip_latency:
        results["latency"] = bench_latency(args.image, args.threshold, args.repeats)
        print(json.dumps(results["latency"], indent=1), flush=True)
    if not args.skip_tiling:
        results["tiling"] = bench_tiling(args.image, 0.3)
        print(json.dumps(results["tiling"], indent=1), flush=True)
    out = REPO_ROOT / "bench_output"
    out.mkdir(exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
