"""The RunPod API's request bodies (docs/api.md, "RunPod jobs") (single image, batch), parsed and run through Triton.

Shared by the serverless handler and the pod REST gateway so both accept and answer exactly the same.
Single: {"image": b64, "frame_id"?, "include_masks"?, "confidence_threshold"?, "mm_per_pixel"?, "tiling"?}
Batch:  {"images": [b64, ...], "frame_ids"?: [...], same options}   -> {"results": [...], "count", "failed"}
A batch item that the server refuses becomes {"frame_id", "error"} in `results`: reported, not dropped.
"""

from __future__ import annotations

import base64
import binascii
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from anomaly.config import Settings
from anomaly.errors import InputError
from anomaly.options import OPTION_NAMES, RequestOptions, frame_id_value, parse_options
from client import AnomalyClient, AnomalyServiceError

_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)
_B64_CHARS = re.compile(r"^[A-Za-z0-9+/_-]*={0,2}$")
BATCH_FIELDS = ("images", "frame_ids")


@dataclass
class Job:
    items: list[tuple[str | None, bytes]]  # (frame_id, encoded image)
    options: RequestOptions
    batch: bool


def decode_base64(value, field: str, max_bytes: int) -> bytes:
    """Base64 (or a data: URL) -> bytes, refusing what is not base64 and what decodes too large."""
    if not isinstance(value, str):
        raise InputError(field, f"must be a base64 string, got {type(value).__name__}")
    text = _DATA_URL.sub("", value.strip())
    text = "".join(text.split())  # line breaks from `base64` without -w0
    if not text:
        raise InputError(field, "is empty; send the base64 of an encoded image")
    if len(text) > (max_bytes + 2) // 3 * 4 + 4:
        raise InputError(field, f"decodes to more than the {max_bytes} bytes allowed (MAX_IMAGE_BYTES)")
    if not _B64_CHARS.match(text):
        bad = next(c for c in text if not (c.isalnum() or c in "+/=_-"))
        raise InputError(field, f"is not valid base64 (unexpected character {bad!r})")
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(field, f"is not valid base64 ({exc})") from None


def _options(payload: dict, settings: Settings, extra: tuple) -> RequestOptions:
    return parse_options(payload, settings.confidence_threshold, settings.mm_per_pixel, allow_extra=extra)


def parse_single(payload, settings: Settings) -> Job:
    if not isinstance(payload, dict):
        raise InputError("input", f"must be a JSON object, got {type(payload).__name__}")
    if "image" not in payload:
        raise InputError("image", "is required (base64 of a JPEG, PNG, WebP, BMP or TIFF image)")
    options = _options(payload, settings, ("image",))
    data = decode_base64(payload["image"], "image", settings.max_image_bytes)
    return Job([(options.frame_id, data)], options, batch=False)


def parse_batch(payload, settings: Settings, max_images: int) -> Job:
    if not isinstance(payload, dict):
        raise InputError("input", f"must be a JSON object, got {type(payload).__name__}")
    images = payload.get("images")
    if not isinstance(images, list) or not images:
        raise InputError("images", "must be a non-empty list of base64 images")
    if len(images) > max_images:
        raise InputError("images", f"holds {len(images)} images, more than the {max_images} allowed (MAX_BATCH_IMAGES)")
    if "frame_id" in payload:
        raise InputError("frame_id", "is for single images; a batch names its frames in frame_ids")
    frame_ids = payload.get("frame_ids")
    if frame_ids is None:
        frame_ids = [None] * len(images)
    elif not isinstance(frame_ids, list) or len(frame_ids) != len(images):
        raise InputError("frame_ids", f"must be a list as long as images ({len(images)})")
    options = _options({k: v for k, v in payload.items() if k not in BATCH_FIELDS}, settings, ())
    items = []
    for i, (value, frame_id) in enumerate(zip(images, frame_ids)):
        frame_id = frame_id_value(frame_id, f"frame_ids[{i}]")
        items.append((frame_id, decode_base64(value, f"images[{i}]", settings.max_image_bytes)))
    return Job(items, options, batch=True)


def parse_job_input(payload, settings: Settings, max_images: int) -> Job:
    """A RunPod job's `input`: the batch form when it has `images`, else the single form."""
    if isinstance(payload, dict) and "images" in payload:
        if "image" in payload:
            raise InputError("image", "send either image or images, not both")
        return parse_batch(payload, settings, max_images)
    if isinstance(payload, dict):
        unknown = sorted(set(payload) - set(OPTION_NAMES) - {"image"} - set(BATCH_FIELDS))
        if unknown:
            raise InputError(unknown[0], f"is not a known field; expected image or images, {', '.join(OPTION_NAMES)}")
    return parse_single(payload, settings)


def _call(client: AnomalyClient, frame_id: str | None, data: bytes, options: RequestOptions) -> dict:
    return client.detect(data, **(options.given() | {"frame_id": frame_id}))


def run_job(client: AnomalyClient, job: Job, parallel: int = 4) -> dict:
    """Single: the response object (AnomalyServiceError propagates). Batch: every item answered, in order;
    the frames go to Triton concurrently so its dynamic batcher can group them."""
    if not job.batch:
        frame_id, data = job.items[0]
        return _call(client, frame_id, data, job.options)

    def one(indexed):
        i, (frame_id, data) = indexed
        try:
            return _call(client, frame_id, data, job.options)
        except AnomalyServiceError as exc:
            if not exc.bad_input:
                raise
            return {"frame_id": frame_id, "error": f"images[{i}]: {exc}"}

    with ThreadPoolExecutor(max(1, min(parallel, len(job.items)))) as pool:
        results = list(pool.map(one, enumerate(job.items)))
    return {"results": results, "count": len(results), "failed": sum(1 for r in results if "error" in r)}
