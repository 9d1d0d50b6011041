"""CUDA MPS for the GPU steps (CUDA_MPS=on): the detector's and SAM's processes become clients of one MPS server.

Without MPS each process has a CUDA context of its own, and the card runs one context at a time: when the detector
and SAM both have work (at concurrency 1 with EARLY_EMBEDDING, RF-DETR beside SAM's image encoder; under load,
always) the GPU switches between them by time slices, and each context holds its own memory. Under MPS their
kernels share the card at once and the server holds one context's storage for both. Started by the launcher
(anomaly.serving.triton_server) before tritonserver, with pipe and log folders of its own (so it never meets
another daemon), and quit after it. It needs NVIDIA's `nvidia-cuda-mps-control` on PATH (driver utilities) and a
card whose compute mode allows MPS; the launcher checks that a CUDA client gets through (`probe`) before any model
loads, and serves without MPS, saying why in its log, where it does not.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from anomaly.config import REPO_ROOT

log = logging.getLogger("anomaly.serving")

CONTROL = "nvidia-cuda-mps-control"
ENV_PIPE = "CUDA_MPS_PIPE_DIRECTORY"
ENV_LOG = "CUDA_MPS_LOG_DIRECTORY"
ENV_STATE = "ANOMALY_CUDA_MPS"  # the launcher's MPS state as its model processes see it (/info shows it)
PROBE = [sys.executable, "-m", "anomaly.serving.mps"]  # a CUDA client (`probe` below) in a process of its own


@dataclass
class MpsDaemon:
    """One MPS control daemon of ours: `env` points CUDA clients at it, `stop()` quits it."""

    binary: str
    folder: Path  # holds its pipe and log folders
    server_pids: list[str] = field(default_factory=list)  # the MPS servers it ran when the probe got through

    @property
    def env(self) -> dict:
        return {ENV_PIPE: str(self.folder / "pipe"), ENV_LOG: str(self.folder / "log")}

    def control(self, command: str, timeout_s: float = 10.0):
        """One command on the daemon's control pipe (`get_server_list`, `quit`, ...)."""
        env = dict(os.environ) | self.env
        return subprocess.run(
            [self.binary], input=command + "\n", env=env, capture_output=True, text=True, timeout=timeout_s
        )

    def servers(self) -> list[str]:
        """The process ids of the MPS servers the daemon runs now (nvidia-smi counts the shared context there)."""
        try:
            listed = self.control("get_server_list")
        except (OSError, subprocess.TimeoutExpired):
            return []
        return listed.stdout.split() if listed.returncode == 0 else []

    def stop(self) -> None:
        """Quit the daemon (its server goes once its clients have; stop tritonserver first), remove its folders."""
        try:
            done = self.control("quit")
            if done.returncode != 0:
                log.warning("MPS: quitting the control daemon failed: %s", (done.stderr or done.stdout).strip())
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("MPS: quitting the control daemon failed: %s", exc)
        shutil.rmtree(self.folder, ignore_errors=True)


def start(env: dict, probe_timeout_s: float = 120.0) -> tuple[MpsDaemon | None, str]:
    """(our running daemon, "") or (None, why MPS is not used). `env` is the environment Triton's model processes
    get (PATH to find the control binary, CUDA_VISIBLE_DEVICES as the operator set it). A daemon the operator runs
    already (CUDA_MPS_PIPE_DIRECTORY set) is left to them: the model processes inherit it and connect to it."""
    if env.get(ENV_PIPE):
        return None, f"{ENV_PIPE} is set: the operator's MPS daemon is used as it is"
    binary = shutil.which(CONTROL, path=env.get("PATH"))
    if not binary:
        return None, f"{CONTROL} is not on PATH (it comes with NVIDIA's driver utilities)"
    try:
        daemon = MpsDaemon(binary, Path(tempfile.mkdtemp(prefix="anomaly-mps-")))
        for folder in daemon.env.values():
            Path(folder).mkdir()
    except OSError as exc:  # e.g. a full or read-only temp folder: Triton starts without MPS all the same
        return None, f"no folder for the MPS daemon: {exc}"
    try:
        # its output into a file, not a pipe: a daemon that kept the pipe open would hold run() until it exits
        said = daemon.folder / "start.txt"
        with said.open("w") as out:
            started = subprocess.run([binary, "-d"], env=env | daemon.env, stdout=out, stderr=out, timeout=30)
        if started.returncode != 0:
            why = f"`{CONTROL} -d` failed ({started.returncode}): {said.read_text().strip()}"
            shutil.rmtree(daemon.folder, ignore_errors=True)
            return None, why
        # a CUDA client through the daemon: it starts the MPS server, which fails here, not in a model's load,
        # where the card's compute mode or the container forbids it
        client = subprocess.run(
            PROBE, cwd=REPO_ROOT, env=env | daemon.env, capture_output=True, text=True, timeout=probe_timeout_s
        )
        if client.returncode != 0:
            daemon.stop()
            return None, f"a CUDA client could not start through MPS: {(client.stderr or client.stdout).strip()[-500:]}"
        daemon.server_pids = daemon.servers()
    except (OSError, subprocess.TimeoutExpired) as exc:
        daemon.stop()
        return None, f"starting MPS failed: {exc}"
    return daemon, ""


def probe() -> str:
    """Initialise CUDA through the driver API alone (no torch: this runs before anything else on the card) and
    allocate a little memory: "" where that works, else what failed."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return f"no CUDA driver library ({exc})"
    device, context, pointer = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
    steps = (
        ("cuInit", lambda: cuda.cuInit(0)),
        ("cuDeviceGet", lambda: cuda.cuDeviceGet(ctypes.byref(device), 0)),
        ("cuDevicePrimaryCtxRetain", lambda: cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device)),
        ("cuCtxSetCurrent", lambda: cuda.cuCtxSetCurrent(context)),
        ("cuMemAlloc", lambda: cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(1 << 20))),
        ("cuMemFree", lambda: cuda.cuMemFree_v2(pointer)),
    )
    for name, call in steps:
        code = call()
        if code != 0:
            return f"{name} returned CUDA error {code}"
    cuda.cuDevicePrimaryCtxRelease(device)
    return ""


if __name__ == "__main__":  # the launcher's probe: a CUDA client started with the daemon's environment
    failed = probe()
    if failed:
        print(failed, file=sys.stderr)
    sys.exit(1 if failed else 0)
