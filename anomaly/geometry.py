"""Measurements of one binary mask, as an inspector with a crack gauge would take them.

Definitions (docs/geometry.md):
- area_pixels: mask pixels.
- length_pixels: length of the medial axis (skeleton) after pruning spurs shorter than the local width,
  branches included (a branching crack's length is its total length). Counting skeleton steps as 1 and
  sqrt(2) overstates slanted lines by up to 8%; each pixel instead counts by the local direction of the
  skeleton (see _tangent_length), which is exact for straight digital lines at any angle.
- width_pixels: mean width = area / length.
- max_width_pixels: twice the largest distance-transform value on the skeleton, minus one pixel
  (the distance is measured between pixel centres, the width between pixel edges). The distance is
  OpenCV's 5x5 chamfer approximation of the Euclidean one (within about 2%, a third of a pixel at 30 px),
  twice as fast as the exact transform on the hot path.
- orientation_degrees: principal axis of the mask's second moments, counter-clockwise from +x with y up
  (as seen on screen), in [0, 180).
Compact shapes (spalling, stains): when the pruned skeleton is shorter than twice the shape's maximum
width, no medial axis describes it; length is then its extent along the principal axis, so width =
area / length is its mean width across that axis (a disc of diameter D: length D, width pi D / 4).
Ends: the skeleton of a stroke stops about half a width before each end, where a crack's round tip or
the frame cuts it, so a crack running off the image is measured to about half a width short of the edge.
All of this runs on the box crop, never on the full frame.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from skimage.morphology import skeletonize

GEOMETRY_FIELDS = ("area_pixels", "length_pixels", "width_pixels", "orientation_degrees", "max_width_pixels")

# 8-neighbourhood bit order: NW N NE E SE S SW W
_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def _build_link_tables():
    """For each 8-neighbourhood code: the links a skeleton pixel has. A diagonal neighbour is no link when
    an orthogonal neighbour they share already joins the two (a staircase corner, not a step)."""
    counts = np.zeros(256, np.int64)
    links: list[tuple[tuple[int, int], ...]] = []
    for code in range(256):
        bits = [(code >> i) & 1 for i in range(8)]
        mine = []
        for i, (dy, dx) in enumerate(_OFFSETS):
            if not bits[i]:
                continue
            if dy and dx and (bits[_OFFSETS.index((dy, 0))] or bits[_OFFSETS.index((0, dx))]):
                continue
            mine.append((dy, dx))
        counts[code] = len(mine)
        links.append(tuple(mine))
    return counts, links


_LINK_COUNT, _LINKS = _build_link_tables()
_OFFSET_ROWS_COLS = np.array(_OFFSETS)


def _pixel_codes(flat: np.ndarray, idx: np.ndarray, width: int) -> np.ndarray:
    """Neighbourhood code (bit i set when neighbour _OFFSETS[i] is set) of the pixels at flat indices `idx`
    of a raveled 0/1 uint8 image `width` columns wide; no pixel of `idx` may lie on the image's edge.
    Only the pixels asked for are looked at: a skeleton has a few hundred, its crop a hundred thousand."""
    neighbours = flat[idx[:, None] + (_OFFSET_ROWS_COLS @ (width, 1))[None, :]]
    return np.packbits(neighbours, axis=1, bitorder="little")[:, 0]


_K = 3  # the local direction of a skeleton pixel is fitted over its 7x7 neighbourhood
_WINDOW = np.array([(dy, dx) for dy in range(-_K, _K + 1) for dx in range(-_K, _K + 1)])
# Per window offset: 1, dy, dx, dy*dy, dx*dx, dx*dy. One product with the occupancy gives every sum the
# direction fit needs; the sums are small integers, exact in float32.
_WINDOW_MOMENTS = np.stack(
    [np.ones(len(_WINDOW)), _WINDOW[:, 0], _WINDOW[:, 1], _WINDOW[:, 0] ** 2, _WINDOW[:, 1] ** 2, _WINDOW.prod(1)],
    axis=1,
).astype(np.float32)


def _tangent_length(ys: np.ndarray, xs: np.ndarray, link_counts: np.ndarray, shape: tuple[int, int]) -> float:
    """Length of a one-pixel-wide skeleton, every branch included.

    A digital line at angle t has max(|cos t|, |sin t|) pixels per unit of length, so each pixel counts
    1 / max(|cos t|, |sin t|), with t the principal direction of the skeleton pixels in its 7x7
    neighbourhood. Exact for digital straight lines at any angle (where counting steps as 1 and sqrt 2
    overstates by up to 8%), and the fit smooths the staircase that thinning leaves on thick strokes.
    End pixels count half: a chain of n + 1 pixels spans n steps."""
    if len(ys) == 0:
        return 0.0
    theta = _directions(ys, xs, shape)
    weight = 1.0 / np.maximum(np.abs(np.cos(theta)), np.abs(np.sin(theta)))
    weight[link_counts == 1] *= 0.5
    weight[link_counts == 0] = 0.0  # a lone pixel has no length
    return float(weight.sum())


def _directions(ys: np.ndarray, xs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The principal direction (radians from +x towards +y, image axes) of the skeleton pixels in each pixel's
    7x7 neighbourhood."""
    width = shape[1] + 2 * _K
    occupied = np.zeros((shape[0] + 2 * _K) * width, np.uint8)  # bytes: a quarter of the memory to gather from
    centres = (ys + _K) * width + (xs + _K)
    occupied[centres] = 1
    near = occupied[centres[:, None] + (_WINDOW[:, 0] * width + _WINDOW[:, 1])[None, :]]
    n, sy, sx, syy, sxx, sxy = (near.astype(np.float32) @ _WINDOW_MOMENTS).astype(np.float64).T
    my, mx = sy / n, sx / n
    cyy = syy / n - my * my
    cxx = sxx / n - mx * mx
    cxy = sxy / n - mx * my
    return 0.5 * np.arctan2(2.0 * cxy, cxx - cyy)


def _skeleton_pixels(skeleton: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat indices, ys, xs) of the set pixels, row by row (flatnonzero is several times faster than nonzero)."""
    idx = np.flatnonzero(skeleton)
    ys, xs = np.divmod(idx, skeleton.shape[1])
    return idx, ys, xs


def prune_spurs(
    skeleton: np.ndarray,
    distance: np.ndarray,
    passes: int = 3,
    limit: float | None = None,
    pixels: np.ndarray | None = None,
):
    """Remove branches that run from an end point to a junction and are shorter than the local width there
    (twice the distance transform at the junction): the whiskers thinning grows on thick or ragged shapes.
    `skeleton` (bool) must have an empty one-pixel frame. `limit`: how far a walk from an end point goes (by
    default just past the skeleton's widest point; any longer limit cuts the same spurs). `pixels`: the flat
    indices of the skeleton's pixels, row by row, when the caller has them. Returns the pruned skeleton, and
    the neighbourhood codes, ys and xs of its pixels, row by row."""
    width = skeleton.shape[1]
    flat = skeleton.view(np.uint8).reshape(-1)  # a view: cutting a spur below edits `skeleton`
    dist = distance.ravel()
    if pixels is None:
        idx, ys, xs = _skeleton_pixels(skeleton)
    else:
        idx, (ys, xs) = pixels, np.divmod(pixels, width)
    codes = _pixel_codes(flat, idx, width)
    if limit is None:
        # Walks stop past the skeleton's widest point (found on its pixels: a tenth of the time of the whole
        # crop's maximum): a walk that long could not be cut at any junction anyway, so the result is the same.
        limit = 2.0 * float(dist[idx].max(initial=0.0)) + 2.0
    code_at = np.zeros(flat.size, np.uint8)  # an image of codes: 10x faster to build than a dict of them
    for _ in range(passes):
        # Codes stay as they were at the start of the pass while spurs are cut (each walk reads the same
        # skeleton); they are recomputed between passes.
        code_at[idx] = codes
        removed = False
        for start in idx[_LINK_COUNT[codes] == 1].tolist():
            path = [start]
            prev, cur, length = -1, start, 0.0
            while True:
                steps = [cur + dy * width + dx for dy, dx in _LINKS[code_at[cur]]]
                steps = [s for s in steps if s != prev]
                if len(steps) != 1:
                    break  # the chain ended
                nxt = steps[0]
                diagonal = (nxt - cur) not in (1, -1, width, -width)
                length += math.sqrt(2.0) if diagonal else 1.0
                prev, cur = cur, nxt
                if _LINK_COUNT[code_at[cur]] != 2 or length > limit:
                    break
                path.append(cur)
            if _LINK_COUNT[code_at[cur]] >= 3 and length < 2.0 * dist[cur]:
                flat[path] = 0
                removed = True
        if not removed:
            break
        code_at[idx] = 0  # cut pixels must read as empty
        idx, ys, xs = _skeleton_pixels(skeleton)
        codes = _pixel_codes(flat, idx, width)
    return skeleton, codes, (ys, xs)


def _principal_axis_degrees(ys: np.ndarray, xs: np.ndarray) -> float:
    """The principal axis of the pixels at (ys, xs), counter-clockwise from +x with y up, in [0, 180). The second
    moments are the ones cv2.moments gives for the mask (exact integer sums, centred the same way), from the
    coordinates: a fifth of the time on a crack's box, where nearly every pixel is background."""
    m00 = float(len(xs))
    if m00 == 0:
        return 0.0
    m10, m01 = float(xs.sum()), float(ys.sum())
    m20, m02, m11 = float(xs @ xs), float(ys @ ys), float(xs @ ys)
    cx, cy = m10 * (1.0 / m00), m01 * (1.0 / m00)
    mu20, mu02, mu11 = m20 - m10 * cx, m02 - m01 * cy, m11 - m10 * cy
    if mu20 == 0 and mu02 == 0 and mu11 == 0:
        return 0.0
    # In image coordinates (y down) the axis angle is clockwise as seen; flipping y negates it.
    theta = -0.5 * math.degrees(math.atan2(2.0 * mu11, mu20 - mu02))
    theta = theta % 180.0
    return 0.0 if theta >= 180.0 - 1e-9 else theta


def _extent_along(ys: np.ndarray, xs: np.ndarray, angle_deg: float) -> float:
    """Extent of the pixels at (ys, xs) along the axis at angle_deg (y up), pixel edges included."""
    a = math.radians(angle_deg)
    proj = xs * math.cos(a) - ys * math.sin(a)
    return float(proj.max() - proj.min() + 1.0)


_BAND_ROWS, _BAND_MARGIN = 128, 8  # the distance transform of a thin mask's box, band by band (below)


def _distance_on_mask(padded: np.ndarray, inside_ys: np.ndarray, inside_xs: np.ndarray) -> np.ndarray:
    """cv2.distanceTransform(padded, DIST_L2, DIST_MASK_5) on the mask's pixels (elsewhere undefined). On a thin
    crack's box, mostly background, it runs band by band of rows, each band's box trimmed to the columns of the
    mask's pixels (`inside_ys`, `inside_xs`, row by row) plus a margin. The same floats: OpenCV builds a
    distance d from a chain of pixels within d of it, each step adding at least its own length, and a window
    only lacks sources, so its distances are never smaller; where one is below the margin, its whole chain
    lies inside the window and is summed the same way."""
    h, w = padded.shape
    if h < 2 * _BAND_ROWS or len(inside_xs) * 8 > h * w:  # small or filled boxes: one call is cheaper
        return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_5)
    out = np.empty((h, w), np.float32)
    for r0 in range(0, h, _BAND_ROWS):
        r1 = min(r0 + _BAND_ROWS, h)
        a0, a1 = max(r0 - _BAND_MARGIN, 0), min(r1 + _BAND_MARGIN, h)
        s, e = np.searchsorted(inside_ys, (a0, a1))
        if s == e:
            continue  # no mask pixel in or near these rows
        c0 = max(int(inside_xs[s:e].min()) - _BAND_MARGIN, 0)
        c1 = min(int(inside_xs[s:e].max()) + 1 + _BAND_MARGIN, w)
        band = cv2.distanceTransform(padded[a0:a1, c0:c1], cv2.DIST_L2, cv2.DIST_MASK_5)[r0 - a0 : r1 - a0]
        if band.max() > _BAND_MARGIN - 1:  # wide enough to reach past the margin: the whole box at once
            return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_5)
        out[r0:r1, c0:c1] = band
    return out


def _max_width(link_counts: np.ndarray, ys: np.ndarray, xs: np.ndarray, distance: np.ndarray) -> float:
    """Twice the largest distance on the skeleton, minus one pixel, away from junctions: where branches
    meet, the inscribed circle is wider than either crack."""
    if len(ys) == 0:
        return 1.0
    radius = distance[ys, xs]
    keep = np.ones(len(ys), bool)
    junctions = np.nonzero(link_counts >= 3)[0]
    for j in junctions[:64]:  # a few junctions decide; a pathological mesh is not worth the time
        keep &= (ys - ys[j]) ** 2 + (xs - xs[j]) ** 2 > (2.0 * radius[j]) ** 2
    if keep.any():
        radius = radius[keep]
    return max(2.0 * float(radius.max()) - 1.0, 1.0)


def centre_line(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pruned skeleton of a mask crop, as measure() finds it: its pixels' rows and columns in the crop, the
    distance from each to the mask's edge (between pixel centres) and the skeleton's direction there (radians
    from +x towards +y)."""
    padded = cv2.copyMakeBorder((np.asarray(mask) != 0).view(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_5)
    skeleton = np.ascontiguousarray(skeletonize(padded.view(bool)))
    _, _, (ys, xs) = prune_spurs(skeleton, distance)
    return ys - 1, xs - 1, distance[ys, xs], _directions(ys, xs, padded.shape)


def measure(mask: np.ndarray) -> dict[str, float]:
    """Binary mask (any shape, nonzero = inside) -> the geometry fields in pixels."""
    mask = np.asarray(mask)
    mask = mask if mask.dtype == bool else mask != 0
    # The mask's pixels, row by row: its bounds, area and moments, and where its skeleton can be, all from them
    # (flatnonzero of a bool image is ten times faster than of uint8, and the box is mostly background).
    rows, cols = np.divmod(np.flatnonzero(mask), max(mask.shape[1], 1))
    if len(rows) == 0:
        return dict.fromkeys(GEOMETRY_FIELDS, 0.0) | {"area_pixels": 0}
    y, x = int(rows[0]), int(cols.min())
    # Trim to the mask's own bounds plus a one-pixel frame so the edges of a crop read as background.
    crop = mask.view(np.uint8)[y : int(rows[-1]) + 1, x : int(cols.max()) + 1]
    padded = cv2.copyMakeBorder(crop, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    inside_ys, inside_xs = rows - (y - 1), cols - (x - 1)  # the same pixels in the padded box
    inside = inside_ys * padded.shape[1] + inside_xs
    area = len(inside)
    distance = _distance_on_mask(padded, inside_ys, inside_xs)
    skeleton = np.ascontiguousarray(skeletonize(padded.view(bool)))
    on_skeleton = inside[skeleton.ravel()[inside]]  # thinning only removes pixels
    _, pixel_codes, (ys, xs) = prune_spurs(skeleton, distance, pixels=on_skeleton)
    max_width = _max_width(_LINK_COUNT[pixel_codes], ys, xs, distance)
    angle = _principal_axis_degrees(inside_ys, inside_xs)
    length = _tangent_length(ys, xs, _LINK_COUNT[pixel_codes], padded.shape)
    if length < 2.0 * max_width:
        length = _extent_along(inside_ys, inside_xs, angle)
    return {
        "area_pixels": area,
        "length_pixels": round(length, 2),
        "width_pixels": round(area / length, 2),
        "orientation_degrees": round(angle, 2),
        "max_width_pixels": round(max_width, 2),
    }


def measure_row(mask: np.ndarray) -> list[float]:
    """measure() as a row in GEOMETRY_FIELDS order (the table the geometry step sends on)."""
    g = measure(mask)
    return [g[f] for f in GEOMETRY_FIELDS]


def to_millimetres(geometry: dict, mm_per_pixel: float) -> dict[str, float]:
    """The `*_mm` fields for a pixel size in millimetres."""
    mm = {
        "length_mm": round(geometry["length_pixels"] * mm_per_pixel, 3),
        "width_mm": round(geometry["width_pixels"] * mm_per_pixel, 3),
        "max_width_mm": round(geometry["max_width_pixels"] * mm_per_pixel, 3),
        "area_mm2": round(geometry["area_pixels"] * mm_per_pixel * mm_per_pixel, 3),
    }
    if "width_uncertainty_pixels" in geometry:
        mm["width_uncertainty_mm"] = round(geometry["width_uncertainty_pixels"] * mm_per_pixel, 3)
    return mm


SEVERITY_BANDS = ("hairline", "fine", "medium", "wide")


def crack_severity(max_width_mm: float, thresholds_mm: tuple[float, float, float]) -> str:
    """Band of a crack by its maximum width: below t0 hairline, below t1 fine, below t2 medium, else wide."""
    for band, limit in zip(SEVERITY_BANDS, thresholds_mm):
        if max_width_mm < limit:
            return band
    return SEVERITY_BANDS[-1]
