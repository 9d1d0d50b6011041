"""RunPod serverless handler: each job goes to the local Triton's anomaly_pipeline over gRPC.

  python runpod_handler/handler.py                      # a worker (on RunPod)
  python runpod_handler/handler.py --test_input '{"input": {"image": "<base64>"}}'
  python runpod_handler/handler.py                      # with ./test_input.json present
  python runpod_handler/handler.py --rp_serve_api --rp_api_port 8090   # local /run, /runsync

Input: the single form or the batch form (images + frame_ids); see runpod_handler/jobs.py.
Errors come back the RunPod way, {"error": "<field>: <what was wrong>"}, and the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import runpod  # noqa: E402

from anomaly.config import settings  # noqa: E402
from anomaly.errors import InputError  # noqa: E402
from anomaly.logs import setup_logging
from client import AnomalyClient, AnomalyServiceError  # noqa: E402
from runpod_handler.jobs import parse_job_input, run_job  # noqa: E402

log = logging.getLogger("anomaly.handler")
_client: AnomalyClient | None = None


def client() -> AnomalyClient:
    global _client
    if _client is None:
        _client = AnomalyClient(settings().triton_url, "grpc")
    return _client


def process(job: dict) -> dict:
    """One RunPod job -> its output, or {"error": ...}; never raises for a bad request."""
    s = settings()
    try:
        payload = job.get("input") if isinstance(job, dict) else None
        if payload is None:
            raise InputError("input", 'is missing; send {"input": {"image": "<base64>"}}')
        parsed = parse_job_input(payload, s, s.max_batch_images)
        return run_job(client(), parsed)
    except InputError as exc:
        return {"error": str(exc)}
    except AnomalyServiceError as exc:
        if not exc.bad_input:
            log.error("Triton failed job %s: %s", job.get("id"), exc)
        return {"error": str(exc)}


async def handler(job: dict) -> dict:
    # The Triton call blocks; a thread per job lets the worker keep several jobs in flight.
    return await asyncio.to_thread(process, job)


def concurrency_modifier(current: int) -> int:
    return settings().runpod_concurrency


def main() -> None:
    setup_logging()
    s = settings()
    log.info("waiting for Triton at %s (gRPC)", s.triton_url)
    try:
        client().wait_ready(s.triton_ready_timeout)
    except AnomalyServiceError as exc:
        print(f"handler: {exc}", file=sys.stderr)
        sys.exit(1)
    log.info("Triton ready; taking jobs (concurrency %d)", s.runpod_concurrency)
    runpod.serverless.start({"handler": handler, "concurrency_modifier": concurrency_modifier})


if __name__ == "__main__":
    main()
