"""SAM3 behind the segmenter step: an untrained, seeded SAM3 saved in the official checkpoint layout, served
by a real Triton, gives the masks Meta's own path gives (sam3's loader, Sam3Processor.set_image and
predict_inst) for the same boxes; a SAM3 file that does not fit is refused, never half loaded.

Slow on this 2-core machine (SAM3's image encoder takes about 30 s a frame on the CPU), hence e2e.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly.config import load_settings
from anomaly.errors import WeightsMissingError
from anomaly.images import decode_image
from anomaly.weights import load_segmenter, make_untrained_sam3, untrained_sam3_path
from tests.conftest import SAMPLES, assert_served_mask_matches, free_ports

pytestmark = pytest.mark.e2e
BIG = 1 << 30


@pytest.fixture(scope="module")
def sam3_checkpoint() -> Path:
    """The untrained SAM3 in the official layout ({"model": {"detector.*", "tracker.*"}}), written once."""
    return make_untrained_sam3(untrained_sam3_path(load_settings()))


def meta_reference(checkpoint: Path):
    """SAM3 exactly as Meta's package runs it: its builder and (non-strict) loader, its processor."""
    from sam3.model.sam3_image_processor import Sam3Processor

    from anomaly.sam3 import _builder, bpe_vocabulary

    torch.set_num_threads(2)
    model = _builder().build_sam3_image_model(
        bpe_path=bpe_vocabulary(), device="cpu", checkpoint_path=str(checkpoint), load_from_HF=False,
        enable_inst_interactivity=True,
    )  # fmt: skip
    return model, Sam3Processor(model, device="cpu")


def test_triton_serves_sam3_masks_equal_to_meta_predict_inst(exported, sam3_checkpoint, tmp_path, monkeypatch):
    from PIL import Image

    from anomaly.serving.triton_server import TritonServer
    from client import AnomalyClient

    settings = load_settings()
    repo = tmp_path / "repo"
    shutil.copytree(settings.model_repository, repo, ignore=shutil.ignore_patterns("configs", "__pycache__"))
    named_otherwise = tmp_path / "model.pt"  # what it is comes from its keys, not its name
    named_otherwise.symlink_to(sam3_checkpoint)
    http, grpc, metrics = free_ports(3)
    env = dict(
        TRITON_HTTP_PORT=http, TRITON_GRPC_PORT=grpc, TRITON_METRICS_PORT=metrics, SAM_MODEL_PATH=named_otherwise
    )
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    data = (SAMPLES / "pier_spalling.png").read_bytes()
    server = TritonServer(load_settings(), model_repository=repo, log_path=tmp_path / "triton.log")
    server.start(ready_timeout=900)
    try:
        with AnomalyClient(server.grpc_url, "grpc") as client:
            served = client.detect_full(data, include_masks=True, confidence_threshold=0.25)
    finally:
        server.stop()
    response = served.response
    segmenter = response["models"]["segmenter"]
    assert segmenter["name"] == "sam3" and segmenter["weights"] == "model.pt" and segmenter["untrained"] is True
    assert any("segmenter (SAM3)" in w for w in response["warnings"])
    anomalies = response["anomalies"]
    assert anomalies, "the threshold should leave boxes to compare"
    boxes = served.arrays["BOXES"][served.arrays["SEG_INDEX"]]

    model, processor = meta_reference(sam3_checkpoint)
    rgb = decode_image(data, BIG, BIG)
    state = processor.set_image(Image.fromarray(rgb))
    for anomaly, box, score in zip(anomalies, boxes, served.arrays["MASK_SCORES"]):
        full, iou_pred, _ = model.predict_inst(state, box=box, multimask_output=False)
        assert_served_mask_matches(anomaly, full[0], box)
        assert score == pytest.approx(float(np.clip(iou_pred[0], 0, 1)), abs=1e-4)


def test_a_sam3_file_missing_weights_is_refused_not_half_loaded(sam3_checkpoint, tmp_path, monkeypatch):
    """sam3's own loader would load what fits and print the rest; here a SAM3 checkpoint without its mask
    decoder is an error naming the file: SEGMENTER=auto falls back to SAM2.1 and says why, SEGMENTER=sam3
    without permission for untrained weights stops the start."""
    from anomaly.sam3 import read_state

    state = dict(read_state(sam3_checkpoint))
    partial = {k: v for k, v in state.items() if ".sam_mask_decoder." not in k}
    assert len(partial) < len(state)
    broken = tmp_path / "sam3.pt"
    torch.save({"model": partial}, broken)
    monkeypatch.setenv("SAM_MODEL_PATH", str(broken))
    monkeypatch.setenv("SAM2_VARIANT", "tiny")
    monkeypatch.setenv("ALLOW_UNTRAINED_WEIGHTS", "1")
    segmenter, spec = load_segmenter(load_settings())
    assert (spec.kind, spec.variant) == ("sam2.1", "tiny")
    assert "could not be loaded as SAM3" in spec.note and "does not fit SAM3's image model" in spec.note
    monkeypatch.setenv("SEGMENTER", "sam3")
    monkeypatch.setenv("ALLOW_UNTRAINED_WEIGHTS", "0")
    with pytest.raises(WeightsMissingError, match="sam3.pt") as refused:
        load_segmenter(load_settings())
    assert "SEGMENTER=sam3" in str(refused.value)
