"""Checks of what one pipeline step receives from another. Triton serves every step on its ports, so a
client can call `geometry` or `result` directly with anything: each step checks shapes, sizes and
consistency before using its inputs, and a failed check is the caller's error naming the input
(INVALID_ARG), never an allocation sized by the caller or a Python exception text."""

from __future__ import annotations

import json

import numpy as np

from anomaly.crack_width import WHY_MASK, WIDTH_METHODS
from anomaly.errors import InputError


def finite(name: str, values: np.ndarray) -> np.ndarray:
    if values.size and not np.isfinite(values).all():
        raise InputError(name, "holds NaN or infinite values")
    return values


def required(name: str, values: np.ndarray | None) -> np.ndarray:
    """An input the request must carry (None: it does not)."""
    if values is None:
        raise InputError(name, "is missing from the request")
    return values


def encoded_image(name: str, values: np.ndarray) -> bytes:
    """The one encoded image of an input, refusing batches it would otherwise silently drop: a string tensor of
    one element (the ensemble's IMAGE), or the bytes as a uint8 row of one request (ENCODED between steps)."""
    if values.dtype == np.uint8:
        if values.ndim != 2 or values.shape[0] != 1:
            raise InputError(name, f"must be one row of encoded bytes, shape (1, N), got {tuple(values.shape)}")
        return values.tobytes()
    flat = values.reshape(-1)
    if flat.size != 1:
        raise InputError(name, f"must hold exactly one encoded image, got {flat.size} elements")
    value = flat[0]
    return value if isinstance(value, bytes) else bytes(value)


def text(name: str, values: np.ndarray, max_chars: int = 64) -> str:
    """One short string: a key or a name passed between steps."""
    flat = values.reshape(-1)
    if flat.size != 1:
        raise InputError(name, f"must hold one string, got {flat.size} elements")
    value = flat[0]
    raw = value if isinstance(value, bytes) else str(value).encode()
    if len(raw) > max_chars:
        raise InputError(name, f"must be at most {max_chars} characters, got {len(raw)}")
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise InputError(name, "must be ASCII text") from None


def shaped(name: str, values: np.ndarray, shape: tuple) -> np.ndarray:
    """`shape` with None for any length: (1, None, 4) accepts (1, N, 4)."""
    if values.ndim != len(shape) or any(want is not None and got != want for got, want in zip(values.shape, shape)):
        want = "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"
        raise InputError(name, f"must have shape {want}, got {tuple(values.shape)}")
    return values


def same_count(counts: dict[str, int]) -> int:
    """Inputs that describe the same items must agree on how many there are."""
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise InputError(next(iter(counts)), f"and its companions disagree on the number of items ({listed})")
    return next(iter(counts.values()))


def at_most(name: str, count: int, limit: int) -> int:
    if count > limit:
        raise InputError(name, f"holds {count} items, more than the {limit} a frame may have (MAX_DETECTIONS)")
    return count


def image_size(name: str, values: np.ndarray, max_pixels: int) -> tuple[int, int]:
    shaped(name, values.reshape(-1), (2,))
    height, width = (int(v) for v in values.reshape(-1))
    if height < 1 or width < 1 or height * width > max_pixels:
        raise InputError(name, f"must be a positive height and width of at most {max_pixels} pixels, got {values}")
    return height, width


def crop_boxes(name: str, boxes: np.ndarray, max_pixels: int, image_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Integer mask windows (N, 4) x0 y0 x1 y1: non-empty, inside the image when its size is known, and each
    no larger than MAX_IMAGE_PIXELS (the size of the mask the window stands for)."""
    boxes = shaped(name, boxes.reshape(-1, 4) if boxes.size else boxes.reshape(0, 4), (None, 4)).astype(np.int64)
    if not len(boxes):
        return boxes
    x0, y0, x1, y1 = boxes.T
    if (x0 < 0).any() or (y0 < 0).any() or (x1 <= x0).any() or (y1 <= y0).any():
        raise InputError(name, "must hold windows x0 y0 x1 y1 with 0 <= x0 < x1 and 0 <= y0 < y1")
    if ((x1 - x0) * (y1 - y0) > max_pixels).any():
        raise InputError(name, f"holds a window larger than the {max_pixels} pixels an image may have")
    if image_hw is not None and ((y1 > image_hw[0]).any() or (x1 > image_hw[1]).any()):
        raise InputError(name, f"holds a window outside the {image_hw[1]}x{image_hw[0]} image")
    return boxes


def packed_masks(name: str, packed: np.ndarray, boxes: np.ndarray) -> None:
    """One bit-packed mask per window, each exactly as long as its window needs."""
    items = packed.reshape(-1)
    same_count({name: len(items), "MASK_BOXES": len(boxes)})
    for i, (data, (x0, y0, x1, y1)) in enumerate(zip(items, boxes)):
        need = ((y1 - y0) * (x1 - x0) + 7) // 8
        if not isinstance(data, bytes | bytearray | np.bytes_) or len(data) != need:
            raise InputError(f"{name}[{i}]", f"must be {need} bytes (its window's pixels, 8 a byte)")


def json_object(name: str, values: np.ndarray) -> dict:
    items = values.reshape(-1)
    if items.size != 1:
        raise InputError(name, f"must hold one JSON object, got {items.size} elements")
    try:
        parsed = json.loads(bytes(items[0]))
    except (ValueError, TypeError):
        raise InputError(name, "is not a JSON object") from None
    if not isinstance(parsed, dict):
        raise InputError(name, "is not a JSON object")
    return parsed


def indices(name: str, values: np.ndarray, size: int) -> np.ndarray:
    values = values.reshape(-1)
    if values.size and (values.min() < 0 or values.max() >= size):
        raise InputError(name, f"must index the {size} detections")
    return values


def width_codes(widths: np.ndarray) -> np.ndarray:
    """WIDTH rows (anomaly.pipeline.measure_frame): a method code, a non-negative uncertainty, a reason code."""
    if widths.size:
        method, uncertainty, why = widths[:, 0], widths[:, 1], widths[:, 2]
        if not np.isin(method, np.arange(len(WIDTH_METHODS))).all():
            raise InputError("WIDTH_IN", f"column 0 must be a method code 0..{len(WIDTH_METHODS) - 1}")
        if (uncertainty < 0).any():
            raise InputError("WIDTH_IN", "column 1 (uncertainty) must not be negative")
        if not np.isin(why, np.arange(len(WHY_MASK) + 1)).all():
            raise InputError("WIDTH_IN", f"column 2 must be a reason code 0..{len(WHY_MASK)}")
    return widths


def scale_object(name: str, value) -> dict:
    """The pixel size the preprocess step decided: {"mm_per_pixel": positive number or null, "source", "detail"}."""
    scale = json_object(name, value)
    mm = scale.get("mm_per_pixel")
    if mm is not None and (isinstance(mm, bool) or not isinstance(mm, (int, float)) or not 0 < mm < float("inf")):
        raise InputError(name, f"mm_per_pixel must be a positive number or null, got {mm!r}")
    if scale.get("source") not in (None, "request", "setting", "metadata") or not isinstance(scale.get("detail"), str):
        raise InputError(name, "must hold source (request, setting, metadata or null) and detail")
    return scale


def result_inputs(get, max_pixels: int, max_detections: int) -> dict:
    """Everything the result step receives, checked for shape and agreement: `get(name)` reads an input."""
    image_hw = image_size("IMAGE_SIZE", get("IMAGE_SIZE"), max_pixels)
    boxes = finite("BOXES_IN", shaped("BOXES_IN", get("BOXES_IN").reshape(-1, 4), (None, 4)))
    scores = finite("SCORES_IN", get("SCORES_IN").reshape(-1))
    class_ids = get("CLASS_IDS_IN").reshape(-1)
    same_count({"BOXES_IN": len(boxes), "SCORES_IN": len(scores), "CLASS_IDS_IN": len(class_ids)})
    seg_index = indices("SEG_INDEX_IN", get("SEG_INDEX_IN"), len(boxes))
    mask_boxes = crop_boxes("MASK_BOXES", get("MASK_BOXES"), max_pixels, image_hw)
    mask_scores = finite("MASK_SCORES_IN", get("MASK_SCORES_IN").reshape(-1))
    geometry = finite("GEOMETRY_IN", shaped("GEOMETRY_IN", get("GEOMETRY_IN").reshape(-1, 5), (None, 5)))
    widths = finite("WIDTH_IN", shaped("WIDTH_IN", get("WIDTH_IN").reshape(-1, 3), (None, 3)))
    count = {"SEG_INDEX_IN": len(seg_index), "MASK_BOXES": len(mask_boxes), "MASK_SCORES_IN": len(mask_scores)}
    at_most("SEG_INDEX_IN", same_count(count | {"GEOMETRY_IN": len(geometry), "WIDTH_IN": len(widths)}), max_detections)
    width_codes(widths)
    masks = get("MASKS")
    packed_masks("MASKS", masks, mask_boxes)
    plan = tile_plan("TILING", get("TILING"), max_pixels)
    if plan.image_hw != image_hw:
        raise InputError("TILING", f"is for a {plan.image_hw} image, but IMAGE_SIZE says {image_hw}")
    return {
        "plan": plan,
        "sam_windows": crop_boxes("SAM_WINDOWS", get("SAM_WINDOWS"), max_pixels, image_hw),
        "image_hw": image_hw,
        "start_ns": int(get("START_NS").reshape(-1)[0]),
        "notes": [bytes(n).decode("utf-8", "replace") for n in get("NOTES").reshape(-1)],
        "segmenter": json_object("SEGMENTER", get("SEGMENTER")),
        "detector": json_object("DETECTOR", get("DETECTOR")),
        "scale": scale_object("SCALE", get("SCALE")),
        "mask_boxes": mask_boxes,
        "masks": masks,
        "widths": widths,
        "typed": {
            "BOXES": boxes.astype(np.float32),
            "SCORES": scores.astype(np.float32),
            "CLASS_IDS": class_ids.astype(np.int32),
            "SEG_INDEX": seg_index.astype(np.int32),
            "MASK_SCORES": mask_scores.astype(np.float32),
            "GEOMETRY": geometry.astype(np.float64),
        },
    }


def tile_plan(name: str, values: np.ndarray, max_pixels: int, max_windows: int = 4096):
    """How the preprocess step cut the frame (anomaly.tiling.TilePlan): a JSON object whose windows lie inside
    an image of at most `max_pixels`, the first of them the whole image."""
    from anomaly.tiling import TILING_MODES, TilePlan

    raw = json_object(name, values)
    try:
        plan = TilePlan.from_json(json.dumps(raw))
        height, width = (int(v) for v in plan.image_hw)
        windows = np.asarray(plan.windows, np.int64).reshape(-1, 4)
        ok = plan.mode in TILING_MODES and isinstance(plan.reason, str) and isinstance(plan.tile, int)
    except (KeyError, TypeError, ValueError):
        raise InputError(name, "must hold mode, image_hw, tile, overlap, windows and reason") from None
    if not ok or not 0 < height * width <= max_pixels or not 1 <= len(windows) <= max_windows:
        raise InputError(name, f"must describe 1 to {max_windows} windows of an image of at most {max_pixels} pixels")
    crop_boxes(name, windows, max_pixels, (height, width))
    if tuple(windows[0]) != (0, 0, width, height):
        raise InputError(name, "must start with the whole image")
    checked = tuple(tuple(w) for w in windows.tolist())
    return TilePlan(plan.mode, (height, width), plan.tile, plan.overlap, checked, plan.reason)


def window_detections(get, plan) -> tuple[np.ndarray, np.ndarray]:
    """The detector's raw outputs for one frame, `dets` (1, W*Q, 4) and `labels` (1, W*Q, slots), as (W, Q, 4)
    and (W, Q, slots): one row per window of `plan` (tile_plan), in its order."""
    boxes = finite("dets", shaped("dets", get("dets"), (1, None, 4)))
    logits = shaped("labels", get("labels"), (1, boxes.shape[1], None))
    windows = len(plan.windows)
    if boxes.shape[1] % windows:
        raise InputError("dets", f"holds {boxes.shape[1]} boxes, not a whole number for {windows} windows")
    return boxes[0].reshape(windows, -1, 4), logits[0].reshape(windows, -1, logits.shape[-1])
