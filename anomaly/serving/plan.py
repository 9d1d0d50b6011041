"""How the pipeline's Triton models are laid out on this machine: instances, batching, geometry workers.

The committed `config.pbtxt` files hold the CPU layout (one instance of everything), which is what a bare
`tritonserver --model-repository=model_repository` serves. Our launcher (anomaly.serving.triton_server) resolves
the settings (BATCH_FRAMES, BATCH_DELAY_US, STEP_INSTANCES, GEOMETRY_WORKERS, each `auto` by default) for
the machine it runs on and writes `<model>/configs/serving.pbtxt` beside each step, which Triton loads
with `--model-config-name=serving`. It writes the ensemble's too: the committed one, with one more step where SAM
embeds early (EARLY_EMBEDDING: `add_early_embedding`). The configs are read and written as Triton's own
ModelConfig message (the protobuf tritonclient ships), so a change is a field set, not a text edit.

GPU machine defaults: the detector batches up to 8 concurrent frames and the segmenter up to 2 (the SAM
image encoder runs them as one batch; on an H100, batch 2 served as many frames/s at concurrency 8 as batch 4,
39.3 vs 39.8, with the segmenter's GPU memory 3.5 GB instead of 5.4), one instance each (each holds its weights
once on the card), and every CPU step gets cores / 4 instances. On trial until a GPU run measures them
(docs/performance.md): geometry shared among cores / 4 processes (GEOMETRY_WORKERS=auto) and the early
embedding step (EARLY_EMBEDDING=auto). CPU-only machine: one instance of everything and no segmenter batching,
since SAM's encoder already uses every core.

Several GPUs (GPUS, default all): the detector and SAM get one instance on each, as Triton's `instance_group`
of KIND_GPU with its `gpus` list; Triton passes each instance its device and the step makes it torch's current
device (anomaly.hardware.use_assigned_gpu). One GPU keeps the layout the H100 measured (a CPU-kind instance that
places its models on the GPU itself).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from anomaly.config import Settings
from anomaly.errors import ConfigError
from anomaly.hardware import visible_gpu_count

BATCHED_STEPS = ("detector", "segmenter")
CPU_STEPS = ("preprocess", "select_detections", "geometry", "result")
ENSEMBLE = "anomaly_pipeline"
CONFIG_NAME = "serving"


@dataclass(frozen=True)
class ServingPlan:
    gpu: bool
    detector_batch: int
    segmenter_batch: int
    batch_delay_us: int
    step_instances: int
    geometry_workers: int
    early_embedding: bool = False
    gpus: tuple[int, ...] = ()  # one detector and one SAM instance on each (KIND_GPU); () = the one-GPU/CPU layout


def serving_plan(settings: Settings, gpu: bool, cores: int | None = None, gpu_count: int | None = None) -> ServingPlan:
    """The settings with every `auto` resolved for a machine with or without a GPU, `cores` cores and `gpu_count`
    visible GPUs (counted when not given)."""
    cores = cores or os.cpu_count() or 1
    return ServingPlan(
        gpus=gpu_instances(settings.gpus, gpu_count if gpu_count is not None else visible_gpu_count() if gpu else 0),
        gpu=gpu,
        detector_batch=settings.batch_frames or 8,
        segmenter_batch=settings.batch_frames or (2 if gpu else 1),
        batch_delay_us=settings.batch_delay_us,
        step_instances=settings.step_instances or (max(2, cores // 4) if gpu else 1),
        geometry_workers=settings.geometry_workers or (min(4, max(1, cores // 4)) if gpu else 1),
        early_embedding=settings.early_embedding == "on" or (settings.early_embedding == "auto" and gpu),
    )


def gpu_instances(wanted: tuple[int, ...] | None, visible: int) -> tuple[int, ...]:
    """GPUS (None: all) on a machine whose server sees `visible` GPUs -> the GPUs that get a detector and a SAM
    instance each; () where the steps keep the one-GPU layout (no GPU, or GPU 0 alone, which is their default)."""
    chosen = tuple(range(visible)) if wanted is None else wanted
    missing = [d for d in chosen if d >= visible]
    if missing:
        raise ConfigError(
            f"GPUS={','.join(map(str, chosen))} names GPU {missing[0]}, but the server sees {visible} "
            f"(indexes 0-{visible - 1}; CUDA_VISIBLE_DEVICES decides which)" if visible else
            f"GPUS={','.join(map(str, chosen))} names a GPU, but the server sees none"
        )  # fmt: skip
    return () if chosen in ((), (0,)) else chosen


def parse_config(text: str):
    """A config.pbtxt as Triton's own ModelConfig message."""
    from google.protobuf import text_format
    from tritonclient.grpc.model_config_pb2 import ModelConfig

    return text_format.Parse(text, ModelConfig())


def render_config(text: str, model: str, plan: ServingPlan) -> str:
    """A step's committed config.pbtxt with this machine's instances, batching and geometry workers; the
    ensemble's with the early embedding step where the plan has it."""
    from google.protobuf import text_format
    from tritonclient.grpc.model_config_pb2 import ModelInstanceGroup

    config = parse_config(text)
    if model == ENSEMBLE and plan.early_embedding:
        add_early_embedding(config)
    if model in BATCHED_STEPS:
        config.max_batch_size = plan.detector_batch if model == "detector" else plan.segmenter_batch
        config.dynamic_batching.max_queue_delay_microseconds = plan.batch_delay_us
        if plan.gpus:  # one instance on each GPU
            del config.instance_group[:]
            config.instance_group.add(kind=ModelInstanceGroup.KIND_GPU, count=1, gpus=list(plan.gpus))
    if model in CPU_STEPS:
        del config.instance_group[:]
        config.instance_group.add(kind=ModelInstanceGroup.KIND_CPU, count=plan.step_instances)
    if model == "segmenter":
        config.parameters["early_embedding"].string_value = "on" if plan.early_embedding else "off"
    if model == "geometry":
        config.parameters["workers"].string_value = str(plan.geometry_workers)
    return text_format.MessageToString(config)


def add_early_embedding(ensemble) -> None:
    """EARLY_EMBEDDING: the segmenter called on the image alone as soon as preprocess has passed it on, in parallel
    with the detector (a step before the detector's); its key joins the boxes' call (anomaly.serving.embeddings)."""
    steps = ensemble.ensemble_scheduling.step
    boxes = next(s for s in steps if s.model_name == "segmenter" and "SEG_BOXES" in s.input_map)
    boxes.input_map["KEPT_EMBEDDING"] = "sam_embedding_key"
    early = type(boxes)(model_name="segmenter", model_version=-1)
    early.input_map["ENCODED"] = boxes.input_map["ENCODED"]
    early.input_map["TILING"] = boxes.input_map["TILING"]
    early.output_map["EMBEDDING_KEY"] = "sam_embedding_key"
    ordered = list(steps)
    ordered.insert(next(i for i, s in enumerate(ordered) if s.model_name == "detector"), early)
    copies = [type(early)() for _ in ordered]
    for copy, step in zip(copies, ordered):
        copy.CopyFrom(step)
    del steps[:]
    steps.extend(copies)


def write_serving_configs(repository: Path, plan: ServingPlan) -> list[Path]:
    """configs/serving.pbtxt beside each model's config.pbtxt (generated, not committed)."""
    written = []
    for stale in repository.glob("*/configs/in_service*.json"):  # what the last start's instances loaded
        stale.unlink(missing_ok=True)
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
