"""A campaign's frames through a RunPod serverless endpoint instead of one Triton server (`anomaly detect PATH...
--out DIR --endpoint ID_OR_URL`, docs/campaigns.md): the endpoint's workers scale out, the campaign stays the same.

Queue endpoint: each frame is an asynchronous job (`/run`, then `/status/JOB` until it ends), sent with the runpod
SDK's endpoint client. Load-balancing endpoint (RUNPOD_SERVERLESS=lb): each frame is one POST to its `/detect`.
Either way a frame is retried with backoff when the platform or a worker fails it (HTTP 408, 429 and 5xx, a lost
connection, a job that fails for a reason other than its input, times out or is cancelled), and is not when the
frame itself is refused (an undecodable photo: the answer names a field of the request), so it goes to errors.jsonl.

Every job id goes to DIR/jobs.jsonl the moment it is submitted: a campaign stopped and started again collects the
jobs it had in flight instead of submitting (and paying for) those frames twice.
"""

from __future__ import annotations

import base64
import json
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from anomaly.options import OPTION_NAMES

JOBS = "jobs.jsonl"
# RunPod refuses a /run body over 10 MB (docs.runpod.io, "Endpoint operations"); base64 grows a file by 4/3.
RUN_PAYLOAD_LIMIT = 10_000_000
RETRIED_HTTP = {408, 429, 500, 502, 503, 504}
FINAL_FAILURES = {"FAILED", "TIMED_OUT", "CANCELLED"}
# A job error that names one of these fields is the frame's own fault (docs/api.md, "Errors"): not retried.
REQUEST_FIELDS = ("input", "image", "images", *OPTION_NAMES)


class FrameFailed(Exception):
    """A frame the endpoint refused for its own reason, or that failed every attempt."""


class CampaignStopped(Exception):
    """A failure no frame can get past (no API key, a key refused): the campaign stops and says why."""


def is_input_error(message: str) -> bool:
    """Whether a job's error is about the request itself (`<field>: <what>`), not the worker or the platform."""
    head = message.split(":", 1)[0].strip()
    return ":" in message and (head in REQUEST_FIELDS or head.split("[", 1)[0] in REQUEST_FIELDS)


@dataclass
class Usage:
    """What the endpoint reported: worker execution seconds and queue seconds of every job that ran, retries."""

    execution_s: float = 0.0
    delay_s: float = 0.0
    jobs_reported: int = 0
    jobs_submitted: int = 0
    jobs_collected: int = 0  # jobs of an earlier run collected instead of submitted again
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_status(self, status: dict) -> None:
        with self.lock:
            if "executionTime" in status:
                self.execution_s += float(status["executionTime"]) / 1000
                self.jobs_reported += 1
            self.delay_s += float(status.get("delayTime") or 0) / 1000

    def count(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)

    def summary(self, price_per_second: float | None) -> dict:
        cost = round(self.execution_s * price_per_second, 4) if price_per_second is not None else None
        return {
            "jobs_submitted": self.jobs_submitted,
            "jobs_collected_from_earlier_run": self.jobs_collected,
            "retries": self.retries,
            "worker_execution_s": round(self.execution_s, 3) if self.jobs_reported else None,
            "queue_delay_s": round(self.delay_s, 3) if self.jobs_reported else None,
            "cost": cost if self.jobs_reported else None,
        }


class JobLedger:
    """DIR/jobs.jsonl: frame_id -> its latest job id, appended to as soon as a job is submitted."""

    def __init__(self, out: Path):
        self.path = out / JOBS
        self.lock = threading.Lock()
        self.latest: dict[str, str] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.latest[entry["frame_id"]] = entry["job_id"]
                except (ValueError, KeyError, TypeError):
                    continue  # a half-written last line

    def record(self, frame_id: str, job_id: str) -> None:
        with self.lock, open(self.path, "a") as ledger:
            ledger.write(json.dumps({"frame_id": frame_id, "job_id": job_id, "submitted": time.time()}) + "\n")
            ledger.flush()
        self.latest[frame_id] = job_id


def endpoint_base(endpoint: str) -> str:
    """An endpoint id -> its URL on RunPod's cloud; a URL (the endpoint's own base, where /run lives) as it is."""
    if "://" in endpoint:
        return endpoint.rstrip("/")
    import runpod

    return f"{runpod.endpoint_url_base}/{endpoint}"


class EndpointSender:
    """send(frame_id, data) -> the frame's response, through a RunPod endpoint, with retries. One per campaign,
    shared by its threads."""

    def __init__(self, endpoint: str, out: Path, *, api_key: str | None, options: dict, load_balancing: bool = False,
                 attempts: int = 4, job_timeout_s: float = 600.0, backoff_s: float = 1.0,
                 payload_limit: int = RUN_PAYLOAD_LIMIT):  # fmt: skip
        if api_key is None and "://" not in endpoint:
            raise CampaignStopped("--endpoint with an endpoint id needs RUNPOD_API_KEY (RunPod's API key)")
        self.base = endpoint_base(endpoint)
        self.load_balancing = load_balancing
        self.options = options
        self.attempts, self.job_timeout_s, self.backoff_s = attempts, job_timeout_s, backoff_s
        self.payload_limit = payload_limit
        self.ledger = JobLedger(out)
        self.usage = Usage()
        self.api_key = api_key
        self.client = self._runpod_client(api_key) if not load_balancing else None
        self.status_method = "GET"  # RunPod's cloud; POST for the SDK's local API server, found on its first 405
        self.session = requests.Session()

    def _runpod_client(self, api_key: str | None):
        from runpod.endpoint.runner import RunPodClient

        client = RunPodClient(api_key=api_key or "none")  # a local endpoint asks for no key, the SDK for one
        client.endpoint_url_base = self.base  # the SDK joins it with "run" and "status/JOB"
        return client

    def payload(self, frame_id: str, data: bytes) -> dict:
        body = {"image": base64.b64encode(data).decode(), "frame_id": frame_id, "include_masks": True, **self.options}
        size = len(json.dumps({"input": body}))
        if size > self.payload_limit:
            raise FrameFailed(
                f"is {len(data) / 1e6:.1f} MB; as base64 in a request it is {size / 1e6:.1f} MB, over the endpoint's "
                f"{self.payload_limit / 1e6:.0f} MB limit for a request (re-encode it smaller, e.g. JPEG quality 90)"
            )
        return body

    def send(self, frame_id: str, data: bytes) -> dict:
        body = self.payload(frame_id, data)
        last = ""
        for attempt in range(self.attempts):
            if attempt:
                self.usage.count("retries")
                time.sleep(min(30.0, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2))
            try:
                return self._detect(body) if self.load_balancing else self._job(frame_id, body, attempt)
            except _Transient as exc:
                last = str(exc)
                print(f"\n{frame_id}: attempt {attempt + 1} of {self.attempts} failed ({last})", file=sys.stderr)
        raise FrameFailed(f"failed {self.attempts} times on the endpoint; last: {last}")

    # -- load-balancing endpoint: the gateway's /detect ------------------------------------------------------------
    def _detect(self, body: dict) -> dict:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            response = self.session.post(f"{self.base}/detect", json=body, headers=headers, timeout=self.job_timeout_s)
        except requests.RequestException as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        if response.status_code == 200:
            return response.json()
        self._check_http(response.status_code, response.text)
        raise FrameFailed(_error_text(response))

    # -- queue endpoint: /run, then /status/JOB -------------------------------------------------------------------
    def _job(self, frame_id: str, body: dict, attempt: int) -> dict:
        job_id = self.ledger.latest.get(frame_id) if attempt == 0 else None
        if job_id:  # submitted by an earlier run that stopped before collecting it
            self.usage.count("jobs_collected")
        else:
            job_id = self._submit(frame_id, body)
        status = self._wait(job_id)
        state = status.get("status")
        if state == "COMPLETED":
            return status.get("output") or {}
        error = status.get("error") or ""
        error = error if isinstance(error, str) else json.dumps(error)
        if state == "FAILED" and is_input_error(error):
            raise FrameFailed(error)
        raise _Transient(f"job {job_id} {state}{': ' + error if error else ''}")

    def _submit(self, frame_id: str, body: dict) -> str:
        try:
            job_id = self.client.post("run", {"input": body}, timeout=60)["id"]
        except requests.HTTPError as exc:
            self._check_http(exc.response.status_code, exc.response.text)
            raise FrameFailed(_error_text(exc.response)) from None
        except (requests.RequestException, KeyError, ValueError) as exc:
            raise _Transient(f"/run: {type(exc).__name__}: {exc}") from None
        except RuntimeError as exc:  # the SDK's words for a 401
            raise CampaignStopped(f"{self.base}: {exc}") from None
        self.ledger.record(frame_id, job_id)
        self.usage.count("jobs_submitted")
        return job_id

    def _wait(self, job_id: str) -> dict:
        """The job's status once it has ended; cancelled and retried past JOB_TIMEOUT (a stuck worker)."""
        deadline = time.monotonic() + self.job_timeout_s
        pause = 0.25
        while True:
            try:
                # a local test server runs the job inside this call: the read timeout is the job's
                timeout, method = max(1.0, deadline - time.monotonic()), self.status_method
                status = self.client._request(method, f"status/{job_id}", {}, timeout)
            except requests.HTTPError as exc:  # 404: the platform no longer knows the job (results expire)
                if exc.response.status_code == 405 and method == "GET":
                    self.status_method = "POST"  # the SDK's local API server takes /status as a POST only
                    continue
                self._check_auth(exc.response.status_code)
                raise _Transient(f"/status/{job_id}: HTTP {exc.response.status_code}") from None
            except (requests.RequestException, ValueError) as exc:
                status = {"status": "UNKNOWN", "error": f"{type(exc).__name__}: {exc}"}
            except RuntimeError as exc:
                raise CampaignStopped(f"{self.base}: {exc}") from None
            if status.get("status") == "COMPLETED" or status.get("status") in FINAL_FAILURES:
                self.usage.add_status(status)
                return status
            if time.monotonic() > deadline:
                self._cancel(job_id)
                raise _Transient(f"job {job_id} still {status.get('status')} after {self.job_timeout_s:.0f} s")
            time.sleep(pause)
            pause = min(pause * 2, 2.0)

    def _cancel(self, job_id: str) -> None:
        try:
            self.client.post(f"cancel/{job_id}", {}, timeout=10)
        except (requests.RequestException, RuntimeError):
            pass  # the job may be gone already; it is resubmitted either way

    def _check_auth(self, code: int) -> None:
        if code in (401, 403):
            raise CampaignStopped(f"{self.base}: HTTP {code}, the API key was refused (RUNPOD_API_KEY)")

    def _check_http(self, code: int, text: str) -> None:
        """Raise for what is not the frame's fault: a refused key or a missing endpoint (the campaign stops), or
        an answer worth another attempt. What is left is the frame's own refusal."""
        self._check_auth(code)
        if code in RETRIED_HTTP:
            raise _Transient(f"HTTP {code}: {text[:200]}")
        if code == 404:
            raise CampaignStopped(f"{self.base}: HTTP 404, no such endpoint (check the id or URL)")


class _Transient(Exception):
    """A failure worth another attempt: the platform, the network or a worker, not the frame."""


def _error_text(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    error = body.get("error") or body.get("detail") if isinstance(body, dict) else body
    return error if isinstance(error, str) else f"HTTP {response.status_code}: {json.dumps(error)[:300]}"
