"""The product's other users: perf_analyzer (from the tritonclient 2.51.0 wheel) and the `anomaly` CLI."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from anomaly.geometry import measure
from anomaly.synthetic import segment, thick_segments
from bench.perf import FRAMES, INPUT_DATA, run_perf_analyzer
from tests.conftest import REPO, SAMPLES


def test_shipped_perf_input_is_the_sample_jpegs():
    data = json.loads(INPUT_DATA.read_text())["data"]
    assert len(data) == len(FRAMES)
    for entry, name in zip(data, FRAMES):
        raw = base64.b64decode(entry["IMAGE"]["b64"])
        (length,) = struct.unpack("<I", raw[:4])
        assert raw[4:] == (SAMPLES / name).read_bytes() and length == len(raw) - 4
        assert raw[4:6] == b"\xff\xd8"  # JPEG


def pipeline_inference_count(triton) -> int:
    """How many requests Triton itself has counted for the ensemble."""
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(triton.http_url) as c:
        return int(c.get_inference_statistics("anomaly_pipeline")["model_stats"][0]["inference_count"])


def test_perf_analyzer_drives_the_pipeline(triton, tmp_path):
    for protocol, url in (("grpc", triton.grpc_url), ("http", triton.http_url)):
        before = pipeline_inference_count(triton)
        (row,) = run_perf_analyzer(url, protocol, tmp_path / f"{protocol}.csv", concurrency=1, request_count=3)
        assert pipeline_inference_count(triton) - before == 3  # every request it reports reached the ensemble
        assert row["Concurrency"] == "1" and float(row["Inferences/Second"]) > 0
        assert int(row["p50 latency"]) > 0


def cli(*args, check=True):
    return subprocess.run(
        [sys.executable, "-m", "client.cli", *args], capture_output=True, text=True, cwd=REPO, check=check
    )


def test_cli_measure_uses_the_server_geometry(tmp_path):
    line = thick_segments([segment(300, 30)], 6)
    Image.fromarray(line.astype(np.uint8) * 255).save(tmp_path / "crack.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "empty.png")
    out = cli("measure", str(tmp_path / "crack.png"), str(tmp_path / "empty.png"), "--mm-per-pixel", "0.5")
    first, second = (json.loads(x) for x in out.stdout.splitlines())
    expected = measure(line)
    assert {k: first[k] for k in expected} == expected
    assert first["length_mm"] == round(expected["length_pixels"] * 0.5, 3)
    assert abs(first["length_pixels"] - 300) < 6 and abs(first["orientation_degrees"] - 30) < 1
    assert second["area_pixels"] == 0 and second["file"].endswith("empty.png")
    bad = cli("measure", str(REPO / "README.md"), check=False)
    assert bad.returncode == 1 and "not a readable mask image" in bad.stderr


def test_cli_detect_prints_json_and_annotates(triton, tmp_path):
    out = cli(
        "detect", str(SAMPLES / "pier_spalling.png"), str(SAMPLES / "tunnel_wall_exif.jpg"),
        "--url", triton.http_url, "--protocol", "http", "--threshold", "0.25", "--frame-ids",
        "--annotate-dir", str(tmp_path),
    )  # fmt: skip
    pier, wall = (json.loads(x) for x in out.stdout.splitlines())
    assert pier["frame_id"] == "pier_spalling" and pier["image_size"] == {"width": 800, "height": 450}
    assert wall["image_size"] == {"width": 600, "height": 800}
    assert all("mask" not in a for a in pier["anomalies"])  # masks were fetched for drawing only
    annotated = np.asarray(Image.open(tmp_path / "pier_spalling_annotated.jpg"))
    original = np.asarray(Image.open(SAMPLES / "pier_spalling.png").convert("RGB"))
    assert annotated.shape == original.shape
    assert np.abs(annotated.astype(int) - original).mean() > 1  # something was drawn


def test_cli_detect_reports_bad_files_and_goes_on(triton, tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"not really a jpeg")
    out = cli(
        "detect", str(tmp_path / "junk.jpg"), str(SAMPLES / "pier_spalling.png"), "--url", triton.grpc_url, check=False
    )
    assert out.returncode == 1
    assert "junk.jpg: image: is not a decodable image" in out.stderr
    assert json.loads(out.stdout)["image_size"]["width"] == 800


def test_bench_gpu_runs_on_a_cpu_with_small_settings(triton, tmp_path):
    """`make bench-gpu` on this CPU-only machine: one table from one run, every part of it filled."""
    from anomaly.serving.in_service import read_record
    from bench import gpu

    out = tmp_path / "gpu.json"
    args = ["--concurrency", "1", "2", "--requests", "2", "--repeats", "1", "--defects", "1", "--out", str(out),
            "--also", "OVERLAP_BATCHES=off"]  # fmt: skip
    records = {step: read_record(triton.model_repository, step) for step in ("detector", "segmenter")}
    assert gpu.main(args) == 0
    # the --also server ran on a mirror of the repository: the session server's records (/info) are untouched
    assert {step: read_record(triton.model_repository, step) for step in records} == records
    result = json.loads(out.read_text())
    assert result["complete"] is True  # written after each part, `complete` false until the end
    assert result["gpu"] is False and "1 defects segmented" in result["workload"]
    assert [row["concurrency"] for row in result["ensemble"]] == [1, 2]
    for row in result["ensemble"]:
        assert row["requests"] == 2 and not row["errors"] and 0 < row["p50_ms"] <= row["p90_ms"]
        assert row["frames_per_s"] > 0
        assert any(w.startswith("UNTRAINED WEIGHTS") for w in row["warnings"])  # what the responses said
    # the session's server overlaps batches (OVERLAP_BATCHES=on, conftest): the GPU steps' threads have rows too
    assert set(result["steps"]) == {
        "preprocess", "detector", "select_detections", "segmenter", "geometry", "result", "anomaly_pipeline",
        "detector, batch thread", "segmenter, batch thread",
    }  # fmt: skip
    # the session's server embeds early too (EARLY_EMBEDDING=on, conftest): SAM is idle for each frame's early
    # call at c=1; at c=2 a frame's early call is kept or declined (SAM busy with the other frame)
    assert result["ensemble"][0]["early_embedding"] == {"kept": 2, "used": 2}
    early = result["ensemble"][1]["early_embedding"]
    assert early.get("kept", 0) + early.get("declined", 0) == 2 and early.get("used", 0) == early.get("kept", 0)
    # each frame is two requests to the segmenter (its image alone, then its boxes); the kept ones ran on its thread
    requests = {"segmenter": 4, "segmenter, batch thread": 2 + early.get("kept", 0)}
    assert all(step["requests"] == requests.get(name, 2) for name, step in result["steps"].items())
    assert all(step["compute_ms"] >= 0 for step in result["steps"].values())
    steps = result["steps"]  # SAM runs on the thread: there, not in Triton's intake time, is the encoder's cost
    assert steps["segmenter, batch thread"]["compute_ms"] > steps["segmenter"]["compute_ms"]
    assert steps["segmenter, batch thread"]["compute_ms"] > steps["select_detections"]["compute_ms"]
    assert set(result["steps_by_concurrency"]) == {"1", "2"} and result["steps_by_concurrency"]["2"] == result["steps"]
    assert result["in_process"]["p50_ms"] > 0
    assert result["plain_script"]["p50_ms"] > 0 and result["plain_script"]["defects_segmented"] == 1
    assert result["memory"]["resident"]["total_mib"] > 0
    tiled = result["tiled"]  # a 1600 x 1200 photo sent with tiling on: 9 tiles here
    assert tiled["photo"] == "1600x1200" and tiled["requests"] == 1 and not tiled["errors"]
    assert abs(tiled["ms_per_megapixel"] - tiled["p50_ms"] / 1.92) <= 0.1 and tiled["p50_ms"] > 0
    pieces = result["pieces"]  # where a frame's time goes; on a CPU the encoder dwarfs the decoder's 1 box
    assert pieces["sam_encoder_b1"] > pieces["sam_decoder_1_boxes"] > 0 and pieces["sam_mask_crops_1_boxes"] > 0
    assert pieces["segmenter_runtime"] == "fp32 on cpu, image encoder eager, mask decoder eager"
    by_boxes = pieces["sam_decoder_ms_by_boxes"]  # each box decodes from its own copy of the frame's embedding
    assert set(by_boxes) == {"1", "4"} and by_boxes["4"] > by_boxes["1"] > 0
    assert result["memory"]["tritonserver_sees_gpu"] is False  # no GPU here to see
    # one frame's path at c=1 from Triton's trace, on the clock the client read too
    timeline = result["timeline"]
    rows = {row["what"]: (row["from_ms"], row["to_ms"]) for row in timeline["rows"]}
    assert timeline["frames"] == 2 and list(rows) == [
        "client -> Triton", "preprocess", "segmenter, first call", "detector", "select_detections", "segmenter",
        "geometry", "result", "Triton -> client",
    ]  # fmt: skip
    assert 0 < rows["client -> Triton"][1] <= rows["preprocess"][0] < rows["detector"][0] < rows["detector"][1]
    # the responses' own clock (preprocess's start to the result's build) lies within the traced steps: Triton's
    # trace and START_NS agree, to the few ms processing_time_ms leaves out (the inputs' transfer, the build)
    traced = rows["result"][1] - rows["preprocess"][0]
    assert 0 < traced - timeline["server_ms"] < 15, (traced, timeline["server_ms"])
    # --also: the same levels on a server of its own with the setting changed, which its steps did see
    (other,) = result["compared"]
    assert other["setting"] == "OVERLAP_BATCHES=off" and other["batch_threads"] == []
    assert [row["concurrency"] for row in other["ensemble"]] == [1, 2]
    assert all(row["requests"] == 2 and not row["errors"] and row["frames_per_s"] > 0 for row in other["ensemble"])
    assert all(row["early_embedding"] == {} for row in other["ensemble"])  # EARLY_EMBEDDING auto: off on a CPU
    assert other["memory"]["resident"]["total_mib"] > 0
    # what each part took, in the order run: the baselines before the compared settings (a GPU session's minutes
    # may end during one that compiles)
    parts = list(result["seconds"])
    assert parts[:4] == ["in-process pipeline loaded, threshold found", "server started, warmed up", "c=1", "c=2"]
    assert parts[-4:] == ["in_process", "pieces", "plain_script", "OVERLAP_BATCHES=off"]
    assert all(took >= 0 for took in result["seconds"].values()) and result["seconds"]["server started, warmed up"] > 0


def test_bench_gpu_table_puts_each_batch_thread_under_its_step(capsys):
    """The step table's order: the pipeline's steps in order, a GPU step's batch-thread row right under it, and a
    row of a model the table does not know last instead of an error at the end of a long run."""
    from bench import gpu

    row = {"queue_ms": 0.0, "compute_ms": 1.0, "mean_batch": 1.0}
    steps = {name: row for name in ("result", "segmenter, batch thread", "other", "detector", "segmenter")}
    result = {"device": "d", "workload": "w", "ensemble": [], "in_process": {"p50_ms": 1.0},
              "plain_script": {"p50_ms": 1.0}, "steps": steps, "memory": {},
              "tiled": {"photo": "1x1", "p50_ms": 1.0, "ms_per_megapixel": 1.0}}  # fmt: skip
    gpu.print_table(result)
    lines = [line.split("  ")[0] for line in capsys.readouterr().out.splitlines()]
    shown = [line for line in lines if line in steps]
    assert shown == ["detector", "segmenter", "segmenter, batch thread", "result", "other"]


def test_bench_gpu_records_a_setting_that_fails_and_goes_on(capsys, tmp_path):
    """A --also setting whose server fails (here: never ready) is recorded with its error, in the JSON and the
    table, and the bench goes on to the next one; what was measured before is already on disk."""
    from bench import gpu

    def run(change):
        if change[0] == "SAM_COMPILE":
            raise RuntimeError("tritonserver was not ready after 900 s")
        return {"setting": "=".join(change), "ensemble": [{"concurrency": 1, "p50_ms": 2.0, "p90_ms": 3.0,
                                                            "frames_per_s": 0.5, "errors": []}]}  # fmt: skip

    compared = [gpu.compare_setting(c, run) for c in (("SAM_COMPILE", "all"), ("EARLY_EMBEDDING", "off"))]
    assert compared[0] == {"setting": "SAM_COMPILE=all", "ensemble": [],
                           "error": "RuntimeError: tritonserver was not ready after 900 s"}  # fmt: skip
    assert compared[1]["ensemble"][0]["p50_ms"] == 2.0
    result = {"device": "d", "workload": "w", "ensemble": [{"concurrency": 1, "p50_ms": 1.0, "p90_ms": 1.0,
              "frames_per_s": 1.0, "errors": [], "warnings": []}], "compared": compared,
              "in_process": {"p50_ms": 1.0}, "plain_script": {"p50_ms": 1.0}, "steps": {}, "memory": {},
              "tiled": {"photo": "1x1", "p50_ms": 1.0, "ms_per_megapixel": 1.0}}  # fmt: skip
    gpu.print_table(result)
    table = capsys.readouterr().out
    assert "SAM_COMPILE=all: failed: RuntimeError: tritonserver was not ready" in table
    assert "EARLY_EMBEDDING=off, c=1" in table and "(0.50x frames/s)" in table
    assert "with EARLY_EMBEDDING=off" in table and "with SAM_COMPILE=all" not in table  # no empty levels line

    # a baseline that breaks is recorded the same way and the run goes on to the compared settings after it
    def broken():
        raise KeyError("sam_decoder_ms_by_boxes")

    assert gpu.guarded("pieces", broken) == {"error": "KeyError: 'sam_decoder_ms_by_boxes'"}
    assert gpu.guarded("pieces", lambda: {"p50_ms": 4.0}) == {"p50_ms": 4.0}
    gpu.print_table(result | {"plain_script": gpu.guarded("plain_script", broken)})
    table = capsys.readouterr().out
    line = next(line for line in table.splitlines() if line.startswith("plain script"))
    assert line.endswith("failed: KeyError: 'sam_decoder_ms_by_boxes'")
    assert "plain_script.error: KeyError" in " ".join(gpu.problems(result | {"plain_script": {"error": "KeyError"}}))
    gpu.save(tmp_path / "gpu.json", {"ensemble": []}, complete=False)
    assert json.loads((tmp_path / "gpu.json").read_text()) == {"ensemble": [], "complete": False}


def test_bench_gpu_problems_name_every_failure_of_a_run():
    """What a rehearsal of the offline GPU run fails on: each failed part named where it failed, nothing for a
    clean run (the UNTRAINED warnings the responses carry are no failure)."""
    from bench import gpu

    def row(concurrency, errors=()):
        return {"concurrency": concurrency, "errors": list(errors), "warnings": ["UNTRAINED WEIGHTS: ..."]}

    compared = [{"setting": "CUDA_MPS=on", "ensemble": [row(1)], "log_warnings": {}}]
    clean = {"ensemble": [row(1), row(2)], "tiled": row(1) | {"photo": "1600x1200"}, "log_warnings": {},
             "compared": compared, "complete": True}  # fmt: skip
    assert gpu.problems(clean) == []
    broken = json.loads(json.dumps(clean))
    broken["complete"] = False
    broken["tiled"]["errors"] = ["internal error 70e5 (the server log has the details)", "internal error 8a1f"]
    broken["compared"][0]["ensemble"][0]["errors"] = ["deadline exceeded"]
    broken["compared"].append({"setting": "SAM_COMPILE=all", "ensemble": [], "error": "RuntimeError: not ready"})
    broken["log_warnings"] = {"ERROR anomaly.triton: internal error 70e5: Traceback": 2}
    found = gpu.problems(broken)
    assert len(found) == 5
    assert "the run did not finish (complete: false)" in found
    assert "tiled.errors: internal error 70e5 (the server log has the details) (and 1 more)" in found
    assert "compared[CUDA_MPS=on].ensemble[1].errors: deadline exceeded" in found
    assert "compared[SAM_COMPILE=all].error: RuntimeError: not ready" in found
    assert "log_warnings: 2x ERROR anomaly.triton: internal error 70e5: Traceback" in found


def test_bench_gpu_reads_what_each_gpu_step_held_after_loading(monkeypatch, tmp_path):
    """What a GPU step logs once loaded (torch's share of its GPU memory; nvidia-smi's rest is the CUDA context
    and the libraries) comes back into make bench-gpu's memory, the latest start's line per step. No GPU here:
    torch's counts are stood in for, the log line and its reading are the real ones."""
    import logging

    from anomaly import hardware
    from anomaly.serving import reporting
    from bench import gpu

    log_file = tmp_path / "triton.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("anomaly.triton")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # setLevel: the logger caches what it emits per level
    monkeypatch.setattr(hardware, "release_unused_gpu_memory", lambda: 0)
    try:
        for step, held in (("segmenter", (100, 900)), ("detector", (130, 500)), ("segmenter", (1000, 2500))):
            monkeypatch.setattr(hardware, "torch_gpu_memory", lambda held=held: (held[0] << 20, held[1] << 20))
            reporting.release_gpu_cache_after_load(step)
        monkeypatch.setattr(hardware, "torch_gpu_memory", lambda: None)  # a process that never started CUDA
        reporting.release_gpu_cache_after_load("preprocess")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()
    assert gpu.torch_memory_after_load(log_file) == {
        "segmenter": {"torch_mib": 2500, "tensors_mib": 1000},
        "detector": {"torch_mib": 500, "tensors_mib": 130},
    }
    assert gpu.torch_memory_after_load(tmp_path / "none.log") == {}


def test_bench_gpu_lists_the_warnings_of_its_own_run_in_tritons_log(tmp_path):
    """make bench-gpu reads back what the steps warned in its part of Triton's log (the bench appends to it): a
    fallback the responses do not show changes what a server's numbers mean; the untrained banners, expected
    here, and an earlier run's lines stay out."""
    import logging

    from anomaly.weights import UNTRAINED_BANNER
    from bench import gpu

    log_file = tmp_path / "triton.log"

    def run(*warnings):
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))  # anomaly.logs' format
        logger = logging.getLogger("anomaly.triton")
        logger.addHandler(handler)
        try:
            logger.info("segmenter: loaded")
            for warning in warnings:
                logger.warning(warning)
        finally:
            logger.removeHandler(handler)
            handler.close()

    run("an earlier run's warning")
    start = gpu.log_size(log_file)
    nvjpeg = "nvJPEG could not decode a JPEG (decoder unavailable); such images are decoded on the CPU"
    run(UNTRAINED_BANNER.format(what="the segmenter"), nvjpeg, nvjpeg, "SAM: CUDA graph capture failed")
    assert gpu.log_warnings(log_file, start) == {
        f"WARNING anomaly.triton: {nvjpeg}": 2,
        "WARNING anomaly.triton: SAM: CUDA graph capture failed": 1,
    }
    assert gpu.log_warnings(tmp_path / "none.log") == {}


def test_bench_gpu_refuses_a_comparison_with_an_unknown_setting():
    from bench import gpu

    with pytest.raises(SystemExit, match="NOT_A_SETTING=1.*NAME=VALUE"):
        gpu.main(["--also", "NOT_A_SETTING=1"])
    with pytest.raises(SystemExit, match="OVERLAP_BATCHES"):
        gpu.main(["--also", "OVERLAP_BATCHES"])


def test_make_bench_response_and_geometry_worker_parts(exported):
    """Parts of `make bench`, small: the response without and with masks, a typical crack, and a frame's cracks
    measured in one process against shared with workers."""
    from bench.bench import bench_geometry_workers, bench_response, bench_typical_crack, typical_crack

    response = bench_response(rounds=3)
    assert response["structures"] == 227 and response["with_masks_ms"] > response["response_ms"] > 0
    crack = bench_typical_crack(rounds=3)
    assert crack["typical_crack_median_ms"] >= crack["typical_crack_ms"] > 0
    workers = bench_geometry_workers([typical_crack()] * 4, rounds=2)
    assert set(workers["4_cracks_ms_by_processes"]) == {"1", "2", "4"}
    assert all(ms > 0 for ms in workers["4_cracks_ms_by_processes"].values())


def test_activation_peak_counts_the_tensors_alive_at_once():
    """bench.activation_memory's count, on allocations of known sizes: 1 MiB and 2 MiB alive together, the first
    freed, another 1 MiB: 3 MiB at the peak, 4 MiB allocated in all; a tensor made before does not count."""
    import torch

    from bench.activation_memory import allocations

    mib = 2**20
    before = torch.empty(8 * mib, dtype=torch.uint8)

    def forward():
        a = torch.empty(mib, dtype=torch.uint8)
        b = torch.empty(2 * mib, dtype=torch.uint8)
        del a
        return b, torch.empty(mib, dtype=torch.uint8)

    peak, total = allocations(forward)
    assert 3 * mib <= peak < 3 * mib + 4096 and 4 * mib <= total < 4 * mib + 4096
    assert before.numel() == 8 * mib


@pytest.mark.slow
def test_compile_check_compares_compiled_sam_with_eager(tmp_path):
    """bench.compile_check on this CPU (SAM2.1 tiny, 2 boxes, inductor's C++ kernels): both SAM parts time eager and
    compiled, and the compiled ones give the same features and masks (on a GPU, bf16 moves them more)."""
    from bench import compile_check

    out = tmp_path / "compile_check.json"
    assert compile_check.main(["--boxes", "2", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["boxes"] == 2 and result["segmenter"].startswith("sam2.1")
    for part in ("encoder", "decoder"):
        assert result[f"{part}_ms"] > 0 and result[f"compiled_{part}_ms"] > 0
        assert result[f"compiled_{part}_compile_s"] > 0 and result[f"compiled_{part}_cuda_graphs"] == "eager"
    assert result["compiled_encoder_feature_diff"] < 1e-4
    assert result["compiled_decoder_mask_pixels_flipped"] < 1e-3
