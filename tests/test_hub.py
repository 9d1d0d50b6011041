"""The RunPod Hub files: current with the code, and valid against the fields RunPod's publishing guide and
runpod-workers/worker-template document (hub.json: title, description, type, category, config with runsOn,
containerDiskInGb, gpuCount, gpuIds, allowedCudaVersions, presets, env; tests.json: tests with name, input,
timeout, and a config)."""

from __future__ import annotations

import base64
import json
import re

import pytest

from anomaly.config import KNOBS, ConfigError, load_settings
from anomaly.errors import InputError
from runpod_handler import hub, image
from runpod_handler.jobs import parse_job_input
from tests.conftest import REPO, SAMPLES

KNOB_NAMES = {k.name for k in KNOBS}
HUB = json.loads((REPO / ".runpod" / "hub.json").read_text())
TESTS = json.loads((REPO / ".runpod" / "tests.json").read_text())
GPU_POOLS = {"AMPERE_16", "AMPERE_24", "ADA_24", "AMPERE_48", "ADA_48_PRO", "AMPERE_80", "ADA_80_PRO", "HOPPER_141"}


def test_committed_files_are_what_the_code_writes():
    for path, text in hub.files().items():
        assert path.read_text() == text, f"{path.name} is stale: run python -m runpod_handler.hub"


def test_hub_json_has_the_documented_fields():
    assert isinstance(HUB["title"], str) and HUB["title"] and isinstance(HUB["description"], str)
    assert HUB["type"] == "serverless" and HUB["category"] == "image"
    config = HUB["config"]
    assert config["runsOn"] == "GPU" and config["gpuCount"] == 1
    assert isinstance(config["containerDiskInGb"], int) and config["containerDiskInGb"] >= 20
    assert set(config["gpuIds"].split(",")) <= GPU_POOLS
    versions = config["allowedCudaVersions"]
    assert versions and all(re.fullmatch(r"\d+\.\d+", v) for v in versions)
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert min(map(as_tuple, versions)) == as_tuple(image.BASE_CUDA)  # not older than the image's CUDA
    assert "/work" not in json.dumps(HUB)  # no path of the machine that generated it


def _accepted(monkeypatch, values: dict) -> None:
    """Settings as the worker would read them from these environment variables (ConfigError if not)."""
    for key, value in values.items():
        monkeypatch.setenv(key, str(value).lower() if isinstance(value, bool) else str(value))
    load_settings()


def test_every_env_entry_is_a_real_setting_with_a_valid_default_and_options(monkeypatch):
    entries = HUB["config"]["env"]
    keys = [e["key"] for e in entries]
    assert len(keys) == len(set(keys)) and set(keys) <= KNOB_NAMES
    assert {"RUNPOD_SERVERLESS", "DETECTOR_VARIANT", "SAM_MODEL_PATH", "CONFIDENCE_THRESHOLD"} <= set(keys)
    for entry in entries:
        field = entry["input"]
        assert field["name"] and field["description"] and field["type"] in ("string", "number", "boolean")
        if "default" in field:
            expected = {"string": str, "number": (int, float), "boolean": bool}[field["type"]]
            assert isinstance(field["default"], expected), entry
            _accepted(monkeypatch, {entry["key"]: field["default"]})
        for option in field.get("options", []):
            assert option["label"] and option["value"]
            _accepted(monkeypatch, {entry["key"]: option["value"]})
        monkeypatch.delenv(entry["key"], raising=False)
    advanced = {e["key"] for e in entries if e["input"].get("advanced")}
    assert "RUNPOD_SERVERLESS" not in advanced and "STEP_INSTANCES" in advanced


def test_a_setting_the_worker_refuses_is_caught_by_that_check(monkeypatch):
    with pytest.raises(ConfigError):
        _accepted(monkeypatch, {"DETECTOR_VARIANT": "huge"})


def test_presets_fast_and_quality_are_valid_settings(monkeypatch):
    presets = {p["name"].split()[0]: p["defaults"] for p in HUB["config"]["presets"]}
    assert presets["fast"] == {"DETECTOR_VARIANT": "nano", "SAM2_VARIANT": "tiny"}
    assert presets["quality"] == {"DETECTOR_VARIANT": "large", "SAM2_VARIANT": "large"}
    for values in presets.values():
        _accepted(monkeypatch, values)


def test_tests_json_jobs_are_valid_inputs_on_a_small_committed_image(monkeypatch):
    encoded = base64.b64encode((SAMPLES / "hub_test.jpg").read_bytes()).decode()
    assert len(encoded) < 50_000  # small enough to travel inline
    settings = load_settings()
    for test in TESTS["tests"]:
        assert test["name"] and isinstance(test["timeout"], int) and test["timeout"] > 0
        job = parse_job_input(test["input"], settings, settings.max_batch_images)
        assert job.items and all(data == base64.b64decode(encoded) for _, data in job.items)
    config = TESTS["config"]
    assert config["gpuTypeId"] and config["gpuCount"] == 1
    assert config["allowedCudaVersions"] == HUB["config"]["allowedCudaVersions"]
    values = {item["key"]: item["value"] for item in config["env"]}
    assert set(values) <= KNOB_NAMES
    _accepted(monkeypatch, values)


def test_test_input_json_is_a_valid_job_on_the_same_image():
    payload = json.loads((REPO / "test_input.json").read_text())
    settings = load_settings()
    job = parse_job_input(payload["input"], settings, settings.max_batch_images)
    assert job.items[0][1] == (SAMPLES / "hub_test.jpg").read_bytes()
    with pytest.raises(InputError):  # the same check refuses a broken job
        parse_job_input({"image": "%%%"}, settings, settings.max_batch_images)
