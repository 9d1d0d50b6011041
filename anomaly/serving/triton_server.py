"""Start the real tritonserver on the model repository, wait until every model is ready, stop it cleanly.

Where the binary comes from, first found wins: TRITON_HOME, the official container's /opt/tritonserver,
or the `nvidia-pytriton` wheel unpacked in .triton/ (`make triton`), whose Python backend is linked
into a backend folder next to it. Triton's own pinned and CUDA memory pools are off (only CPU tensors pass
between the steps), and on a GPU machine tritonserver itself starts with the GPU hidden (HIDE_GPU_FROM_TRITON):
the steps that run models on it see it again in their own processes (anomaly.hardware.show_hidden_gpus).
The Python backend's shared-memory regions get a per-server prefix so a stop can remove exactly its own.

Stopping: SIGTERM lets Triton finish the requests in flight; once its log says none is left, its models get
UNLOAD_GRACE_S to unload before the whole process group is killed (a model process that never exits would otherwise
hold the stop for the whole exit timeout). tritonserver dies with the process that started it, even one killed
hard (`die_with_parent`), and its model processes follow it: nothing outlives the launcher to hold the ports.

`python -m anomaly.serving.triton_server` runs it in the foreground until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import glob
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from anomaly.config import REPO_ROOT, Settings, load_settings
from anomaly.hardware import has_gpu, hide_gpus
from anomaly.serving import mps
from anomaly.serving.plan import CONFIG_NAME, serving_plan, write_serving_configs

log = logging.getLogger("anomaly.serving")

PYTRITON_HOME = REPO_ROOT / ".triton" / "pkgs" / "pytriton" / "tritonserver"
# Triton's log during a stop, every second of its exit timeout (server.cc): the requests still in flight, the live
# models. Once no request is in flight, a model has UNLOAD_GRACE_S to unload (they take about 2 s here).
IN_FLIGHT_DONE = b"Found 0 model versions that have in-flight inferences"
LIVE_MODELS = re.compile(rb"Found (\d+) live models")
UNLOAD_GRACE_S = 3.0
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """For Popen's preexec_fn: the child gets SIGKILL when the thread that started it ends, however it ends (a
    container runtime's SIGKILL of the entrypoint included), so it cannot outlive its launcher holding ports."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl: nobody would ever stop this child
        os._exit(1)


CONTAINER_HOME = Path("/opt/tritonserver")


class TritonStartError(RuntimeError):
    pass


def find_triton(settings: Settings) -> tuple[Path, Path]:
    """(tritonserver binary, backend directory)."""
    homes = [Path(settings.triton_home)] if settings.triton_home else [CONTAINER_HOME, PYTRITON_HOME]
    for home in homes:
        binary = home / "bin" / "tritonserver"
        if not binary.is_file():
            continue
        if (home / "backends" / "python" / "triton_python_backend_stub").exists():
            return binary, home / "backends"  # a complete install, as in the official container
        return binary, _link_pytriton_backend(home)
    raise TritonStartError(
        f"tritonserver not found in {', '.join(str(h) for h in homes)}; run `make triton` "
        "(installs the nvidia-pytriton wheel into .triton/) or set TRITON_HOME"
    )


def _link_pytriton_backend(home: Path) -> Path:
    """The wheel keeps the stub apart from the backend; Triton wants them in one folder. Symlinks keep
    the stub next to the libraries it was built with."""
    major_minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = home / "python_backend_stubs" / major_minor / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonStartError(f"no Python backend stub for Python {major_minor} in {home}")
    backends = REPO_ROOT / ".triton" / "backends"
    target = backends / "python"
    target.mkdir(parents=True, exist_ok=True)
    for source in (
        home / "backends" / "python" / "libtriton_python.so",
        home / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ):
        link = target / source.name
        if link.is_symlink() or link.exists():
            if link.resolve() == source.resolve():
                continue
            link.unlink()
        link.symlink_to(source.resolve())
    return backends


def inductor_cache_dir(env: dict, weights_dir: Path) -> str:
    """Where SAM_COMPILE's kernels go in Triton's model processes: the operator's TORCHINDUCTOR_CACHE_DIR, else
    WEIGHTS_DIR/inductor_cache, so that they outlive the process (a volume's WEIGHTS_DIR: the next start reuses
    them). Decided here, before the model processes import torch: importing torch._dynamo sets torch's own default
    (under /tmp), which in a launcher that imported torch itself (the bench, the tests) is not the operator's."""
    current = env.get("TORCHINDUCTOR_CACHE_DIR")
    if current and "torch._inductor.runtime.cache_dir_utils" in sys.modules:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        if current == default_cache_dir():
            current = None
    return current or str(weights_dir / "inductor_cache")


class TritonServer:
    """A tritonserver child process; usable as a context manager."""

    def __init__(
        self,
        settings: Settings | None = None,
        model_repository: Path | None = None,
        log_path: Path | None = None,
        env: dict | None = None,
        model_config_name: str = "",
    ):
        self.settings = settings or load_settings()
        self.model_repository = Path(model_repository or self.settings.model_repository)
        self.log_path = log_path
        self.extra_env = env or {}
        self.model_config_name = model_config_name
        self.process: subprocess.Popen | None = None
        self.plan = None
        self._gpu: bool | None = None
        self._stubs: dict = {}
        self.shm_prefix = f"anomaly_{os.getpid()}_{int(time.time() * 1000) % 10**8}_"
        self._log_file = None
        self.mps: mps.MpsDaemon | None = None  # our MPS daemon while the server runs (CUDA_MPS)
        self.mps_state = "off"  # off, on (server pids), or why not: the GPU steps get it for /info; make bench-gpu
        self._output: threading.Thread | None = None  # forwards Triton's output, watching it while stopping
        self._requests_done_at: float | None = None  # when a stop found no request in flight
        self._live_models = 0
        self._stopping = False

    @property
    def client_host(self) -> str:
        host = self.settings.triton_host
        return "127.0.0.1" if host in ("0.0.0.0", "::") else host

    @property
    def http_url(self) -> str:
        return f"{self.client_host}:{self.settings.triton_http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.client_host}:{self.settings.triton_grpc_port}"

    def command(self) -> list[str]:
        binary, backends = find_triton(self.settings)
        s = self.settings
        cmd = [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--http-address={s.triton_host}",
            f"--http-port={s.triton_http_port}",
            f"--grpc-address={s.triton_host}",
            f"--grpc-port={s.triton_grpc_port}",
            f"--metrics-address={s.triton_host}",
            f"--metrics-port={s.triton_metrics_port}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--backend-config=python,stub-timeout-seconds=120",
            f"--exit-timeout-secs={max(1, int(self.settings.shutdown_grace_s))}",
            "--strict-readiness=true",
            "--log-verbose=0",
        ]
        cmd.append(f"--model-config-name={self.model_config_name or CONFIG_NAME}")
        # The steps pass only CPU tensors between them (each model moves its own to the GPU), so Triton's own
        # pinned and CUDA pools would hold memory for nothing.
        cmd += ["--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0"]
        if not self.gpu or self.hides_gpu:
            cmd.append("--allow-gpu-metrics=false")
        if s.triton_trace_file:  # a file to trace into; the level stays OFF until Triton's trace API changes it
            cmd.append(f"--trace-config=triton,file={s.triton_trace_file}")
        return cmd

    @property
    def hides_gpu(self) -> bool:
        """Whether tritonserver starts with the GPU hidden: it would open a CUDA context of its own (0.5 GB on an
        H100, even with its pools off) for streams that copy GPU tensors between steps, and ours pass none. Not with
        an instance per GPU: Triton must see the GPUs it places instances on."""
        return self.gpu and self.settings.hide_gpu_from_triton and not (self.plan and self.plan.gpus)

    def environment(self) -> dict:
        """tritonserver's environment (its model processes inherit it): the GPU hidden where it hides it, and
        pointed at our MPS daemon where one runs, and told whether it does (their records, /info)."""
        env = self.model_environment() | (self.mps.env if self.mps else {}) | {mps.ENV_STATE: self.mps_state}
        return hide_gpus(env) if self.hides_gpu else env

    def model_environment(self) -> dict:
        """The environment the model processes run in, as the operator's GPUs are visible to them."""
        env = dict(os.environ)
        # Triton's Python stub finds packages through the python on PATH, not PYTHONPATH.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        # Each model is its own process: only the detector and SAM size their thread pools (COMPUTE_THREADS);
        # everything else stays single-threaded so the cores are not oversubscribed.
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, "1")
        env.setdefault("PYTHONUNBUFFERED", "1")
        # torch's allocator grows segments instead of keeping one per odd size: the detector and SAM see a few
        # batch sizes and box counts, and fixed segments strand GPU memory between them.
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        env["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir(env, self.settings.weights_dir)
        env.update(self.extra_env)
        return env

    def start_mps(self) -> None:
        """CUDA_MPS=on on a GPU machine: our MPS daemon, checked with a CUDA client; else the reason in the log."""
        if not (self.gpu and self.settings.cuda_mps == "on"):
            return
        self.mps, why = mps.start(self.model_environment())
        if self.mps:
            self.mps_state = f"on (MPS server {', '.join(self.mps.server_pids) or 'pid not listed'})"
            log.info("CUDA_MPS=on: the GPU steps run as clients of one MPS server (%s)", self.mps.folder)
        else:
            self.mps_state = f"not started: {why}"
            log.warning("CUDA_MPS=on, but Triton starts without MPS: %s", why)

    @property
    def gpu(self) -> bool:
        if self._gpu is None:
            self._gpu = has_gpu()
        return self._gpu

    def start(self, ready_timeout: float = 300.0) -> TritonServer:
        if not self.model_config_name:  # this machine's instances and batching (anomaly.serving)
            self.plan = serving_plan(self.settings, self.gpu)
            write_serving_configs(self.model_repository, self.plan)
        cmd = self.command()
        if self.settings.triton_trace_file:  # Triton writes the file but makes no folders
            Path(self.settings.triton_trace_file).parent.mkdir(parents=True, exist_ok=True)
        if self.log_path:
            Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        atexit.register(self.stop)  # a crashing parent must not leave a server (or our MPS daemon) behind
        try:
            self.start_mps()  # before tritonserver: its model processes connect to the daemon as they start CUDA
            self.process = subprocess.Popen(
                cmd,
                env=self.environment(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() reaches the stubs too
                preexec_fn=die_with_parent,  # the thread calling start() must live as long as the server
            )
            self._output = threading.Thread(target=self._forward_output, name="tritonserver output", daemon=True)
            self._output.start()
            self.wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise
        self._stubs = self.model_processes()
        return self

    def _forward_output(self) -> None:
        """Triton's output, line by line, to the log file (or this process's stderr); during a stop, notes when no
        request is left in flight and how many models are still live."""
        sink = self._log_file or sys.stderr.buffer
        for line in self.process.stdout:
            if self._stopping:
                if IN_FLIGHT_DONE in line and self._requests_done_at is None:
                    self._requests_done_at = time.monotonic()
                live = LIVE_MODELS.search(line)
                if live:
                    self._live_models = int(live.group(1))
            try:
                sink.write(line)
                sink.flush()
            except (OSError, ValueError):  # the log closed under us at the very end of a stop
                pass

    def model_processes(self) -> dict:
        """psutil.Process -> model name, for each model instance's process (Triton runs every Python model
        instance in a stub process of its own)."""
        pid = self.pid()
        if pid is None:
            return {}
        import psutil

        found = {}
        for child in psutil.Process(pid).children(recursive=True):
            try:
                name = model_of(child.cmdline(), self.model_repository)
            except psutil.Error:
                continue
            if name:
                found[child] = name
        return found

    def dead_models(self) -> list[str]:
        """Models whose instance process has died since the server became ready. Triton 2.51's Python backend
        does not restart such a process: every request needing that model fails while the server and the model
        still report ready, so whoever supervises the server must act (the entrypoint exits non-zero).
        is_running() compares start times, so a recycled pid does not pass for the dead process."""
        import psutil

        dead = []
        for proc, name in self._stubs.items():
            try:
                alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            if not alive:
                dead.append(name)
        return sorted(set(dead))

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process and self.process.poll() is not None:
                if self._output:
                    self._output.join(2)  # its last lines into the log before the tail is read
                raise TritonStartError(f"tritonserver exited with code {self.process.returncode}{self._log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.25)
        raise TritonStartError(f"tritonserver was not ready after {timeout:.0f} s{self._log_tail()}")

    def _log_tail(self) -> str:
        if not self.log_path or not Path(self.log_path).exists():
            return ""
        lines = Path(self.log_path).read_text(errors="replace").splitlines()
        return "; log tail:\n" + "\n".join(lines[-25:])

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM; once Triton has no request in flight, UNLOAD_GRACE_S for its models to unload; then SIGKILL for
        the whole group (at `timeout` at the latest); removes leftover shared memory."""
        code = None
        if self.process and self.process.poll() is None:
            self._stopping = True
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            code = self._wait_unloaded(time.monotonic() + timeout)
            if code is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                code = self.process.wait()
        elif self.process:
            code = self.process.returncode
        if self.process:
            try:  # stubs that outlived the server
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._output:
            self._output.join(5)
            self._output = None
        for leftover in glob.glob(f"/dev/shm/{self.shm_prefix}*"):
            Path(leftover).unlink(missing_ok=True)
        if self.mps:  # after its clients are gone
            self.mps.stop()
            self.mps = None
        if self._log_file:
            self._log_file.close()
            self._log_file = None
        return code

    def _wait_unloaded(self, deadline: float) -> int | None:
        """tritonserver's exit code, or None where it has to be killed: at `deadline`, or UNLOAD_GRACE_S after it
        found no request in flight with a model still live (a model process that does not exit)."""
        while True:
            try:
                return self.process.wait(0.1)
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            done = self._requests_done_at
            if done is not None and now - done >= UNLOAD_GRACE_S:
                log.warning(
                    "Triton: no request in flight, but %d model(s) had not unloaded %.0f s later; stopping them",
                    self._live_models, UNLOAD_GRACE_S,
                )  # fmt: skip
                return None
            if now >= deadline:
                log.warning("Triton had not stopped within its grace period; stopping it")
                return None

    def memory_mib(self) -> dict:
        """Resident memory of tritonserver and of each model's stub process, in MiB."""
        return process_tree_mib(self.pid(), self.model_repository)

    def pid(self) -> int | None:
        """tritonserver's process id: ours, or that of the server already answering on our gRPC port."""
        if self.process:
            return self.process.pid
        import psutil

        flag = f"--grpc-port={self.settings.triton_grpc_port}"
        for proc in psutil.process_iter(["name", "cmdline"]):
            if proc.info["name"] == "tritonserver" and flag in (proc.info["cmdline"] or []):
                return proc.pid
        return None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def model_of(cmdline: list[str], model_repository: Path) -> str:
    """The model a stub process serves, from the model path on its command line ("" for other processes)."""
    where = next((a for a in cmdline if str(model_repository) in a), "")
    parts = Path(where).parts if where else ()
    # tritonserver's own --model-repository=... names the repository but no model in it
    return parts[len(model_repository.parts)] if len(parts) > len(model_repository.parts) else ""


def process_tree_mib(pid: int | None, model_repository: Path) -> dict | None:
    """Resident memory of a tritonserver, of each model's stub processes (named by model) and of the geometry
    step's worker processes together, in MiB."""
    if pid is None:
        return None
    import psutil

    root = psutil.Process(pid)
    rows = {"tritonserver": root.memory_info().rss}
    for child in root.children(recursive=True):
        cmdline = child.cmdline()
        name = model_of(cmdline, model_repository) or (
            "geometry workers" if "anomaly.geometry_workers" in cmdline else f"pid {child.pid}"
        )
        rows[name] = rows.get(name, 0) + child.memory_info().rss
    mib = {k: round(v / 2**20, 1) for k, v in rows.items()}
    return {"total_mib": round(sum(mib.values()), 1), "processes_mib": mib}


@contextmanager
def running_server(settings: Settings | None = None, log_path: Path | None = None) -> Iterator[TritonServer]:
    """The Triton already answering on the configured ports, else one started here and stopped on exit.
    `server.process` is None for a server this process did not start."""
    server = TritonServer(settings, log_path=log_path)
    if server.is_ready():
        yield server
        return
    print(f"starting tritonserver (log: {log_path}) ...", file=sys.stderr, flush=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anomaly.serving.triton_server", description=__doc__)
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    server = TritonServer()
    stopping = []

    def on_signal(signum, _frame):
        stopping.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start(args.ready_timeout)
    except TritonStartError as exc:
        print(f"triton: {exc}", file=sys.stderr)
        return 1
    print(f"triton ready: HTTP {server.http_url}, gRPC {server.grpc_url}, model anomaly_pipeline", flush=True)
    dead: list[str] = []
    while not stopping and server.process.poll() is None and not dead:
        time.sleep(0.5)
        dead = server.dead_models()
    died = server.process.poll() is not None and not stopping
    code = server.stop()
    if dead:
        print(f"triton: the process of model {', '.join(dead)} died; stopped Triton", file=sys.stderr)
        return 1
    if died:
        print(f"triton: tritonserver exited unexpectedly with code {code}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
