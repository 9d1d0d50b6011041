"""Request options: defaults, coercion from strings (perf_analyzer, forms), and errors naming the field."""

from __future__ import annotations

import pytest

from anomaly.errors import InputError
from anomaly.options import RequestOptions, parse_options


def test_defaults_and_coercion():
    assert parse_options({}, 0.3) == RequestOptions(0.3, False, None, None)
    assert (parse_options({}, 0.3, 0.05).mm_per_pixel, parse_options({}, 0.3, 0.05).scale_source) == (0.05, "setting")
    got = parse_options({"confidence_threshold": "0.5", "include_masks": "true", "frame_id": "cam1/0001.jpg",
                         "mm_per_pixel": 0.1, "sequence_id": 0}, 0.3)  # fmt: skip
    assert got == RequestOptions(0.5, True, "cam1/0001.jpg", 0.1, scale_source="request")
    assert parse_options({"confidence_threshold": 1, "include_masks": 0}, 0.3) == RequestOptions(1.0, False)


@pytest.mark.parametrize(
    "params,field,words",
    [
        ({"confidence_threshold": 1.01}, "confidence_threshold", "must be in [0.0, 1.0]"),
        ({"confidence_threshold": "high"}, "confidence_threshold", "must be a number"),
        ({"confidence_threshold": float("nan")}, "confidence_threshold", "finite"),
        ({"confidence_threshold": True}, "confidence_threshold", "boolean"),
        ({"include_masks": "perhaps"}, "include_masks", "true or false"),
        ({"frame_id": "x" * 129}, "frame_id", "1-128"),
        ({"frame_id": "<script>"}, "frame_id", "letters, digits"),
        ({"frame_id": "frame-1\n"}, "frame_id", "letters, digits"),  # a trailing newline
        ({"frame_id": "pont-d\u00e9-1"}, "frame_id", "letters, digits"),  # a non-ASCII letter
        ({"frame_id": "\u0661\u0662"}, "frame_id", "letters, digits"),  # non-ASCII digits
        ({"mm_per_pixel": -1}, "mm_per_pixel", "(0.0, 1000.0]"),
        ({"confidence_treshold": 0.2}, "confidence_treshold", "not a known option"),
    ],
)
def test_errors_name_the_field(params, field, words):
    with pytest.raises(InputError) as err:
        parse_options(params, 0.3)
    assert err.value.field == field and words in str(err.value)


def test_only_what_the_request_set_is_passed_on():
    """The gateway and the handler send Triton only the options the request set, so Triton's own defaults apply
    to the rest and say so (a pixel size from the MM_PER_PIXEL setting is `setting`, not `request`)."""
    assert parse_options({}, 0.3, 0.05).given() == {}
    got = parse_options({"include_masks": "1", "tiling": "OFF", "frame_id": ""}, 0.3, 0.05)
    assert got.given() == {"include_masks": True, "tiling": "off"}


def test_every_way_in_takes_the_declared_options():
    """The gateway's JSON bodies and upload form and the Python client's keywords are read off OPTIONS."""
    from anomaly.options import OPTION_NAMES
    from client.triton_client import AnomalyClient
    from runpod_handler.gateway import app

    schemas = app.openapi()["components"]["schemas"]
    assert list(schemas["DetectRequest"]["properties"]) == ["image", *OPTION_NAMES]
    assert list(schemas["BatchRequest"]["properties"]) == [
        "images",
        "frame_ids",
        *(n for n in OPTION_NAMES if n != "frame_id"),
    ]
    form = next(v for k, v in schemas.items() if k.startswith("Body_detect_upload"))
    assert list(form["properties"]) == ["file", *OPTION_NAMES]
    client = AnomalyClient.__new__(AnomalyClient)  # no server needed: the keywords are checked before any call
    with pytest.raises(TypeError, match="confidence_treshold"):
        client.detect_full(b"", confidence_treshold=0.2)
