"""A frame's masks measured on several processes at once (GEOMETRY_WORKERS).

Threads do not help: scikit-image's thinning, half of a mask's time, holds the GIL (10 typical cracks on this
2-core machine: thinning 7.0 ms on one thread, 6.3 ms on two; the whole measurement 14.9 and 11.9 ms).
`GeometryWorkers(n)` keeps n - 1 worker processes and measures a share of the masks itself meanwhile; the
shares are balanced by crop area. Workers are fresh interpreters (`python -m anomaly.geometry_workers FD`),
not forks of the Triton stub that owns them (it runs threads of its own) nor multiprocessing children
(inside the stub, multiprocessing's start-up code meets the stub's older bundled libpython and fails). They
receive their crops bit-packed over a socket and answer with rows of anomaly.geometry.measure_row, so the
numbers are those of one process. A worker that dies is logged and replaced, and its share measured by the
caller: the request still gets every number. A worker whose owner dies reads end-of-file and exits.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from anomaly import masks
from anomaly.geometry import GEOMETRY_FIELDS, measure_row

log = logging.getLogger("anomaly.geometry")

_M_TOP_PAD = -2  # glibc mallopt parameter
_IMPORT_ROOT = Path(__file__).resolve().parent.parent  # where `anomaly` is imported from, for the workers


def keep_heap() -> None:
    """A fresh process hands the heap it grew for one mask back to the system and faults it in again for the
    next: a typical crack took 1.86 ms there instead of 1.25 ms. Keeping 64 MiB of slack at the heap's top
    (glibc's M_TOP_PAD) stops that; elsewhere (no glibc) nothing is changed."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_TOP_PAD, 64 << 20)
    except (OSError, AttributeError):
        pass


def _serve(conn: Connection) -> None:
    """A worker: [(height, width, packed crop), ...] in, [row, ...] out, until the owner closes the pipe."""
    import cv2

    cv2.setNumThreads(1)  # one core each; parallel over masks instead
    keep_heap()
    while True:
        try:
            jobs = conn.recv()
        except (EOFError, OSError):
            return  # the owner has gone
        try:
            conn.send([measure_row(masks.unpack(data, h, w)) for h, w, data in jobs])
        except Exception as exc:  # noqa: BLE001 - the owner raises it for the request that sent these masks
            conn.send(RuntimeError(f"geometry worker failed: {exc!r}"))


def shares(areas: list[int], parts: int) -> list[list[int]]:
    """Indices of `areas` in `parts` groups of near-equal total area (largest first, each to the lightest)."""
    groups: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    for i in sorted(range(len(areas)), key=lambda i: -areas[i]):
        k = load.index(min(load))
        groups[k].append(i)
        load[k] += areas[i]
    return groups


class GeometryWorkers:
    """`processes` - 1 worker processes plus the caller. One caller at a time (a Triton model instance runs one
    execute() at a time)."""

    def __init__(self, processes: int):
        if processes < 2:
            raise ValueError(f"GeometryWorkers needs at least 2 processes, got {processes}")
        self._workers = [self._start() for _ in range(processes - 1)]
        for process, conn in self._workers:  # wait until each has imported what it needs: failures show at load
            try:
                conn.send([])
                ready = conn.recv() == []
            except (EOFError, OSError):
                ready = False
            if not ready:
                self.close()  # waits for every worker: the exit code below is known
                raise RuntimeError(
                    f"geometry worker {process.args} did not start (exit code {process.returncode}); its error, if it "
                    "printed one, is in the log above. Set GEOMETRY_WORKERS=1 to measure in the step's own process."
                )

    def _start(self) -> tuple[subprocess.Popen, Connection]:
        mine, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_IMPORT_ROOT), env.get("PYTHONPATH")) if p)
        python = sys.executable or shutil.which("python3") or "python3"
        process = subprocess.Popen(
            [python, "-m", "anomaly.geometry_workers", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()  # only the worker holds its end: each side sees end-of-file when the other dies
        return process, Connection(mine.detach())

    def measure_all(self, crops: list[np.ndarray]) -> np.ndarray:
        """Mask crops -> (N, 5) float64 in GEOMETRY_FIELDS order, as anomaly.pipeline.measure_all."""
        rows: list = [None] * len(crops)
        groups = shares([c.size for c in crops], len(self._workers) + 1)
        mine, sent = groups[0], []
        for slot, group in enumerate(groups[1:]):
            if group and self._send(
                slot, [(crops[i].shape[0], crops[i].shape[1], masks.pack(crops[i])) for i in group]
            ):
                sent.append((slot, group))
            else:
                mine += group  # none, or a dead worker's (it has been replaced)
        failure = None
        try:
            for i in mine:
                rows[i] = measure_row(crops[i])
        finally:  # every answer is read, whatever happened here: none may be left for the next frame to read
            for slot, group in sent:
                answer = self._receive(slot)
                if answer is None:  # the worker died: its masks are measured here
                    try:
                        answer = [measure_row(crops[i]) for i in group]
                    except Exception as exc:  # noqa: BLE001 - raised below, after the other workers are read
                        answer = exc
                if isinstance(answer, Exception):
                    failure = failure or answer
                    continue
                for i, row in zip(group, answer):
                    rows[i] = row
        if failure is not None:
            raise failure
        return np.asarray(rows, np.float64).reshape(len(crops), len(GEOMETRY_FIELDS))

    def _send(self, slot: int, jobs: list) -> bool:
        """False when the worker is dead (it is replaced, the caller measures its share)."""
        process, conn = self._workers[slot]
        if process.poll() is None:  # a dead one is found without writing to it
            try:
                conn.send(jobs)
                return True
            except OSError:
                pass
        self._replace(slot, "could not be sent its masks")
        return False

    def _receive(self, slot: int):
        """The worker's rows or exception; None when it died meanwhile (it is replaced)."""
        try:
            return self._workers[slot][1].recv()
        except (EOFError, OSError):
            self._replace(slot, "died while measuring")
            return None

    def _replace(self, slot: int, what: str) -> None:
        process, conn = self._workers[slot]
        try:
            code = process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        log.error(
            "geometry worker %s %s (exit code %s); its masks were measured here; starting a new one",
            process.pid,
            what,
            code,
        )
        conn.close()
        self._workers[slot] = self._start()

    def close(self) -> None:
        for _, conn in self._workers:
            conn.close()  # the worker reads end-of-file and returns
        for process, _ in self._workers:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._workers = []


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
