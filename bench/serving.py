"""A detector checkpoint served by a real tritonserver of its own: its own model repository (the pipeline's steps
and the checkpoint's export), on free ports, stopped on exit. What the demo training and the tests use to serve a
model they trained beside the session's server."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from collections.abc import Iterator
from pathlib import Path

from anomaly.config import load_settings


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@contextlib.contextmanager
def serve_checkpoint(checkpoint: Path, folder: Path, ready_timeout: float = 600) -> Iterator:
    """Export `checkpoint` (DETECTOR_WEIGHTS) into `folder`/model_repository and serve it with the other steps as
    configured (SAM as the settings say); yields the running TritonServer."""
    from anomaly.serving.triton_server import TritonServer
    from export.detector import export_detector
    from runpod_handler.entrypoint import sync_model_repository

    http, grpc, metrics = free_ports(3)
    repo = folder / "model_repository"
    settings = dataclasses.replace(
        load_settings(),
        model_repository=repo,
        detector_weights=str(checkpoint),
        triton_http_port=http,
        triton_grpc_port=grpc,
        triton_metrics_port=metrics,
    )
    sync_model_repository(repo)
    export_detector(settings)
    env = {"MODEL_REPOSITORY": str(repo), "DETECTOR_WEIGHTS": str(checkpoint)}
    server = TritonServer(settings, log_path=folder / "triton.log", env=env)
    server.start(ready_timeout=ready_timeout)
    try:
        yield server
    finally:
        server.stop()
