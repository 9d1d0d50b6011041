"""EARLY_EMBEDDING: SAM embeds a frame from its image alone, in parallel with the detector, and its boxes are
decoded from that embedding (anomaly.serving.embeddings, the segmenter step, the ensemble's serving config).

The session's tritonserver runs with it on (tests/conftest.py), so every end-to-end and parity test goes through
it; here: the store, the plan's ensemble, SAM's core on the CPU, and the segmenter model called as an outsider
would call it, with plain tritonclient."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from anomaly.config import load_settings
from anomaly.errors import InputError
from anomaly.serving.embeddings import EarlyEmbeddings, EarlyImage, EmbeddingStore
from anomaly.serving.overlap import Answered, OverlappedBatches
from anomaly.serving.plan import parse_config, render_config, serving_plan
from tests.conftest import encode

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"
BIG = 1 << 30


# --- the store ---------------------------------------------------------------------------------------------------


def test_store_keeps_each_embedding_for_one_taker_within_its_room_and_age():
    now = [0.0]
    seen = []
    store = EmbeddingStore(capacity=2, max_age_s=10.0, clock=lambda: now[0], observe=seen.append)
    assert store.reserve() and store.reserve()
    assert not store.reserve()  # two reserved fill it, before either is made
    first = store.put("embedding 1")
    store.cancel()  # the second failed to embed: its room is back
    assert store.reserve()
    second = store.put("embedding 2")
    assert first != second and re.fullmatch(r"[0-9a-f]{32}", first)
    assert store.take(first) == "embedding 1"
    assert store.take(first) is None  # a key is taken once
    now[0] = 11.0  # the second's boxes never came (its frame failed in the detector)
    assert store.reserve()  # the old one was dropped to make room
    assert store.take(second) is None and len(store) == 0
    assert (store.counts.kept, store.counts.used, store.counts.missed, store.counts.dropped) == (2, 1, 2, 1)
    store.decline()
    assert seen == ["kept", "kept", "used", "missed", "dropped", "missed", "declined"]


class _Segmenter:
    """Stands in for Sam2Segmenter's two calls early embedding makes (the real ones: the core test below)."""

    def __init__(self, fail_embedding=False):
        self.fail_embedding = fail_embedding
        self.embedded = []

    def image_to_embed(self, data, max_bytes, max_pixels):
        if data == b"junk":
            raise ValueError("image: is not a decodable image")
        return (lambda: data), (1080, 1920)

    def embed_images(self, images, max_batch):
        if self.fail_embedding:
            raise RuntimeError("CUDA out of memory")
        self.embedded.append(len(images))
        return [f"embedding of {make()!r}" for make, _ in images]


def test_early_offers_are_declined_when_tiled_busy_full_or_undecodable_and_failures_give_the_room_back():
    early = EarlyEmbeddings(_Segmenter(), capacity=2)

    def offer(data=b"jpeg", tiled=False, idle=True):
        return early.offer(lambda: data, tiled, idle, 1 << 20, 1 << 24)

    assert offer(tiled=True) is None and offer(idle=False) is None and offer(b"junk") is None
    first, second = offer(b"a"), offer(b"b")
    assert isinstance(first, EarlyImage) and first.hw == (1080, 1920)
    assert offer() is None  # two taken in fill the room before they are embedded
    keys = early.embed([first, second], max_batch=2)
    assert early.segmenter.embedded == [2] and all(keys)
    assert early.take(keys[1], b"b") == "embedding of b'b'" and early.take(keys[1]) is None
    # the image sent with a key must be the one it was made from (a key alone is trusted)
    with pytest.raises(InputError, match="KEPT_EMBEDDING: is the key of another image than this request's ENCODED"):
        early.take(keys[0], b"c")
    assert early.take(keys[0], b"a") is None  # taken all the same: a key is good once
    assert (early.store.counts.used, early.store.counts.refused, early.store.counts.missed) == (1, 1, 2)
    assert early.store.counts.declined == 4 and early.store.counts.kept == 2

    failing = EarlyEmbeddings(_Segmenter(fail_embedding=True), capacity=1)
    image = failing.offer(lambda: b"a", False, True, 1 << 20, 1 << 24)
    assert failing.embed([image], 1) == [""]  # the frame is embedded with its boxes instead
    assert failing.offer(lambda: b"a", False, True, 1 << 20, 1 << 24) is not None  # its room was given back


# --- what prepare may answer itself, and when the batch thread is idle ---------------------------------------------


def test_an_answer_prepare_gives_is_sent_at_once_and_nothing_is_run():
    import threading

    from tests.test_overlap import Request, answer, answers_of

    release = threading.Event()
    ran = []

    def run(items):
        release.wait(10)
        ran.append(list(items))
        return [{"ran": v} for v in items]

    batches = OverlappedBatches("test", run, 2, answer)
    try:
        assert batches.idle
        requests = [Request(1), Request("declined"), Request(2)]
        batches.execute(requests, lambda r: Answered({"declined": r.value}) if r.value == "declined" else r.value)
        # answered before any batch has run; 1 and 2 are taken in, waiting or running
        assert answers_of(requests[1:2]) == [[("outputs", {"declined": "declined"})]]
        assert not requests[0].sender.answers and not requests[2].sender.answers and not batches.idle
        release.set()
        assert answers_of(requests[::2]) == [[("outputs", {"ran": 1})], [("outputs", {"ran": 2})]]
        assert sorted(v for batch in ran for v in batch) == [1, 2]
        batches.close(timeout_s=10)
        assert batches.idle
    finally:
        release.set()
        batches.close(timeout_s=5)


def test_one_batch_at_a_time_sends_what_prepare_answered_and_runs_the_rest(monkeypatch):
    """The same without overlapped batches (answer_batch, inside Triton's execute; a CPU's default). Triton's
    response type exists only inside its stub process, so the responses are stood in for here."""
    from anomaly.serving import steps

    monkeypatch.setattr(steps, "respond", lambda outputs: ("outputs", outputs))
    ran = []

    def run(items):
        ran.append(list(items))
        return [{"ran": v} for v in items]

    prepare = lambda r: Answered({"declined": r}) if r == "declined" else r  # noqa: E731
    responses = steps.answer_batch([1, "declined", 2], prepare, run)
    assert responses == [("outputs", {"ran": 1}), ("outputs", {"declined": "declined"}), ("outputs", {"ran": 2})]
    assert ran == [[1, 2]]


# --- the ensemble the launcher writes ----------------------------------------------------------------------------


def test_the_plan_adds_the_early_step_to_the_ensemble_where_it_embeds_early(monkeypatch):
    text = (REPO / "model_repository/anomaly_pipeline/config.pbtxt").read_text()
    segmenter = (REPO / "model_repository/segmenter/config.pbtxt").read_text()
    settings = load_settings()
    off = serving_plan(settings, gpu=False, cores=2)
    assert parse_config(render_config(text, "anomaly_pipeline", off)) == parse_config(text)
    assert parse_config(render_config(segmenter, "segmenter", off)).parameters["early_embedding"].string_value == "off"

    monkeypatch.setenv("EARLY_EMBEDDING", "on")
    on = serving_plan(load_settings(), gpu=False, cores=2)
    steps = parse_config(render_config(text, "anomaly_pipeline", on)).ensemble_scheduling.step
    assert [s.model_name for s in steps] == [
        "preprocess", "segmenter", "detector", "select_detections", "segmenter", "geometry", "result"
    ]  # fmt: skip
    early, boxes = steps[1], steps[4]
    assert dict(early.input_map) == {"ENCODED": "encoded", "TILING": "tiling"}
    assert dict(early.output_map) == {"EMBEDDING_KEY": "sam_embedding_key"}
    assert boxes.input_map["KEPT_EMBEDDING"] == "sam_embedding_key" and boxes.input_map["SEG_BOXES"] == "seg_boxes"
    assert parse_config(render_config(segmenter, "segmenter", on)).parameters["early_embedding"].string_value == "on"
    monkeypatch.setenv("EARLY_EMBEDDING", "sometimes")
    with pytest.raises(Exception, match="EARLY_EMBEDDING"):
        load_settings()


# --- SAM's core: boxes decoded from an embedding made before them --------------------------------------------------


@pytest.mark.slow  # runs SAM's image encoder several times: make test, not make unit
def test_boxes_decoded_from_an_early_embedding_are_the_same_masks(exported):
    import torch

    from anomaly.weights import load_segmenter

    torch.set_num_threads(2)
    segmenter, _ = load_segmenter(load_settings())
    data = (SAMPLES / "pier_spalling.png").read_bytes()
    boxes = np.array([[100, 50, 300, 200], [10, 10, 60, 90]], np.float32)
    usual = segmenter.segment_windows([segmenter.prepare_windows(data, boxes, False, BIG, BIG)], 1)[0]

    make_input, hw = segmenter.image_to_embed(data, BIG, BIG)
    (embedding,) = segmenter.embed_images([(make_input, hw)], 1)
    assert embedding.hw == hw
    assert all(t.shape[0] == 1 for t in embedding.tensors)
    early = segmenter.segment_windows([segmenter.embedded_windows(embedding, boxes)], 1)[0]
    assert len(early) == len(usual) == 2
    for a, b in zip(early, usual):
        assert a.box == b.box and np.array_equal(a.mask, b.mask) and a.score == b.score
    # an embedded frame is not embedded again: its input is never made
    with pytest.raises(RuntimeError, match="embedded beforehand"):
        segmenter.embedded_windows(embedding, boxes)[0].make_input()


# --- the segmenter step, called as an outsider would ---------------------------------------------------------------


def early_metrics(triton) -> dict:
    url = f"http://{triton.client_host}:{triton.settings.triton_metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    found = re.findall(r'^anomaly_sam_early_embedding_count\{model="segmenter",outcome="(\w+)"\} (\S+)$', text, re.M)
    return {outcome: float(value) for outcome, value in found}


def _segment(client, data: bytes, tiling: bytes, boxes=None, key=None, outputs=("MASKS",)):
    import tritonclient.grpc as grpcclient

    def tensor(name, array, dtype):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    inputs = [
        tensor("ENCODED", np.frombuffer(data, np.uint8).reshape(1, -1), "UINT8"),
        tensor("TILING", np.array([[tiling]], dtype=object), "BYTES"),
    ]
    if boxes is not None:
        inputs.append(tensor("SEG_BOXES", boxes[None].astype(np.float32), "FP32"))
    if key is not None:
        inputs.append(tensor("KEPT_EMBEDDING", np.array([[key]], dtype=object), "BYTES"))
    result = client.infer("segmenter", inputs, outputs=[grpcclient.InferRequestedOutput(n) for n in outputs])
    return {n: result.as_numpy(n) for n in outputs}


def test_the_served_pipeline_decodes_from_the_early_embedding(triton, grpc_client, deck_jpeg):
    """The session's server embeds early (conftest): a frame with defects takes its kept embedding, and every
    response says the ensemble does it."""
    before = early_metrics(triton)
    assert set(before) == {"kept", "used", "missed", "dropped", "declined", "refused"}  # each shown from the start
    response = grpc_client.detect(deck_jpeg, confidence_threshold=0.21)
    after = early_metrics(triton)
    assert response["anomaly_count"] > 0  # SAM ran for this frame
    assert response["models"]["segmenter"]["early_embedding"] == "on"
    assert after.get("kept", 0) - before.get("kept", 0) == 1
    assert after.get("used", 0) - before.get("used", 0) == 1
    assert after.get("missed", 0) == before.get("missed", 0)


def test_the_segmenter_step_keeps_an_embedding_for_a_plain_client(triton, deck_jpeg):
    """Plain tritonclient calls of the segmenter model: the image alone gives a key; the boxes with that key
    give the masks the boxes alone give; a key is good once (then SAM embeds again, same masks); a tiled frame
    is declined with an empty key (its windows depend on the boxes)."""
    import tritonclient.grpc as grpcclient

    from anomaly.tiling import plan_tiles, untiled

    client = grpcclient.InferenceServerClient(triton.grpc_url)
    whole = untiled((1080, 1920)).to_json()
    boxes = np.array([[700, 400, 1100, 700], [100, 100, 300, 260]], np.float32)
    before = early_metrics(triton)

    key = _segment(client, deck_jpeg, whole, outputs=("EMBEDDING_KEY",))["EMBEDDING_KEY"].reshape(-1)[0]
    assert re.fullmatch(rb"[0-9a-f]{32}", key), key
    names = ("MASK_BOXES", "MASKS", "MASK_SCORES")
    usual = _segment(client, deck_jpeg, whole, boxes, outputs=names)
    early = _segment(client, deck_jpeg, whole, boxes, key=key, outputs=names)
    again = _segment(client, deck_jpeg, whole, boxes, key=key, outputs=names)  # taken already: embedded again
    for got in (early, again):
        assert np.array_equal(got["MASK_BOXES"], usual["MASK_BOXES"])
        assert got["MASKS"].tolist() == usual["MASKS"].tolist()
        assert np.array_equal(got["MASK_SCORES"], usual["MASK_SCORES"])

    # another frame's key: refused, naming the input, rather than masks decoded from the wrong image, whether
    # that frame's size differs or not
    key = _segment(client, deck_jpeg, whole, outputs=("EMBEDDING_KEY",))["EMBEDDING_KEY"].reshape(-1)[0]
    with pytest.raises(Exception, match="KEPT_EMBEDDING"):
        _segment(client, deck_jpeg, untiled((720, 1280)).to_json(), boxes, key=key, outputs=names)
    same_size = encode(np.full((1080, 1920, 3), 90, np.uint8), "JPEG")
    key = _segment(client, deck_jpeg, whole, outputs=("EMBEDDING_KEY",))["EMBEDDING_KEY"].reshape(-1)[0]
    with pytest.raises(Exception, match="KEPT_EMBEDDING: is the key of another image than this request's ENCODED"):
        _segment(client, same_size, whole, boxes, key=key, outputs=names)

    tiled = plan_tiles((1080, 1920), 576, "on", 64)
    assert tiled.tiled
    declined = _segment(client, deck_jpeg, tiled.to_json(), outputs=("EMBEDDING_KEY",))
    assert declined["EMBEDDING_KEY"].reshape(-1)[0] == b""
    after = early_metrics(triton)
    client.close()
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in ("kept", "used", "missed", "declined", "refused")}
    assert grew == {"kept": 3, "used": 2, "missed": 1, "declined": 1, "refused": 1}
