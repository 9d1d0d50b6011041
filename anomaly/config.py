"""Every environment variable the service reads, with its default, in one place.

`settings()` reads them once per process. The README's table is checked against KNOBS by a test, so a knob
added here without documentation fails the suite.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

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


@dataclass(frozen=True)
class Knob:
    name: str
    default: str
    doc: str
    choices: tuple[str, ...] = ()  # the values it accepts, where it is a choice (checked, and listed on the Hub)


KNOBS: tuple[Knob, ...] = (
    # --- the original RunPod API's variables (names and meanings kept) ---
    Knob(
        "RUNPOD_SERVERLESS",
        "false",
        "`true`: queue-based serverless worker; `lb`: load-balancing serverless endpoint (the REST API and "
        "`/ping` on `PORT`); `false`: pod mode (REST gateway)",
        ("false", "true", "lb"),
    ),
    Knob("DETECTOR_VARIANT", "medium", "RF-DETR size: `nano`, `small`, `medium` or `large`", VARIANTS),
    Knob("DETECTOR_WEIGHTS", "", "path to fine-tuned RF-DETR weights (.pth); empty: official COCO weights"),
    Knob(
        "DETECTOR_NUM_CLASSES",
        "",
        "number of classes of DETECTOR_WEIGHTS (read from the checkpoint if empty)",
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
    ),
    Knob("CONFIDENCE_THRESHOLD", "0.3", "default detection threshold in [0, 1], overridable per request"),
    Knob("API_HOST", "0.0.0.0", "REST gateway host (pod mode)"),
    Knob("API_PORT", "8080", "REST gateway port (pod mode); 8000 is Triton's HTTP port"),
    Knob("API_KEY", "", "when set, REST requests need `Authorization: Bearer <key>` (`/health` and `/ping` stay open)"),
    Knob("PORT", "80", "load-balancing mode: the port of the REST API and `/ping` (RunPod sets it)"),
    Knob("PORT_HEALTH", "", "load-balancing mode: the port of `/ping` (RunPod sets it; default `PORT`)"),
    # --- detector ---
    Knob("DETECTOR_LABELS", "", "labels file (JSON or one name per line) overriding the checkpoint's classes"),
    Knob("ALLOW_UNTRAINED_WEIGHTS", "0", "`1`: build untrained models when no weights exist (tests, demo)"),
    Knob("MAX_DETECTIONS", "100", "most defects segmented per image; more are reported in `warnings`"),
    # --- segmenter ---
    Knob(
        "SAM2_VARIANT",
        "large",
        "SAM2.1 size when no checkpoint names it: `tiny`, `small`, `base_plus`, `large`",
        SAM2_VARIANTS,
    ),
    Knob("WEIGHTS_DIR", str(REPO_ROOT / "weights"), "where exported and untrained weights are kept"),
    # --- images ---
    Knob("MAX_IMAGE_BYTES", str(40 * 1024 * 1024), "largest encoded image accepted, in bytes"),
    Knob("MAX_IMAGE_PIXELS", str(50_000_000), "largest decoded image accepted, width x height"),
    Knob(
        "TILING",
        "auto",
        "`auto`: photos whose long side is over 4x the detector's input are detected in tiles at their own scale "
        "and segmented in full-resolution windows; `on`: any photo larger than a tile; `off`: never. Per request: "
        "`tiling`",
        ("auto", "off", "on"),
    ),
    Knob("TILE_OVERLAP", "64", "pixels neighbouring detector tiles share (at most half a tile)"),
    # --- measurement ---
    Knob("MM_PER_PIXEL", "", "default pixel size in mm; adds `*_mm` fields and crack severity"),
    Knob(
        "SEVERITY_THRESHOLDS_MM",
        "0.1,0.3,1.0",
        "crack max-width band limits in mm (hairline/fine/medium/wide)",
    ),
    # --- Triton ---
    Knob("MODEL_REPOSITORY", str(REPO_ROOT / "model_repository"), "Triton model repository"),
    Knob("TRITON_HOST", "127.0.0.1", "address Triton binds (a container sets 0.0.0.0)"),
    Knob("TRITON_HTTP_PORT", "8000", "Triton HTTP port"),
    Knob("TRITON_GRPC_PORT", "8001", "Triton gRPC port"),
    Knob("TRITON_METRICS_PORT", "8002", "Triton metrics port"),
    Knob("TRITON_HOME", "", "folder holding bin/tritonserver (default: the nvidia-pytriton wheel in .triton/)"),
    Knob(
        "TRITON_URL",
        "",
        "Triton gRPC address the handler and gateway use (default TRITON_HOST:TRITON_GRPC_PORT)",
    ),
    Knob("MAX_BATCH_IMAGES", "16", "most images in one batch request (REST /detect/batch, serverless `images`)"),
    Knob("MAX_REQUEST_BYTES", str(100 * 1024 * 1024), "largest REST request body, in bytes (larger: 413)"),
    Knob("RUNPOD_CONCURRENCY", "4", "jobs one serverless worker keeps in flight (runpod concurrency_modifier)"),
    Knob("TRITON_READY_TIMEOUT", "900", "seconds the entrypoint and handler wait for Triton to become ready"),
    Knob(
        "SHUTDOWN_GRACE_S",
        "8",
        "seconds SIGTERM leaves requests in flight to finish (gateway, then Triton) before stopping hard",
    ),
    Knob("COMPUTE_THREADS", "", "CPU threads for the detector and the segmenter (default: all cores)"),
    Knob("DEVICE", "auto", "`auto`, `cpu` or `cuda`", ("auto", "cpu", "cuda")),
    # --- serving on GPUs (README, "Concurrency") ---
    Knob(
        "DETECTOR_BACKEND",
        "auto",
        "`auto`, `tensorrt`, `onnxruntime` or `torch`: what runs RF-DETR (auto: TensorRT, else onnxruntime's CUDA "
        "provider, else torch on a GPU; onnxruntime on a CPU)",
        ("auto", "tensorrt", "onnxruntime", "torch"),
    ),
    Knob(
        "DETECTOR_PRECISION",
        "fp32",
        "`fp32` or `fp16`: RF-DETR's arithmetic on a GPU under TensorRT or torch (fp32 is exact: no TF32; fp16 "
        "saves ~1.7 ms a frame and moves untrained scores by up to 0.09, check it with your weights)",
        ("fp32", "fp16"),
    ),
    Knob(
        "BATCH_FRAMES",
        "auto",
        "most frames the detector and the segmenter run as one batch (auto: detector 8, segmenter 2 on a GPU "
        "(SAM2.1-L activations); detector 8, segmenter 1 on a CPU)",
    ),
    Knob(
        "CUDA_GRAPHS",
        "auto",
        "`auto`: on a GPU the torch detector, the SAM image encoder and SAM's mask decoder replay CUDA graphs (one "
        "per batch size or box count); `off`: eager (less GPU memory, faster start)",
        ("auto", "off"),
    ),
    Knob("BATCH_DELAY_US", "0", "how long Triton holds a frame for a fuller batch, in microseconds"),
    Knob(
        "STEP_INSTANCES",
        "auto",
        "instances of each CPU step (preprocess, select_detections, geometry, result) (auto: cores / 4 on a GPU "
        "machine, 1 on a CPU)",
    ),
    Knob("GEOMETRY_THREADS", "auto", "threads measuring one frame's masks (auto: 4 on a GPU machine, 1 on a CPU)"),
)

_DEFAULTS = {k.name: k.default for k in KNOBS}
_CHOICES = {k.name: k.choices for k in KNOBS if k.choices}


def env(name: str) -> str:
    """The raw value of a knob (its default when unset or empty)."""
    if name not in _DEFAULTS:
        raise KeyError(f"{name} is not a documented knob; add it to anomaly.config.KNOBS")
    value = os.environ.get(name, "").strip()
    return value if value else _DEFAULTS[name]


def _float(name: str, lo: float | None = None, hi: float | None = None, allow_empty: bool = False) -> float | None:
    raw = env(name)
    if raw == "" and allow_empty:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{name}={raw} is outside [{lo}, {hi}]")
    return value


def _int(name: str, lo: int = 1) -> int:
    raw = env(name)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < lo:
        raise ConfigError(f"{name}={raw} must be at least {lo}")
    return value


def _auto_int(name: str) -> int | None:
    """A positive integer, or None for `auto` (resolved where the machine is known: anomaly.serving)."""
    return None if env(name).lower() == "auto" else _int(name)


def _bool(name: str) -> bool:
    raw = env(name).lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use true/false)")


def _choice(name: str) -> str:
    raw, choices = env(name).lower(), _CHOICES[name]
    if raw not in choices:
        raise ConfigError(f"{name}={raw!r} must be one of {', '.join(choices)}")
    return raw


def _runpod_mode() -> str:
    """`pod`, `serverless` (queue-based worker) or `lb` (load-balancing endpoint)."""
    raw = env("RUNPOD_SERVERLESS").lower()
    if raw not in RUNPOD_MODES:
        raise ConfigError(
            f"RUNPOD_SERVERLESS={raw!r} must be true (queue-based serverless worker), lb (load-balancing "
            "serverless endpoint) or false (pod)"
        )
    return RUNPOD_MODES[raw]


@dataclass(frozen=True)
class Settings:
    runpod_mode: str  # pod, serverless (queue-based worker) or lb (load-balancing endpoint)
    detector_variant: str
    detector_weights: str
    detector_num_classes: int | None
    detector_labels: str
    allow_untrained: bool
    max_detections: int
    sam_model_path: str
    segmenter: str  # auto, sam3 or sam2.1
    sam2_variant: str
    weights_dir: Path
    confidence_threshold: float
    max_image_bytes: int
    max_image_pixels: int
    tiling: str  # auto, off or on: the default of the request's `tiling`
    tile_overlap: int
    mm_per_pixel: float | None
    severity_thresholds_mm: tuple[float, float, float]
    api_host: str
    api_port: int
    api_key: str
    port: int
    port_health: int
    model_repository: Path
    triton_host: str
    triton_http_port: int
    triton_grpc_port: int
    triton_metrics_port: int
    triton_home: str
    triton_url: str
    compute_threads: int
    device: str
    max_batch_images: int
    max_request_bytes: int
    runpod_concurrency: int
    triton_ready_timeout: int
    shutdown_grace_s: float
    detector_backend: str
    detector_precision: str
    batch_frames: int | None  # None: auto
    cuda_graphs: bool
    batch_delay_us: int
    step_instances: int | None  # None: auto
    geometry_threads: int | None  # None: auto


def _severity() -> tuple[float, float, float]:
    raw = env("SEVERITY_THRESHOLDS_MM")
    try:
        bands = tuple(float(x) for x in raw.split(","))
    except ValueError:
        raise ConfigError(f"SEVERITY_THRESHOLDS_MM={raw!r} must be three comma-separated numbers") from None
    if len(bands) != 3 or not (0 < bands[0] < bands[1] < bands[2]):
        raise ConfigError(f"SEVERITY_THRESHOLDS_MM={raw!r} must be three increasing positive numbers")
    return bands  # type: ignore[return-value]


def load_settings() -> Settings:
    """Read every knob from the environment, raising ConfigError naming the first bad one."""
    num_classes = env("DETECTOR_NUM_CLASSES")
    threads = env("COMPUTE_THREADS")
    mm = _float("MM_PER_PIXEL", 0.0, None, allow_empty=True)
    if mm is not None and mm <= 0:
        raise ConfigError(f"MM_PER_PIXEL={mm} must be positive")
    host = env("TRITON_HOST")
    grpc_port = _int("TRITON_GRPC_PORT")
    return Settings(
        runpod_mode=_runpod_mode(),
        detector_variant=_choice("DETECTOR_VARIANT"),
        detector_weights=env("DETECTOR_WEIGHTS"),
        detector_num_classes=_int("DETECTOR_NUM_CLASSES") if num_classes else None,
        detector_labels=env("DETECTOR_LABELS"),
        allow_untrained=_bool("ALLOW_UNTRAINED_WEIGHTS"),
        max_detections=_int("MAX_DETECTIONS"),
        sam_model_path=env("SAM_MODEL_PATH"),
        segmenter=_choice("SEGMENTER"),
        sam2_variant=_choice("SAM2_VARIANT"),
        weights_dir=Path(env("WEIGHTS_DIR")),
        confidence_threshold=_float("CONFIDENCE_THRESHOLD", 0.0, 1.0),  # type: ignore[arg-type]
        max_image_bytes=_int("MAX_IMAGE_BYTES"),
        max_image_pixels=_int("MAX_IMAGE_PIXELS"),
        tiling=_choice("TILING"),
        tile_overlap=_int("TILE_OVERLAP", lo=0),
        mm_per_pixel=mm,
        severity_thresholds_mm=_severity(),
        api_host=env("API_HOST"),
        api_port=_int("API_PORT"),
        api_key=env("API_KEY"),
        port=_int("PORT"),
        port_health=_int("PORT_HEALTH") if env("PORT_HEALTH") else _int("PORT"),
        model_repository=Path(env("MODEL_REPOSITORY")),
        triton_host=host,
        triton_http_port=_int("TRITON_HTTP_PORT"),
        triton_grpc_port=grpc_port,
        triton_metrics_port=_int("TRITON_METRICS_PORT"),
        triton_home=env("TRITON_HOME"),
        triton_url=env("TRITON_URL") or f"{'127.0.0.1' if host == '0.0.0.0' else host}:{grpc_port}",
        compute_threads=_int("COMPUTE_THREADS") if threads else (os.cpu_count() or 1),
        device=_choice("DEVICE"),
        max_batch_images=_int("MAX_BATCH_IMAGES"),
        max_request_bytes=_int("MAX_REQUEST_BYTES"),
        runpod_concurrency=_int("RUNPOD_CONCURRENCY"),
        triton_ready_timeout=_int("TRITON_READY_TIMEOUT"),
        shutdown_grace_s=_float("SHUTDOWN_GRACE_S", 1.0, 600.0),  # type: ignore[arg-type]
        detector_backend=_choice("DETECTOR_BACKEND"),
        detector_precision=_choice("DETECTOR_PRECISION"),
        batch_frames=_auto_int("BATCH_FRAMES"),
        cuda_graphs=_choice("CUDA_GRAPHS") == "auto",
        batch_delay_us=_int("BATCH_DELAY_US", lo=0),
        step_instances=_auto_int("STEP_INSTANCES"),
        geometry_threads=_auto_int("GEOMETRY_THREADS"),
    )


@lru_cache(maxsize=1)
def settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
