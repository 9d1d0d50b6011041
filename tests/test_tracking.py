"""Tracking defects through videos and sequences (anomaly.tracking, client.tracks).

The tracker alone is measured on generated flights whose truth is known (anomaly.synthetic.flight: a camera panning
along a wall and zooming, defects entering and leaving, one behind a pole for three frames), fed the true boxes with
noise and missed detections, and scored with the standard multi-object-tracking measures of roboflow's `trackers`
(IDF1, ID switches) and by the tracks it counts against the true defects. End to end, a generated video and a
sequence go through the served ensemble; its detector is untrained here, so what it finds is not the truth: those
tests hold the campaign to its own detections (every one tracked, the tracks' rows consistent with them, flicker
dropped on request, errors named), not to the flight's defects."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from anomaly.synthetic import flight
from anomaly.tracking import SequenceFrame, box_iou, track_sequence
from client.cli import main as cli

FLIGHT_SEEDS = (0, 1, 2, 3)


def detections_of(frames, seed: int, miss: float = 0.1, jitter: float = 2.0) -> list[SequenceFrame]:
    """The true boxes as a detector would give them: each moved by a few pixels, one in ten missed."""
    rng = np.random.default_rng(100 + seed)
    seq = []
    for t, frame in enumerate(frames):
        kept = [(k, kind, box) for k, kind, box in frame.truth if rng.random() >= miss]
        boxes = [np.asarray(box) + rng.normal(0, jitter, 4) for _, _, box in kept]
        seq.append(SequenceFrame(boxes, [0.7] * len(kept), [kind for _, kind, _ in kept], float(t),
                                 pixels=lambda f=frame: f.bgr))  # fmt: skip
    return seq


def scores(frames, seq, ids) -> dict:
    from trackers.eval import compute_clear_metrics, compute_identity_metrics

    gt_ids = [np.array([k for k, _, _ in f.truth], int) for f in frames]
    tracker_ids = [np.array(i, int) for i in ids]
    similarity = [
        np.array([[box_iou(g, d) for d in s.boxes] for _, _, g in f.truth]).reshape(len(f.truth), len(s.boxes))
        for f, s in zip(frames, seq)
    ]
    identity = compute_identity_metrics(gt_ids, tracker_ids, similarity, 0.5)
    clear = compute_clear_metrics(gt_ids, tracker_ids, similarity, 0.5)
    lengths = Counter(i for frame_ids in ids for i in frame_ids)
    return {
        "IDF1": identity["IDF1"],
        "IDSW": clear["IDSW"],
        "tracks": len(lengths),
        "tracks_2_frames": sum(1 for n in lengths.values() if n >= 2),
        "true": len({k for f in frames for k, _, _ in f.truth}),
    }


def test_the_tracker_follows_a_moving_cameras_defects():
    """BoT-SORT (the default) on four generated flights: IDF1 at least 0.8 on each and 0.88 on average, at most
    two identity switches a flight, and the tracks seen twice or more are the true defects, one more at most; on the
    same flights ByteTrack, which does not compensate the camera's motion, does worse (why it is not the default)."""
    results = {"botsort": [], "bytetrack": []}
    for seed in FLIGHT_SEEDS:
        frames = flight(np.random.default_rng(seed))
        seq = detections_of(frames, seed)
        for kind in results:
            results[kind].append(scores(frames, seq, track_sequence(seq, kind, lost_s=5)))
    for result in results["botsort"]:
        assert result["IDF1"] >= 0.8 and result["IDSW"] <= 2, result
        assert result["true"] <= result["tracks_2_frames"] <= result["true"] + 1, result
    botsort = np.mean([r["IDF1"] for r in results["botsort"]])
    assert botsort >= 0.88, results["botsort"]
    assert botsort > np.mean([r["IDF1"] for r in results["bytetrack"]]), results


def test_a_defect_behind_a_pole_for_three_frames_keeps_its_track():
    frames = flight(np.random.default_rng(0), occluded=(1, 5, 3))
    assert all(k != 1 for t in (5, 6, 7) for k, _, _ in frames[t].truth)  # hidden...
    assert any(k == 1 for k, _, _ in frames[8].truth)  # ...and back
    seq = detections_of(frames, 0, miss=0.0)
    ids = track_sequence(seq, "botsort", lost_s=5)
    of_defect_1 = {i for f, s, frame_ids in zip(frames, seq, ids) for (k, _, _), i in zip(f.truth, frame_ids) if k == 1}
    assert len(of_defect_1) == 1, of_defect_1
    # with no memory for the gap, the same defect starts a second track: what the lost-track time is for
    ids = track_sequence(seq, "botsort", lost_s=1)
    assert len({i for f, frame_ids in zip(frames, ids) for (k, _, _), i in zip(f.truth, frame_ids) if k == 1}) == 2


def test_every_defect_gets_a_track_and_ids_continue_across_sequences():
    """A defect seen in one frame only is a track of its own (the library starts tracks without an id); a second
    sequence's ids start after the first's."""
    one = SequenceFrame([[10, 10, 40, 40]], [0.6], ["crack"], 0.0)
    two = SequenceFrame([[12, 10, 42, 40], [200, 200, 240, 230]], [0.6, 0.6], ["crack", "spalling"], 1.0)
    three = SequenceFrame([[14, 10, 44, 40]], [0.6], ["crack"], 2.0)
    assert track_sequence([one, two, three], "bytetrack") == [[1], [1, 2], [1]]
    assert track_sequence([one, two, three], "bytetrack", first_id=7) == [[7], [7, 8], [7]]
    # the same box as another type is another defect
    mixed = [SequenceFrame([[10, 10, 40, 40], [10, 10, 40, 40]], [0.6, 0.6], ["crack", "spalling"], t) for t in (0, 1)]
    assert track_sequence(mixed, "bytetrack") == [[1, 2], [1, 2]]


def write_video(path: Path, frames, fps: float, fourcc: str = "MJPG") -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, frames[0].bgr.shape[1::-1])
    for frame in frames:
        writer.write(frame.bgr)
    writer.release()


def read_csv(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_a_video_campaign_counts_each_defect_once(triton, tmp_path, capsys):
    from pycocotools.coco import COCO

    from client.report import build_report

    frames = flight(np.random.default_rng(0), frames=10)
    folder = tmp_path / "flight"
    folder.mkdir()
    write_video(folder / "pass1.avi", frames, fps=2.0)
    broken = folder / "pass2.avi"  # a video that breaks off halfway: its first frames are kept
    write_video(tmp_path / "whole.avi", frames, fps=2.0)
    data = (tmp_path / "whole.avi").read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    args = ["detect", str(folder), "--out", str(out), "--url", triton.grpc_url, "--threshold", "0.2", "--fps", "2"]
    assert cli(args) == 2  # the broken video is an error, the run goes on
    err = capsys.readouterr().err
    assert "tracked defects" in err
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["source"].endswith("pass2.avi") for e in errors] == [True]
    assert "stopped decoding at frame" in errors[0]["error"] and "the frames before it are kept" in errors[0]["error"]

    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    pass1 = [r for r in records if r["sequence"] == "pass1.avi"]
    pass2 = [r for r in records if r["sequence"] == "pass2.avi"]
    assert len(pass1) == 10 and 0 < len(pass2) < 10  # pass2: the frames before the break
    detections = [a for r in records for a in r["anomalies"]]
    assert detections, "the untrained detector found nothing at 0.2: nothing to track"
    assert all(isinstance(a["track_id"], int) for a in detections)  # every detection belongs to a track
    rows = read_csv(out / "tracks.csv")
    assert sorted(int(r["track_id"]) for r in rows) == sorted({a["track_id"] for a in detections})
    assert sum(int(r["frames_seen"]) for r in rows) == len(detections)
    by_id = {int(r["track_id"]): r for r in rows}
    for record in records:  # a track stays in its own sequence and type, and its best frame is its best
        for a in record["anomalies"]:
            row = by_id[a["track_id"]]
            assert row["sequence"] == record["sequence"] and row["defect_type"] == a["defect_type"]
            assert float(row["first_s"]) <= record["at_s"] <= float(row["last_s"])
            assert a["confidence"]["combined"] <= float(row["best_confidence"])
    coco = COCO(str(out / "coco.json"))
    assert {
        ann["attributes"]["track_id"] for ann in coco.loadAnns(coco.getAnnIds()) if "track_id" in ann["attributes"]
    } == set(by_id)

    page = build_report(out)
    assert f"{len(rows)} tracked through videos and sequences" in page and page.count(
        '<img src="data:image/jpeg'
    ) >= len(rows)

    # flicker: tracks seen in fewer than 3 frames dropped on a re-run (nothing is sent again)
    assert cli([*args, "--min-frames", "3"]) == 2
    kept = read_csv(out / "tracks.csv")
    assert all(int(r["frames_seen"]) >= 3 for r in kept)
    assert {int(r["track_id"]) for r in kept} == {i for i, r in by_id.items() if int(r["frames_seen"]) >= 3}
    again = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(again) == len(records)
    dropped = [a for r in again for a in r["anomalies"] if a["track_id"] is None]
    assert len(dropped) == sum(int(r["frames_seen"]) for r in rows if int(r["frames_seen"]) < 3)


def test_a_sequence_folder_is_tracked_and_a_frame_of_another_size_is_named(triton, tmp_path):
    frames = flight(np.random.default_rng(1), frames=6)
    folder = tmp_path / "scan"
    folder.mkdir()
    for t, frame in enumerate(frames):
        bgr = frame.bgr if t != 4 else cv2.resize(frame.bgr, (160, 120))  # one frame of another size
        cv2.imwrite(str(folder / f"img_{t:03d}.jpg"), bgr)
    out = tmp_path / "out"
    args = ["detect", str(folder), "--out", str(out), "--url", triton.grpc_url, "--threshold", "0.2", "--sequence"]
    assert cli(args) == 2
    records = {r["frame_id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert [records[f"img_{t:03d}.jpg"]["at_s"] for t in range(6)] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert {r["sequence"] for r in records.values()} == {"scan"}
    (error,) = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert error["frame_id"] == "img_004.jpg" and "is 160 x 120, the sequence's first frame 320 x 240" in error["error"]
    assert all(a.get("track_id") is None for a in records["img_004.jpg"]["anomalies"])
    others = [a for name, r in records.items() if name != "img_004.jpg" for a in r["anomalies"]]
    assert all(isinstance(a["track_id"], int) for a in others)
    # without --sequence the same folder is a set of photos: nothing tracked
    plain = tmp_path / "plain"
    assert cli(["detect", str(folder), "--out", str(plain), "--url", triton.grpc_url, "--threshold", "0.2"]) == 0
    assert not (plain / "tracks.csv").exists()
    assert all("track_id" not in a for line in (plain / "results.jsonl").read_text().splitlines()
               for a in json.loads(line)["anomalies"])  # fmt: skip


@pytest.mark.parametrize("kind", ["botsort", "bytetrack"])
def test_the_tracker_setting_is_checked(kind, monkeypatch):
    from anomaly.config import load_settings
    from anomaly.errors import ConfigError

    monkeypatch.setenv("TRACKER", kind)
    assert load_settings().tracker == kind
    monkeypatch.setenv("TRACKER", "sort")
    with pytest.raises(ConfigError, match="TRACKER"):
        load_settings()
