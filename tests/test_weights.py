"""Which segmenter weights are chosen, in which order, and what is said about the ones passed over."""

from __future__ import annotations

import pytest

from anomaly.config import load_settings
from anomaly.errors import WeightsMissingError
from anomaly.weights import load_segmenter, missing_sam_message, segmenter_candidates


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("SAM2_VARIANT", "large")
    return monkeypatch, tmp_path


def given_file(env, name: str, allow_untrained: bool):
    """SAM_MODEL_PATH pointing at a (dummy) file of that name: its name alone decides the candidates."""
    monkeypatch, tmp = env
    path = tmp / name
    path.write_bytes(b"x")
    monkeypatch.setenv("SAM_MODEL_PATH", str(path))
    monkeypatch.setenv("ALLOW_UNTRAINED_WEIGHTS", "1" if allow_untrained else "0")
    return path


def test_given_sam2_checkpoint_comes_first_and_names_its_variant(env):
    given = given_file(env, "sam2.1_hiera_small.pt", allow_untrained=True)
    candidates, _ = segmenter_candidates(load_settings())
    assert [(c.checkpoint, c.variant, c.untrained) for c in candidates][0] == (str(given), "small", False)
    assert candidates[-1].untrained and candidates[-1].variant == "large"


def test_sam3_and_missing_files_fall_back_with_reasons(env):
    given_file(env, "sam3.pt", allow_untrained=True)
    (only,), notes = segmenter_candidates(load_settings())
    assert only.untrained
    assert "looks like SAM3" in only.note and "sam2.1_hiera_large.pt does not exist" in only.note


def test_default_checkpoint_in_weights_dir(env):
    monkeypatch, tmp = env
    (tmp / "weights").mkdir()
    (tmp / "weights" / "sam2.1_hiera_large.pt").write_bytes(b"x")
    monkeypatch.setenv("SAM_MODEL_PATH", str(tmp / "nowhere.pt"))
    monkeypatch.setenv("ALLOW_UNTRAINED_WEIGHTS", "0")
    (only,), _ = segmenter_candidates(load_settings())
    assert only.checkpoint.endswith("weights/sam2.1_hiera_large.pt") and "nowhere.pt does not exist" in only.note


def test_nothing_usable_says_what_to_download(env):
    monkeypatch, tmp = env
    monkeypatch.setenv("SAM_MODEL_PATH", str(tmp / "nowhere.pt"))
    monkeypatch.setenv("ALLOW_UNTRAINED_WEIGHTS", "0")
    settings = load_settings()
    candidates, notes = segmenter_candidates(settings)
    assert candidates == []
    message = missing_sam_message(settings, notes)
    assert "sam2.1_hiera_large.pt" in message and "dl.fbaipublicfiles.com" in message
    assert "ALLOW_UNTRAINED_WEIGHTS=1" in message
    with pytest.raises(WeightsMissingError, match="No usable segmenter weights"):
        load_segmenter(settings)


def test_unloadable_file_is_skipped_and_reported(env):
    monkeypatch, tmp = env
    (tmp / "weights").mkdir()
    broken = tmp / "weights" / "sam2.1_hiera_large.pt"
    broken.write_bytes(b"not a checkpoint")
    monkeypatch.setenv("SAM_MODEL_PATH", str(tmp / "nowhere.pt"))
    monkeypatch.setenv("ALLOW_UNTRAINED_WEIGHTS", "0")
    with pytest.raises(WeightsMissingError) as err:
        load_segmenter(load_settings())
    assert "could not be loaded as SAM2.1 large" in str(err.value)
