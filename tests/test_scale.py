"""Pixel size from a photo's EXIF and DJI XMP (anomaly.scale): computed when the values are there, and
nothing guessed when one is missing. Expected values are worked out here from the definitions, e.g. a DJI
Phantom 4 Pro (13.2 mm wide 1-inch sensor, 8.8 mm lens, 5472 px) at 30 m gives 30000 * 13.2 / (8.8 * 5472)
= 8.224 mm per pixel."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from anomaly.options import parse_options
from anomaly.scale import resolve_scale, scale_from_metadata


def xmp(**fields) -> bytes:
    attrs = " ".join(f'drone-dji:{k}="{v}"' for k, v in fields.items())
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description xmlns:drone-dji="http://www.dji.com/drone-dji/1.0/" {attrs}/></rdf:RDF></x:xmpmeta>'
    ).encode()


def photo(size=(5472, 3648), camera: dict | None = None, xmp_packet: bytes = b"", fmt="JPEG") -> bytes:
    exif = Image.Exif()
    if camera:
        sub = exif.get_ifd(0x8769)
        sub.update(camera)
    buffer = io.BytesIO()
    Image.new("RGB", size, (128, 128, 128)).save(buffer, fmt, exif=exif, xmp=xmp_packet)
    return buffer.getvalue()


# sensor 13.2 mm over 5472 px: FocalPlaneXResolution in pixels per cm (unit 3)
P4P = {0x920A: 8.8, 0xA20E: 5472 / 1.32, 0xA210: 3}


def test_nadir_drone_photo_gets_its_ground_sampling_distance():
    scale = scale_from_metadata(photo(camera=P4P, xmp_packet=xmp(RelativeAltitude="+30.00", GimbalPitchDegree="-90.0")))
    assert scale.source == "metadata" and scale.mm_per_pixel == pytest.approx(30000 * 13.2 / (8.8 * 5472), rel=1e-4)
    assert "nadir shot 30 m" in scale.detail and "FocalPlaneXResolution" in scale.detail


def test_laser_rangefinder_distance_wins_and_needs_no_nadir():
    packet = xmp(LRFTargetDistance="12.5", RelativeAltitude="+80", GimbalPitchDegree="-30")
    scale = scale_from_metadata(photo(camera=P4P, xmp_packet=packet))
    assert scale.mm_per_pixel == pytest.approx(12500 * 13.2 / (8.8 * 5472), rel=1e-4)
    assert "laser rangefinder 12.5 m" in scale.detail


def test_sensor_from_the_35mm_equivalent_by_the_diagonal():
    # 24 mm equivalent of an 8.8 mm lens: diagonal 43.27 * 8.8 / 24 = 15.87 mm, 4000 x 3000 px -> 12.69 mm wide
    camera = {0x920A: 8.8, 0xA405: 24}
    scale = scale_from_metadata(photo((4000, 3000), camera, xmp(RelativeAltitude="30", GimbalPitchDegree="-88")))
    width = (36**2 + 24**2) ** 0.5 * 8.8 / 24 * 4000 / 5000
    assert scale.mm_per_pixel == pytest.approx(30000 * width / (8.8 * 4000), rel=1e-4)


@pytest.mark.parametrize(
    "camera,packet,why",
    [
        ({}, xmp(RelativeAltitude="30", GimbalPitchDegree="-90"), "no EXIF FocalLength"),
        ({0x920A: 8.8}, xmp(RelativeAltitude="30", GimbalPitchDegree="-90"), "no sensor size"),
        (P4P, b"", "no distance"),
        (P4P, xmp(RelativeAltitude="30", GimbalPitchDegree="-45"), "not a nadir shot"),
        (P4P, xmp(RelativeAltitude="30"), "cannot tell a nadir shot"),
    ],
)
def test_a_missing_value_means_no_scale_and_says_which(camera, packet, why):
    scale = scale_from_metadata(photo(camera=camera, xmp_packet=packet))
    assert scale.mm_per_pixel is None and scale.source == "" and why in scale.detail


def test_request_beats_setting_beats_metadata():
    data = photo(camera=P4P, xmp_packet=xmp(RelativeAltitude="30", GimbalPitchDegree="-90"))
    from_request = resolve_scale(parse_options({"mm_per_pixel": 0.2}, 0.3, 0.5), data)
    assert (from_request.mm_per_pixel, from_request.scale_source) == (0.2, "request")
    from_setting = resolve_scale(parse_options({}, 0.3, 0.5), data)
    assert (from_setting.mm_per_pixel, from_setting.scale_source) == (0.5, "setting")
    from_photo = resolve_scale(parse_options({}, 0.3, None), data)
    assert from_photo.scale_source == "metadata" and from_photo.mm_per_pixel == pytest.approx(8.224, abs=1e-3)
    nothing = resolve_scale(parse_options({}, 0.3, None), photo())
    assert nothing.mm_per_pixel is None and nothing.scale_source == "" and "no EXIF FocalLength" in nothing.scale_detail
