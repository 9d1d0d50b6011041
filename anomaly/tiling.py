"""Tiled inference for photos much larger than the detector's input (drone and DSLR frames).

A tiled frame is detected in windows: the whole image (as without tiling: it keeps defects larger than a tile
whole) and overlapping tiles of the detector's resolution cut from the photo at its own scale, all run as one
batch. Each window's detections are selected as rfdetr does for a single image, moved to full-image pixels,
then merged (`merge_windows`): one box for a defect a tile edge cut in pieces, one for a defect seen by two
overlapping tiles. SAM then embeds full-resolution windows of at most SAM_WINDOW pixels around groups of the
boxes (`sam_windows`) instead of the whole photo shrunk to its input, so masks and geometry are measured at
the photo's own resolution.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from anomaly.detector import Detections, select_detections

TILING_MODES = ("auto", "off", "on")
# `auto` tiles a photo whose long side is more than this many detector inputs: a 1080p frame is shrunk 3.3x
# for RF-DETR-M (576 px) and is not tiled; a 4K frame (6.7x) or a 24 MP photo (10x) is.
AUTO_TILING_FACTOR = 4
SAM_WINDOW = 1024  # pixels of the photo a SAM window covers at most, the SAM2.1 and SAM3-class input size
SAM_WINDOW_MARGIN = 32  # photo pixels of context kept around a box inside its window, where the window allows
DUPLICATE_IOU = 0.5  # boxes of one class from two windows with at least this IoU are one defect


Window = tuple[int, int, int, int]  # x0, y0, x1, y1 in photo pixels


@dataclass(frozen=True)
class TilePlan:
    """How one frame is cut for the detector: `windows[0]` is always the whole image; the others are tiles."""

    mode: str  # what was asked: auto, off or on
    image_hw: tuple[int, int]
    tile: int  # tile side in photo pixels (the detector's resolution), 0 when not tiled
    overlap: int
    windows: tuple[Window, ...]
    reason: str

    @property
    def tiled(self) -> bool:
        return len(self.windows) > 1

    def to_json(self) -> bytes:
        return json.dumps({
            "mode": self.mode, "image_hw": list(self.image_hw), "tile": self.tile, "overlap": self.overlap,
            "windows": [list(w) for w in self.windows], "reason": self.reason,
        }).encode()  # fmt: skip

    @classmethod
    def from_json(cls, raw: bytes | str) -> TilePlan:
        d = json.loads(raw)
        return cls(
            d["mode"], tuple(d["image_hw"]), d["tile"], d["overlap"], tuple(tuple(w) for w in d["windows"]), d["reason"]
        )


def untiled(image_hw: tuple[int, int], mode: str = "off", reason: str = "tiling off") -> TilePlan:
    height, width = (int(v) for v in image_hw)
    return TilePlan(mode, (height, width), 0, 0, ((0, 0, width, height),), reason)


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one side: evenly spread, the first at 0 and the last at the far edge, neighbours
    overlapping by at least `overlap`."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def plan_tiles(image_hw: tuple[int, int], resolution: int, mode: str, overlap: int) -> TilePlan:
    """The windows the detector runs on for a frame of `image_hw` (height, width)."""
    height, width = (int(v) for v in image_hw)
    if mode == "off":
        return untiled(image_hw)
    long_side = max(height, width)
    if mode == "auto" and long_side <= AUTO_TILING_FACTOR * resolution:
        return untiled(
            image_hw, mode, f"auto: the long side ({long_side} px) is at most {AUTO_TILING_FACTOR}x the detector's "
            f"{resolution} px"
        )  # fmt: skip
    if height <= resolution and width <= resolution:
        return untiled(image_hw, mode, f"the image is no larger than one {resolution} px tile")
    overlap = min(overlap, resolution // 2)
    xs, ys = _starts(width, resolution, overlap), _starts(height, resolution, overlap)
    tiles = tuple((x, y, min(x + resolution, width), min(y + resolution, height)) for y in ys for x in xs)
    reason = f"{mode}: {len(xs)} x {len(ys)} tiles of {resolution} px at the photo's scale, and the whole image"
    return TilePlan(mode, (height, width), resolution, overlap, ((0, 0, width, height), *tiles), reason)


# --- the detector's windows back to one frame ----------------------------------------------------------------


def select_windows(
    boxes: np.ndarray, logits: np.ndarray, plan: TilePlan, threshold: float, num_select: int
) -> list[Detections]:
    """Raw outputs of the plan's windows (W, Q, 4) and (W, Q, slots) -> each window's detections (as rfdetr
    selects them for one image of the window's size) in full-image pixels."""
    out = []
    for (x0, y0, x1, y1), b, lg in zip(plan.windows, boxes, logits):
        det = select_detections(b, lg, (y1 - y0, x1 - x0), threshold, num_select)
        det.boxes += np.array([x0, y0, x0, y0], np.float32)
        out.append(det)
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes a (N, 4) and b (M, 4) -> (N, M)."""
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def _intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) bool: boxes a (N, 4) and b (M, 4) share some area."""
    return (
        (a[:, None, 0] < b[None, :, 2])
        & (b[None, :, 0] < a[:, None, 2])
        & (a[:, None, 1] < b[None, :, 3])
        & (b[None, :, 1] < a[:, None, 3])
    )


def _cut_sides(boxes: np.ndarray, window: Window, image_hw: tuple[int, int], tolerance: float) -> np.ndarray:
    """(N, 4) bool: which sides (x0, y0, x1, y1) of each box lie on an edge of its tile that is inside the
    photo, i.e. where the tile may have cut the defect."""
    height, width = image_hw
    x0, y0, x1, y1 = window
    inner = np.array([x0 > 0, y0 > 0, x1 < width, y1 < height])
    near = np.stack(
        [
            boxes[:, 0] <= x0 + tolerance,
            boxes[:, 1] <= y0 + tolerance,
            boxes[:, 2] >= x1 - tolerance,
            boxes[:, 3] >= y1 - tolerance,
        ],
        axis=1,
    )
    return near & inner[None, :]


def _continues(a: np.ndarray, cut_a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) bool: box b goes on past a side where a was cut, overlapping a, and shares at least half of the
    smaller extent across the cut: the rest of a's defect, seen from the next tile."""

    def shared(lo_a, hi_a, lo_b, hi_b):
        inter = np.minimum(hi_a[:, None], hi_b[None, :]) - np.maximum(lo_a[:, None], lo_b[None, :])
        smaller = np.minimum((hi_a - lo_a)[:, None], (hi_b - lo_b)[None, :])
        return inter >= 0.5 * np.maximum(smaller, 1e-9)

    across_y = shared(a[:, 1], a[:, 3], b[:, 1], b[:, 3])  # for cuts at a left or right edge
    across_x = shared(a[:, 0], a[:, 2], b[:, 0], b[:, 2])  # for cuts at a top or bottom edge
    left = cut_a[:, 0:1] & (b[None, :, 0] < a[:, None, 0]) & (b[None, :, 2] > a[:, None, 0]) & across_y
    top = cut_a[:, 1:2] & (b[None, :, 1] < a[:, None, 1]) & (b[None, :, 3] > a[:, None, 1]) & across_x
    right = cut_a[:, 2:3] & (b[None, :, 2] > a[:, None, 2]) & (b[None, :, 0] < a[:, None, 2]) & across_y
    bottom = cut_a[:, 3:4] & (b[None, :, 3] > a[:, None, 3]) & (b[None, :, 1] < a[:, None, 3]) & across_x
    return left | top | right | bottom


def _overlaps(a: Window, b: Window) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def linked_groups(n: int, first: np.ndarray, second: np.ndarray) -> tuple[int, np.ndarray]:
    """Items 0..n-1 linked pairwise (first[k] with second[k]) -> (number of groups, each item's group), groups
    numbered in the order of their lowest item. Plain numpy rather than scipy.sparse.csgraph: the lent GPU
    machine's scipy, built for numpy 2, refuses numpy 1.26's arrays there (Triton's stub needs numpy 1)."""
    root = np.arange(n)
    first, second = np.asarray(first, np.int64), np.asarray(second, np.int64)
    while True:
        while not np.array_equal(jumped := root[root], root):  # every item points at its tree's root
            root = jumped
        a, b = root[first], root[second]
        if np.array_equal(a, b):
            break
        # each link hangs both roots under the lower one: an item only ever points lower, so no cycles, and
        # a tree's root ends as its lowest item
        low = np.minimum(a, b)
        np.minimum.at(root, a, low)
        np.minimum.at(root, b, low)
    roots, group = np.unique(root, return_inverse=True)
    return len(roots), group.reshape(-1)


def _union_of_groups(boxes, scores, classes, first: np.ndarray, second: np.ndarray) -> Detections:
    """Boxes linked pairwise (first[k] with second[k]) -> one box per connected group: the box around its
    members, the best member's score."""
    count, group = linked_groups(len(boxes), first, second)
    lo = np.full((count, 2), np.inf, np.float32)
    hi = np.full((count, 2), -np.inf, np.float32)
    best = np.full(count, -np.inf, np.float32)
    np.minimum.at(lo, group, boxes[:, :2])
    np.maximum.at(hi, group, boxes[:, 2:])
    np.maximum.at(best, group, scores)
    kind = np.zeros(count, np.int32)
    kind[group] = classes  # links join boxes of one class only
    return Detections(np.concatenate([lo, hi], axis=1).reshape(-1, 4), best, kind)


def merge_windows(per_window: list[Detections], plan: TilePlan) -> Detections:
    """The plan's per-window detections (full-image pixels) -> the frame's detections, best score first.

    Tiles: boxes of one class from two overlapping tiles are one defect when their IoU is at least
    DUPLICATE_IOU, or when one was cut by its tile's edge and the other goes on across that edge; each group
    becomes the box around its members with the best member's score. The whole-image pass only adds what the
    tiles could not see: its box is dropped when it fits in a tile and touches a merged tile box of its class
    (the tiles saw that area at ten times the detail), or when a merged tile box of its class has IoU >=
    DUPLICATE_IOU with it; it is kept otherwise (a defect too large for any tile to recognise)."""
    if not plan.tiled:
        return per_window[0]
    tiles = plan.windows[1:]
    dets = per_window[1:]
    offsets = np.cumsum([0] + [len(d) for d in dets])
    boxes = np.concatenate([d.boxes for d in dets]).reshape(-1, 4)
    scores = np.concatenate([d.scores for d in dets])
    classes = np.concatenate([d.class_ids for d in dets])
    tolerance = max(2.0, 0.01 * plan.tile)
    cuts = [_cut_sides(d.boxes.reshape(-1, 4), w, plan.image_hw, tolerance) for d, w in zip(dets, tiles)]
    links = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    pairs = [(i, j) for i in range(len(tiles)) for j in range(i + 1, len(tiles))]
    for i, j in pairs:
        if not (len(dets[i]) and len(dets[j]) and _overlaps(tiles[i], tiles[j])):
            continue
        a, b = dets[i].boxes.reshape(-1, 4), dets[j].boxes.reshape(-1, 4)
        same = dets[i].class_ids[:, None] == dets[j].class_ids[None, :]
        linked = _iou(a, b) >= DUPLICATE_IOU
        linked |= _continues(a, cuts[i], b) | _continues(b, cuts[j], a).T
        p, q = np.nonzero(linked & same)
        links[0].append(offsets[i] + p)
        links[1].append(offsets[j] + q)
    merged = _union_of_groups(boxes, scores, classes, np.concatenate(links[0]), np.concatenate(links[1]))
    whole = per_window[0]
    if len(whole) and len(merged):
        iou = _iou(whole.boxes, merged.boxes)
        sides = np.maximum(whole.boxes[:, 2] - whole.boxes[:, 0], whole.boxes[:, 3] - whole.boxes[:, 1])
        touches = _intersect(whole.boxes, merged.boxes) & (sides <= plan.tile)[:, None]
        duplicate = ((iou >= DUPLICATE_IOU) | touches) & (whole.class_ids[:, None] == merged.class_ids[None, :])
        p, q = np.nonzero(duplicate)
        np.maximum.at(merged.scores, q, whole.scores[p])
        keep = ~duplicate.any(axis=1)
    else:
        keep = np.ones(len(whole), bool)
    boxes = np.concatenate([merged.boxes, whole.boxes[keep]]).reshape(-1, 4)
    scores = np.concatenate([merged.scores, whole.scores[keep]])
    classes = np.concatenate([merged.class_ids, whole.class_ids[keep]])
    order = np.argsort(-scores, kind="stable")
    return Detections(
        boxes[order].astype(np.float32), scores[order].astype(np.float32), classes[order].astype(np.int32)
    )


# --- SAM's windows ---------------------------------------------------------------------------------------------


def sam_windows(boxes: np.ndarray, image_hw: tuple[int, int], size: int = SAM_WINDOW) -> list[tuple[Window, list[int]]]:
    """Boxes (N, 4) in photo pixels -> [(window, indices of the boxes it holds)], every box in exactly one
    window. A window is `size` x `size` photo pixels (less where the photo is smaller), placed so the first
    box not yet held sits inside it with up to SAM_WINDOW_MARGIN of context, and it takes every other box
    that lies wholly inside it. A box larger than `size` gets a window of its own, its box plus the margin,
    which SAM sees shrunk to its input size."""
    height, width = image_hw
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    order = sorted(range(len(boxes)), key=lambda i: (float(boxes[i, 1]), float(boxes[i, 0])))
    todo = set(range(len(boxes)))
    out: list[tuple[Window, list[int]]] = []
    for i in order:
        if i not in todo:
            continue
        x0, y0, x1, y1 = boxes[i]
        window = (_place(x0, x1, width, size), _place(y0, y1, height, size))
        (wx0, wx1), (wy0, wy1) = window
        held = [j for j in order if j in todo and boxes[j, 0] >= wx0 and boxes[j, 1] >= wy0
                and boxes[j, 2] <= wx1 and boxes[j, 3] <= wy1]  # fmt: skip
        held = held or [i]  # a box larger than the window: the window was made around it alone
        todo -= set(held)
        out.append(((wx0, wy0, wx1, wy1), held))
    return out


def _place(lo: float, hi: float, length: int, size: int) -> tuple[int, int]:
    """A window's span along one side for a box from `lo` to `hi`: `size` long (the whole side if shorter),
    starting SAM_WINDOW_MARGIN before the box where it can, inside the photo; for a box longer than
    `size`, the box plus the margin."""
    lo_px, hi_px = int(math.floor(lo)), int(math.ceil(hi))
    if hi_px - lo_px > size:
        return max(0, lo_px - SAM_WINDOW_MARGIN), min(length, hi_px + SAM_WINDOW_MARGIN)
    if length <= size:
        return 0, length
    start = max(0, min(lo_px - min(SAM_WINDOW_MARGIN, (size - (hi_px - lo_px)) // 2), length - size))
    return start, start + size


def window_scale(window: Window, resolution: int) -> float:
    """SAM input pixels per photo pixel along the window's longer side (1.0: the photo's own resolution)."""
    x0, y0, x1, y1 = window
    return min(1.0, resolution / max(x1 - x0, y1 - y0))


def describe(plan: TilePlan, sam_windows: np.ndarray, sam_resolution: int) -> dict:
    """The response's `tiling` record: how the frame was cut for the detector and for SAM."""
    windows = [tuple(int(v) for v in w) for w in np.asarray(sam_windows).reshape(-1, 4)]
    return {
        "mode": plan.mode,
        "tiled": plan.tiled,
        "reason": plan.reason,
        "detector_tiles": len(plan.windows) - 1,
        "tile_size": plan.tile or None,
        "overlap": plan.overlap if plan.tiled else None,
        "sam_windows": len(windows),
        # SAM input pixels per photo pixel in its coarsest window: 1.0 is the photo's own resolution
        "sam_scale": round(min((window_scale(w, sam_resolution) for w in windows), default=1.0), 4),
    }
