"""anomaly_pipeline through a real tritonserver, over HTTP and gRPC, with real JPEG and PNG images."""

from __future__ import annotations

import concurrent.futures
import io
import time

import numpy as np
import pytest
from PIL import Image

from anomaly.masks import rle_to_mask
from client import AnomalyServiceError
from tests.conftest import SAMPLES, encode

SEED_FIELDS = {"frame_id", "image_size", "anomalies", "anomaly_count", "structures", "processing_time_ms"}
ANOMALY_FIELDS = {"anomaly_id", "defect_type", "structure_type", "bbox", "geometry", "confidence"}
GEOMETRY_FIELDS = {"area_pixels", "length_pixels", "width_pixels", "orientation_degrees"}
CONFIDENCE_FIELDS = {"detection", "segmentation", "combined"}
LOW = 0.25  # the untrained detector's scores sit around 0.2-0.45; this keeps a handful of boxes


def check_response(response: dict, width: int, height: int, meta) -> None:
    assert SEED_FIELDS <= set(response)
    assert response["image_size"] == {"width": width, "height": height}
    assert response["anomaly_count"] == len(response["anomalies"])
    assert response["processing_time_ms"] > 0
    defect_names = set(meta.classes_with_role("defect"))
    structure_names = set(meta.classes_with_role("structure"))
    ids = set()
    for a in response["anomalies"]:
        assert ANOMALY_FIELDS <= set(a)
        assert a["anomaly_id"].startswith("anom_") and a["anomaly_id"] not in ids
        ids.add(a["anomaly_id"])
        assert a["defect_type"] in defect_names
        assert a["structure_type"] == "unknown" or a["structure_type"] in structure_names
        b = a["bbox"]
        assert 0 <= b["x_min"] < b["x_max"] <= width and 0 <= b["y_min"] < b["y_max"] <= height
        assert GEOMETRY_FIELDS <= set(a["geometry"])
        g = a["geometry"]
        assert isinstance(g["area_pixels"], int)
        assert 0 <= g["area_pixels"] <= (b["x_max"] - b["x_min"]) * (b["y_max"] - b["y_min"])
        assert g["width_method"] in ("mask", "image") and g["width_uncertainty_pixels"] > 0
        if g["area_pixels"] and g["width_method"] == "mask":  # a width read from the photo is not the mask's
            assert g["width_pixels"] == pytest.approx(g["area_pixels"] / g["length_pixels"], rel=0.01, abs=0.01)
        assert 0 <= g["orientation_degrees"] < 180
        assert set(a["confidence"]) == CONFIDENCE_FIELDS
        assert all(0 <= v <= 1 for v in a["confidence"].values())
    for s in response["structures"]:
        assert s["structure_type"] in structure_names
        b = s["bbox"]
        assert 0 <= b["x_min"] < b["x_max"] <= width and 0 <= b["y_min"] < b["y_max"] <= height


def test_jpeg_1080p_every_seed_field(client, deck_jpeg, exported):
    response = client.detect(deck_jpeg, frame_id="deck-001", confidence_threshold=LOW)
    assert response["frame_id"] == "deck-001"
    check_response(response, 1920, 1080, exported)
    assert response["anomaly_count"] + len(response["structures"]) > 0
    # Untrained weights are never served silently.
    assert response["untrained_weights"] is True
    assert any(w.startswith("UNTRAINED WEIGHTS") for w in response["warnings"])


def test_png_with_masks_decodes_inside_bboxes(client, pier_png, exported):
    response = client.detect(pier_png, include_masks=True, confidence_threshold=LOW)
    check_response(response, 800, 450, exported)
    assert response["anomalies"], "the pier sample should give defects at this threshold"
    for a in response["anomalies"]:
        mask = rle_to_mask(a["mask"])
        assert mask.shape == (450, 800)
        b = a["bbox"]
        outside = mask.copy()
        outside[b["y_min"] : b["y_max"], b["x_min"] : b["x_max"]] = False
        assert not outside.any()
        assert mask.sum() == a["geometry"]["area_pixels"]


def test_served_geometry_is_the_geometry_of_the_served_masks(triton, grpc_client, pier_png):
    """Each defect's numbers, measured again here from the mask the service returned, come out the same to the
    last digit. The test server's geometry step shares a frame's masks with a worker process
    (GEOMETRY_WORKERS=2, tests/conftest.py): that process is there, the rows come back in order, and a worker
    that dies is replaced without the frame losing a number."""
    import psutil

    from anomaly.geometry import GEOMETRY_FIELDS, measure

    (geometry,) = [p for p, name in triton.model_processes().items() if name == "geometry"]
    workers = [c for c in geometry.children() if "anomaly.geometry_workers" in " ".join(c.cmdline())]
    assert len(workers) == 1 and workers[0].status() != psutil.STATUS_ZOMBIE
    assert triton.memory_mib()["processes_mib"]["geometry workers"] > 0  # memory reports name them
    response = grpc_client.detect(pier_png, include_masks=True, confidence_threshold=LOW)
    assert len(response["anomalies"]) >= 2, "too few defects to share among processes"
    for a in response["anomalies"]:
        again = measure(rle_to_mask(a["mask"]))
        from_photo = ("width_pixels", "max_width_pixels") if a["geometry"]["width_method"] == "image" else ()
        served = {f: a["geometry"][f] for f in GEOMETRY_FIELDS if f not in from_photo}
        assert served == {f: v for f, v in again.items() if f not in from_photo}, a["anomaly_id"]
    # A worker killed between frames: the step notices, measures that share itself and starts a new worker.
    workers[0].kill()  # a zombie until the step, its parent, reaps it
    deadline = time.monotonic() + 5
    while workers[0].is_running() and workers[0].status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)
    again = grpc_client.detect(pier_png, include_masks=True, confidence_threshold=LOW)
    assert [(a["bbox"], a["geometry"]) for a in again["anomalies"]] == [
        (a["bbox"], a["geometry"]) for a in response["anomalies"]
    ]
    assert geometry.is_running()  # the step itself went on
    (new,) = [c for c in geometry.children() if "anomaly.geometry_workers" in " ".join(c.cmdline())]
    assert new.pid != workers[0].pid


def test_no_mask_bytes_unless_asked(grpc_client, pier_png):
    response = grpc_client.detect(pier_png, confidence_threshold=LOW)
    assert response["anomalies"]
    assert all("mask" not in a for a in response["anomalies"])


def test_threshold_is_applied(grpc_client, pier_png):
    full = grpc_client.detect_full(pier_png, confidence_threshold=LOW)
    strict = grpc_client.detect_full(pier_png, confidence_threshold=0.4)
    assert (full.arrays["SCORES"] > LOW).all() and (strict.arrays["SCORES"] > 0.4).all()
    assert len(strict.arrays["SCORES"]) < len(full.arrays["SCORES"])
    none = grpc_client.detect(pier_png, confidence_threshold=1.0)
    assert none["anomaly_count"] == 0 and none["structures"] == []


def test_exif_orientation_is_honoured(http_client):
    # Stored 800 wide x 600 high with orientation 6: upright it is 600 wide x 800 high.
    response = http_client.detect((SAMPLES / "tunnel_wall_exif.jpg").read_bytes(), confidence_threshold=0.9)
    assert response["image_size"] == {"width": 600, "height": 800}


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF"])
def test_other_formats(grpc_client, fmt):
    rgb = np.asarray(Image.open(SAMPLES / "pier_spalling.png").convert("RGB"))[:200, :300]
    response = grpc_client.detect(encode(rgb, fmt), confidence_threshold=0.9)
    assert response["image_size"] == {"width": 300, "height": 200}


def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")  # 144 Mpx, a few kB
    return buf.getvalue()


BAD_IMAGES = {
    "empty": (b"", "empty"),
    "not an image": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10, "not a decodable image"),
    "truncated jpeg": ((SAMPLES / "bridge_deck.jpg").read_bytes()[:5000], "truncated or corrupt"),
    "corrupt png": (
        (SAMPLES / "pier_spalling.png").read_bytes()[:200] + b"\x00" * 500,
        "truncated or corrupt",
    ),
    "decompression bomb": (_bomb_png(), "pixels, more than the"),
    "gif": (encode(np.zeros((8, 8, 3), np.uint8), "GIF"), "format GIF is not accepted"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_get_clear_errors_and_server_keeps_serving(client, case, pier_png):
    data, expected = BAD_IMAGES[case]
    with pytest.raises(AnomalyServiceError) as err:
        client.detect(data)
    assert err.value.bad_input, str(err.value)
    assert "image" in str(err.value) and expected in str(err.value)
    assert client.detect(pier_png, confidence_threshold=0.9)["image_size"]["width"] == 800


BAD_OPTIONS = {
    "threshold above 1": ({"confidence_threshold": 1.5}, "confidence_threshold"),
    "threshold below 0": ({"confidence_threshold": -0.1}, "confidence_threshold"),
    "frame_id with spaces": ({"frame_id": "a b; rm -rf"}, "frame_id"),
    "mm_per_pixel zero": ({"mm_per_pixel": 0.0}, "mm_per_pixel"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_options_name_the_field(client, case, pier_png):
    options, field = BAD_OPTIONS[case]
    with pytest.raises(AnomalyServiceError) as err:
        client.detect(pier_png, **options)
    assert err.value.bad_input and field in str(err.value)


def test_unknown_parameter_is_refused_not_ignored(triton, pier_png):
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    client = tc.InferenceServerClient(triton.grpc_url)
    tensor = tc.InferInput("IMAGE", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([pier_png], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="confidence_treshold"):
        client.infer("anomaly_pipeline", [tensor], parameters={"confidence_treshold": 0.5})


def test_two_images_in_one_request_are_refused(triton, pier_png):
    import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException

    client = tc.InferenceServerClient(triton.http_url)
    tensor = tc.InferInput("IMAGE", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([pier_png, pier_png], dtype=np.object_))
    with pytest.raises(InferenceServerException):  # the config's dims [1] refuse it before any model runs
        client.infer("anomaly_pipeline", [tensor])


def test_concurrent_requests_over_grpc(grpc_client, pier_png, deck_jpeg):
    """Several frames in flight at once (the detector batches them); each answer belongs to its request."""
    jobs = [(f"frame-{i}", pier_png if i % 2 else deck_jpeg) for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda j: grpc_client.detect(j[1], frame_id=j[0], confidence_threshold=0.5), jobs))
    for (frame_id, data), response in zip(jobs, results):
        assert response["frame_id"] == frame_id
        assert response["image_size"]["width"] == (800 if data is pier_png else 1920)


def test_the_detector_batches_frames_whose_bytes_differ_in_length(triton, pier_png, deck_jpeg):
    """Between steps the encoded frame travels as a uint8 row as long as its bytes (half the cost of a string
    tensor per hop), so no two frames have the same shape: the detector's dynamic batcher must still group them
    (ragged batch), and each frame must get its own detections back. Plain tritonclient calls of the step."""
    import tritonclient.grpc as grpcclient

    pier = np.asarray(Image.open(io.BytesIO(pier_png)).convert("RGB"))
    deck = np.asarray(Image.open(io.BytesIO(deck_jpeg)).convert("RGB"))
    frames = [encode(rgb, quality=q) for rgb, q in ((deck, 95), (pier, 90), (deck, 70), (pier, 60), (deck, 50))]
    assert len({len(f) for f in frames}) == len(frames)
    client = grpcclient.InferenceServerClient(triton.grpc_url)

    def inputs(data: bytes):
        hw = Image.open(io.BytesIO(data)).size[::-1]
        encoded = grpcclient.InferInput("ENCODED", [1, len(data)], "UINT8")
        encoded.set_data_from_numpy(np.frombuffer(data, np.uint8).reshape(1, -1))
        tiling = grpcclient.InferInput("TILING", [1, 1], "BYTES")
        tiling.set_data_from_numpy(_plan(hw))
        return [encoded, tiling]

    def batches() -> dict[int, int]:
        stats = client.get_inference_statistics("detector", as_json=True)["model_stats"][0]
        return {int(b["batch_size"]): int(b["compute_infer"].get("count", 0)) for b in stats.get("batch_stats", [])}

    try:
        alone = [client.infer("detector", inputs(f)).as_numpy("dets") for f in frames]
        before = batches()
        # the first frame's intake (decoding on this CPU) keeps the step busy while the others queue
        with concurrent.futures.ThreadPoolExecutor(len(frames)) as pool:
            together = list(pool.map(lambda f: client.infer("detector", inputs(f)).as_numpy("dets"), frames))
        after = batches()
    finally:
        client.close()
    grouped = {size: after[size] - before.get(size, 0) for size in after if size > 1}
    assert sum(grouped.values()) >= 1, f"no batch of more than one frame: {after}"
    for mine, reference in zip(together, alone):
        np.testing.assert_allclose(mine, reference, atol=1e-3)


DECLARED_OUTPUTS = ("RESULT_JSON", "BOXES", "SCORES", "CLASS_IDS", "SEG_INDEX", "MASK_SCORES", "GEOMETRY")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_any_single_output_can_be_asked_for_alone(triton, pier_png, protocol):
    """A plain tritonclient asking for one output (the natural call: RESULT_JSON alone) gets just that, with
    the same content as when every output is asked for."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    tc = grpcclient if protocol == "grpc" else httpclient
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    client = tc.InferenceServerClient(url)
    params = {"confidence_threshold": 0.4, "frame_id": "same-frame"}  # one defect: SAM runs, quickly

    def infer(names):
        image = tc.InferInput("IMAGE", [1], "BYTES")
        image.set_data_from_numpy(np.array([pier_png], dtype=np.object_))
        outputs = [tc.InferRequestedOutput(n) for n in names]
        result = client.infer("anomaly_pipeline", [image], outputs=outputs, parameters=params)
        return {n: result.as_numpy(n) for n in names}

    everything = infer(DECLARED_OUTPUTS)
    assert len(everything["SEG_INDEX"]) > 0  # masks and geometry are really computed
    for name in DECLARED_OUTPUTS:
        alone = infer([name])
        assert set(alone) == {name}
        if name == "RESULT_JSON":
            import json

            one, full = (json.loads(r[name].reshape(-1)[0]) for r in (alone, everything))
            assert one["anomaly_count"] == full["anomaly_count"] and one["frame_id"] == "same-frame"
        else:
            np.testing.assert_allclose(alone[name], everything[name], rtol=1e-6)
    client.close()


def test_response_says_what_ran_the_detector(grpc_client, pier_png):
    models = grpc_client.detect(pier_png, confidence_threshold=1.0)["models"]
    detector = models["detector"]
    assert detector["backend"] == "onnxruntime" and detector["device"] == "cpu"  # this machine has no GPU
    assert "no GPU" in detector["reason"] and "CPUExecutionProvider" in detector["runtime"]
    assert models["segmenter"]["device"] == "cpu"
    # the session's server overlaps the GPU steps' batches (OVERLAP_BATCHES=on, tests/conftest.py)
    assert models["detector"]["batches"] == models["segmenter"]["batches"] == "overlapped"


def _call_step(triton, model: str, inputs: dict[str, np.ndarray], protocol: str = "grpc"):
    """A plain tritonclient call of one internal step, as anyone who can reach Triton's ports could make."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import np_to_triton_dtype

    tc = grpcclient if protocol == "grpc" else httpclient
    client = tc.InferenceServerClient(triton.grpc_url if protocol == "grpc" else triton.http_url)
    tensors = []
    for name, value in inputs.items():
        tensor = tc.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    try:
        return client.infer(model, tensors)
    finally:
        client.close()


def _packed(n: int) -> np.ndarray:
    out = np.empty((1, n), dtype=np.object_)
    for i in range(n):
        out[0, i] = b"\x00"
    return out


def _crack_on_no_image(seg_index: int) -> dict[str, np.ndarray]:
    """The geometry step's inputs for one 8 x 8 crack mask (class 0 is `crack`) on a frame that is no image."""
    return {
        "MASK_BOXES": np.array([[[0, 0, 8, 8]]], np.int32),
        "MASKS": np.array([[b"\xff" * 8]], np.object_),
        "ENCODED": np.full((1, 64), 7, np.uint8),
        "CLASS_IDS": np.array([0], np.int32),
        "SEG_INDEX": np.array([seg_index], np.int32),
    }


def _plan(image_hw, mode: str = "off") -> np.ndarray:
    from anomaly.tiling import plan_tiles

    return np.array([[plan_tiles(image_hw, 576, mode, 64).to_json()]], dtype=np.object_)


@pytest.mark.parametrize(
    "model,inputs,words",
    [
        # 20000 x 20000 would be a 400-megapixel mask: refused before anything is allocated
        ("geometry", {"MASK_BOXES": np.array([[[0, 0, 20000, 20000]]], np.int32), "MASKS": _packed(1)}, "MASK_BOXES"),
        ("geometry", {"MASK_BOXES": np.array([[[10, 10, 0, 0]]], np.int32), "MASKS": _packed(1)}, "MASK_BOXES"),
        ("geometry", {"MASK_BOXES": np.array([[[0, 0, 8, 8]]], np.int32), "MASKS": _packed(1)}, "MASKS[0]: must be 8"),
        ("geometry", _crack_on_no_image(seg_index=3), "SEG_INDEX: must index the 1 detections"),
        ("geometry", _crack_on_no_image(seg_index=0), "ENCODED: is not a decodable"),
        (
            "select_detections",
            {
                "dets": np.zeros((1, 300, 4), np.float32),
                "labels": np.zeros((1, 299, 23), np.float32),
                "TILING": _plan((1080, 1920)),
            },
            "labels: must have shape (1, 300, N)",
        ),
        (
            "select_detections",
            {
                "dets": np.zeros((1, 300, 4), np.float32),
                "labels": np.zeros((1, 300, 23), np.float32),
                "TILING": np.array([[b'{"mode": "on", "windows": [[0, 0, 99999, 99999]]}']], dtype=np.object_),
            },
            "TILING: must hold mode",
        ),
        (
            "select_detections",
            {
                "dets": np.zeros((1, 300, 4), np.float32),
                "labels": np.zeros((1, 300, 23), np.float32),
                "TILING": _plan((1080, 1920), "on"),  # 8 windows: 300 boxes cannot be theirs
            },
            "dets: holds 300 boxes, not a whole number for",
        ),
        # the encoded frame between steps is a uint8 row of its bytes: these are no image
        ("detector", {"ENCODED": np.full((1, 64), 7, np.uint8), "TILING": _plan((1080, 1920))}, "not a decodable"),
    ],
)
def test_internal_steps_check_their_inputs(triton, model, inputs, words):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as err:
        _call_step(triton, model, inputs)
    assert "INVALID_ARGUMENT" in str(err.value.status()) and words in err.value.message()
    assert "Traceback" not in err.value.message() and "Error:" not in err.value.message()


def test_result_step_refuses_garbage_metadata(triton, pier_png):
    from tritonclient.utils import InferenceServerException

    not_json = np.array([[b"not json"]], dtype=np.object_)
    inputs = {
        "IMAGE_SIZE": np.array([450, 800], np.int32), "START_NS": np.array([0], np.int64),
        "DETECTOR": np.array([[b"{}"]], dtype=np.object_), "BOXES_IN": np.zeros((0, 4), np.float32),
        "SCORES_IN": np.zeros(0, np.float32), "CLASS_IDS_IN": np.zeros(0, np.int32),
        "SEG_INDEX_IN": np.zeros(0, np.int32), "NOTES": np.array([b"x"], dtype=np.object_),
        "MASK_BOXES": np.zeros((1, 0, 4), np.int32), "MASKS": np.empty((1, 0), dtype=np.object_),
        "MASK_SCORES_IN": np.zeros((1, 0), np.float32), "SEGMENTER": not_json, "GEOMETRY_IN": np.zeros((0, 5)),
        "WIDTH_IN": np.zeros((0, 3)),
        "SCALE": np.array([[b'{"mm_per_pixel": null, "source": null, "detail": ""}']], dtype=np.object_),
        "TILING": _plan((450, 800)), "SAM_WINDOWS": np.zeros((1, 0, 4), np.int32),
    }  # fmt: skip
    with pytest.raises(InferenceServerException) as err:
        _call_step(triton, "result", inputs, "http")
    assert err.value.status() == "400" and "SEGMENTER: is not a JSON object" in err.value.message()
    inputs["SEGMENTER"] = np.array([[b"{}"]], dtype=np.object_)
    good_scale = inputs["SCALE"]
    inputs["SCALE"] = np.array([[b'{"mm_per_pixel": -1, "source": "request", "detail": ""}']], dtype=np.object_)
    with pytest.raises(InferenceServerException) as err:
        _call_step(triton, "result", inputs, "http")
    assert err.value.status() == "400" and "SCALE: mm_per_pixel must be a positive number" in err.value.message()
    inputs["SCALE"] = good_scale  # the same call with sound inputs answers
    body = _call_step(triton, "result", inputs, "http").as_numpy("RESULT_JSON")
    assert b'"anomaly_count":0' in bytes(body.reshape(-1)[0])


def test_scale_comes_from_the_photo_when_none_is_given(grpc_client):
    """A nadir drone photo (EXIF focal length and 35 mm equivalent, DJI XMP altitude and gimbal pitch) gets
    its mm fields from its own metadata and says so; a request's mm_per_pixel still wins."""
    import math

    from tests.test_scale import xmp

    exif = Image.Exif()
    exif.get_ifd(0x8769).update({0x920A: 8.8, 0xA405: 24})
    buffer = io.BytesIO()
    packet = xmp(RelativeAltitude="+30.0", GimbalPitchDegree="-89.5")
    Image.open(SAMPLES / "pier_spalling.png").convert("RGB").save(buffer, "JPEG", exif=exif, xmp=packet)
    sensor = math.hypot(36, 24) * 8.8 / 24 * 800 / math.hypot(800, 450)  # the equivalent is by the diagonal
    expected = 30000 * sensor / (8.8 * 800)
    found = grpc_client.detect(buffer.getvalue(), confidence_threshold=0.25)
    assert found["scale"]["source"] == "metadata" and "nadir shot 30 m" in found["scale"]["detail"]
    assert found["mm_per_pixel"] == pytest.approx(expected, rel=1e-4)
    assert found["anomalies"] and all("length_mm" in a["geometry"] for a in found["anomalies"])
    given = grpc_client.detect(buffer.getvalue(), confidence_threshold=0.25, mm_per_pixel=0.3)
    assert given["scale"] == {"mm_per_pixel": 0.3, "source": "request", "detail": ""}
    plain = grpc_client.detect((SAMPLES / "pier_spalling.png").read_bytes(), confidence_threshold=0.25)
    assert plain["scale"]["source"] is None and "mm_per_pixel" not in plain
    assert plain["scale"]["detail"] == "no EXIF FocalLength"


def test_large_photo_is_tiled_and_says_so(triton, exported):
    """A 2400 x 1800 photo (over 4x RF-DETR-M's 576 px on its long side): `auto` tiles it, `off` does not; the
    response keeps its shape and full-image coordinates. Plain tritonclient, the option as a request parameter."""
    import json

    import tritonclient.grpc as grpcclient

    from anomaly.tiling import plan_tiles

    rng = np.random.default_rng(7)
    rgb = np.clip(rng.normal(150, 40, (1800, 2400, 3)), 0, 255).astype(np.uint8)
    rgb[900:903, 200:2200] = 10  # a long hairline across many tiles
    data = encode(rgb, "JPEG")
    client = grpcclient.InferenceServerClient(triton.grpc_url)

    def ask(**params):
        tensor = grpcclient.InferInput("IMAGE", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
        result = client.infer("anomaly_pipeline", [tensor], parameters={"confidence_threshold": LOW, **params},
                              outputs=[grpcclient.InferRequestedOutput("RESULT_JSON")])  # fmt: skip
        return json.loads(result.as_numpy("RESULT_JSON").reshape(-1)[0])

    tiled, plain = ask(), ask(tiling="off")
    plan = plan_tiles((1800, 2400), exported.resolution, "auto", 64)
    assert tiled["tiling"]["tiled"] and tiled["tiling"]["mode"] == "auto"
    assert tiled["tiling"]["detector_tiles"] == len(plan.windows) - 1 == 20
    assert tiled["tiling"]["tile_size"] == exported.resolution and tiled["tiling"]["overlap"] == 64
    assert not plain["tiling"]["tiled"] and plain["tiling"]["detector_tiles"] == 0
    for response in (tiled, plain):
        check_response(response, 2400, 1800, exported)
    assert tiled["anomalies"], "the untrained detector finds something at this threshold"
    assert tiled["tiling"]["sam_windows"] >= 1 and plain["tiling"]["sam_windows"] == (1 if plain["anomalies"] else 0)
    whole = round(1024 / 2400, 4)  # SAM's input per photo pixel when it sees the whole photo
    assert tiled["tiling"]["sam_scale"] >= whole and plain["tiling"]["sam_scale"] == (
        whole if plain["anomalies"] else 1
    )
    with pytest.raises(Exception, match="tiling: must be one of auto, off, on"):
        ask(tiling="sometimes")
