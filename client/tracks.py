"""A campaign's videos and sequences as tracked defects (anomaly.tracking): each defect of their frames gets a
`track_id` in results.jsonl, and DIR/tracks.csv has one row per tracked defect. Run over the whole record at the
end of every campaign run, so a resumed campaign is tracked as if it had run at once.

A frame belongs to a sequence when its record says so (`sequence`, `at_s`: a video's frames, or the images of a
folder given with --sequence). A sequence frame whose size differs from the sequence's first is left out of the
tracks and reported in errors.jsonl; its defects stay in the record without a track id.
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from pathlib import Path

from anomaly.tracking import TRACK_FIELDS, SequenceFrame, Track, summarise, track_sequence

TRACKS = "tracks.csv"


def track_campaign(out: Path, records: list[dict], *, report_error, kind: str | None = None,
                   lost_s: float | None = None, min_frames: int = 1) -> list[Track]:  # fmt: skip
    """Track ids into `records` (in place) and tracks.csv; results.jsonl rewritten with them. Tracks seen in fewer
    than `min_frames` frames (flicker) are dropped: their defects keep `track_id` null. `kind` and `lost_s`: the
    TRACKER and TRACK_LOST_S settings unless given. -> the tracks kept."""
    from anomaly.config import settings

    kind, lost_s = kind or settings().tracker, lost_s or settings().track_lost_s
    sequences: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        for anomaly in record["anomalies"]:
            anomaly.pop("track_id", None)
        if record.get("sequence"):
            sequences[record["sequence"]].append(record)
    next_id = 1
    for name in sorted(sequences):
        frames = sorted(sequences[name], key=lambda r: r["at_s"])
        size = frames[0]["image_size"]
        usable = []
        for record in frames:
            if record["image_size"] != size:
                now = f"{record['image_size']['width']} x {record['image_size']['height']}"
                first = f"{size['width']} x {size['height']}"
                report_error(record, f"is {now}, the sequence's first frame {first}: left out of its tracks")
                continue
            usable.append(record)
        ids = track_sequence([_frame(r) for r in usable], kind, lost_s, next_id)
        for record, frame_ids in zip(usable, ids):
            for anomaly, track_id in zip(record["anomalies"], frame_ids):
                anomaly["track_id"] = track_id
        next_id = max([next_id - 1, *(i for frame_ids in ids for i in frame_ids)]) + 1
    tracks = summarise(records)
    short = {t.track_id for t in tracks if len(t.seen) < min_frames}
    for record in records:
        for anomaly in record["anomalies"]:
            if anomaly.get("track_id") in short:
                anomaly["track_id"] = None
    kept = [t for t in tracks if t.track_id not in short]
    _rewrite_results(out, records)
    if sequences:
        with open(out / TRACKS, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=TRACK_FIELDS)
            writer.writeheader()
            writer.writerows(t.row() for t in kept)
    return kept


def _frame(record: dict) -> SequenceFrame:
    anomalies = record["anomalies"]
    boxes = [[a["bbox"][k] for k in ("x_min", "y_min", "x_max", "y_max")] for a in anomalies]
    scores = [a["confidence"]["combined"] for a in anomalies]
    return SequenceFrame(boxes, scores, [a["defect_type"] for a in anomalies], record["at_s"],
                         pixels=lambda: _read_bgr(record["source"]))  # fmt: skip


def _read_bgr(path: str):
    import cv2

    return cv2.imread(path, cv2.IMREAD_COLOR)


def _rewrite_results(out: Path, records: list[dict]) -> None:
    from client.campaign import RESULTS

    tmp = out / (RESULTS + ".tmp")
    with open(tmp, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    os.replace(tmp, out / RESULTS)  # a reader (or a stop) never sees half a record
