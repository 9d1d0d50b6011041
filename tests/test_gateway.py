"""The pod REST gateway under uvicorn, with real HTTP requests, in front of a real tritonserver."""

from __future__ import annotations

import base64

import pytest
import requests

from tests.conftest import SAMPLES, free_ports, start_gateway

PIER_BYTES = (SAMPLES / "pier_spalling.png").read_bytes()
PIER = base64.b64encode(PIER_BYTES).decode()
DECK = base64.b64encode((SAMPLES / "bridge_deck.jpg").read_bytes()).decode()
JSON = {"Content-Type": "application/json"}
SEED_FIELDS = {"frame_id", "image_size", "anomalies", "anomaly_count", "structures", "processing_time_ms"}


@pytest.fixture(scope="module")
def gateway(triton, tmp_path_factory):
    proc, url = start_gateway(
        triton.grpc_url, tmp_path_factory.mktemp("gw") / "gateway.log", MAX_REQUEST_BYTES="3000000"
    )
    yield url
    proc.terminate()
    proc.wait(10)


def test_health_is_not_ready_without_triton(tmp_path):
    (dead,) = free_ports(1)  # nothing listens here: Triton "not started yet"
    proc, url = start_gateway(f"127.0.0.1:{dead}", tmp_path / "gw.log")
    try:
        health = requests.get(f"{url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        assert requests.get(f"{url}/info", timeout=10).status_code == 503
        down = requests.post(f"{url}/detect", json={"image": PIER}, timeout=30)
        assert down.status_code == 503 and "Triton is not ready" in down.json()["detail"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_health_ready_with_every_model(gateway):
    body = requests.get(f"{gateway}/health", timeout=10).json()
    assert body["status"] == "ok" and body["triton"] == "ready"
    assert set(body["models"]) >= {"anomaly_pipeline", "segmenter", "detector"} and all(body["models"].values())


def test_info_tells_what_runs(gateway):
    info = requests.get(f"{gateway}/info", timeout=60).json()
    assert info["mode"] == "pod"
    assert info["detector"]["name"] == "rf-detr-medium" and info["detector"]["untrained"] is True
    assert info["segmenter"]["name"] == "sam2.1-tiny" and info["segmenter"]["untrained"] is True
    assert info["segmenter"]["device"] == "cpu"
    assert info["device"]["cuda_mps"] == "off"  # CUDA_MPS: nothing to share on a CPU
    # one instance of each, placed by the step itself (no GPU of Triton's): Triton's instance names, gpu null
    assert info["device"]["instances"] == {
        "detector": [{"instance": "detector_0_0", "gpu": None}],
        "segmenter": [{"instance": "segmenter_0_0", "gpu": None}],
    }
    assert info["untrained_weights"] is True and any(w.startswith("UNTRAINED") for w in info["warnings"])
    assert "crack" in info["classes"]["defects"] and "beam" in info["classes"]["structures"]
    assert info["versions"]["rfdetr"] and info["versions"]["sam2"] and info["versions"]["triton_server"] == "2.51.0"


def test_openapi_docs(gateway):
    spec = requests.get(f"{gateway}/openapi.json", timeout=10).json()
    assert {"/health", "/info", "/detect", "/detect/batch", "/detect/upload"} <= set(spec["paths"])
    assert requests.get(f"{gateway}/docs", timeout=10).status_code == 200


def test_detect_json(gateway):
    r = requests.post(
        f"{gateway}/detect",
        json={"image": PIER, "frame_id": "pier-1", "include_masks": True, "confidence_threshold": 0.25, "tiling": "on"},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert SEED_FIELDS <= set(body) and body["frame_id"] == "pier-1"
    assert body["anomalies"] and all("mask" in a for a in body["anomalies"])
    assert body["untrained_weights"] is True
    assert body["tiling"]["tiled"] and body["tiling"]["detector_tiles"] == 2  # 800 x 450: two 576 px tiles


def test_detect_batch(gateway):
    r = requests.post(
        f"{gateway}/detect/batch",
        json={"images": [PIER, PIER], "frame_ids": ["f1", "f2"], "confidence_threshold": 0.5},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 2 and body["failed"] == 0
    assert [x["frame_id"] for x in body["results"]] == ["f1", "f2"]
    assert all(SEED_FIELDS <= set(x) for x in body["results"])


def test_detect_upload_multipart(gateway):
    r = requests.post(
        f"{gateway}/detect/upload",
        files={"file": ("pier.png", PIER_BYTES, "image/png")},
        data={"include_masks": "false", "confidence_threshold": "0.25", "frame_id": "upload-1", "tiling": "off"},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["frame_id"] == "upload-1" and body["image_size"] == {"width": 800, "height": 450}
    assert body["anomalies"] and all("mask" not in a for a in body["anomalies"])
    assert body["tiling"]["mode"] == "off" and not body["tiling"]["tiled"]


@pytest.mark.parametrize(
    "path,kwargs,status,words",
    [
        ("/detect", {"json": {"image": "%%%not-base64"}}, 400, "image: is not valid base64"),
        (
            "/detect",
            {"json": {"image": base64.b64encode(b"plain text").decode()}},
            422,
            "image: is not a decodable image",
        ),
        ("/detect", {"json": {"frame_id": "x"}}, 422, "image"),
        ("/detect", {"json": {"image": PIER, "confidence_threshold": 7}}, 400, "confidence_threshold"),
        ("/detect", {"json": {"image": PIER, "colour": "red"}}, 422, "colour"),
        ("/detect", {"json": {"image": PIER, "tiling": "always"}}, 400, "tiling: must be one of auto, off, on"),
        ("/detect/batch", {"json": {"images": [PIER, "**"]}}, 400, "images[1]: is not valid base64"),
        ("/detect/batch", {"json": {"images": [PIER], "frame_ids": ["a", "b"]}}, 400, "frame_ids"),
        ("/detect/upload", {"files": {"file": ("x.png", b"", "image/png")}}, 400, "file: is empty"),
        ("/detect", {"json": {"image": DECK * 6}}, 413, "MAX_REQUEST_BYTES"),
        # A body sent in chunks, with no Content-Length, is counted as it arrives.
        ("/detect", {"data": iter([b"x" * 100_000] * 40), "headers": JSON}, 413, "MAX_REQUEST_BYTES"),
        ("/detect", {"data": b"\x00garbage", "headers": JSON}, 400, "body: is not valid JSON"),
        ("/detect", {"data": b"[" * 50_000 + b"]" * 50_000, "headers": JSON}, 400, "body: could not be parsed"),
        ("/detect", {"json": {"image": PIER, "frame_id": "frame-1\n"}}, 400, "frame_id: must be 1-128 ASCII"),
        (
            "/detect/upload",
            {"files": {"file": ("x.png", PIER_BYTES, "image/png")}, "data": {"confidence_treshold": "0.2"}},
            400,
            "confidence_treshold: is not a known form field",
        ),
    ],
)
def test_bad_requests_name_the_field(gateway, path, kwargs, status, words):
    r = requests.post(f"{gateway}{path}", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    assert words in r.text
    assert requests.get(f"{gateway}/health", timeout=10).status_code == 200


def test_batch_item_that_is_not_an_image_is_reported_not_dropped(gateway):
    junk = base64.b64encode(b"GIF89a not really").decode()
    r = requests.post(
        f"{gateway}/detect/batch", json={"images": [PIER, junk], "confidence_threshold": 0.6}, timeout=300
    )
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == 2 and body["failed"] == 1
    assert body["results"][1]["error"].startswith("images[1]: image:")


def test_responses_name_weight_files_not_server_paths(gateway):
    body = requests.post(f"{gateway}/detect", json={"image": PIER, "confidence_threshold": 1.0}, timeout=60).json()
    segmenter = body["models"]["segmenter"]
    assert segmenter["note"] and "/" not in segmenter["note"] and "/" not in segmenter["weights"]
    assert "does not exist" in segmenter["note"]  # the reason stays, only the folders go


def test_api_key_guards_everything_but_health(triton, tmp_path):
    proc, url = start_gateway(triton.grpc_url, tmp_path / "gw.log", API_KEY="s3cret-key")
    try:
        assert requests.get(f"{url}/health", timeout=10).status_code == 200  # platform health checks need no key
        for method, path in (("post", "/detect"), ("get", "/info"), ("post", "/detect/batch")):
            refused = getattr(requests, method)(f"{url}{path}", json={"image": PIER}, timeout=10)
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
            wrong = getattr(requests, method)(
                f"{url}{path}", json={"image": PIER}, headers={"Authorization": "Bearer nope"}, timeout=10
            )
            assert wrong.status_code == 401
        ok = requests.post(
            f"{url}/detect",
            json={"image": PIER, "confidence_threshold": 1.0},
            headers={"Authorization": "Bearer s3cret-key"},
            timeout=60,
        )
        assert ok.status_code == 200 and ok.json()["image_size"]["width"] == 800
    finally:
        proc.terminate()
        proc.wait(10)
