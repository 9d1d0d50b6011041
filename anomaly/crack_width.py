"""A crack's width below the pixel, read from the photo across the crack (docs/geometry.md, "Width from the
photo").

Across a crack the photo is darker than the surface beside it. Summed across the crack, that darkness is the
crack's width times its contrast (the surface minus the crack's core), whatever the blur: blur spreads light, it
does not remove it. So the mask says where the crack runs, and intensity profiles of the photo perpendicular to
its centre line say how wide it is: width = integrated darkness / contrast, profile by profile.

The contrast comes from a blurred bar (a dark band of width w, contrast C, seen through a Gaussian blur of
sigma) fitted to the crack's mean profile. Where the crack is wide enough for its core to show its own darkness,
the profile decides C; where it is too narrow, the fit leans on a prior: the core is `core_brightness` of the
surface (a narrow gap is in shadow), with a spread that enters the width's uncertainty.

Where the photo cannot tell, the mask's width stands and the estimate says why (method "mask"): too few clean
profiles (they run off the photo or into another defect), a crack too faint against the surface's own texture,
or a photo too blurred for the crack's profile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.optimize import least_squares
from scipy.special import erf

from anomaly.geometry import centre_line

STEP_PX = 0.5  # between the samples of a profile
SURFACE_SPAN_PX = 5.0  # of surface sampled on each side, beyond the crack's window
WINDOW_MARGIN_PX = 2.5  # the crack's window: the mask's half width plus this much room for blur
MAX_PROFILES = 300  # evenly spread along the centre line; more adds time, not accuracy
MIN_PROFILES = 8
MIN_CLEAN_SHARE = 0.3  # of the profiles, clean (inside the photo, no other defect on the surface samples)
MAX_BLUR_PX = 2.0  # the fitted blur's sigma above which the photo is too soft to read a width from
MIN_SIGNAL_TO_NOISE = 4.0  # the mean integrated darkness over its standard error
MIN_PEAK_TO_TEXTURE = 0.5  # the mean profile's darkest point over the surface's spread
CONTRAST_SPREAD = 0.2  # relative spread of the contrast prior
MASK_UNCERTAINTY_PX = 1.0  # a binary mask's two edges can each be half a pixel off
NEIGHBOURS_PX = 5.0  # profiles this close along the crack are averaged before its maximum is taken


WIDTH_METHODS = ("mask", "image")  # codes 0 and 1 in the table the geometry step sends on
# Why the photo could not tell, as the response says it (codes 1.. in that table; 0: it could, or was not asked).
WHY_MASK = {
    "short": "the crack is too short for profiles across it; the width is the mask's",
    "crowded": "the profiles across the crack run off the photo or into another defect; the width is the mask's",
    "faint": "the crack is too faint against the surface's texture to read its width; the width is the mask's",
    "blurred": "the photo is too blurred across the crack to read its width; the width is the mask's",
}


@dataclass(frozen=True)
class CrackWidth:
    """What the photo says of a crack's width: mean and maximum in pixels, how sure (one standard deviation, px),
    and how ("image"; "mask" with the reason, a key of WHY_MASK, when the photo could not tell and the mask's widths
    stand), with what was measured on the way (`detail`, for logs and tests)."""

    method: str
    width: float | None = None
    max_width: float | None = None
    uncertainty: float = MASK_UNCERTAINTY_PX
    reason: str = ""
    detail: str = ""
    contrast: float | None = None
    blur: float | None = None
    profiles: int = 0


def _mask_only(reason: str, detail: str, profiles: int = 0, **seen) -> CrackWidth:
    return CrackWidth("mask", reason=reason, detail=detail, profiles=profiles, **seen)


def _bar(s: np.ndarray, contrast: float, width: float, sigma: float, centre: float) -> np.ndarray:
    """The darkness profile of a band `width` wide and `contrast` deep, blurred by a Gaussian of `sigma`."""
    k = 1.0 / (math.sqrt(2.0) * sigma)
    return 0.5 * contrast * (erf((s - centre + width / 2) * k) - erf((s - centre - width / 2) * k))


def _occupied(shape: tuple[int, int], own: np.ndarray, own_box, others) -> np.ndarray:
    """Where defects lie in a window of the frame (`shape` at the frame's origin offset by nothing): the crack's
    own mask and the other defects' masks (mask crop, box) that reach into it."""
    grid = np.zeros(shape, bool)
    for mask, (x0, y0, x1, y1) in [(own, own_box), *others]:
        h, w = shape
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if cx1 > cx0 and cy1 > cy0:
            grid[cy0:cy1, cx0:cx1] |= np.asarray(mask, bool)[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    return grid


def measure_width(gray: np.ndarray, mask: np.ndarray, box, others=(), core_brightness: float = 0.3) -> CrackWidth:
    """The width of the crack whose mask crop `mask` sits at `box` (x0, y0, x1, y1) in the photo `gray` (H, W; any
    number type). `others`: the frame's other defects as (mask crop, box), so that a profile whose surface samples
    fall on one of them is left out."""
    x0, y0 = int(box[0]), int(box[1])
    ys, xs, radius, theta = centre_line(mask)
    if len(ys) < MIN_PROFILES:
        return _mask_only("short", f"{len(ys)} centre-line pixels")
    if len(ys) > MAX_PROFILES:
        keep = np.linspace(0, len(ys) - 1, MAX_PROFILES).round().astype(int)
        ys, xs, radius, theta = ys[keep], xs[keep], radius[keep], theta[keep]

    # The window holds the crack: the mask's half width (its distance transform minus half a pixel) and room for
    # blur; the surface is read beyond it on both sides.
    half = max(float(np.percentile(radius, 90)) - 0.5, 0.5) + WINDOW_MARGIN_PX
    outer = half + SURFACE_SPAN_PX
    s = np.arange(-outer, outer + STEP_PX / 2, STEP_PX)
    inner = np.abs(s) <= half
    nx, ny = -np.sin(theta), np.cos(theta)  # the normal to the centre line's direction
    px = (x0 + xs)[:, None] + s[None, :] * nx[:, None]
    py = (y0 + ys)[:, None] + s[None, :] * ny[:, None]

    height, width = gray.shape[:2]
    inside = (px.min(1) >= 0) & (py.min(1) >= 0) & (px.max(1) <= width - 1) & (py.max(1) <= height - 1)
    # Only the photo around the crack is read (and converted to floats).
    wx0, wy0 = max(int(math.floor(px.min())), 0), max(int(math.floor(py.min())), 0)
    wx1, wy1 = min(int(math.ceil(px.max())) + 2, width), min(int(math.ceil(py.max())) + 2, height)
    patch = np.ascontiguousarray(gray[wy0:wy1, wx0:wx1], np.float32)
    mx, my = (px - wx0).astype(np.float32), (py - wy0).astype(np.float32)
    profiles = cv2.remap(patch, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE).astype(np.float64)

    # A profile whose surface samples land on a defect (another crack, a branch of this one) reads no surface.
    box_here = (x0 - wx0, y0 - wy0, x0 - wx0 + mask.shape[1], y0 - wy0 + mask.shape[0])
    here = [(m, (bx0 - wx0, by0 - wy0, bx1 - wx0, by1 - wy0)) for m, (bx0, by0, bx1, by1) in others]
    occupied = _occupied(patch.shape, mask, box_here, here)
    oy = np.clip(np.rint(my[:, ~inner]).astype(int), 0, patch.shape[0] - 1)
    ox = np.clip(np.rint(mx[:, ~inner]).astype(int), 0, patch.shape[1] - 1)
    clean = inside & ~occupied[oy, ox].any(axis=1)
    n = int(clean.sum())
    if n < max(MIN_PROFILES, MIN_CLEAN_SHARE * len(ys)):
        return _mask_only("crowded", f"{n} of {len(ys)} profiles clean", n)
    profiles = profiles[clean]

    # The surface under each profile: a straight line through the medians of its two sides (lighting slopes).
    left, right = s < -half, s > half
    surface_left, surface_right = np.median(profiles[:, left], 1), np.median(profiles[:, right], 1)
    mid = (half + outer) / 2
    surface = (surface_left + surface_right)[:, None] / 2 + (surface_right - surface_left)[:, None] * s / (2 * mid)
    darkness = surface - profiles
    texture = 1.4826 * float(np.median(np.abs(darkness[:, ~inner] - np.median(darkness[:, ~inner]))))
    integrated = darkness[:, inner].sum(1) * STEP_PX  # width x contrast, profile by profile
    spread = float(np.std(integrated))
    # Neighbouring profiles share pixels: about one independent profile per pixel along the crack and the
    # profiles are a pixel or more apart, so n is an upper bound; a quarter of it is the conservative count.
    independent = max(n / 4.0, 1.0)
    mean_integrated = float(integrated.mean())
    signal_to_noise = mean_integrated / max(spread / math.sqrt(independent), 1e-9)

    # Each profile centred on its own darkness before averaging, so that a mask a little off the crack's middle
    # does not widen the mean profile.
    positive = np.clip(darkness[:, inner], 0, None)
    centres = np.clip((positive * s[inner]).sum(1) / np.maximum(positive.sum(1), 1e-9), -1.0, 1.0)
    position = np.clip((s[None, :] + centres[:, None] - s[0]) / STEP_PX, 0, len(s) - 1)  # linear, as np.interp
    left_sample = np.minimum(position.astype(int), len(s) - 2)
    share = position - left_sample
    aligned = (np.take_along_axis(darkness, left_sample, 1) * (1 - share)
               + np.take_along_axis(darkness, left_sample + 1, 1) * share)  # fmt: skip
    mean_profile = aligned.mean(0)
    peak = float(mean_profile[inner].max())
    if signal_to_noise < MIN_SIGNAL_TO_NOISE or peak < MIN_PEAK_TO_TEXTURE * texture:
        detail = f"darkest {peak:.1f} grey levels, texture {texture:.1f}, signal to noise {signal_to_noise:.1f}"
        return _mask_only("faint", detail, n)

    surface_level = float(np.median(surface))
    prior = max((1.0 - core_brightness) * surface_level, 1.0)
    # The mean profile's noise: the surface's blotches span several profiles, so it averages fewer independent
    # ones than the integrals do; weighed so, the prior holds where the profile's shape says little of the core.
    noise = max(texture / math.sqrt(independent / 4.0), 0.05)
    fitted = np.abs(s) <= half + 2.0  # the crack's window and a little surface
    at = s[fitted]

    def residuals(p):
        contrast, w, sigma, centre = p
        misfit = (_bar(at, contrast, w, sigma, centre) - mean_profile[fitted]) / noise
        return np.r_[misfit, (contrast - prior) / (CONTRAST_SPREAD * prior)]

    def jacobian(p):  # the bar's derivatives, exact and cheaper than the fit's own finite differences
        contrast, w, sigma, centre = p
        k = 1.0 / (math.sqrt(2.0) * sigma)
        a, b = (at - centre + w / 2) * k, (at - centre - w / 2) * k
        ga, gb = np.exp(-a * a) * (2 / math.sqrt(math.pi)), np.exp(-b * b) * (2 / math.sqrt(math.pi))
        columns = [
            0.5 * (erf(a) - erf(b)),
            0.25 * contrast * k * (ga + gb),
            -0.5 * contrast / sigma * (a * ga - b * gb),
            -0.5 * contrast * k * (ga - gb),
        ]
        return np.vstack([np.stack(columns, axis=1) / noise, [1.0 / (CONTRAST_SPREAD * prior), 0.0, 0.0, 0.0]])

    start = [
        min(max(prior, peak), surface_level),
        min(max(mean_integrated / max(prior, peak), 0.1), 2 * half),
        0.8,
        0.0,
    ]
    upper = [max(surface_level, 1.05 * peak, 2.0), 2.0 * half, 4.0, 1.5]  # no core darker than black
    fit = least_squares(residuals, start, jac=jacobian, bounds=([0.5, 0.05, 0.3, -1.5], upper))
    contrast, _, sigma, _ = fit.x
    try:
        scale = np.sum(fit.fun**2) / max(len(fit.fun) - 4, 1)  # the misfit the noise model did not explain
        covariance = np.linalg.inv(fit.jac.T @ fit.jac) * max(scale, 1.0)
        contrast_error = math.sqrt(max(covariance[0, 0], 0.0))
    except np.linalg.LinAlgError:
        contrast_error = CONTRAST_SPREAD * prior
    seen = {"contrast": round(float(contrast), 2), "blur": round(float(sigma), 3)}
    if sigma > MAX_BLUR_PX:
        return _mask_only("blurred", f"blur sigma {sigma:.2f} px", n, **seen)

    widths = integrated / contrast
    low, high = np.percentile(widths, [10, 90])
    mean_width = float(widths[(widths >= low) & (widths <= high)].mean())
    # The maximum: the widths averaged over a few pixels of crack, at their 80th percentile. The surface's texture
    # varies over several pixels, so a higher percentile would measure its noise (or a junction), not the crack.
    cy, cx = ys[clean].astype(np.float64), xs[clean].astype(np.float64)
    near = (cy[:, None] - cy[None, :]) ** 2 + (cx[:, None] - cx[None, :]) ** 2 <= NEIGHBOURS_PX**2
    local = (near @ widths) / near.sum(1)
    max_width = max(float(np.percentile(local, 80)), mean_width)
    uncertainty = math.hypot(mean_width * contrast_error / contrast, float(np.std(widths)) / math.sqrt(independent))
    return CrackWidth(
        "image",
        width=round(mean_width, 3),
        max_width=round(max_width, 3),
        uncertainty=round(max(uncertainty, 0.01), 3),
        profiles=n,
        **seen,
    )


def frame_widths(gray_of, crops: list[np.ndarray], boxes: np.ndarray, mask_max_widths, cracks,
                 max_width_px: float, core_brightness: float) -> list[CrackWidth | None]:  # fmt: skip
    """The photo's width of each crack of a frame whose mask is at most `max_width_px` wide (None for the others:
    not cracks, or wide enough for the mask). `gray_of()` gives the frame in grey levels; it is called only when
    some crack needs it (decoding a photo costs more than measuring a crack)."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    wanted = [bool(c) and 0 < float(m) <= max_width_px for c, m in zip(cracks, mask_max_widths)]
    if not any(wanted):
        return [None] * len(crops)
    gray = gray_of()
    placed = [(crop, tuple(int(v) for v in box)) for crop, box in zip(crops, boxes)]
    return [
        measure_width(gray, placed[k][0], placed[k][1], placed[:k] + placed[k + 1 :], core_brightness) if want else None
        for k, want in enumerate(wanted)
    ]
