"""Per-request options (Triton request parameters, REST and RunPod fields), validated in one place.

Unknown options are refused rather than ignored: a misspelt `confidence_treshold` must not silently
fall back to the default.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from anomaly.errors import InputError

OPTION_NAMES = ("confidence_threshold", "include_masks", "frame_id", "mm_per_pixel", "tiling")
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


@dataclass(frozen=True)
class RequestOptions:
    confidence_threshold: float
    include_masks: bool = False
    frame_id: str | None = None
    mm_per_pixel: float | None = None
    tiling: str | None = None  # auto, off or on; None: the TILING setting
    scale_source: str = ""  # where mm_per_pixel came from: request, setting, metadata (anomaly.scale); "" none
    scale_detail: str = ""  # how the metadata gave it, or which value it lacked


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


def parse_options(
    params: dict, default_threshold: float, default_mm_per_pixel: float | None = None, allow_extra: tuple = ()
) -> RequestOptions:
    """Validate the option fields of one request. `allow_extra` names fields the caller handles itself."""
    unknown = sorted(set(params) - set(OPTION_NAMES) - _TRITON_PARAMS - set(allow_extra))
    if unknown:
        raise InputError(unknown[0], f"is not a known option; known options are {', '.join(OPTION_NAMES)}")
    threshold = params.get("confidence_threshold")
    threshold = default_threshold if threshold is None else _number("confidence_threshold", threshold, 0.0, 1.0)
    mm = params.get("mm_per_pixel")
    if mm is None or mm == "":
        mm, source = default_mm_per_pixel, "setting" if default_mm_per_pixel is not None else ""
    else:
        mm, source = _number("mm_per_pixel", mm, 0.0, 1000.0, lo_open=True), "request"
    frame_id = frame_id_value(params.get("frame_id"))
    include = params.get("include_masks")
    include = False if include is None else _boolean("include_masks", include)
    tiling = params.get("tiling")
    if tiling is not None and tiling != "":
        tiling = str(tiling).strip().lower()
        if tiling not in TILING_MODES:
            raise InputError("tiling", f"must be one of {', '.join(TILING_MODES)}, got {params['tiling']!r}")
    else:
        tiling = None
    return RequestOptions(threshold, include, frame_id, mm, tiling, source)
