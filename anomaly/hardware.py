"""What this machine has to compute with."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def has_gpu() -> bool:
    """An NVIDIA GPU this process could use (asked of nvidia-smi, so it works without torch)."""
    if not Path("/dev/nvidia0").exists() and not Path("/dev/nvidiactl").exists():
        return False
    if not shutil.which("nvidia-smi"):
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def release_unused_gpu_memory() -> int:
    """Hand back to the driver the GPU memory torch's allocator keeps cached but no tensor uses; returns how many
    bytes that was (0 where torch never started CUDA). Called once a model step has loaded: what it frees is the
    eager warm-up runs made before CUDA-graph capture and the fp32 weights replaced by bf16 ones, memory the
    process would otherwise hold for good (nvidia-smi counts it) and never use again. Captured graphs keep their
    own pools, which this leaves alone."""
    import sys

    torch = sys.modules.get("torch")  # a process that never imported torch holds no GPU memory of torch's
    if torch is None or not torch.cuda.is_initialized():
        return 0
    before = torch.cuda.memory_reserved()
    torch.cuda.empty_cache()
    return before - torch.cuda.memory_reserved()
