"""What every Triton Python model of the pipeline shares: reading inputs and options, answering, and
turning exceptions into per-request errors so that one bad request never takes the server down.

`triton_python_backend_utils` exists only inside Triton's stub process, so it is imported where used.
"""

from __future__ import annotations

import json
import logging
import os
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from anomaly import hardware, images
from anomaly.config import settings
from anomaly.detector import DetectorMetadata, export_files
from anomaly.errors import InputError
from anomaly.logs import setup_logging
from anomaly.options import RequestOptions, parse_options
from anomaly.serving import in_service
from anomaly.serving.mps import ENV_STATE as ENV_MPS_STATE
from anomaly.serving.overlap import Answered, NoResponseSenders, OverlappedBatches
from anomaly.serving.step_inputs import encoded_image

log = logging.getLogger("anomaly.triton")


def _pb():
    import triton_python_backend_utils

    return triton_python_backend_utils


def max_batch_size(args: dict) -> int:
    """The model's max_batch_size, from the config Triton loaded (the launcher's serving.pbtxt for this machine)."""
    return int(json.loads(args["model_config"])["max_batch_size"])


def export_files_of(args: dict) -> tuple[Path, Path]:
    """(model.onnx, metadata.json) of the detector export, found from this model's own folder."""
    return export_files(Path(args["model_repository"]).parent)


def params_of(request) -> dict:
    raw = request.parameters()
    return json.loads(raw) if raw else {}


def options_of(request) -> RequestOptions:
    s = settings()
    return parse_options(params_of(request), s.confidence_threshold, s.mm_per_pixel)


def array(request, name: str) -> np.ndarray:
    tensor = _pb().get_input_tensor_by_name(request, name)
    if tensor is None:
        raise InputError(name, "is missing from the request")
    return tensor.as_numpy()


def optional_array(request, name: str) -> np.ndarray | None:
    """An input the model declares optional: its array, or None where the request does not carry it."""
    tensor = _pb().get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def image_bytes(request, name: str = "IMAGE") -> bytes:
    """The one encoded image of a request (step_inputs.encoded_image)."""
    return encoded_image(name, array(request, name))


def bytes_tensor(items: list[bytes]) -> np.ndarray:
    out = np.empty(len(items), dtype=np.object_)
    for i, item in enumerate(items):
        out[i] = item
    return out


def respond(outputs: dict[str, np.ndarray]):
    pb_utils = _pb()
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])


def error_response(exc: BaseException):
    pb_utils = _pb()
    if isinstance(exc, InputError):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
    # The details stay in the log under an id the client can quote; exception texts may show internals.
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s: %s", error_id, "".join(traceback.format_exception(exc)))
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(
            f"internal error {error_id} (the server log has the details)", pb_utils.TritonError.INTERNAL
        )
    )


# what a GPU step holds once loaded, in the log (make bench-gpu reads it back: bench.gpu.torch_memory_after_load)
AFTER_LOAD = "%s: GPU memory after loading: torch holds %.0f MiB, %.0f MiB of it in tensors"


def release_gpu_cache_after_load(step: str) -> None:
    """After a GPU step has loaded: the cached GPU memory nothing uses goes back to the driver; the log says how
    much, and what torch holds then (its tensors: weights, the graphs' inputs and outputs, cuBLAS workspaces;
    the rest: the graphs' pools)."""
    freed = hardware.release_unused_gpu_memory()
    if freed:
        log.info("%s: %.0f MiB of GPU memory cached while loading handed back", step, freed / 2**20)
    held = hardware.torch_gpu_memory()
    if held is not None:
        log.info(AFTER_LOAD, step, held[1] / 2**20, held[0] / 2**20)


def with_gpu_decode_warning(info: dict) -> dict:
    """A GPU step's description (its /info record, its responses' `models`) with images.gpu_decode_warning() added
    to its `warning` while nvJPEG refuses this process's JPEGs: a GPU path fallen back to the CPU, said where the
    detector on the CPU is said (every response's `warnings`, /info)."""
    warning = images.gpu_decode_warning()
    if warning is None:
        return info
    return info | {"warning": "; ".join(filter(None, [info.get("warning"), warning]))}


def cuda_mps_state() -> str:
    """Whether this GPU step runs as a client of the launcher's MPS server (CUDA_MPS): `on (MPS server <pid>)`,
    `off`, or `not started: <why>`, as the launcher passed it (anomaly.serving.mps)."""
    return os.environ.get(ENV_MPS_STATE, "off")


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
    sender.send(response, flags=_pb().TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class StepMetrics:
    """Counters on Triton's metrics port for what a step's batch thread did (anomaly.serving.overlap), named
    and counted as Triton's own per-model statistics are: requests, executions (batches), queue and compute
    microseconds per request, labelled by model."""

    NAMES = {
        "requests": ("anomaly_gpu_step_request_count", "requests answered by the step's batch thread"),
        "executions": ("anomaly_gpu_step_execution_count", "batches the step's batch thread ran"),
        "wait_ns": ("anomaly_gpu_step_queue_duration_us", "cumulative wait from intake to the batch's start"),
        "run_ns": ("anomaly_gpu_step_compute_duration_us", "cumulative batch run (model and answers) per request"),
    }

    def __init__(self, model: str):
        pb_utils = _pb()
        self._metrics = {}
        for field, (name, description) in self.NAMES.items():
            family = pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.COUNTER)
            self._metrics[field] = (family, family.Metric(labels={"model": model}))

    def __call__(self, done) -> None:
        for field, (_, metric) in self._metrics.items():
            value = getattr(done, field)
            metric.increment(value / 1000.0 if field.endswith("_ns") else value)


class OutcomeCounter:
    """A counter on Triton's metrics port labelled by model and outcome, each outcome shown from the start (at 0):
    `counter("used")` adds one."""

    def __init__(self, name: str, description: str, model: str, outcomes: list[str]):
        pb_utils = _pb()
        family = pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.COUNTER)
        self._family = family  # the metrics live as long as their family
        self._metrics = {o: family.Metric(labels={"model": model, "outcome": o}) for o in outcomes}

    def __call__(self, outcome: str) -> None:
        self._metrics[outcome].increment(1)


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
