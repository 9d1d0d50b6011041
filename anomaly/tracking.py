"""One defect, one record: the defects of a video or an ordered sequence of frames followed from frame to frame
(docs/campaigns.md, "Videos and sequences").

The tracking itself is roboflow's `trackers` library: BoT-SORT (the default: camera motion compensated from the
frames themselves, as a drone or a scanner moves) or ByteTrack (`TRACKER`). Each defect type has a tracker of its
own, so a crack is never continued by the spalling beside it; track ids are unique across types. Every served
defect may start a track (the service's threshold already chose them); a track lost for up to `lost_s` seconds is
picked up again (an occlusion, a missed detection). What a track is (first and last frame, best frame, the largest
and median length and width) is `summarise`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import numpy as np

TRACKERS = ("botsort", "bytetrack")
LIB_FPS = 30.0  # trackers counts its lost-track buffer in frames at 30 frames/s


def _new_tracker(kind: str, lost_s: float, fps: float):
    import trackers

    common = {
        "lost_track_buffer": max(1, round(lost_s * LIB_FPS)),  # lost_s at any frame_rate
        "frame_rate": fps,
        "track_activation_threshold": 0.0,  # the service's threshold decided what is a defect
        "minimum_consecutive_frames": 1,  # a defect seen once is a track; --min-frames drops flicker later
        "high_conf_det_threshold": 0.0,
    }
    if kind == "bytetrack":
        return trackers.ByteTrackTracker(**common, minimum_iou_threshold=0.1)
    if kind == "botsort":
        return trackers.BoTSORTTracker(
            **common,
            enable_cmc=True,
            cmc_method="sparseOptFlow",
            minimum_iou_threshold_first_assoc=0.1,
            minimum_iou_threshold_second_assoc=0.3,
            minimum_iou_threshold_unconfirmed_assoc=0.1,
        )
    raise ValueError(f"tracker {kind!r} is not one of {', '.join(TRACKERS)}")


class DefectTracker:
    """update(boxes, scores, types, at_s, frame) -> a track id per defect (or -1), frame after frame, in time order.
    The library gives a new track its id at its second frame; `track_sequence` gives the first frame that id too.
    Ids start at `first_id` (a campaign's sequences share one numbering)."""

    def __init__(self, kind: str = "botsort", lost_s: float = 5.0, first_id: int = 1, fps: float = 1.0):
        if kind not in TRACKERS:
            raise ValueError(f"tracker {kind!r} is not one of {', '.join(TRACKERS)}")
        self.kind, self.lost_s, self.first_id, self.fps = kind, lost_s, first_id, fps
        self._by_type: dict[str, object] = {}
        self._ids: dict[tuple[str, int], int] = {}  # (type, the library's id) -> ours
        self._given = 0
        self.new_ids: set[int] = set()  # ids the last update gave out for the first time

    def new_id(self) -> int:
        self._given += 1
        return self.first_id + self._given - 1

    def update(self, boxes, scores, types: list[str], at_s: float, frame: np.ndarray | None = None) -> list[int]:
        """boxes (N, 4) xyxy, scores (N,), each defect's type, the frame's time in seconds and (BoT-SORT) its BGR
        pixels. Every type's tracker sees every frame (an empty one too: its tracks age)."""
        import supervision as sv

        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        scores = np.asarray(scores, np.float32).reshape(-1)
        ids = [-1] * len(types)
        self.new_ids = set()
        for kind in sorted(set(types) | set(self._by_type)):
            tracker = self._by_type.get(kind)
            if tracker is None:
                tracker = self._by_type[kind] = _new_tracker(self.kind, self.lost_s, self.fps)
            mine = np.array([i for i, t in enumerate(types) if t == kind], int)
            detections = sv.Detections(xyxy=boxes[mine], confidence=scores[mine], data={"index": mine})
            extra = {"frame": frame} if self.kind == "botsort" else {}
            tracked = tracker.update(detections, timestamp=at_s, **extra)
            for index, library_id in zip(tracked.data.get("index", []), tracked.tracker_id):
                if library_id < 0:
                    continue
                if (kind, int(library_id)) not in self._ids:
                    self._ids[(kind, int(library_id))] = self.new_id()
                    self.new_ids.add(self._ids[(kind, int(library_id))])
                ids[int(index)] = self._ids[(kind, int(library_id))]
        return ids


@dataclass
class SequenceFrame:
    """What the tracker needs of one frame: its defects' boxes, scores and types, its time, its pixels (a callable
    that reads them, BGR, for BoT-SORT's camera motion; None for ByteTrack)."""

    boxes: list
    scores: list
    types: list[str]
    at_s: float
    pixels: object = None


def track_sequence(frames: list[SequenceFrame], kind: str = "botsort", lost_s: float = 5.0,
                   first_id: int = 1) -> list[list[int]]:  # fmt: skip
    """A track id for every defect of every frame (frames in time order). A defect the library only starts a track
    on gets that track's id when the next frame confirms it (the same type, the largest overlap with the box that
    got the new id); one never confirmed is a track of its own, seen once."""
    gaps = np.diff([f.at_s for f in frames])
    fps = 1.0 / float(np.median(gaps[gaps > 0])) if (gaps > 0).any() else 1.0  # the frames' usual rate
    tracker = DefectTracker(kind, lost_s, first_id, fps)
    result: list[list[int]] = []
    for t, frame in enumerate(frames):
        pixels = frame.pixels() if (kind == "botsort" and frame.pixels is not None) else None
        ids = tracker.update(frame.boxes, frame.scores, frame.types, frame.at_s, pixels)
        if t > 0:
            _confirm_previous(frames[t - 1], result[t - 1], frame, ids, tracker.new_ids)
            result[t - 1] = [i if i >= 0 else tracker.new_id() for i in result[t - 1]]
        result.append(ids)
    if result:
        result[-1] = [i if i >= 0 else tracker.new_id() for i in result[-1]]
    return result


def _confirm_previous(before: SequenceFrame, before_ids: list[int], now: SequenceFrame, now_ids: list[int],
                      new_ids: set[int]) -> None:  # fmt: skip
    for j, track_id in enumerate(now_ids):
        if track_id not in new_ids:
            continue
        candidates = [i for i, k in enumerate(before_ids) if k < 0 and before.types[i] == now.types[j]]
        overlaps = [box_iou(before.boxes[i], now.boxes[j]) for i in candidates]
        if overlaps and max(overlaps) > 0.1:
            before_ids[candidates[int(np.argmax(overlaps))]] = track_id


def box_iou(a, b) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Track:
    """One defect through the frames it was seen in."""

    track_id: int
    defect_type: str
    sequence: str  # the video or the sequence's folder
    seen: list[dict] = field(default_factory=list)  # {frame_id, at_s, anomaly}, in time order

    @property
    def best(self) -> dict:
        """Where it was seen best: the frame of its highest combined confidence ({frame_id, at_s, anomaly})."""
        return max(self.seen, key=lambda s: s["anomaly"]["confidence"]["combined"])

    def row(self) -> dict:
        """tracks.csv's row: when and where it was seen, its best frame, its largest and median measures."""
        best = self.best
        row = {
            "track_id": self.track_id,
            "defect_type": self.defect_type,
            "sequence": self.sequence,
            "first_frame": self.seen[0]["frame_id"],
            "last_frame": self.seen[-1]["frame_id"],
            "first_s": self.seen[0]["at_s"],
            "last_s": self.seen[-1]["at_s"],
            "frames_seen": len(self.seen),
            "best_frame": best["frame_id"],
            "best_confidence": best["anomaly"]["confidence"]["combined"],
            **{f"best_{k}": v for k, v in best["anomaly"]["bbox"].items()},
        }
        for measure in ("length_pixels", "max_width_pixels", "length_mm", "max_width_mm"):
            values = [s["anomaly"]["geometry"][measure] for s in self.seen if measure in s["anomaly"]["geometry"]]
            row[f"largest_{measure}"] = round(max(values), 3) if values else ""
            row[f"median_{measure}"] = round(statistics.median(values), 3) if values else ""
        return row


TRACK_FIELDS = (
    "track_id", "defect_type", "sequence", "first_frame", "last_frame", "first_s", "last_s", "frames_seen",
    "best_frame", "best_confidence", "best_x_min", "best_y_min", "best_x_max", "best_y_max",
    "largest_length_pixels", "median_length_pixels", "largest_max_width_pixels", "median_max_width_pixels",
    "largest_length_mm", "median_length_mm", "largest_max_width_mm", "median_max_width_mm",
)  # fmt: skip


def summarise(records: list[dict]) -> list[Track]:
    """The tracks of a campaign's records (results.jsonl lines whose anomalies carry a track_id), by id."""
    tracks: dict[int, Track] = {}
    for record in sorted(records, key=lambda r: (r.get("sequence", ""), r.get("at_s", 0.0))):
        for anomaly in record["anomalies"]:
            track_id = anomaly.get("track_id")
            if track_id is None:
                continue
            track = tracks.setdefault(track_id, Track(track_id, anomaly["defect_type"], record.get("sequence", "")))
            track.seen.append({"frame_id": record["frame_id"], "at_s": record.get("at_s", 0.0), "anomaly": anomaly})
    return [tracks[k] for k in sorted(tracks)]
