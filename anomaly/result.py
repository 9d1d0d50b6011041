"""The response object (docs/api.md, "The response"), built from the pipeline's stage outputs.

Fields of the original API (never renamed): frame_id, image_size, anomalies[] (anomaly_id, defect_type, structure_type,
bbox, geometry{area_pixels, length_pixels, width_pixels, orientation_degrees}, confidence{detection,
segmentation, combined}), anomaly_count, structures[], processing_time_ms. Extra fields are additive.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomaly import geometry as geo
from anomaly.detector import Detections, DetectorMetadata
from anomaly.masks import crop_to_rle
from anomaly.options import RequestOptions
from anomaly.scale import scale_record
from anomaly.segmenter import pixel_windows
from anomaly.tiling import TilePlan, describe
from anomaly.weights import UNTRAINED_BANNER, segmenter_title

# A structure is the one an anomaly lies on when its box covers at least this share of the anomaly's box.
MIN_STRUCTURE_COVERAGE = 0.5


def new_id(prefix: str) -> str:
    return new_ids(prefix, 1)[0]


def new_ids(prefix: str, count: int) -> list[str]:
    """`count` ids of 48 random bits each, from one read of the system's random source (a frame has hundreds of
    structures: one uuid4 each took 0.75 ms of the result step's 1.9)."""
    digits = os.urandom(6 * count).hex()
    return [f"{prefix}_{digits[12 * i : 12 * i + 12]}" for i in range(count)]


def bbox_dict(box) -> dict:
    """Integer pixel edges: the box spans columns x_min..x_max-1 and rows y_min..y_max-1."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return {"x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1}


def is_crack(defect_type: str) -> bool:
    return "crack" in defect_type.lower()


@dataclass
class Findings:
    """What the pipeline found in one frame: the detections above the threshold, which of them were segmented
    (`seg_index`), and for each segmented defect k its mask box, mask crop (none when masks were not asked
    for), SAM's score and its geometry."""

    detections: Detections
    seg_index: np.ndarray
    mask_boxes: np.ndarray
    masks: list[np.ndarray]
    mask_scores: np.ndarray
    geometries: list[dict]


def _structures(found: Findings, metadata: DetectorMetadata, image_hw) -> tuple[list[dict], np.ndarray]:
    """The detected structural elements as response records, and their integer boxes (N, 4), same order."""
    det = found.detections
    roles = {c: metadata.role(c) for c in set(det.class_ids.tolist())}
    keep = np.asarray([i for i, c in enumerate(det.class_ids.tolist()) if roles[c] == "structure"], np.int64)
    boxes = pixel_windows(det.boxes[keep], image_hw)
    names = {c: metadata.name(c) for c in roles}
    class_ids, scores = det.class_ids[keep].tolist(), det.scores[keep].tolist()
    records = [
        {
            "structure_id": structure_id,
            "structure_type": names[c],
            "bbox": {"x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1},  # as bbox_dict, on ints already
            "confidence": round(score, 4),
        }
        for structure_id, c, score, (x0, y0, x1, y1) in zip(
            new_ids("struct", len(keep)), class_ids, scores, boxes.tolist()
        )
    ]
    return records, boxes


def _hosts(boxes: np.ndarray, structure_boxes: np.ndarray, confidences: list[float]) -> list[int | None]:
    """For each box (N, 4), the index of the structure whose box covers the largest share of it, at least
    MIN_STRUCTURE_COVERAGE (ties: the more confident, then the first), or None."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if not len(structure_boxes):
        return [None] * len(boxes)
    a, b = boxes[:, None, :], np.asarray(structure_boxes, np.float64)[None, :, :]
    w = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    h = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    share = np.maximum(w, 0) * np.maximum(h, 0) / np.where(area > 0, area, np.inf)[:, None]
    confidences = np.asarray(confidences, np.float64)
    hosts: list[int | None] = []
    for row in share:
        best = row.max()
        if best < MIN_STRUCTURE_COVERAGE:
            hosts.append(None)
            continue
        tied = np.flatnonzero(row == best)
        hosts.append(int(tied[np.argmax(confidences[tied])]))  # argmax: the first of equal confidences
    return hosts


def _anomaly(found: Findings, k: int, host: dict | None, metadata: DetectorMetadata, options: RequestOptions,
             severity_thresholds_mm, image_hw) -> dict:  # fmt: skip
    """Segmented defect k as its response record."""
    det = int(np.asarray(found.seg_index, int)[k])
    box = tuple(int(v) for v in found.mask_boxes[k])
    defect_type = metadata.name(int(found.detections.class_ids[det]))
    det_conf, seg_conf = float(found.detections.scores[det]), float(found.mask_scores[k])
    g = dict(found.geometries[k])
    g["area_pixels"] = int(g["area_pixels"])
    if options.mm_per_pixel:
        g |= geo.to_millimetres(g, options.mm_per_pixel)
    anomaly = {
        "anomaly_id": new_id("anom"),
        "defect_type": defect_type,
        "structure_type": host["structure_type"] if host else "unknown",
        "structure_id": host["structure_id"] if host else None,
        "bbox": bbox_dict(box),
        "geometry": g,
        "confidence": {
            "detection": round(det_conf, 4),
            "segmentation": round(seg_conf, 4),
            "combined": round((det_conf + seg_conf) / 2.0, 4),
        },
    }
    if options.mm_per_pixel and is_crack(defect_type):
        anomaly["severity"] = geo.crack_severity(g["max_width_mm"], severity_thresholds_mm)
    if options.include_masks:
        anomaly["mask"] = crop_to_rle(found.masks[k], box, image_hw)
    return anomaly


def build_response(
    *,
    image_hw: tuple[int, int],
    findings: Findings,
    metadata: DetectorMetadata,
    options: RequestOptions,
    severity_thresholds_mm: tuple[float, float, float],
    warnings: list[str],
    processing_time_ms: float,
    models: dict | None = None,
    tiling: dict | None = None,
) -> dict:
    height, width = image_hw
    structures, structure_boxes = _structures(findings, metadata, image_hw)
    hosts = _hosts(findings.mask_boxes, structure_boxes, [r["confidence"] for r in structures])
    anomalies = [
        _anomaly(findings, k, None if h is None else structures[h], metadata, options, severity_thresholds_mm, image_hw)
        for k, h in enumerate(hosts)
    ]
    response = {
        "frame_id": options.frame_id or new_id("frame"),
        "image_size": {"width": int(width), "height": int(height)},
        "anomalies": anomalies,
        "anomaly_count": len(anomalies),
        "structures": structures,
        "processing_time_ms": round(float(processing_time_ms), 2),
    }
    if options.mm_per_pixel:
        response["mm_per_pixel"] = options.mm_per_pixel
    response["scale"] = scale_record(options)
    if tiling is not None:
        response["tiling"] = tiling
    response["untrained_weights"] = any(w.startswith("UNTRAINED") for w in warnings)
    response["warnings"] = list(warnings)
    if models:
        response["models"] = models
    return response


def warnings_for(meta: DetectorMetadata, segmenter_info: dict, notes: list[str], detector_info: dict) -> list[str]:
    found = []
    if meta.untrained:
        found.append(UNTRAINED_BANNER.format(what=f"the detector (RF-DETR {meta.variant})"))
    if segmenter_info.get("untrained"):
        title = segmenter_title(segmenter_info.get("kind", "sam2.1"), segmenter_info.get("variant", ""))
        found.append(UNTRAINED_BANNER.format(what=f"the segmenter ({title})"))
    for info in (detector_info, segmenter_info):  # a GPU machine whose model runs on the CPU, say
        if info.get("warning"):
            found.append(info["warning"])
    return found + list(notes)


_ABSOLUTE_PATH = re.compile(r"/(?:[^/\s;,()'\"]+/)*([^/\s;,()'\"]+)")


def file_names_only(text: str) -> str:
    """Absolute paths in a note -> their file names: responses travel to strangers; the log and /info keep the
    full paths for the operator."""
    return _ABSOLUTE_PATH.sub(r"\1", text)


def models_info(meta: DetectorMetadata, segmenter: dict, detector: dict) -> dict:
    """Which models and weights produced a response, and what ran them: an inspection record must say."""
    return {
        "detector": {
            "name": f"rf-detr-{meta.variant}",
            "weights": Path(meta.weights).name if meta.weights != "coco" else "coco",
            "untrained": meta.untrained,
            "resolution": meta.resolution,
            "backend": detector.get("backend", ""),
            "device": detector.get("device", ""),
            "precision": detector.get("precision", ""),
            "runtime": detector.get("runtime", ""),
            "reason": detector.get("reason", ""),
            "batches": detector.get("batches", ""),
        },
        "segmenter": {
            "name": "-".join(filter(None, [segmenter.get("kind", "sam2.1"), segmenter.get("variant")])),
            "weights": Path(segmenter.get("checkpoint", "")).name,
            "untrained": bool(segmenter.get("untrained")),
            "device": segmenter.get("device", ""),
            "runtime": segmenter.get("runtime", ""),
            "note": file_names_only(segmenter.get("note", "")),
            "batches": segmenter.get("batches", ""),
            "early_embedding": segmenter.get("early_embedding", "off"),
        },
    }


def frame_response(*, notes: list[str], detector: dict, segmenter: dict, plan: TilePlan, sam_windows: np.ndarray,
                   start_ns: int, **frame) -> dict:  # fmt: skip
    """One frame's whole response, as the result step and the in-process pipeline both answer it: `frame` is
    build_response's (image_hw, findings, metadata, options, severity_thresholds_mm); the warnings and `models`
    come from what the detector and the segmenter said of themselves (`detector`, `segmenter`: their descriptions)
    and the selection's `notes`; `tiling` from the plan and SAM's windows; processing_time_ms is stamped once the
    response is built, from `start_ns` (time.monotonic_ns() when the first step took the frame)."""
    metadata = frame["metadata"]
    response = build_response(
        **frame,
        warnings=warnings_for(metadata, segmenter, notes, detector),
        processing_time_ms=0.0,
        models=models_info(metadata, segmenter, detector),
        tiling=describe(plan, sam_windows, int(segmenter.get("resolution", 1024))),
    )
    response["processing_time_ms"] = round((time.monotonic_ns() - start_ns) / 1e6, 2)
    return response


def to_json(response: dict) -> bytes:
    return json.dumps(response, separators=(",", ":")).encode("utf-8")
