"""RF-DETR as exported to ONNX: its metadata, an onnxruntime session, and rfdetr's postprocess.

The metadata file (written by `export/`) is the single source of the detector's resolution,
normalisation and classes; nothing on the serving side hard-codes them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from anomaly.taxonomy import ROLES

log = logging.getLogger(__name__)

ONNX_INPUT = "input"
ONNX_BOXES = "dets"  # (B, Q, 4) normalised cx, cy, w, h
ONNX_LOGITS = "labels"  # (B, Q, slots) class logits


@dataclass
class DetectorMetadata:
    variant: str
    resolution: int
    means: list[float]
    stds: list[float]
    class_names: list[str]  # one per logit slot; "" for a slot that names nothing
    roles: list[str]  # one per logit slot: defect / structure / ignore
    num_select: int = 300
    weights: str = ""
    untrained: bool = False
    rfdetr_version: str = ""
    source: dict = field(default_factory=dict)  # what the export was made from, to skip needless re-exports

    def __post_init__(self):
        if len(self.class_names) != len(self.roles):
            raise ValueError(f"{len(self.class_names)} class names but {len(self.roles)} roles")
        bad = sorted(set(self.roles) - set(ROLES))
        if bad:
            raise ValueError(f"unknown roles {bad}; use {ROLES}")

    @classmethod
    def load(cls, path: str | Path) -> DetectorMetadata:
        with open(path) as f:
            return cls(**json.load(f))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def name(self, class_id: int) -> str:
        if 0 <= class_id < len(self.class_names) and self.class_names[class_id]:
            return self.class_names[class_id]
        return f"class_{class_id}"

    def role(self, class_id: int) -> str:
        return self.roles[class_id] if 0 <= class_id < len(self.roles) else "ignore"

    def classes_with_role(self, role: str) -> list[str]:
        return [n for n, r in zip(self.class_names, self.roles) if r == role]


@dataclass
class Detections:
    boxes: np.ndarray  # (N, 4) float32 x_min, y_min, x_max, y_max in image pixels
    scores: np.ndarray  # (N,) float32, descending
    class_ids: np.ndarray  # (N,) int32 logit slot

    def __len__(self) -> int:
        return len(self.scores)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x.astype(np.float32)))).astype(np.float32)


def select_detections(
    boxes_cxcywh: np.ndarray,
    logits: np.ndarray,
    image_hw: tuple[int, int],
    threshold: float,
    num_select: int = 300,
) -> Detections:
    """One image's raw outputs -> detections, as rfdetr's PostProcess and predict() do it: sigmoid over every
    query x class, top-`num_select` of the flattened scores (stable order), boxes scaled to the image and
    clamped, then `score > threshold`."""
    height, width = image_hw
    prob = _sigmoid(logits).reshape(-1)
    k = min(num_select, prob.size)
    order = np.argsort(-prob, kind="stable")[:k]
    scores = prob[order]
    slots = logits.shape[-1]
    query, class_ids = order // slots, order % slots
    cx, cy, w, h = np.moveaxis(boxes_cxcywh[query].astype(np.float32), -1, 0)
    xyxy = np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)
    scale = np.array([width, height, width, height], np.float32)
    xyxy = np.clip(xyxy * scale, 0.0, scale)
    keep = scores > threshold
    return Detections(
        boxes=xyxy[keep].astype(np.float32),
        scores=scores[keep].astype(np.float32),
        class_ids=class_ids[keep].astype(np.int32),
    )


def onnx_providers(device: str, engine_cache: Path | None = None) -> list:
    """TensorRT (FP16, engines cached in `engine_cache`) then CUDA when onnxruntime-gpu and a GPU are present,
    else the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen: list = []
    if device in ("auto", "cuda"):
        if "TensorrtExecutionProvider" in available and engine_cache is not None:
            cache = engine_cache
            cache.mkdir(parents=True, exist_ok=True)
            chosen.append(
                (
                    "TensorrtExecutionProvider",
                    {
                        "trt_fp16_enable": True,
                        "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": str(cache),
                    },
                )
            )
        if "CUDAExecutionProvider" in available:
            chosen.append("CUDAExecutionProvider")
        if device == "cuda" and not chosen:
            log.warning("DEVICE=cuda but onnxruntime has no GPU provider (%s); running on CPU", available)
    chosen.append("CPUExecutionProvider")
    return chosen


class OnnxDetector:
    """The exported RF-DETR graph in onnxruntime; takes a batch (B, 3, R, R) float32."""

    def __init__(self, onnx_path: str | Path, threads: int, device: str = "auto", engine_cache: Path | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = onnx_providers(device, engine_cache)
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        self.providers = self.session.get_providers()

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        boxes, logits = self.session.run([ONNX_BOXES, ONNX_LOGITS], {ONNX_INPUT: batch})
        return boxes, logits
