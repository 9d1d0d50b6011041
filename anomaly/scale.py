"""Pixel size (mm per pixel) from a photo's own metadata, for when neither the request nor MM_PER_PIXEL gives
one (docs/campaigns.md, "Scale").

    mm per pixel = distance (mm) x sensor width (mm) / (focal length (mm) x image width (px))

- focal length: EXIF FocalLength;
- sensor width: from EXIF FocalPlaneXResolution and its unit (pixels per inch/cm/mm on the sensor), else from
  FocalLengthIn35mmFilm (the 35 mm equivalent is defined by the diagonal: sensor diagonal = 43.27 mm x focal /
  equivalent focal, split by the image's aspect);
- distance: a laser rangefinder's measured distance (DJI XMP `LRFTargetDistance`), else, for a nadir shot only
  (DJI XMP `GimbalPitchDegree` within 5 degrees of -90), the height above the take-off point (DJI XMP
  `RelativeAltitude`), which is the distance to flat ground below.

Nothing is guessed: when a value is missing or the shot is not nadir, there is no scale, and the reason says
which value was missing.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

FULL_FRAME_DIAGONAL_MM = math.hypot(36.0, 24.0)
NADIR_TOLERANCE_DEG = 5.0
_UNIT_MM = {2: 25.4, 3: 10.0, 4: 1.0, 5: 0.001}  # EXIF FocalPlaneResolutionUnit: inch, cm, mm, um
_XMP_FIELD = r'(?:drone-dji:)?{name}\s*=\s*"([^"]+)"|<(?:drone-dji:)?{name}>([^<]+)<'


@dataclass(frozen=True)
class Scale:
    mm_per_pixel: float | None
    source: str  # "metadata" when found; "" when not
    detail: str  # how it was computed, or which value was missing


def _xmp_number(xmp: str, name: str) -> float | None:
    match = re.search(_XMP_FIELD.format(name=name), xmp)
    if not match:
        return None
    try:
        return float((match.group(1) or match.group(2)).strip().lstrip("+"))
    except ValueError:
        return None


def _ratio(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def scale_from_metadata(data: bytes) -> Scale:
    """The photo's pixel size from its EXIF and DJI XMP, or no scale with the reason."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            exif = img.getexif()
            camera = exif.get_ifd(0x8769)  # the Exif sub-IFD holds the camera's fields
            xmp = img.info.get("xmp") or b""
    except Exception as exc:  # noqa: BLE001 - unreadable metadata is no metadata
        return Scale(None, "", f"metadata unreadable ({type(exc).__name__})")
    if isinstance(xmp, bytes):
        xmp = xmp.decode("utf-8", "replace")
    if not xmp:
        xmp = _embedded_xmp(data)

    focal = _ratio(camera.get(0x920A))
    if focal is None:
        return Scale(None, "", "no EXIF FocalLength")
    sensor_width, how_sensor = _sensor_width(camera, width, height, focal)
    if sensor_width is None:
        return Scale(None, "", how_sensor)
    distance_m, how_distance = _distance(xmp)
    if distance_m is None:
        return Scale(None, "", how_distance)
    mm = distance_m * 1000.0 * sensor_width / (focal * width)
    detail = f"{how_distance}, focal length {focal:g} mm, {how_sensor}, {width} px wide"
    return Scale(round(mm, 5), "metadata", detail)


def _sensor_width(camera, width: int, height: int, focal: float) -> tuple[float | None, str]:
    per_unit = _ratio(camera.get(0xA20E))
    unit = camera.get(0xA210, 2)
    exif_width = _ratio(camera.get(0xA002)) or width  # the pixel width the resolution refers to
    if per_unit and unit in _UNIT_MM:
        sensor = exif_width / per_unit * _UNIT_MM[unit]
        return sensor, f"sensor {sensor:.2f} mm wide (EXIF FocalPlaneXResolution)"
    equivalent = _ratio(camera.get(0xA405))
    if equivalent:
        diagonal = FULL_FRAME_DIAGONAL_MM * focal / equivalent
        sensor = diagonal * width / math.hypot(width, height)
        return sensor, f"sensor {sensor:.2f} mm wide (from FocalLengthIn35mmFilm {equivalent:g})"
    return None, "no sensor size (EXIF FocalPlaneXResolution or FocalLengthIn35mmFilm)"


def _distance(xmp: str) -> tuple[float | None, str]:
    laser = _xmp_number(xmp, "LRFTargetDistance")
    if laser and laser > 0:
        return laser, f"laser rangefinder {laser:g} m"
    altitude = _xmp_number(xmp, "RelativeAltitude")
    if altitude is None:
        return None, "no distance (DJI XMP LRFTargetDistance or RelativeAltitude)"
    pitch = _xmp_number(xmp, "GimbalPitchDegree")
    if pitch is None:
        return None, "RelativeAltitude without GimbalPitchDegree: cannot tell a nadir shot"
    if abs(pitch + 90.0) > NADIR_TOLERANCE_DEG:
        return None, f"gimbal pitch {pitch:g} degrees: not a nadir shot, the altitude is not the distance"
    if altitude <= 0:
        return None, f"RelativeAltitude {altitude:g} m"
    return altitude, f"nadir shot {altitude:g} m above take-off"


def _embedded_xmp(data: bytes) -> str:
    """An XMP packet anywhere in the file (JPEG APP1, or a TIFF's XMP tag), when Pillow did not expose it."""
    start = data.find(b"<x:xmpmeta")
    end = data.find(b"</x:xmpmeta>", start)
    return data[start : end + 12].decode("utf-8", "replace") if start >= 0 and end > start else ""


def resolve_scale(options, data: bytes):
    """The request's options with the pixel size decided: the request's own, else MM_PER_PIXEL, else the
    photo's metadata (options.scale_source says which; scale_detail how, or why there is none)."""
    from dataclasses import replace

    if options.mm_per_pixel is not None:
        return options
    found = scale_from_metadata(data)
    return replace(options, mm_per_pixel=found.mm_per_pixel, scale_source=found.source, scale_detail=found.detail)


def scale_record(options) -> dict:
    """The response's `scale`: the pixel size used and where it came from."""
    return {"mm_per_pixel": options.mm_per_pixel, "source": options.scale_source or None,
            "detail": options.scale_detail}  # fmt: skip


def with_scale(options, record: dict):
    """Options as the step that decided the scale left them (`record` from scale_record), for the steps after."""
    from dataclasses import replace

    return replace(options, mm_per_pixel=record["mm_per_pixel"], scale_source=record["source"] or "",
                   scale_detail=record["detail"])  # fmt: skip
