"""Repository hygiene that users rely on: lint, the Dockerfile, the settings, CI, the model repository (the docs' own
promises: tests/test_docs.py)."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys

import pytest

from anomaly import config as config_module
from anomaly.config import KNOBS, ConfigError, Settings, load_settings
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_dockerfile_shape():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{TRITON_IMAGE\}", text, re.M) and "tritonserver" in text
    assert re.search(r"^USER 1000", text, re.M)  # non-root
    assert "HEALTHCHECK" in text and "runpod_handler.healthcheck" in text
    assert 'ENTRYPOINT ["python", "-m", "runpod_handler.entrypoint"]' in text
    for port in ("8000", "8001", "8002", "8080"):
        assert port in re.search(r"^EXPOSE (.*)$", text, re.M).group(1)


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in README


@pytest.mark.parametrize(
    "name,value",
    [
        ("CONFIDENCE_THRESHOLD", "2"),
        ("CONFIDENCE_THRESHOLD", "nan"),
        ("MM_PER_PIXEL", "inf"),
        ("SAM2_VARIANT", "huge"),
        ("RUNPOD_SERVERLESS", "maybe"),
    ],
)
def test_bad_settings_name_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()


def test_settings_fields_are_the_knobs():
    """Settings declares one typed field per knob, in the table's order, typed as the knob's parser returns."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(Settings)
    assert [f.name for f in dataclasses.fields(Settings)] == [k.setting for k in KNOBS]
    for knob in KNOBS:
        parsed = knob.parse.__annotations__["return"] if knob.parse else "str"
        assert hints[knob.setting] == eval(parsed, vars(config_module)), knob.name  # noqa: S307 - our own annotations


def test_every_checked_setting_refuses_nonsense_by_name(monkeypatch):
    """Settings and their checking come from the KNOBS table alone: every knob with a parser (paths and
    addresses take any text) refuses a value that is no number, choice or boolean, naming the knob."""
    takes_any_text = {"WEIGHTS_DIR", "MODEL_REPOSITORY", "TRITON_URL"}
    checked = [k for k in KNOBS if k.parse is not None and k.name not in takes_any_text]
    assert len(checked) > 25
    for knob in checked:
        monkeypatch.setenv(knob.name, "nonsense")
        with pytest.raises(ConfigError, match=knob.name):
            load_settings()
        monkeypatch.delenv(knob.name)


def test_settings_defaults_taken_from_other_knobs(monkeypatch):
    monkeypatch.setenv("PORT", "9123")
    monkeypatch.setenv("TRITON_HOST", "0.0.0.0")
    monkeypatch.setenv("TRITON_GRPC_PORT", "9001")
    monkeypatch.delenv("PORT_HEALTH", raising=False)
    monkeypatch.delenv("TRITON_URL", raising=False)
    s = load_settings()
    assert (s.port_health, s.triton_url) == (9123, "127.0.0.1:9001")  # a bind-all host is reached on loopback
    assert pickle.loads(pickle.dumps(s)) == s  # settings can be handed to another process
    monkeypatch.setenv("PORT_HEALTH", "9124")
    monkeypatch.setenv("TRITON_URL", "triton:8001")
    s = load_settings()
    assert (s.port_health, s.triton_url) == (9124, "triton:8001")


def test_model_repository_copies_to_a_volume(tmp_path):
    from runpod_handler.entrypoint import sync_model_repository

    sync_model_repository(tmp_path / "repo")
    models = {p.parent.name for p in (tmp_path / "repo").glob("*/config.pbtxt")}
    assert models == {
        "preprocess",
        "detector",
        "select_detections",
        "segmenter",
        "geometry",
        "result",
        "anomaly_pipeline",
    }
    assert (tmp_path / "repo" / "segmenter" / "1" / "model.py").is_file()
    assert (tmp_path / "repo" / "anomaly_pipeline" / "1").is_dir()


def test_triton_models_stay_thin():
    """The logic lives in the anomaly package; a Triton model file only wires it in."""
    for model in (REPO / "model_repository").glob("*/1/model.py"):
        lines = [line for line in model.read_text().splitlines() if line.strip()]
        assert len(lines) <= 60, f"{model} has {len(lines)} lines"


def test_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "client.cli", "--help"], capture_output=True, text=True, check=True)
    assert "detect" in out.stdout and "measure" in out.stdout
