"""Synthetic masks with known geometry, rasterised without anti-aliasing: a pixel is inside when its centre
lies within width/2 of the polyline (a thick stroke with round caps and joins)."""

from __future__ import annotations

import math

import numpy as np


def rasterise_polylines(polylines: list[np.ndarray], width: float, margin: int = 4):
    """Polylines in (x, y) pixel coordinates -> (mask, offset): a bool mask covering them with `margin`
    pixels around, and the (x, y) of its top-left pixel in the polylines' coordinates."""
    pts = np.concatenate(polylines)
    r = width / 2.0
    x_min = int(math.floor(pts[:, 0].min() - r)) - margin
    y_min = int(math.floor(pts[:, 1].min() - r)) - margin
    x_max = int(math.ceil(pts[:, 0].max() + r)) + margin
    y_max = int(math.ceil(pts[:, 1].max() + r)) + margin
    h, w = y_max - y_min + 1, x_max - x_min + 1
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    xx += x_min
    yy += y_min
    best = np.full((h, w), np.inf)
    for line in polylines:
        for (x0, y0), (x1, y1) in zip(line[:-1], line[1:]):
            dx, dy = x1 - x0, y1 - y0
            seg2 = dx * dx + dy * dy
            t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / seg2, 0.0, 1.0) if seg2 else 0.0
            best = np.minimum(best, np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy)))
    return best <= r, (x_min, y_min)


def polyline_length(line: np.ndarray) -> float:
    return float(np.hypot(*np.diff(line, axis=0).T).sum())


def straight(length: float, angle_deg: float, centre=(0.0, 0.0)) -> np.ndarray:
    """A segment; angle counter-clockwise from +x with y up (so y is negated in image coordinates)."""
    a = math.radians(angle_deg)
    d = np.array([math.cos(a), -math.sin(a)]) * length / 2.0
    c = np.asarray(centre, np.float64)
    return np.stack([c - d, c + d])


def arc(length: float, radius: float, start_deg: float, n: int = 200) -> np.ndarray:
    """A circular arc of the given length, sampled finely enough to be a smooth curve."""
    sweep = length / radius
    t = math.radians(start_deg) + np.linspace(0.0, sweep, n)
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def branching(lengths: tuple[float, float, float], angles_deg: tuple[float, float, float]) -> list[np.ndarray]:
    """Three arms leaving one point (a Y-shaped crack): total length is the sum of the arms."""
    arms = []
    for length, angle in zip(lengths, angles_deg):
        a = math.radians(angle)
        arms.append(np.array([[0.0, 0.0], [length * math.cos(a), -length * math.sin(a)]]))
    return arms
