"""`anomaly compare` (anomaly.change, client.compare) on a generated re-inspection whose truth is known
(anomaly.synthetic.reinspection): the second visit shifted by a few pixels and turned by two degrees, one crack
grown by 40 px, one crack and a spalling unchanged, one crack repaired, one new. The two campaigns are written as
`anomaly detect` writes them, each defect measured by the service's own geometry from its true mask (the detector
here is untrained: served, it would not find these defects)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from anomaly.change import GROWN_LENGTH, GROWN_WIDTH, Registration, change, register
from anomaly.geometry import measure
from anomaly.masks import box_crop, crop_to_rle
from anomaly.synthetic import concrete, crack_line, draw_crack, reinspection
from client.cli import main as cli

FRAME = "pier3/DJI_0042.JPG"


def write_campaign(folder: Path, inspection, mm_per_pixel: float | None = 0.5, frame_id: str = FRAME) -> Path:
    folder.mkdir(parents=True)
    photo = folder / "photo.png"
    cv2.imwrite(str(photo), inspection.rgb[..., ::-1])
    h, w = inspection.rgb.shape[:2]
    anomalies = []
    for k, instance in sorted(inspection.defects.items()):
        crop, box = box_crop(instance.mask)
        anomalies.append({
            "anomaly_id": f"anom_{folder.name}_{k}", "defect_type": instance.name,
            "bbox": dict(zip(("x_min", "y_min", "x_max", "y_max"), box)), "geometry": measure(instance.mask),
            "confidence": {"detection": 0.9, "segmentation": 0.9, "combined": 0.9},
            "mask": crop_to_rle(crop, box, (h, w)),
        })  # fmt: skip
    record = {"frame_id": frame_id, "image_size": {"width": w, "height": h}, "anomalies": anomalies,
              "structures": [], "source": str(photo), "mm_per_pixel": mm_per_pixel}  # fmt: skip
    (folder / "results.jsonl").write_text(json.dumps(record) + "\n")
    return folder


@pytest.fixture(scope="module")
def visits(tmp_path_factory):
    before, after, truth = reinspection(np.random.default_rng(7))
    root = tmp_path_factory.mktemp("visits")
    return write_campaign(root / "2025", before), write_campaign(root / "2026", after), truth, before, after


def test_registration_finds_the_second_visits_shift_and_turn(visits):
    _, _, _, before, after = visits
    found = register(before.rgb[..., ::-1], after.rgb[..., ::-1])
    assert found.ok and found.inliers >= 50
    # after -> before undoes the second visit's turn of 2 degrees (OpenCV's angles: counter-clockwise positive)
    assert found.rotation_deg == pytest.approx(2.0, abs=0.1) and found.scale == pytest.approx(1.0, abs=0.005)
    assert found.matrix[:, 2] == pytest.approx(registered_shift(), abs=1.0)


def registered_shift() -> np.ndarray:
    """Where the after-photo's origin lands in the before-photo: the inverse of the visit's turn and shift."""
    turn = cv2.getRotationMatrix2D((320, 240), 2.0, 1.0)
    turn[:, 2] += (7.0, -5.0)
    return cv2.invertAffineTransform(turn)[:, 2]


def test_each_defect_is_labelled_as_it_should_be(visits, tmp_path, capsys):
    before_dir, after_dir, truth, before, after = visits
    out = tmp_path / "changes"
    assert cli(["compare", str(before_dir), str(after_dir), "--out", str(out)]) == 0
    assert "1 new, 1 grown, 2 unchanged, 1 gone" in capsys.readouterr().err
    with open(out / "changes.csv") as handle:
        rows = list(csv.DictReader(handle))
    by_defect = {}
    for row in rows:
        k = int((row["before_anomaly_id"] or row["after_anomaly_id"]).rsplit("_", 1)[1])
        by_defect[k] = row
    assert {k: r["status"] for k, r in by_defect.items()} == truth
    grown = by_defect[0]
    true_growth = measure(after.defects[0].mask)["length_pixels"] - measure(before.defects[0].mask)["length_pixels"]
    assert float(grown["length_change_px"]) == pytest.approx(40, abs=GROWN_LENGTH[0])  # as drawn, within the noise
    assert float(grown["length_change_px"]) == pytest.approx(true_growth, abs=2)  # as measured
    assert float(grown["length_change_mm"]) == pytest.approx(float(grown["length_change_px"]) * 0.5, abs=0.01)
    for k in (1, 2):
        assert abs(float(by_defect[k]["length_change_px"])) < GROWN_LENGTH[0]
    assert "rotation" in grown["registration"]
    page = (out / "changes.html").read_text()
    assert page.count("<img src='data:image/jpeg;base64,") == 2 * len(rows)  # before and after, each defect
    assert all(f'<tr class="{status}">' in page for status in ("new", "grown", "unchanged", "gone"))


def test_the_grown_threshold_lies_above_the_measurements_own_noise():
    """The same crack photographed again a few pixels and degrees off, unchanged: how much its measured length and
    width move (after brought back by the registration's scale) stays under the thresholds for "grown"."""
    length_moves, width_moves = [], []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        wall = concrete(rng, (320, 320))
        line = crack_line(rng, np.array([160.0, 160.0]), rng.uniform(80, 160))
        crack = draw_crack(rng, wall, line, rng.uniform(2.0, 6.0))
        base = measure(crack.mask)
        for dx, dy, deg in ((3.5, -2.0, 1.0), (-6.0, 4.5, -2.5), (1.3, 7.7, 4.0), (0.5, 0.5, 0.0), (-2.2, 1.1, -4.0)):
            turn = cv2.getRotationMatrix2D((160, 160), deg, 1.0)
            turn[:, 2] += (dx, dy)
            moved = cv2.warpAffine(crack.mask.astype(np.uint8), turn, (320, 320), flags=cv2.INTER_NEAREST) > 0
            again = change({"geometry": base}, {"geometry": measure(moved)}, 1.0)
            length_moves.append(
                abs(again["length_change_px"]) / max(GROWN_LENGTH[0], GROWN_LENGTH[1] * base["length_pixels"])
            )
            width_moves.append(
                abs(again["max_width_change_px"]) / max(GROWN_WIDTH[0], GROWN_WIDTH[1] * base["max_width_pixels"])
            )
            assert again["status"] == "unchanged", (seed, dx, dy, deg, again)
    # the noise uses at most two thirds of the margin: a real growth past the threshold is not noise
    assert max(length_moves) < 0.67 and max(width_moves) < 0.67, (max(length_moves), max(width_moves))
    assert max(length_moves) > 0.3  # and the threshold is not far above it: growth is not missed for nothing


def test_bad_inputs_are_named(visits, tmp_path, capsys):
    before_dir, _, _, _, after = visits
    assert cli(["compare", str(tmp_path), str(before_dir), "--out", str(tmp_path / "x")]) == 2
    assert "is not a campaign folder" in capsys.readouterr().err
    other = write_campaign(tmp_path / "elsewhere", after, frame_id="bridge7/DJI_0001.JPG")
    assert cli(["compare", str(before_dir), str(other), "--out", str(tmp_path / "y")]) == 2
    assert "have no frame_id in common" in capsys.readouterr().err
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"{FRAME},bridge7/DJI_0001.JPG\n")
    assert cli(["compare", str(before_dir), str(other), "--out", str(tmp_path / "z"), "--pairs", str(pairs)]) == 0
    pairs.write_text(f"{FRAME},nope.jpg\n")
    assert cli(["compare", str(before_dir), str(other), "--out", str(tmp_path / "w"), "--pairs", str(pairs)]) == 2
    assert "nope.jpg (after)" in capsys.readouterr().err


def test_photos_that_do_not_match_are_compared_as_taken_and_said():
    flat = np.full((200, 200, 3), 128, np.uint8)  # nothing to find features on
    found = register(flat, flat)
    assert not found.ok and "compared as taken" in found.describe()
    assert isinstance(found, Registration) and np.allclose(found.matrix, [[1, 0, 0], [0, 1, 0]])


def test_the_same_frame_served_twice_measures_the_same(grpc_client, visits):
    """The other half of the noise: one photo through the served ensemble twice gives the same defects, measured
    the same (the service is deterministic on a frame), so two campaigns of one unchanged photo differ by nothing."""
    _, _, _, before, _ = visits
    ok, png = cv2.imencode(".png", before.rgb[..., ::-1])
    first, second = (grpc_client.detect(png.tobytes(), confidence_threshold=0.2) for _ in range(2))
    assert first["anomalies"], "nothing detected at 0.2: nothing to compare"
    strip = lambda r: [{k: v for k, v in a.items() if not k.endswith("_id")} for a in r["anomalies"]]  # noqa: E731
    assert strip(first) == strip(second)
