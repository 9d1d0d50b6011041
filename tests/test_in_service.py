"""`/info` tells what the running Triton serves, from the detector's and the segmenter's start-up records
(anomaly.serving.in_service): after a restart with other weights it names the new ones. Each Triton here is
one of its own, serving only those two steps, with SAM_MODEL_PATH naming a different file each time."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from anomaly.config import load_settings
from anomaly.serving.triton_server import TritonServer
from anomaly.weights import prepare_segmenter_weights
from runpod_handler.gateway import models_in_service
from tests.conftest import free_ports

pytestmark = pytest.mark.e2e


def test_records_follow_a_triton_restart_with_other_weights(exported, tmp_path, monkeypatch):
    settings = load_settings()
    repo = tmp_path / "repo"
    for step in ("detector", "segmenter"):
        ignore = shutil.ignore_patterns("configs", "__pycache__")
        shutil.copytree(settings.model_repository / step, repo / step, ignore=ignore)
    untrained = Path(prepare_segmenter_weights(settings).checkpoint)
    seen = []
    for name in ("sam2.1_hiera_tiny.first.pt", "sam2.1_hiera_tiny.second.pt"):
        checkpoint = tmp_path / name
        shutil.copy(untrained, checkpoint)
        http, grpc, metrics = free_ports(3)
        for key, value in dict(
            TRITON_HTTP_PORT=http, TRITON_GRPC_PORT=grpc, TRITON_METRICS_PORT=metrics, SAM_MODEL_PATH=checkpoint
        ).items():
            monkeypatch.setenv(key, str(value))
        server = TritonServer(load_settings(), model_repository=repo, log_path=tmp_path / f"{name}.log")
        if seen:  # the second start as the launcher says it after starting an MPS daemon (no GPU here for one)
            server.mps_state = "on (MPS server 4242)"
        server.start(ready_timeout=600)
        try:
            loaded = models_in_service(repo)
        finally:
            server.stop()
        segmenter, detector = loaded["models"]["segmenter"], loaded["models"]["detector"]
        assert segmenter["weights"] == name and segmenter["device"] == "cpu"
        assert detector["name"] == f"rf-detr-{exported.variant}" and detector["backend"] == "onnxruntime"
        assert detector["batches"] == segmenter["batches"] == "one at a time"  # OVERLAP_BATCHES=auto on a CPU
        assert segmenter["early_embedding"] == "off"  # EARLY_EMBEDDING=auto on a CPU
        assert any(w.startswith("UNTRAINED") and "detector" in w for w in loaded["warnings"])
        assert loaded["cuda_mps"] == ("on (MPS server 4242)" if seen else "off")  # what the GPU steps were told
        seen.append(segmenter["weights"])
    assert seen == ["sam2.1_hiera_tiny.first.pt", "sam2.1_hiera_tiny.second.pt"]
