"""Container entrypoint (and `make serve`): Triton first, then the REST gateway (RUNPOD_SERVERLESS=false)
or the serverless worker (true).

1. Copies the model repository's code to MODEL_REPOSITORY when that points elsewhere (a volume), so the
   exported models persist across cold starts, and exports whatever is missing (`python -m export`).
2. Starts tritonserver and waits until every model is ready.
3. Starts the gateway (uvicorn on API_HOST:API_PORT) or the RunPod handler.
4. SIGTERM/SIGINT drain both within SHUTDOWN_GRACE_S (the front first, then Triton) and exit 0.
5. If Triton or one of its model processes dies, the rest is stopped and the exit code is non-zero, so the
   platform restarts the container (a dead model process is checked every second: Triton 2.51 neither
   restarts it nor stops reporting ready).
"""

from __future__ import annotations

import filecmp
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from anomaly.config import REPO_ROOT, load_settings
from anomaly.errors import ConfigError
from anomaly.logs import setup_logging
from anomaly.serving.triton_server import TritonServer, TritonStartError

log = logging.getLogger("anomaly.entrypoint")
SOURCE_REPOSITORY = REPO_ROOT / "model_repository"


def sync_model_repository(target: Path) -> None:
    """Copy config.pbtxt and model.py files into `target` when it is not the bundled repository."""
    if target.resolve() == SOURCE_REPOSITORY.resolve():
        return
    for source in [*SOURCE_REPOSITORY.glob("*/config.pbtxt"), *SOURCE_REPOSITORY.glob("*/1/model.py")]:
        destination = target / source.relative_to(SOURCE_REPOSITORY)
        if destination.exists() and filecmp.cmp(source, destination, shallow=False):
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)
    (target / "anomaly_pipeline" / "1").mkdir(parents=True, exist_ok=True)  # ensembles need a version folder


def front_command(serverless: bool, settings) -> list[str]:
    if serverless:
        return [sys.executable, str(REPO_ROOT / "runpod_handler" / "handler.py")]
    return [
        sys.executable, "-m", "uvicorn", "runpod_handler.gateway:app",
        "--host", settings.api_host, "--port", str(settings.api_port), "--workers", "1",
        # On SIGTERM uvicorn stops accepting and lets requests in flight finish, within our grace period.
        "--timeout-graceful-shutdown", str(max(1, int(settings.shutdown_grace_s - 2))),  # 2 s left for Triton
    ]  # fmt: skip


def main() -> int:
    setup_logging()
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"entrypoint: {exc}", file=sys.stderr)
        return 2
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: stopping.append(signum))

    sync_model_repository(settings.model_repository)
    export = subprocess.run([sys.executable, "-m", "export"], cwd=REPO_ROOT)
    if export.returncode != 0:
        print("entrypoint: model export failed (see above); not starting", file=sys.stderr)
        return 2
    if stopping:
        return 0

    server = TritonServer(settings)
    try:
        server.start(settings.triton_ready_timeout)
    except TritonStartError as exc:
        print(f"entrypoint: {exc}", file=sys.stderr)
        return 1
    mode = (
        "serverless worker"
        if settings.runpod_serverless
        else f"REST gateway on {settings.api_host}:{settings.api_port}"
    )
    log.info("Triton ready (HTTP %s, gRPC %s); starting the %s", server.http_url, server.grpc_url, mode)
    front = subprocess.Popen(front_command(settings.runpod_serverless, settings), cwd=REPO_ROOT)

    code = 0
    checked = time.monotonic()
    while not stopping:
        if server.process.poll() is not None:
            print(f"entrypoint: tritonserver died (exit {server.process.returncode}); stopping", file=sys.stderr)
            code = 1
            break
        if time.monotonic() - checked >= 1.0:
            checked = time.monotonic()
            dead = server.dead_models()
            if dead:  # Triton keeps saying ready while every request fails: exit so the platform restarts us
                print(
                    f"entrypoint: the process of model {', '.join(dead)} died and Triton does not restart it; "
                    "stopping (exit 1) so that the pod or worker is restarted",
                    file=sys.stderr,
                )
                code = 1
                break
        if front.poll() is not None:
            code = front.returncode or 0
            log.info("the %s exited with %s; stopping Triton", mode, code)
            break
        time.sleep(0.2)

    # Drain in order within SHUTDOWN_GRACE_S: the front stops accepting and finishes its requests (they still
    # need Triton), then Triton finishes what is in flight (direct clients' requests too) and exits.
    deadline = time.monotonic() + settings.shutdown_grace_s
    if front.poll() is None:
        front.terminate()
        try:
            front.wait(max(0.5, deadline - time.monotonic() - 1.0))
        except subprocess.TimeoutExpired:
            log.warning("the %s did not finish within the grace period; killing it", mode)
            front.kill()
            front.wait()
    server.stop(timeout=max(0.5, deadline - time.monotonic()))
    return code


if __name__ == "__main__":
    sys.exit(main())
