"""Where one frame's time goes at concurrency 1, from Triton's own trace: when each step of the ensemble took the
frame and when it let it go, measured from the client's send, beside what the client saw. `make bench-gpu` prints
it; it shows the path of one frame (what runs in parallel, what waits) and the time outside the steps (the client's
send and receive, the hops between processes), which the per-step statistics cannot.

Triton writes traces only to a file named at its start (TRITON_TRACE_FILE: the launcher passes it on), and tracing
stays off until a client turns it on through the trace API, as done here for the frames sent and then turned off
again. Each frame's traces go to a file of their own (`<file>.<n>`, log_frequency 1): Triton completes the main
file only when it stops. Triton's timestamps and this process's time.monotonic_ns read the same clock
(CLOCK_MONOTONIC), so both sides line up on one machine.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ENSEMBLE = "anomaly_pipeline"


def read_traces(paths: list[Path]) -> dict[tuple[str, int], dict]:
    """Triton's trace files -> {(file, trace id): {"model": name, "parent": (file, id) or None, "ns": {timestamp
    name: ns}}} (ids are unique within a file). A file still being written is left out."""
    traces: dict[tuple[str, int], dict] = defaultdict(lambda: {"model": "", "parent": None, "ns": {}})
    for path in paths:
        try:
            entries = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for entry in entries:
            trace = traces[(path.name, entry["id"])]
            trace["model"] = entry.get("model_name", trace["model"])
            if "parent_id" in entry:
                trace["parent"] = (path.name, entry["parent_id"])
            for stamp in entry.get("timestamps", []):
                trace["ns"][stamp["name"]] = stamp["ns"]
    return dict(traces)


def frame_rows(
    traces: dict[tuple[str, int], dict], steps: list[dict], threaded: set[str], sent_ns: int, answered_ns: int
) -> dict[str, tuple[float, float]] | None:
    """One frame: {what: (from ms, to ms)} after the client's send, for the ensemble request that Triton began
    between the client's send and its answer (None if there is none). `steps` are the ensemble's (its config's
    `ensemble_scheduling.step`, with input_map and output_map); `threaded` the models answering from a batch thread.

    from: Triton hands the step the frame. to: the step answered: when its execute returned (Triton's COMPUTE_END;
    the request itself may be released later) or the first step waiting for it began, whichever came first. A model
    answering from its batch thread (OVERLAP_BATCHES) returns from execute at the intake: its answer is when the
    first step waiting for it began, an upper bound where that step also waited for another. A step called twice
    (SAM with early embedding: the image alone, then the boxes) has its first call named `<step>, first call`."""
    ours = [
        (tid, t)
        for tid, t in traces.items()
        if t["model"] == ENSEMBLE and t["parent"] is None and sent_ns <= t["ns"].get("REQUEST_START", -1) <= answered_ns
    ]
    if len(ours) != 1:
        return None
    top_id, top = ours[0]
    spans = ("REQUEST_START", "COMPUTE_END")
    children = sorted(
        (t for t in traces.values() if t["parent"] == top_id and all(k in t["ns"] for k in spans)),
        key=lambda t: t["ns"]["REQUEST_START"],
    )
    # each call is the first step of its model not yet matched: the ensemble calls its steps in their order
    matched: dict[int, dict] = {}
    for child in children:
        index = next((i for i, st in enumerate(steps) if st["model_name"] == child["model"] and i not in matched), None)
        if index is not None:
            matched[index] = child
    if len(matched) != len(steps):
        return None  # a step not traced: a failed frame

    def ms(ns: int) -> float:
        return (ns - sent_ns) / 1e6

    rows = {"client -> Triton": (0.0, ms(top["ns"]["REQUEST_START"]))}
    calls = defaultdict(int)
    for step in steps:
        calls[step["model_name"]] += 1
    for i, step in enumerate(steps):
        outputs = set(step.get("output_map", {}).values())
        waiting = [matched[j]["ns"]["REQUEST_START"] for j, later in enumerate(steps)
                   if outputs & set(later.get("input_map", {}).values())]  # fmt: skip
        name = step["model_name"]
        returned = matched[i]["ns"]["COMPUTE_END"]
        end = min(waiting, default=returned) if name in threaded else min([returned, *waiting])
        first = calls[name] > 1 and not any(s["model_name"] == name for s in steps[:i])
        rows[f"{name}, first call" if first else name] = (ms(matched[i]["ns"]["REQUEST_START"]), ms(end))
    rows["Triton -> client"] = (ms(top["ns"]["REQUEST_END"]), ms(answered_ns))
    return rows


def frame_timeline(url: str, data: bytes, threshold: float, frames: int, threaded: set[str]) -> dict:
    """`frames` frames sent one at a time over gRPC with Triton's tracing on: the median of each row's from/to
    over the frames, and the client's whole time (`threaded`: frame_rows). A server without a trace file gets a
    note instead."""
    import tritonclient.grpc as grpcclient

    from client import AnomalyClient

    control = grpcclient.InferenceServerClient(url)
    try:
        trace_file = control.get_trace_settings(as_json=True)["settings"].get("trace_file", {}).get("value", [""])[0]
        if not trace_file:
            return {"note": "this tritonserver was started without a trace file (TRITON_TRACE_FILE)"}
        steps = control.get_model_config(ENSEMBLE, as_json=True)["config"]["ensemble_scheduling"]["step"]
        marks, server_ms = [], []
        on = {"trace_level": ["TIMESTAMPS"], "trace_rate": "1", "log_frequency": "1"}  # every request, a file each
        control.update_trace_settings(settings=on)
        try:
            with AnomalyClient(url, "grpc") as client:
                for _ in range(frames):
                    sent = time.monotonic_ns()
                    response = client.detect(data, confidence_threshold=threshold)
                    marks.append((sent, time.monotonic_ns()))
                    server_ms.append(response["processing_time_ms"])
        finally:
            control.update_trace_settings(settings={"trace_level": ["OFF"], "log_frequency": "0"})
    finally:
        control.close()
    # Triton writes a frame's traces once all of its requests are released, which may be after the answer
    deadline, per_frame = time.monotonic() + 30, []
    while len(per_frame) < len(marks) and time.monotonic() < deadline:
        time.sleep(0.2)
        traces = read_traces(sorted(Path(trace_file).parent.glob(Path(trace_file).name + ".*")))
        per_frame = [rows for sent, answered in marks if (rows := frame_rows(traces, steps, threaded, sent, answered))]
    if len(per_frame) < len(marks):
        return {"note": f"{len(marks) - len(per_frame)} of {len(marks)} frames not found traced in {trace_file}.*"}
    labels = [label for label in per_frame[0] if all(label in rows for rows in per_frame)]

    def median(label: str, i: int) -> float:
        return round(float(np.median([rows[label][i] for rows in per_frame])), 2)

    return {
        "frames": len(per_frame),
        "rows": [{"what": label, "from_ms": median(label, 0), "to_ms": median(label, 1)} for label in labels],
        "client_ms": round(float(np.median([(b - a) / 1e6 for a, b in marks])), 2),
        "server_ms": round(float(np.median(server_ms)), 2),  # the responses' processing_time_ms
    }


def print_timeline(timeline: dict) -> None:
    if "rows" not in timeline:
        print(f"\none frame at concurrency 1: {timeline.get('note', 'not measured')}")
        return
    print(f"\none frame at concurrency 1 (Triton's trace, median of {timeline['frames']}; ms after the client's send)")
    print(f"{'what':<34}{'from':>10}{'to':>10}{'took':>10}")
    for row in timeline["rows"]:
        took = round(row["to_ms"] - row["from_ms"], 2)
        print(f"{row['what']:<34}{row['from_ms']:>10}{row['to_ms']:>10}{took:>10}")
    print(f"{'the client had the answer':<34}{'':>10}{timeline['client_ms']:>10}")
    print(f"{'processing_time_ms (responses)':<34}{'':>10}{'':>10}{timeline['server_ms']:>10}")
