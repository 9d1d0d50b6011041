"""Image decoding with limits and EXIF orientation, and RF-DETR's preprocessing.

Decoding happens once per request (the `preprocess` Triton model); every later stage works on the
RGB uint8 array it returns, so orientation and colour handling live here alone.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from anomaly.errors import InputError

log = logging.getLogger(__name__)
EXIF_ORIENTATION = 0x0112

# Formats a camera, drone or inspection tool produces. MPO is the JPEG variant many cameras write.
ALLOWED_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF"}

_PIL_LIMIT = threading.Lock()


def _open(data: bytes) -> Image.Image:
    """Image.open (the header only) with Pillow's decompression-bomb guard off for this call alone: our own
    MAX_IMAGE_PIXELS check follows at once in _open_checked, before any pixel is decoded, and may allow more
    than Pillow's default (large drone photos). Every other use of Pillow in the process keeps its guard."""
    with _PIL_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = saved


@dataclass(frozen=True)
class ImageHeader:
    """What the header of an encoded image says, before any pixel is decoded."""

    format: str
    height: int  # upright, after the EXIF orientation
    width: int
    orientation: int  # EXIF orientation 1..8 (1: stored upright)


def _open_checked(data: bytes, max_bytes: int, max_pixels: int, field: str) -> Image.Image:
    """Encoded bytes -> an opened (not yet decoded) PIL image, after every check the header allows."""
    if data is None or len(data) == 0:
        raise InputError(field, "is empty; send the encoded bytes of a JPEG, PNG, WebP, BMP or TIFF image")
    if len(data) > max_bytes:
        raise InputError(field, f"is {len(data)} bytes, more than the {max_bytes} allowed (MAX_IMAGE_BYTES)")
    try:
        img = _open(data)
    except UnidentifiedImageError:
        raise InputError(
            field, f"is not a decodable image ({len(data)} bytes); expected JPEG, PNG, WebP, BMP or TIFF"
        ) from None
    except Exception as exc:  # PIL raises many types for hostile headers
        raise InputError(field, f"is truncated or corrupt ({exc})") from None
    if img.format not in ALLOWED_FORMATS:
        raise InputError(field, f"format {img.format} is not accepted; send JPEG, PNG, WebP, BMP or TIFF")
    width, height = img.size
    if width < 1 or height < 1:
        raise InputError(field, f"has no pixels ({width}x{height})")
    if width * height > max_pixels:
        # Checked on the header, before any pixel is decoded: this is what stops decompression bombs.
        raise InputError(
            field,
            f"is {width}x{height} = {width * height} pixels, more than the {max_pixels} allowed (MAX_IMAGE_PIXELS)",
        )
    return img


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block is treated as no EXIF, as exif_transpose does
        return 1
    return value if 1 <= value <= 8 else 1


def read_header(data: bytes, max_bytes: int, max_pixels: int, field: str = "image") -> ImageHeader:
    """The checks of decode_image that need no decoding (size limits, format, pixel count), and the upright
    size. Cheap (the header only), so a request can be refused before any decoding or GPU work."""
    img = _open_checked(data, max_bytes, max_pixels, field)
    orientation = _orientation(img)
    width, height = img.size
    if orientation >= 5:  # stored on its side
        width, height = height, width
    return ImageHeader(img.format, height, width, orientation)


def decode_image(data: bytes, max_bytes: int, max_pixels: int, field: str = "image") -> np.ndarray:
    """Encoded bytes -> RGB uint8 array (H, W, 3), upright as the EXIF orientation says.

    Raises InputError naming `field` for empty, oversized, undecodable, truncated or absurdly large images.
    """
    img = _open_checked(data, max_bytes, max_pixels, field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(field, f"is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    return rgb


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> RGB uint8. 16-bit and float greyscale are scaled to 8 bits, alpha is dropped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        grey = (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        grey = ((arr - lo) * scale).round().astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)  # a writable copy: later stages may hand it to torch


def _bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of PyTorch's bilinear resize (align_corners=False, no antialias)."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


def resize_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(H, W, C) uint8 or float -> float32 (out_h, out_w, C), sampled as PyTorch's bilinear resize
    (align_corners=False, no antialias) but with exact float weights. Rows are gathered before any
    float conversion, so a 4K frame costs little more than the output size."""
    h, w = image.shape[:2]
    r0, r1, rw = _bilinear_taps(h, out_h)
    c0, c1, cw = _bilinear_taps(w, out_w)
    top = image[r0][:, c0].astype(np.float32), image[r0][:, c1].astype(np.float32)
    bottom = image[r1][:, c0].astype(np.float32), image[r1][:, c1].astype(np.float32)
    cw, rw = cw[None, :, None], rw[:, None, None]
    upper = top[0] * (1.0 - cw) + top[1] * cw
    lower = bottom[0] * (1.0 - cw) + bottom[1] * cw
    return upper * (1.0 - rw) + lower * rw


def rfdetr_preprocess(rgb: np.ndarray, resolution: int, means, stds) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> float32 (3, R, R) as rfdetr's predict() prepares its input: /255, plain
    bilinear resize to R x R (no letterbox, no antialias), ImageNet normalisation. Resizing before the
    /255 is the same linear map; it agrees with torchvision to ~1e-4 (torch's CPU kernel rounds its
    interpolation weights to 1/65536, ours are exact)."""
    x = resize_bilinear(rgb, resolution, resolution) / np.float32(255.0)
    x = (x - np.asarray(means, np.float32)) / np.asarray(stds, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


# --- the same steps in torch, on the GPU when there is one -------------------------------------------------
# The numpy path above is the reference (exact weights); these agree with it within float rounding and run
# where the pixels already are, so a GPU frame never travels back through host memory.

SAM_MEANS, SAM_STDS = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def orient(chw, orientation: int):
    """A (C, H, W) tensor as stored -> upright, for EXIF orientation 1..8 (what ImageOps.exif_transpose does)."""
    import torch

    if orientation == 2:
        return chw.flip(-1)
    if orientation == 3:
        return chw.flip(-1, -2)
    if orientation == 4:
        return chw.flip(-2)
    if orientation == 5:
        return chw.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(chw, -1, (-2, -1))
    if orientation == 7:
        return chw.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(chw, 1, (-2, -1))
    return chw


_warned_gpu_decode = False
_gpu_decode_refused: str | None = None  # why nvJPEG refused the last JPEG this process decoded, None if it did not


def gpu_decode_warning() -> str | None:
    """For a GPU step's /info record and responses: a warning while nvJPEG refuses JPEGs the CPU can decode (the
    last one it was given), e.g. where the card's JPEG decoder is unavailable to the process; those frames are
    decoded on the CPU and copied over (about 12 ms a 1080p frame on the H100's host). None once it decodes again."""
    if _gpu_decode_refused is None:
        return None
    return f"nvJPEG could not decode the last JPEG ({_gpu_decode_refused}); it was decoded on the CPU instead"


def decode_to_tensor(data: bytes, device, max_bytes: int, max_pixels: int, field: str = "image"):
    """Encoded bytes -> upright RGB uint8 tensor (3, H, W) on `device`.

    On a GPU, JPEGs are decoded by nvJPEG (torchvision) on the card; other formats, and any JPEG nvJPEG
    refuses, are decoded on the CPU by decode_image and copied over. On a CPU this is decode_image."""
    import torch

    device = torch.device(device)
    header = read_header(data, max_bytes, max_pixels, field) if device.type == "cuda" else None
    global _gpu_decode_refused, _warned_gpu_decode
    refused = None
    if header is not None and header.format in ("JPEG", "MPO"):
        try:
            from torchvision.io import ImageReadMode, decode_jpeg

            encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            chw = orient(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device), header.orientation)
            if tuple(chw.shape) == (3, header.height, header.width):
                _gpu_decode_refused = None
                return chw
            refused = f"it gave a {tuple(chw.shape)} image for a {header.width} x {header.height} JPEG"
        except Exception as exc:  # noqa: BLE001 - the CPU decoder below gives the user's error, if any
            refused = f"{type(exc).__name__}: {exc}"[:300]
    chw = torch.from_numpy(decode_image(data, max_bytes, max_pixels, field)).permute(2, 0, 1)
    if refused:  # a JPEG the CPU decodes: nvJPEG's failure, not the user's (a broken file raised above)
        _gpu_decode_refused = refused
        if not _warned_gpu_decode:
            log.warning("nvJPEG could not decode a JPEG (%s); such images are decoded on the CPU", refused)
            _warned_gpu_decode = True
    if device.type == "cuda":  # from pinned memory: a pageable copy would first wait for all the GPU's queued work
        return chw.pin_memory().to(device, non_blocking=True)
    return chw


_per_channel: dict = {}


def per_channel(values, device):
    """Three per-channel constants (a normalisation's means or deviations) as a float32 (3, 1, 1) tensor on
    `device`, made once per device. Made from the host values at every frame (as torchvision's normalize does),
    each is a copy from pageable memory, which on a GPU makes the CPU wait until all the work queued on the card
    has run: a pause of the card between frames, two or three times a frame."""
    import torch

    key = (tuple(float(v) for v in values), str(device))
    found = _per_channel.get(key)
    if found is None:  # two threads may both make it: the same values either way
        found = _per_channel[key] = torch.tensor(key[0], dtype=torch.float32, device=device)[:, None, None]
    return found


def rfdetr_input(chw, resolution: int, means, stds):
    """Upright RGB uint8 (3, H, W) tensor -> float32 (3, R, R) as rfdetr_preprocess makes it (bilinear,
    no antialias, /255, normalised), on the tensor's device."""
    import torch

    x = torch.nn.functional.interpolate(
        chw[None].float(), size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=False
    )[0]
    return (x / 255.0 - per_channel(means, x.device)) / per_channel(stds, x.device)


def sam_input(chw, resolution: int = 1024):
    """Upright RGB uint8 (3, H, W) tensor -> float32 (3, S, S) as SAM2ImagePredictor prepares an image
    (to [0, 1], resize with antialiasing, ImageNet normalisation), on the tensor's device."""
    from torchvision.transforms import functional as TF

    x = TF.resize(chw.float() / 255.0, [resolution, resolution], antialias=True)
    return (x - per_channel(SAM_MEANS, x.device)) / per_channel(SAM_STDS, x.device)  # what TF.normalize computes
