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
    "frame_id", "source", "anomaly_id", "defect_type", "structure_type", "confidence", "x_min", "y_min", "x_max",
    "y_max", "area_pixels", "length_pixels", "width_pixels", "max_width_pixels", "orientation_degrees",
    "mm_per_pixel", "area_mm2", "length_mm", "width_mm", "max_width_mm", "severity", "untrained_weights",
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
                "defect_type": a["defect_type"],
                "structure_type": a["structure_type"],
                "confidence": a["confidence"]["combined"],
                **{k: a["bbox"][k] for k in ("x_min", "y_min", "x_max", "y_max")},
                **{k: g.get(k, "") for k in CSV_FIELDS if k in g or k.endswith(("_mm", "_mm2"))},
                "mm_per_pixel": response.get("mm_per_pixel", ""),
                "severity": a.get("severity", ""),
                "untrained_weights": response.get("untrained_weights", False),
            }


def coco(responses: list[dict]) -> dict:
    """COCO instances: one image per frame, one category per defect type, one annotation per defect with its
    RLE segmentation (full-image, as the service returns it), bbox [x, y, w, h], mask area, and the geometry,
    severity, structure and confidences as `attributes` (FiftyOne reads them as fields)."""
    from anomaly.masks import rle_to_mask

    categories: dict[str, int] = {}
    images, annotations = [], []
    for image_id, response in enumerate(responses, start=1):
        size = response["image_size"]
        images.append({"id": image_id, "file_name": response["frame_id"], "width": size["width"],
                       "height": size["height"], "source": response.get("source", "")})  # fmt: skip
        for a in response["anomalies"]:
            category = categories.setdefault(a["defect_type"], len(categories) + 1)
            b = a["bbox"]
            entry = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category,
                "bbox": [b["x_min"], b["y_min"], b["x_max"] - b["x_min"], b["y_max"] - b["y_min"]],
                "iscrowd": 0,
                "score": a["confidence"]["combined"],
                "attributes": {
                    "anomaly_id": a["anomaly_id"],
                    "structure_type": a["structure_type"],
                    "confidence": a["confidence"],
                    "severity": a.get("severity"),
                    **a["geometry"],
                },
            }
            if "mask" in a:
                entry["segmentation"] = a["mask"]
                entry["area"] = int(rle_to_mask(a["mask"]).sum())
            else:
                entry["area"] = a["geometry"]["area_pixels"]
            annotations.append(entry)
    return {
        "info": {"description": "Infrastructure defects (anomaly-inspection)", "untrained_weights":
                 any(r.get("untrained_weights") for r in responses)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name, "supercategory": "defect"} for name, i in categories.items()],
    }  # fmt: skip
