"""The container entrypoint outside Docker (no Docker engine here): pod and serverless modes start for
real, serve, and stop on SIGTERM within 10 s leaving no process behind; Triton dying stops everything."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests

from tests.conftest import REPO, SAMPLES, free_ports, wait_http

pytestmark = pytest.mark.e2e  # each test starts the entrypoint, hence Triton

PIER = base64.b64encode((SAMPLES / "pier_spalling.png").read_bytes()).decode()


def launch(tmp_path, ports=None, **env):
    http, grpc, metrics, api = ports or free_ports(4)
    full_env = dict(
        os.environ,
        TRITON_HTTP_PORT=str(http), TRITON_GRPC_PORT=str(grpc), TRITON_METRICS_PORT=str(metrics),
        API_HOST="127.0.0.1", API_PORT=str(api), TRITON_URL="",
    )  # fmt: skip
    full_env.update(env)
    log = open(tmp_path / "entrypoint.log", "a")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "runpod_handler.entrypoint"],
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    return proc, api, tmp_path / "entrypoint.log"


def descendants(proc) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def stop_within_10s(proc, family) -> None:
    assert any("tritonserver" in " ".join(p.cmdline()) for p in family)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(15)
    elapsed = time.monotonic() - start
    assert code == 0
    assert elapsed < 10, f"stopping took {elapsed:.1f} s"
    time.sleep(0.5)
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {[p.cmdline()[:2] for p in alive]}"


def test_pod_mode_serves_and_stops_cleanly(tmp_path):
    bad_sam = tmp_path / "sam2.1_hiera_tiny.pt"
    bad_sam.write_bytes(b"this is not a checkpoint")
    proc, api, log = launch(tmp_path, RUNPOD_SERVERLESS="false", SAM_MODEL_PATH=str(bad_sam))
    try:
        wait_http(f"http://127.0.0.1:{api}/health", proc, log)
        r = requests.post(
            f"http://127.0.0.1:{api}/detect", json={"image": PIER, "confidence_threshold": 0.5}, timeout=300
        )
        assert r.status_code == 200 and r.json()["image_size"]["width"] == 800
        # An unusable SAM_MODEL_PATH is reported and the documented fallback serves.
        segmenter = requests.get(f"http://127.0.0.1:{api}/info", timeout=60).json()["segmenter"]
        assert segmenter["sam_model_path"] == str(bad_sam)
        assert "could not be read as a checkpoint" in segmenter["note"] and segmenter["untrained"] is True
        assert "could not be read as a checkpoint" in log.read_text()
        stop_within_10s(proc, descendants(proc))
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serverless_mode_serves_and_stops_cleanly(tmp_path):
    (realtime,) = free_ports(1)
    proc, _api, log = launch(tmp_path, RUNPOD_SERVERLESS="true", RUNPOD_REALTIME_PORT=str(realtime))
    try:
        wait_http(f"http://127.0.0.1:{realtime}/docs", proc, log)
        r = requests.post(
            f"http://127.0.0.1:{realtime}/runsync", json={"input": {"image": PIER, "frame_id": "s1"}}, timeout=300
        )
        assert r.json()["status"] == "COMPLETED" and r.json()["output"]["frame_id"] == "s1"
        stop_within_10s(proc, descendants(proc))
    finally:
        if proc.poll() is None:
            proc.kill()


def test_load_balancing_mode_pings_then_serves_the_rest_api_on_port(tmp_path, exported):
    """RUNPOD_SERVERLESS=lb, as RunPod's load-balancing endpoints run a worker: the REST gateway on PORT, and
    /ping (on PORT and on a separate PORT_HEALTH) answering 204 while the models load, 200 once they serve,
    open even with an API key; the same API as pod mode; the cold start's phases in the log."""
    port, health = free_ports(2)
    proc, _api, log = launch(tmp_path, RUNPOD_SERVERLESS="lb", PORT=str(port), PORT_HEALTH=str(health), API_KEY="k")
    try:
        codes = []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and 200 not in codes:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                codes.append(requests.get(f"http://127.0.0.1:{health}/ping", timeout=5).status_code)
            except requests.ConnectionError:
                pass  # uvicorn still starting
            time.sleep(0.5)
        assert codes and codes[0] == 204 and codes[-1] == 200, codes
        assert set(codes) <= {204, 200}  # starting, then ready: nothing RunPod would read as unhealthy
        assert requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).status_code == 200
        auth = {"Authorization": "Bearer k"}
        r = requests.post(f"http://127.0.0.1:{port}/detect", json={"image": PIER, "frame_id": "lb-1"}, headers=auth,
                          timeout=300)  # fmt: skip
        assert r.status_code == 200 and r.json()["frame_id"] == "lb-1"
        assert requests.post(f"http://127.0.0.1:{port}/detect", json={"image": PIER}, timeout=30).status_code == 401
        assert requests.get(f"http://127.0.0.1:{port}/info", headers=auth, timeout=60).json()["mode"] == "lb"
        phases = [line for line in log.read_text().splitlines() if "cold start:" in line]
        assert len(phases) == 1 and "Triton model loads" in phases[0] and "first answer" in phases[0], phases
        assert "(reused the detector export)" in phases[0]  # the repository was exported before: a warm start
        stop_within_10s(proc, descendants(proc))
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_a_compile_that_fails_at_the_first_frame_is_said_in_responses_and_info(tmp_path):
    """SAM_COMPILE on a CPU compiles at the first frame (the entrypoint's warm-up request), after the segmenter
    wrote what it serves for /info. On an image without a C++ compiler (here CXX names one that does not exist, on
    an empty inductor cache) the compile fails: SAM serves eager, and the response and /info both say so, not
    "compiled by inductor"."""
    proc, api, log = launch(tmp_path, RUNPOD_SERVERLESS="false", SAM_COMPILE="all", CXX="/nonexistent/c++",
                            TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor_cache"))  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{api}/health", proc, log)
        r = requests.post(f"http://127.0.0.1:{api}/detect", json={"image": PIER, "confidence_threshold": 0.25},
                          timeout=600)  # fmt: skip
        assert r.status_code == 200, r.text[:500]
        assert r.json()["anomalies"], "no box reached SAM"
        failed = "eager (torch.compile failed: InductorError)"
        assert r.json()["models"]["segmenter"]["runtime"].count(failed) == 2
        after = requests.get(f"http://127.0.0.1:{api}/info", timeout=60).json()["segmenter"]
        assert after["runtime"].count(failed) == 2, after["runtime"]
        assert "torch.compile failed, running eager" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def test_triton_dying_stops_the_entrypoint_with_an_error(tmp_path):
    proc, api, log = launch(tmp_path, RUNPOD_SERVERLESS="false")
    try:
        wait_http(f"http://127.0.0.1:{api}/health", proc, log)
        family = descendants(proc)
        (triton,) = [p for p in family if p.name() == "tritonserver"]
        os.killpg(triton.pid, signal.SIGKILL)
        assert proc.wait(20) != 0
        assert "tritonserver died" in log.read_text()
        time.sleep(0.5)
        assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("bad", [{"DETECTOR_VARIANT": "huge"}, {"API_PORT": "eighty"}])
def test_bad_configuration_is_refused_at_start(tmp_path, bad):
    proc, _api, log = launch(tmp_path, **bad)
    assert proc.wait(60) == 2
    name = next(iter(bad))
    assert name in log.read_text()


def test_triton_launcher_stops_on_sigint_without_leftovers(tmp_path):
    """`python -m anomaly.serving.triton_server` (Triton alone): ready, then SIGINT leaves no process and no
    shared-memory region of its own."""
    import glob

    http, grpc, metrics = free_ports(3)
    env = dict(os.environ, TRITON_HTTP_PORT=str(http), TRITON_GRPC_PORT=str(grpc), TRITON_METRICS_PORT=str(metrics))
    log = tmp_path / "triton.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "anomaly.serving.triton_server"],
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http(f"http://127.0.0.1:{http}/v2/health/ready", proc, log)
        family = descendants(proc)
        regions = {p for p in glob.glob("/dev/shm/anomaly_*")}
        assert regions, "the Python backend's shared memory should carry the launcher's prefix"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        time.sleep(0.5)
        assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        prefix = {r.rsplit("_", 1)[0] for r in regions if f"anomaly_{proc.pid}_" in r}
        assert prefix and not [r for r in glob.glob("/dev/shm/anomaly_*") if r.rsplit("_", 1)[0] in prefix]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_dead_model_process_stops_the_entrypoint_with_an_error(tmp_path):
    """kill -9 of one step's process: Triton 2.51 would keep reporting ready while every request fails; the
    entrypoint notices within seconds, stops the gateway and Triton, and exits non-zero for a restart."""
    proc, api, log = launch(tmp_path, RUNPOD_SERVERLESS="false")
    try:
        wait_http(f"http://127.0.0.1:{api}/health", proc, log)
        family = descendants(proc)
        (geometry,) = [p for p in family if "/geometry/" in " ".join(p.cmdline())]
        start = time.monotonic()
        geometry.kill()
        assert proc.wait(20) == 1
        assert time.monotonic() - start < 10
        assert "the process of model geometry died" in log.read_text()
        with pytest.raises(requests.ConnectionError):  # nothing left to say "healthy"
            requests.get(f"http://127.0.0.1:{api}/health", timeout=5)
        time.sleep(0.5)
        assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_finishes_the_requests_in_flight(tmp_path):
    """SIGTERM while REST and gRPC requests are in flight: every one of them is answered, the stack stops
    within the grace period (well under Docker's 10 s) and exits 0."""
    import threading

    from client import AnomalyClient

    proc, api, log = launch(tmp_path, RUNPOD_SERVERLESS="false", SHUTDOWN_GRACE_S="9")
    grpc_port = None
    try:
        wait_http(f"http://127.0.0.1:{api}/health", proc, log)
        grpc_port = next(a.split("=")[1] for p in descendants(proc) for a in p.cmdline() if a.startswith("--grpc-port"))
        answers: list = []

        def rest():
            r = requests.post(f"http://127.0.0.1:{api}/detect", json={"image": PIER, "confidence_threshold": 1.0},
                              timeout=30)  # fmt: skip
            answers.append(("rest", r.status_code if r.status_code == 200 else (r.status_code, r.text[:300])))

        def grpc():
            with AnomalyClient(f"127.0.0.1:{grpc_port}", "grpc") as c:
                answers.append(("grpc", c.detect(base64.b64decode(PIER), confidence_threshold=1.0)["image_size"]))

        # Few enough frames that the detector (the only model at threshold 1.0) finishes them within the grace
        # period even on a busy 2-core machine: past it, stopping hard is the contract.
        threads = [threading.Thread(target=rest) for _ in range(2)] + [threading.Thread(target=grpc)]
        for t in threads:
            t.start()
        time.sleep(0.3)  # the requests are on their way
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert proc.wait(15) == 0
        assert time.monotonic() - start < 10
        assert sorted(answers, key=str) == sorted(
            [("rest", 200)] * 2 + [("grpc", {"width": 800, "height": 450})], key=str
        ), answers
    finally:
        if proc.poll() is None:
            proc.kill()


def alive(family) -> list[str]:
    return [p.name() for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_stops_and_restarts_on_the_same_ports_after_sigterm_and_after_sigkill(tmp_path):
    """A worker's life on RunPod or Kubernetes: stopped idle, everything is gone within seconds (about 3 s here,
    docs/deployment.md); killed hard (SIGKILL of the entrypoint, which cannot clean up), no tritonserver, model
    process or gateway outlives it; either way the next start on the same ports serves."""
    ports = free_ports(4)
    api = ports[3]
    proc, _api, log = launch(tmp_path, ports)
    try:
        wait_http(f"http://127.0.0.1:{api}/health", proc, log)
        family = descendants(proc)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        while alive(family) and time.monotonic() - start < 10:
            time.sleep(0.1)
        idle_stop = time.monotonic() - start
        assert not alive(family) and idle_stop < 6, f"{idle_stop:.1f} s, left: {alive(family)}"
        assert "had not unloaded" not in log.read_text()  # every model unloaded by itself

        proc, _api, log = launch(tmp_path, ports)  # the same ports at once
        wait_http(f"http://127.0.0.1:{api}/health", proc, log)
        family = descendants(proc)
        assert {"tritonserver", "triton_python_backend_stub"} <= {p.name() for p in family}
        start = time.monotonic()
        proc.kill()
        proc.wait(5)
        while alive(family) and time.monotonic() - start < 15:
            time.sleep(0.1)
        assert not alive(family), f"left behind after SIGKILL: {alive(family)}"
        gone_after = time.monotonic() - start
        assert gone_after < 10, f"{gone_after:.1f} s"

        proc, _api, log = launch(tmp_path, ports)
        wait_http(f"http://127.0.0.1:{api}/health", proc, log)
        r = requests.post(
            f"http://127.0.0.1:{api}/detect", json={"image": PIER, "confidence_threshold": 1.0}, timeout=60
        )
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


STUCK_MODEL = """
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = pb_utils.Tensor("OUT", np.zeros(1, np.float32))
        return [pb_utils.InferenceResponse([out]) for _ in requests]

    def finalize(self):
        time.sleep(120)  # a model process that does not let go (e.g. a GPU library's teardown that hangs)
"""


def test_a_model_that_does_not_unload_does_not_hold_the_stop_for_the_whole_grace_period(tmp_path):
    """Triton waits its whole exit timeout for a model that does not unload; the launcher stops it UNLOAD_GRACE_S
    after the last request is done and says so."""
    import dataclasses

    from anomaly.config import load_settings
    from anomaly.serving.triton_server import UNLOAD_GRACE_S, TritonServer

    repo = tmp_path / "repo"
    (repo / "stuck" / "1").mkdir(parents=True)
    (repo / "stuck" / "1" / "model.py").write_text(STUCK_MODEL)
    (repo / "stuck" / "config.pbtxt").write_text(
        'backend: "python"\nmax_batch_size: 0\noutput [{ name: "OUT", data_type: TYPE_FP32, dims: [1] }]\n'
        "instance_group [{ kind: KIND_CPU, count: 1 }]\n"
    )
    http, grpc, metrics = free_ports(3)
    settings = dataclasses.replace(
        load_settings(), triton_http_port=http, triton_grpc_port=grpc, triton_metrics_port=metrics,
        shutdown_grace_s=60, model_repository=repo,
    )  # fmt: skip
    server = TritonServer(settings, log_path=tmp_path / "triton.log")
    server.start(ready_timeout=120)
    family = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
    start = time.monotonic()
    server.stop(timeout=60)
    took = time.monotonic() - start
    assert UNLOAD_GRACE_S <= took < UNLOAD_GRACE_S + 5, f"{took:.1f} s"
    assert not alive(family)
    assert "Found 1 live models" in (tmp_path / "triton.log").read_text()  # Triton's own countdown had begun
