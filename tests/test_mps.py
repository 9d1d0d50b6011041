"""CUDA_MPS: the launcher's MPS control daemon (anomaly.serving.mps).

MPS needs an NVIDIA GPU and its driver utilities, which this machine lacks: the control daemon here is a stand-in
script that keeps its state in the pipe folder it is given and records every command, and the CUDA client the
launcher checks MPS with is replaced by one that asks the stand-in's state. What runs for real: the launcher's
logic (where the daemon's folders go, what the model processes inherit, what happens when MPS cannot start, the
quit at stop) and the probe itself, which on this machine fails for want of a CUDA driver, as it must.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from anomaly.config import REPO_ROOT, load_settings
from anomaly.serving import mps

STAND_IN = """#!/bin/sh
# stand-in for nvidia-cuda-mps-control: -d starts "the daemon", commands come on stdin
state="$CUDA_MPS_PIPE_DIRECTORY/state"
if [ "$1" = "-d" ]; then
  echo "daemon log=$CUDA_MPS_LOG_DIRECTORY visible=$CUDA_VISIBLE_DEVICES" >> "$MPS_RECORD"
  [ -n "$MPS_REFUSE" ] && { echo "cannot start: $MPS_REFUSE" >&2; exit 3; }
  echo running > "$state"
  exit 0
fi
read -r command
echo "$command" >> "$MPS_RECORD"
case "$command" in
  get_server_list) [ -f "$state" ] && { echo 4242; exit 0; }; exit 1 ;;
  quit) rm -f "$state"; exit 0 ;;
esac
exit 2
"""

# the launcher's CUDA client, replaced: it gets through where the stand-in daemon runs in the folder it was given
CLIENT = [
    sys.executable,
    "-c",
    "import os, sys; ok = os.path.exists(os.path.join(os.environ['CUDA_MPS_PIPE_DIRECTORY'], 'state')); "
    "print('' if ok else 'no MPS server answered', file=sys.stderr); sys.exit(0 if ok else 1)",
]


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """PATH with the stand-in control binary first; returns the file it records into."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    control = bin_dir / mps.CONTROL
    control.write_text(STAND_IN)
    control.chmod(control.stat().st_mode | stat.S_IXUSR)
    record = tmp_path / "record.txt"
    record.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MPS_RECORD", str(record))
    monkeypatch.delenv(mps.ENV_PIPE, raising=False)
    monkeypatch.setattr(mps, "PROBE", CLIENT)
    return record


def lines(record: Path) -> list[str]:
    return record.read_text().splitlines()


def test_mps_daemon_is_started_checked_with_a_client_and_quit(stand_in):
    daemon, why = mps.start(dict(os.environ) | {"CUDA_VISIBLE_DEVICES": "0"})
    assert daemon is not None, why
    assert why == ""
    pipe, log_dir = Path(daemon.env[mps.ENV_PIPE]), Path(daemon.env[mps.ENV_LOG])
    assert pipe.is_dir() and log_dir.is_dir() and pipe.parent == log_dir.parent == daemon.folder
    # the daemon starts where the GPUs are visible (the MPS server it launches inherits that), with its own log
    assert lines(stand_in) == [f"daemon log={log_dir} visible=0", "get_server_list"]
    assert daemon.server_pids == ["4242"]
    daemon.stop()
    assert lines(stand_in)[-1] == "quit"
    assert not daemon.folder.exists()


def test_mps_is_not_used_where_the_client_cannot_get_through(stand_in, monkeypatch):
    """The card's compute mode or the container may forbid MPS: then the daemon is quit again before any model
    loads, and the reason is the client's own message."""
    monkeypatch.setattr(mps, "PROBE", [sys.executable, "-c", "import sys; sys.exit('cuInit returned CUDA error 805')"])
    daemon, why = mps.start(dict(os.environ))
    assert daemon is None
    assert why == "a CUDA client could not start through MPS: cuInit returned CUDA error 805"
    assert lines(stand_in)[-1] == "quit"
    folder = Path(lines(stand_in)[0].split("log=")[1].split()[0]).parent  # where the daemon was started
    assert folder.name.startswith("anomaly-mps-") and not folder.exists()


def test_mps_is_not_used_where_the_daemon_does_not_start(stand_in, monkeypatch):
    monkeypatch.setenv("MPS_REFUSE", "compute mode is prohibited")
    daemon, why = mps.start(dict(os.environ))
    assert daemon is None
    assert why == f"`{mps.CONTROL} -d` failed (3): cannot start: compute mode is prohibited"


def test_mps_is_not_used_where_its_folders_cannot_be_made(stand_in, monkeypatch):
    """A temp folder that cannot be written (a full disk, stood in for): MPS is skipped with the reason and nothing
    is started; the launcher goes on to start Triton."""

    def full(prefix):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mps.tempfile, "mkdtemp", full)
    daemon, why = mps.start(dict(os.environ))
    assert daemon is None and why.startswith("no folder for the MPS daemon: ")
    assert lines(stand_in) == []


def test_mps_is_not_used_without_the_control_binary(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(mps.ENV_PIPE, raising=False)
    daemon, why = mps.start(dict(os.environ))
    assert daemon is None
    assert mps.CONTROL in why and "not on PATH" in why


def test_an_operators_mps_daemon_is_left_alone(stand_in, monkeypatch):
    """CUDA_MPS_PIPE_DIRECTORY set by the operator: their daemon serves; ours is not started next to it."""
    monkeypatch.setenv(mps.ENV_PIPE, "/run/their-mps")
    daemon, why = mps.start(dict(os.environ))
    assert daemon is None
    assert "operator's MPS daemon" in why
    assert lines(stand_in) == []


def test_the_cuda_client_fails_saying_why_where_cuda_cannot_start():
    """The real CUDA client the launcher runs: without a CUDA driver (this machine) it fails naming the missing
    library; where a driver loads, it gets through or names the CUDA call that failed."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        driver = True
    except OSError:
        driver = False
    done = subprocess.run([sys.executable, "-m", "anomaly.serving.mps"], cwd=REPO_ROOT, capture_output=True, text=True)
    if not driver:
        assert done.returncode == 1 and "no CUDA driver library (libcuda.so.1" in done.stderr
    else:
        assert done.returncode == 0 or "returned CUDA error" in done.stderr


@pytest.mark.parametrize("gpu,setting,started", [(True, "on", True), (True, "off", False), (False, "on", False)])
def test_launcher_runs_triton_as_clients_of_its_mps_daemon(stand_in, monkeypatch, gpu, setting, started):
    """CUDA_MPS=on on a GPU machine: tritonserver's environment (its model processes inherit it) points at our
    daemon, with the GPU still hidden from tritonserver itself; stop() quits the daemon. Off, or on a CPU
    machine, nothing is started."""
    from anomaly.hardware import HIDDEN_GPUS
    from anomaly.serving.triton_server import TritonServer

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    server = TritonServer(dataclasses.replace(load_settings(), cuda_mps=setting, hide_gpu_from_triton=True))
    server._gpu = gpu
    server.start_mps()
    env = server.environment()
    assert (mps.ENV_PIPE in env) == started
    assert server.mps_state == ("on (MPS server 4242)" if started else "off")
    assert env[mps.ENV_STATE] == server.mps_state  # what the GPU steps record and /info shows
    if started:
        assert env[mps.ENV_PIPE] == server.mps.env[mps.ENV_PIPE]
        assert env["CUDA_VISIBLE_DEVICES"] == "" and env[HIDDEN_GPUS] == "0"  # tritonserver: no context of its own
        assert "visible=0" in lines(stand_in)[0]  # the daemon (and the MPS server it starts) sees the GPU
    folder = server.mps.folder if started else None
    server.stop()
    assert server.mps is None
    assert (lines(stand_in)[-1:] == ["quit"]) == started
    if folder:
        assert not folder.exists()


def test_launcher_says_why_it_starts_without_mps(stand_in, monkeypatch, caplog):
    from anomaly.serving.triton_server import TritonServer

    monkeypatch.setenv("MPS_REFUSE", "no GPU in this container")
    server = TritonServer(dataclasses.replace(load_settings(), cuda_mps="on"))
    server._gpu = True
    with caplog.at_level("WARNING", logger="anomaly.serving"):
        server.start_mps()
    assert server.mps is None
    assert mps.ENV_PIPE not in server.environment()
    assert server.mps_state.startswith("not started: ") and "no GPU in this container" in server.mps_state
    assert server.environment()[mps.ENV_STATE] == server.mps_state
    assert "Triton starts without MPS" in caplog.text and "no GPU in this container" in caplog.text


def test_bench_counts_the_mps_servers_gpu_memory_with_tritons(monkeypatch):
    """make bench-gpu's memory (nvidia-smi's per-process count, here given by a stand-in): under MPS the shared
    context is the MPS server's, a process outside Triton's tree, counted as "MPS server"; other processes on the
    card stay out."""
    import bench.gpu as bench_gpu

    class Daemon:
        def servers(self):
            return ["777"]

    standing_in = subprocess.Popen(["sleep", "30"])  # for tritonserver: a process without children

    class Server:
        model_repository = REPO_ROOT / "model_repository"
        mps = Daemon()

        def pid(self):
            return standing_in.pid

        def memory_mib(self):
            return {}

    apps = [[str(standing_in.pid), "500"], ["777", "300"], ["999", "100"]]
    card = [["2000"]]
    monkeypatch.setattr(bench_gpu, "_nvidia_smi", lambda query: apps if query.startswith("compute-apps") else card)
    try:
        memory = bench_gpu.gpu_memory_mib(Server())
    finally:
        standing_in.kill()
        standing_in.wait()
    assert memory["gpu_by_model_mib"] == {"tritonserver": 500.0, "MPS server": 300.0}
    assert memory["gpu_total_mib"] == 800.0 and memory["card_used_mib"] == 2000.0


def test_model_of_names_a_stubs_model_and_nothing_for_tritonserver_itself():
    """The process tables (make bench-gpu's GPU memory, the resident memory, the dead-model watch) name each process
    by the model path on its command line; tritonserver's own --model-repository names no model (it raised
    IndexError before, where tritonserver was a child of the process asked about)."""
    from anomaly.serving.triton_server import model_of

    repository = Path("/srv/model_repository")
    stub = ["triton_python_backend_stub", "/srv/model_repository/segmenter/1/model.py", "anomaly_1_"]
    assert model_of(stub, repository) == "segmenter"
    assert model_of(["tritonserver", "--model-repository=/srv/model_repository"], repository) == ""
    assert model_of(["python", "-m", "anomaly.geometry_workers"], repository) == ""
