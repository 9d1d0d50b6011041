"""GPU steps take the next batch in while the card runs the last one (OVERLAP_BATCHES).

Triton hands a model instance its next batch only when `execute` returns. A GPU step that decodes its frames,
runs the model and packs the outputs inside `execute` leaves the card idle while its CPU does the decoding of
the next frames and the packing of the last ones (on an H100 at concurrency 8 the segmenter kept the card 81%
busy). Here `execute` only takes requests in (`prepare`: read, check, decode) and returns. A thread of the
step's own runs the model on what has been taken in, as much as one batch holds, and answers each request
through its response sender: Triton's Python backend allows that for models that are not decoupled since
24.06, one final response per request. At most one batch waits taken in while another runs; beyond that
`execute` blocks, so further frames wait in Triton's queue, where its limits and statistics see them.

Triton's statistics then time only the intake as the step's compute. What the thread does is counted here
(`counts`) and, inside Triton, in metrics on its metrics port (`reporting.StepMetrics`, read by `make bench-gpu`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("anomaly.triton")

_STOP = object()


@dataclass
class Answered:
    """What `prepare` returns for a request it answers itself, without the model: its outputs are sent at
    once and nothing is taken in (e.g. the segmenter declining an early embedding while it is busy)."""

    outputs: dict


class NoResponseSenders(RuntimeError):
    """This Triton gives models that are not decoupled no response senders (before 24.06): nothing was taken in."""


@dataclass
class Counts:
    """What the thread did, cumulative, in the units of Triton's own statistics: each request's wait from its
    intake to the start of the batch that ran it, and each request's share of the batch's run counted in
    full (Triton's compute time per request is its batch's too)."""

    requests: int = 0
    executions: int = 0
    wait_ns: int = 0
    run_ns: int = 0


class OverlappedBatches:
    """`execute(requests, prepare)` takes requests in and returns None; `run([prepared, ...]) -> [outputs, ...]`
    runs on a thread of its own, `max_batch` at most at a time, and `answer(sender, outputs=..., error=...)`
    sends each request's one response. `on_batch(counts_of_this_batch)` is told after every batch."""

    def __init__(
        self,
        name: str,
        run: Callable[[list], list],
        max_batch: int,
        answer: Callable,
        on_batch: Callable[[Counts], None] | None = None,
    ):
        self.name = name
        self.counts = Counts()
        self._run, self._answer, self._on_batch = run, answer, on_batch
        self._max_batch = max(1, int(max_batch))
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._room = threading.Semaphore(self._max_batch)  # taken in and not yet running: one batch at most
        self._pending = 0  # taken in and not yet run (`idle`)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name=f"{name} batches", daemon=True)
        self._thread.start()

    def execute(self, requests, prepare: Callable) -> None:
        """Take each request in: prepare(request) must copy what it keeps, the request's tensors go when this
        returns. A request that fails to prepare is answered with its error at once. Raises NoResponseSenders,
        with nothing taken in, where Triton has no response senders for this model."""
        try:
            senders = [request.get_response_sender() for request in requests]
        except Exception as exc:  # noqa: BLE001 - the caller answers these requests the old way
            raise NoResponseSenders(f"{type(exc).__name__}: {exc}") from exc
        for request, sender in zip(requests, senders):
            try:
                item = prepare(request)
                if isinstance(item, Answered):
                    self._send(sender, outputs=item.outputs)
                    continue
                self._wait_for_room()
            except Exception as exc:  # noqa: BLE001 - this request's error, the others go on
                self._send(sender, error=exc)
                continue
            with self._lock:
                self._pending += 1
            self._queue.put((sender, item, time.monotonic_ns()))
        return None

    @property
    def idle(self) -> bool:
        """Everything taken in has run: nothing waits, nothing runs."""
        with self._lock:
            return self._pending == 0

    def _wait_for_room(self) -> None:
        while not (self._thread.is_alive() and self._room.acquire(timeout=1.0)):
            if not self._thread.is_alive():
                raise RuntimeError(f"the {self.name} step's batch thread has stopped")

    def close(self, timeout_s: float = 60.0) -> None:
        """Answer what was taken in, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout_s)

    def _work(self) -> None:
        while True:
            batch = [self._queue.get()]
            while batch[-1] is not _STOP and len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = batch[-1] is _STOP
            if stopping:
                batch.pop()
            for _ in batch:
                self._room.release()
            if batch:
                self._run_batch(batch)
            if stopping:
                return

    def _run_batch(self, batch: list) -> None:
        start = time.monotonic_ns()
        try:
            outputs = list(self._run([item for _, item, _ in batch]))
            if len(outputs) != len(batch):
                raise RuntimeError(f"the {self.name} step gave {len(outputs)} answers for {len(batch)} requests")
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error
            outputs = [exc] * len(batch)
        with self._lock:  # before the answers go: a next step's request may follow them at once
            self._pending -= len(batch)
        for (sender, _, _), out in zip(batch, outputs):
            if isinstance(out, BaseException):
                self._send(sender, error=out)
            else:
                self._send(sender, outputs=out)
        took = time.monotonic_ns() - start
        done = Counts(len(batch), 1, sum(start - taken for _, _, taken in batch), took * len(batch))
        for field in ("requests", "executions", "wait_ns", "run_ns"):
            setattr(self.counts, field, getattr(self.counts, field) + getattr(done, field))
        if self._on_batch:
            try:
                self._on_batch(done)
            except Exception:  # noqa: BLE001 - a metric that cannot be recorded must not stop the answers
                log.exception("%s: recording a batch's metrics failed", self.name)

    def _send(self, sender, **answer) -> None:
        try:
            self._answer(sender, **answer)
        except Exception:  # noqa: BLE001 - nothing more can be sent on this sender; the log keeps why
            log.exception("%s: answering a request failed", self.name)
