"""The pipeline's stages as plain functions, and the same stages chained in one process.

Triton's models each call one stage; `InProcessPipeline` calls them all in a row. The two therefore
compute the same thing, which is what the parity tests and the latency baseline rely on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from anomaly import geometry, masks
from anomaly.config import Settings
from anomaly.detector import Detections, DetectorMetadata, OnnxDetector, select_detections
from anomaly.geometry import GEOMETRY_FIELDS
from anomaly.images import decode_image, rfdetr_preprocess
from anomaly.options import RequestOptions
from anomaly.result import build_response
from anomaly.segmenter import MaskCrop
from anomaly.weights import UNTRAINED_BANNER


def preprocess(data: bytes, meta: DetectorMetadata, settings: Settings) -> tuple[np.ndarray, np.ndarray]:
    """Encoded image -> (detector input (1, 3, R, R), RGB uint8 (H, W, 3))."""
    rgb = decode_image(data, settings.max_image_bytes, settings.max_image_pixels)
    return rfdetr_preprocess(rgb, meta.resolution, meta.means, meta.stds)[None], rgb


def select(
    boxes: np.ndarray,
    logits: np.ndarray,
    image_hw,
    threshold: float,
    meta: DetectorMetadata,
    max_defects: int,
) -> tuple[Detections, np.ndarray, list[str]]:
    """Raw detector output of one image -> (all detections, indices of the defects to segment, notes)."""
    det = select_detections(boxes, logits, tuple(int(v) for v in image_hw), threshold, meta.num_select)
    defects = np.array([i for i, c in enumerate(det.class_ids) if meta.role(int(c)) == "defect"], np.int32)
    notes = []
    if len(defects) > max_defects:
        notes.append(
            f"{len(defects)} defects scored above {threshold}; only the {max_defects} most confident were "
            "segmented and measured (MAX_DETECTIONS). Raise confidence_threshold or MAX_DETECTIONS."
        )
        defects = defects[:max_defects]
    return det, defects, notes


def measure_all(crops: list[np.ndarray]) -> np.ndarray:
    """Mask crops -> (N, 5) float64 in GEOMETRY_FIELDS order (float32 would round areas above 2**24)."""
    rows = [[geometry.measure(m)[f] for f in GEOMETRY_FIELDS] for m in crops]
    return np.asarray(rows, np.float64).reshape(len(crops), len(GEOMETRY_FIELDS))


def geometry_dicts(table: np.ndarray) -> list[dict]:
    """(N, 5) -> dicts, the values rounded as measure() rounds them."""
    out = []
    for row in np.asarray(table, np.float64).reshape(-1, len(GEOMETRY_FIELDS)):
        g = {f: round(float(v), 2) for f, v in zip(GEOMETRY_FIELDS, row)}
        g["area_pixels"] = int(round(g["area_pixels"]))
        out.append(g)
    return out


def warnings_for(meta: DetectorMetadata, segmenter_info: dict, notes: list[str]) -> list[str]:
    found = []
    if meta.untrained:
        found.append(UNTRAINED_BANNER.format(what=f"the detector (RF-DETR {meta.variant})"))
    if segmenter_info.get("untrained"):
        found.append(UNTRAINED_BANNER.format(what=f"the segmenter (SAM2.1 {segmenter_info.get('variant')})"))
    return found + list(notes)


def models_info(meta: DetectorMetadata, segmenter: dict) -> dict:
    """Which models and weights produced a response: an inspection record must say."""
    return {
        "detector": {
            "name": f"rf-detr-{meta.variant}",
            "weights": Path(meta.weights).name if meta.weights != "coco" else "coco",
            "untrained": meta.untrained,
            "resolution": meta.resolution,
        },
        "segmenter": {
            "name": f"{segmenter.get('kind', 'sam2.1')}-{segmenter.get('variant')}",
            "weights": Path(segmenter.get("checkpoint", "")).name,
            "untrained": bool(segmenter.get("untrained")),
            "device": segmenter.get("device", ""),
            "note": segmenter.get("note", ""),
        },
    }


def pack_crops(crops: list[MaskCrop]) -> dict[str, np.ndarray]:
    return {
        "MASK_BOXES": np.asarray([c.box for c in crops], np.int32).reshape(len(crops), 4),
        "MASKS": np.array([masks.pack(c.mask) for c in crops] or [], dtype=np.object_),
        "MASK_SCORES": np.asarray([c.score for c in crops], np.float32),
    }


def unpack_crops(mask_boxes: np.ndarray, packed: np.ndarray) -> list[np.ndarray]:
    return [
        masks.unpack(bytes(data), int(y1 - y0), int(x1 - x0))
        for (x0, y0, x1, y1), data in zip(mask_boxes.reshape(-1, 4), packed.reshape(-1))
    ]


class InProcessPipeline:
    """Every stage in this process: the baseline the Triton ensemble is compared with."""

    def __init__(self, settings: Settings, model_repository: Path | None = None):
        from anomaly.weights import load_segmenter, segmenter_info

        repo = model_repository or settings.model_repository
        self.settings = settings
        self.meta = DetectorMetadata.load(repo / "detector" / "1" / "metadata.json")
        self.detector = OnnxDetector(
            repo / "detector" / "1" / "model.onnx",
            settings.compute_threads,
            settings.device,
            settings.weights_dir / "trt_cache",
        )
        self.segmenter, spec = load_segmenter(settings)
        self.segmenter_info = segmenter_info(self.segmenter, spec)

    def __call__(self, data: bytes, options: RequestOptions) -> dict:
        start = time.monotonic_ns()
        x, rgb = preprocess(data, self.meta, self.settings)
        boxes, logits = self.detector(x)
        det, seg_index, notes = select(
            boxes[0],
            logits[0],
            rgb.shape[:2],
            options.confidence_threshold,
            self.meta,
            self.settings.max_detections,
        )
        crops = self.segmenter.segment(rgb, det.boxes[seg_index])
        table = measure_all([c.mask for c in crops])
        return build_response(
            image_hw=rgb.shape[:2],
            detections=det,
            metadata=self.meta,
            seg_index=seg_index,
            mask_boxes=np.asarray([c.box for c in crops], np.int32).reshape(-1, 4),
            masks=[c.mask for c in crops],
            mask_scores=np.asarray([c.score for c in crops], np.float32),
            geometries=geometry_dicts(table),
            options=options,
            severity_thresholds_mm=self.settings.severity_thresholds_mm,
            warnings=warnings_for(self.meta, self.segmenter_info, notes),
            processing_time_ms=(time.monotonic_ns() - start) / 1e6,
            models=models_info(self.meta, self.segmenter_info),
        )


def to_json(response: dict) -> bytes:
    return json.dumps(response, separators=(",", ":")).encode("utf-8")
