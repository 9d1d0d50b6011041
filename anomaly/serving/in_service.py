"""What the detector and segmenter steps actually loaded (weights, device, runtime), written by each step
when Triton starts it, into its own folder of the model repository (`<step>/configs/in_service.json`, beside
the generated serving config), and read by the gateway's `/info`. So `/info` tells what the running Triton
serves, also right after a restart with other weights, without a probe request or a cache.

A step with an instance on each of several GPUs (GPUS) also writes `in_service.gpu<N>.json` per instance; the record
read back lists them all (`instances`: which GPU each has). The launcher removes the records of a previous start."""

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
    gpu = args.get("model_instance_device_id") if args.get("model_instance_kind") == "GPU" else None
    record = record | {
        "loaded_at": loaded_at,
        "instance": args.get("model_instance_name"),
        "gpu": int(gpu) if gpu is not None else None,
    }
    for target in [path] + ([path.with_name(f"in_service.gpu{gpu}.json")] if gpu is not None else []):
        tmp = target.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")  # a batch thread may write too
        tmp.write_text(json.dumps(record) + "\n")
        tmp.replace(target)  # a reader never sees half a record
    return loaded_at


def read_record(model_repository: Path, step: str) -> dict:
    """The record of `step`, with `instances`: [{instance, gpu}] for each of its instances (gpu None where the
    step places its models itself); FileNotFoundError when that step has not started since the repository was made."""
    path = record_path(Path(model_repository) / step)
    record = json.loads(path.read_text())
    per_gpu = sorted(path.parent.glob("in_service.gpu*.json"))
    records = [json.loads(p.read_text()) for p in per_gpu] or [record]
    instances = [{"instance": r.get("instance"), "gpu": r.get("gpu")} for r in records]
    return record | {"instances": sorted(instances, key=lambda i: (i["gpu"] is None, i["gpu"] or 0))}
