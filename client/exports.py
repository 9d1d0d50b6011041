"""What a campaign exports from its record (results.jsonl, one response a line): one writer per format, picked
by name (`anomaly detect ... --out DIR --exports coco,csv`). A new format is one function and one WRITERS entry.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path


def write_coco(responses: list[dict], path: Path) -> None:
    path.write_text(json.dumps(coco(responses)) + "\n")


def write_csv(responses: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in defect_rows(responses):
            writer.writerow(row)


# name -> (file written into the campaign's folder, writer)
WRITERS: dict[str, tuple[str, Callable[[list[dict], Path], None]]] = {
    "coco": ("coco.json", write_coco),
    "csv": ("defects.csv", write_csv),
}
EXPORT_NAMES = tuple(WRITERS)


def write_exports(out: Path, responses: list[dict], names: tuple[str, ...] = EXPORT_NAMES) -> list[Path]:
    """The named exports of a campaign's responses (the whole campaign: this run's frames and earlier ones)."""
    written = []
    for name in names:
        file, write = WRITERS[name]
        write(responses, out / file)
        written.append(out / file)
    return written


CSV_FIELDS = (
    "frame_id", "source", "anomaly_id", "track_id", "defect_type", "structure_type", "confidence", "x_min", "y_min",
    "x_max", "y_max", "area_pixels", "length_pixels", "width_pixels", "max_width_pixels", "orientation_degrees",
    "width_method", "width_uncertainty_pixels", "mm_per_pixel", "area_mm2", "length_mm", "width_mm", "max_width_mm",
    "width_uncertainty_mm", "severity", "untrained_weights",
)  # fmt: skip


def defect_rows(responses: list[dict]) -> Iterator[dict]:
    """One CSV row per defect: where, what, on which structure, its measures (mm where the scale is known)."""
    for response in responses:
        for a in response["anomalies"]:
            g = a["geometry"]
            yield {
                "frame_id": response["frame_id"],
                "source": response.get("source", ""),
                "anomaly_id": a["anomaly_id"],
                "track_id": a.get("track_id") or "",
                "defect_type": a["defect_type"],
                "structure_type": a["structure_type"],
                "confidence": a["confidence"]["combined"],
                **{k: a["bbox"][k] for k in ("x_min", "y_min", "x_max", "y_max")},
                **{
                    k: g.get(k, "")
                    for k in CSV_FIELDS
                    if k in g or k.endswith(("_mm", "_mm2")) or k.startswith("width_")
                },
                "mm_per_pixel": response.get("mm_per_pixel", ""),
                "severity": a.get("severity", ""),
                "untrained_weights": response.get("untrained_weights", False),
            }


def coco(responses: list[dict]) -> dict:
    """COCO instances, as pycocotools, rfdetr's loader and labelling tools (CVAT, Label Studio) read them: one
    image per frame (`file_name` its frame_id, `source` the file its pixels came from), one category per defect
    and structure type (supercategory `defect` or `structure`), one annotation per defect with its RLE segmentation
    (full image, as the service returns it), bbox [x, y, w, h] and mask area, one per structure with its box; the
    geometry, severity, structure and confidences go under `attributes` (FiftyOne reads them as fields). Reviewed
    in a labelling tool and exported again, it trains (`anomaly split`, then `anomaly train`)."""
    from anomaly.masks import rle_to_mask

    categories: dict[tuple[str, str], int] = {}
    images, annotations = [], []

    def add(image_id: int, name: str, kind: str, bbox: dict, score: float, attributes: dict) -> dict:
        category = categories.setdefault((name, kind), len(categories) + 1)
        box = [bbox["x_min"], bbox["y_min"], bbox["x_max"] - bbox["x_min"], bbox["y_max"] - bbox["y_min"]]
        entry = {"id": len(annotations) + 1, "image_id": image_id, "category_id": category, "bbox": box,
                 "area": box[2] * box[3], "iscrowd": 0, "score": score, "attributes": attributes}  # fmt: skip
        annotations.append(entry)
        return entry

    for image_id, response in enumerate(responses, start=1):
        size = response["image_size"]
        images.append({"id": image_id, "file_name": response["frame_id"], "width": size["width"],
                       "height": size["height"], "source": response.get("source", "")})  # fmt: skip
        for s in response.get("structures", []):
            add(image_id, s["structure_type"], "structure", s["bbox"], s["confidence"],
                {"structure_id": s["structure_id"]})  # fmt: skip
        for a in response["anomalies"]:
            attributes = {"anomaly_id": a["anomaly_id"], "structure_type": a["structure_type"],
                          "confidence": a["confidence"], "severity": a.get("severity"), **a["geometry"]}  # fmt: skip
            if "track_id" in a:  # a video's or a sequence's defect: the track it belongs to (client.tracks)
                attributes["track_id"] = a["track_id"]
            entry = add(image_id, a["defect_type"], "defect", a["bbox"], a["confidence"]["combined"], attributes)
            if "mask" in a:
                entry["segmentation"] = a["mask"]
                entry["area"] = int(rle_to_mask(a["mask"]).sum())
            else:
                entry["area"] = a["geometry"]["area_pixels"]
    return {
        "info": {"description": "Infrastructure defects (anomaly-inspection)", "untrained_weights":
                 any(r.get("untrained_weights") for r in responses)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name, "supercategory": kind} for (name, kind), i in categories.items()],
    }  # fmt: skip
