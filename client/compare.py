"""`anomaly compare BEFORE_DIR AFTER_DIR --out DIR [--pairs FILE]`: two campaigns of the same asset, defect by
defect (anomaly.change): DIR/changes.csv, one row per defect with its status (new, grown, unchanged, gone) and the
change of its length and width (px in the before-photo, mm where both campaigns know the scale), and
DIR/changes.html, each defect's before and after side by side.

Frames are paired by frame_id (the same photo positions), or by a pairs file: CSV lines `before_frame_id,
after_frame_id`. A frame whose photo cannot be read is reported and the rest compared.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import sys
from pathlib import Path

import cv2
import numpy as np

from anomaly.change import Defect, change, match, register
from anomaly.errors import InputError
from client.campaign import RESULTS

CHANGES_CSV, CHANGES_HTML = "changes.csv", "changes.html"
CHANGE_FIELDS = (
    "status", "defect_type", "before_frame", "after_frame", "before_anomaly_id", "after_anomaly_id", "overlap",
    "before_length_px", "after_length_px", "length_change_px", "before_max_width_px", "after_max_width_px",
    "max_width_change_px", "length_change_mm", "max_width_change_mm", "registration",
)  # fmt: skip


def read_campaign(folder: Path) -> dict[str, dict]:
    """frame_id -> record of a campaign folder; InputError when it is not one."""
    path = Path(folder) / RESULTS
    if not path.is_file():
        raise InputError(str(folder), f"is not a campaign folder (no {RESULTS}; `anomaly detect PATH... --out DIR`)")
    records = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            records[record["frame_id"]] = record
        except (ValueError, KeyError):
            continue
    return records


def frame_pairs(before: dict, after: dict, pairs_file: Path | None, names: tuple[str, str]) -> list[tuple[str, str]]:
    if pairs_file is not None:
        with open(pairs_file, newline="") as handle:
            pairs = [tuple(row[:2]) for row in csv.reader(handle) if row and not row[0].startswith("#")]
        missing = [f"{b} (before)" for b, _ in pairs if b not in before] + [
            f"{a} (after)" for _, a in pairs if a not in after
        ]
        if missing:
            raise InputError(str(pairs_file), f"names frames the campaigns do not hold: {', '.join(missing[:5])}")
    else:
        pairs = [(f, f) for f in sorted(set(before) & set(after))]
    if not pairs:
        raise InputError(f"{names[0]}, {names[1]}", "have no frame_id in common: pair their frames with --pairs FILE")
    return pairs


def defects_of(record: dict) -> list[Defect]:
    from anomaly.masks import rle_to_mask

    h, w = record["image_size"]["height"], record["image_size"]["width"]
    found = []
    for anomaly in record["anomalies"]:
        if "mask" in anomaly:
            mask = rle_to_mask(anomaly["mask"]).astype(bool)
        else:  # a campaign without masks: the box stands for the defect
            mask = np.zeros((h, w), bool)
            b = anomaly["bbox"]
            mask[b["y_min"] : b["y_max"], b["x_min"] : b["x_max"]] = True
        found.append(Defect(anomaly, mask))
    return found


def compare_campaigns(before_dir: Path, after_dir: Path, out: Path, pairs_file: Path | None = None) -> dict:
    """changes.csv and changes.html in `out`; -> counts by status and the frames that could not be compared."""
    before, after = read_campaign(before_dir), read_campaign(after_dir)
    pairs = frame_pairs(before, after, pairs_file, (str(before_dir), str(after_dir)))
    out.mkdir(parents=True, exist_ok=True)
    rows, sections, failed = [], [], []
    for before_id, after_id in pairs:
        b_rec, a_rec = before[before_id], after[after_id]
        b_img, a_img = cv2.imread(b_rec.get("source", "")), cv2.imread(a_rec.get("source", ""))
        if b_img is None or a_img is None:
            which = b_rec.get("source") if b_img is None else a_rec.get("source")
            failed.append(before_id)
            print(f"{before_id}: {which}: the photo cannot be read; frame not compared", file=sys.stderr)
            continue
        registration = register(b_img, a_img)
        b_def, a_def = defects_of(b_rec), defects_of(a_rec)
        matched, gone, new = match(b_def, a_def, registration, b_img.shape[:2])
        found = [(b_def[i], a_def[j], iou) for i, j, iou in matched]
        found += [(b_def[i], None, 0.0) for i in gone] + [(None, a_def[j], 0.0) for j in new]
        frame_rows = []
        for b, a, iou in found:
            row = _row(b, a, iou, registration, b_rec, a_rec, before_id, after_id)
            frame_rows.append((row, b, a))
            rows.append(row)
        sections.append(_section(before_id, after_id, registration, frame_rows, b_img, a_img))
    with open(out / CHANGES_CSV, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CHANGE_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    (out / CHANGES_HTML).write_text(_page(before_dir, after_dir, rows, sections, failed))
    counts = {status: sum(1 for r in rows if r["status"] == status) for status in ("new", "grown", "unchanged", "gone")}
    return counts | {"frames": len(pairs) - len(failed), "failed": failed}


def _row(b, a, iou, registration, b_rec, a_rec, before_id, after_id) -> dict:
    anomaly = (b or a).anomaly
    result = change(b.anomaly if b else None, a.anomaly if a else None, registration.scale)
    row = dict.fromkeys(CHANGE_FIELDS, "")
    row |= {"status": result["status"], "defect_type": anomaly["defect_type"], "before_frame": before_id,
            "after_frame": after_id, "overlap": round(iou, 3), "registration": registration.describe()}  # fmt: skip
    if b:
        g = b.anomaly["geometry"]
        row |= {"before_anomaly_id": b.anomaly["anomaly_id"], "before_length_px": g["length_pixels"],
                "before_max_width_px": g["max_width_pixels"]}  # fmt: skip
    if a:
        g = a.anomaly["geometry"]
        row |= {"after_anomaly_id": a.anomaly["anomaly_id"],
                "after_length_px": round(g["length_pixels"] * registration.scale, 2),
                "after_max_width_px": round(g["max_width_pixels"] * registration.scale, 2)}  # fmt: skip
    if b and a:
        row |= {k: result[k] for k in ("length_change_px", "max_width_change_px")}
        scale = b_rec.get("mm_per_pixel")
        if scale and a_rec.get("mm_per_pixel"):  # both campaigns know their scale: the change in mm too
            row["length_change_mm"] = round(result["length_change_px"] * scale, 3)
            row["max_width_change_mm"] = round(result["max_width_change_px"] * scale, 3)
    return row


def _box(anomaly: dict) -> np.ndarray:
    b = anomaly["bbox"]
    return np.array([[b["x_min"], b["y_min"]], [b["x_max"], b["y_max"]]], np.float64)


def _mapped(corners: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    points = np.c_[corners, np.ones(len(corners))] @ matrix.T
    return np.array([points.min(axis=0), points.max(axis=0)])


def _crop_uri(img: np.ndarray, box: np.ndarray, size: int = 180) -> str:
    (x0, y0), (x1, y1) = box
    margin = max(x1 - x0, y1 - y0) * 0.4 + 10
    h, w = img.shape[:2]
    x0, y0 = int(max(0, x0 - margin)), int(max(0, y0 - margin))
    x1, y1 = int(min(w, x1 + margin)), int(min(h, y1 + margin))
    crop = img[y0:y1, x0:x1] if x1 > x0 and y1 > y0 else img
    scale = size / max(crop.shape[:2])
    crop = cv2.resize(crop, (max(1, int(crop.shape[1] * scale)), max(1, int(crop.shape[0] * scale))))
    ok, jpeg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return "data:image/jpeg;base64," + base64.b64encode(jpeg.tobytes()).decode()


def _section(before_id, after_id, registration, frame_rows, b_img, a_img) -> str:
    """One frame's defects, the same spot of both photos side by side (a new defect's spot found in the before-
    photo through the registration, a gone one's in the after-photo)."""
    inverse = cv2.invertAffineTransform(registration.matrix)
    cells = []
    for row, b, a in frame_rows:
        b_box = _box(b.anomaly) if b else _mapped(_box(a.anomaly), registration.matrix)
        a_box = _box(a.anomaly) if a else _mapped(_box(b.anomaly), inverse)
        change_text = (f"length {row['length_change_px'] + 0.0:+} px, width {row['max_width_change_px'] + 0.0:+} px"
                       if row["length_change_px"] != "" else "")  # fmt: skip
        cells.append(
            f'<tr class="{row["status"]}"><td>{row["status"]}</td><td>{html.escape(row["defect_type"])}</td>'
            f"<td>{change_text}</td><td><img src='{_crop_uri(b_img, b_box)}' alt='before'></td>"
            f"<td><img src='{_crop_uri(a_img, a_box)}' alt='after'></td></tr>"
        )
    title = html.escape(before_id if before_id == after_id else f"{before_id} / {after_id}")
    return (f"<h2>{title}</h2><p class='registration'>{html.escape(registration.describe())}</p>"
            f"<table><tr><th>status</th><th>defect</th><th>change</th><th>before</th><th>after</th></tr>"
            f"{''.join(cells)}</table>")  # fmt: skip


def _page(before_dir, after_dir, rows, sections, failed) -> str:
    counts = ", ".join(f"{sum(1 for r in rows if r['status'] == s)} {s}" for s in ("new", "grown", "unchanged", "gone"))
    style = ("body{font-family:system-ui,sans-serif;margin:2em} td,th{border:1px solid #ccc;padding:4px}"
             "table{border-collapse:collapse} tr.new td:first-child{background:#fcc} "
             "tr.grown td:first-child{background:#fd9} tr.gone td:first-child{background:#cdf}")  # fmt: skip
    failed_text = (
        f"<p class='failed'>Not compared (photo unreadable): {html.escape(', '.join(failed))}</p>" if failed else ""
    )
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Changes</title><style>{style}</style></head>"
            f"<body><h1>Changes between inspections</h1><p class='summary'>{html.escape(str(before_dir))} -> "
            f"{html.escape(str(after_dir))}: {counts}</p>{failed_text}{''.join(sections)}</body></html>")  # fmt: skip
