"""The per-request options, declared once (OPTIONS) and validated in one place (parse_options).

Every way in reads this declaration: Triton request parameters (the steps), the REST gateway's JSON bodies and
upload form, the RunPod job input, and the Python client's keywords. Unknown options are refused rather than
ignored: a misspelt `confidence_treshold` must not silently fall back to the default.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from anomaly.errors import InputError

TILING_MODES = ("auto", "off", "on")  # anomaly.tiling
# Parameters Triton itself or its clients attach to requests; they are not ours to validate.
_TRITON_PARAMS = {
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "priority",
    "timeout",
    "triton_enable_empty_final_response",
}
# ASCII only and matched whole: `\w` would admit any Unicode letter and `$` a trailing newline.
_FRAME_ID = re.compile(r"[A-Za-z0-9_.:/\-]{1,128}")


def _number(name: str, value, lo: float, hi: float | None, lo_open: bool = False) -> float:
    if isinstance(value, bool):
        raise InputError(name, f"must be a number, got a boolean ({value})")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(name, f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InputError(name, f"must be finite, got {value!r}")
    too_low = number <= lo if lo_open else number < lo
    if too_low or (hi is not None and number > hi):
        span = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise InputError(name, f"must be in {span if hi is not None else f'> {lo}'}, got {value!r}")
    return number


def _boolean(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InputError(name, f"must be true or false, got {value!r}")


def frame_id_value(value, field: str = "frame_id") -> str | None:
    """A frame id as given (None when absent or empty), refusing what could not be a file or key name."""
    if value is None or value == "":
        return None
    text = value if isinstance(value, str) else str(value)
    if not _FRAME_ID.fullmatch(text):
        raise InputError(field, f"must be 1-128 ASCII letters, digits or . _ : / - characters, got {text[:40]!r}")
    return text


def _tiling(name: str, value) -> str:
    mode = str(value).strip().lower()
    if mode not in TILING_MODES:
        raise InputError(name, f"must be one of {', '.join(TILING_MODES)}, got {value!r}")
    return mode


@dataclass(frozen=True)
class Option:
    """One request option: its name everywhere (JSON field, form field, Triton parameter, client keyword), the type
    a JSON body gives it, what it does, and how a given value is checked (raising InputError that names it)."""

    name: str
    kind: type
    doc: str
    check: Callable[[str, Any], Any]


OPTIONS: tuple[Option, ...] = (
    Option(
        "confidence_threshold",
        float,
        "detection threshold in [0, 1] (default: the CONFIDENCE_THRESHOLD setting)",
        lambda name, v: _number(name, v, 0.0, 1.0),
    ),
    Option("include_masks", bool, "add each anomaly's mask as COCO RLE (full image)", _boolean),
    Option(
        "frame_id",
        str,
        "echoed back; generated when absent (1-128 of A-Z a-z 0-9 _ . : / -)",
        lambda name, v: frame_id_value(v, name),
    ),
    Option(
        "mm_per_pixel",
        float,
        "pixel size in mm: adds *_mm fields and crack severity (default: MM_PER_PIXEL, else the photo's metadata)",
        lambda name, v: _number(name, v, 0.0, 1000.0, lo_open=True),
    ),
    Option(
        "tiling",
        str,
        "auto, off or on: detect a large photo in tiles at its own scale (default: the TILING setting)",
        _tiling,
    ),
)
OPTION_NAMES = tuple(o.name for o in OPTIONS)


@dataclass(frozen=True)
class RequestOptions:
    confidence_threshold: float
    include_masks: bool = False
    frame_id: str | None = None
    mm_per_pixel: float | None = None
    tiling: str | None = None  # auto, off or on; None: the TILING setting
    scale_source: str = ""  # where mm_per_pixel came from: request, setting, metadata (anomaly.scale); "" none
    scale_detail: str = ""  # how the metadata gave it, or which value it lacked
    given_names: tuple[str, ...] = field(default=(), compare=False)  # the options the request itself set

    def given(self) -> dict:
        """The options the request set, as request parameters: what the gateway and the handler send on to Triton,
        whose own defaults then apply to the rest (and say so: a pixel size from the setting is `setting`)."""
        values = asdict(self)
        return {name: values[name] for name in self.given_names}


def parse_options(
    params: dict, default_threshold: float, default_mm_per_pixel: float | None = None, allow_extra: tuple = ()
) -> RequestOptions:
    """Validate the option fields of one request. `allow_extra` names fields the caller handles itself. A value of
    None or "" is the option not given."""
    unknown = sorted(set(params) - set(OPTION_NAMES) - _TRITON_PARAMS - set(allow_extra))
    if unknown:
        raise InputError(unknown[0], f"is not a known option; known options are {', '.join(OPTION_NAMES)}")
    given = {o.name: o.check(o.name, params[o.name]) for o in OPTIONS if params.get(o.name) not in (None, "")}
    mm = given.get("mm_per_pixel")
    if mm is None:
        mm, source = default_mm_per_pixel, "setting" if default_mm_per_pixel is not None else ""
    else:
        source = "request"
    return RequestOptions(
        confidence_threshold=given.get("confidence_threshold", default_threshold),
        include_masks=given.get("include_masks", False),
        frame_id=given.get("frame_id"),
        mm_per_pixel=mm,
        tiling=given.get("tiling"),
        scale_source=source,
        given_names=tuple(given),
    )
