"""The pipeline's stages as plain functions, and the same stages chained in one process.

Triton's models each call one stage; `InProcessPipeline` calls them all in a row. The two therefore
compute the same thing, which is what the parity tests and the latency baseline rely on.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from anomaly import crack_width, geometry, masks
from anomaly.config import Settings
from anomaly.detector import Detections, DetectorMetadata, export_files
from anomaly.geometry import GEOMETRY_FIELDS
from anomaly.geometry_workers import GeometryWorkers
from anomaly.images import decode_image, read_header
from anomaly.options import RequestOptions
from anomaly.result import Findings, frame_response, is_crack
from anomaly.scale import resolve_scale
from anomaly.tiling import TilePlan, merge_windows, plan_tiles, select_windows


def select(
    boxes: np.ndarray,
    logits: np.ndarray,
    plan: TilePlan,
    threshold: float,
    meta: DetectorMetadata,
    max_defects: int,
) -> tuple[Detections, np.ndarray, list[str]]:
    """Raw detector output of one frame's windows, (W, Q, 4) and (W, Q, slots) (W = 1 when not tiled) -> (all
    detections, indices of the defects to segment, notes)."""
    det = merge_windows(select_windows(boxes, logits, plan, threshold, meta.num_select), plan)
    defects = np.array([i for i, c in enumerate(det.class_ids) if meta.role(int(c)) == "defect"], np.int32)
    notes = []
    if len(defects) > max_defects:
        notes.append(
            f"{len(defects)} defects scored above {threshold}; only the {max_defects} most confident were "
            "segmented and measured (MAX_DETECTIONS). Raise confidence_threshold or MAX_DETECTIONS."
        )
        defects = defects[:max_defects]
    return det, defects, notes


def tile_plan(image_hw, options: RequestOptions, settings: Settings, resolution: int) -> TilePlan:
    """How a frame is detected: the request's `tiling`, else the TILING setting (anomaly.tiling)."""
    return plan_tiles(image_hw, resolution, options.tiling or settings.tiling, settings.tile_overlap)


def measure_all(crops: list[np.ndarray], workers: GeometryWorkers | None = None) -> np.ndarray:
    """Mask crops -> (N, 5) float64 in GEOMETRY_FIELDS order (float32 would round areas above 2**24), in this
    process or shared with `workers` (anomaly.geometry_workers)."""
    if workers is not None and len(crops) > 1:
        return workers.measure_all(crops)
    rows = [geometry.measure_row(m) for m in crops]
    return np.asarray(rows, np.float64).reshape(len(crops), len(GEOMETRY_FIELDS))


def mask_widths(count: int) -> np.ndarray:
    """The WIDTH table of `count` defects measured by their masks alone: (N, 3) [method 0, uncertainty, why 0]."""
    return np.tile([0.0, crack_width.MASK_UNCERTAINTY_PX, 0.0], (count, 1))


def crack_flags(meta: DetectorMetadata, class_ids: np.ndarray, seg_index: np.ndarray) -> list[bool]:
    """Which segmented defects (detections `seg_index`) are cracks, whose widths the photo can tell."""
    class_ids = np.asarray(class_ids).reshape(-1)
    return [is_crack(meta.name(int(class_ids[i]))) for i in np.asarray(seg_index).reshape(-1)]


def measure_frame(crops: list[np.ndarray], mask_boxes: np.ndarray, cracks: list[bool], gray_of, settings: Settings,
                  workers: GeometryWorkers | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """A frame's mask crops -> their GEOMETRY table (N, 5) and WIDTH table (N, 3: the width's method, a code of
    crack_width.WIDTH_METHODS; its uncertainty in px; why the photo could not tell, 0 or 1 + the index of the
    reason in crack_width.WHY_MASK). Narrow cracks' widths come from the photo (`gray_of()`, decoded only then)
    when SUBPIXEL_WIDTH is on (anomaly.crack_width)."""
    table = measure_all(crops, workers)
    widths = mask_widths(len(crops))
    if not settings.subpixel_width:
        return table, widths
    max_widths = table[:, GEOMETRY_FIELDS.index("max_width_pixels")]
    found = crack_width.frame_widths(
        gray_of, crops, mask_boxes, max_widths, cracks, settings.subpixel_max_width_px, settings.crack_core_brightness
    )
    reasons = list(crack_width.WHY_MASK)
    for k, got in enumerate(found):
        if got is None:
            continue
        if got.method == "image":
            table[k, GEOMETRY_FIELDS.index("width_pixels")] = got.width
            table[k, GEOMETRY_FIELDS.index("max_width_pixels")] = got.max_width
            widths[k] = (1.0, got.uncertainty, 0.0)
        else:
            widths[k, 2] = 1.0 + reasons.index(got.reason)
    return table, widths


def gray_frame(data: bytes, settings: Settings, field: str = "image") -> np.ndarray:
    """The frame in grey levels (H, W) uint8, upright as the segmenter sees it (errors name `field`)."""
    rgb = decode_image(data, settings.max_image_bytes, settings.max_image_pixels, field)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def geometry_dicts(table: np.ndarray, widths: np.ndarray | None = None) -> list[dict]:
    """(N, 5) GEOMETRY and (N, 3) WIDTH tables -> dicts, the values rounded as measure() rounds them, with how
    each width was measured."""
    table = np.asarray(table, np.float64).reshape(-1, len(GEOMETRY_FIELDS))
    widths = mask_widths(len(table)) if widths is None else np.asarray(widths, np.float64).reshape(-1, 3)
    reasons = list(crack_width.WHY_MASK)
    out = []
    for row, (method, uncertainty, why) in zip(table, widths):
        g = {f: round(float(v), 2) for f, v in zip(GEOMETRY_FIELDS, row)}
        g["area_pixels"] = int(round(g["area_pixels"]))
        g["width_method"] = crack_width.WIDTH_METHODS[int(method)]
        g["width_uncertainty_pixels"] = round(float(uncertainty), 2)
        if int(why):
            g["width_note"] = crack_width.WHY_MASK[reasons[int(why) - 1]]
        out.append(g)
    return out


def unpack_crops(mask_boxes: np.ndarray, packed: np.ndarray) -> list[np.ndarray]:
    return [
        masks.unpack(bytes(data), int(y1 - y0), int(x1 - x0))
        for (x0, y0, x1, y1), data in zip(mask_boxes.reshape(-1, 4), packed.reshape(-1))
    ]


class InProcessPipeline:
    """Every stage in this process, through the same objects the Triton steps use: the baseline the
    ensemble is compared with."""

    def __init__(self, settings: Settings, model_repository: Path | None = None):
        from anomaly.detector import DetectorRunner
        from anomaly.segmenter import ready_for_serving
        from anomaly.weights import load_segmenter

        repo = model_repository or settings.model_repository
        self.settings = settings
        onnx_path, meta_path = export_files(repo)
        self.meta = DetectorMetadata.load(meta_path)
        self.detector = DetectorRunner(self.meta, onnx_path, settings)
        self.segmenter, self.spec = load_segmenter(settings)
        self.sam_batch = 1  # windows of a tiled frame embedded one at a time, as one frame is
        ready_for_serving(self.segmenter, settings, self.sam_batch)

    def segmenter_info(self) -> dict:
        """Which SAM runs, for responses: its runtime as it is now (a compile that failed at the first frame)."""
        from anomaly.weights import segmenter_info

        return segmenter_info(self.segmenter, self.spec)

    def __call__(self, data: bytes, options: RequestOptions) -> dict:
        start = time.monotonic_ns()
        s = self.settings
        header = read_header(data, s.max_image_bytes, s.max_image_pixels)
        options = resolve_scale(options, data)
        image_hw = (header.height, header.width)
        plan = tile_plan(image_hw, options, s, self.meta.resolution)
        inputs, _ = self.detector.prepare_windows(data, plan.windows)
        boxes, logits = self.detector.run_all(inputs)
        det, seg_index, notes = select(boxes, logits, plan, options.confidence_threshold, self.meta, s.max_detections)
        seg_boxes = det.boxes[seg_index]
        crops, sam_frames = [], []
        if len(seg_boxes):
            sam_frames = self.segmenter.prepare_windows(
                data, seg_boxes, plan.tiled, s.max_image_bytes, s.max_image_pixels
            )
            crops = self.segmenter.segment_windows([sam_frames], self.sam_batch)[0]
        mask_boxes = np.asarray([c.box for c in crops], np.int32).reshape(-1, 4)
        cracks = crack_flags(self.meta, det.class_ids, seg_index)
        table, widths = measure_frame([c.mask for c in crops], mask_boxes, cracks, lambda: gray_frame(data, s), s)
        findings = Findings(
            detections=det,
            seg_index=seg_index,
            mask_boxes=mask_boxes,
            masks=[c.mask for c in crops],
            mask_scores=np.asarray([c.score for c in crops], np.float32),
            geometries=geometry_dicts(table, widths),
        )
        return frame_response(
            image_hw=image_hw,
            findings=findings,
            metadata=self.meta,
            options=options,
            severity_thresholds_mm=s.severity_thresholds_mm,
            notes=notes,
            detector=self.detector.info,
            segmenter=self.segmenter_info(),
            plan=plan,
            sam_windows=np.asarray([f.window for f in sam_frames]),
            start_ns=start,
        )
