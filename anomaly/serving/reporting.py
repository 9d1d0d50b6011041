"""What a pipeline step tells the operator besides its answers: counters on Triton's metrics port, what a GPU
step holds once loaded (its log), and the warnings and MPS state its start-up record carries (/info, responses).
"""

from __future__ import annotations

import os

from anomaly import hardware, images
from anomaly.serving.mps import ENV_STATE as ENV_MPS_STATE
from anomaly.serving.tensors import log, pb_utils

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
        pb = pb_utils()
        self._metrics = {}
        for field, (name, description) in self.NAMES.items():
            family = pb.MetricFamily(name=name, description=description, kind=pb.MetricFamily.COUNTER)
            self._metrics[field] = (family, family.Metric(labels={"model": model}))

    def __call__(self, done) -> None:
        for field, (_, metric) in self._metrics.items():
            value = getattr(done, field)
            metric.increment(value / 1000.0 if field.endswith("_ns") else value)


class OutcomeCounter:
    """A counter on Triton's metrics port labelled by model and outcome, each outcome shown from the start (at 0):
    `counter("used")` adds one."""

    def __init__(self, name: str, description: str, model: str, outcomes: list[str]):
        pb = pb_utils()
        family = pb.MetricFamily(name=name, description=description, kind=pb.MetricFamily.COUNTER)
        self._family = family  # the metrics live as long as their family
        self._metrics = {o: family.Metric(labels={"model": model, "outcome": o}) for o in outcomes}

    def __call__(self, outcome: str) -> None:
        self._metrics[outcome].increment(1)
