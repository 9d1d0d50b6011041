"""What the detector and segmenter steps actually loaded (weights, device, runtime), written by each step
when Triton starts it, into its own folder of the model repository (`<step>/configs/in_service.json`, beside
the generated serving config), and read by the gateway's `/info`. So `/info` tells what the running Triton
serves, also right after a restart with other weights, without a probe request or a cache."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

RECORD = "in_service.json"


def record_path(step_dir: Path) -> Path:
    return Path(step_dir) / "configs" / RECORD


def write_record(args: dict, record: dict, loaded_at: str | None = None) -> str:
    """Inside a step: `args` is what Triton passes (its `model_repository` is the step's folder). `loaded_at`: when
    the step loaded, now unless given (a step rewriting its record has not loaded again). Returns it."""
    path = record_path(Path(args["model_repository"]))
    path.parent.mkdir(exist_ok=True)
    loaded_at = loaded_at or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")  # a batch thread may write too
    tmp.write_text(json.dumps(record | {"loaded_at": loaded_at}) + "\n")
    tmp.replace(path)  # a reader never sees half a record
    return loaded_at


def read_record(model_repository: Path, step: str) -> dict:
    """The record of `step`; FileNotFoundError when that step has not started since the repository was made."""
    return json.loads(record_path(Path(model_repository) / step).read_text())
