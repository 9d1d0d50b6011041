"""OVERLAP_BATCHES: a GPU step takes batches in while its thread runs the last one (anomaly.serving.overlap).

The class is driven here with plain objects standing in for Triton's requests and response senders (the
threading is what is tested); the same path inside the real tritonserver is what the session's server runs
(tests/conftest.py turns it on there) and `test_the_batch_thread_answers_inside_triton` checks from outside."""

from __future__ import annotations

import threading
import time

import pytest

from anomaly.errors import InputError
from anomaly.serving.overlap import OverlappedBatches


class Sender:
    def __init__(self):
        self.answers: list = []
        self.answered = threading.Event()


class Request:
    def __init__(self, value):
        self.value = value
        self.sender = Sender()

    def get_response_sender(self):
        return self.sender


def answer(sender, outputs=None, error=None):
    sender.answers.append(("error", error) if error is not None else ("outputs", outputs))
    sender.answered.set()


def answers_of(requests, timeout_s: float = 10.0) -> list:
    for r in requests:
        assert r.sender.answered.wait(timeout_s), f"request {r.value} was never answered"
    return [r.sender.answers for r in requests]


def prepare(request):
    if request.value < 0:
        raise InputError("VALUE", "must not be negative")
    return request.value


@pytest.fixture
def batches_of():
    made = []

    def make(run, max_batch=2):
        made.append(OverlappedBatches("test", run, max_batch, answer))
        return made[-1]

    yield make
    for b in made:
        b.close(timeout_s=5)


def test_each_request_gets_its_own_outputs_once_and_a_bad_one_its_error(batches_of):
    seen_batches = []

    def run(items):
        seen_batches.append(list(items))
        return [{"twice": 2 * v} for v in items]

    batches = batches_of(run, max_batch=2)
    requests = [Request(v) for v in (1, -1, 2, 3, 4)]
    assert batches.execute(requests, prepare) is None  # answered through the senders, not returned
    got = answers_of(requests)
    assert [a[0] for a in got[1]] == ["error"] and "VALUE" in str(got[1][0][1])
    assert [g for i, g in enumerate(got) if i != 1] == [[("outputs", {"twice": 2 * v})] for v in (1, 2, 3, 4)]
    assert sorted(v for b in seen_batches for v in b) == [1, 2, 3, 4]
    assert all(1 <= len(b) <= 2 for b in seen_batches)
    assert batches.counts.requests == 4 and batches.counts.executions == len(seen_batches)


def test_the_next_batch_is_taken_in_while_the_last_one_runs(batches_of):
    running, release = threading.Event(), threading.Event()
    prepared_while_running = []

    def run(items):
        running.set()
        release.wait(10)
        return [{"v": v} for v in items]

    def watching_prepare(request):
        prepared_while_running.append(running.is_set() and not release.is_set())
        return request.value

    batches = batches_of(run, max_batch=1)
    first = [Request(1)]
    batches.execute(first, watching_prepare)
    assert running.wait(5)
    second = [Request(2)]
    batches.execute(second, watching_prepare)  # returns although the first batch still runs
    assert prepared_while_running == [False, True]
    assert not first[0].sender.answered.is_set()
    release.set()
    assert answers_of(first + second) == [[("outputs", {"v": 1})], [("outputs", {"v": 2})]]


def test_at_most_one_batch_waits_taken_in_so_triton_queues_the_rest(batches_of):
    running, release = threading.Event(), threading.Event()

    def run(items):
        running.set()
        release.wait(10)
        return [{"v": v} for v in items]

    batches = batches_of(run, max_batch=2)
    batches.execute([Request(0)], prepare)
    assert running.wait(5)  # the thread runs {0} and waits
    taken_in = []

    def more():
        for r in (Request(1), Request(2), Request(3)):
            batches.execute([r], prepare)
            taken_in.append(r.value)

    intake = threading.Thread(target=more)
    intake.start()
    intake.join(0.5)
    assert intake.is_alive() and taken_in == [1, 2]  # 3 waits: a full batch is already waiting
    release.set()
    intake.join(10)
    assert taken_in == [1, 2, 3]


def test_a_failing_batch_answers_each_of_its_requests_with_the_error_and_the_thread_goes_on(batches_of):
    def run(items):
        if 13 in items:
            raise RuntimeError("the card fell over")
        return [{"v": v} for v in items]

    batches = batches_of(run, max_batch=1)
    bad, good = [Request(13)], [Request(7)]
    batches.execute(bad, prepare)
    batches.execute(good, prepare)
    got = answers_of(bad + good)
    assert got[0][0][0] == "error" and "card fell over" in str(got[0][0][1])
    assert got[1] == [("outputs", {"v": 7})]


def test_a_run_that_answers_too_few_fails_its_batch_instead_of_leaving_a_request_unanswered(batches_of):
    running, release = threading.Event(), threading.Event()

    def run(items):
        if items == [0]:  # holds the thread so that 1 and 2 are taken in together
            running.set()
            release.wait(10)
            return [{"v": 0}]
        return [{"v": items[0]}]

    batches = batches_of(run, max_batch=2)
    blocker, requests = [Request(0)], [Request(1), Request(2)]
    batches.execute(blocker, prepare)
    assert running.wait(5)
    batches.execute(requests, prepare)
    release.set()
    got = answers_of(blocker + requests)
    assert got[0] == [("outputs", {"v": 0})]
    for one in got[1:]:
        assert one[0][0] == "error" and "1 answers for 2 requests" in str(one[0][1])


def test_a_triton_without_response_senders_takes_nothing_in_and_the_step_answers_the_old_way(monkeypatch, tmp_path):
    """Triton before 24.06 gives models that are not decoupled no response senders: the batch is then answered
    by execute's return value, the step stays one batch at a time from then on, and its record (/info) says so."""
    from anomaly.serving import overlap, steps
    from anomaly.serving.in_service import read_record

    class OldRequest(Request):
        def get_response_sender(self):
            raise RuntimeError("non-decoupled model")

    ran = []

    class Step(steps.BatchedStage):
        def prepare(self, request):
            return request.value

        def run(self, items):
            ran.append(list(items))
            return [{"v": v} for v in items]

        def record(self):
            return {"step": {"batches": self.batching}}

    step = Step()
    (tmp_path / "step").mkdir()  # the step's folder in the model repository
    step.args = {"model_repository": str(tmp_path / "step")}
    step.batches = overlap.OverlappedBatches("test", step.run, 2, answer)
    with pytest.raises(overlap.NoResponseSenders, match="non-decoupled"):
        step.batches.execute([OldRequest(1)], step.prepare)
    assert ran == []  # nothing was taken in
    monkeypatch.setattr(steps, "respond", lambda outputs: ("response", outputs))
    requests = [OldRequest(1), OldRequest(2)]
    assert step.execute(requests) == [("response", {"v": 1}), ("response", {"v": 2})]
    assert step.batches is None and ran == [[1, 2]]
    assert read_record(tmp_path, "step")["step"] == {"batches": "one at a time"}
    assert step.execute([OldRequest(3)]) == [("response", {"v": 3})]


def test_a_step_whose_runtime_changes_while_serving_writes_its_record_again(monkeypatch, tmp_path):
    """What a step serves can change at a request (SAM_COMPILE on a CPU compiles at the first frame, and a failed
    compile leaves that part eager): its record (/info) is then written again, from the batch thread or the step,
    keeping when the step loaded; a batch that changes nothing writes nothing."""
    from anomaly.serving import in_service, overlap, steps
    from anomaly.serving.in_service import read_record

    clock = iter(f"2026-11-30T10:00:0{i}+0000" for i in range(10))
    monkeypatch.setattr(in_service.time, "strftime", lambda _: next(clock))
    writes = []
    write = in_service.write_record
    monkeypatch.setattr(steps.in_service, "write_record", lambda *a: writes.append(a[1]) or write(*a))
    monkeypatch.setattr(steps, "respond", lambda outputs: ("response", outputs))
    runtimes = iter(["compiled", "compiled", "eager (torch.compile failed)", "eager", "eager"])

    class Step(steps.BatchedStage):
        runtime = "compiled"

        def prepare(self, request):
            return request.value

        def run(self, items):
            self.runtime = next(runtimes)
            return [{"v": v} for v in items]

        def record(self):
            return {"step": {"runtime": self.runtime}}

    step = Step()
    (tmp_path / "step").mkdir()
    step.args = {"model_repository": str(tmp_path / "step")}
    step.write_record()
    assert read_record(tmp_path, "step") == {"step": {"runtime": "compiled"}, "loaded_at": "2026-11-30T10:00:00+0000",
                                             "instance": None, "gpu": None,
                                             "instances": [{"instance": None, "gpu": None}]}  # fmt: skip
    step.batches = overlap.OverlappedBatches("test", step.run_batch, 2, answer)
    for request in (Request(1), Request(2), Request(3)):  # the batch thread: runtimes "compiled" twice, then failed
        step.batches.execute([request], step.prepare)
        assert answers_of([request]) == [[("outputs", {"v": request.value})]]
    step.batches.close(timeout_s=5)
    assert read_record(tmp_path, "step")["step"] == {"runtime": "eager (torch.compile failed)"}
    step.batches = None
    assert step.execute([Request(4)]) == [("response", {"v": 4})]  # one batch at a time: runtime "eager"
    assert step.execute([Request(5)]) == [("response", {"v": 5})]
    assert [w["step"]["runtime"] for w in writes] == ["compiled", "eager (torch.compile failed)", "eager"]
    record = read_record(tmp_path, "step")
    assert (record["step"], record["loaded_at"]) == ({"runtime": "eager"}, "2026-11-30T10:00:00+0000")


def test_close_answers_what_was_taken_in_then_intake_is_refused():
    release = threading.Event()

    def run(items):
        release.wait(10)
        return [{"v": v} for v in items]

    batches = OverlappedBatches("test", run, 2, answer)
    requests = [Request(v) for v in (1, 2, 3)]
    batches.execute(requests, prepare)
    closing = threading.Thread(target=batches.close)
    closing.start()
    release.set()
    closing.join(10)
    assert answers_of(requests) == [[("outputs", {"v": v})] for v in (1, 2, 3)]
    late = [Request(4)]
    batches.execute(late, prepare)  # the thread has stopped: an error, not a request left hanging
    got = answers_of(late, timeout_s=5)
    assert got[0][0][0] == "error" and "stopped" in str(got[0][0][1])


def test_counts_are_in_tritons_units_wait_per_request_and_the_batch_run_per_request(batches_of):
    def run(items):
        time.sleep(0.05)
        return [{"v": v} for v in items]

    batches = batches_of(run, max_batch=4)
    requests = [Request(v) for v in range(4)]
    batches.execute(requests, prepare)
    answers_of(requests)
    counts = batches.counts
    assert counts.requests == 4
    # every request's compute is its whole batch's run, as Triton counts compute per request
    assert counts.run_ns >= 0.05e9 * counts.requests
    assert counts.run_ns < 10e9 * counts.requests
    assert counts.wait_ns >= 0


def thread_metrics(triton) -> dict:
    """The batch threads' counters from Triton's metrics port, read as any Prometheus scraper would."""
    import re
    import urllib.request

    url = f"http://{triton.client_host}:{triton.settings.triton_metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict = {}
    for name, model, value in re.findall(r'^anomaly_gpu_step_(\w+)\{model="(\w+)"\} (\S+)$', text, re.M):
        out.setdefault(model, {})[name] = float(value)
    return out


def test_the_batch_thread_answers_inside_triton(triton, grpc_client, deck_jpeg):
    """The session's server overlaps batches (conftest): the detector and SAM answer from their threads, which
    Triton's metrics port counts, and Triton's own statistics time only the intake."""
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(triton.grpc_url)

    def segmenter_stats():
        return stats.get_inference_statistics("segmenter", as_json=True)["model_stats"][0]["inference_stats"]

    before, triton_before = thread_metrics(triton), segmenter_stats()
    # 0.21: the untrained detector puts two defects on the deck above it (bench.gpu's CPU workload)
    responses = [grpc_client.detect(deck_jpeg, confidence_threshold=0.21) for _ in range(2)]
    assert all(r["anomaly_count"] > 0 for r in responses)  # SAM ran for these frames
    after, triton_after = thread_metrics(triton), segmenter_stats()
    stats.close()

    def grew(model, name):
        return after[model][name] - before.get(model, {}).get(name, 0.0)

    # the session's server also embeds each frame early (EARLY_EMBEDDING=on, conftest), and SAM is idle between
    # these frames: each frame is two segmenter requests, its image alone and then its boxes
    for model, requests in (("detector", 2), ("segmenter", 4)):
        assert grew(model, "request_count") == requests
        assert 1 <= grew(model, "execution_count") <= requests
        assert grew(model, "compute_duration_us") > 0

    def triton_grew(key, field="ns"):  # Triton's JSON leaves zero counts out
        return int(triton_after[key].get(field, 0)) - int(triton_before[key].get(field, 0))

    thread_us = grew("segmenter", "compute_duration_us") / 4
    intake_ns = (triton_grew("compute_input") + triton_grew("compute_infer")) / 4
    assert triton_grew("success", "count") == 4
    assert intake_ns / 1000 < thread_us  # SAM ran after execute returned, on the step's thread
