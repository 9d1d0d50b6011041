"""How right the service's answers are on a labelled split, the way an inspector judges them.

Input: the split's ground truth (COCO: boxes, and masks where it has them) and the service's response for each
of its images. Output (`evaluate`): box AP@[.5:.95] and AP50 (pycocotools' COCOeval), mask AP where the truth
has masks, both per class; at the serving threshold, the misses and false alarms (a prediction and a truth of
the same class match when their boxes overlap by IoU >= 0.5, best scores first); and for each matched defect
with a true mask, its geometry against that mask's, measured with the service's own definitions
(anomaly.geometry): length, mean and max width, in pixels and in mm where the image's scale is known.

Box AP ranks by the detector's score (`confidence.detection`, and a structure's `confidence`); mask AP by the
defect's `confidence.combined` (detection and SAM's predicted IoU). Only what the service answers counts: defects
past MAX_DETECTIONS in one frame are not segmented, hence not in its answer.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass

import numpy as np

MATCH_IOU = 0.5
GEOMETRY = (("length", "length_pixels"), ("width", "width_pixels"), ("max_width", "max_width_pixels"))


@dataclass
class Prediction:
    image_id: int
    name: str  # the class the service named
    box: tuple[float, float, float, float]  # x, y, w, h in pixels
    score: float  # the detector's
    mask_score: float | None = None  # a defect's combined confidence
    rle: dict | None = None  # a defect's mask (COCO RLE of the full image)
    geometry: dict | None = None


def predictions_from(image_id: int, response: dict) -> list[Prediction]:
    """A response's defects and structures as predictions."""
    out = []
    for a in response.get("anomalies", []):
        b = a["bbox"]
        box = (b["x_min"], b["y_min"], b["x_max"] - b["x_min"], b["y_max"] - b["y_min"])
        c = a["confidence"]
        out.append(Prediction(image_id, a["defect_type"], box, c["detection"], c["combined"], a.get("mask"),
                              a.get("geometry")))  # fmt: skip
    for s in response.get("structures", []):
        b = s["bbox"]
        box = (b["x_min"], b["y_min"], b["x_max"] - b["x_min"], b["y_max"] - b["y_min"])
        out.append(Prediction(image_id, s["structure_type"], box, s["confidence"]))
    return out


def _coco(gt: dict):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {"images": gt["images"], "annotations": gt["annotations"], "categories": gt["categories"],
                    "info": {}, "licenses": []}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_ap(gt: dict, results: list[dict], iou_type: str) -> dict:
    """COCOeval over `results` (COCO's result format) -> AP@[.5:.95], AP50 and both per category name (None
    for a category with no truth). Every result is kept (maxDets 100 per image, COCO's default)."""
    from pycocotools.cocoeval import COCOeval

    names = {c["id"]: c["name"] for c in gt["categories"]}
    if not results or not gt["annotations"]:
        return {"ap": 0.0 if gt["annotations"] else None, "ap50": 0.0 if gt["annotations"] else None,
                "per_class": {n: {"ap": None, "ap50": None} for n in names.values()}, "pr_curves": {}}  # fmt: skip
    coco = _coco(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        found = coco.loadRes(results)
        evaluation = COCOeval(coco, found, iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    precision = evaluation.eval["precision"]  # [IoU threshold, recall, category, area, max detections]
    per_class, curves = {}, {}
    for k, category in enumerate(evaluation.params.catIds):
        p = precision[:, :, k, 0, -1]
        valid, valid50 = p[p > -1], p[0][p[0] > -1]
        per_class[names[category]] = {
            "ap": round(float(valid.mean()), 4) if valid.size else None,
            "ap50": round(float(valid50.mean()), 4) if valid50.size else None,
        }
        if valid50.size:  # precision at 101 recall points, IoU 0.5
            curves[names[category]] = [round(float(v), 4) if v > -1 else None for v in p[0]]
    ap, ap50 = float(evaluation.stats[0]), float(evaluation.stats[1])
    return {"ap": round(ap, 4) if ap > -1 else None, "ap50": round(ap50, 4) if ap50 > -1 else None,
            "per_class": per_class, "pr_curves": curves}  # fmt: skip


def box_iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = min(ax + aw, bx + bw) - max(ax, bx)
    h = min(ay + ah, by + bh) - max(ay, by)
    inter = max(w, 0) * max(h, 0)
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def match(truths: list[dict], predictions: list[Prediction]) -> list[tuple[int, int]]:
    """Greedy one-to-one matching of one image's predictions (best score first) to its truths of the same class
    (category names under `name`) by box IoU >= MATCH_IOU -> (truth index, prediction index) pairs."""
    pairs, taken = [], set()
    for j in sorted(range(len(predictions)), key=lambda j: -predictions[j].score):
        best, best_iou = None, MATCH_IOU
        for i, truth in enumerate(truths):
            if i in taken or truth["name"] != predictions[j].name:
                continue
            iou = box_iou(truth["bbox"], predictions[j].box)
            if iou >= best_iou:
                best, best_iou = i, iou
        if best is not None:
            taken.add(best)
            pairs.append((best, j))
    return pairs


def truth_geometry(annotation: dict, image: dict) -> dict | None:
    """The service's geometry (anomaly.geometry.measure) of a true mask, None without one."""
    from anomaly.geometry import measure
    from anomaly.masks import box_crop, rle_to_mask

    segmentation = annotation.get("segmentation")
    if not segmentation:
        return None
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str):
        mask = rle_to_mask(segmentation)
    else:
        from pycocotools import mask as coco_mask

        h, w = image["height"], image["width"]
        rle = coco_mask.frPyObjects(segmentation, h, w)
        mask = coco_mask.decode(coco_mask.merge(rle) if isinstance(rle, list) else rle).astype(bool)
    if not mask.any():
        return None
    return measure(box_crop(mask)[0])


def _errors(pairs: list[tuple[dict, dict, float | None]]) -> dict:
    """Geometry errors of matched (truth, served, mm per pixel) -> per quantity: count, median and 90th percentile
    of the absolute error in px (and mm where scales are known), median signed relative error in %."""
    out = {}
    for name, key in GEOMETRY:
        rows = [(t[key], s[key], mm) for t, s, mm in pairs if t.get(key) and s and s.get(key) is not None]
        if not rows:
            continue
        truth, served = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
        error = served - truth
        entry = {
            "n": len(rows),
            "median_abs_px": round(float(np.median(np.abs(error))), 3),
            "p90_abs_px": round(float(np.percentile(np.abs(error), 90)), 3),
            "median_rel_pct": round(float(np.median(error / truth) * 100), 2),
            "median_truth_px": round(float(np.median(truth)), 3),
        }
        scaled = [(s - t) * mm for t, s, mm in rows if mm]
        if scaled:
            entry |= {"median_abs_mm": round(float(np.median(np.abs(scaled))), 4),
                      "p90_abs_mm": round(float(np.percentile(np.abs(scaled), 90)), 4)}  # fmt: skip
        out[name] = entry
    return out


def evaluate(gt: dict, responses: dict[int, dict], threshold: float, structures: set[str],
             mm_per_pixel: float | None = None) -> dict:  # fmt: skip
    """The report (module docstring) of the service's `responses` (by image id) on the truth `gt` (a COCO dict
    whose images may carry `mm_per_pixel`; `mm_per_pixel` applies to those that do not). Classes in `structures`
    are structures: boxes only, no masks, no geometry."""
    names = {c["id"]: c["name"] for c in gt["categories"]}
    ids = {n: i for i, n in names.items()}
    predictions = {i: predictions_from(i, r) for i, r in responses.items()}
    everything = [p for found in predictions.values() for p in found]
    unknown = sorted({p.name for p in everything} - set(ids))
    known = [p for p in everything if p.name in ids]
    box_results = [{"image_id": p.image_id, "category_id": ids[p.name], "bbox": list(p.box), "score": p.score}
                   for p in known]  # fmt: skip
    box = coco_ap(gt, box_results, "bbox")
    with_masks = [a for a in gt["annotations"] if a.get("segmentation") and names[a["category_id"]] not in structures]
    mask = None
    if with_masks:
        mask_gt = dict(gt, annotations=with_masks)
        masked = {names[a["category_id"]] for a in with_masks}
        mask_gt["categories"] = [c for c in gt["categories"] if c["name"] in masked]
        mask_results = [{"image_id": p.image_id, "category_id": ids[p.name], "segmentation": p.rle,
                         "score": p.mask_score} for p in known if p.rle and p.name in masked]  # fmt: skip
        mask = coco_ap(mask_gt, mask_results, "segm")

    images = {i["id"]: i for i in gt["images"]}
    truths_by_image: dict[int, list[dict]] = {i: [] for i in images}
    for a in gt["annotations"]:
        truths_by_image[a["image_id"]].append(a | {"name": names[a["category_id"]]})
    counts = {n: {"truths": 0, "predicted": 0, "matched": 0} for n in names.values()}
    geometry_pairs: dict[str, list] = {}
    frames = []
    for image_id, image in images.items():
        truths = truths_by_image[image_id]
        served = [p for p in predictions.get(image_id, []) if p.name in ids and p.score >= threshold]
        pairs = match(truths, served)
        for t in truths:
            counts[t["name"]]["truths"] += 1
        for p in served:
            counts[p.name]["predicted"] += 1
        scale = image.get("mm_per_pixel") or mm_per_pixel
        for i, j in pairs:
            counts[truths[i]["name"]]["matched"] += 1
            if truths[i]["name"] not in structures and served[j].geometry:
                true_geometry = truth_geometry(truths[i], image)
                if true_geometry:
                    geometry_pairs.setdefault(truths[i]["name"], []).append((true_geometry, served[j].geometry, scale))
        misses, false_alarms = len(truths) - len(pairs), len(served) - len(pairs)
        frames.append({"image_id": image_id, "file_name": image.get("file_name", ""), "truths": len(truths),
                       "matched": len(pairs), "misses": misses, "false_alarms": false_alarms,
                       "answered": image_id in responses})  # fmt: skip
    per_class = {}
    for name in names.values():
        c = counts[name]
        per_class[name] = {
            "role": "structure" if name in structures else "defect",
            "box_ap": box["per_class"].get(name, {}).get("ap"),
            "box_ap50": box["per_class"].get(name, {}).get("ap50"),
            "mask_ap": (mask["per_class"].get(name, {}).get("ap") if mask else None),
            "truths": c["truths"],
            "predicted": c["predicted"],
            "matched": c["matched"],
            "misses": c["truths"] - c["matched"],
            "false_alarms": c["predicted"] - c["matched"],
            "geometry": _errors(geometry_pairs.get(name, [])),
        }
    total = {k: sum(c[k] for c in counts.values()) for k in ("truths", "predicted", "matched")}
    return {
        "box": {"ap": box["ap"], "ap50": box["ap50"]},
        "mask": {"ap": mask["ap"], "ap50": mask["ap50"]} if mask else {"ap": None, "ap50": None},
        "per_class": per_class,
        "at_threshold": {
            "threshold": threshold,
            "truths": total["truths"],
            "predicted": total["predicted"],
            "matched": total["matched"],
            "misses": total["truths"] - total["matched"],
            "false_alarms": total["predicted"] - total["matched"],
            "precision": _ratio(total["matched"], total["predicted"]),
            "recall": _ratio(total["matched"], total["truths"]),
        },
        "geometry": _errors([pair for pairs in geometry_pairs.values() for pair in pairs]),
        "pr_curves": {"box_iou_0.5": box["pr_curves"], "mask_iou_0.5": mask["pr_curves"] if mask else {}},
        "unknown_classes": unknown,
        "frames": frames,
    }


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def worst_frames(report: dict, count: int = 6) -> list[dict]:
    """The frames with the most misses and false alarms (misses first), those with any."""
    bad = [f for f in report["frames"] if f["misses"] or f["false_alarms"] or not f["answered"]]
    return sorted(bad, key=lambda f: (not f["answered"], f["misses"], f["false_alarms"]), reverse=True)[:count]


def finite(value) -> bool:
    return value is not None and math.isfinite(value)
