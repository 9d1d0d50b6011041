"""The GPU path's logic, run on this CPU-only machine: which runtime serves RF-DETR and why, the torch
preprocessing against the exact numpy/PIL path, the torch detector against the ONNX export, batched SAM
against frame-by-frame SAM, and the serving layout chosen per machine.

What cannot run here (no GPU): nvJPEG decoding, fp16/bf16 kernels and CUDA-graph capture. Their code
paths fall back to the CPU functions tested here when they fail, and `make bench-gpu` exercises them on
a GPU machine."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly.config import load_settings
from anomaly.detector import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    TRT_PROVIDER,
    DetectorMetadata,
    DetectorRunner,
    choose_backend,
    onnx_providers,
    select_detections,
)
from anomaly.errors import ConfigError, InputError
from anomaly.images import (
    decode_image,
    decode_to_tensor,
    orient,
    per_channel,
    read_header,
    rfdetr_input,
    rfdetr_preprocess,
    sam_input,
)
from anomaly.serving.plan import parse_config, serving_plan, write_serving_configs
from tests.conftest import REPO, SAMPLES, encode

BIG = 1 << 30
MEANS, STDS = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# --- which runtime runs RF-DETR ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "requested,device,gpu,providers,asked,backend,on,precision",
    [
        ("auto", "auto", True, [TRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER], "fp32", "onnxruntime", "cuda", "fp32"),
        ("auto", "auto", True, [TRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER], "fp16", "onnxruntime", "cuda", "fp16"),
        ("auto", "auto", True, [CUDA_PROVIDER, CPU_PROVIDER], "fp16", "onnxruntime", "cuda", "fp32"),
        ("auto", "auto", True, [CPU_PROVIDER], "fp32", "torch", "cuda", "fp32"),  # the H100 machine's case
        ("auto", "auto", True, [CPU_PROVIDER], "fp16", "torch", "cuda", "fp16"),
        ("auto", "cuda", True, [CPU_PROVIDER], "fp32", "torch", "cuda", "fp32"),
        ("auto", "auto", False, [CPU_PROVIDER], "fp16", "onnxruntime", "cpu", "fp32"),
        ("auto", "cpu", True, [CUDA_PROVIDER, CPU_PROVIDER], "fp16", "onnxruntime", "cpu", "fp32"),
        ("torch", "auto", True, [CUDA_PROVIDER, CPU_PROVIDER], "fp16", "torch", "cuda", "fp16"),
        ("torch", "auto", False, [CPU_PROVIDER], "fp16", "torch", "cpu", "fp32"),
        ("onnxruntime", "auto", True, [CUDA_PROVIDER, CPU_PROVIDER], "fp32", "onnxruntime", "cuda", "fp32"),
        ("tensorrt", "auto", True, [TRT_PROVIDER, CPU_PROVIDER], "fp16", "onnxruntime", "cuda", "fp16"),
    ],
)
def test_backend_choice(requested, device, gpu, providers, asked, backend, on, precision):
    choice = choose_backend(requested, device, gpu, providers, asked)
    assert (choice.backend, choice.device, choice.precision) == (backend, on, precision)
    assert choice.reason and not choice.warning
    if backend == "onnxruntime":
        assert choice.providers[-1] == CPU_PROVIDER and (on == "cpu") == (choice.providers == (CPU_PROVIDER,))
        options = dict(p for p in onnx_providers(choice) if isinstance(p, tuple))
        if TRT_PROVIDER in options:  # TensorRT builds fp16 engines only when asked
            assert options[TRT_PROVIDER]["trt_fp16_enable"] == (precision == "fp16")
        if CUDA_PROVIDER in options:
            assert options[CUDA_PROVIDER]["use_tf32"] == 0


def test_a_gpu_left_idle_by_the_detector_is_a_warning():
    choice = choose_backend("onnxruntime", "auto", True, [CPU_PROVIDER])
    assert choice.device == "cpu"
    assert "GPU is present but RF-DETR runs on the CPU" in choice.warning and CPU_PROVIDER in choice.warning
    assert not choose_backend("auto", "cpu", True, [CPU_PROVIDER]).warning  # DEVICE=cpu was asked for
    for requested in ("auto", "torch", "onnxruntime"):  # DEVICE=cuda on a machine without one: said, not silent
        choice = choose_backend(requested, "cuda", False, [CPU_PROVIDER])
        assert choice.device == "cpu" and "DEVICE=cuda, but no GPU is visible" in choice.warning


def test_cuda_graph_batch_sizes_cover_every_batch():
    """Which captured graph serves a batch of n frames (the graph code itself needs a GPU)."""
    from anomaly.cuda_graphs import graph_batch_sizes, graph_for

    assert graph_batch_sizes(8) == [1, 2, 4, 8] and graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(1) == [1]
    sizes = graph_batch_sizes(8)
    assert [graph_for(sizes, n) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert graph_for(sizes, 9) is None and graph_for([], 1) is None  # eager


def test_mask_decoder_graphs_hold_each_box_count_unpadded():
    """The decoder's work grows with its boxes, so a frame's boxes replay the graph of their own count (10 boxes
    no longer run in the 16-box graph); 17 have no graph (segment_batch sends a frame's boxes in chunks of 16)."""
    from anomaly.cuda_graphs import graph_for
    from anomaly.segmenter import DECODER_GRAPH_SIZES

    assert [graph_for(DECODER_GRAPH_SIZES, n) for n in range(1, 17)] == list(range(1, 17))
    assert graph_for(DECODER_GRAPH_SIZES, 17) is None and max(DECODER_GRAPH_SIZES) == 16


def test_replayed_graph_pads_the_batch_and_returns_copies():
    """GraphedForward's replay bookkeeping, with a stand-in for torch.cuda.CUDAGraph (capture itself needs a
    GPU): a batch of 3 runs in the size-4 graph, the answer holds 3 items, a fixed input (a frame's features)
    is refreshed on every call, and the next replay does not change an answer already returned."""
    import torch

    from anomaly.cuda_graphs import GraphedForward

    def forward(x, offset):
        return {"double": x * 2 + offset, "parts": [x.sum(dim=1)]}

    class StandInGraph:  # what replay() does: the captured forward, into the captured output buffers
        def __init__(self, static_in, static_offset, static_out):
            self.static_in, self.static_offset, self.static_out = static_in, static_offset, static_out

        def replay(self):
            fresh = forward(self.static_in, self.static_offset)
            self.static_out["double"].copy_(fresh["double"])
            self.static_out["parts"][0].copy_(fresh["parts"][0])

    graphed = GraphedForward(forward)
    for size in (1, 2, 4):
        static_in, static_offset = torch.full((size, 2), -1.0), torch.zeros(1, 2)
        static_out = forward(static_in, static_offset)
        graph = StandInGraph(static_in, static_offset, static_out)
        graphed.graphs[size] = (graph, (static_in, static_offset), static_out)
    assert graphed.max_batch == 4
    x, offset = torch.arange(6, dtype=torch.float32).reshape(3, 2), torch.tensor([[10.0, 20.0]])
    first = graphed(x, offset)
    assert torch.equal(first["double"], x * 2 + offset) and torch.equal(first["parts"][0], x.sum(dim=1))
    again = graphed(torch.zeros(4, 2), torch.ones(1, 2))  # same graph again, another fixed input
    assert torch.equal(again["double"], torch.ones(4, 2))
    assert torch.equal(first["double"], x * 2 + offset)
    assert graphed(torch.ones(5, 2), offset)["double"].shape == (5, 2)  # larger than any graph: eager


def test_graphed_forwards_given_one_pool_capture_every_graph_into_it(monkeypatch):
    """SAM's image encoder and mask decoder graphs share one memory pool (their activations are not held twice)
    and the decoder's graphs one copy of the frame's features; a GraphedForward given no pool gets one of its
    own. All are warmed up and captured on one stream of the process's. Stand-ins for torch.cuda's capture API
    (no GPU here)."""
    import contextlib

    import torch

    from anomaly import cuda_graphs
    from anomaly.cuda_graphs import GraphedForward

    made, captured_into, streams = [], [], []

    def new_pool():
        made.append(object())
        return made[-1]

    class StandInStream:
        def __init__(self):
            streams.append(self)

        def wait_stream(self, other):
            pass

    warmed_on = []

    @contextlib.contextmanager
    def graph(cuda_graph, pool=None, stream=None):
        captured_into.append((pool, stream))
        yield

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", new_pool)
    monkeypatch.setattr(torch.cuda, "Stream", StandInStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: current)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: warmed_on.append(stream) or contextlib.nullcontext())
    monkeypatch.setattr(cuda_graphs, "_capture_stream", None)  # as in a fresh process
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", graph)

    current = StandInStream()  # the thread's own stream
    shared = torch.cuda.graph_pool_handle()
    encoder, decoder, alone = (GraphedForward(lambda x, *fixed: x * 2) for _ in range(3))
    encoder.capture((3,), torch.float32, "cpu", [1, 2], "encoder", pool=shared)
    decoder.capture((2,), torch.float32, "cpu", [3, 1, 2], "decoder", (torch.zeros(1, 2),), pool=shared)
    assert sorted(encoder.graphs) == [1, 2] and sorted(decoder.graphs) == [1, 2, 3]
    assert [pool for pool, _ in captured_into] == [shared] * 5 and len(made) == 1
    assert decoder.note == "CUDA graphs for batch sizes 1-3" and encoder.note == "CUDA graphs for batch sizes [1, 2]"
    fixed = [inputs[1] for _, inputs, _ in decoder.graphs.values()]  # the frame's features, held once for all
    assert all(f is fixed[0] for f in fixed)
    alone.capture((3,), torch.float32, "cpu", [1], "alone")
    assert len(made) == 2 and captured_into[-1][0] is made[-1] is not shared
    # every warm-up and capture on one stream of their own (cuBLAS keeps a workspace per stream it ran on)
    side = streams[1]
    assert len(streams) == 2 and side is not current
    assert warmed_on == [side] * 6 and all(stream is side for _, stream in captured_into)


@pytest.mark.parametrize(
    "requested,gpu,providers,message",
    [
        ("tensorrt", False, [TRT_PROVIDER, CPU_PROVIDER], "needs a GPU"),
        ("tensorrt", True, [CUDA_PROVIDER, CPU_PROVIDER], "TensorrtExecutionProvider"),
        ("magic", True, [CPU_PROVIDER], "must be one of"),
    ],
)
def test_impossible_backend_is_a_start_up_error(requested, gpu, providers, message):
    with pytest.raises(ConfigError, match=message):
        choose_backend(requested, "auto", gpu, providers)


def test_backend_setting_is_validated(monkeypatch):
    monkeypatch.setenv("DETECTOR_BACKEND", "cuda-please")
    with pytest.raises(ConfigError, match="DETECTOR_BACKEND"):
        load_settings()


# --- preprocessing in torch against the exact path --------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_in_torch_matches_pillow(orientation):
    rng = np.random.default_rng(orientation)
    stored = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="PNG", exif=exif)
    upright = decode_image(buf.getvalue(), BIG, BIG)  # Pillow's exif_transpose
    ours = orient(torch.from_numpy(stored).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert np.array_equal(ours, upright)
    header = read_header(buf.getvalue(), BIG, BIG)
    assert (header.height, header.width) == upright.shape[:2] and header.orientation == orientation


@pytest.mark.parametrize("sample", ["bridge_deck.jpg", "tunnel_wall_exif.jpg", "pier_spalling.png"])
def test_tensor_decoding_on_the_cpu_is_decode_image(sample):
    data = (SAMPLES / sample).read_bytes()
    chw = decode_to_tensor(data, "cpu", BIG, BIG)
    assert chw.dtype == torch.uint8 and np.array_equal(chw.permute(1, 2, 0).numpy(), decode_image(data, BIG, BIG))


def test_tensor_decoding_refuses_what_decode_image_refuses():
    with pytest.raises(InputError, match="image: is not a decodable image"):
        decode_to_tensor(b"not an image", "cpu", BIG, BIG)
    with pytest.raises(InputError, match="MAX_IMAGE_PIXELS"):
        decode_to_tensor(encode(np.zeros((40, 40, 3), np.uint8), "PNG"), "cpu", BIG, 100)


def test_a_jpeg_nvjpeg_refuses_is_decoded_on_the_cpu_and_said_in_the_steps_warnings(monkeypatch):
    """A JPEG nvJPEG refuses (e.g. where the card's JPEG decoder is unavailable to the process) but the CPU decodes:
    the frame is decoded on the CPU, and the GPU steps' descriptions carry a warning (their /info records and every
    response's `warnings`) until nvJPEG decodes again. nvJPEG and the card are stand-ins here (no GPU): torchvision's
    decode_jpeg and the pinned copy to the device."""
    import torchvision.io

    from anomaly import images
    from anomaly.result import warnings_for
    from anomaly.serving.reporting import with_gpu_decode_warning

    class Pinned:  # the host-to-device copy, which needs a GPU
        def __init__(self, tensor):
            self.tensor = tensor

        def to(self, device, non_blocking=False):
            return self.tensor

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: Pinned(self))
    monkeypatch.setattr(images, "_gpu_decode_refused", None)
    data = (SAMPLES / "bridge_deck.jpg").read_bytes()
    exact = decode_image(data, BIG, BIG)

    def refusing(encoded, mode, device):
        raise RuntimeError("Error while decoding JPEG images: hardware decoder unavailable")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refusing)
    chw = decode_to_tensor(data, "cuda", BIG, BIG)
    assert np.array_equal(chw.permute(1, 2, 0).numpy(), exact)  # the frame itself is served, decoded on the CPU
    warning = images.gpu_decode_warning()
    assert warning and "hardware decoder unavailable" in warning and "decoded on the CPU" in warning
    detector = with_gpu_decode_warning({"device": "cuda"})
    segmenter = with_gpu_decode_warning({"device": "cuda", "warning": "an earlier warning"})
    assert detector["warning"] == warning and segmenter["warning"] == f"an earlier warning; {warning}"
    trained = types.SimpleNamespace(untrained=False, variant="medium")  # the banners aside
    assert warnings_for(trained, segmenter, [], detector) == [warning, f"an earlier warning; {warning}"]

    with pytest.raises(InputError):  # a broken file is the user's error, not nvJPEG's: no warning from it
        monkeypatch.setattr(images, "_gpu_decode_refused", None)
        decode_to_tensor(data[: len(data) // 3], "cuda", BIG, BIG)
    assert images.gpu_decode_warning() is None

    monkeypatch.setattr(images, "_gpu_decode_refused", "RuntimeError: earlier")
    decoded = torch.from_numpy(exact).permute(2, 0, 1)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda encoded, mode, device: decoded)  # nvJPEG decodes again
    assert decode_to_tensor(data, "cuda", BIG, BIG) is not None
    assert images.gpu_decode_warning() is None and with_gpu_decode_warning({"device": "cuda"}) == {"device": "cuda"}


@pytest.mark.parametrize("shape", [(1080, 1920), (800, 600), (37, 41)])
def test_rfdetr_input_in_torch_matches_the_exact_path(shape):
    rgb = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours = rfdetr_input(torch.from_numpy(rgb).permute(2, 0, 1), 576, MEANS, STDS).numpy()
    exact = rfdetr_preprocess(rgb, 576, MEANS, STDS)
    assert ours.shape == exact.shape == (3, 576, 576)
    assert np.abs(ours - exact).max() < 1e-2  # the required bound; measured about 1e-4


def test_sam_input_in_torch_is_the_predictors_transform():
    from sam2.utils.transforms import SAM2Transforms

    rgb = decode_image((SAMPLES / "tunnel_wall_exif.jpg").read_bytes(), BIG, BIG)
    reference = SAM2Transforms(1024, 0.0)(rgb)
    assert torch.equal(sam_input(torch.from_numpy(rgb).permute(2, 0, 1)), reference)


def test_model_inputs_make_no_tensors_from_host_values_per_frame(monkeypatch):
    """On a GPU a tensor made from host values (torchvision's normalize makes its means and deviations so) is a copy
    from pageable memory, which makes the CPU wait for all the work queued on the card: the per-channel
    constants are made once per device, and a frame's inputs make none (the sync itself needs a GPU: make
    bench-gpu counts it as `*_prepare_gpu_waits`)."""
    chw = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 90, 120), dtype=np.uint8))
    first = (rfdetr_input(chw, 64, MEANS, STDS), sam_input(chw, 64))
    made = []
    for name in ("tensor", "as_tensor"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _f=original, **k: made.append(a) or _f(*a, **k))
    with torch.inference_mode():
        again = (rfdetr_input(chw, 64, MEANS, STDS), sam_input(chw, 64))
    assert made == []
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert per_channel(MEANS, "cpu") is per_channel(tuple(MEANS), torch.device("cpu"))


# --- the torch detector against the ONNX export --------------------------------------------------------------


@pytest.fixture(scope="module")
def runners(exported):
    torch.set_num_threads(2)
    settings = load_settings()
    meta = DetectorMetadata.load(REPO / "model_repository" / "detector" / "1" / "metadata.json")
    onnx_path = REPO / "model_repository" / "detector" / "1" / "model.onnx"
    onnx = DetectorRunner(meta, onnx_path, settings, gpu=False)
    torch_runner = DetectorRunner(meta, onnx_path, dataclasses.replace(settings, detector_backend="torch"), gpu=False)
    return onnx, torch_runner


def test_torch_and_onnx_detectors_agree(runners):
    """Same boxes (IoU >= 0.99) and scores within 1e-3, query slot by query slot. RF-DETR picks its 300 queries
    by top-k over encoder proposals: a near tie there (float rounding differs between the two runtimes) may
    exchange one proposal for another, changing at most 2 of 300 slots; every other slot must agree."""
    from tests.test_e2e_parity import iou_xyxy

    def xyxy(cxcywh):
        cx, cy, w, h = cxcywh.T
        return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)

    onnx, torch_runner = runners
    assert onnx.info["backend"] == "onnxruntime" and torch_runner.info["backend"] == "torch"
    for sample in ("bridge_deck.jpg", "pier_spalling.png"):
        x, hw = onnx.prepare((SAMPLES / sample).read_bytes())
        (b1,), (l1,) = onnx.run([x])
        (b2,), (l2,) = torch_runner.run([x])
        differing = np.nonzero(np.abs(b1 - b2).max(1) > 1e-3)[0]
        assert len(differing) <= 2, f"{sample}: slots {differing} differ"
        same = np.setdiff1d(np.arange(len(b1)), differing)
        s1, s2 = (1 / (1 + np.exp(-logits[same])) for logits in (l1, l2))
        assert np.abs(s1 - s2).max() <= 1e-3
        confident = s1.max(1) > 0.2
        assert confident.sum() > 10
        iou = np.diag(iou_xyxy(xyxy(b1[same][confident]), xyxy(b2[same][confident])))
        assert iou.min() >= 0.99
        # and what select_detections makes of them: the same detections, bar scores within 1e-3 of the threshold
        d1, d2 = (select_detections(b[same], lg[same], hw, 0.2) for b, lg in ((b1, l1), (b2, l2)))
        assert abs(len(d1) - len(d2)) <= int(np.sum(np.abs(s1 - 0.2) <= 1e-3))


def test_detector_batches_answer_like_single_frames(runners):
    onnx, _ = runners
    frames = [onnx.prepare((SAMPLES / s).read_bytes())[0] for s in ("bridge_deck.jpg", "pier_spalling.png")]
    boxes, logits = onnx.run(frames)
    single_boxes, single_logits = onnx.run(frames[1:])
    assert boxes.shape[0] == 2
    np.testing.assert_allclose(boxes[1], single_boxes[0], atol=1e-4)
    np.testing.assert_allclose(logits[1], single_logits[0], atol=1e-3)


def test_detector_windows_are_made_per_batch(runners, monkeypatch):
    """A tiled photo's windows (4 MB each at RF-DETR-M's input) are cut and resized only when their batch runs:
    prepare_windows decodes and hands back makers, run_all runs them at most the step's batch size at a time,
    and run_frames gives each frame of a batch its own windows back, in order."""
    onnx, _ = runners
    data = (SAMPLES / "bridge_deck.jpg").read_bytes()
    windows = [(0, 0, 400, 300), (1000, 400, 1600, 900), (1520, 780, 1920, 1080)]
    makers, hw = onnx.prepare_windows(data, windows)
    assert hw == (1080, 1920) and len(makers) == 3
    assert not any(isinstance(m, np.ndarray) for m in makers)  # nothing prepared yet
    batches = []
    run = onnx.run
    monkeypatch.setattr(onnx, "max_batch", 2)
    monkeypatch.setattr(onnx, "run", lambda inputs: batches.append(len(inputs)) or run(inputs))
    boxes, logits = onnx.run_all(makers)
    assert batches == [2, 1] and boxes.shape[0] == 3
    assert not np.allclose(boxes[0], boxes[2], atol=1e-3)  # different windows, different answers
    first, second = onnx.run_frames([makers[:1], makers[1:]])  # two frames in one batch of the detector step
    queries = boxes.shape[1]
    assert first[0].shape == (queries, 4) and second[0].shape == (2 * queries, 4)
    np.testing.assert_allclose(first[0], boxes[0], atol=1e-5)
    np.testing.assert_allclose(second[0][queries:], boxes[2], atol=1e-5)
    np.testing.assert_allclose(second[1][queries:], logits[2], atol=1e-5)


# --- SAM: frames embedded together equal frames embedded alone ----------------------------------------------


@pytest.mark.slow  # runs SAM's image encoder several times: make test, not make unit
def test_batched_segmenter_equals_frame_by_frame(exported):
    from anomaly.weights import load_segmenter

    torch.set_num_threads(2)
    segmenter, _ = load_segmenter(load_settings())
    pier = decode_image((SAMPLES / "pier_spalling.png").read_bytes(), BIG, BIG)
    wall = decode_image((SAMPLES / "tunnel_wall_exif.jpg").read_bytes(), BIG, BIG)
    pier_boxes = np.array([[100, 50, 300, 200], [10, 10, 60, 90]], np.float32)
    wall_boxes = np.array([[50, 60, 300, 500]], np.float32)
    frames = [
        (*segmenter._prepare_rgb(pier), pier_boxes),
        (*segmenter._prepare_rgb(wall), np.zeros((0, 4), np.float32)),  # a frame without defects costs nothing
        (*segmenter._prepare_rgb(wall), wall_boxes),
    ]
    together = segmenter._segment_batch(frames)
    assert [len(c) for c in together] == [2, 0, 1]
    for crops, (rgb, boxes) in zip((together[0], together[2]), ((pier, pier_boxes), (wall, wall_boxes))):
        for batched, alone in zip(crops, segmenter._segment_batch([(*segmenter._prepare_rgb(rgb), boxes)])[0]):
            assert batched.box == alone.box
            assert (batched.mask == alone.mask).mean() >= 0.999
            assert batched.score == pytest.approx(alone.score, abs=1e-4)


def test_encoder_weights_in_bf16_change_no_bit_under_autocast():
    """On a GPU the SAM image encoder keeps its linear and convolution weights in bf16 (store_in_bf16): under
    bf16 autocast they are cast to bf16 for every forward anyway. Run here under the CPU's bf16 autocast, which
    casts the same layers: the outputs of the converted encoder equal the fp32 one's bit for bit."""
    import copy

    from sam2.build_sam import build_sam2

    from anomaly.segmenter import SAM2_CONFIGS, store_in_bf16

    torch.set_num_threads(2)
    torch.manual_seed(0)
    encoder = build_sam2(SAM2_CONFIGS["tiny"], ckpt_path=None, device="cpu").image_encoder.eval()
    for param in encoder.parameters():  # untrained layers hold many equal values; vary them all
        param.data.normal_(0.0, 0.02)
    converted = copy.deepcopy(encoder)
    total = sum(p.numel() for p in encoder.parameters())
    assert store_in_bf16(converted) > 0.99 * total
    assert sum(p.numel() * p.element_size() for p in converted.parameters()) < 0.51 * 4 * total
    image = torch.randn(1, 3, 512, 512)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        expected, got = encoder(image), converted(image)
    pairs = [*zip(expected["backbone_fpn"], got["backbone_fpn"]), (expected["vision_features"], got["vision_features"])]
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in pairs)
    # not a no-op: the stored weights lost their low bits; autocast drops the same bits from the fp32 ones
    before, after = encoder.trunk.patch_embed.proj.weight, converted.trunk.patch_embed.proj.weight
    assert after.dtype == torch.bfloat16 and not torch.equal(before, after.float())
    assert torch.equal(before.bfloat16(), after)


def test_mask_decoder_weights_in_bf16_change_no_bit_under_autocast():
    """On a GPU SAM's mask decoder keeps its weights in bf16 too (store_in_bf16, transposed convolutions included):
    without autocast's cast cache, each forward (each replay of its CUDA graphs) cast them again, about a hundred
    small kernels. Through _decode_boxes, what those graphs capture, under the CPU's bf16 autocast: the masks'
    logits and the predicted IoU equal the fp32 decoder's bit for bit, and so do the image's features, whose two
    finest levels go through the decoder's conv_s0 / conv_s1."""
    from anomaly.segmenter import Sam2Segmenter, store_in_bf16

    torch.set_num_threads(2)
    torch.manual_seed(0)
    segmenter = Sam2Segmenter("tiny", None, device="cpu")
    decoder = segmenter.model.sam_mask_decoder
    for param in segmenter.model.parameters():  # untrained layers hold many equal values; vary them all
        param.data.normal_(0.0, 0.02)
    frame = (torch.randn(1, 256, 64, 64), torch.randn(1, 32, 256, 256), torch.randn(1, 64, 128, 128))
    coords = torch.rand(3, 2, 2) * segmenter.resolution
    total = sum(p.numel() for p in decoder.parameters())
    fp32_weight = decoder.output_upscaling[0].weight.detach().clone()
    image = torch.randn(1, 3, 512, 512)  # forward_image: its finest features go through the decoder's conv_s0/s1
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        expected, features = segmenter._decode_boxes(coords, *frame), segmenter.model.forward_image(image)
        assert store_in_bf16(decoder) > 0.98 * total
        got, converted = segmenter._decode_boxes(coords, *frame), segmenter.model.forward_image(image)
    assert features["backbone_fpn"][0].shape[1] == 32 and decoder.conv_s0.weight.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(features["backbone_fpn"], converted["backbone_fpn"]))
    stored = decoder.output_upscaling[0].weight  # a transposed convolution: converted, its low bits dropped
    assert stored.dtype == torch.bfloat16 and torch.equal(stored, fp32_weight.bfloat16())
    assert not torch.equal(stored.float(), fp32_weight)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(expected, got))
    assert expected[0].shape == (3, 1, 256, 256) and float(expected[0].std()) > 0


def test_cached_gpu_memory_is_handed_back_after_load(monkeypatch):
    """What the detector and segmenter steps call once loaded (anomaly.hardware.release_unused_gpu_memory, then
    torch_gpu_memory for the log). With
    the real torch of this CPU-only machine CUDA never started: nothing to hand back. The CUDA side is a stand-in
    (no GPU here): cache emptied once, the bytes it held reported."""
    import sys
    import types

    from anomaly.hardware import release_unused_gpu_memory, torch_gpu_memory

    assert "torch" in sys.modules and release_unused_gpu_memory() == 0 and torch_gpu_memory() is None
    reserved, emptied = [3 << 30], []

    def empty_cache():
        emptied.append(True)
        reserved[0] = 2 << 30

    cuda = types.SimpleNamespace(
        is_initialized=lambda: True,
        memory_reserved=lambda: reserved[0],
        memory_allocated=lambda: 1 << 29,
        empty_cache=empty_cache,
    )
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    assert release_unused_gpu_memory() == 1 << 30 and emptied == [True]
    assert torch_gpu_memory() == (1 << 29, 2 << 30)  # what the step logs then: tensors, allocator's total
    monkeypatch.delitem(sys.modules, "torch")  # a process that never imported torch (the CPU detector)
    assert release_unused_gpu_memory() == 0 and torch_gpu_memory() is None


@pytest.mark.slow  # runs SAM's image encoder several times: make test, not make unit
def test_one_decoder_call_for_the_boxes_of_a_frame(exported):
    """The GPU path decodes a frame's boxes in one mask-decoder call, padded up to the box count of a captured
    CUDA graph. Run here on the CPU against one call per box (the CPU path): the same logits whether decoded
    alone, together, or together with padding boxes; and a box reads its own frame's embedding."""
    from anomaly.weights import load_segmenter

    torch.set_num_threads(2)
    segmenter, _ = load_segmenter(load_settings())
    pier = decode_image((SAMPLES / "pier_spalling.png").read_bytes(), BIG, BIG)
    wall = decode_image((SAMPLES / "tunnel_wall_exif.jpg").read_bytes(), BIG, BIG)
    prepared = [segmenter._prepare_rgb(pier), segmenter._prepare_rgb(wall)]
    boxes = np.array([[100, 50, 300, 200], [10, 10, 60, 90], [0, 0, 600, 800]], np.float32)
    with torch.inference_mode():
        features = segmenter._encode(torch.stack([p for p, _ in prepared]))
        coords = segmenter._box_coords(boxes, prepared[1][1])
        together, iou_together = segmenter._decode(features, 1, coords)
        padded = torch.cat([coords, torch.zeros(5, 2, 2)])  # what a replayed 8-box graph computes
        with_padding, iou_padded = segmenter._decode(features, 1, padded)
        for i in range(len(boxes)):
            alone, iou_alone = segmenter._decode(features, 1, coords[i : i + 1])
            assert torch.allclose(together[i], alone[0], atol=1e-4)
            assert torch.allclose(with_padding[i], alone[0], atol=1e-4)
            assert float(iou_together[i]) == pytest.approx(float(iou_alone[0]), abs=1e-5)
            assert float(iou_padded[i]) == pytest.approx(float(iou_alone[0]), abs=1e-5)
        other, _ = segmenter._decode(features, 0, coords[:1])
    assert not torch.allclose(together[0], other[0], atol=1e-3)


def eager_and_compiled(mode: str, monkeypatch, tmp_path) -> tuple:
    """Two SAMs of the same (seeded) weights: one eager, one made ready for serving with SAM_COMPILE=`mode`, and
    TORCHINDUCTOR_CACHE_DIR in tmp_path, as the launcher sets it for Triton's model processes."""
    from anomaly.segmenter import ready_for_serving
    from anomaly.weights import load_segmenter

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor_cache"))
    base = load_settings()
    eager, _ = load_segmenter(base)
    compiled, _ = load_segmenter(base)
    ready_for_serving(compiled, dataclasses.replace(base, sam_compile=mode, weights_dir=tmp_path), 1)
    return eager, compiled


@pytest.mark.slow
def test_sam_compile_serves_the_encoder_compiled_with_the_same_masks(exported, monkeypatch, tmp_path):
    """SAM_COMPILE=encoder through ready_for_serving (what the segmenter step and the in-process pipeline call):
    the image encoder compiled by inductor, its kernels kept under WEIGHTS_DIR, and the same features and masks
    as the eager encoder's. On this CPU inductor builds C++ kernels (about a minute cold)."""
    eager, compiled = eager_and_compiled("encoder", monkeypatch, tmp_path)
    assert "compiled by inductor" in compiled.runtime and "compiled" not in eager.runtime
    data = (SAMPLES / "bridge_deck.jpg").read_bytes()
    boxes = np.array([[100, 80, 700, 400], [900, 500, 1500, 1000]], np.float32)
    results = []
    for segmenter in (eager, compiled):
        prepared, hw = segmenter._prepare(data, BIG, BIG)
        with torch.inference_mode():
            features = segmenter._encode(prepared[None])
        results.append((features, segmenter._segment_batch([(prepared, hw, boxes)])[0]))
    (want, want_crops), (got, got_crops) = results
    scale = float(want["image_embed"].abs().max())
    assert float((got["image_embed"] - want["image_embed"]).abs().max()) < 1e-4 * scale
    for a, b in zip(want_crops, got_crops):
        assert a.box == b.box and (a.mask != b.mask).mean() < 1e-3 and b.score == pytest.approx(a.score, abs=1e-4)
    assert any(p.is_file() for p in (tmp_path / "inductor_cache").rglob("*"))  # kept for the next start


@pytest.mark.slow
def test_sam_compile_all_compiles_the_decoder_once_for_every_box_count(exported, monkeypatch, tmp_path):
    """SAM_COMPILE=all: the prompt encoder + mask decoder compiled by inductor too, dynamic in the box count, so
    that 1 to 16 boxes (a CUDA graph each on a GPU) do not take 16 compiles: here 1, 2, 3 and 5 boxes take at most
    two (torch specialises a count of 1), with the eager decoder's masks and scores. The encoder, compiled on its
    first forward, is not run here (the test above covers it)."""
    from torch._dynamo.utils import counters

    eager, compiled = eager_and_compiled("all", monkeypatch, tmp_path)
    assert compiled.runtime.count("compiled by inductor") == 2 and "compiled" not in eager.runtime
    prepared, hw = eager._prepare((SAMPLES / "bridge_deck.jpg").read_bytes(), BIG, BIG)
    boxes = np.array([[100, 80, 700, 400], [900, 500, 1500, 1000], [50, 600, 400, 1050], [1200, 60, 1900, 300],
                      [700, 300, 1100, 700]], np.float32)  # fmt: skip
    with torch.inference_mode():
        features = eager._encode(prepared[None])
        graphs = counters["stats"]["unique_graphs"]
        for n in (1, 2, 3, 5):
            coords = eager._box_coords(boxes[:n], hw)
            (want, want_iou), (got, got_iou) = eager._decode(features, 0, coords), compiled._decode(features, 0, coords)
            assert got.shape == want.shape == (n, 1, 256, 256)
            assert float(((got > 0) != (want > 0)).float().mean()) < 1e-3
            assert torch.allclose(got_iou, want_iou, atol=1e-4)
        assert 1 <= counters["stats"]["unique_graphs"] - graphs <= 2


@pytest.mark.slow
def test_a_failed_compile_leaves_sam_eager_and_says_so(exported, monkeypatch, tmp_path):
    """SAM_COMPILE on a machine where inductor cannot build its kernels (no working C++ compiler: here one that
    does not exist): the first forward's compile fails, SAM runs eager from then on with the eager masks, and its
    runtime (what /info and responses show) says so instead of every request failing."""
    import torch._inductor.config as inductor
    from torch._inductor.utils import fresh_cache

    eager, compiled = eager_and_compiled("all", monkeypatch, tmp_path)
    prepared, hw = eager._prepare((SAMPLES / "bridge_deck.jpg").read_bytes(), BIG, BIG)
    boxes = np.array([[100, 80, 700, 400], [900, 500, 1500, 1000]], np.float32)
    want = eager._segment_batch([(prepared, hw, boxes)])[0]
    torch._dynamo.reset()
    # fresh caches: nothing an earlier test of this process compiled is reused, so inductor must build
    with fresh_cache(), inductor.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        got = compiled._segment_batch([(prepared, hw, boxes)])[0]
    assert [c.box for c in got] == [c.box for c in want]
    assert all(np.array_equal(a.mask, b.mask) and a.score == b.score for a, b in zip(want, got))
    assert compiled.runtime.count("eager (torch.compile failed: InductorError)") == 2, compiled.runtime


def test_box_prompts_made_on_the_host_are_sam2s_own_bit_for_bit():
    """The segmenter makes the boxes' corner points on the host (copied to the GPU from pinned memory, without
    waiting for the card): they must be what SAM2Transforms.transform_boxes computes with torch."""
    from sam2.utils.transforms import SAM2Transforms

    from anomaly.segmenter import host_box_coords

    rng = np.random.default_rng(3)
    reference = SAM2Transforms(1024, 0.0)
    for hw in ((1080, 1920), (4000, 6000), (17, 23), (800, 600)):
        boxes = (rng.random((500, 4)) * [hw[1], hw[0], hw[1], hw[0]]).astype(np.float32)
        expected = reference.transform_boxes(torch.from_numpy(boxes), normalize=True, orig_hw=hw).numpy()
        got = host_box_coords(boxes, hw, 1024)
        assert got.dtype == np.float32 and got.shape == (500, 2, 2)
        assert np.array_equal(got, expected), hw


def test_mask_crops_are_the_full_frame_upsample_cut_to_the_box(exported):
    """All boxes' crops come from one grid_sample per group of similar size; each must equal the crop of
    F.interpolate of its logits to its own frame's size (what SAM2ImagePredictor returns), with groups split
    by the sample budget too."""
    from anomaly.weights import load_segmenter

    segmenter, _ = load_segmenter(load_settings())
    rng = np.random.default_rng(7)
    low_res = torch.from_numpy(rng.normal(0, 4, (6, 1, 256, 256)).astype(np.float32))
    sizes = [(1080, 1920), (1080, 1920), (480, 640), (4000, 6000), (17, 23), (1080, 1920)]
    windows = [(0, 0, 1920, 1080), (100, 200, 130, 900), (5, 7, 300, 400), (5000, 3000, 6000, 4000), (0, 0, 23, 17),
               (1919, 1079, 1920, 1080)]  # fmt: skip
    for budget in (1 << 23, 200_000):
        crops = segmenter._upsample_crops(low_res, windows, sizes, budget=budget)
        for j, ((x0, y0, x1, y1), (h, w)) in enumerate(zip(windows, sizes)):
            full = torch.nn.functional.interpolate(low_res[j : j + 1], (h, w), mode="bilinear", align_corners=False)
            expected = (full[0, 0] > 0).numpy()[y0:y1, x0:x1]
            assert crops[j].shape == expected.shape and crops[j].flags.c_contiguous
            assert (crops[j] != expected).sum() <= max(2, expected.size // 10_000), f"box {j}, budget {budget}"


# --- serving layout per machine ------------------------------------------------------------------------------


def test_serving_plan_defaults_for_gpu_and_cpu_machines(monkeypatch):
    settings = load_settings()
    gpu = serving_plan(settings, gpu=True, cores=16)
    assert (gpu.detector_batch, gpu.segmenter_batch, gpu.step_instances, gpu.geometry_workers) == (8, 2, 4, 1)
    assert not gpu.early_embedding  # on trial until a GPU run measures it (docs/performance.md)
    cpu = serving_plan(settings, gpu=False, cores=2)
    assert (cpu.detector_batch, cpu.segmenter_batch, cpu.step_instances, cpu.geometry_workers) == (8, 1, 1, 1)
    # GEOMETRY_WORKERS=auto (on trial): the processes follow the cores (each CPU step has cores / 4 instances)
    monkeypatch.setenv("GEOMETRY_WORKERS", "auto")
    monkeypatch.setenv("EARLY_EMBEDDING", "auto")
    trial = load_settings()
    assert [serving_plan(trial, gpu=True, cores=n).geometry_workers for n in (8, 4, 16, 64)] == [2, 1, 4, 4]
    assert serving_plan(trial, gpu=True).early_embedding and not serving_plan(trial, gpu=False).early_embedding
    monkeypatch.setenv("BATCH_FRAMES", "4")
    monkeypatch.setenv("STEP_INSTANCES", "3")
    monkeypatch.setenv("GEOMETRY_WORKERS", "2")
    monkeypatch.setenv("BATCH_DELAY_US", "250")
    mine = serving_plan(load_settings(), gpu=True, cores=16)
    assert (mine.detector_batch, mine.segmenter_batch, mine.step_instances, mine.geometry_workers) == (4, 4, 3, 2)
    assert mine.batch_delay_us == 250


def test_rendered_configs_carry_the_plan(tmp_path):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(REPO / "model_repository", repo, ignore=shutil.ignore_patterns("*.onnx", "configs"))
    plan = serving_plan(load_settings(), gpu=True, cores=16)
    written = {p.parent.parent.name: parse_config(p.read_text()) for p in write_serving_configs(repo, plan)}
    assert set(written) == {
        "preprocess", "detector", "select_detections", "segmenter", "geometry", "result", "anomaly_pipeline"
    }  # fmt: skip
    assert (written["segmenter"].max_batch_size, written["detector"].max_batch_size) == (2, 8)
    assert written["segmenter"].dynamic_batching.max_queue_delay_microseconds == 0
    assert [g.count for g in written["geometry"].instance_group] == [4]
    assert written["geometry"].parameters["workers"].string_value == "1"  # GEOMETRY_WORKERS: on trial
    assert [g.count for g in written["detector"].instance_group] == [1]  # one copy of the weights on the card
    for model in ("detector", "segmenter"):  # batched frames' bytes differ in length: a ragged batch
        encoded = next(i for i in written[model].input if i.name == "ENCODED")
        assert encoded.allow_ragged_batch and list(encoded.dims) == [-1]
    # everything else is the committed config's, field for field
    committed = parse_config((REPO / "model_repository/detector/config.pbtxt").read_text())
    committed.max_batch_size = 8
    assert written["detector"] == committed


def rendered(tmp_path, plan) -> dict:
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(REPO / "model_repository", repo, ignore=shutil.ignore_patterns("*.onnx", "configs"))
    return {p.parent.parent.name: parse_config(p.read_text()) for p in write_serving_configs(repo, plan)}


@pytest.mark.parametrize("visible", [1, 2, 4])
def test_every_gpu_gets_a_detector_and_a_sam_instance(tmp_path, visible):
    """GPUS=all (the default) on a machine whose server sees 1, 2 or 4 GPUs: with several, the detector and SAM
    each get one KIND_GPU instance per GPU (Triton's `gpus` list); with one, the layout the H100 measured. The
    CPU steps are the same either way. (Rendered only: Triton refuses KIND_GPU where it sees no GPU.)"""
    from tritonclient.grpc.model_config_pb2 import ModelInstanceGroup

    written = rendered(tmp_path, serving_plan(load_settings(), gpu=True, cores=16, gpu_count=visible))
    for model in ("detector", "segmenter"):
        groups = [(g.kind, g.count, list(g.gpus)) for g in written[model].instance_group]
        if visible == 1:
            assert groups == [(ModelInstanceGroup.KIND_CPU, 1, [])]
        else:
            assert groups == [(ModelInstanceGroup.KIND_GPU, 1, list(range(visible)))]
    for model in ("preprocess", "select_detections", "geometry", "result"):
        assert [(g.kind, g.count) for g in written[model].instance_group] == [(ModelInstanceGroup.KIND_CPU, 4)]


@pytest.mark.parametrize(
    ("wanted", "visible", "gpus"),
    [("all", 0, ()), ("0", 4, ()), ("1", 2, (1,)), ("0,2", 4, (0, 2)), ("3,1", 4, (3, 1))],
)
def test_gpus_setting_picks_the_gpus(monkeypatch, wanted, visible, gpus):
    monkeypatch.setenv("GPUS", wanted)
    assert serving_plan(load_settings(), gpu=True, cores=16, gpu_count=visible).gpus == gpus


@pytest.mark.parametrize(
    ("wanted", "message"),
    [
        ("0,0", "distinct GPU indexes"),
        ("one", "must be `all` or comma-separated"),
        ("2", "names GPU 2, but the server sees 2"),
    ],
)
def test_gpus_setting_refuses_what_cannot_be_served(monkeypatch, wanted, message):
    from anomaly.errors import ConfigError

    monkeypatch.setenv("GPUS", wanted)
    with pytest.raises(ConfigError, match=message):
        serving_plan(load_settings(), gpu=True, cores=16, gpu_count=2)


def test_gpus_are_not_hidden_from_a_triton_that_places_instances_on_them(monkeypatch):
    from anomaly.serving.triton_server import TritonServer

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    server = TritonServer(dataclasses.replace(load_settings(), hide_gpu_from_triton=True))
    server._gpu = True
    server.plan = serving_plan(server.settings, gpu=True, cores=16, gpu_count=2)
    assert server.plan.gpus == (0, 1) and not server.hides_gpu
    assert server.environment()["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_each_gpu_instance_has_its_record_and_info_lists_them(tmp_path, monkeypatch):
    """Two instances of a step on GPUs 0 and 1 each write their start-up record; read back (what /info shows),
    the step lists both with their GPU. A step on the one-GPU layout lists its one instance, gpu null."""
    from anomaly.serving import in_service, plan

    for gpu in (1, 0):
        args = {"model_repository": str(tmp_path / "segmenter"), "model_instance_kind": "GPU",
                "model_instance_device_id": str(gpu), "model_instance_name": f"segmenter_0_{gpu}"}  # fmt: skip
        (tmp_path / "segmenter").mkdir(exist_ok=True)
        in_service.write_record(args, {"segmenter": {"device": "cuda"}})
    record = in_service.read_record(tmp_path, "segmenter")
    assert record["instances"] == [{"instance": "segmenter_0_0", "gpu": 0}, {"instance": "segmenter_0_1", "gpu": 1}]
    (tmp_path / "detector").mkdir()
    cpu_args = {"model_repository": str(tmp_path / "detector"), "model_instance_kind": "CPU",
                "model_instance_device_id": "0", "model_instance_name": "detector_0"}  # fmt: skip
    in_service.write_record(cpu_args, {"x": 1})
    assert in_service.read_record(tmp_path, "detector")["instances"] == [{"instance": "detector_0", "gpu": None}]
    # the next start removes what this one's instances wrote (a start on fewer GPUs must not list the others)
    plan.write_serving_configs(tmp_path, serving_plan(load_settings(), gpu=False, cores=2))
    assert not list(tmp_path.glob("*/configs/in_service*.json"))


@pytest.mark.slow  # runs SAM's image encoder several times: make test, not make unit
def test_bench_gpu_checks_on_the_cpu(exported):
    """make bench-gpu's on-GPU checks (bench/gpu.py gpu_checks), run with device="cpu": the same code paths
    (torch decode/resize against the exact numpy path, the torch detector against onnxruntime), where both
    sides must agree closely. On a GPU the same function measured TF32's effect (docs/performance.md)."""
    from anomaly.detector import export_files
    from bench.gpu import gpu_checks

    settings = load_settings()
    checks = gpu_checks(
        settings,
        exported,
        export_files(settings.model_repository)[0],
        (SAMPLES / "bridge_deck.jpg").read_bytes(),
        "cpu",
    )
    assert checks["nvjpeg_vs_pillow_levels"] == {"max": 0.0, "mean": 0.0}  # one decoder on a CPU
    assert checks["detector_input_same_pixels_max"] < 1e-3 and checks["sam_input_same_pixels_max"] < 1e-5
    assert checks["png_on_device_same_pixels"] is True
    for name in ("torch_gpu_vs_onnx_cpu_top20_queries", "torch_gpu_fp32_vs_onnx_cpu_top20_queries"):
        assert checks[name]["score_max_diff"] < 1e-3 and checks[name]["same_top_class"], checks[name]
        assert checks[name]["box_min_iou"] > 0.99, checks[name]


def test_launcher_keeps_gpu_memory_down_and_the_operators_choice_wins(monkeypatch):
    """What a GPU machine's tritonserver is started with (read here without a GPU): no pinned or CUDA pools of
    Triton's own (only CPU tensors pass between the steps), torch's allocator with expandable segments in
    every model process unless the operator set PYTORCH_CUDA_ALLOC_CONF."""
    from anomaly.serving.triton_server import TritonServer

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    server = TritonServer(load_settings())
    server._gpu = True
    command = server.command()
    assert "--pinned-memory-pool-byte-size=0" in command and "--cuda-memory-pool-byte-size=0:0" in command
    assert server.environment()["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert server.environment()["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


def test_compiled_kernels_go_to_the_weights_volume_unless_the_operator_says_otherwise(triton, monkeypatch):
    """SAM_COMPILE's kernels outlive a start only where Triton's model processes are told TORCHINDUCTOR_CACHE_DIR
    before they import torch (importing torch._dynamo sets torch's own default, under /tmp): the launcher sets
    WEIGHTS_DIR/inductor_cache unless the operator set it, and the session server's SAM process has it."""
    from anomaly.serving.triton_server import TritonServer

    wanted = str(triton.settings.weights_dir / "inductor_cache")
    sam = [p for p, name in triton.model_processes().items() if name == "segmenter"]
    assert sam and all(p.environ().get("TORCHINDUCTOR_CACHE_DIR") == wanted for p in sam)
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing torch._dynamo sets
    assert TritonServer(load_settings()).environment()["TORCHINDUCTOR_CACHE_DIR"] == wanted
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/volume/kernels")  # the operator's
    assert TritonServer(load_settings()).environment()["TORCHINDUCTOR_CACHE_DIR"] == "/volume/kernels"


@pytest.mark.parametrize("gpu,hide,hidden", [(True, True, True), (True, False, False), (False, True, False)])
def test_launcher_hides_the_gpu_from_tritonserver_on_a_gpu_machine(monkeypatch, gpu, hide, hidden):
    """HIDE_GPU_FROM_TRITON (read here without a GPU): on a GPU machine tritonserver starts with an empty
    CUDA_VISIBLE_DEVICES (so no CUDA context of its own) and without GPU metrics, which it could not collect,
    and the GPU steps are given back the operator's CUDA_VISIBLE_DEVICES; `off` starts it as Triton would; a
    CPU machine has nothing to hide."""
    from anomaly.hardware import HIDDEN_GPUS
    from anomaly.serving.triton_server import TritonServer

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    server = TritonServer(dataclasses.replace(load_settings(), hide_gpu_from_triton=hide))
    server._gpu = gpu
    env = server.environment()
    assert env["CUDA_VISIBLE_DEVICES"] == ("" if hidden else "1")
    assert env.get(HIDDEN_GPUS) == ("1" if hidden else None)
    assert ("--allow-gpu-metrics=false" in server.command()) == (hidden or not gpu)


@pytest.mark.parametrize("before", [None, "", "0", "1,0", "GPU-8932f937"])
def test_hidden_gpus_come_back_as_they_were(before):
    """hide_gpus then show_hidden_gpus leaves CUDA_VISIBLE_DEVICES as the operator set it, unset included; a
    process where nothing was hidden is left alone."""
    from anomaly.hardware import hide_gpus, show_hidden_gpus

    env = {"PATH": "/usr/bin"} | ({} if before is None else {"CUDA_VISIBLE_DEVICES": before})
    hidden = hide_gpus(env)
    assert hidden["CUDA_VISIBLE_DEVICES"] == "" and env.get("CUDA_VISIBLE_DEVICES") == before  # a copy
    assert show_hidden_gpus(hidden) and hidden == env
    assert not show_hidden_gpus(hidden) and hidden == env


@pytest.mark.parametrize("uses_gpu", [True, False])
def test_only_the_gpu_steps_see_the_hidden_gpu_again(monkeypatch, uses_gpu):
    """A Triton step's initialize gives the GPU back (before its setup loads a model) only where the step runs a
    model on it: the CPU steps keep it hidden, so no CUDA context can open there."""
    from anomaly.hardware import HIDDEN_GPUS, hide_gpus
    from anomaly.serving import steps

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    for name, value in hide_gpus({"CUDA_VISIBLE_DEVICES": "0"}).items():
        monkeypatch.setenv(name, value)
    seen = []

    class Step(steps.StageModel):
        def setup(self, args):
            seen.append(os.environ["CUDA_VISIBLE_DEVICES"])

    Step.uses_gpu = uses_gpu
    Step().initialize({})
    assert seen == ["0" if uses_gpu else ""]
    assert (HIDDEN_GPUS in os.environ) != uses_gpu


def test_gpu_steps_start_no_cuda_before_initialize():
    """The detector's and segmenter's model files import nothing that could start CUDA (torch, onnxruntime,
    rfdetr, sam2) when Triton loads them, so the GPU their initialize shows again is the one CUDA sees."""
    script = (
        "import importlib.util, sys\n"
        "for step in ('detector', 'segmenter'):\n"
        "    spec = importlib.util.spec_from_file_location(step, f'model_repository/{step}/1/model.py')\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(sorted(m for m in ('torch', 'onnxruntime', 'rfdetr', 'sam2', 'sam3', 'tensorrt') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_gpu_torch_cannot_see_is_a_warning_for_both_models(monkeypatch, exported):
    """nvidia-smi lists a GPU but torch sees none in the step's process (a GPU hidden and not shown again, a
    CPU-only torch): the detector and SAM run on the CPU and say so in their info, hence /info and responses."""
    from anomaly import hardware
    from anomaly.result import warnings_for
    from anomaly.segmenter import resolve_device

    settings = load_settings()
    meta = DetectorMetadata.load(REPO / "model_repository" / "detector" / "1" / "metadata.json")
    onnx_path = REPO / "model_repository" / "detector" / "1" / "model.onnx"
    monkeypatch.setattr(hardware, "has_gpu", lambda: True)
    runner = DetectorRunner(meta, onnx_path, settings)
    assert runner.choice.device == "cpu" and "torch sees none" in runner.info["warning"]
    assert "RF-DETR runs on the CPU" in runner.info["warning"]
    device, warning = resolve_device("auto")
    assert device == "cpu" and "torch sees none" in warning and "SAM runs on the CPU" in warning
    said = warnings_for(meta, {"warning": warning}, [], runner.info)
    assert runner.info["warning"] in said and warning in said
    assert resolve_device("cpu") == ("cpu", "")  # asked for the CPU: nothing to say
    assert not DetectorRunner(meta, onnx_path, dataclasses.replace(settings, device="cpu")).info["warning"]
    monkeypatch.setattr(hardware, "has_gpu", lambda: False)
    assert resolve_device("auto") == ("cpu", "")  # no GPU here at all
    assert "DEVICE=cuda" in resolve_device("cuda")[1]


def test_a_gpu_instance_runs_on_the_gpu_triton_gives_it(monkeypatch):
    """A KIND_GPU instance (GPUS, several GPUs): the step takes the device Triton passes it (torch's current device
    where CUDA is there; here, without one, only remembered) and onnxruntime's GPU providers get it as device_id.
    A CPU-kind instance takes none."""
    from anomaly import hardware
    from anomaly.serving import steps

    monkeypatch.setattr(hardware, "_assigned_gpu", None)  # restored after the test

    class Step(steps.StageModel):
        uses_gpu = True

    Step().initialize({"model_instance_kind": "CPU", "model_instance_device_id": "0", "model_instance_name": "s_0"})
    assert hardware.assigned_gpu() is None
    Step().initialize({"model_instance_kind": "GPU", "model_instance_device_id": "3", "model_instance_name": "s_0_3"})
    assert hardware.assigned_gpu() == 3
    choice = choose_backend("onnxruntime", "auto", True, [TRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER])
    options = dict(p for p in onnx_providers(choice) if isinstance(p, tuple))
    assert set(options) == {TRT_PROVIDER, CUDA_PROVIDER} and all(o["device_id"] == 3 for o in options.values())
