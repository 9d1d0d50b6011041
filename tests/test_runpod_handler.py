"""The serverless handler under the real runpod SDK's local modes, against a real tritonserver:
`--test_input`, a `test_input.json`, and `--rp_serve_api` with real HTTP requests to /runsync."""

from __future__ import annotations

import ast
import base64
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import REPO, SAMPLES, encode

HANDLER = REPO / "runpod_handler" / "handler.py"
PIER = base64.b64encode((SAMPLES / "pier_spalling.png").read_bytes()).decode()
WALL = base64.b64encode((SAMPLES / "tunnel_wall_exif.jpg").read_bytes()).decode()
# A command line argument holds at most 128 kB: the pier as a JPEG is small enough for --test_input.
PIER_JPEG = base64.b64encode(encode(np.asarray(Image.open(SAMPLES / "pier_spalling.png").convert("RGB")))).decode()


def env_for(triton) -> dict:
    return dict(os.environ, TRITON_URL=triton.grpc_url, TRITON_READY_TIMEOUT="60")


def job_result(stdout: str) -> dict:
    """The SDK's local mode logs `Job result: <python dict>`."""
    line = next(line for line in stdout.splitlines() if "Job result:" in line)
    return ast.literal_eval(line.split("Job result:", 1)[1].strip())


def test_test_input_single_image(triton, tmp_path):
    assert len(PIER_JPEG) < 128_000
    # The SDK logs the result on one line cut at 4096 characters: few findings and no masks keep it whole.
    payload = {"input": {"image": PIER_JPEG, "frame_id": "pier-7", "confidence_threshold": 0.4}}
    out = subprocess.run(
        [sys.executable, str(HANDLER), "--test_input", json.dumps(payload)],
        env=env_for(triton), capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    output = job_result(out.stdout)["output"]
    assert output["frame_id"] == "pier-7" and output["image_size"] == {"width": 800, "height": 450}
    assert output["anomaly_count"] == len(output["anomalies"]) > 0
    assert output["untrained_weights"] is True


def test_test_input_json_file_batch(triton, tmp_path):
    (tmp_path / "test_input.json").write_text(
        json.dumps({"input": {"images": [PIER, WALL], "frame_ids": ["a", "b"], "confidence_threshold": 0.5}})
    )
    out = subprocess.run(
        [sys.executable, str(HANDLER)], env=env_for(triton), capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    output = job_result(out.stdout)["output"]
    assert output["count"] == 2 and output["failed"] == 0
    assert [r["frame_id"] for r in output["results"]] == ["a", "b"]
    assert output["results"][1]["image_size"] == {"width": 600, "height": 800}


def test_handler_with_no_arguments_answers_the_committed_test_input_json(triton):
    """What `python runpod_handler/handler.py` does in the repository (and the Hub's build check): the runpod
    SDK finds ./test_input.json, runs it once and exits."""
    committed = json.loads((REPO / "test_input.json").read_text())["input"]
    out = subprocess.run(
        [sys.executable, str(HANDLER)], env=env_for(triton), capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    output = job_result(out.stdout)["output"]
    assert output["frame_id"] == committed["frame_id"] and output["image_size"] == {"width": 480, "height": 270}
    assert output["untrained_weights"] is True and output["warnings"]


def test_test_input_bad_field_fails_the_job(triton, tmp_path):
    out = subprocess.run(
        [sys.executable, str(HANDLER), "--test_input", json.dumps({"input": {"image": "%%%"}})],
        env=env_for(triton), capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 1
    assert "image: is not valid base64" in out.stdout


def runsync(url: str, job_input) -> dict:
    response = requests.post(f"{url}/runsync", json={"input": job_input}, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def test_runsync_single_and_batch(rp_api):
    job = {"image": PIER, "frame_id": "p1", "mm_per_pixel": 0.2, "confidence_threshold": 0.25, "tiling": "on"}
    single = runsync(rp_api, job)
    assert single["status"] == "COMPLETED"
    out = single["output"]
    assert out["frame_id"] == "p1" and out["mm_per_pixel"] == 0.2
    assert out["anomalies"] and all("length_mm" in a["geometry"] for a in out["anomalies"])
    assert out["tiling"]["tiled"] and out["tiling"]["detector_tiles"] == 2
    masked = runsync(rp_api, {"image": PIER, "include_masks": True, "confidence_threshold": 0.25})["output"]
    assert masked["anomalies"] and all(a["mask"]["size"] == [450, 800] for a in masked["anomalies"])
    batch = runsync(rp_api, {"images": [WALL, "aGVsbG8gd29ybGQ=", PIER], "frame_ids": ["w", "hello", "p"]})
    assert batch["status"] == "COMPLETED"
    results = batch["output"]["results"]
    assert [r["frame_id"] for r in results] == ["w", "hello", "p"]
    assert batch["output"]["failed"] == 1
    assert results[1]["error"].startswith("images[1]: image: is not a decodable image")
    assert results[2]["image_size"]["width"] == 800


BAD_JOBS = [
    ({}, "image: is required"),
    ({"image": 42}, "image: must be a base64 string"),
    ({"image": "not*base64"}, "image: is not valid base64"),
    ({"image": ""}, "image: is empty"),
    ({"image": base64.b64encode(b"\x00" * 64).decode()}, "image: is not a decodable image"),
    ({"image": PIER, "confidence_threshold": 2}, "confidence_threshold: must be in [0.0, 1.0]"),
    ({"image": PIER, "confidence_threshold": "high"}, "confidence_threshold: must be a number"),
    ({"image": PIER, "include_masks": "sometimes"}, "include_masks: must be true or false"),
    ({"image": PIER, "frame_id": "../../etc/passwd;"}, "frame_id: must be 1-128"),
    ({"image": PIER, "mm_per_pixel": -3}, "mm_per_pixel: must be in"),
    ({"image": PIER, "colour": "red"}, "colour: is not a known field"),
    ({"image": PIER, "tiling": "yes"}, "tiling: must be one of auto, off, on"),
    ({"images": []}, "images: must be a non-empty list"),
    ({"images": [PIER], "frame_ids": ["a", "b"]}, "frame_ids: must be a list as long as images (1)"),
    ({"images": [PIER, "@@"]}, "images[1]: is not valid base64"),
    ({"images": [PIER] * 17}, "images: holds 17 images, more than the 16 allowed"),
    ({"image": PIER, "images": [PIER]}, "image: send either image or images"),
    ({"images": "one.jpg"}, "images: must be a non-empty list"),
    ({"images": [PIER], "frame_id": "x"}, "frame_id: is for single images"),
    ({"images": [PIER, PIER], "frame_ids": ["ok", "no spaces please"]}, "frame_ids[1]: must be 1-128"),
]


@pytest.mark.parametrize(
    "job_input,message", BAD_JOBS, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD_JOBS)]
)
def test_bad_jobs_fail_clearly_and_the_worker_keeps_serving(rp_api, job_input, message):
    failed = runsync(rp_api, job_input)
    assert failed["status"] == "FAILED"
    assert message in failed["error"], failed["error"]
    ok = runsync(rp_api, {"image": WALL, "confidence_threshold": 0.9})
    assert ok["status"] == "COMPLETED" and ok["output"]["image_size"]["height"] == 800


def test_process_refuses_jobs_without_an_input_object():
    from runpod_handler.handler import process

    assert process({"id": "1"}) == {"error": 'input: is missing; send {"input": {"image": "<base64>"}}'}
    assert process({"id": "2", "input": "just a string"}) == {"error": "input: must be a JSON object, got str"}


def test_concurrency_modifier_keeps_several_jobs_in_flight(monkeypatch):
    from anomaly.config import settings
    from runpod_handler import handler

    monkeypatch.setenv("RUNPOD_CONCURRENCY", "6")
    settings.cache_clear()
    try:
        assert handler.concurrency_modifier(1) == 6
    finally:
        settings.cache_clear()
