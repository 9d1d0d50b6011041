"""Which segmenter weights are chosen, in which order, and what is said about the ones passed over. What a
checkpoint is comes from its keys, never from its file name. The checkpoints here are tiny stand-ins with
the key layouts of the real ones (building real SAM3 takes 4 GB: tests/test_sam3.py does that)."""

from __future__ import annotations

import pytest
import torch

from anomaly.config import load_settings
from anomaly.errors import WeightsMissingError
from anomaly.weights import checkpoint_kind, load_segmenter, missing_sam_message, segmenter_candidates


def sam2_layout(width: int, blocks: int) -> dict:
    state = {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(width, 3, 7, 7)}
    state |= {f"image_encoder.trunk.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(blocks)}
    return {"model": state | {"sam_mask_decoder.conv_s0.weight": torch.zeros(1)}}


SAM3_LAYOUT = {"model": {"detector.backbone.vision_backbone.trunk.pos_embed": torch.zeros(1),
                         "tracker.sam_mask_decoder.conv_s0.weight": torch.zeros(1)}}  # fmt: skip
OTHER_MODEL = {"state_dict": {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}}


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("SAM2_VARIANT", "large")
    monkeypatch.setenv("ALLOW_UNTRAINED_WEIGHTS", "1")
    return monkeypatch, tmp_path


def given(env, name: str, content) -> str:
    """SAM_MODEL_PATH pointing at a file of that name holding `content` (a checkpoint, or raw bytes)."""
    monkeypatch, tmp = env
    path = tmp / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    monkeypatch.setenv("SAM_MODEL_PATH", str(path))
    return str(path)


@pytest.mark.parametrize(
    "content,kind",
    [
        (SAM3_LAYOUT, ("sam3", "")),
        (SAM3_LAYOUT["model"], ("sam3", "")),  # the layout without the "model" level
        (sam2_layout(96, 12), ("sam2.1", "tiny")),
        (sam2_layout(96, 16), ("sam2.1", "small")),
        (sam2_layout(112, 24), ("sam2.1", "base_plus")),
        (sam2_layout(144, 48), ("sam2.1", "large")),
    ],
)
def test_checkpoint_kind_comes_from_the_keys(tmp_path, content, kind):
    path = tmp_path / "weights.pt"
    torch.save(content, path)
    assert checkpoint_kind(path) == kind
    torch.save(content, path, _use_new_zipfile_serialization=False)  # torch's legacy format: not mappable
    assert checkpoint_kind(path) == kind


@pytest.mark.parametrize(
    "content,message",
    [
        (OTHER_MODEL, "neither a SAM3 nor a SAM2.1 checkpoint"),
        (b"this is not a checkpoint", "could not be read as a checkpoint"),
        (sam2_layout(100, 7), "no known size"),
        ([1, 2, 3], "not a dictionary of weights"),
    ],
)
def test_anything_else_is_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "mystery.pt"
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    with pytest.raises(ValueError, match=message) as refused:
        checkpoint_kind(path)
    assert str(path) in str(refused.value)


def test_sam3_file_under_any_name_comes_first_then_the_sam21_fallbacks(env):
    path = given(env, "model.pt", SAM3_LAYOUT)
    candidates, _ = segmenter_candidates(load_settings())
    assert [(c.kind, c.checkpoint, c.untrained) for c in candidates][0] == ("sam3", path, False)
    assert (candidates[-1].kind, candidates[-1].variant, candidates[-1].untrained) == ("sam2.1", "large", True)


def test_missing_sam3_file_falls_back_to_sam21_with_the_reason(env):
    monkeypatch, tmp = env
    monkeypatch.setenv("SAM_MODEL_PATH", str(tmp / "sam3.pt"))
    (only,), _ = segmenter_candidates(load_settings())
    assert (only.kind, only.variant, only.untrained) == ("sam2.1", "large", True)
    assert "sam3.pt does not exist" in only.note and "sam2.1_hiera_large.pt does not exist" in only.note


def test_a_sam21_file_given_as_sam_model_path_is_served_at_the_size_its_keys_say(env):
    path = given(env, "my-finetune.pt", sam2_layout(96, 16))
    candidates, _ = segmenter_candidates(load_settings())
    assert (candidates[0].kind, candidates[0].variant, candidates[0].checkpoint) == ("sam2.1", "small", path)


def test_a_file_named_like_sam3_holding_sam21_weights_is_sam21(env):
    path = given(env, "sam3.pt", sam2_layout(96, 12))
    candidates, _ = segmenter_candidates(load_settings())
    assert (candidates[0].kind, candidates[0].variant, candidates[0].checkpoint) == ("sam2.1", "tiny", path)


@pytest.mark.parametrize(
    "content,why", [(b"\x00corrupt", "could not be read"), (OTHER_MODEL, "neither a SAM3 nor a SAM2.1")]
)
def test_corrupt_or_foreign_files_are_passed_over_with_the_reason(env, content, why):
    path = given(env, "sam3.pt", content)
    (only,), notes = segmenter_candidates(load_settings())
    assert (only.kind, only.untrained) == ("sam2.1", True)
    assert why in only.note and path in only.note


def test_segmenter_sam3_takes_only_sam3(env):
    monkeypatch, _ = env
    given(env, "sam2.1_hiera_tiny.pt", sam2_layout(96, 12))
    monkeypatch.setenv("SEGMENTER", "sam3")
    (only,), _ = segmenter_candidates(load_settings())
    assert (only.kind, only.untrained) == ("sam3", True)  # untrained SAM3, since allowed; no SAM2.1
    assert "holds SAM2.1 weights; SEGMENTER=sam3" in only.note
    monkeypatch.setenv("ALLOW_UNTRAINED_WEIGHTS", "0")
    settings = load_settings()
    candidates, notes = segmenter_candidates(settings)
    assert candidates == []
    message = missing_sam_message(settings, notes)
    assert "SEGMENTER=sam3" in message and "sam2.1_hiera_tiny.pt" in message and "facebook/sam3" in message
    with pytest.raises(WeightsMissingError, match="SEGMENTER=sam3"):
        load_segmenter(settings)


def test_segmenter_sam21_passes_over_a_sam3_file(env):
    monkeypatch, _ = env
    given(env, "sam3.pt", SAM3_LAYOUT)
    monkeypatch.setenv("SEGMENTER", "sam2.1")
    candidates, _ = segmenter_candidates(load_settings())
    assert [c.kind for c in candidates] == ["sam2.1"] and "holds SAM3 weights" in candidates[0].note


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


def test_our_untrained_file_under_another_name_is_still_flagged_untrained(env):
    """save_untrained's `.json` marker follows the file through a link: SAM_MODEL_PATH=model.pt pointing at
    the untrained SAM3 is served as untrained, loudly."""
    import json

    monkeypatch, tmp = env
    untrained = tmp / "weights" / "untrained" / "sam3.untrained.pt"
    untrained.parent.mkdir(parents=True)
    torch.save(SAM3_LAYOUT, untrained)
    untrained.with_suffix(".json").write_text(json.dumps({"untrained": True}))
    (tmp / "model.pt").symlink_to(untrained)
    monkeypatch.setenv("SAM_MODEL_PATH", str(tmp / "model.pt"))
    first = segmenter_candidates(load_settings())[0][0]
    assert (first.kind, first.untrained) == ("sam3", True)
    plain = given(env, "other.pt", SAM3_LAYOUT)
    first = segmenter_candidates(load_settings())[0][0]
    assert (first.checkpoint, first.untrained) == (plain, False)
