"""Synthetic masks with known geometry, rasterised without anti-aliasing: a pixel is inside when its centre
lies within width/2 of the centre line (a thick stroke with round caps and joins). Distances are computed
exactly, per segment or per arc, so the truth does not depend on a drawing library."""

from __future__ import annotations

import math

import numpy as np


def _grid(x_min: float, y_min: float, x_max: float, y_max: float, margin: int):
    x0, y0 = int(math.floor(x_min)) - margin, int(math.floor(y_min)) - margin
    x1, y1 = int(math.ceil(x_max)) + margin, int(math.ceil(y_max)) + margin
    yy, xx = np.mgrid[y0 : y1 + 1, x0 : x1 + 1].astype(np.float64)
    return xx, yy


def thick_segments(lines: list[np.ndarray], width: float, margin: int = 4) -> np.ndarray:
    """Polylines (each (K, 2) of x, y in image coordinates) drawn `width` wide -> bool mask."""
    pts = np.concatenate(lines)
    r = width / 2.0
    xx, yy = _grid(pts[:, 0].min() - r, pts[:, 1].min() - r, pts[:, 0].max() + r, pts[:, 1].max() + r, margin)
    best = np.full(xx.shape, np.inf)
    for line in lines:
        for (x0, y0), (x1, y1) in zip(line[:-1], line[1:]):
            dx, dy = x1 - x0, y1 - y0
            seg2 = dx * dx + dy * dy
            t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / seg2, 0.0, 1.0) if seg2 else 0.0
            best = np.minimum(best, np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy)))
    return best <= r


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
