"""Every environment variable the service reads, with its default, in one place: settings.toml beside this file.

Each knob there has its default, its description, its choices and its parser (one of PARSERS); `Settings` has a
typed field per knob, which an editor and a type checker see (a test holds the two together). `settings()` reads
them once per process. docs/configuration.md is generated from the knobs (`python -m anomaly.config --markdown`),
and a test fails when it is stale.
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


def _positive(knob: Knob, raw: str, parsed: dict) -> float:
    value = _number(knob, raw, float, None)
    if value <= 0:
        raise ConfigError(f"{knob.name}={raw} must be positive")
    return value


def _optional_positive(knob: Knob, raw: str, parsed: dict) -> float | None:
    return _positive(knob, raw, parsed) if raw else None


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


def _gpus(knob: Knob, raw: str, parsed: dict) -> tuple[int, ...] | None:
    """`all` -> None (every visible GPU, counted where the machine is known: anomaly.serving), or device indexes."""
    if raw.strip().lower() == "all":
        return None
    try:
        devices = tuple(int(part) for part in raw.split(","))
    except ValueError:
        raise ConfigError(f"{knob.name}={raw!r} must be `all` or comma-separated GPU indexes, e.g. 0,1") from None
    if any(d < 0 for d in devices) or len(set(devices)) != len(devices):
        raise ConfigError(f"{knob.name}={raw!r} must list distinct GPU indexes from 0")
    return devices


def _auto_is_on(knob: Knob, raw: str, parsed: dict) -> bool:
    """`auto` or `off` -> on or off."""
    return _choice(knob, raw, parsed) == "auto"


# The parsers a knob names in settings.toml.
PARSERS: dict[str, Parser] = {
    "int": _int,
    "count": _count,
    "optional_int": _optional_int,
    "auto_int": _auto_int,
    "fraction": _fraction,
    "grace": _grace,
    "optional_positive": _optional_positive,
    "positive": _positive,
    "bool": _bool,
    "choice": _choice,
    "path": _path,
    "runpod_mode": _runpod_mode,
    "severity": _severity,
    "port_health": _port_health,
    "triton_url": _triton_url,
    "threads": _threads,
    "auto_is_on": _auto_is_on,
    "gpus": _gpus,
}
SETTINGS_FILE = Path(__file__).with_name("settings.toml")


def load_knobs(path: Path = SETTINGS_FILE) -> tuple[Knob, ...]:
    """The knobs settings.toml declares, in its order (the table is data: its docs are long, its rows alike)."""
    import tomllib

    knobs = []
    for entry in tomllib.loads(path.read_text())["knob"]:
        parse = entry.get("parse")
        if parse is not None and parse not in PARSERS:
            raise ConfigError(f"{path.name}: {entry['name']} names the parser {parse!r}; known: {', '.join(PARSERS)}")
        knobs.append(
            Knob(
                name=entry["name"],
                default=entry["default"].replace("{repo}", str(REPO_ROOT)),
                doc=entry["doc"],
                choices=tuple(entry.get("choices", ())),
                parse=PARSERS[parse] if parse else None,
                field=entry.get("field", ""),
                section=entry.get("section", ""),
            )
        )
    return tuple(knobs)


KNOBS: tuple[Knob, ...] = load_knobs()

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
    subpixel_width: bool
    subpixel_max_width_px: float
    crack_core_brightness: float
    tracker: str
    track_lost_s: float
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
    gpus: tuple[int, ...] | None
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
        "<!-- Generated from anomaly/settings.toml by `make docs`; tests/test_docs.py fails when it is stale. -->",
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
