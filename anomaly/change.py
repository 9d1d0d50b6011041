"""What changed between two inspections of the same asset: the photos of a position registered to each other, and
each defect matched to its counterpart, labelled new, grown, unchanged or gone (docs/campaigns.md, "Re-inspection").

Registration: ORB features of both photos, matched and fitted by RANSAC with a similarity transform (shift,
rotation, one scale), so a drone that did not hover at the same pixel still lines up. Matching: the after-defects'
masks warped into the before-photo, paired with the before-defects of the same type by mask overlap (Hungarian).
Growth: the after-defect's length and width brought to the before-photo's pixels (the transform's scale) minus the
before-defect's; "grown" only past GROWN_LENGTH / GROWN_WIDTH, which lie above what the measurement itself moves
when the same crack is photographed again slightly shifted and turned (tests/test_compare.py measures it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

STATUSES = ("new", "grown", "unchanged", "gone")
MIN_INLIERS = 12  # fewer matched features than this: the photos are not registered (the identity is used, and said)
MIN_OVERLAP = 0.1  # a before- and an after-defect of the same type are one defect from this mask IoU on
# "Grown" past the larger of px and a fraction of the before-measure. The same crack photographed again 0.5-8 px and
# 0-4 degrees off (masks resampled) moved its measured length by up to 7.4 px (4.8%) and its mask's largest width by
# up to 1.2 px (the width of a 2-6 px mask moves by whole pixels): 60 cracks, tests/test_compare.py.
GROWN_LENGTH = (10.0, 0.08)
GROWN_WIDTH = (2.0, 0.5)


@dataclass
class Registration:
    """after-photo pixels -> before-photo pixels (a 2 x 3 similarity), and how it was found."""

    matrix: np.ndarray
    inliers: int
    ok: bool

    @property
    def scale(self) -> float:
        return float(math.hypot(self.matrix[0, 0], self.matrix[1, 0]))

    @property
    def rotation_deg(self) -> float:
        return float(math.degrees(math.atan2(self.matrix[1, 0], self.matrix[0, 0])))

    def describe(self) -> str:
        if not self.ok:
            return f"not registered ({self.inliers} matching features): compared as taken"
        dx, dy = self.matrix[:, 2]
        return (f"shift {dx:.1f}, {dy:.1f} px, rotation {self.rotation_deg:.2f} deg, scale {self.scale:.3f} "
                f"({self.inliers} features)")  # fmt: skip


def register(before_bgr: np.ndarray, after_bgr: np.ndarray) -> Registration:
    """The similarity transform taking the after-photo onto the before-photo."""
    orb = cv2.ORB_create(nfeatures=4000)
    grey = [cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) for img in (before_bgr, after_bgr)]
    (kp_b, des_b), (kp_a, des_a) = (orb.detectAndCompute(g, None) for g in grey)
    identity = np.array([[1, 0, 0], [0, 1, 0]], np.float64)
    if des_b is None or des_a is None or len(kp_b) < MIN_INLIERS or len(kp_a) < MIN_INLIERS:
        return Registration(identity, 0, False)
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(des_a, des_b, k=2)
    good = [m for m, *rest in pairs if rest and m.distance < 0.8 * rest[0].distance]
    if len(good) < MIN_INLIERS:
        return Registration(identity, len(good), False)
    src = np.float32([kp_a[m.queryIdx].pt for m in good])
    dst = np.float32([kp_b[m.trainIdx].pt for m in good])
    matrix, inliers = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=3.0)
    count = int(inliers.sum()) if inliers is not None else 0
    if matrix is None or count < MIN_INLIERS:
        return Registration(identity, count, False)
    return Registration(matrix.astype(np.float64), count, True)


@dataclass
class Defect:
    """One defect of one inspection: its record (the response's anomaly) and full-frame mask."""

    anomaly: dict
    mask: np.ndarray


def warp_mask(mask: np.ndarray, registration: Registration, shape: tuple[int, int]) -> np.ndarray:
    """An after-photo mask in the before-photo's pixels."""
    warped = cv2.warpAffine(mask.astype(np.uint8), registration.matrix, (shape[1], shape[0]), flags=cv2.INTER_NEAREST)
    return warped.astype(bool)


def match(before: list[Defect], after: list[Defect], registration: Registration,
          shape: tuple[int, int]) -> tuple[list[tuple[int, int, float]], list[int], list[int]]:  # fmt: skip
    """(pairs (before index, after index, IoU), before left alone (gone), after left alone (new)): one to one,
    same type, the largest total overlap."""
    from scipy.optimize import linear_sum_assignment

    warped = [warp_mask(d.mask, registration, shape) for d in after]
    iou = np.zeros((len(before), len(after)))
    for i, b in enumerate(before):
        for j, a in enumerate(after):
            if b.anomaly["defect_type"] != a.anomaly["defect_type"]:
                continue
            union = np.logical_or(b.mask, warped[j]).sum()
            iou[i, j] = np.logical_and(b.mask, warped[j]).sum() / union if union else 0.0
    rows, cols = linear_sum_assignment(-iou) if iou.size else ([], [])
    pairs = [(int(i), int(j), float(iou[i, j])) for i, j in zip(rows, cols) if iou[i, j] >= MIN_OVERLAP]
    paired_b, paired_a = {i for i, _, _ in pairs}, {j for _, j, _ in pairs}
    return (
        pairs,
        [i for i in range(len(before)) if i not in paired_b],
        [j for j in range(len(after)) if j not in paired_a],
    )


def change(before: dict | None, after: dict | None, scale: float) -> dict:
    """A defect's status and the change of its length and width (after in the before-photo's pixels: x `scale`)."""
    if before is None:
        return {"status": "new"}
    if after is None:
        return {"status": "gone"}
    gb, ga = before["geometry"], after["geometry"]
    d_length = ga["length_pixels"] * scale - gb["length_pixels"]
    d_width = ga["max_width_pixels"] * scale - gb["max_width_pixels"]
    grown = d_length > max(GROWN_LENGTH[0], GROWN_LENGTH[1] * gb["length_pixels"]) or d_width > max(
        GROWN_WIDTH[0], GROWN_WIDTH[1] * gb["max_width_pixels"]
    )
    return {"status": "grown" if grown else "unchanged", "length_change_px": round(d_length, 2),
            "max_width_change_px": round(d_width, 2)}  # fmt: skip
