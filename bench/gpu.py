"""`make bench-gpu`: the serving numbers of one machine in one run, each beside its baselines.

1. The Triton ensemble over gRPC at several concurrency levels: p50, p90, frames/s, and per step the
   queue and compute time per request and the mean batch size, from Triton's own statistics.
2. The same stages in this process (anomaly.pipeline.InProcessPipeline, the objects the steps use).
3. The plain-script reference a user would write: rfdetr's `predict` + SAM2ImagePredictor (set_image,
   the same boxes) on the same weights, bf16 autocast on a GPU.
4. Memory: GPU memory of Triton's processes (nvidia-smi) on a GPU, resident memory on a CPU.
5. One frame's path at concurrency 1 from Triton's trace (bench.timeline): when each step took it and answered.

The workload: one frame (samples/bridge_deck.jpg by default) with the confidence threshold set so that
`--defects` defects are segmented (10 by default). On a CPU the defaults shrink (2 defects, concurrency
1 and 2, 3 requests a level) so the whole run takes about a minute; on a GPU: 10 defects, 1/4/8, 64.
Nothing is downloaded: it needs the exported models (`python -m export`) and a tritonserver (`make
triton`, or TRITON_HOME). Prints a table and writes bench_output/gpu.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from anomaly.config import REPO_ROOT, Settings, load_settings
from anomaly.options import RequestOptions
from anomaly.tiling import untiled
from bench.scenes import large_photo
from bench.timeline import frame_timeline, print_timeline

STEPS = ("preprocess", "detector", "select_detections", "segmenter", "geometry", "result", "anomaly_pipeline")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if values else float("nan")


def device_name() -> tuple[bool, str]:
    import torch

    if torch.cuda.is_available():
        return True, torch.cuda.get_device_name(0)
    return False, f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"


def threshold_for(pipeline, data: bytes, defects: int) -> tuple[float, int]:
    """The confidence threshold at which `defects` defects are segmented on this frame (fewer if the frame has
    fewer), halfway between the scores of the last one in and the first one out."""
    x, hw = pipeline.detector.prepare(data)
    boxes, logits = pipeline.detector.run([x])
    from anomaly.pipeline import select

    det, seg_index, _ = select(boxes, logits, untiled(hw), 0.0, pipeline.meta, 10**6)
    scores = np.sort(det.scores[seg_index])[::-1]
    if len(scores) <= defects:
        return max(float(scores[-1]) - 1e-4, 0.0) if len(scores) else 0.0, len(scores)
    return float((scores[defects - 1] + scores[defects]) / 2.0), defects


def model_stats(client) -> dict[str, dict]:
    """Triton's cumulative statistics of the pipeline's models, by name."""
    stats = client.get_inference_statistics(as_json=True)["model_stats"]
    return {s["name"]: s for s in stats if s["name"] in STEPS}


def stats_after(client, before: dict, requests: int, timeout_s: float = 5.0) -> dict[str, dict]:
    """model_stats once Triton has counted the last `requests` frames: it answers a frame before it adds the
    frame to the ensemble's statistics, so a snapshot taken as the last answer arrives may miss it."""

    def done(stats: dict) -> int:
        return int(stats.get("anomaly_pipeline", {}).get("inference_stats", {}).get("success", {}).get("count", 0))

    deadline = time.monotonic() + timeout_s
    while True:
        after = model_stats(client)
        if done(after) - done(before) >= requests or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


def step_table(before: dict, after: dict) -> dict[str, dict]:
    """Per step between two snapshots: requests, executions, mean batch, queue and compute ms per request."""
    rows = {}
    for name in STEPS:
        a, b = before.get(name), after.get(name)
        if not a or not b:
            continue

        def delta(key: str, field: str = "ns", a=a, b=b) -> float:
            return float(b["inference_stats"][key].get(field, 0)) - float(a["inference_stats"][key].get(field, 0))

        requests = delta("success", "count")
        if requests <= 0:
            continue
        executions = float(b.get("execution_count", 0)) - float(a.get("execution_count", 0))
        inferences = float(b.get("inference_count", 0)) - float(a.get("inference_count", 0))
        compute = delta("compute_input") + delta("compute_infer") + delta("compute_output")
        rows[name] = {
            "requests": int(requests),
            "mean_batch": round(inferences / executions, 2) if executions else None,
            "queue_ms": round(delta("queue") / requests / 1e6, 2),
            "compute_ms": round(compute / requests / 1e6, 2),
        }
    return rows


def thread_stats(metrics_url: str) -> dict[str, dict]:
    """The GPU steps' batch-thread counters (anomaly.serving.overlap, OVERLAP_BATCHES) from Triton's metrics
    port, by model; empty where the steps answer inside execute."""
    import re
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out: dict[str, dict] = {}
    for name, model, value in re.findall(r'^anomaly_gpu_step_(\w+)\{model="(\w+)"\} (\S+)$', text, re.M):
        out.setdefault(model, {})[name] = float(value)
    return out


def early_embedding_counts(metrics_url: str) -> dict[str, float]:
    """SAM's early embeddings by outcome (EARLY_EMBEDDING; anomaly.serving.embeddings: kept, used, missed,
    dropped, declined, refused), cumulative, from Triton's metrics port; empty where none was asked for."""
    import re
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    pattern = r'^anomaly_sam_early_embedding_count\{model="segmenter",outcome="(\w+)"\} (\S+)$'
    return {outcome: float(value) for outcome, value in re.findall(pattern, text, re.M)}


def counted(before: dict, after: dict) -> dict[str, int]:
    """What grew between two readings of cumulative counters."""
    return {k: int(v - before.get(k, 0.0)) for k, v in sorted(after.items()) if v > before.get(k, 0.0)}


def early_summary(rows: list[dict]) -> str:
    """One line of the early embeddings' outcomes per concurrency level: whether frames took them."""
    parts = []
    for row in rows:
        got = row.get("early_embedding", {})
        parts.append(f"c={row['concurrency']} " + (", ".join(f"{k} {v}" for k, v in got.items()) or "none"))
    return "; ".join(parts)


def thread_table(before: dict, after: dict) -> dict[str, dict]:
    """step_table's rows for the batch threads: there Triton's own compute time is only the intake (decoding),
    and these rows hold the wait for and the run of the batch on the card."""
    rows = {}
    for model, b in after.items():
        a = before.get(model, {})

        def delta(key: str, a=a, b=b) -> float:
            return b.get(key, 0.0) - a.get(key, 0.0)

        requests, executions = delta("request_count"), delta("execution_count")
        if requests <= 0:
            continue
        rows[f"{model}, batch thread"] = {
            "requests": int(requests),
            "mean_batch": round(requests / executions, 2) if executions else None,
            "queue_ms": round(delta("queue_duration_us") / requests / 1e3, 2),
            "compute_ms": round(delta("compute_duration_us") / requests / 1e3, 2),
        }
    return rows


def load(url: str, data: bytes, threshold: float, concurrency: int, requests: int, **options) -> dict:
    """`requests` frames sent by `concurrency` threads, each with its own gRPC client."""
    from client import AnomalyClient

    latencies: list[float] = []
    server_ms: list[float] = []
    errors: list[str] = []
    warned: set[str] = set()  # e.g. a model on the CPU of a GPU machine: the numbers would mean something else
    counter = iter(range(requests))
    lock = threading.Lock()

    def worker():
        with AnomalyClient(url, "grpc") as client:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                t = time.perf_counter()
                try:
                    response = client.detect(data, confidence_threshold=threshold, **options)
                except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
                    with lock:
                        errors.append(str(exc)[:200])
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t)
                    server_ms.append(response["processing_time_ms"])
                    warned.update(response.get("warnings", []))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p90_ms": round(percentile(latencies, 90) * 1000, 1),
        "server_p50_ms": round(percentile(server_ms, 50), 1),
        "frames_per_s": round(len(latencies) / wall, 2) if wall else None,
        "warnings": sorted(warned),
    }


class GpuBusy:
    """The card's utilisation (nvidia-smi, sampled every 100 ms) while a block runs: mean and max percent."""

    def __enter__(self):
        self.samples: list[float] = []
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        except OSError:
            self.proc = None
            return self
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append(float(line))

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
            self.reader.join(timeout=2)

    def summary(self) -> dict:
        if not self.samples:
            return {}
        return {"gpu_busy_mean_pct": round(float(np.mean(self.samples)), 1), "gpu_busy_max_pct": max(self.samples)}


def gpu_checks(settings: Settings, meta, onnx_path: Path, data: bytes, device: str = "cuda") -> dict:
    """On a GPU: the GPU preprocessing against the exact CPU path, and the torch detector on the card against
    onnxruntime on the CPU, for this frame. Decoders may differ by a level or two (nvJPEG vs libjpeg), so the
    resize/normalisation is also compared on the same decoded pixels."""
    import dataclasses

    import torch

    from anomaly.detector import DetectorRunner, TorchDetector
    from anomaly.images import decode_image, decode_to_tensor, rfdetr_input, rfdetr_preprocess, sam_input

    s = settings
    on_card = device == "cuda"
    rgb = decode_image(data, s.max_image_bytes, s.max_image_pixels)
    on_gpu = decode_to_tensor(data, device, s.max_image_bytes, s.max_image_pixels)
    same_pixels = torch.from_numpy(rgb).permute(2, 0, 1).to(device)
    decode_diff = (on_gpu.int() - same_pixels.int()).abs().float()
    reference = torch.from_numpy(rfdetr_preprocess(rgb, meta.resolution, meta.means, meta.stds)).to(device)
    sam_cpu = sam_input(torch.from_numpy(rgb).permute(2, 0, 1)).to(device)
    checks = {
        "nvjpeg_vs_pillow_levels": {"max": float(decode_diff.max()), "mean": round(float(decode_diff.mean()), 4)},
        "detector_input_same_pixels_max": float(
            (rfdetr_input(same_pixels, meta.resolution, meta.means, meta.stds) - reference).abs().max()
        ),
        "detector_input_gpu_decode_mean": round(
            float((rfdetr_input(on_gpu, meta.resolution, meta.means, meta.stds) - reference).abs().mean()), 5
        ),
        "sam_input_same_pixels_max": float((sam_input(same_pixels) - sam_cpu).abs().max()),
        # a PNG is decoded on the CPU and copied over (from pinned memory on a GPU): the same pixels
        "png_on_device_same_pixels": bool(
            torch.equal(decode_to_tensor(png_of(rgb), device, s.max_image_bytes, s.max_image_pixels), same_pixels)
        ),
    }
    raw = {}
    for name, runner in (
        ("torch_gpu", DetectorRunner(meta, onnx_path, dataclasses.replace(s, detector_backend="torch"), gpu=on_card)),
        (
            "onnx_cpu",
            DetectorRunner(meta, onnx_path, dataclasses.replace(s, detector_backend="onnxruntime"), gpu=False),
        ),
    ):
        x, _ = runner.prepare(data)
        boxes, logits = runner.run([x])
        raw[name] = (boxes[0], 1.0 / (1.0 + np.exp(-logits[0].astype(np.float64))))
        if name == "torch_gpu":  # the same input through the same checkpoint in fp32: precision vs device
            fp32 = TorchDetector(meta, device, "fp32", 1, cuda_graphs=False)
            boxes, logits = fp32(x[None])
            raw["torch_gpu_fp32"] = (boxes[0], 1.0 / (1.0 + np.exp(-logits[0].astype(np.float64))))
    boxes_o, probs_o = raw["onnx_cpu"]
    top = np.argsort(-probs_o.max(axis=1))[:20]  # the queries that become detections, by the reference
    for name in ("torch_gpu", "torch_gpu_fp32"):
        boxes_t, probs_t = raw[name]
        checks[f"{name}_vs_onnx_cpu_top20_queries"] = {
            "score_max_diff": round(float(np.abs(probs_t[top] - probs_o[top]).max()), 5),
            "same_top_class": bool(np.array_equal(probs_t[top].argmax(1), probs_o[top].argmax(1))),
            "box_min_iou": paired_min_iou(boxes_t[top], boxes_o[top]),
        }
    return checks


def png_of(rgb: np.ndarray) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(rgb).save(out, "PNG", compress_level=1)
    return out.getvalue()


def paired_min_iou(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest IoU of box a[i] with b[i], boxes as (cx, cy, w, h)."""

    def corners(x):
        return np.concatenate([x[:, :2] - x[:, 2:] / 2, x[:, :2] + x[:, 2:] / 2], axis=1)

    a, b = corners(a.astype(np.float64)), corners(b.astype(np.float64))
    inter = np.prod(np.clip(np.minimum(a[:, 2:], b[:, 2:]) - np.maximum(a[:, :2], b[:, :2]), 0, None), axis=1)
    union = np.prod(a[:, 2:] - a[:, :2], axis=1) + np.prod(b[:, 2:] - b[:, :2], axis=1) - inter
    return round(float(np.min(inter / np.maximum(union, 1e-12))), 4)


def pieces(local, data: bytes, threshold: float, repeats: int, gpu: bool) -> dict:
    """Where one frame's time goes, piece by piece, in this process (p50 ms; the GPU synchronised after each):
    the detector's decode + resize and forward (batch 1 and per frame at batch 8), SAM's decode + resize,
    image encoder (batch 1 and per frame at the serving batch), mask decoder for the frame's boxes (and for 1
    to 16 boxes), masks to the host, and geometry on one core and shared among the serving plan's processes
    (GEOMETRY_WORKERS)."""
    import torch

    from anomaly.geometry_workers import GeometryWorkers
    from anomaly.pipeline import measure_all, select
    from anomaly.segmenter import pixel_windows
    from anomaly.serving.plan import serving_plan

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def ms(fn, per: int = 1) -> float:
        def run():
            fn()
            sync()

        return round(timed(run, repeats)["p50_ms"] / per, 2)

    s, det, seg = local.settings, local.detector, local.segmenter
    batch = serving_plan(s, gpu).segmenter_batch
    if s.cuda_graphs:
        seg.use_cuda_graphs(batch)
    x, hw = det.prepare(data)
    boxes, logits = det.run([x])
    detections, seg_index, _ = select(boxes, logits, untiled(hw), threshold, local.meta, s.max_detections)
    seg_boxes = detections.boxes[seg_index]
    prepared, hw = seg._prepare(data, s.max_image_bytes, s.max_image_pixels)
    windows = [tuple(w) for w in pixel_windows(np.asarray(seg_boxes, np.float32), hw).tolist()]
    with torch.inference_mode(), seg._autocast():
        features = seg._encode(prepared[None])
        coords = seg._box_coords(seg_boxes, hw)
        low_res, _ = seg._decode(features, 0, coords)
        repeated = {n: coords[:1].expand(n, 2, 2).contiguous() for n in ((1, 2, 4, 8, 12, 16) if gpu else (1, 4))}
        out = {
            "detector_prepare": ms(lambda: det.prepare(data)),
            "detector_forward_b1": ms(lambda: det.run([x])),
            "detector_forward_b8_per_frame": ms(lambda: det.run([x] * 8), 8),
            "sam_prepare": ms(lambda: seg._prepare(data, s.max_image_bytes, s.max_image_pixels)),
            "sam_encoder_b1": ms(lambda: seg._encode(prepared[None])),
            f"sam_encoder_b{batch}_per_frame": ms(lambda: seg._encode(torch.stack([prepared] * batch)), batch),
            f"sam_decoder_{len(seg_boxes)}_boxes": ms(lambda: seg._decode(features, 0, coords)),
            # how the decoder's time grows with the boxes (each replays the graph of its count): padding's cost
            "sam_decoder_ms_by_boxes": {n: ms(lambda c=c: seg._decode(features, 0, c)) for n, c in repeated.items()},
            f"sam_mask_crops_{len(seg_boxes)}_boxes": ms(
                lambda: seg._upsample_crops(low_res, windows, [hw] * len(windows))
            ),
        }
    out["sam_whole_frame"] = ms(lambda: seg._segment_batch([(prepared, hw, seg_boxes)]))
    if gpu:  # where the CPU waits for the card in a frame's SAM work: only the masks' copy back should
        out["sam_whole_frame_gpu_waits"] = gpu_waits(lambda: seg._segment_batch([(prepared, hw, seg_boxes)]))
        # decoding and the model inputs: none (nvJPEG waits on a stream of its own)
        out["detector_prepare_gpu_waits"] = gpu_waits(lambda: det.prepare(data))
        out["sam_prepare_gpu_waits"] = gpu_waits(lambda: seg._prepare(data, s.max_image_bytes, s.max_image_pixels))
    masks = [c.mask for c in seg._segment_batch([(prepared, hw, seg_boxes)])[0]]
    out[f"geometry_{len(masks)}_masks_one_core"] = ms(lambda: measure_all(masks))
    processes = serving_plan(s, gpu).geometry_workers
    if processes > 1:  # what the geometry step does with the serving plan's workers
        workers = GeometryWorkers(processes)
        try:
            out[f"geometry_{len(masks)}_masks_{processes}_processes"] = ms(lambda: measure_all(masks, workers))
        finally:
            workers.close()
    out["segmenter_runtime"] = seg.runtime
    return out


def gpu_waits(fn) -> int:
    """How many operations of fn made the CPU wait for the GPU (torch's sync debug mode, its warnings counted)."""
    import warnings

    import torch

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def timed(fn, repeats: int) -> dict:
    fn()  # warm-up: lazy initialisation, cuDNN autotuning, CUDA graphs
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"p50_ms": round(percentile(times, 50) * 1000, 1), "repeats": repeats}


def reference_segmenter(spec, device: str):
    """The segmenter as its authors' API runs it: boxes of one RGB frame -> their masks (nothing kept)."""
    if spec.kind == "sam3":
        from PIL import Image
        from sam3.model.sam3_image_processor import Sam3Processor

        from anomaly.sam3 import build_sam3

        model = build_sam3(spec.checkpoint, device)
        processor = Sam3Processor(model, device=device)

        def sam3(rgb, boxes):
            state = processor.set_image(Image.fromarray(rgb))
            for box in boxes:
                model.predict_inst(state, box=box, multimask_output=False)

        return sam3
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from anomaly.segmenter import SAM2_CONFIGS

    predictor = SAM2ImagePredictor(build_sam2(SAM2_CONFIGS[spec.variant], spec.checkpoint, device=device))

    def sam2(rgb, boxes):
        predictor.set_image(rgb)
        if len(boxes):
            predictor.predict(box=boxes, multimask_output=False)

    return sam2


def plain_script(settings: Settings, meta, data: bytes, threshold: float, repeats: int, gpu: bool) -> dict:
    """What a user would write without Triton: rfdetr's predict, then SAM2ImagePredictor (or SAM3's
    Sam3Processor + predict_inst) with its boxes."""
    import torch

    from anomaly.detector import load_rfdetr
    from anomaly.images import decode_image
    from anomaly.weights import segmenter_candidates, segmenter_title

    detector = load_rfdetr(meta.variant, meta.weights, meta.source.get("num_classes"))
    spec = segmenter_candidates(settings)[0][0]
    device = "cuda" if gpu else "cpu"
    segment = reference_segmenter(spec, device)
    defect_ids = np.array([i for i, r in enumerate(meta.roles) if r == "defect"])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else torch.autocast("cpu", enabled=False)
    found = {}

    def run():
        rgb = decode_image(data, settings.max_image_bytes, settings.max_image_pixels)
        detections = detector.predict(rgb, threshold=threshold)
        boxes = detections.xyxy[np.isin(detections.class_id, defect_ids)][: settings.max_detections]
        with torch.inference_mode(), autocast:
            segment(rgb, boxes)
        if gpu:
            torch.cuda.synchronize()
        found["boxes"] = len(boxes)

    result = timed(run, repeats)
    return result | {"defects_segmented": found["boxes"], "sam": segmenter_title(spec.kind, spec.variant)}


def _nvidia_smi(query: str) -> list[list[str]]:
    out = subprocess.run(
        ["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True
    ).stdout
    return [[field.strip() for field in line.split(",")] for line in out.strip().splitlines() if line.strip()]


def gpu_memory_mib(server) -> dict:
    """GPU memory of Triton's processes (nvidia-smi), or resident memory where there is no GPU. In a container
    nvidia-smi may not see process ids; then the card's whole used memory is reported (nothing else runs)."""
    try:
        apps = _nvidia_smi("compute-apps=pid,used_memory")
        card = _nvidia_smi("gpu=memory.used")
    except (OSError, subprocess.CalledProcessError):
        return {"gpu": None, "resident": server.memory_mib()}
    used = {int(pid): float(mib) for pid, mib in apps if pid.isdigit()}
    by_model = {}
    pid = server.pid()
    if pid:
        import psutil

        from anomaly.serving.triton_server import model_of

        root = psutil.Process(pid)
        names = {root.pid: "tritonserver"}
        for child in root.children(recursive=True):
            names[child.pid] = model_of(child.cmdline(), server.model_repository) or f"pid {child.pid}"
        if getattr(server, "mps", None):  # CUDA_MPS: the server holding the shared context is the daemon's child
            names |= {int(p): "MPS server" for p in server.mps.servers() if p.isdigit()}
        used = {p: m for p, m in used.items() if p in names}
        by_model = {names[p]: m for p, m in used.items()}
    return {
        "gpu_total_mib": round(sum(used.values()), 1) if used else None,
        "gpu_processes": len(used),
        "gpu_by_model_mib": by_model,
        "card_used_mib": float(card[0][0]) if card else None,
        "resident": server.memory_mib(),
    }


def torch_memory_after_load(log_path) -> dict[str, dict]:
    """What each GPU step said torch held once it had loaded (reporting.AFTER_LOAD in Triton's log, the last
    such line per step: the log may hold earlier starts): {step: {"torch_mib", "tensors_mib"}}. Beside nvidia-smi's
    count for the step's process, the difference is the CUDA context and the libraries' own memory."""
    import re

    from anomaly.serving.reporting import AFTER_LOAD

    if not log_path or not Path(log_path).exists():
        return {}
    pattern = re.escape(AFTER_LOAD).replace("%s", r"(\w+)").replace(r"%\.0f", r"(\d+)")
    found = {}
    for step, held, tensors in re.findall(pattern, Path(log_path).read_text(errors="replace")):
        found[step] = {"torch_mib": int(held), "tensors_mib": int(tensors)}
    return found


def log_size(log_path) -> int:
    """Where a run's part of Triton's log starts: the bench appends to its logs."""
    return Path(log_path).stat().st_size if log_path and Path(log_path).exists() else 0


def log_warnings(log_path, start: int = 0, most: int = 12) -> dict[str, int]:
    """The distinct warnings and errors the steps logged into Triton's log from byte `start` on, with their counts,
    the untrained-weights banners left out (expected here): a fallback the responses do not show (nvJPEG decoding
    on the CPU, a compile or graph capture that failed) changes what the numbers of that server mean."""
    import re

    if not log_path or not Path(log_path).exists():
        return {}
    with Path(log_path).open("rb") as log:
        log.seek(start)
        text = log.read().decode(errors="replace")
    found: dict[str, int] = {}
    for line in re.findall(r"^(?:WARNING|ERROR) anomaly[\w.]*: .*$", text, flags=re.M):
        if "UNTRAINED WEIGHTS" not in line:
            found[line[:300]] = found.get(line[:300], 0) + 1
    return dict(sorted(found.items(), key=lambda kv: -kv[1])[:most])


def setting_change(spec: str) -> tuple[str, str]:
    """`NAME=VALUE` of --also -> (NAME, VALUE), NAME a documented setting."""
    from anomaly.config import KNOBS

    name, sep, value = spec.partition("=")
    names = {k.name for k in KNOBS}
    if not sep or name not in names:
        raise SystemExit(f"--also {spec!r}: expected NAME=VALUE with NAME one of the settings (docs/configuration.md)")
    return name, value


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mirror_repository(source: Path, target: Path) -> Path:
    """A model repository at `target` whose steps link to `source`'s files but have configs/ folders of their own:
    a second tritonserver writes its serving configs and start-up records (what `/info` reads) there, and the
    records of a server already running on `source` stay true."""
    for step in sorted(p for p in source.iterdir() if p.is_dir()):
        (target / step.name).mkdir(parents=True)
        for child in step.iterdir():
            if child.name not in ("configs", "__pycache__"):
                (target / step.name / child.name).symlink_to(child.resolve())
    return target


def levels_with(change: tuple[str, str], data: bytes, threshold: float, levels: list[int], requests: int) -> dict:
    """The ensemble levels again, on a tritonserver of its own (free ports, a mirror of the model repository)
    started with one setting changed: the same run's baseline for that setting. Its memory is read before it
    stops."""
    import dataclasses
    import os
    import tempfile

    from anomaly.serving.triton_server import TritonServer

    name, value = change
    before = os.environ.get(name)
    os.environ[name] = value  # the launcher's own choices (plan, GPU hiding) read it too
    try:
        changed = load_settings()
    finally:
        if before is None:
            os.environ.pop(name)
        else:
            os.environ[name] = before
    ports = {f"triton_{kind}_port": free_port() for kind in ("http", "grpc", "metrics")}
    log_path = REPO_ROOT / "bench_output" / f"triton_{name.lower()}_{value}.log"
    rows = []
    mirror = tempfile.TemporaryDirectory(prefix="anomaly_repo_")
    repository = mirror_repository(changed.model_repository, Path(mirror.name) / "model_repository")
    settings = dataclasses.replace(changed, model_repository=repository, **ports)
    server = TritonServer(settings, log_path=log_path, env={name: value, "MODEL_REPOSITORY": str(repository)})
    log_start = log_size(log_path)
    try:
        server.start(ready_timeout=900)
        load(server.grpc_url, data, threshold, 1, 2)  # warm-up, as for the default server
        metrics_url = f"http://{server.client_host}:{ports['triton_metrics_port']}/metrics"
        for level in levels:
            early_before = early_embedding_counts(metrics_url)
            with GpuBusy() as busy:
                rows.append(load(server.grpc_url, data, threshold, level, requests) | busy.summary())
            rows[-1]["early_embedding"] = counted(early_before, early_embedding_counts(metrics_url))
            print(json.dumps({f"{name}={value}": rows[-1]}), flush=True)
        memory = gpu_memory_mib(server) | {
            "torch_after_load_mib": torch_memory_after_load(log_path),
            "mps": server.mps_state,
        }
        threads = thread_stats(metrics_url)
    finally:
        server.stop()
        mirror.cleanup()
    warned = log_warnings(log_path, log_start)
    # the batch threads' counters show whether the GPU steps answered from their threads (OVERLAP_BATCHES)
    return {
        "setting": f"{name}={value}",
        "ensemble": rows,
        "memory": memory,
        "batch_threads": sorted(threads),
        "log_warnings": warned,
    }


def compare_setting(change: tuple[str, str], run) -> dict:
    """run(change) (levels_with) for one setting change; when it fails (a server that never got ready, a compile
    that ran out of time) its error is recorded instead and the bench goes on: a GPU machine's minutes are too
    few to lose the rest of the run to one setting."""
    try:
        return run(change)
    except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON, the exit status says so
        error = f"{type(exc).__name__}: {exc}"[:2000]
        print(json.dumps({"=".join(change): error}), flush=True)
        return {"setting": "=".join(change), "error": error, "ensemble": []}


def problems(result: dict) -> list[str]:
    """What went wrong in a run's JSON, a line each: not finished, failed requests (any part), a compared
    setting whose server failed, WARNING or ERROR lines of our steps in Triton's log. Empty for a clean run
    (what `bench/offline_gpu.sh rehearse` asks of its stand-in GPU machine)."""
    found = [] if result.get("complete") else ["the run did not finish (complete: false)"]

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{where}.{key}" if where else key
                if key == "errors" and value:
                    found.append(f"{here}: {value[0]}" + (f" (and {len(value) - 1} more)" if len(value) > 1 else ""))
                elif key == "error" and value:
                    found.append(f"{here}: {value}")
                elif key == "log_warnings" and value:
                    found.append(f"{here}: " + "; ".join(f"{n}x {line}" for line, n in value.items()))
                else:
                    walk(value, here)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                label = value.get("setting") or value.get("concurrency") if isinstance(value, dict) else None
                walk(value, f"{where}[{label if label is not None else i}]")

    walk(result, "")
    return found


def guarded(name: str, fn):
    """fn(), or {"error": ...} when it fails, printed: a baseline that breaks (a GPU-only branch never run on this
    machine) must not cost the compared settings after it their turn in a GPU session's minutes."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON (bench.gpu.problems)
        error = f"{type(exc).__name__}: {exc}"[:2000]
        print(json.dumps({name: {"error": error}}), flush=True)
        return {"error": error}


def save(path: Path, result: dict, complete: bool) -> None:
    """The result so far as JSON (`complete` false until the end): a run stopped by a time limit keeps what it
    measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result | {"complete": complete}, indent=2) + "\n")


def print_table(result: dict) -> None:
    print(f"\n{result['device']}  |  {result['workload']}")
    print(f"{'what':<34}{'p50 ms':>10}{'p90 ms':>10}{'frames/s':>10}{'GPU busy %':>12}")
    for row in result["ensemble"]:
        label = f"ensemble, concurrency {row['concurrency']}"
        busy = row.get("gpu_busy_mean_pct", "")
        print(f"{label:<34}{row['p50_ms']:>10}{row['p90_ms']:>10}{row['frames_per_s']:>10}{busy:>12}")
    default = {row["concurrency"]: row for row in result["ensemble"]}
    for other in result.get("compared", []):  # the same levels with one setting changed, in this run
        if "error" in other:
            print(f"  {other['setting']}: failed: {other['error'][:200]}")
        for row in other["ensemble"]:
            label = f"  {other['setting']}, c={row['concurrency']}"
            busy = row.get("gpu_busy_mean_pct", "")
            base = default.get(row["concurrency"], {}).get("frames_per_s")
            ratio = f"  ({row['frames_per_s'] / base:.2f}x frames/s)" if base and row["frames_per_s"] else ""
            print(f"{label:<34}{row['p50_ms']:>10}{row['p90_ms']:>10}{row['frames_per_s']:>10}{busy:>12}{ratio}")
    print(f"{'  early embeddings (EARLY_EMBEDDING)':<34}  {early_summary(result['ensemble'])}")
    for other in result.get("compared", []):
        if "error" not in other:  # a failed setting has no levels: its line above says why
            print(f"{'    with ' + other['setting']:<34}  {early_summary(other['ensemble'])}")
    for label, key in (
        ("same stages in one process", "in_process"),
        ("plain script (rfdetr + SAM2 pred.)", "plain_script"),
    ):
        part = result.get(key, {})
        print(f"{label:<34}{part['p50_ms']:>10}" if "p50_ms" in part else f"{label:<34}  failed: {part.get('error')}")
    print(f"\n{'step (at the highest concurrency)':<34}{'queue ms':>10}{'compute ms':>12}{'batch':>8}")
    steps = result["steps"]  # a GPU step's batch thread right under it: Triton's row then times only its intake

    def order(name: str) -> tuple:
        step = name.split(",")[0]
        return (STEPS.index(step) if step in STEPS else len(STEPS), name)

    for name in sorted(steps, key=order):
        row = steps[name]
        print(f"{name:<34}{row['queue_ms']:>10}{row['compute_ms']:>12}{row['mean_batch'] or '':>8}")
    if "timeline" in result:
        print_timeline(result["timeline"])
    tiled = result["tiled"]
    print(f"\n{tiled['photo']} photo, tiled: p50 {tiled['p50_ms']} ms ({tiled['ms_per_megapixel']} ms per megapixel)")
    print(f"\nmemory: {result['memory']}")
    for other in result.get("compared", []):  # each setting's own server, read before it stopped
        if "memory" in other:
            print(f"memory with {other['setting']}: {other['memory']}")
    for other in [result, *result.get("compared", [])]:
        for line, count in other.get("log_warnings", {}).items():
            print(f"Triton's log{' with ' + other['setting'] if 'setting' in other else ''}: {count}x {line[:160]}")
    warned = sorted({w for row in result["ensemble"] for w in row["warnings"] if "UNTRAINED" not in w})
    for warning in warned:  # the untrained banners are expected here; anything else changes what was measured
        print(f"responses warned: {warning}")
    if result.get("seconds"):
        print("\nseconds: " + ", ".join(f"{part} {took}" for part, took in result["seconds"].items()))


def main(argv: list[str] | None = None) -> int:
    gpu, device = device_name()
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    parser.add_argument("--image", default="bridge_deck.jpg")
    parser.add_argument("--defects", type=int, default=10 if gpu else 2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8] if gpu else [1, 2])
    parser.add_argument("--requests", type=int, default=64 if gpu else 3, help="requests per concurrency level")
    parser.add_argument("--repeats", type=int, default=20 if gpu else 2, help="runs of each in-process baseline")
    parser.add_argument(
        "--timeline-frames", type=int, default=16 if gpu else 2, help="frames traced one at a time (Triton's trace)"
    )
    parser.add_argument("--tiled-size", default="6000x4000" if gpu else "1600x1200", help="the tiled photo, WxH")
    parser.add_argument("--tiled-requests", type=int, default=8 if gpu else 1, help="large photos sent tiled")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench_output" / "gpu.json")
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="run the ensemble levels again on a tritonserver started with this setting changed (repeatable): "
        "a baseline from the same run, e.g. --also OVERLAP_BATCHES=off",
    )
    args = parser.parse_args(argv)
    changes = [setting_change(spec) for spec in args.also]

    import tritonclient.grpc as grpcclient

    from anomaly.detector import export_files
    from anomaly.pipeline import InProcessPipeline
    from anomaly.serving.triton_server import running_server

    clock = time.monotonic()
    seconds: dict[str, float] = {}  # what each part took: how a GPU session's few minutes are spent

    def lap(part: str) -> None:
        nonlocal clock
        seconds[part] = round(time.monotonic() - clock, 1)
        clock = time.monotonic()

    settings = load_settings()
    if not settings.triton_trace_file:  # for a server started here: where Triton may trace the timeline's frames
        trace_file = REPO_ROOT / "bench_output" / "triton_trace.json"
        settings = dataclasses.replace(settings, triton_trace_file=str(trace_file))
    data = (REPO_ROOT / "samples" / args.image).read_bytes()
    local = InProcessPipeline(settings)
    threshold, defects = threshold_for(local, data, args.defects)
    workload = f"{args.image}, threshold {threshold:.4f} -> {defects} defects segmented"
    print(f"{device}: {workload}", flush=True)
    result: dict = {"device": device, "gpu": gpu, "workload": workload, "threshold": threshold, "seconds": seconds}
    lap("in-process pipeline loaded, threshold found")

    log_path = REPO_ROOT / "bench_output" / "triton.log"
    log_start = log_size(log_path)
    with running_server(settings, log_path) as server:
        stats_client = grpcclient.InferenceServerClient(server.grpc_url)
        load(server.grpc_url, data, threshold, 1, 2)  # warm-up: first-call costs stay out of the numbers
        lap("server started, warmed up")
        result["ensemble"], result["steps_by_concurrency"] = [], {}
        metrics_url = f"http://{server.client_host}:{settings.triton_metrics_port}/metrics"
        for level in args.concurrency:
            before, threads_before = model_stats(stats_client), thread_stats(metrics_url)
            early_before = early_embedding_counts(metrics_url)
            with GpuBusy() as busy:
                row = load(server.grpc_url, data, threshold, level, args.requests)
            row["early_embedding"] = counted(early_before, early_embedding_counts(metrics_url))
            result["ensemble"].append(row | busy.summary())
            after = stats_after(stats_client, before, row["requests"])  # the frames answered without error
            threads = thread_table(threads_before, thread_stats(metrics_url))
            result["steps_by_concurrency"][str(level)] = step_table(before, after) | threads
            result["steps"] = result["steps_by_concurrency"][str(level)]  # the table shows the highest level
            print(json.dumps(result["ensemble"][-1]), flush=True)
            lap(f"c={level}")
            save(args.out, result, complete=False)
        threaded = set(thread_stats(metrics_url))  # the steps answering from a batch thread
        result["timeline"] = frame_timeline(server.grpc_url, data, threshold, args.timeline_frames, threaded)
        print(json.dumps({"timeline": result["timeline"]}), flush=True)
        lap("timeline")
        # a large photo, tiled: what a drone frame costs (docs/campaigns.md, "Large photos: tiling")
        width, height = (int(v) for v in args.tiled_size.split("x"))
        big = large_photo(REPO_ROOT / "samples" / args.image, (width, height))
        load(server.grpc_url, big, threshold, 1, 1, tiling="on")
        tiled = load(server.grpc_url, big, threshold, 1, args.tiled_requests, tiling="on")
        tiled |= {"photo": args.tiled_size, "ms_per_megapixel": round(tiled["p50_ms"] * 1e6 / (width * height), 1)}
        result["tiled"] = tiled
        print(json.dumps({"tiled": tiled}), flush=True)
        lap("tiled")
        save(args.out, result, complete=False)
        result["memory"] = gpu_memory_mib(server) | {
            "tritonserver_sees_gpu": server.gpu and not server.hides_gpu,
            "torch_after_load_mib": torch_memory_after_load(server.log_path),
            "mps": server.mps_state,
        }
        stats_client.close()
    result["log_warnings"] = log_warnings(log_path, log_start) if server.process else {}  # a server it started
    lap("server stopped")
    save(args.out, result, complete=False)
    # the baselines before the compared settings: a setting that compiles may run into the machine's time limit
    if gpu:
        onnx_path = export_files(settings.model_repository)[0]
        result["gpu_checks"] = guarded("gpu_checks", lambda: gpu_checks(settings, local.meta, onnx_path, data))
        print(json.dumps(result["gpu_checks"]), flush=True)
        lap("gpu_checks")
    result["in_process"] = guarded(
        "in_process", lambda: timed(lambda: local(data, RequestOptions(threshold)), args.repeats)
    )
    lap("in_process")
    result["pieces"] = guarded("pieces", lambda: pieces(local, data, threshold, args.repeats, gpu))
    print(json.dumps(result["pieces"]), flush=True)
    lap("pieces")
    save(args.out, result, complete=False)
    meta = local.meta
    local = None  # its GPU memory goes before the plain script loads the same models again
    result["plain_script"] = guarded(
        "plain_script", lambda: plain_script(settings, meta, data, threshold, args.repeats, gpu)
    )
    lap("plain_script")
    save(args.out, result, complete=False)
    result["compared"] = []
    for change in changes:  # in the order given, saved after each
        result["compared"].append(
            compare_setting(change, lambda c: levels_with(c, data, threshold, args.concurrency, args.requests))
        )
        lap("=".join(change))
        save(args.out, result, complete=False)
    print_table(result)
    save(args.out, result, complete=True)
    print(f"\nwrote {args.out}")
    rows = result["ensemble"] + [row for other in result["compared"] for row in other["ensemble"]]
    failed = [other["setting"] for other in result["compared"] if "error" in other]
    failed += [key for key in ("gpu_checks", "in_process", "pieces", "plain_script") if "error" in result.get(key, {})]
    return 0 if all(not row["errors"] for row in rows) and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
