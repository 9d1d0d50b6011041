"""Shared fixtures. End-to-end fixtures start the real tritonserver (from the nvidia-pytriton wheel) on free
ports with the exported models; nothing here is mocked.

No weights can be downloaded on the machines this runs on, so the models are the real RF-DETR and SAM2.1
architectures with untrained, seeded weights (written once by `python -m export`)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.serving import free_ports  # noqa: F401 - the tests' import of it

# Before anything reads the settings: untrained weights are expected here, and SAM tiny keeps CPU runs short.
os.environ.setdefault("ALLOW_UNTRAINED_WEIGHTS", "1")
os.environ.setdefault("SAM2_VARIANT", "tiny")

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"


def pytest_collection_modifyitems(config, items):
    """Every test that talks to the session's tritonserver (the `triton` fixture, directly or through
    another fixture) is an `e2e` test; `make unit` runs the others. Tests that start servers of their own
    carry the marker themselves."""
    for item in items:
        if "triton" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


def wait_http(url: str, proc, log_path, timeout: float = 300, ok=(200,)) -> None:
    """Poll `url` until it answers with a status in `ok`; fail early, with the log, if `proc` exits."""
    import time

    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code in ok:
                return
        except requests.ConnectionError:
            pass
        assert proc.poll() is None, f"{proc.args[:3]} exited early:\n{Path(log_path).read_text()[-3000:]}"
        time.sleep(0.3)
    raise AssertionError(f"{url} not up after {timeout} s:\n{Path(log_path).read_text()[-3000:]}")


def start_gateway(triton_url: str, log_path, **env) -> tuple[subprocess.Popen, str]:
    (port,) = free_ports(1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "runpod_handler.gateway:app", "--host", "127.0.0.1", "--port", str(port)],
        env=dict(os.environ, TRITON_URL=triton_url, **env), stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
        cwd=REPO,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/openapi.json", proc, log_path, timeout=60, ok=(200, 401))  # 401: API_KEY is set
    return proc, url


@pytest.fixture(scope="session")
def rp_api(triton, tmp_path_factory):
    """The serverless handler under the runpod SDK's local API server (`--rp_serve_api`: /run, /status, /runsync)
    in front of the session's Triton: what a RunPod queue endpoint looks like to its clients."""
    (port,) = free_ports(1)
    log_path = tmp_path_factory.mktemp("rp") / "rp_api.log"
    log = open(log_path, "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "runpod_handler" / "handler.py"), "--rp_serve_api", "--rp_api_port", str(port),
         "--rp_api_host", "127.0.0.1"],
        env=dict(os.environ, TRITON_URL=triton.grpc_url, TRITON_READY_TIMEOUT="60"), stdout=log,
        stderr=subprocess.STDOUT, cwd=REPO,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/docs", proc, log_path, timeout=120)
    yield url
    proc.terminate()
    proc.wait(20)
    log.close()


@pytest.fixture(scope="session")
def exported():
    """The exported detector metadata (exporting first if `make test` has not already)."""
    from anomaly.config import load_settings
    from anomaly.weights import prepare_segmenter_weights
    from export.detector import export_detector

    settings = load_settings()
    prepare_segmenter_weights(settings)
    return export_detector(settings)


@pytest.fixture(scope="session")
def triton(exported, tmp_path_factory):
    """A real tritonserver serving the model repository, on free ports."""
    from anomaly.config import load_settings
    from anomaly.serving.triton_server import TritonServer

    http, grpc, metrics = free_ports(3)
    os.environ.update(TRITON_HTTP_PORT=str(http), TRITON_GRPC_PORT=str(grpc), TRITON_METRICS_PORT=str(metrics))
    log = tmp_path_factory.mktemp("triton") / "triton.log"
    # Geometry shares each frame's masks with a worker process, as on a GPU machine (GEOMETRY_WORKERS), so every
    # end-to-end test goes through that path (test_e2e_pipeline checks its numbers against the served masks).
    # The detector and SAM take batches in while their thread runs the last one (OVERLAP_BATCHES), as on a GPU
    # machine: every end-to-end test goes through the response senders of that path too. SAM embeds each frame
    # early, in parallel with the detector (EARLY_EMBEDDING), as on a GPU machine: every served mask comes from it.
    # Triton may trace into a file (TRITON_TRACE_FILE; off until a client turns it on): make bench-gpu's timeline.
    trace = str(log.parent / "trace.json")
    settings = dataclasses.replace(load_settings(), geometry_workers=2, early_embedding="on", triton_trace_file=trace)
    server = TritonServer(settings, log_path=log, env={"OVERLAP_BATCHES": "on"})
    server.start(ready_timeout=600)
    yield server
    _record_memory(server)
    server.stop()


def _record_memory(server) -> None:
    """RSS of tritonserver and its model processes after the run, for the benchmark notes."""
    out = REPO / "bench_output"
    out.mkdir(exist_ok=True)
    (out / "server_rss_after_tests.json").write_text(json.dumps(server.memory_mib(), indent=2) + "\n")


@pytest.fixture(scope="session")
def grpc_client(triton):
    from client import AnomalyClient

    with AnomalyClient(triton.grpc_url, "grpc") as c:
        yield c


@pytest.fixture(scope="session")
def http_client(triton):
    from client import AnomalyClient

    with AnomalyClient(triton.http_url, "http") as c:
        yield c


@pytest.fixture(params=["grpc", "http"])
def client(request, grpc_client, http_client):
    return grpc_client if request.param == "grpc" else http_client


def assert_served_mask_matches(anomaly: dict, reference_full: np.ndarray, box, min_iou: float = 0.98) -> None:
    """A served anomaly's mask (COCO RLE) against a reference model's full-frame mask logits for the same box,
    compared inside the anomaly's bbox."""
    from anomaly.masks import rle_to_mask

    b = anomaly["bbox"]
    window = (slice(b["y_min"], b["y_max"]), slice(b["x_min"], b["x_max"]))
    ref = reference_full[window] > 0
    ours = rle_to_mask(anomaly["mask"])[window]
    union = (ref | ours).sum()
    iou = (ref & ours).sum() / union if union else 1.0
    assert iou >= min_iou, f"mask IoU {iou:.4f} for box {box}"


def encode(rgb: np.ndarray, fmt: str = "JPEG", **kwargs) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="session")
def deck_jpeg() -> bytes:
    return (SAMPLES / "bridge_deck.jpg").read_bytes()


@pytest.fixture(scope="session")
def pier_png() -> bytes:
    return (SAMPLES / "pier_spalling.png").read_bytes()
