"""Container entrypoint (and `make serve`): Triton first, then the REST gateway (RUNPOD_SERVERLESS=false),
the serverless worker (true), or the REST gateway on PORT for a load-balancing endpoint (lb).

1. Copies the model repository's code to MODEL_REPOSITORY when that points elsewhere (a volume), so the
   exported models persist across cold starts, and exports whatever is missing (`python -m export`).
   In load-balancing mode the gateway starts first, so that RunPod's `/ping` reads 204 (starting) meanwhile.
2. Starts tritonserver and waits until every model is ready, then sends one frame through the pipeline (the
   first answer pays for lazy initialisation, not a user's request) and logs each phase's seconds on one
   `cold start:` line (docs/deployment.md, "Cold start").
3. Starts the gateway (uvicorn) or the RunPod handler.
4. SIGTERM/SIGINT drain both within SHUTDOWN_GRACE_S (the front first, then Triton) and exit 0; idle, that takes
   about 3 s. Every process started here dies with this one, even when it is killed hard (SIGKILL): none is left
   holding the ports or the GPU for the next start.
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

from anomaly.config import REPO_ROOT, Settings, load_settings
from anomaly.detector import export_files
from anomaly.errors import ConfigError
from anomaly.logs import setup_logging
from anomaly.serving.triton_server import TritonServer, TritonStartError, die_with_parent

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


def gateway_command(settings: Settings, port: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "runpod_handler.gateway:app",
        "--host", settings.api_host, "--port", str(port), "--workers", "1",
        # On SIGTERM uvicorn stops accepting and lets requests in flight finish, within our grace period.
        "--timeout-graceful-shutdown", str(max(1, int(settings.shutdown_grace_s - 2))),  # 2 s left for Triton
    ]  # fmt: skip


def front_commands(settings: Settings) -> list[list[str]]:
    """What answers users: the RunPod handler, or the gateway on API_PORT (pod) or PORT (load-balancing; a
    second one serves /ping on PORT_HEALTH when RunPod gives it another port)."""
    if settings.runpod_mode == "serverless":
        return [[sys.executable, str(REPO_ROOT / "runpod_handler" / "handler.py")]]
    if settings.runpod_mode == "pod":
        return [gateway_command(settings, settings.api_port)]
    ports = dict.fromkeys((settings.port, settings.port_health))
    return [gateway_command(settings, port) for port in ports]


def describe(settings: Settings) -> str:
    if settings.runpod_mode == "serverless":
        return "serverless worker"
    if settings.runpod_mode == "lb":
        return f"load-balancing REST gateway on {settings.api_host}:{settings.port} (/ping on {settings.port_health})"
    return f"REST gateway on {settings.api_host}:{settings.api_port}"


class ColdStart:
    """Seconds of each start-up phase, logged on one line once the service can answer."""

    def __init__(self):
        self.phases: list[str] = []

    def timed(self, name: str):
        start = time.monotonic()
        return lambda note="": self.phases.append(f"{name} {time.monotonic() - start:.1f} s{note}")

    def line(self) -> str:
        import psutil

        since_start = time.time() - psutil.Process().create_time()  # the container's start, for ENTRYPOINT
        return f"cold start: {', '.join(self.phases)}; answering {since_start:.1f} s after the process started"


def export_models(settings: Settings, cold: ColdStart) -> int:
    """`python -m export` in its own process (the models it loads are not kept here); notes whether the
    detector was exported or an up-to-date export was reused (a persisted MODEL_REPOSITORY)."""
    meta_path = export_files(settings.model_repository)[1]
    before = meta_path.stat().st_mtime_ns if meta_path.exists() else None
    done = cold.timed("export")
    code = subprocess.run([sys.executable, "-m", "export"], cwd=REPO_ROOT, preexec_fn=die_with_parent).returncode
    after = meta_path.stat().st_mtime_ns if meta_path.exists() else None
    done(" (reused the detector export)" if before is not None and before == after else " (detector exported)")
    return code


def first_answer(server: TritonServer, cold: ColdStart) -> None:
    """One frame through the whole pipeline before users come: its time is the last phase of the cold start."""
    from client import AnomalyClient

    done = cold.timed("first answer")
    sample = REPO_ROOT / "samples" / "pier_spalling.png"
    try:
        with AnomalyClient(server.grpc_url, "grpc") as client:
            client.detect(sample.read_bytes())  # at the default threshold, as a user's first frame
    except Exception as exc:  # noqa: BLE001 - a user's request will say what is wrong; starting goes on
        log.warning("the warm-up request failed: %s", exc)
        done(" (failed)")
        return
    done()


def start_fronts(settings: Settings) -> list[subprocess.Popen]:
    """The gateway(s) or the handler, each killed by the kernel if this process dies without stopping them."""
    return [subprocess.Popen(cmd, cwd=REPO_ROOT, preexec_fn=die_with_parent) for cmd in front_commands(settings)]


def stop_fronts(fronts: list[subprocess.Popen], deadline: float, mode: str) -> None:
    for front in fronts:
        if front.poll() is None:
            front.terminate()
    for front in fronts:
        try:
            front.wait(max(0.5, deadline - time.monotonic() - 1.0))
        except subprocess.TimeoutExpired:
            log.warning("the %s did not finish within the grace period; killing it", mode)
            front.kill()
            front.wait()


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
    mode = describe(settings)
    cold = ColdStart()
    fronts: list[subprocess.Popen] = []
    if settings.runpod_mode == "lb":  # /ping answers 204 while the rest starts
        log.info("starting the %s before the models", mode)
        fronts = start_fronts(settings)

    sync_model_repository(settings.model_repository)
    if export_models(settings, cold) != 0:
        print("entrypoint: model export failed (see above); not starting", file=sys.stderr)
        stop_fronts(fronts, time.monotonic() + settings.shutdown_grace_s, mode)
        return 2
    if stopping:
        stop_fronts(fronts, time.monotonic() + settings.shutdown_grace_s, mode)
        return 0

    server = TritonServer(settings)
    loaded = cold.timed("Triton model loads")
    try:
        server.start(settings.triton_ready_timeout)
    except (TritonStartError, ConfigError) as exc:  # ConfigError: GPUS names a GPU the server does not see
        print(f"entrypoint: {exc}", file=sys.stderr)
        stop_fronts(fronts, time.monotonic() + settings.shutdown_grace_s, mode)
        return 1
    loaded()
    first_answer(server, cold)
    log.info("Triton ready (HTTP %s, gRPC %s); %s", server.http_url, server.grpc_url, cold.line())
    if not fronts:
        log.info("starting the %s", mode)
        fronts = start_fronts(settings)

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
            if dead and _exits_within(server.process, 0.5):  # the whole group was killed: tritonserver is the news
                continue
            if dead:  # Triton keeps saying ready while every request fails: exit so the platform restarts us
                print(
                    f"entrypoint: the process of model {', '.join(dead)} died and Triton does not restart it; "
                    "stopping (exit 1) so that the pod or worker is restarted",
                    file=sys.stderr,
                )
                code = 1
                break
        ended = [front for front in fronts if front.poll() is not None]
        if ended:
            code = ended[0].returncode or 0
            log.info("the %s exited with %s; stopping Triton", mode, code)
            break
        time.sleep(0.2)

    # Drain in order within SHUTDOWN_GRACE_S: the front stops accepting and finishes its requests (they still
    # need Triton), then Triton finishes what is in flight (direct clients' requests too) and exits.
    deadline = time.monotonic() + settings.shutdown_grace_s
    stop_fronts(fronts, deadline, mode)
    server.stop(timeout=max(0.5, deadline - time.monotonic()))
    return code


def _exits_within(process: subprocess.Popen, seconds: float) -> bool:
    """Whether `process` has exited or does within `seconds` (a kill of tritonserver's process group ends its model
    processes at the same moment, and the model processes may be seen dead first)."""
    try:
        process.wait(seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
