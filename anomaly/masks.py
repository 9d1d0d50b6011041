"""Mask crops between pipeline stages (bit-packed) and for clients (COCO RLE in full-image coordinates)."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as coco_mask


def pack(mask: np.ndarray) -> bytes:
    """bool (h, w) -> bytes, 8 pixels a byte, row-major."""
    return np.packbits(np.asarray(mask, bool).ravel()).tobytes()


def unpack(data: bytes, height: int, width: int) -> np.ndarray:
    """The inverse of pack."""
    bits = np.unpackbits(np.frombuffer(data, np.uint8), count=height * width)
    return bits.reshape(height, width).astype(bool)


def crop_to_rle(mask: np.ndarray, box: tuple[int, int, int, int], image_hw: tuple[int, int]) -> dict:
    """A crop at `box` (x0, y0, x1, y1) -> compressed COCO RLE of the full image, as pycocotools writes it:
    {"size": [height, width], "counts": str}. Only the crop's columns are materialised: COCO RLE runs down
    the columns, so the columns left and right of the crop are one leading and one trailing run of zeros."""
    height, width = image_hw
    x0, y0, x1, y1 = box
    strip = np.zeros((height, x1 - x0), np.uint8)
    strip[y0:y1] = mask
    flat = strip.ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        runs.insert(0, 0)  # COCO RLE always starts with a run of zeros
    if not runs:
        runs = [0]
    runs[0] += x0 * height
    if len(runs) % 2 == 1:  # the last run is zeros: extend it
        runs[-1] += (width - x1) * height
    elif width - x1:
        runs.append((width - x1) * height)
    rle = coco_mask.frPyObjects({"size": [height, width], "counts": runs}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict) -> np.ndarray:
    """COCO RLE (compressed string counts) -> bool (height, width)."""
    encoded = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return coco_mask.decode(encoded).astype(bool)
