"""rfdetr's postprocess reproduced in numpy, class slots and roles, labels files, export behaviour."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from rfdetr.models.postprocess import PostProcess

from anomaly import taxonomy
from anomaly.detector import DetectorMetadata, select_detections
from anomaly.errors import ConfigError
from anomaly.weights import read_labels


@pytest.mark.parametrize("seed", range(5))
def test_select_matches_rfdetr_postprocess(seed):
    rng = np.random.default_rng(seed)
    boxes = rng.random((300, 4)).astype(np.float32) * np.float32([1, 1, 0.5, 0.5])
    logits = rng.normal(-2, 1.5, (300, 23)).astype(np.float32)
    h, w = 1080, 1920
    ref = PostProcess(num_select=300)(
        {"pred_logits": torch.from_numpy(logits[None]), "pred_boxes": torch.from_numpy(boxes[None])},
        target_sizes=torch.tensor([[h, w]]),
    )[0]
    keep = ref["scores"] > 0.3
    ours = select_detections(boxes, logits, (h, w), 0.3)
    assert len(ours) == int(keep.sum())
    np.testing.assert_allclose(ours.scores, ref["scores"][keep].numpy(), atol=1e-6)
    np.testing.assert_array_equal(ours.class_ids, ref["labels"][keep].numpy())
    np.testing.assert_allclose(ours.boxes, ref["boxes"][keep].numpy(), atol=1e-3)
    assert (ours.boxes[:, [0, 2]] <= w).all() and (ours.boxes >= 0).all()


def test_threshold_is_strict_like_rfdetr():
    logits = np.full((1, 2), -50.0, np.float32)
    logits[0, 1] = 0.0  # sigmoid = 0.5 exactly
    boxes = np.array([[0.5, 0.5, 0.2, 0.2]], np.float32)
    assert len(select_detections(boxes, logits, (100, 100), 0.5)) == 0
    assert len(select_detections(boxes, logits, (100, 100), 0.4999)) == 1


def test_roles_by_name():
    assert taxonomy.role_of("Crack") == "defect"
    assert taxonomy.role_of("hairline-crack") == "defect"
    assert taxonomy.role_of("Girder") == "structure"
    assert taxonomy.role_of("expansion joint") == "structure"
    assert taxonomy.role_of("") == "ignore"
    assert set(taxonomy.DEFAULT_DEFECTS) >= {"crack", "spalling", "corrosion", "efflorescence", "exposed_rebar"}
    assert set(taxonomy.DEFAULT_STRUCTURES) >= {"beam", "column", "deck", "pier", "girder", "wall", "slab"}


def test_labels_files(tmp_path):
    (tmp_path / "labels.txt").write_text("crack\nrust stain\ngirder\nvegetation,ignore\n")
    assert read_labels(tmp_path / "labels.txt") == (
        ["crack", "rust stain", "girder", "vegetation"],
        [None, None, None, "ignore"],  # roles by name where the file names none: anomaly.weights.slot_classes
    )
    (tmp_path / "labels.json").write_text(
        json.dumps({"classes": [{"name": "abutment"}, {"name": "x", "role": "structure"}]})
    )
    assert read_labels(tmp_path / "labels.json") == (["abutment", "x"], [None, "structure"])
    (tmp_path / "bad.json").write_text(json.dumps([{"name": "a", "role": "maybe"}]))
    with pytest.raises(ConfigError, match="unknown roles"):
        read_labels(tmp_path / "bad.json")


def test_metadata_round_trip_and_validation(tmp_path):
    meta = DetectorMetadata("nano", 384, [0.1] * 3, [0.2] * 3, ["crack", "beam", ""], ["defect", "structure", "ignore"])
    meta.save(tmp_path / "m.json")
    back = DetectorMetadata.load(tmp_path / "m.json")
    assert back == meta
    assert back.name(2) == "class_2" and back.role(7) == "ignore"
    with pytest.raises(ValueError):
        DetectorMetadata("nano", 384, [0] * 3, [1] * 3, ["a"], ["defect", "defect"])


def test_export_metadata_describes_the_served_model(exported):
    assert exported.resolution > 0 and len(exported.means) == 3
    assert exported.untrained is True  # no weights can be had here
    assert exported.class_names[: len(taxonomy.DEFAULT_CLASSES)] == list(taxonomy.DEFAULT_CLASSES)
    assert exported.roles[-1] == "ignore"  # the background slot


def test_export_refuses_untrained_without_permission(tmp_path, monkeypatch):
    """No weights, no network, no permission: a clear error naming what is missing. The network is cut
    with a dead proxy so the official download fails the same way on any machine."""
    from anomaly.config import load_settings
    from anomaly.errors import WeightsMissingError
    from export.detector import export_detector

    monkeypatch.setenv("ALLOW_UNTRAINED_WEIGHTS", "0")
    monkeypatch.setenv("MODEL_REPOSITORY", str(tmp_path / "repo"))
    monkeypatch.setenv("WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("RF_HOME", str(tmp_path / "rf_home"))
    monkeypatch.setenv("DETECTOR_VARIANT", "nano")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    with pytest.raises(WeightsMissingError, match="COCO weights could not be downloaded.*ALLOW_UNTRAINED_WEIGHTS"):
        export_detector(load_settings())
    monkeypatch.setenv("DETECTOR_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsMissingError, match="missing.pth does not exist"):
        export_detector(load_settings())


@pytest.mark.parametrize("seed", range(20))
def test_top_above_is_the_stable_top_k_cut_at_the_threshold(seed):
    """top_above against its definition: a stable sort of every score, the first k, then those above the
    threshold. Scores come from few levels so that ties are everywhere, thresholds and k such that fewer and
    more than k pass."""
    from anomaly.detector import top_above

    rng = np.random.default_rng(seed)
    prob = rng.integers(0, 12, int(rng.integers(1, 3000))).astype(np.float32) / 11
    for threshold in (-1.0, 0.0, 0.3, 0.5, 0.9, 1.0):
        for k in (1, 5, 300, 5000):
            order = np.argsort(-prob, kind="stable")[:k]
            expected = order[prob[order] > threshold]
            np.testing.assert_array_equal(top_above(prob, threshold, k), expected)
