"""SAM3 as the segmenter step runs it, in one process: memory, per-piece times, and agreement with Meta's
own path (Sam3Processor.set_image + predict_inst) on the same boxes. Untrained SAM3 unless SAM_MODEL_PATH
holds one. On a GPU: bf16 autocast and CUDA graphs as served; on a CPU it runs too, slowly.

  python -m bench.sam3_gpu [--boxes 10] [--repeats 5] [--out bench_output/sam3.json]
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from anomaly.config import REPO_ROOT, load_settings


def memory(device: str) -> dict:
    import psutil
    import torch

    out = {"rss_mib": round(psutil.Process().memory_info().rss / 2**20)}
    if device == "cuda":
        out |= {
            "allocated_mib": round(torch.cuda.memory_allocated() / 2**20),
            "reserved_mib": round(torch.cuda.memory_reserved() / 2**20),
            "peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20),
        }
        try:
            from bench.gpu import _nvidia_smi

            used = {int(p): float(m) for p, m in _nvidia_smi("compute-apps=pid,used_memory") if p.isdigit()}
            out["process_mib"] = used.get(os.getpid())
        except Exception:  # noqa: BLE001 - nvidia-smi missing or no process list: torch's numbers remain
            pass
    return out


def grid_boxes(hw: tuple[int, int], n: int) -> np.ndarray:
    """n boxes spread over the frame, of several sizes (no detector needed)."""
    height, width = hw
    rng = np.random.default_rng(3)
    x0 = rng.uniform(0, width * 0.8, n)
    y0 = rng.uniform(0, height * 0.8, n)
    w = rng.uniform(0.05, 0.2, n) * width
    h = rng.uniform(0.05, 0.2, n) * height
    return np.stack([x0, y0, np.minimum(x0 + w, width), np.minimum(y0 + h, height)], 1).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    import torch

    from anomaly.images import decode_image
    from anomaly.sam3 import Sam3Segmenter, _builder, bpe_vocabulary
    from anomaly.weights import checkpoint_kind, make_untrained_sam3, untrained_sam3_path
    from bench.scenes import frame_and_boxes_parser, report

    args = frame_and_boxes_parser("python -m bench.sam3_gpu", __doc__, 5, "sam3.json").parse_args(argv)

    settings = load_settings()
    given = Path(settings.sam_model_path)
    if given.is_file() and checkpoint_kind(given)[0] == "sam3":
        checkpoint = given
    else:
        checkpoint = make_untrained_sam3(untrained_sam3_path(settings))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU",
        "checkpoint": checkpoint.name,
    }
    result["memory_before"] = memory(device)
    start = time.perf_counter()
    seg = Sam3Segmenter(checkpoint, device, settings.compute_threads if device == "cpu" else 0)
    result["load_s"] = round(time.perf_counter() - start, 1)
    result["memory_loaded"] = memory(device)
    if device == "cuda" and settings.cuda_graphs:
        start = time.perf_counter()
        seg.use_cuda_graphs(2)
        result["graph_capture_s"] = round(time.perf_counter() - start, 1)
    result["runtime"] = seg.runtime
    result["memory_ready"] = memory(device)

    data = (REPO_ROOT / "samples" / args.image).read_bytes()
    rgb = decode_image(data, settings.max_image_bytes, settings.max_image_pixels)
    prepared, hw = seg._prepare(data, settings.max_image_bytes, settings.max_image_pixels)
    boxes = grid_boxes(hw, args.boxes)

    def ms(fn, per: int = 1) -> float:
        fn()
        times = []
        for _ in range(args.repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return round(float(np.median(times)) * 1000 / per, 2)

    with torch.inference_mode(), seg._autocast():
        features = seg._encode(prepared[None])
        coords = seg._box_coords(boxes, hw)
        result["pieces_ms"] = {
            "prepare": ms(lambda: seg._prepare(data, settings.max_image_bytes, settings.max_image_pixels)),
            "encoder_b1": ms(lambda: seg._encode(prepared[None])),
            "encoder_b2_per_frame": ms(lambda: seg._encode(torch.stack([prepared] * 2)), 2),
            f"decoder_{len(boxes)}_boxes": ms(lambda: seg._decode(features, 0, coords)),
        }
    result["pieces_ms"]["whole_frame"] = ms(lambda: seg._segment_batch([(prepared, hw, boxes)]))
    crops = seg._segment_batch([(prepared, hw, boxes)])[0]
    result["memory_after_frames"] = memory(device)

    # Meta's path on the same weights and boxes (its builder and loader, its processor; bf16 on a GPU)
    from PIL import Image
    from sam3.model.sam3_image_processor import Sam3Processor

    reference = _builder().build_sam3_image_model(
        bpe_path=bpe_vocabulary(), device=device, checkpoint_path=str(checkpoint), load_from_HF=False,
        enable_inst_interactivity=True,
    )  # fmt: skip
    processor = Sam3Processor(reference, device=device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    )
    ious, score_diffs = [], []
    with autocast:
        state = processor.set_image(Image.fromarray(rgb))
        for crop, box in zip(crops, boxes):
            full, score, _ = reference.predict_inst(state, box=box, multimask_output=False)
            x0, y0, x1, y1 = crop.box
            ref = full[0][y0:y1, x0:x1] > 0
            union = (ref | crop.mask).sum()
            ious.append(float((ref & crop.mask).sum() / union) if union else 1.0)
            score_diffs.append(abs(crop.score - float(np.clip(score[0], 0, 1))))
    result["versus_meta_predict_inst"] = {
        "min_mask_iou": round(min(ious), 4),
        "max_score_diff": round(max(score_diffs), 5),
    }
    return report(result, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
