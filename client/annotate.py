"""Draw a response on its image: defect boxes and masks, structure boxes, labels."""

from __future__ import annotations

import cv2
import numpy as np

from anomaly.masks import rle_to_mask

DEFECT = (230, 40, 40)  # RGB
STRUCTURE = (40, 120, 230)


def _label(img: np.ndarray, text: str, x: int, y: int, colour) -> None:
    scale = max(0.4, img.shape[1] / 2400)
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    y = max(y, h + base + 2)
    cv2.rectangle(img, (x, y - h - base - 2), (x + w + 2, y), colour, -1)
    cv2.putText(img, text, (x + 1, y - base), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def annotate(rgb: np.ndarray, response: dict) -> np.ndarray:
    """RGB uint8 image + response -> a new RGB image with the findings drawn on it."""
    out = rgb.copy()
    thick = max(1, rgb.shape[1] // 800)
    for s in response.get("structures", []):
        b = s["bbox"]
        cv2.rectangle(out, (b["x_min"], b["y_min"]), (b["x_max"] - 1, b["y_max"] - 1), STRUCTURE, thick)
        _label(out, f"{s['structure_type']} {s['confidence']:.2f}", b["x_min"], b["y_min"], STRUCTURE)
    for a in response.get("anomalies", []):
        if "mask" in a:
            mask = rle_to_mask(a["mask"])
            out[mask] = (0.5 * out[mask] + 0.5 * np.array(DEFECT)).astype(np.uint8)
        b = a["bbox"]
        cv2.rectangle(out, (b["x_min"], b["y_min"]), (b["x_max"] - 1, b["y_max"] - 1), DEFECT, thick)
        g = a["geometry"]
        text = (
            f"{a['defect_type']} {a['confidence']['combined']:.2f} L{g['length_pixels']:.0f} W{g['width_pixels']:.1f}"
        )
        _label(out, text, b["x_min"], b["y_min"], DEFECT)
    if response.get("untrained_weights"):
        _label(out, "UNTRAINED WEIGHTS - output is meaningless", 4, rgb.shape[0] - 4, (200, 0, 0))
    return out


def write_annotated(data: bytes, response: dict, target) -> None:
    """The encoded image `data` with its response drawn on it, saved as a JPEG at `target`."""
    from pathlib import Path

    from PIL import Image

    from anomaly.images import decode_image

    rgb = decode_image(data, len(data) + 1, 10**10)
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(annotate(rgb, response)).save(target, quality=88)
