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
