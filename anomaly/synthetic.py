"""Synthetic inspection data whose truth is known: shapes of exact geometry, and whole photos of concrete with
cracks of known width, spalling, corrosion stains and structural elements, written as a COCO dataset with masks.

Nothing here can be downloaded where this project is developed, so its tests, its demo training (`make
train-demo`) and its accuracy numbers run on these. Shapes are rasterised without anti-aliasing for masks (a pixel
is inside when its centre lies within width/2 of the centre line: a thick stroke with round caps and joins), with
distances computed exactly per segment or arc, so the truth does not depend on a drawing library; the photos draw
the same strokes anti-aliased (coverage of 4 x 4 samples a pixel) into the pixels.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

# --- shapes of known geometry ------------------------------------------------------------------------------


def _grid(x_min: float, y_min: float, x_max: float, y_max: float, margin: int):
    x0, y0 = int(math.floor(x_min)) - margin, int(math.floor(y_min)) - margin
    x1, y1 = int(math.ceil(x_max)) + margin, int(math.ceil(y_max)) + margin
    yy, xx = np.mgrid[y0 : y1 + 1, x0 : x1 + 1].astype(np.float64)
    return xx, yy


def _distance_to_lines(lines: list[np.ndarray], xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    best = np.full(xx.shape, np.inf)
    for line in lines:
        for (x0, y0), (x1, y1) in zip(line[:-1], line[1:]):
            dx, dy = x1 - x0, y1 - y0
            seg2 = dx * dx + dy * dy
            t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / seg2, 0.0, 1.0) if seg2 else 0.0
            best = np.minimum(best, np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy)))
    return best


def thick_segments(lines: list[np.ndarray], width: float, margin: int = 4) -> np.ndarray:
    """Polylines (each (K, 2) of x, y in image coordinates) drawn `width` wide -> bool mask of their box."""
    pts = np.concatenate(lines)
    r = width / 2.0
    xx, yy = _grid(pts[:, 0].min() - r, pts[:, 1].min() - r, pts[:, 0].max() + r, pts[:, 1].max() + r, margin)
    return _distance_to_lines(lines, xx, yy) <= r


def thick_arc(radius: float, start_deg: float, sweep_deg: float, width: float, margin: int = 4) -> np.ndarray:
    """A circular arc (centre at the origin, angles in image coordinates) drawn `width` wide -> bool mask."""
    r = width / 2.0
    a0 = math.radians(start_deg)
    sweep = math.radians(sweep_deg)
    t = a0 + np.linspace(0.0, sweep, 721)
    xs, ys = radius * np.cos(t), radius * np.sin(t)
    xx, yy = _grid(xs.min() - r, ys.min() - r, xs.max() + r, ys.max() + r, margin)
    rho = np.hypot(xx, yy)
    phi = np.mod(np.arctan2(yy, xx) - a0, 2 * math.pi)
    on_span = phi <= sweep
    end_a = (radius * math.cos(a0), radius * math.sin(a0))
    end_b = (radius * math.cos(a0 + sweep), radius * math.sin(a0 + sweep))
    to_ends = np.minimum(np.hypot(xx - end_a[0], yy - end_a[1]), np.hypot(xx - end_b[0], yy - end_b[1]))
    distance = np.where(on_span, np.abs(rho - radius), to_ends)
    return distance <= r


def segment(length: float, angle_deg: float) -> np.ndarray:
    """A segment centred on the origin; angle counter-clockwise from +x with y up (y negated in the image)."""
    a = math.radians(angle_deg)
    d = np.array([math.cos(a), -math.sin(a)]) * length / 2.0
    return np.stack([-d, d])


def branches(lengths, angles_deg) -> list[np.ndarray]:
    """Arms leaving one point (a Y- or X-shaped crack): its total length is the sum of the arms."""
    return [
        np.array([[0.0, 0.0], [length * math.cos(math.radians(a)), -length * math.sin(math.radians(a))]])
        for length, a in zip(lengths, angles_deg)
    ]


def polyline_length(line: np.ndarray, shape: tuple[int, int] | None = None) -> float:
    """A polyline's length; with `shape` (height, width), only what lies inside that frame."""
    if shape is None:
        return float(np.hypot(*np.diff(line, axis=0).T).sum())
    h, w = shape
    total = 0.0
    for a, b in zip(line[:-1], line[1:]):
        steps = max(1, int(np.ceil(np.hypot(*(b - a)) * 4)))  # quarter-pixel pieces
        t = (np.arange(steps) + 0.5) / steps
        mid = a + t[:, None] * (b - a)
        inside = (mid[:, 0] >= 0) & (mid[:, 0] < w) & (mid[:, 1] >= 0) & (mid[:, 1] < h)
        total += float(np.hypot(*(b - a))) * inside.mean()
    return total


# --- inspection photos ---------------------------------------------------------------------------------------

DEFECTS = ("crack", "spalling", "corrosion")
STRUCTURES = ("beam", "column")
CLASSES = DEFECTS + STRUCTURES  # COCO category ids 1.. in this order


@dataclass
class Instance:
    """One object drawn into a photo: its class, its full-frame mask, and what is known of it (a crack's
    width and centre-line length in pixels)."""

    name: str
    mask: np.ndarray
    truth: dict = field(default_factory=dict)


@dataclass
class Scene:
    rgb: np.ndarray  # (H, W, 3) uint8
    instances: list[Instance]
    mm_per_pixel: float


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Smooth noise of unit spread at the scale `sigma` pixels."""
    field_ = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma) if sigma else None
    field_ = rng.standard_normal(shape).astype(np.float32) if field_ is None else field_
    return field_ / (field_.std() + 1e-6)


def concrete(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A concrete-like surface, float32 (H, W, 3) in 0..255: a grey tone, blotches at several scales, grain,
    aggregate specks and pores."""
    h, w = shape
    base = rng.uniform(115, 175)
    grey = base + 9 * _noise(rng, shape, 40) + 6 * _noise(rng, shape, 10) + 4 * _noise(rng, shape, 2.5)
    grey += 5 * _noise(rng, shape, 0)
    specks = rng.random(shape) < 0.004
    grey[cv2.dilate(specks.astype(np.uint8), np.ones((2, 2), np.uint8)) > 0] -= rng.uniform(15, 40)
    tint = np.array([1.0, 1.0, 1.0]) + rng.uniform(-0.04, 0.04, 3)
    return grey[..., None] * tint[None, None, :].astype(np.float32)


def _blob(rng: np.random.Generator, centre: tuple[float, float], radius: float, shape, roughness: float = 0.35):
    """An irregular closed shape around `centre`, mask of the frame."""
    n = 24
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radii = radius * np.exp(roughness * np.convolve(np.r_[rng.standard_normal(n), rng.standard_normal(3)],
                                                     np.ones(4) / 4, "valid")[:n])  # fmt: skip
    pts = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], axis=1)
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def crack_line(rng: np.random.Generator, start: np.ndarray, length: float) -> np.ndarray:
    """A crack's centre line from `start`: `length` px in straight pieces of about 25 px, gently turning."""
    steps = max(4, int(length / 25))
    heading = rng.uniform(0, 2 * math.pi)
    pts = [start]
    for _ in range(steps):
        heading += rng.normal(0, 0.3)
        pts.append(pts[-1] + length / steps * np.array([math.cos(heading), math.sin(heading)]))
    return np.array(pts)


def draw_crack(rng: np.random.Generator, image: np.ndarray, line: np.ndarray, width: float, samples: int = 4,
               core: float | None = None, min_mask_width: float = 0.0) -> Instance:  # fmt: skip
    """A crack along `line` (x, y points) `width` pixels wide: darkened by its anti-aliased coverage in the photo
    (`samples` x `samples` a pixel), its mask the pixels whose centres lie within width / 2 of the line (at least
    `min_mask_width` / 2: a segmenter's mask of a hairline is a connected band, never a broken line of single
    pixels). The crack is 55-100 grey levels darker than the surface, or, with `core`, its core is that fraction of
    the surface's brightness (a gap in shadow)."""
    h, w = image.shape[:2]
    r = max(width, min_mask_width) / 2.0
    x0, y0 = (int(max(0, math.floor(v - r - 2))) for v in line.min(axis=0))
    x1 = int(min(w, math.ceil(line[:, 0].max() + r + 2)))
    y1 = int(min(h, math.ceil(line[:, 1].max() + r + 2)))
    mask = np.zeros((h, w), bool)
    if x1 <= x0 or y1 <= y0:
        return Instance("crack", mask)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    mask[y0:y1, x0:x1] = _distance_to_lines([line], xx, yy) <= r
    r = width / 2.0
    offsets = (np.arange(samples) + 0.5) / samples - 0.5
    coverage = np.zeros(xx.shape)
    for dy in offsets:
        for dx in offsets:
            coverage += _distance_to_lines([line], xx + dx, yy + dy) <= r
    coverage /= samples * samples
    if core is None:
        image[y0:y1, x0:x1] -= (rng.uniform(55, 100) * coverage)[..., None]
    else:
        image[y0:y1, x0:x1] *= (1.0 - (1.0 - core) * coverage)[..., None]
    truth = {"width_px": round(width, 3), "length_px": round(polyline_length(line, (h, w)), 2)}
    return Instance("crack", mask, truth)


def draw_spalling(rng: np.random.Generator, image: np.ndarray, centre, radius: float) -> Instance:
    """Concrete broken out: a rough, darker, shadowed patch."""
    shape = image.shape[:2]
    mask = _blob(rng, centre, radius, shape)
    inside = mask.astype(np.float32)
    rough = 14 * _noise(rng, shape, 1.5) + 10 * _noise(rng, shape, 5)
    shade = -rng.uniform(25, 45) + rough
    lip = np.clip(cv2.GaussianBlur(inside, (0, 0), 2.0) - inside, 0, 1)  # a light edge just outside the break
    image += (inside * shade + 18 * lip)[..., None]
    return Instance("spalling", mask)


def draw_corrosion(rng: np.random.Generator, image: np.ndarray, centre, radius: float) -> Instance:
    """A rust stain: a soft orange-brown blotch with drips running down."""
    h, w = image.shape[:2]
    core = _blob(rng, centre, radius, (h, w), roughness=0.25).astype(np.uint8)
    for _ in range(int(rng.integers(1, 4))):  # streaks below the stain
        x = int(centre[0] + rng.uniform(-0.6, 0.6) * radius)
        y_top, y_end = int(centre[1]), int(min(h - 1, centre[1] + radius * rng.uniform(1.5, 3.0)))
        cv2.line(core, (x, y_top), (x + int(rng.integers(-6, 7)), y_end), 1, int(rng.integers(3, 8)))
    alpha = cv2.GaussianBlur(core.astype(np.float32), (0, 0), max(1.5, radius / 10))
    alpha *= rng.uniform(0.6, 0.9) * (0.85 + 0.15 * _noise(rng, (h, w), 3))
    rust = np.array([155, 85, 45], np.float32) * rng.uniform(0.8, 1.1)
    image[:] = image * (1 - alpha[..., None]) + rust[None, None, :] * alpha[..., None]
    return Instance("corrosion", alpha > 0.35)


def draw_structure(rng: np.random.Generator, image: np.ndarray, kind: str) -> Instance:
    """A beam (a horizontal band) or a column (a vertical band): its own tone and a shadowed edge."""
    h, w = image.shape[:2]
    mask = np.zeros((h, w), bool)
    if kind == "beam":
        depth = int(h * rng.uniform(0.28, 0.45))
        top = 0 if rng.random() < 0.5 else h - depth
        mask[top : top + depth] = True
        edge = (slice(top + depth - 3, top + depth), slice(None)) if top == 0 else (slice(top, top + 3), slice(None))
    else:
        width = int(w * rng.uniform(0.2, 0.35))
        left = int(rng.uniform(0, w - width))
        mask[:, left : left + width] = True
        edge = (slice(None), slice(left + width - 3, left + width))
    image[mask] += rng.uniform(-22, 22)
    image[edge] -= rng.uniform(30, 50)
    return Instance(kind, mask)


def one_crack(rng: np.random.Generator, shape: tuple[int, int] = (256, 256)) -> Scene:
    """The simplest photo a detector can learn: one crack 4 px wide across the middle of a concrete surface."""
    image = concrete(rng, shape)
    h, w = shape
    crack = draw_crack(rng, image, crack_line(rng, np.array([w / 2, h / 2]), 0.45 * min(h, w)), 4.0)
    return Scene(np.clip(image, 0, 255).astype(np.uint8), [crack], 0.5)


def width_scene(rng: np.random.Generator, width: float, curved: bool, shape: tuple[int, int] = (160, 160),
                blur: float | None = None, contrast: float = 1.0) -> Scene:  # fmt: skip
    """One crack of exactly `width` pixels (straight, or an arc), anti-aliased at 8 x 8 samples a pixel, its core
    15-45% of the surface's brightness (times `contrast` of that darkening), on concrete, blurred (Gaussian sigma
    0-0.8 px unless `blur` says) with sensor noise. Its mask is what a segmenter gives of a hairline: the pixels
    whose centres lie within max(width / 2, 0.8) of the centre line, never a broken line of single pixels."""
    h, w = shape
    image = concrete(rng, shape)
    angle = rng.uniform(0, math.pi)
    if curved:
        radius, sweep = rng.uniform(0.6, 1.2) * min(h, w), 0.65 * min(h, w)
        t = np.linspace(-0.5, 0.5, 64) * sweep / radius + angle
        centre = np.array([w / 2, h / 2]) - radius * np.array([math.cos(angle), math.sin(angle)])
        line = centre + radius * np.stack([np.cos(t), np.sin(t)], axis=1)
    else:
        half = 0.35 * min(h, w) * np.array([math.cos(angle), math.sin(angle)])
        line = np.array([[w / 2, h / 2] - half, [w / 2, h / 2] + half])
    core = 1.0 - contrast * (1.0 - rng.uniform(0.15, 0.45))
    crack = draw_crack(rng, image, line, width, samples=8, core=core, min_mask_width=1.6)
    sigma = rng.uniform(0.0, 0.8) if blur is None else blur
    if sigma > 0.05:
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    image += rng.normal(0, rng.uniform(1.5, 4.0), image.shape).astype(np.float32)
    return Scene(np.clip(image, 0, 255).astype(np.uint8), [crack], 0.3)


def inspection_scene(rng: np.random.Generator, shape: tuple[int, int] = (384, 512)) -> Scene:
    """One photo of a concrete element: 0-2 structural elements, 1-3 defects (cracks 1.5-6 px wide, spalling,
    corrosion), lighting across the frame, a little blur and sensor noise."""
    h, w = shape
    image = concrete(rng, shape)
    instances = [draw_structure(rng, image, kind) for kind in STRUCTURES if rng.random() < 0.45]
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.choice(DEFECTS, p=[0.5, 0.25, 0.25])
        centre = (rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h)
        if kind == "crack":
            line = crack_line(rng, np.array(centre), rng.uniform(0.25, 0.6) * min(h, w))
            found = draw_crack(rng, image, line, rng.uniform(1.5, 6.0))
        elif kind == "spalling":
            found = draw_spalling(rng, image, centre, rng.uniform(0.05, 0.14) * min(h, w))
        else:
            found = draw_corrosion(rng, image, centre, rng.uniform(0.04, 0.1) * min(h, w))
        if found.mask.sum() >= 20:  # a shape that fell off the frame is not an object
            instances.append(found)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    light = 1.0 + rng.uniform(0.05, 0.2) * ((xx / w - 0.5) * math.cos(angle) + (yy / h - 0.5) * math.sin(angle))
    image *= light[..., None]
    blur = rng.uniform(0.0, 1.0)
    if blur > 0.3:
        image = cv2.GaussianBlur(image, (0, 0), blur)
    image += rng.normal(0, rng.uniform(1.5, 4.0), image.shape).astype(np.float32)
    return Scene(np.clip(image, 0, 255).astype(np.uint8), instances, round(float(rng.uniform(0.2, 0.6)), 3))


@dataclass
class FlightFrame:
    """One frame of a generated flight: BGR pixels and the defects in view, (defect id, type, box xyxy)."""

    bgr: np.ndarray
    truth: list[tuple[int, str, tuple[float, float, float, float]]]


def flight(rng: np.random.Generator, frames: int = 24, shape: tuple[int, int] = (240, 320), defects: int = 5,
           occluded: tuple[int, int, int] | None = (1, 5, 3)) -> list[FlightFrame]:  # fmt: skip
    """A camera flying along a long concrete wall: it pans from one end to the other while zooming in and out, so
    defects enter and leave the view; `occluded` = (defect id, first frame, frames): a pole in front of that
    defect for a few frames. Every defect's box in every frame it is visible in (at least a third of it in view)."""
    wall_h, wall_w = 720, 1800
    wall = concrete(rng, (wall_h, wall_w))
    found: list[Instance] = []
    for k in range(defects):
        centre = (wall_w * (k + 0.5) / defects + rng.uniform(-60, 60), rng.uniform(260, 460))
        kind = ("crack", "spalling", "crack", "corrosion", "crack")[k % 5]
        if kind == "crack":
            found.append(draw_crack(rng, wall, crack_line(rng, np.array(centre), rng.uniform(90, 160)), 5.0))
        elif kind == "spalling":
            found.append(draw_spalling(rng, wall, centre, rng.uniform(35, 55)))
        else:
            found.append(draw_corrosion(rng, wall, centre, rng.uniform(30, 45)))
    boxes = []
    for instance in found:
        ys, xs = np.nonzero(instance.mask)
        boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    wall8 = np.clip(wall, 0, 255).astype(np.uint8)[..., ::-1]  # BGR, as a video's frames
    h, w = shape
    out = []
    for t in range(frames):
        zoom = 1.0 + 0.3 * math.sin(math.pi * t / max(frames - 1, 1))
        view_w, view_h = 2 * w / zoom, 2 * h / zoom
        cx = 0.5 * view_w + (wall_w - view_w) * t / max(frames - 1, 1)
        cy = wall_h / 2 + 20 * math.sin(t / 3)
        x0, y0 = cx - view_w / 2, cy - view_h / 2
        affine = np.array([[w / view_w, 0, -x0 * w / view_w], [0, h / view_h, -y0 * h / view_h]], np.float32)
        bgr = cv2.warpAffine(wall8, affine, (w, h), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)
        truth = []
        for k, (bx0, by0, bx1, by1) in enumerate(boxes):
            fx0, fy0 = (bx0 - x0) * w / view_w, (by0 - y0) * h / view_h
            fx1, fy1 = (bx1 - x0) * w / view_w, (by1 - y0) * h / view_h
            cx0, cy0, cx1, cy1 = max(fx0, 0), max(fy0, 0), min(fx1, w), min(fy1, h)
            if cx1 - cx0 < 4 or cy1 - cy0 < 4 or (cx1 - cx0) * (cy1 - cy0) < (fx1 - fx0) * (fy1 - fy0) / 3:
                continue
            if occluded and k == occluded[0] and occluded[1] <= t < occluded[1] + occluded[2]:
                cv2.rectangle(bgr, (int(cx0) - 6, 0), (int(cx1) + 6, h), (60, 60, 70), -1)  # the pole
                continue
            truth.append((k, found[k].name, (cx0, cy0, cx1, cy1)))
        out.append(FlightFrame(bgr, truth))
    return out


@dataclass
class Inspection:
    """One photo of a re-inspected position: pixels, and its defects by defect id (the same id in both visits)."""

    rgb: np.ndarray
    defects: dict[int, Instance]


def extend_line(line: np.ndarray, length: float) -> np.ndarray:
    """A crack's centre line grown by `length` px at its end, straight on."""
    direction = line[-1] - line[-2]
    direction = direction / (np.linalg.norm(direction) + 1e-9)
    steps = max(1, int(length / 20))
    return np.vstack([line, line[-1] + np.outer(np.arange(1, steps + 1) * length / steps, direction)])


def reinspection(rng: np.random.Generator, shape: tuple[int, int] = (480, 640), shift=(7.0, -5.0),
                 rotate_deg: float = 2.0, growth_px: float = 40.0) -> tuple[Inspection, Inspection, dict]:  # fmt: skip
    """The same wall photographed twice, the second visit shifted and turned by a few pixels and degrees: crack 0
    grew by `growth_px`, crack 1 and spalling 2 did not change, crack 3 was repaired (gone), crack 4 is new.
    -> (before, after, truth: defect id -> status)."""
    h, w = shape
    wall = concrete(rng, shape)
    before, after = wall.copy(), wall.copy()
    seeds = rng.integers(0, 2**31, 5)
    starts = [(0.2, 0.3), (0.65, 0.25), (0.5, 0.7), (0.2, 0.75), (0.8, 0.65)]
    defects_b, defects_a = {}, {}
    for k, (fx, fy) in enumerate(starts):
        centre = np.array([fx * w, fy * h])
        line = crack_line(np.random.default_rng(seeds[k]), centre, 110.0)
        for image, found, grown in ((before, defects_b, 0.0), (after, defects_a, growth_px if k == 0 else 0.0)):
            if (k == 3 and found is defects_a) or (k == 4 and found is defects_b):
                continue  # repaired before the second visit / not there at the first
            drawn = np.random.default_rng(seeds[k] + 1)  # the same crack drawn the same way on both visits
            if k == 2:
                found[k] = draw_spalling(drawn, image, tuple(centre), 40.0)
            else:
                found[k] = draw_crack(drawn, image, extend_line(line, grown) if grown else line, 4.0)
    turn = cv2.getRotationMatrix2D((w / 2, h / 2), rotate_deg, 1.0)
    turn[:, 2] += shift
    after = cv2.warpAffine(after, turn, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    for instance in defects_a.values():
        instance.mask = cv2.warpAffine(instance.mask.astype(np.uint8), turn, (w, h), flags=cv2.INTER_NEAREST) > 0
    truth = {0: "grown", 1: "unchanged", 2: "unchanged", 3: "gone", 4: "new"}
    as_rgb = lambda img: np.clip(img, 0, 255).astype(np.uint8)  # noqa: E731
    return Inspection(as_rgb(before), defects_b), Inspection(as_rgb(after), defects_a), truth


def coco_annotation(instance: Instance, annotation_id: int, image_id: int, classes: tuple[str, ...] = CLASSES) -> dict:
    """One instance as a COCO annotation: its box (x, y, w, h in pixel edges), mask area and RLE (pycocotools'
    compressed counts), and what is known of it under `attributes`."""
    from pycocotools import mask as coco_mask

    ys, xs = np.nonzero(instance.mask)
    rle = coco_mask.encode(np.asfortranarray(instance.mask.astype(np.uint8)))
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": classes.index(instance.name) + 1,
        "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
        "area": int(instance.mask.sum()),
        "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
        "iscrowd": 0,
        "attributes": dict(instance.truth),
    }


def write_dataset(out: Path, splits: dict[str, int], seed: int = 0, shape: tuple[int, int] = (384, 512)) -> Path:
    """A COCO dataset in rfdetr's layout (`<split>/_annotations.coco.json` beside its JPEGs) of inspection_scene
    photos: the same seed, the same files. Each image records its `mm_per_pixel`. -> `out`."""
    scenes = {}
    for k, (split, count) in enumerate(splits.items()):
        rng = np.random.default_rng([seed, k])
        scenes[split] = [inspection_scene(rng, shape) for _ in range(count)]
    return write_scenes(out, scenes, seed)


def write_scenes(out: Path, scenes: dict[str, list[Scene]], seed: int | None = None,
                 classes: tuple[str, ...] = CLASSES) -> Path:  # fmt: skip
    """Scenes written as a COCO dataset in rfdetr's layout, category ids 1.. in the order of `classes`."""
    categories = [
        {"id": i + 1, "name": name, "supercategory": "defect" if name in DEFECTS else "structure"}
        for i, name in enumerate(classes)
    ]
    for split, photos in scenes.items():
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for image_id, scene in enumerate(photos, start=1):
            name = f"{split}_{image_id:04d}.jpg"
            cv2.imwrite(str(folder / name), scene.rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
            h, w = scene.rgb.shape[:2]
            images.append({"id": image_id, "file_name": name, "width": w, "height": h,
                           "mm_per_pixel": scene.mm_per_pixel})  # fmt: skip
            for instance in scene.instances:
                annotations.append(coco_annotation(instance, len(annotations) + 1, image_id, classes))
        made = f"anomaly.synthetic, seed {seed}" if seed is not None else "anomaly.synthetic"
        coco = {"info": {"description": f"synthetic inspection photos ({made})"}, "images": images,
                "annotations": annotations, "categories": categories}  # fmt: skip
        (folder / "_annotations.coco.json").write_text(json.dumps(coco) + "\n")
    return out
