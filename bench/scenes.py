"""A realistic inspection frame for benchmarks: 20 defect masks as SAM returns them for a 1080p photo
(box crops): 12 cracks (curved, some branching), 5 spalling patches, 3 corrosion stains."""

from __future__ import annotations

import math

import cv2
import numpy as np

from anomaly.synthetic import thick_segments


def _crack(rng: np.random.Generator) -> np.ndarray:
    length = rng.uniform(80, 700)
    width = rng.uniform(2, 12)
    steps = 12
    heading = rng.uniform(0, 2 * math.pi)
    pts = [np.zeros(2)]
    for _ in range(steps):
        heading += rng.normal(0, 0.25)
        pts.append(pts[-1] + length / steps * np.array([math.cos(heading), math.sin(heading)]))
    lines = [np.array(pts)]
    if rng.random() < 0.3:  # a branch leaving the middle
        start = lines[0][steps // 2]
        a = heading + rng.choice([-1, 1]) * rng.uniform(0.6, 1.2)
        lines.append(np.array([start, start + rng.uniform(40, 200) * np.array([math.cos(a), math.sin(a)])]))
    return thick_segments(lines, width, margin=3)


def _blob(rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    size = int(rng.uniform(lo, hi))
    canvas = np.zeros((size + 8, size + 8), np.uint8)
    angles = np.sort(rng.uniform(0, 2 * math.pi, 14))
    radii = size / 2 * rng.uniform(0.6, 1.0, 14)
    c = (size + 8) / 2
    poly = np.stack([c + radii * np.cos(angles), c + radii * np.sin(angles)], axis=1).astype(np.int32)
    cv2.fillPoly(canvas, [poly], 1)
    return canvas.astype(bool)


def inspection_masks(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        [_crack(rng) for _ in range(12)]
        + [_blob(rng, 60, 250) for _ in range(5)]
        + [_blob(rng, 40, 150) for _ in range(3)]
    )


def large_photo(image_path, size: tuple[int, int] = (6000, 4000)) -> bytes:
    """A drone-size JPEG (24 MP by default): a sample frame enlarged, for what tiling costs."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.open(image_path).convert("RGB").resize(size, Image.BILINEAR).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def frame_and_boxes_parser(prog: str, description: str, repeats: int, out_name: str):
    """The arguments of the benchmarks that time SAM on one sample frame and a grid of boxes."""
    import argparse
    from pathlib import Path

    from anomaly.config import REPO_ROOT

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--image", default="bridge_deck.jpg")
    parser.add_argument("--boxes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench_output" / out_name)
    return parser


def report(result: dict, out) -> int:
    """A benchmark's result on stdout and in its JSON file; the exit status."""
    import json

    print(json.dumps(result, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0
