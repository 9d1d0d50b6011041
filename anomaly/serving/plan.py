"""How the pipeline's Triton models are laid out on this machine: instances, batching, geometry workers.

The committed `config.pbtxt` files hold the CPU layout (one instance of everything), which is what a bare
`tritonserver --model-repository=model_repository` serves. Our launcher (anomaly.serving.triton_server) resolves
the settings (BATCH_FRAMES, BATCH_DELAY_US, STEP_INSTANCES, GEOMETRY_WORKERS, each `auto` by default) for
the machine it runs on and writes `<model>/configs/serving.pbtxt` beside each step, which Triton loads
with `--model-config-name=serving`. It writes the ensemble's too: the committed one, with one more step where SAM
embeds early (EARLY_EMBEDDING, `auto`: on a GPU machine; `render_ensemble`).

GPU machine defaults: the detector batches up to 8 concurrent frames and the segmenter up to 2 (the SAM
image encoder runs them as one batch; on an H100, batch 2 served as many frames/s at concurrency 8 as batch 4,
39.3 vs 39.8, with the segmenter's GPU memory 3.5 GB instead of 5.4), one instance each (each
holds its weights once on the card); every CPU step gets cores / 4 instances and geometry shares a frame's
masks among cores / 4 processes, at most 4 (its own and up to 3 workers). CPU-only machine: one instance of
everything and no segmenter batching, since SAM's encoder already uses every core.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from anomaly.config import Settings

BATCHED_STEPS = ("detector", "segmenter")
CPU_STEPS = ("preprocess", "select_detections", "geometry", "result")
ENSEMBLE = "anomaly_pipeline"
CONFIG_NAME = "serving"

# EARLY_EMBEDDING: the segmenter called on the image alone as soon as preprocess has passed it, in parallel with
# the detector; its key joins the boxes' call (anomaly.serving.embeddings).
EARLY_STEP = """    {
      model_name: "segmenter"
      model_version: -1
      input_map { key: "ENCODED" value: "encoded" }
      input_map { key: "TILING" value: "tiling" }
      output_map { key: "EMBEDDING_KEY" value: "sam_embedding_key" }
    },
"""


@dataclass(frozen=True)
class ServingPlan:
    gpu: bool
    detector_batch: int
    segmenter_batch: int
    batch_delay_us: int
    step_instances: int
    geometry_workers: int
    early_embedding: bool = False


def serving_plan(settings: Settings, gpu: bool, cores: int | None = None) -> ServingPlan:
    """The settings with every `auto` resolved for a machine with or without a GPU and `cores` cores."""
    cores = cores or os.cpu_count() or 1
    return ServingPlan(
        gpu=gpu,
        detector_batch=settings.batch_frames or 8,
        segmenter_batch=settings.batch_frames or (2 if gpu else 1),
        batch_delay_us=settings.batch_delay_us,
        step_instances=settings.step_instances or (max(2, cores // 4) if gpu else 1),
        geometry_workers=settings.geometry_workers or (min(4, max(1, cores // 4)) if gpu else 1),
        early_embedding=settings.early_embedding == "on" or (settings.early_embedding == "auto" and gpu),
    )


def _replace(text: str, pattern: str, replacement, model: str) -> str:
    new, count = re.subn(pattern, replacement, text, flags=re.M)
    if count != 1:
        raise ValueError(f"{model}/config.pbtxt: expected one line matching {pattern!r}, found {count}")
    return new


def render_config(text: str, model: str, plan: ServingPlan) -> str:
    """A step's committed config.pbtxt with this machine's instances, batching and geometry workers; the
    ensemble's with the early embedding step where the plan has it."""
    if model == ENSEMBLE:
        return render_ensemble(text, plan)
    if model in BATCHED_STEPS:
        batch = plan.detector_batch if model == "detector" else plan.segmenter_batch
        text = _replace(text, r"^max_batch_size: \d+$", f"max_batch_size: {batch}", model)
        text = _replace(
            text,
            r"^dynamic_batching \{.*\}$",
            f"dynamic_batching {{ max_queue_delay_microseconds: {plan.batch_delay_us} }}",
            model,
        )
    if model in CPU_STEPS:
        text = _replace(
            text,
            r"^instance_group \[.*\]$",
            f"instance_group [{{ kind: KIND_CPU, count: {plan.step_instances} }}]",
            model,
        )
    if model == "segmenter":
        early = "on" if plan.early_embedding else "off"
        text = _replace(
            text,
            r'^parameters \{ key: "early_embedding".*\}$',
            f'parameters {{ key: "early_embedding" value: {{ string_value: "{early}" }} }}',
            model,
        )
    if model == "geometry":
        text = _replace(
            text,
            r'^parameters \{ key: "workers".*\}$',
            f'parameters {{ key: "workers" value: {{ string_value: "{plan.geometry_workers}" }} }}',
            model,
        )
    return text


def render_ensemble(text: str, plan: ServingPlan) -> str:
    """The ensemble's committed config.pbtxt, with EARLY_STEP before the detector's step and its key passed to
    the segmenter's boxes step where the plan embeds early."""
    if not plan.early_embedding:
        return text
    text = _replace(text, r'^(    \{\n      model_name: "detector"\n)', lambda m: EARLY_STEP + m[1], ENSEMBLE)
    return _replace(
        text,
        r'^(      input_map \{ key: "SEG_BOXES" value: "seg_boxes" \})$',
        r'\1\n      input_map { key: "KEPT_EMBEDDING" value: "sam_embedding_key" }',
        ENSEMBLE,
    )


def write_serving_configs(repository: Path, plan: ServingPlan) -> list[Path]:
    """configs/serving.pbtxt beside each model's config.pbtxt (generated, not committed)."""
    written = []
    for model in (*BATCHED_STEPS, *CPU_STEPS, ENSEMBLE):
        source = repository / model / "config.pbtxt"
        if not source.exists():  # a repository that serves some of the steps
            continue
        target = repository / model / "configs" / f"{CONFIG_NAME}.pbtxt"
        target.parent.mkdir(exist_ok=True)
        text = render_config(source.read_text(), model, plan)
        header = "# Generated by anomaly.serving from config.pbtxt for this machine; do not edit.\n"
        target.write_text(header + text)
        written.append(target)
    return written
