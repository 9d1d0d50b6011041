"""RF-DETR -> ONNX (dynamic batch) + metadata, into the Triton model repository.

Weights, in order: DETECTOR_WEIGHTS (a fine-tuned checkpoint), the official COCO weights (downloaded
by rfdetr when the network allows), or, only with ALLOW_UNTRAINED_WEIGHTS=1, an untrained model with
the default inspection taxonomy, saved once as a checkpoint and then loaded like any fine-tuned one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

from anomaly import taxonomy
from anomaly.config import Settings
from anomaly.detector import CPU_PROVIDER, DetectorMetadata, OnnxDetector, export_files, load_rfdetr, rfdetr_class
from anomaly.errors import ConfigError, WeightsMissingError
from anomaly.hardware import has_gpu
from anomaly.serving.plan import ServingPlan, serving_plan
from anomaly.weights import UNTRAINED_SEED, save_untrained, untrained_dir

log = logging.getLogger(__name__)

UNTRAINED_NOISE_STD = 0.02  # untrained box heads start at zero; noise makes boxes and classes vary
UNTRAINED_CLASS_BIAS = -2.6


def untrained_detector_path(settings: Settings) -> Path:
    return untrained_dir(settings) / f"rfdetr-{settings.detector_variant}.untrained.pth"


def make_untrained_detector(settings: Settings) -> Path:
    """A seeded untrained RF-DETR with the default taxonomy, saved as an rfdetr checkpoint."""
    import torch

    path = untrained_detector_path(settings)
    if path.exists():
        return path
    names = list(taxonomy.DEFAULT_CLASSES)
    torch.manual_seed(UNTRAINED_SEED)  # rfdetr initialises from the global generator
    model = rfdetr_class(settings.detector_variant)(pretrain_weights=None, num_classes=len(names))
    generator = torch.Generator().manual_seed(UNTRAINED_SEED)
    with torch.no_grad():
        for p in model.model.model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * UNTRAINED_NOISE_STD)
        # The class prior (sigmoid -> 0.01) would keep every score under any useful threshold; a prior
        # near 0.25 lets the demo show a handful of boxes at the default threshold.
        head = model.model.model.class_embed.bias
        head.copy_(UNTRAINED_CLASS_BIAS + 0.05 * torch.randn(head.shape, generator=generator))
    checkpoint = {"model": model.model.model.state_dict(), "args": {"class_names": names, "num_classes": len(names)}}
    return save_untrained(checkpoint, path, f"RF-DETR {settings.detector_variant}")


def read_labels(path: Path) -> tuple[list[str], list[str] | None]:
    """Labels file -> (names, roles or None). JSON: a list of names, or {"classes": [{"name", "role"}]};
    text: one class a line, optionally `name,role`."""
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        items = data["classes"] if isinstance(data, dict) else data
        names = [c["name"] if isinstance(c, dict) else str(c) for c in items]
        roles = [c.get("role") if isinstance(c, dict) else None for c in items]
    else:
        rows = [line.split(",") for line in text.splitlines() if line.strip()]
        names = [r[0].strip() for r in rows]
        roles = [r[1].strip() if len(r) > 1 else None for r in rows]
    roles = [r or taxonomy.role_of(n) for n, r in zip(names, roles)]
    bad = sorted(set(roles) - set(taxonomy.ROLES))
    if bad:
        raise ConfigError(f"{path}: unknown roles {bad}; use {taxonomy.ROLES}")
    return names, roles


def find_labels(settings: Settings) -> Path | None:
    if settings.detector_labels:
        path = Path(settings.detector_labels)
        if not path.is_file():
            raise ConfigError(f"DETECTOR_LABELS={path} does not exist")
        return path
    if settings.detector_weights:
        weights = Path(settings.detector_weights)
        for candidate in (
            weights.with_suffix(".labels.json"),
            weights.parent / "labels.json",
            weights.parent / "labels.txt",
            weights.parent / "classes.txt",
        ):
            if candidate.is_file():
                return candidate
    return None


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def resolve_weights(settings: Settings) -> tuple[str, bool]:
    """(checkpoint path or "coco", untrained?) without loading anything."""
    if settings.detector_weights:
        path = Path(settings.detector_weights)
        if not path.is_file():
            raise WeightsMissingError(
                f"DETECTOR_WEIGHTS={path} does not exist. Point it at a fine-tuned RF-DETR checkpoint "
                "(.pth), or unset it to use the official COCO weights."
            )
        return str(path), False
    if untrained_detector_path(settings).is_file() and settings.allow_untrained:
        return str(untrained_detector_path(settings)), True
    return "coco", False


def load_model(settings: Settings):
    """-> (rfdetr model, slot class names, slot roles, weights description, untrained)."""
    weights, untrained = resolve_weights(settings)
    if weights == "coco":
        try:
            model = load_rfdetr(settings.detector_variant, "coco")  # rfdetr downloads the official checkpoint
        except Exception as exc:
            if not settings.allow_untrained:
                raise WeightsMissingError(
                    f"The official RF-DETR {settings.detector_variant} COCO weights could not be downloaded "
                    f"({type(exc).__name__}). Put the file in ~/.roboflow/models/ (or RF_HOME), set "
                    "DETECTOR_WEIGHTS to a fine-tuned checkpoint, or set ALLOW_UNTRAINED_WEIGHTS=1 to export "
                    "an untrained model (tests and demos only)."
                ) from exc
            log.warning("COCO weights unavailable (%s); using untrained weights", type(exc).__name__)
            weights, untrained = str(make_untrained_detector(settings)), True
    if weights != "coco":
        model = load_rfdetr(settings.detector_variant, weights, settings.detector_num_classes)
    names, roles = slot_classes(model, settings)
    return model, names, roles, weights, untrained


def slot_classes(model, settings: Settings) -> tuple[list[str], list[str]]:
    """One name and role per logit slot of the model."""
    from rfdetr.assets.coco_classes import COCO_CLASS_NAMES, COCO_CLASSES

    slots = model.model_config.num_classes + 1
    labels = find_labels(settings)
    if labels:
        names, roles = read_labels(labels)
    else:
        names = list(model.class_names)
        roles = [taxonomy.role_of(n) for n in names]
    if slots > len(names) and names == COCO_CLASS_NAMES:
        # Official COCO checkpoints: slot k is COCO category id k (sparse, 1..90).
        by_slot = dict(COCO_CLASSES)
        names = [by_slot.get(k, "") for k in range(slots)]
        roles = [taxonomy.role_of(n) for n in names]
    names = (names + [""] * slots)[:slots]
    roles = (roles + ["ignore"] * slots)[:slots]
    return names, roles


def source_description(settings: Settings) -> dict:
    weights, untrained = resolve_weights(settings)
    labels = find_labels(settings)
    return {
        "variant": settings.detector_variant,
        "weights": weights,
        "weights_fingerprint": _fingerprint(Path(weights)) if weights != "coco" else "",
        "num_classes": settings.detector_num_classes,
        "labels": str(labels) if labels else "",
        "labels_fingerprint": _fingerprint(labels) if labels else "",
        "untrained": untrained,
    }


NATIVE_BACKENDS = {
    # --model-config-name: (how Triton runs it, extra config)
    "onnxruntime": (
        'backend: "onnxruntime"',
        "optimization { execution_accelerators { gpu_execution_accelerator: [{\n"
        '  name: "tensorrt"\n  parameters { key: "precision_mode" value: "FP16" }\n}] } }\n',
    ),
    "tensorrt": ('platform: "tensorrt_plan"', ""),
}


def native_config(kind: str, resolution: int, queries: int, slots: int, plan: ServingPlan) -> str:
    """A detector config for Triton's own onnxruntime or TensorRT backend (the official container), used
    instead of the Python-backend one with `tritonserver --model-config-name=<kind>`; its batching is the
    machine's serving plan (anomaly.serving.plan), as for the Python-backend detector."""
    runtime, extra = NATIVE_BACKENDS[kind]
    return (
        f"# Triton's native {kind} backend, selected with --model-config-name={kind}. Written by `make models`.\n"
        f'name: "detector"\n{runtime}\nmax_batch_size: {plan.detector_batch}\n'
        f'input [{{ name: "input", data_type: TYPE_FP32, dims: [3, {resolution}, {resolution}] }}]\n'
        "output [\n"
        f'  {{ name: "dets", data_type: TYPE_FP32, dims: [{queries}, 4] }},\n'
        f'  {{ name: "labels", data_type: TYPE_FP32, dims: [{queries}, {slots}] }}\n'
        "]\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {plan.batch_delay_us} }}\n"
        "instance_group [{ kind: KIND_GPU, count: 1 }]\n" + extra
    )


def onnx_queries(onnx_path: Path) -> int:
    """The number of queries the exported graph outputs (-1 where onnxruntime cannot tell)."""
    session = OnnxDetector(onnx_path, 1, [CPU_PROVIDER]).session
    dim = next(o for o in session.get_outputs() if o.name == "dets").shape[1]
    return dim if isinstance(dim, int) else -1


def rfdetr_version() -> str:
    from importlib.metadata import version

    return version("rfdetr")


def export_detector(settings: Settings, force: bool = False) -> DetectorMetadata:
    """Export into <model_repository>/detector/1/ unless an export of the same source is already there."""
    onnx_path, meta_path = export_files(settings.model_repository)
    version_dir = onnx_path.parent
    source = source_description(settings)
    if not force and onnx_path.is_file() and meta_path.is_file():
        current = DetectorMetadata.load(meta_path)
        if current.source == source and current.rfdetr_version == rfdetr_version():
            log.info("detector export is up to date (%s)", onnx_path)
            return current
    model, names, roles, weights, untrained = load_model(settings)
    source = source_description(settings)  # the untrained checkpoint may have just been written
    version_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        exported = Path(model.export(output_dir=tmp, dynamic_batch=True, verbose=False))
        shutil.move(str(exported), onnx_path)
    metadata = DetectorMetadata(
        variant=settings.detector_variant,
        resolution=int(model.model.resolution),
        means=list(model.means),
        stds=list(model.stds),
        class_names=names,
        roles=roles,
        num_select=int(getattr(model.model.postprocess, "num_select", 300)),
        weights=weights,
        untrained=untrained,
        rfdetr_version=rfdetr_version(),
        source=source,
    )
    metadata.save(meta_path)
    configs = settings.model_repository / "detector" / "configs"
    configs.mkdir(exist_ok=True)
    queries = onnx_queries(onnx_path)
    plan = serving_plan(settings, has_gpu())
    shape = (metadata.resolution, queries, len(names), plan)
    (configs / "onnxruntime.pbtxt").write_text(native_config("onnxruntime", *shape))
    if build_tensorrt_engine(onnx_path, version_dir / "model.plan", metadata.resolution, plan.detector_batch):
        (configs / "tensorrt.pbtxt").write_text(native_config("tensorrt", *shape))
    log.info("exported %s (%s, untrained=%s) to %s", settings.detector_variant, weights, untrained, onnx_path)
    return metadata


def build_tensorrt_engine(onnx_path: Path, plan_path: Path, resolution: int, max_batch: int = 8) -> bool:
    """FP16 TensorRT engine for Triton's tensorrt backend, when TensorRT and a GPU are present.
    Not exercised on CPU-only machines (no GPU, no TensorRT): it returns False there."""
    try:
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            return False
    except ImportError:
        return False
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {parser.get_error(0)}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    shape = (3, resolution, resolution)
    profile.set_shape("input", (1, *shape), (max_batch // 2, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError("TensorRT engine build failed")
    plan_path.write_bytes(bytes(engine))
    log.info("built TensorRT FP16 engine %s", plan_path)
    return True
