"""The base classes of the pipeline's Triton Python models: one answer per request, and for the dynamically
batched GPU steps, a batch prepared request by request and run once (in a thread of the step's own where batches
overlap: anomaly.serving.overlap). An exception answers its own request and never takes the server down.
"""

from __future__ import annotations

from collections.abc import Callable

from anomaly import hardware
from anomaly.config import settings
from anomaly.detector import DetectorMetadata
from anomaly.logs import setup_logging
from anomaly.serving import in_service
from anomaly.serving.overlap import Answered, NoResponseSenders, OverlappedBatches
from anomaly.serving.reporting import StepMetrics
from anomaly.serving.tensors import error_response, export_files_of, log, max_batch_size, pb_utils, respond


def answer_each(requests, handle: Callable) -> list:
    """handle(request) -> outputs dict, for each request; an exception answers that request alone."""
    responses = []
    for request in requests:
        try:
            responses.append(respond(handle(request)))
        except Exception as exc:  # noqa: BLE001 - every failure must become this request's error
            responses.append(error_response(exc))
    return responses


class StageModel:
    """Base of the pipeline's Triton models: logging, one answer per request. A stage implements
    `handle(request) -> {output name: array}` and, if it needs more, `setup(args)`; one that reads the
    detector's classes sets `needs_detector_metadata` (`self.meta`), so the others load without an export; one
    that runs a model on the GPU sets `uses_gpu`."""

    needs_detector_metadata = False
    uses_gpu = False  # runs a model on the GPU where there is one: sees the GPU the launcher hid from tritonserver

    def initialize(self, args: dict) -> None:
        setup_logging()
        # first: nothing this process imported has started CUDA yet (tests/test_gpu_path.py checks the imports)
        if self.uses_gpu and hardware.show_hidden_gpus():
            log.info("tritonserver runs with the GPU hidden; this step sees CUDA_VISIBLE_DEVICES as it was set")
        if self.uses_gpu and args.get("model_instance_kind") == "GPU":  # one instance per GPU (GPUS)
            hardware.use_assigned_gpu(int(args["model_instance_device_id"]))
            log.info("%s: this instance runs on GPU %s", args["model_instance_name"], args["model_instance_device_id"])
        if self.needs_detector_metadata:
            self.meta = DetectorMetadata.load(export_files_of(args)[1])
        self.setup(args)

    def setup(self, args: dict) -> None:
        pass

    def execute(self, requests) -> list:
        return answer_each(requests, self.handle)

    def handle(self, request) -> dict:
        raise NotImplementedError


def send_answer(sender, outputs: dict | None = None, error: BaseException | None = None) -> None:
    """A request's one response, sent through its response sender (anomaly.serving.overlap): its outputs, or
    its error; outputs that cannot become a response become that error instead."""
    try:
        response = error_response(error) if error is not None else respond(outputs)
    except Exception as exc:  # noqa: BLE001 - the request still gets its one answer
        response = error_response(exc)
    sender.send(response, flags=pb_utils().TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class BatchedStage(StageModel):
    """A dynamically batched GPU step: `prepare(request)` for each request (decoding, checks), then
    `run([prepared, ...]) -> [outputs dict, ...]` once over the batch. With OVERLAP_BATCHES on for this machine
    (`start_batches`), run goes to a thread of the step's own and the next batch is taken in meanwhile. What the
    step loaded (`record()`, with `batching`) goes to /info (anomaly.serving.in_service) and to responses; it is
    written again when it changes while serving (a part of SAM whose compile failed at its first request)."""

    batches = None
    written: dict | None = None  # described() when the record was last written
    loaded_at: str | None = None

    def start_batches(self, args: dict, on_gpu: bool) -> None:
        """Call at the end of setup: the batch size from the model's config, the thread if overlapping, then the
        step's start-up record."""
        self.args = args
        self.max_batch = max_batch_size(args)
        mode = settings().overlap_batches
        if mode == "on" or (mode == "auto" and on_gpu):
            name = args["model_name"]
            self.batches = OverlappedBatches(name, self.run_batch, self.max_batch, send_answer, StepMetrics(name))
            log.info("%s: batches are taken in while the last one runs (OVERLAP_BATCHES=%s)", name, mode)
        self.write_record()

    @property
    def batching(self) -> str:
        """How this step runs its batches, for /info and responses."""
        return "overlapped" if self.batches is not None else "one at a time"

    def record(self) -> dict:
        """This step's start-up record (anomaly.serving.in_service)."""
        raise NotImplementedError

    def described(self) -> dict:
        """The part of the record that may change while serving, checked after every batch: the whole record
        unless the step says less (the detector's metadata never changes, and takes 60 us to copy)."""
        return self.record()

    def write_record(self) -> None:
        self.written = self.described()
        self.loaded_at = in_service.write_record(self.args, self.record(), self.loaded_at)

    def run_batch(self, prepared: list) -> list:
        """run, then the record written again if what the step serves changed meanwhile."""
        try:
            return self.run(prepared)
        finally:
            if self.described() != self.written:
                self.write_record()

    def execute(self, requests):
        if self.batches is not None:
            try:
                return self.batches.execute(requests, self.prepare)
            except NoResponseSenders as exc:  # a Triton before 24.06 (the image's is 25.01)
                log.warning("no response senders for this model (%s): one batch at a time from now on", exc)
                self.batches.close()
                self.batches = None
                self.write_record()
        return answer_batch(requests, self.prepare, self.run_batch)

    def finalize(self) -> None:
        if self.batches is not None:
            self.batches.close()

    def prepare(self, request):
        raise NotImplementedError

    def run(self, prepared: list) -> list:
        raise NotImplementedError


def answer_batch(requests, prepare: Callable, run: Callable) -> list:
    """For a dynamically batched step: prepare(request) each request (a failure answers that request alone, as
    does an `Answered` it returns), then run([prepared, ...]) -> [outputs dict, ...] once over the rest, in
    order."""
    responses: list = [None] * len(requests)
    ready: list[tuple[int, object]] = []
    for i, request in enumerate(requests):
        try:
            item = prepare(request)
            if isinstance(item, Answered):
                responses[i] = respond(item.outputs)
            else:
                ready.append((i, item))
        except Exception as exc:  # noqa: BLE001 - this request's error, the others go on
            responses[i] = error_response(exc)
    if ready:
        try:
            for (i, _), outputs in zip(ready, run([item for _, item in ready])):
                responses[i] = respond(outputs)
        except Exception as exc:  # noqa: BLE001
            for i, _ in ready:
                responses[i] = error_response(exc)
    return responses
