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


def box_crop(mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A full-image mask -> its crop to its own bounds and that box (x0, y0, x1, y1, pixel edges), as the
    segmenter sends masks on; an empty mask's crop and box are empty."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return np.zeros((0, 0), bool), (0, 0, 0, 0)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return np.asarray(mask, bool)[box[1] : box[3], box[0] : box[2]], box


def crop_to_rle(mask: np.ndarray, box: tuple[int, int, int, int], image_hw: tuple[int, int]) -> dict:
    """A crop at `box` (x0, y0, x1, y1) -> compressed COCO RLE of the full image, as pycocotools writes it:
    {"size": [height, width], "counts": str}. COCO RLE runs down the columns, alternating runs of zeros and
    ones from a run of zeros. Only the crop is read: each run of ones is found in the crop's columns and
    placed by its index in the full image, the zeros are the gaps between them."""
    height, width = image_hw
    x0, y0, x1, y1 = box
    columns = np.zeros((x1 - x0, y1 - y0 + 2), np.int8)  # the crop's columns, a zero above and below each
    columns[:, 1:-1] = np.asarray(mask, bool).T
    step = np.diff(columns, axis=1).ravel()  # +1 where a run of ones starts, -1 where it has ended
    per_column = y1 - y0 + 1
    starts, ends = (np.flatnonzero(step == sign) for sign in (1, -1))
    # index down the full image's columns: column x0 + c, row y0 + r
    starts = (x0 + starts // per_column) * height + y0 + starts % per_column
    ends = (x0 + ends // per_column) * height + y0 + ends % per_column
    if len(starts) > 1:  # a run reaching the image's bottom goes on at the top of the next column
        apart = starts[1:] != ends[:-1]
        starts = np.concatenate([starts[:1], starts[1:][apart]])
        ends = np.concatenate([ends[:-1][apart], ends[-1:]])
    edges = np.empty(2 * len(starts) + 2, np.int64)
    edges[0], edges[1:-1:2], edges[2:-1:2], edges[-1] = 0, starts, ends, height * width
    runs = np.diff(edges).tolist()  # zeros, ones, zeros, ..., zeros
    if len(runs) > 1 and runs[-1] == 0:  # ones to the very end: pycocotools writes no empty last run
        runs.pop()
    rle = coco_mask.frPyObjects({"size": [height, width], "counts": runs}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict) -> np.ndarray:
    """COCO RLE (compressed string counts) -> bool (height, width)."""
    encoded = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return coco_mask.decode(encoded).astype(bool)
