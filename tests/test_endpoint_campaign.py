"""Campaigns through a RunPod serverless endpoint (`anomaly detect ... --endpoint`), against the handler under the
runpod SDK's own local API server (`handler.py --rp_serve_api`: /run, /status, the real handler, the session's real
Triton) and the gateway as a load-balancing endpoint.

Between the campaign and the local API server sits a small HTTP relay written here (`Relay`): it counts the jobs
the server received, and where a test says so, answers for the platform with what RunPod's cloud does and a local
server cannot (a 503, a 429, a job a worker failed, a job still queued). It is the only thing not real here."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import pytest
import requests

from client.campaign import run_campaign
from client.cli import main as cli
from client.endpoint import JOBS, EndpointSender, FrameFailed, is_input_error
from tests.conftest import REPO, SAMPLES, start_gateway

FRAMES = ("pier.png", "hub.jpg", "wall.jpg")


class Relay:
    """Forwards every request to `target`, counting the jobs submitted (/run) that reached it. `faults` are answers
    given instead of forwarding, taken in order by the first requests whose path starts with their prefix;
    while `hold` is set, /status answers IN_QUEUE without asking the server (a job nobody has picked up)."""

    def __init__(self, target: str):
        self.target = target
        self.runs: list[str] = []  # frame_ids of the jobs that reached the server
        self.refused_runs = 0
        self.faults: list[tuple[str, int, dict]] = []  # (path prefix, HTTP status, JSON body)
        self.hold = threading.Event()
        self.lock = threading.Lock()
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.answer(None)

            def do_POST(self):
                self.answer(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

            def answer(self, body: bytes | None):
                status, payload = relay.decide(self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def decide(self, path: str, body: bytes | None) -> tuple[int, dict]:
        with self.lock:
            fault = next((f for f in self.faults if path.startswith(f[0])), None)
            if fault:
                self.faults.remove(fault)
                self.refused_runs += path.startswith("/run")
                return fault[1], fault[2]
        if path.startswith("/status") and self.hold.is_set():
            return 200, {"id": path.rsplit("/", 1)[1], "status": "IN_QUEUE"}
        if body is None:
            response = requests.get(self.target + path, timeout=300)
        else:
            response = requests.post(self.target + path, data=body, timeout=300,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
            if path.startswith("/run") and response.ok:
                with self.lock:
                    self.runs.append(json.loads(body)["input"]["frame_id"])
        return response.status_code, response.json()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def relay(rp_api):
    relay = Relay(rp_api)
    yield relay
    relay.close()


@pytest.fixture(scope="module")
def flight(tmp_path_factory):
    """Three small photos and a file that is not one."""
    folder = tmp_path_factory.mktemp("endpoint_flight")
    shutil.copy(SAMPLES / "pier_spalling.png", folder / "pier.png")
    shutil.copy(SAMPLES / "hub_test.jpg", folder / "hub.jpg")
    wall = cv2.imread(str(SAMPLES / "tunnel_wall_exif.jpg"))
    cv2.imwrite(str(folder / "wall.jpg"), cv2.resize(wall, (300, 400)))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    return folder


def findings(out: Path) -> dict:
    """frame_id -> what was found: every defect and structure, all but the ids each response draws anew."""
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {r["frame_id"]: without_ids((r["anomalies"], r["structures"], r["image_size"])) for r in records}


def without_ids(value):
    if isinstance(value, dict):
        return {k: without_ids(v) for k, v in value.items() if k not in ("anomaly_id", "structure_id")}
    if isinstance(value, list | tuple):
        return [without_ids(v) for v in value]
    return value


def errors(out: Path) -> dict:
    if not (out / "errors.jsonl").is_file():
        return {}
    return {e["frame_id"]: e["error"] for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def by_url(triton, flight, tmp_path_factory):
    """The folder as a campaign against Triton directly: what every endpoint run must match."""
    out = tmp_path_factory.mktemp("by_url")
    assert cli(["detect", str(flight), "--out", str(out), "--url", triton.grpc_url, "--threshold", "0.3"]) == 2
    assert sorted(findings(out)) == sorted(FRAMES) and list(errors(out)) == ["broken.jpg"]
    return out


def test_endpoint_campaign_matches_triton_and_refuses_the_broken_file_once(by_url, flight, relay, tmp_path, capsys):
    out = tmp_path / "by_endpoint"
    args = ["detect", str(flight), "--out", str(out), "--endpoint", relay.url, "--threshold", "0.3",
            "--price-per-second", "0.00031"]  # fmt: skip
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert (out / "results.jsonl").is_file(), err
    assert findings(out) == findings(by_url)  # the same defects, boxes, masks and geometry per frame
    assert list(errors(out)) == ["broken.jpg"] and errors(out)["broken.jpg"].startswith("image:")
    assert sorted(relay.runs) == sorted([*FRAMES, "broken.jpg"]), err  # one job each: the broken file was not retried
    assert "frames/s" in err and "4 jobs submitted" in err and "0 retries" in err
    usage = json.loads((out / "endpoint_usage.json").read_text())
    assert usage["jobs_submitted"] == 4 and usage["frames"] == 3
    assert usage["worker_execution_s"] is None  # the local API server reports no execution times; said, not made up
    assert (out / "coco.json").is_file() and (out / "defects.csv").is_file()
    assert len(list((out / "annotated").glob("*.jpg"))) == 3
    ledger = [json.loads(line) for line in (out / JOBS).read_text().splitlines()]
    assert sorted(e["frame_id"] for e in ledger) == sorted([*FRAMES, "broken.jpg"])


def test_platform_and_worker_failures_are_retried(by_url, flight, relay, tmp_path):
    relay.faults = [
        ("/run", 503, {"error": "Service Unavailable"}),
        ("/run", 429, {"error": "Too Many Requests"}),
        ("/status", 200, {"status": "FAILED", "error": "worker exited with CUDA error: an illegal memory access"}),
    ]
    out = tmp_path / "retried"
    sender = EndpointSender(relay.url, out, api_key=None, options={"confidence_threshold": 0.3}, backoff_s=0.05)
    counts = run_campaign([str(flight / name) for name in FRAMES], out, endpoint=sender, in_flight=2)
    assert counts["failed"] == 0 and counts["sent"] == 3
    assert relay.faults == [] and relay.refused_runs == 2
    assert sender.usage.retries == 3  # two refused submissions, one job the worker failed
    assert len(relay.runs) == 4 and sorted(set(relay.runs)) == sorted(FRAMES)  # the failed job's frame went again
    assert findings(out) == {k: v for k, v in findings(by_url).items() if k in FRAMES}


def test_a_frame_failing_every_attempt_is_reported_and_the_run_goes_on(flight, relay, tmp_path):
    relay.faults = [("/run", 500, {"error": "Internal Server Error"})] * 2
    out = tmp_path / "gave_up"
    sender = EndpointSender(relay.url, out, api_key=None, options={}, attempts=2, backoff_s=0.01)
    counts = run_campaign([str(flight / "hub.jpg"), str(flight / "pier.png")], out, endpoint=sender, in_flight=1)
    assert counts["failed"] == 1 and counts["sent"] == 1
    assert errors(out)["hub.jpg"].startswith("failed 2 times on the endpoint; last: HTTP 500")


def test_an_interrupted_campaign_collects_its_jobs_instead_of_submitting_again(by_url, flight, relay, tmp_path):
    out = tmp_path / "interrupted"
    relay.hold.set()  # the jobs are taken in, nobody runs them yet
    command = [sys.executable, "-m", "client.cli", "detect", str(flight), "--out", str(out), "--endpoint", relay.url,
               "--threshold", "0.3", "--in-flight", "4"]  # fmt: skip
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60

    def recorded() -> int:
        return len((out / JOBS).read_text().splitlines()) if (out / JOBS).is_file() else 0

    # killed once the campaign holds the four job ids (a job accepted in the instant before a stop, whose id has
    # not reached the campaign yet, cannot be collected: it would be submitted again, docs/campaigns.md)
    while time.monotonic() < deadline and recorded() < 4:
        time.sleep(0.05)
    assert recorded() == 4, first.stderr.read().decode()[-2000:] if first.poll() is not None else relay.runs
    os.kill(first.pid, signal.SIGKILL)  # stopped hard, four jobs in flight
    first.wait(10)
    assert not (out / "results.jsonl").exists() and len(relay.runs) == 4

    relay.hold.clear()
    assert cli(command[3:]) == 2
    assert len(relay.runs) == 4  # no frame submitted twice: the second run collected the first one's jobs
    assert findings(out) == findings(by_url) and list(errors(out)) == ["broken.jpg"]
    assert json.loads((out / "endpoint_usage.json").read_text())["jobs_collected_from_earlier_run"] == 4


def test_load_balancing_endpoint_through_the_gateway(by_url, flight, triton, tmp_path):
    gateway, url = start_gateway(triton.grpc_url, tmp_path / "gateway.log", API_KEY="lb-secret")
    try:
        out = tmp_path / "lb"
        args = ["detect", str(flight), "--out", str(out), "--endpoint", url, "--load-balancing", "--threshold", "0.3"]
        assert cli(args) == 1  # RUNPOD_API_KEY unset: the gateway refuses, and the campaign stops saying why
        os.environ["RUNPOD_API_KEY"] = "lb-secret"
        try:
            assert cli(args) == 2
        finally:
            del os.environ["RUNPOD_API_KEY"]
        assert findings(out) == findings(by_url)
        assert errors(out)["broken.jpg"].startswith("image:")
    finally:
        gateway.terminate()
        gateway.wait(20)


def test_a_file_over_the_payload_limit_is_refused_before_sending(tmp_path):
    photo = tmp_path / "big.jpg"
    photo.write_bytes(b"\xff\xd8" + os.urandom(300_000))
    # nothing listens on this URL: the frame never leaves the machine
    sender = EndpointSender("http://127.0.0.1:9", tmp_path / "out", api_key=None, options={}, payload_limit=200_000)
    (tmp_path / "out").mkdir()
    with pytest.raises(FrameFailed, match=r"is 0.3 MB; as base64 in a request it is 0.4 MB, over the endpoint's 0 MB"):
        sender.send("big.jpg", photo.read_bytes())
    assert sender.usage.jobs_submitted == 0


def test_an_endpoint_id_needs_the_api_key(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    (tmp_path / "a.jpg").write_bytes(b"x")
    assert cli(["detect", str(tmp_path / "a.jpg"), "--out", str(tmp_path / "out"), "--endpoint", "abc123"]) == 1
    assert "needs RUNPOD_API_KEY" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("message", "own_fault"),
    [
        ("image: is not a decodable image", True),
        ("images[1]: image: is not valid base64", True),
        ("confidence_threshold: must be in [0.0, 1.0], got 2", True),
        ("internal error 3f2a (the server log has the details)", False),
        ("worker exited with CUDA error: an illegal memory access", False),
        ('{"error_type": "RuntimeError", "error_message": "boom"}', False),
    ],
)
def test_which_job_errors_are_the_frames_own(message, own_fault):
    assert is_input_error(message) is own_fault
