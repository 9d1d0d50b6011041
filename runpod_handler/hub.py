"""The RunPod Hub listing, generated so that it cannot drift from the code: `.runpod/hub.json` (metadata,
GPU pools, presets, and one env entry per user-facing setting of anomaly.config.KNOBS), `.runpod/tests.json`
(the jobs the Hub runs on a build) and the root `test_input.json` (what `python runpod_handler/handler.py`
runs with no arguments). `python -m runpod_handler.hub` writes all three; tests/test_hub.py fails when the
committed files are not what this module writes.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

from anomaly.config import KNOBS, REPO_ROOT, Knob
from runpod_handler import image

HUB_DIR = REPO_ROOT / ".runpod"
TEST_IMAGE = REPO_ROOT / "samples" / "hub_test.jpg"

# Shown first on the Hub; every other listed setting is under "advanced".
COMMON = (
    "RUNPOD_SERVERLESS", "DETECTOR_VARIANT", "DETECTOR_WEIGHTS", "SAM_MODEL_PATH", "SEGMENTER", "SAM2_VARIANT",
    "CONFIDENCE_THRESHOLD", "MM_PER_PIXEL", "ALLOW_UNTRAINED_WEIGHTS",
)  # fmt: skip
# Set by the image or by RunPod itself, or meaningless in a worker: not listed.
NOT_LISTED = (
    "API_HOST", "API_PORT", "PORT", "PORT_HEALTH", "TRITON_HOST", "TRITON_HTTP_PORT", "TRITON_GRPC_PORT",
    "TRITON_METRICS_PORT", "TRITON_HOME", "TRITON_URL",
)  # fmt: skip
BOOLEAN = ("ALLOW_UNTRAINED_WEIGHTS",)
NUMBER_WITHOUT_DEFAULT = ("DETECTOR_NUM_CLASSES", "MM_PER_PIXEL", "COMPUTE_THREADS")
# On the Hub the worker is a queue-based serverless one unless the user picks load balancing.
HUB_DEFAULTS = {"RUNPOD_SERVERLESS": "true"}
HUB_CHOICES = {"RUNPOD_SERVERLESS": ("true", "lb")}
ACRONYMS = {"Sam": "SAM", "Sam2": "SAM2", "Api": "API", "Cuda": "CUDA", "Mm": "mm", "Us": "(µs)", "Runpod": "RunPod"}

# SAM2.1 large + RF-DETR medium took 5.3 GB of GPU memory on an H100 (docs/performance.md):
# 16 GB cards hold it; the 24 and 48 GB pools come first for headroom with larger batches.
GPU_POOLS = "ADA_24,AMPERE_24,AMPERE_48,ADA_48_PRO,AMPERE_16"
PRESETS = {
    "fast (RF-DETR nano + SAM2.1 tiny)": {"DETECTOR_VARIANT": "nano", "SAM2_VARIANT": "tiny"},
    "quality (RF-DETR large + SAM2.1 large)": {"DETECTOR_VARIANT": "large", "SAM2_VARIANT": "large"},
}
# The Hub's test build has no weights: untrained models (flagged in every answer), the small ones.
TEST_ENV = {"ALLOW_UNTRAINED_WEIGHTS": "true", "DETECTOR_VARIANT": "nano", "SAM2_VARIANT": "tiny"}


def image_env(dockerfile: Path = REPO_ROOT / "Dockerfile") -> dict[str, str]:
    """KEY=value pairs of the Dockerfile's ENV instructions (what the running image starts with)."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    found = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            found |= dict(pair.split("=", 1) for pair in line[4:].split())
    return found


def allowed_cuda_versions() -> list[str]:
    """Host CUDA versions (driver) that run the image: its CUDA and later."""
    major, minor = (int(v) for v in image.BASE_CUDA.split("."))
    return [f"{major}.{m}" for m in range(minor, 10)] + ["13.0"]


def _title(key: str) -> str:
    words = [ACRONYMS.get(w.capitalize(), w.capitalize()) for w in key.split("_")]
    return " ".join([words[0], *(w if w.isupper() or w.startswith("(") else w.lower() for w in words[1:])])


def _typed(knob: Knob, value: str):
    if knob.name in BOOLEAN:
        return value.lower() in ("1", "true", "yes", "on")
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    if re.fullmatch(r"-?\d+\.\d*", value):
        return float(value)
    return value


def env_entry(knob: Knob, defaults: dict[str, str]) -> dict:
    default = HUB_DEFAULTS.get(knob.name, defaults.get(knob.name, knob.default)).replace(str(REPO_ROOT), "/app")
    value = _typed(knob, default)
    if knob.name in BOOLEAN:
        kind = "boolean"
    elif isinstance(value, (int, float)) or knob.name in NUMBER_WITHOUT_DEFAULT:
        kind = "number"
    else:
        kind = "string"
    entry: dict = {"name": _title(knob.name), "type": kind, "description": knob.doc.replace("`", "")}
    if default != "":
        entry["default"] = value
    choices = HUB_CHOICES.get(knob.name, knob.choices)
    if choices:
        entry["options"] = [{"label": choice, "value": choice} for choice in choices]
    if knob.name not in COMMON:
        entry["advanced"] = True
    return {"key": knob.name, "input": entry}


def hub_listing() -> dict:
    defaults = image_env()
    listed = [k for k in KNOBS if k.name not in NOT_LISTED]
    listed.sort(key=lambda k: (k.name not in COMMON, COMMON.index(k.name) if k.name in COMMON else 0))
    return {
        "title": "Infrastructure defect detection (RF-DETR + SAM3 / SAM2.1 on Triton)",
        "description": (
            "Photos of bridges, buildings and tunnels in; cracks, spalling, corrosion and other defects out, with "
            "boxes, masks, measured length, width, area and orientation (mm when the pixel size is known), crack "
            "severity and the structural element they sit on. RF-DETR detects, SAM3 (or SAM2.1) segments each "
            "defect box, all served by one Triton ensemble."
        ),
        "type": "serverless",
        "category": "image",
        "config": {
            "runsOn": "GPU",
            "containerDiskInGb": 40,
            "gpuCount": 1,
            "gpuIds": GPU_POOLS,
            "allowedCudaVersions": allowed_cuda_versions(),
            "presets": [{"name": name, "defaults": values} for name, values in PRESETS.items()],
            "env": [env_entry(knob, defaults) for knob in listed],
        },
    }


def test_jobs() -> dict:
    encoded = base64.b64encode(TEST_IMAGE.read_bytes()).decode()
    return {
        "tests": [
            {
                "name": "one_frame",
                "input": {"image": encoded, "frame_id": "hub-test-1", "include_masks": True},
                "timeout": 900_000,  # ms: a cold start exports the detector and loads Triton first
            },
            {
                "name": "batch_of_two",
                "input": {"images": [encoded, encoded], "frame_ids": ["hub-test-2", "hub-test-3"]},
                "timeout": 300_000,
            },
        ],
        "config": {
            "gpuTypeId": "NVIDIA GeForce RTX 4090",
            "gpuCount": 1,
            "env": [{"key": key, "value": value} for key, value in TEST_ENV.items()],
            "allowedCudaVersions": allowed_cuda_versions(),
        },
    }


def test_input() -> dict:
    return {"input": {"image": base64.b64encode(TEST_IMAGE.read_bytes()).decode(), "frame_id": "test-input-1"}}


def files() -> dict[Path, str]:
    as_text = lambda data: json.dumps(data, indent=2, ensure_ascii=False) + "\n"  # noqa: E731
    return {
        HUB_DIR / "hub.json": as_text(hub_listing()),
        HUB_DIR / "tests.json": as_text(test_jobs()),
        REPO_ROOT / "test_input.json": as_text(test_input()),
    }


def main() -> int:
    for path, text in files().items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
