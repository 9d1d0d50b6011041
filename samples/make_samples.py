"""Regenerate the bundled sample images (procedural concrete surfaces with defects painted on).

No real inspection photos can be shipped or downloaded here; these exercise the whole pipeline with
realistic sizes, formats and EXIF orientation. Run: .venv/bin/python samples/make_samples.py
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def concrete(h: int, w: int, rng: np.random.Generator, tone: float = 150.0) -> np.ndarray:
    base = rng.normal(tone, 6.0, (h, w)).astype(np.float32)
    blotch = cv2.GaussianBlur(rng.normal(0, 30, (h // 8 + 1, w // 8 + 1)).astype(np.float32), (0, 0), 3)
    base += cv2.resize(blotch, (w, h), interpolation=cv2.INTER_CUBIC)
    pores = rng.random((h, w)) < 0.002
    base[pores] -= 50
    img = np.repeat(base[:, :, None], 3, axis=2) * np.array([1.0, 0.98, 0.94], np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def crack(img: np.ndarray, start, length: float, heading: float, width: float, rng: np.random.Generator) -> None:
    pts = [np.array(start, float)]
    for _ in range(int(length / 12)):
        heading += rng.normal(0, 0.18)
        pts.append(pts[-1] + 12 * np.array([math.cos(heading), math.sin(heading)]))
    poly = np.array(pts, np.int32)
    cv2.polylines(img, [poly], False, (45, 42, 40), max(1, int(round(width))), lineType=cv2.LINE_8)


def main() -> None:
    rng = np.random.default_rng(7)
    # A bridge deck soffit with two girders and a branching crack, 1080p JPEG.
    deck = concrete(1080, 1920, rng)
    for x in (300, 1300):
        deck[:, x : x + 320] = np.clip(deck[:, x : x + 320].astype(int) - 25, 0, 255)
    crack(deck, (420, 120), 700, 1.3, 3, rng)
    crack(deck, (500, 500), 300, 0.3, 2, rng)
    crack(deck, (1400, 600), 420, -1.0, 5, rng)
    Image.fromarray(deck).save(HERE / "bridge_deck.jpg", quality=85)

    # A pier with spalling and a rust stain, PNG.
    pier = concrete(450, 800, rng, tone=165)
    cv2.ellipse(pier, (250, 240), (80, 50), 20, 0, 360, (95, 90, 88), -1)
    cv2.ellipse(pier, (560, 170), (40, 90), -10, 0, 360, (70, 100, 150), -1)
    pier[:, :, :] = cv2.GaussianBlur(pier, (3, 3), 0)
    Image.fromarray(pier).save(HERE / "pier_spalling.png", optimize=True)

    # A tunnel wall photographed in portrait: stored landscape, EXIF orientation 6 (rotate 90 cw to view).
    wall = concrete(600, 800, rng, tone=140)
    crack(wall, (100, 300), 600, 0.05, 4, rng)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(wall).save(HERE / "tunnel_wall_exif.jpg", quality=85, exif=exif)

    # The deck at a quarter of its size: small enough to travel inline in the RunPod Hub's tests.json and in
    # test_input.json (base64 in a JSON file).
    Image.fromarray(deck).resize((480, 270), Image.Resampling.LANCZOS).save(HERE / "hub_test.jpg", quality=80)


if __name__ == "__main__":
    main()
