"""Decoding (formats, EXIF, limits, bad input) and RF-DETR preprocessing against torchvision."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image

from anomaly.errors import InputError
from anomaly.images import decode_image, read_header, resize_bilinear, rfdetr_preprocess
from tests.conftest import SAMPLES, encode

BIG = 1 << 30
MEANS, STDS = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def gradient(h: int = 60, w: int = 90) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], axis=2).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_formats_round_trip(fmt):
    rgb = gradient()
    assert np.array_equal(decode_image(encode(rgb, fmt), BIG, BIG), rgb)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_lossy_formats_decode_close(fmt):
    rgb = gradient()
    out = decode_image(encode(rgb, fmt, quality=95), BIG, BIG)
    assert out.shape == rgb.shape and np.abs(out.astype(int) - rgb).mean() < 4


def test_modes_become_rgb():
    grey = np.arange(60 * 90, dtype=np.uint16).reshape(60, 90) * 12
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")  # 16-bit greyscale
    out = decode_image(buf.getvalue(), BIG, BIG)
    assert out.shape == (60, 90, 3) and out.dtype == np.uint8
    assert np.array_equal(out[:, :, 0], (grey >> 8).astype(np.uint8))
    rgba = np.dstack([gradient(), np.full((60, 90), 7, np.uint8)])
    assert np.array_equal(decode_image(encode(rgba, "PNG"), BIG, BIG), gradient())
    cmyk = Image.fromarray(gradient()).convert("CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG")
    assert decode_image(buf.getvalue(), BIG, BIG).shape == (60, 90, 3)


@pytest.mark.parametrize(
    "orientation,transform",
    [
        (1, lambda a: a),
        (3, lambda a: np.rot90(a, 2)),
        (6, lambda a: np.rot90(a, -1)),  # stored rotated: view rotates 90 clockwise
        (8, lambda a: np.rot90(a, 1)),
        (2, lambda a: a[:, ::-1]),
    ],
)
def test_exif_orientation(orientation, transform):
    rgb = gradient(40, 70)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", exif=exif)
    assert np.array_equal(decode_image(buf.getvalue(), BIG, BIG), transform(rgb))


def test_sample_with_exif_is_upright():
    assert decode_image((SAMPLES / "tunnel_wall_exif.jpg").read_bytes(), BIG, BIG).shape == (800, 600, 3)


def test_limits_and_garbage_name_the_field():
    png = encode(gradient(), "PNG")
    cases = [
        (b"", 1000, BIG, "is empty"),
        (png, 100, BIG, f"is {len(png)} bytes, more than the 100 allowed"),
        (png, BIG, 1000, "is 90x60 = 5400 pixels, more than the 1000 allowed"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, BIG, BIG, "not a decodable image"),
        (encode(gradient(), "JPEG")[:300], BIG, BIG, "truncated or corrupt"),
    ]
    for data, max_bytes, max_pixels, expected in cases:
        with pytest.raises(InputError) as err:
            decode_image(data, max_bytes, max_pixels, field="images[3]")
        assert err.value.field == "images[3]" and expected in str(err.value)


def bomb_png(side: int) -> bytes:
    """A real decompression bomb: a valid 1-bit PNG of side x side black pixels, a few hundred kB compressed.
    Written chunk by chunk (Pillow's encoder takes seconds over the 112 MB of rows)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(bytes(side * (1 + (side + 7) // 8)), 9)  # each row: filter 0 and its zero bytes
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_bomb_refused_before_decoding():
    buf = io.BytesIO(bomb_png(30000))
    assert Image.open(io.BytesIO(bomb_png(64))).convert("L").getextrema() == (0, 0)  # the writer makes real PNGs
    assert len(buf.getvalue()) < 200_000
    with pytest.raises(InputError, match="900000000 pixels"):
        decode_image(buf.getvalue(), BIG, 50_000_000)


def test_pillow_bomb_guard_is_ours_only_inside_our_checks(monkeypatch):
    """MAX_IMAGE_PIXELS above Pillow's own limit admits a large photo's header, and Pillow's guard stays as it
    was for every other use in the process (Pillow's default here: a library imported by another test, rfdetr's
    Objects365 loader, raises it for the whole process, which is not ours to change)."""
    default = 89_478_485  # Pillow's own default
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", default)
    buf = io.BytesIO()
    Image.new("1", (13500, 13500)).save(buf, format="PNG")  # 182 M pixels: over twice Pillow's default
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(buf.getvalue()))
    assert read_header(buf.getvalue(), BIG, 200_000_000).width == 13500
    assert Image.MAX_IMAGE_PIXELS == default


@pytest.mark.parametrize("shape", [(1080, 1920), (480, 640), (300, 200), (37, 1000), (576, 576)])
def test_rfdetr_preprocess_matches_torchvision(shape):
    """The same sampling as rfdetr's F.resize(antialias=False); torch's CPU kernel rounds its weights to
    1/65536, so agreement is to ~1e-4 of the normalised value, not bit for bit."""
    rgb = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    ref = F.normalize(F.resize(x[None], [576, 576], antialias=False), MEANS, STDS)[0].numpy()
    ours = rfdetr_preprocess(rgb, 576, MEANS, STDS)
    assert ours.shape == (3, 576, 576) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 2e-3
    assert np.abs(ours - ref).mean() < 1e-4


def test_resize_is_exact_bilinear():
    """Against a float64 evaluation of the bilinear formula (align_corners=False, edge clamp)."""
    rng = np.random.default_rng(1)
    img = rng.random((13, 29, 3))
    out = resize_bilinear(img.astype(np.float32), 7, 11)

    def src(i, n_in, n_out):
        s = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(s)), n_in - 1)
        return i0, min(i0 + 1, n_in - 1), s - i0

    for y in range(7):
        for x in range(11):
            y0, y1, wy = src(y, 13, 7)
            x0, x1, wx = src(x, 29, 11)
            expected = (1 - wy) * ((1 - wx) * img[y0, x0] + wx * img[y0, x1]) + wy * (
                (1 - wx) * img[y1, x0] + wx * img[y1, x1]
            )
            assert np.allclose(out[y, x], expected, atol=1e-6)


def test_the_encoded_frame_between_steps_is_one_row_of_bytes():
    """ENCODED travels between Triton steps as a uint8 row (anomaly.serving.step_inputs): read back as the very
    bytes, and anything but one row (two frames, a flat array) refused naming the input; the ensemble's own
    IMAGE stays a string tensor of one element."""
    from anomaly.serving.step_inputs import encoded_image

    data = (SAMPLES / "bridge_deck.jpg").read_bytes()
    assert encoded_image("ENCODED", np.frombuffer(data, np.uint8).reshape(1, -1)) == data
    assert encoded_image("IMAGE", np.array([data], dtype=np.object_)) == data
    for bad in (np.zeros((2, 8), np.uint8), np.zeros(8, np.uint8)):
        with pytest.raises(InputError, match="ENCODED: must be one row of encoded bytes"):
            encoded_image("ENCODED", bad)
    with pytest.raises(InputError, match="IMAGE: must hold exactly one encoded image, got 2"):
        encoded_image("IMAGE", np.array([data, data], dtype=np.object_))
