"""What this machine has to compute with."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

# The launcher may start tritonserver with the GPU hidden (HIDE_GPU_FROM_TRITON): every step passes CPU tensors,
# yet tritonserver would open a CUDA context of its own (about 0.5 GB on an H100) for its ensemble's stream.
# The steps that run models on the GPU see it again (show_hidden_gpus) in their own process, before anything
# there starts CUDA, which reads CUDA_VISIBLE_DEVICES once. This variable keeps what it was.
HIDDEN_GPUS = "ANOMALY_HIDDEN_CUDA_VISIBLE_DEVICES"
_UNSET = "<unset>"


def has_gpu() -> bool:
    """An NVIDIA GPU this process could use (asked of nvidia-smi, so it works without torch)."""
    if not Path("/dev/nvidia0").exists() and not Path("/dev/nvidiactl").exists():
        return False
    if not shutil.which("nvidia-smi"):
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def visible_gpu_count(env=os.environ) -> int:
    """How many GPUs a process started with `env` sees: CUDA_VISIBLE_DEVICES' entries where it is set, else every GPU
    nvidia-smi lists. Triton numbers its `instance_group` `gpus` the same way."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if not has_gpu():
        return 0
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return sum(1 for line in listed.splitlines() if line.startswith("GPU "))


_assigned_gpu: int | None = None


def use_assigned_gpu(device_id: int) -> None:
    """In a step's process that Triton gave a GPU of its own (a KIND_GPU instance, GPUS): make it torch's current
    device, so the models' "cuda" is that GPU, and remember it for onnxruntime's providers (assigned_gpu)."""
    global _assigned_gpu
    _assigned_gpu = device_id
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(device_id)


def assigned_gpu() -> int | None:
    """The GPU Triton gave this step's instance, or None where it places its models on the default GPU itself."""
    return _assigned_gpu


def release_unused_gpu_memory() -> int:
    """Hand back to the driver the GPU memory torch's allocator keeps cached but no tensor uses; returns how many
    bytes that was (0 where torch never started CUDA). Called once a model step has loaded: what it frees is the
    eager warm-up runs made before CUDA-graph capture and the fp32 weights replaced by bf16 ones, memory the
    process would otherwise hold for good (nvidia-smi counts it) and never use again. Captured graphs keep their
    own pools, which this leaves alone."""
    torch = _torch_on_gpu()
    if torch is None:
        return 0
    before = torch.cuda.memory_reserved()
    torch.cuda.empty_cache()
    return before - torch.cuda.memory_reserved()


def torch_gpu_memory() -> tuple[int, int] | None:
    """(bytes in torch's live GPU tensors, bytes its allocator holds from the driver: those, the CUDA graphs'
    pools and its cache) in this process; None where it never started CUDA. What nvidia-smi counts beyond the
    second is the CUDA context and the libraries' own memory (cuDNN, nvJPEG)."""
    torch = _torch_on_gpu()
    if torch is None:
        return None
    return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()


def _torch_on_gpu():
    """torch, where this process has started CUDA with it; else None (a process that never imported torch holds
    no GPU memory of torch's, and asking would import it)."""
    import sys

    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_initialized() else None


def hide_gpus(env: dict) -> dict:
    """A copy of the environment `env` in which CUDA sees no GPU (an empty CUDA_VISIBLE_DEVICES), keeping what
    show_hidden_gpus gives back to the GPU steps."""
    return env | {HIDDEN_GPUS: env.get("CUDA_VISIBLE_DEVICES", _UNSET), "CUDA_VISIBLE_DEVICES": ""}


def show_hidden_gpus(env=os.environ) -> bool:
    """Undo hide_gpus in this process's environment: CUDA_VISIBLE_DEVICES as it was before (unset again if it
    was). Must run before anything in the process starts CUDA. Returns whether anything was hidden."""
    if HIDDEN_GPUS not in env:
        return False
    before = env.pop(HIDDEN_GPUS)
    if before == _UNSET:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = before
    return True


def gpu_unseen_warning(what: str) -> str:
    """What to say when nvidia-smi lists a GPU but torch in this process sees none, so `what` runs on the CPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    why = "CUDA_VISIBLE_DEVICES is unset" if visible is None else f"CUDA_VISIBLE_DEVICES={visible!r}"
    return (
        f"A GPU is present (nvidia-smi lists it) but torch sees none in this process ({why}; or torch was built "
        f"without CUDA): {what} runs on the CPU"
    )
