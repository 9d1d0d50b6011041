"""The response object: the original API's fields, structure association, masks as COCO RLE, units and severity."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from anomaly.detector import Detections, DetectorMetadata
from anomaly.masks import crop_to_rle, pack, rle_to_mask, unpack
from anomaly.options import RequestOptions
from anomaly.result import Findings, _hosts, build_response
from anomaly.segmenter import pixel_windows

META = DetectorMetadata(
    "medium", 576, [0.5] * 3, [0.2] * 3, ["crack", "spalling", "beam", "column", ""],
    ["defect", "defect", "structure", "structure", "ignore"],
)  # fmt: skip


def response(options=None, boxes=None, class_ids=None, warnings=()):
    boxes = np.array(
        boxes or [[10, 10, 50, 30], [200, 200, 260, 240], [0, 0, 100, 100], [180, 150, 400, 300]], np.float32
    )
    class_ids = np.array(class_ids or [0, 1, 2, 3], np.int32)
    scores = np.linspace(0.9, 0.5, len(boxes)).astype(np.float32)
    det = Detections(boxes, scores, class_ids)
    seg = np.array([i for i, c in enumerate(class_ids) if META.role(int(c)) == "defect"], np.int32)
    mask_boxes = np.array([[int(v) for v in boxes[i]] for i in seg], np.int32).reshape(-1, 4)
    masks = [np.ones((b[3] - b[1], b[2] - b[0]), bool) for b in mask_boxes]
    geo = [{"area_pixels": int(m.sum()), "length_pixels": 40.0, "width_pixels": m.sum() / 40.0,
            "orientation_degrees": 10.0, "max_width_pixels": 3.0} for m in masks]  # fmt: skip
    findings = Findings(det, seg, mask_boxes, masks, np.full(len(seg), 0.8, np.float32), geo)
    return build_response(
        image_hw=(480, 640), findings=findings, metadata=META, options=options or RequestOptions(0.3),
        severity_thresholds_mm=(0.1, 0.3, 1.0), warnings=list(warnings), processing_time_ms=12.345,
    )  # fmt: skip


def test_seed_fields_and_association():
    r = response(RequestOptions(0.3, frame_id="f-1"))
    assert r["frame_id"] == "f-1"
    assert r["image_size"] == {"width": 640, "height": 480}
    assert r["anomaly_count"] == 2 and len(r["structures"]) == 2
    crack, spall = r["anomalies"]
    beam, column = r["structures"]
    assert crack["structure_type"] == "beam" and crack["structure_id"] == beam["structure_id"]
    # The spalling box (200..260 x 200..240) lies inside the column box, not the beam box.
    assert spall["structure_type"] == "column" and spall["structure_id"] == column["structure_id"]
    assert crack["bbox"] == {"x_min": 10, "y_min": 10, "x_max": 50, "y_max": 30}
    assert crack["confidence"] == {"detection": 0.9, "segmentation": 0.8, "combined": 0.85}
    assert set(crack["geometry"]) >= {"area_pixels", "length_pixels", "width_pixels", "orientation_degrees"}
    assert r["processing_time_ms"] == 12.35
    assert r["untrained_weights"] is False and r["warnings"] == []
    assert "mask" not in crack and "severity" not in crack and "length_mm" not in crack["geometry"]


def test_unknown_structure_when_no_box_covers_most_of_it():
    r = response(boxes=[[90, 90, 140, 140], [0, 0, 100, 100]], class_ids=[0, 2])
    # Only 10 x 10 of the 50 x 50 crack box is on the beam: 4%, not the majority.
    assert r["anomalies"][0]["structure_type"] == "unknown" and r["anomalies"][0]["structure_id"] is None
    assert _hosts(np.array([[90, 90, 140, 140]]), np.array([[0, 0, 100, 100]]), [0.9]) == [None]
    assert _hosts(np.array([[90, 90, 140, 140]]), np.array([[0, 0, 130, 130]]), [0.9]) == [0]  # 64%


def test_hosts_pick_the_largest_share_then_the_more_confident():
    """Every box's host against a plain loop over the structures in order, on random boxes with many ties
    (boxes on a coarse grid): largest covered share at least 50%, equal shares go to the more confident,
    equal confidences to the first."""
    rng = np.random.default_rng(7)

    def reference(box, structures, confidences):
        host, best = None, 0.0
        area = (box[2] - box[0]) * (box[3] - box[1])
        for j, other in enumerate(structures):
            w = min(box[2], other[2]) - max(box[0], other[0])
            h = min(box[3], other[3]) - max(box[1], other[1])
            share = max(w, 0) * max(h, 0) / area if area > 0 else 0.0
            if share >= 0.5 and (share > best or (share == best and confidences[j] > confidences[host])):
                host, best = j, share
        return host

    def grid_boxes(n):
        corner = rng.integers(0, 8, (n, 2)) * 10
        return np.concatenate([corner, corner + rng.integers(0, 6, (n, 2)) * 10], axis=1)

    checked = 0
    for _ in range(200):
        boxes, structures = grid_boxes(12), grid_boxes(int(rng.integers(0, 15)))
        confidences = [float(c) for c in rng.choice([0.5, 0.7, 0.9], len(structures))]
        expected = [reference(b.tolist(), structures.tolist(), confidences) for b in boxes]
        assert _hosts(boxes, structures, confidences) == expected
        checked += sum(e is not None for e in expected)
    assert checked > 300  # a fifth of the boxes found a host: the comparison was not all None


def test_pixel_windows_contain_each_box_inside_the_image():
    rng = np.random.default_rng(3)
    boxes = np.concatenate([rng.uniform(-50, 700, (500, 2)), rng.uniform(0, 80, (500, 2))], axis=1).astype(np.float32)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:20, 2:] = boxes[:20, :2]  # empty boxes still get one pixel
    windows = pixel_windows(boxes, (480, 640))
    for box, (x0, y0, x1, y1) in zip(boxes.tolist(), windows.tolist()):
        assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
        assert x0 == min(max(math.floor(box[0]), 0), 639) and y0 == min(max(math.floor(box[1]), 0), 479)
        assert x1 == max(min(math.ceil(box[2]), 640), x0 + 1) and y1 == max(min(math.ceil(box[3]), 480), y0 + 1)


def test_many_structures_keep_their_order_values_and_distinct_ids():
    """A frame with hundreds of structures (untrained RF-DETR reports ~200): every one listed, in the detector's
    order, with its own class name, score and integer box, under an id no other record has."""
    import re

    rng = np.random.default_rng(5)
    corners = rng.uniform(0, 600, (300, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(1, 40, (300, 2))], axis=1).round(1).tolist()
    class_ids = rng.choice([2, 3], 300).tolist()
    r = response(boxes=[[10, 10, 50, 30], *boxes], class_ids=[0, *class_ids])
    assert len(r["structures"]) == 300
    ids = [s["structure_id"] for s in r["structures"]] + [a["anomaly_id"] for a in r["anomalies"]]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"(struct|anom)_[0-9a-f]{12}", i) for i in ids)
    scores = np.linspace(0.9, 0.5, 301).astype(np.float32)[1:]
    for s, c, score, box in zip(r["structures"], class_ids, scores, boxes):
        assert s["structure_type"] == META.name(c) and s["confidence"] == round(float(score), 4)
        assert all(type(v) is int for v in s["bbox"].values())
        assert s["bbox"]["x_min"] == math.floor(box[0]) and s["bbox"]["y_max"] == min(math.ceil(box[3]), 480)


def test_frame_id_generated_when_absent():
    a, b = response()["frame_id"], response()["frame_id"]
    assert a.startswith("frame_") and a != b


def test_masks_and_millimetres():
    r = response(RequestOptions(0.3, include_masks=True, mm_per_pixel=0.2))
    crack = r["anomalies"][0]
    mask = rle_to_mask(crack["mask"])
    assert mask.shape == (480, 640) and mask[10:30, 10:50].all() and mask.sum() == 800
    g = crack["geometry"]
    assert g["length_mm"] == 8.0 and g["max_width_mm"] == 0.6 and g["area_mm2"] == pytest.approx(800 * 0.04)
    assert crack["severity"] == "medium"  # 0.6 mm max width: between 0.3 and 1.0
    assert "severity" not in r["anomalies"][1]  # spalling is not a crack
    assert r["mm_per_pixel"] == 0.2


def test_untrained_warning_is_flagged():
    r = response(warnings=["UNTRAINED WEIGHTS: the detector ..."])
    assert r["untrained_weights"] is True and r["warnings"][0].startswith("UNTRAINED")


def test_rle_equals_pycocotools_on_the_full_frame():
    rng = np.random.default_rng(3)
    for i in range(300):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = int(rng.integers(x0 + 1, w + 1)), int(rng.integers(y0 + 1, h + 1))
        if i % 3 == 0:  # crops as tall as the image: runs of ones go on from one column into the next
            y0, y1 = 0, h
        crop = rng.random((y1 - y0, x1 - x0)) < rng.choice([0.0, 0.4, 1.0])
        full = np.zeros((h, w), np.uint8)
        full[y0:y1, x0:x1] = crop
        expected = coco_mask.encode(np.asfortranarray(full))
        rle = crop_to_rle(crop, (x0, y0, x1, y1), (h, w))
        assert rle == {"size": [h, w], "counts": expected["counts"].decode()}
        assert np.array_equal(unpack(pack(crop), *crop.shape), crop)
