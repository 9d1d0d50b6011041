"""The evaluation's numbers against pycocotools on hand-made answers: perfect ones give AP 1.0 and no error; a
known perturbation gives what COCOeval itself gives; misses, false alarms and geometry errors are counted as made."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from anomaly.datasets import read_dataset
from anomaly.evaluation import evaluate, truth_geometry
from anomaly.synthetic import STRUCTURES, write_dataset


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("eval"), {"test": 6}, seed=11)
    return read_dataset(root, ("test",)).splits["test"].coco()


def answers(gt: dict, change=lambda a, i: a) -> dict[int, dict]:
    """The service's responses as they would be were it exactly right, each truth passed through `change`
    (annotation, index) -> annotation or None (dropped)."""
    names = {c["id"]: c["name"] for c in gt["categories"]}
    images = {i["id"]: i for i in gt["images"]}
    responses = {i: {"anomalies": [], "structures": []} for i in images}
    for k, a in enumerate(gt["annotations"]):
        a = change(dict(a), k)
        if a is None:
            continue
        x, y, w, h = a["bbox"]
        box = {"x_min": x, "y_min": y, "x_max": x + w, "y_max": y + h}
        name, score = names[a["category_id"]], a.get("score", 0.9)
        if name in STRUCTURES:
            responses[a["image_id"]]["structures"].append({"structure_type": name, "bbox": box, "confidence": score})
        else:
            geometry = a.get("geometry") or truth_geometry(a, images[a["image_id"]])
            responses[a["image_id"]]["anomalies"].append({
                "defect_type": name, "bbox": box, "mask": a["segmentation"], "geometry": geometry,
                "confidence": {"detection": score, "segmentation": 1.0, "combined": (score + 1) / 2},
            })  # fmt: skip
    return responses


def cocoeval(gt: dict, results: list[dict], iou_type: str, category: int | None = None) -> tuple[float, float]:
    """pycocotools' own AP and AP50, from files as its users load them."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt | {"info": {}, "licenses": []}))
        coco.createIndex()
        found = coco.loadRes(results)
        e = COCOeval(coco, found, iou_type)
        if category is not None:
            e.params.catIds = [category]
        e.evaluate()
        e.accumulate()
        e.summarize()
    return round(float(e.stats[0]), 4), round(float(e.stats[1]), 4)


def test_perfect_answers_score_one_and_measure_no_error(truth):
    report = evaluate(truth, answers(truth), 0.3, set(STRUCTURES))
    assert report["box"] == {"ap": 1.0, "ap50": 1.0} and report["mask"]["ap"] == 1.0
    t = report["at_threshold"]
    assert t["misses"] == t["false_alarms"] == 0 and t["matched"] == t["truths"] == len(truth["annotations"])
    crack = report["per_class"]["crack"]
    assert crack["box_ap"] == crack["mask_ap"] == 1.0 and crack["role"] == "defect"
    assert report["per_class"]["beam"]["role"] == "structure" and report["per_class"]["beam"]["mask_ap"] is None
    for quantity in ("length", "width", "max_width"):
        assert report["geometry"][quantity]["median_abs_px"] == 0.0
        assert report["geometry"][quantity]["median_abs_mm"] == 0.0  # each image has its mm_per_pixel


def test_a_known_perturbation_scores_what_cocoeval_gives(truth):
    """Every third truth shifted by a quarter of its box, every fifth dropped, a false alarm per image, and
    scores that rank some wrong answers first: the same AP as pycocotools computes on the same answers."""
    rng = np.random.default_rng(0)
    scores = {}

    def change(a, k):
        if k % 5 == 4:
            return None
        x, y, w, h = a["bbox"]
        if k % 3 == 0:
            a["bbox"] = [x + w // 4, y + h // 4, w, h]
        a["score"] = scores[k] = round(float(rng.uniform(0.2, 0.95)), 3)
        return a

    responses = answers(truth, change)
    for response in responses.values():  # a crack where there is none
        response["anomalies"].append({
            "defect_type": "crack", "bbox": {"x_min": 0, "y_min": 0, "x_max": 30, "y_max": 30}, "mask": None,
            "geometry": None, "confidence": {"detection": 0.5, "segmentation": 0.5, "combined": 0.5},
        })  # fmt: skip
    report = evaluate(truth, responses, 0.3, set(STRUCTURES))
    ids = {c["name"]: c["id"] for c in truth["categories"]}
    results = [
        {"image_id": i, "category_id": ids[a["defect_type"]], "score": a["confidence"]["detection"],
         "bbox": [a["bbox"]["x_min"], a["bbox"]["y_min"], a["bbox"]["x_max"] - a["bbox"]["x_min"],
                  a["bbox"]["y_max"] - a["bbox"]["y_min"]]}
        for i, r in responses.items() for a in r["anomalies"]
    ] + [
        {"image_id": i, "category_id": ids[s["structure_type"]], "score": s["confidence"],
         "bbox": [s["bbox"]["x_min"], s["bbox"]["y_min"], s["bbox"]["x_max"] - s["bbox"]["x_min"],
                  s["bbox"]["y_max"] - s["bbox"]["y_min"]]}
        for i, r in responses.items() for s in r["structures"]
    ]  # fmt: skip
    ap, ap50 = cocoeval(truth, results, "bbox")
    assert (report["box"]["ap"], report["box"]["ap50"]) == (ap, ap50) and 0 < ap < 1
    crack = cocoeval(truth, results, "bbox", ids["crack"])
    assert (report["per_class"]["crack"]["box_ap"], report["per_class"]["crack"]["box_ap50"]) == crack
    t = report["at_threshold"]
    assert t["truths"] == len(truth["annotations"])
    # a box shifted by a quarter of its width and height overlaps by (3/4)^2 / (2 - (3/4)^2) = 0.39 < 0.5: a miss;
    # so is a dropped one, and one answered under the threshold
    misses = [k for k in range(t["truths"]) if k not in scores or k % 3 == 0 or scores[k] < 0.3]
    assert t["misses"] == len(misses)
    assert t["false_alarms"] >= len(responses)  # at least the made-up crack of each image


def test_geometry_error_is_served_minus_true(truth):
    """A served crack 2 px longer and 1 px wider than its true mask: errors of +2 and +1 px, in mm by the image's
    scale."""
    cracks = [a for a in truth["annotations"] if a["category_id"] == 1]
    images = {i["id"]: i for i in truth["images"]}

    def wider(a, k):
        if a["category_id"] == 1:
            g = dict(truth_geometry(a, images[a["image_id"]]))
            g["length_pixels"] += 2.0
            g["width_pixels"] += 1.0
            a["geometry"] = g
        return a

    report = evaluate(truth, answers(truth, wider), 0.3, set(STRUCTURES))
    g = report["per_class"]["crack"]["geometry"]
    assert g["length"]["n"] == len(cracks) and g["length"]["median_abs_px"] == pytest.approx(2.0)
    assert g["width"]["median_abs_px"] == pytest.approx(1.0) and g["max_width"]["median_abs_px"] == 0.0
    scales = sorted(images[a["image_id"]]["mm_per_pixel"] for a in cracks)
    assert g["length"]["median_abs_mm"] == pytest.approx(2.0 * float(np.median(scales)), abs=1e-3)
