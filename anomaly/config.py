"""Every environment variable the service reads, with its default, in one place.

Each Knob carries its default, its description and its parser; `Settings` has a typed field per knob, which an
editor and a type checker see (a test holds the two together). `settings()` reads them once per process.
docs/configuration.md is generated from KNOBS (`python -m anomaly.config --markdown`), and a test fails when it
is stale.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from anomaly.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("nano", "small", "medium", "large")
SAM2_VARIANTS = ("tiny", "small", "base_plus", "large")
# RUNPOD_SERVERLESS -> how the container serves: the guide's true/false (and their spellings), and `lb`
RUNPOD_MODES = {
    **dict.fromkeys(("false", "0", "no", "off"), "pod"),
    **dict.fromkeys(("true", "1", "yes", "on"), "serverless"),
    "lb": "lb",
}


# A parser turns a knob's raw text into its setting, raising ConfigError that names the knob. It also sees the
# settings parsed before it (by field name), for defaults taken from another knob.
Parser = Callable[["Knob", str, dict[str, Any]], Any]


@dataclass(frozen=True)
class Knob:
    name: str
    default: str
    doc: str
    choices: tuple[str, ...] = ()  # the values it accepts, where it is a choice (checked, and listed on the Hub)
    parse: Parser | None = None  # None: the text as it is
    field: str = ""  # its name in Settings (default: the knob's name in lower case)
    section: str = ""  # set on the first knob of a group: the heading docs/configuration.md gives the group

    @property
    def setting(self) -> str:
        return self.field or self.name.lower()


def _number(knob: Knob, raw: str, kind: type, lo: float | None, hi: float | None = None):
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{knob.name}={raw!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value):  # float() reads "nan" and "inf", which no bound check refuses
        raise ConfigError(f"{knob.name}={raw!r} is not a finite number")
    if lo is not None and value < lo:
        raise ConfigError(f"{knob.name}={raw} must be at least {lo}" + (f" and at most {hi}" if hi is not None else ""))
    if hi is not None and value > hi:
        raise ConfigError(f"{knob.name}={raw} must be at most {hi}")
    return value


def _int(knob: Knob, raw: str, parsed: dict) -> int:
    return _number(knob, raw, int, 1)


def _count(knob: Knob, raw: str, parsed: dict) -> int:
    """An integer that may be 0."""
    return _number(knob, raw, int, 0)


def _optional_int(knob: Knob, raw: str, parsed: dict) -> int | None:
    return _int(knob, raw, parsed) if raw else None


def _auto_int(knob: Knob, raw: str, parsed: dict) -> int | None:
    """A positive integer, or None for `auto` (resolved where the machine is known: anomaly.serving)."""
    return None if raw.lower() == "auto" else _int(knob, raw, parsed)


def _fraction(knob: Knob, raw: str, parsed: dict) -> float:
    return _number(knob, raw, float, 0.0, 1.0)


def _grace(knob: Knob, raw: str, parsed: dict) -> float:
    return _number(knob, raw, float, 1.0, 600.0)


def _optional_positive(knob: Knob, raw: str, parsed: dict) -> float | None:
    if not raw:
        return None
    value = _number(knob, raw, float, None)
    if value <= 0:
        raise ConfigError(f"{knob.name}={raw} must be positive")
    return value


def _bool(knob: Knob, raw: str, parsed: dict) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{knob.name}={raw!r} is not a boolean (use true/false)")


def _choice(knob: Knob, raw: str, parsed: dict) -> str:
    if raw.lower() not in knob.choices:
        raise ConfigError(f"{knob.name}={raw.lower()!r} must be one of {', '.join(knob.choices)}")
    return raw.lower()


def _path(knob: Knob, raw: str, parsed: dict) -> Path:
    return Path(raw)


def _runpod_mode(knob: Knob, raw: str, parsed: dict) -> str:
    """`pod`, `serverless` (queue-based worker) or `lb` (load-balancing endpoint)."""
    if raw.lower() not in RUNPOD_MODES:
        raise ConfigError(
            f"{knob.name}={raw.lower()!r} must be true (queue-based serverless worker), lb (load-balancing "
            "serverless endpoint) or false (pod)"
        )
    return RUNPOD_MODES[raw.lower()]


def _severity(knob: Knob, raw: str, parsed: dict) -> tuple[float, float, float]:
    try:
        bands = tuple(float(x) for x in raw.split(","))
    except ValueError:
        raise ConfigError(f"{knob.name}={raw!r} must be three comma-separated numbers") from None
    if len(bands) != 3 or not (0 < bands[0] < bands[1] < bands[2]):
        raise ConfigError(f"{knob.name}={raw!r} must be three increasing positive numbers")
    return bands  # type: ignore[return-value]


def _port_health(knob: Knob, raw: str, parsed: dict) -> int:
    return _int(knob, raw, parsed) if raw else parsed["port"]


def _triton_url(knob: Knob, raw: str, parsed: dict) -> str:
    host = parsed["triton_host"]
    return raw or f"{'127.0.0.1' if host == '0.0.0.0' else host}:{parsed['triton_grpc_port']}"


def _threads(knob: Knob, raw: str, parsed: dict) -> int:
    return _int(knob, raw, parsed) if raw else (os.cpu_count() or 1)


def _auto_is_on(knob: Knob, raw: str, parsed: dict) -> bool:
    """`auto` or `off` -> on or off."""
    return _choice(knob, raw, parsed) == "auto"


KNOBS: tuple[Knob, ...] = (
    Knob(
        "RUNPOD_SERVERLESS",
        "false",
        "`true`: queue-based serverless worker; `lb`: load-balancing serverless endpoint (the REST API and "
        "`/ping` on `PORT`); `false`: pod mode (REST gateway)",
        ("false", "true", "lb"),
        parse=_runpod_mode,
        field="runpod_mode",
        section="The deployment guide's variables (names and meanings kept)",
    ),
    Knob("DETECTOR_VARIANT", "medium", "RF-DETR size: `nano`, `small`, `medium` or `large`", VARIANTS, parse=_choice),
    Knob(
        "DETECTOR_WEIGHTS",
        "",
        "path to fine-tuned RF-DETR weights (.pth; one that `anomaly train` or rfdetr wrote is served as the size and "
        "with the classes it says); empty: official COCO weights",
    ),
    Knob(
        "DETECTOR_NUM_CLASSES",
        "",
        "number of classes of DETECTOR_WEIGHTS (read from the checkpoint if empty)",
        parse=_optional_int,
    ),
    Knob(
        "SAM_MODEL_PATH",
        "/models/sam3.pt",
        "segmenter weights: Meta's SAM3 `sam3.pt` or a SAM2.1 checkpoint, told apart by their contents",
    ),
    Knob(
        "SEGMENTER",
        "auto",
        "`auto`: what SAM_MODEL_PATH holds, SAM2.1 (`SAM2_VARIANT`) when it is missing or unusable; `sam3` or "
        "`sam2.1`: only that one",
        ("auto", "sam3", "sam2.1"),
        parse=_choice,
    ),
    Knob(
        "CONFIDENCE_THRESHOLD", "0.3", "default detection threshold in [0, 1], overridable per request", parse=_fraction
    ),
    Knob("API_HOST", "0.0.0.0", "REST gateway host (pod mode)"),
    Knob("API_PORT", "8080", "REST gateway port (pod mode); 8000 is Triton's HTTP port", parse=_int),
    Knob("API_KEY", "", "when set, REST requests need `Authorization: Bearer <key>` (`/health` and `/ping` stay open)"),
    Knob("PORT", "80", "load-balancing mode: the port of the REST API and `/ping` (RunPod sets it)", parse=_int),
    Knob(
        "PORT_HEALTH",
        "",
        "load-balancing mode: the port of `/ping` (RunPod sets it; default `PORT`)",
        parse=_port_health,
    ),
    Knob(
        "DETECTOR_LABELS",
        "",
        "labels file (JSON or one name per line) overriding the checkpoint's classes",
        section="Detector",
    ),
    Knob(
        "ALLOW_UNTRAINED_WEIGHTS",
        "0",
        "`1`: build untrained models when no weights exist (tests, demo)",
        parse=_bool,
        field="allow_untrained",
    ),
    Knob("MAX_DETECTIONS", "100", "most defects segmented per image; more are reported in `warnings`", parse=_int),
    Knob(
        "SAM2_VARIANT",
        "large",
        "SAM2.1 size when no checkpoint names it: `tiny`, `small`, `base_plus`, `large`",
        SAM2_VARIANTS,
        parse=_choice,
        section="Segmenter",
    ),
    Knob("WEIGHTS_DIR", str(REPO_ROOT / "weights"), "where exported and untrained weights are kept", parse=_path),
    Knob(
        "MAX_IMAGE_BYTES",
        str(40 * 1024 * 1024),
        "largest encoded image accepted, in bytes",
        parse=_int,
        section="Images",
    ),
    Knob("MAX_IMAGE_PIXELS", str(50_000_000), "largest decoded image accepted, width x height", parse=_int),
    Knob(
        "TILING",
        "auto",
        "`auto`: photos whose long side is over 4x the detector's input are detected in tiles at their own scale "
        "and segmented in full-resolution windows; `on`: any photo larger than a tile; `off`: never. Per request: "
        "`tiling`",
        ("auto", "off", "on"),
        parse=_choice,
    ),
    Knob("TILE_OVERLAP", "64", "pixels neighbouring detector tiles share (at most half a tile)", parse=_count),
    Knob(
        "MM_PER_PIXEL",
        "",
        "default pixel size in mm; adds `*_mm` fields and crack severity",
        parse=_optional_positive,
        section="Measurement",
    ),
    Knob(
        "SEVERITY_THRESHOLDS_MM",
        "0.1,0.3,1.0",
        "crack max-width band limits in mm (hairline/fine/medium/wide)",
        parse=_severity,
    ),
    Knob(
        "MODEL_REPOSITORY",
        str(REPO_ROOT / "model_repository"),
        "Triton model repository",
        parse=_path,
        section="Triton, the REST gateway and the serverless worker",
    ),
    Knob("TRITON_HOST", "127.0.0.1", "address Triton binds (a container sets 0.0.0.0)"),
    Knob("TRITON_HTTP_PORT", "8000", "Triton HTTP port", parse=_int),
    Knob("TRITON_GRPC_PORT", "8001", "Triton gRPC port", parse=_int),
    Knob("TRITON_METRICS_PORT", "8002", "Triton metrics port", parse=_int),
    Knob("TRITON_HOME", "", "folder holding bin/tritonserver (default: the nvidia-pytriton wheel in .triton/)"),
    Knob(
        "TRITON_TRACE_FILE",
        "",
        "file for Triton's request traces; tracing stays off until a client turns it on through Triton's trace API "
        "(make bench-gpu does, for its timeline of one frame); empty: no tracing",
    ),
    Knob(
        "TRITON_URL",
        "",
        "Triton gRPC address the handler and gateway use (default TRITON_HOST:TRITON_GRPC_PORT)",
        parse=_triton_url,
    ),
    Knob(
        "MAX_BATCH_IMAGES",
        "16",
        "most images in one batch request (REST /detect/batch, serverless `images`)",
        parse=_int,
    ),
    Knob("MAX_REQUEST_BYTES", str(100 * 1024 * 1024), "largest REST request body, in bytes (larger: 413)", parse=_int),
    Knob(
        "RUNPOD_CONCURRENCY",
        "4",
        "jobs one serverless worker keeps in flight (runpod concurrency_modifier)",
        parse=_int,
    ),
    Knob(
        "TRITON_READY_TIMEOUT", "900", "seconds the entrypoint and handler wait for Triton to become ready", parse=_int
    ),
    Knob(
        "SHUTDOWN_GRACE_S",
        "8",
        "seconds SIGTERM leaves requests in flight to finish (gateway, then Triton) before stopping hard",
        parse=_grace,
    ),
    Knob("COMPUTE_THREADS", "", "CPU threads for the detector and the segmenter (default: all cores)", parse=_threads),
    Knob("DEVICE", "auto", "`auto`, `cpu` or `cuda`", ("auto", "cpu", "cuda"), parse=_choice),
    Knob(
        "DETECTOR_BACKEND",
        "auto",
        "`auto`, `tensorrt`, `onnxruntime` or `torch`: what runs RF-DETR (auto: TensorRT, else onnxruntime's CUDA "
        "provider, else torch on a GPU; onnxruntime on a CPU)",
        ("auto", "tensorrt", "onnxruntime", "torch"),
        parse=_choice,
        section="Serving on GPUs",
    ),
    Knob(
        "DETECTOR_PRECISION",
        "fp32",
        "`fp32` or `fp16`: RF-DETR's arithmetic on a GPU under TensorRT or torch (fp32 is exact: no TF32; fp16 "
        "saves ~1.7 ms a frame and moves untrained scores by up to 0.09, check it with your weights)",
        ("fp32", "fp16"),
        parse=_choice,
    ),
    Knob(
        "BATCH_FRAMES",
        "auto",
        "most frames the detector and the segmenter run as one batch (auto: detector 8, segmenter 2 on a GPU "
        "(SAM2.1-L activations); detector 8, segmenter 1 on a CPU)",
        parse=_auto_int,
    ),
    Knob(
        "CUDA_GRAPHS",
        "auto",
        "`auto`: on a GPU the torch detector, the SAM image encoder and SAM's mask decoder replay CUDA graphs (one "
        "per batch size or box count); `off`: eager (less GPU memory, faster start)",
        ("auto", "off"),
        parse=_auto_is_on,
    ),
    Knob(
        "SAM_COMPILE",
        "off",
        "`off`, `encoder` or `all`: SAM's image encoder (`all`: and its prompt encoder + mask decoder, one compile "
        "for every box count) compiled by inductor (torch.compile, default mode) when the segmenter loads, before "
        "its CUDA graphs are captured; its kernels are kept in WEIGHTS_DIR/inductor_cache for the next start (the "
        "first compile takes minutes)",
        ("off", "encoder", "all"),
        parse=_choice,
    ),
    Knob(
        "HIDE_GPU_FROM_TRITON",
        "off",
        "`off`: tritonserver sees the GPU (Triton's /metrics include GPU metrics); `auto` (on trial, docs/"
        "performance.md): on a GPU machine tritonserver itself starts with the GPU hidden (its steps pass only CPU "
        "tensors, and a CUDA context of its own held 0.5 GB on an H100), the detector's and SAM's processes see it",
        ("auto", "off"),
        parse=_auto_is_on,
    ),
    Knob(
        "CUDA_MPS",
        "off",
        "`on`: on a GPU machine the launcher starts NVIDIA's MPS control daemon (`nvidia-cuda-mps-control`) before "
        "Triton, so that the detector's and SAM's processes share one GPU context and run their kernels on the card "
        "at once instead of by time slices; where MPS cannot start, Triton starts without it and the log says why",
        ("off", "on"),
        parse=_choice,
    ),
    Knob(
        "OVERLAP_BATCHES",
        "off",
        "`off`: one batch at a time inside Triton's execute; `auto` (on trial, docs/performance.md): the detector "
        "and SAM, where they run on a GPU, take the next batch in (checks, decoding) while the card runs the last "
        "one, and answer from a thread of their own; `on`: on a CPU too",
        ("auto", "on", "off"),
        parse=_choice,
    ),
    Knob(
        "EARLY_EMBEDDING",
        "off",
        "`off`: SAM embeds each frame once its boxes are known; `auto` (on trial, docs/performance.md): on a GPU "
        "machine the ensemble asks SAM to embed each frame from its image alone, in parallel with the detector, "
        "while SAM has nothing else to do, and its boxes are decoded from that embedding; `on`: on a CPU too",
        ("auto", "on", "off"),
        parse=_choice,
    ),
    Knob("BATCH_DELAY_US", "0", "how long Triton holds a frame for a fuller batch, in microseconds", parse=_count),
    Knob(
        "STEP_INSTANCES",
        "auto",
        "instances of each CPU step (preprocess, select_detections, geometry, result) (auto: cores / 4 on a GPU "
        "machine, 1 on a CPU)",
        parse=_auto_int,
    ),
    Knob(
        "GEOMETRY_WORKERS",
        "1",
        "processes measuring one frame's masks, the geometry step's own included; `auto` (on trial, docs/"
        "performance.md): cores / 4, at most 4, on a GPU machine, 1 on a CPU",
        parse=_auto_int,
    ),
)

_DEFAULTS = {k.name: k.default for k in KNOBS}


def env(name: str) -> str:
    """The raw value of a knob (its default when unset or empty)."""
    if name not in _DEFAULTS:
        raise KeyError(f"{name} is not a documented knob; add it to anomaly.config.KNOBS")
    value = os.environ.get(name, "").strip()
    return value if value else _DEFAULTS[name]


@dataclass(frozen=True)
class Settings:
    """Every knob, parsed: one field per KNOBS entry, in its order, named as its `setting` and typed as its parser
    returns (tests/test_repository.py holds the two together)."""

    runpod_mode: str
    detector_variant: str
    detector_weights: str
    detector_num_classes: int | None
    sam_model_path: str
    segmenter: str
    confidence_threshold: float
    api_host: str
    api_port: int
    api_key: str
    port: int
    port_health: int
    detector_labels: str
    allow_untrained: bool
    max_detections: int
    sam2_variant: str
    weights_dir: Path
    max_image_bytes: int
    max_image_pixels: int
    tiling: str
    tile_overlap: int
    mm_per_pixel: float | None
    severity_thresholds_mm: tuple[float, float, float]
    model_repository: Path
    triton_host: str
    triton_http_port: int
    triton_grpc_port: int
    triton_metrics_port: int
    triton_home: str
    triton_trace_file: str
    triton_url: str
    max_batch_images: int
    max_request_bytes: int
    runpod_concurrency: int
    triton_ready_timeout: int
    shutdown_grace_s: float
    compute_threads: int
    device: str
    detector_backend: str
    detector_precision: str
    batch_frames: int | None
    cuda_graphs: bool
    sam_compile: str
    hide_gpu_from_triton: bool
    cuda_mps: str
    overlap_batches: str
    early_embedding: str
    batch_delay_us: int
    step_instances: int | None
    geometry_workers: int | None


def load_settings() -> Settings:
    """Read every knob from the environment, raising ConfigError naming the first bad one."""
    parsed: dict[str, Any] = {}
    for knob in KNOBS:
        raw = env(knob.name)
        parsed[knob.setting] = knob.parse(knob, raw, parsed) if knob.parse else raw
    return Settings(**parsed)


@lru_cache(maxsize=1)
def settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()


def configuration_markdown() -> str:
    """docs/configuration.md: every knob, by section, with its default and what it does (`make docs` writes it)."""

    def default(knob: Knob) -> str:
        if knob.default.startswith(str(REPO_ROOT)):
            return f"`{Path(knob.default).relative_to(REPO_ROOT)}/`"
        return f"`{knob.default}`" if knob.default else ""

    lines = [
        "# Configuration",
        "",
        "<!-- Generated from anomaly/config.py (KNOBS) by `make docs`; tests/test_docs.py fails when it is stale. -->",
        "",
        "Every setting is an environment variable, read once per process by `anomaly/config.py`. A value that is",
        "not valid stops the start with a message naming the variable (`CONFIDENCE_THRESHOLD=2 must be at most",
        "1.0`); an empty value is the default. Per-request options (threshold, masks, pixel size, tiling) are in",
        "[the API](api.md#request-options); how settings change speed and memory is in [performance](performance.md).",
    ]
    for knob in KNOBS:
        if knob.section:
            lines += ["", f"## {knob.section}", "", "| variable | default | meaning |", "|---|---|---|"]
        lines.append(f"| `{knob.name}` | {default(knob)} | {knob.doc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m anomaly.config --markdown   (prints docs/configuration.md)")
    sys.stdout.write(configuration_markdown())
