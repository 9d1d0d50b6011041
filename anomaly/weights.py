"""Where model weights come from, for the segmenter and the detector: given files, official downloads, or (only
when allowed) untrained models; and for the detector, the names and roles of its classes.

Untrained models are written to files once (seeded), so the server, the tests and the in-process
baselines all load the very same weights, through the same loading code as real checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from anomaly import taxonomy
from anomaly.config import Settings
from anomaly.errors import ConfigError, WeightsMissingError
from anomaly.segmenter import SAM2_CHECKPOINTS, SAM2_CONFIGS, SAM2_URL

log = logging.getLogger(__name__)

UNTRAINED_SEED = 20261126
UNTRAINED_BANNER = (
    "UNTRAINED WEIGHTS: {what} runs with untrained random weights; its output is meaningless. "
    "Provide real weights before inspecting anything (docs/deployment.md, 'Weights')."
)


@dataclass(frozen=True)
class SegmenterSpec:
    kind: str  # "sam3" or "sam2.1"
    variant: str  # SAM2.1's size; "" for SAM3 (one size)
    checkpoint: str
    untrained: bool
    note: str = ""  # why this one was chosen when it is a fallback

    def describe(self) -> dict:
        return asdict(self)


def segmenter_title(kind: str, variant: str = "") -> str:
    """ "SAM3", "SAM2.1 large": how logs, banners and notes name a segmenter."""
    return " ".join(filter(None, [kind.upper(), variant]))


# SAM2.1's size from its image encoder: (patch embedding width, number of Hiera blocks)
SAM2_SIZES = {(96, 12): "tiny", (96, 16): "small", (112, 24): "base_plus", (144, 48): "large"}


def checkpoint_kind(path: Path) -> tuple[str, str]:
    """What a segmenter checkpoint holds, from its keys: ("sam3", "") or ("sam2.1", size). Raises ValueError
    naming the file for anything else (another model, not a checkpoint, unreadable)."""
    from anomaly.sam3 import is_sam3_state, read_state

    try:
        state = read_state(path)
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated, not a torch file: all the same to the caller
        raise ValueError(f"{path} could not be read as a checkpoint ({type(exc).__name__}: {exc})") from None
    if is_sam3_state(state):
        return "sam3", ""
    patch = state.get("image_encoder.trunk.patch_embed.proj.weight")
    if patch is not None:
        blocks = {k.split(".")[3] for k in state if k.startswith("image_encoder.trunk.blocks.")}
        size = SAM2_SIZES.get((int(patch.shape[0]), len(blocks)))
        if size:
            return "sam2.1", size
        raise ValueError(
            f"{path} is a SAM2 image encoder of no known size ({patch.shape[0]} wide, {len(blocks)} blocks)"
        )
    some = ", ".join(list(state)[:3])
    raise ValueError(f"{path} is neither a SAM3 nor a SAM2.1 checkpoint (its weights start {some})")


def marked_untrained(path: Path) -> bool:
    """Whether a weights file is one of our untrained ones (under any name or link): save_untrained writes a
    `.json` marker beside it."""
    marker = Path(path).resolve().with_suffix(".json")
    try:
        return bool(json.loads(marker.read_text()).get("untrained"))
    except (OSError, ValueError, AttributeError):
        return False


def untrained_dir(settings: Settings) -> Path:
    return settings.weights_dir / "untrained"


def untrained_sam2_path(settings: Settings, variant: str) -> Path:
    return untrained_dir(settings) / f"sam2.1_hiera_{variant}.untrained.pt"


def untrained_sam3_path(settings: Settings) -> Path:
    return untrained_dir(settings) / "sam3.untrained.pt"


def save_untrained(checkpoint: dict, path: Path, what: str) -> Path:
    """Write a seeded untrained checkpoint atomically (a concurrent reader never sees half a file), with the
    `.json` beside it that marks it untrained wherever it is loaded."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps({"untrained": True, "seed": UNTRAINED_SEED}) + "\n")
    log.warning("wrote untrained %s weights to %s", what, path)
    return path


def make_untrained_sam2(variant: str, path: Path) -> Path:
    """A seeded, randomly initialised SAM2.1 saved as a checkpoint build_sam2 loads ({"model": state_dict})."""
    import torch
    from sam2.build_sam import build_sam2

    if path.exists():
        return path
    torch.manual_seed(UNTRAINED_SEED)
    model = build_sam2(SAM2_CONFIGS[variant], ckpt_path=None, device="cpu")
    return save_untrained({"model": model.state_dict()}, path, f"SAM2.1 {variant}")


def make_untrained_sam3(path: Path) -> Path:
    """A seeded, randomly initialised SAM3 image model saved in the official checkpoint layout, in half
    precision (1.7 GB instead of 3.4; it loads into the fp32 model like any checkpoint)."""
    import torch

    from anomaly.sam3 import build_sam3, to_official_layout

    if path.exists():
        return path
    torch.manual_seed(UNTRAINED_SEED)
    layout = to_official_layout(build_sam3())
    layout["model"] = {k: v.half() if v.is_floating_point() else v for k, v in layout["model"].items()}
    return save_untrained(layout, path, "SAM3")


def make_untrained(spec: SegmenterSpec) -> None:
    if spec.kind == "sam3":
        make_untrained_sam3(Path(spec.checkpoint))
    else:
        make_untrained_sam2(spec.variant, Path(spec.checkpoint))


def segmenter_candidates(settings: Settings) -> tuple[list[SegmenterSpec], list[str]]:
    """The segmenter weights to try, best first, and notes on what was passed over and why.

    SAM_MODEL_PATH is taken for what its keys say it holds (a SAM3 file named model.pt is SAM3, a SAM2.1
    file named sam3.pt is SAM2.1 of its own size). SEGMENTER=auto serves it, else falls back to SAM2.1
    (SAM2_VARIANT: WEIGHTS_DIR's official file, then untrained if allowed); SEGMENTER=sam3 takes only SAM3
    (untrained if allowed), SEGMENTER=sam2.1 only SAM2.1."""
    notes: list[str] = []
    candidates: list[SegmenterSpec] = []
    wanted = settings.segmenter
    given = Path(settings.sam_model_path)
    if not given.is_file():
        notes.append(f"SAM_MODEL_PATH={given} does not exist")
    else:
        try:
            kind, variant = checkpoint_kind(given)
        except ValueError as exc:
            notes.append(f"SAM_MODEL_PATH: {exc}")
        else:
            if wanted in ("auto", kind):
                candidates.append(SegmenterSpec(kind, variant, str(given), marked_untrained(given)))
            else:
                notes.append(f"SAM_MODEL_PATH={given} holds {segmenter_title(kind)} weights; SEGMENTER={wanted}")
    if wanted == "sam3":
        if settings.allow_untrained:
            candidates.append(SegmenterSpec("sam3", "", str(untrained_sam3_path(settings)), True, "; ".join(notes)))
        return candidates, notes
    variant = settings.sam2_variant
    default = settings.weights_dir / SAM2_CHECKPOINTS[variant]
    if default.is_file():
        candidates.append(SegmenterSpec("sam2.1", variant, str(default), False, "; ".join(notes)))
    else:
        notes.append(f"{default} does not exist")
    if settings.allow_untrained:
        path = str(untrained_sam2_path(settings, variant))
        candidates.append(SegmenterSpec("sam2.1", variant, path, True, "; ".join(notes)))
    return candidates, notes


def missing_sam_message(settings: Settings, notes: list[str]) -> str:
    if settings.segmenter == "sam3":
        return (
            "No usable segmenter weights: " + "; ".join(notes) + ". SEGMENTER=sam3 needs SAM_MODEL_PATH to point "
            "at Meta's sam3.pt (https://huggingface.co/facebook/sam3), or set ALLOW_UNTRAINED_WEIGHTS=1 to run "
            "an untrained SAM3 (tests and demos only)."
        )
    name = SAM2_CHECKPOINTS[settings.sam2_variant]
    return (
        "No usable segmenter weights: " + "; ".join(notes) + ". Download "
        f"{SAM2_URL.format(name=name)} into {settings.weights_dir}/ (or point SAM_MODEL_PATH at a SAM3 or SAM2.1 "
        "checkpoint), or set ALLOW_UNTRAINED_WEIGHTS=1 to run untrained weights (tests and demos only)."
    )


def load_segmenter(settings: Settings):
    """The first candidate that loads: (segmenter, spec). A file that fails to load is reported and skipped;
    the spec's note says what was passed over on the way."""
    from anomaly.segmenter import Sam2Segmenter

    candidates, notes = segmenter_candidates(settings)
    failures: list[str] = []
    for spec in candidates:
        try:
            if spec.untrained:
                make_untrained(spec)
            if spec.kind == "sam3":
                from anomaly.sam3 import Sam3Segmenter

                segmenter = Sam3Segmenter(spec.checkpoint, settings.device, settings.compute_threads)
            else:
                segmenter = Sam2Segmenter(spec.variant, spec.checkpoint, settings.device, settings.compute_threads)
        except Exception as exc:  # a corrupt or mismatched checkpoint: say so and fall back
            title = segmenter_title(spec.kind, spec.variant)
            message = f"{spec.checkpoint} could not be loaded as {title} ({type(exc).__name__}: {exc})"
            log.error(message)
            failures.append(message)
            continue
        return segmenter, replace(spec, note="; ".join(filter(None, [spec.note, *failures])))
    raise WeightsMissingError(missing_sam_message(settings, notes + failures))


def segmenter_info(segmenter, spec: SegmenterSpec) -> dict:
    """What runs, for responses and /info: the chosen weights and the device they landed on."""
    info = spec.describe() | {
        "device": segmenter.device, "runtime": segmenter.runtime, "resolution": segmenter.resolution
    }  # fmt: skip
    return info | ({"warning": segmenter.warning} if segmenter.warning else {})


def prepare_segmenter_weights(settings: Settings) -> SegmenterSpec:
    """The segmenter weights the server will try first, written now if they are the untrained ones, so the
    server, the tests and the baselines share one file. Raises WeightsMissingError when there are none."""
    candidates, notes = segmenter_candidates(settings)
    if not candidates:
        raise WeightsMissingError(missing_sam_message(settings, notes))
    spec = candidates[0]
    if spec.untrained:
        make_untrained(spec)
    return spec


# --- the detector ---------------------------------------------------------------------------------------------

UNTRAINED_NOISE_STD = 0.02  # untrained box heads start at zero; noise makes boxes and classes vary
UNTRAINED_CLASS_BIAS = -2.6
# What `anomaly train` adds to a checkpoint beside rfdetr's own keys: its classes' names and roles.
CHECKPOINT_CLASSES_KEY = "anomaly_classes"


def untrained_detector_path(settings: Settings) -> Path:
    return untrained_dir(settings) / f"rfdetr-{settings.detector_variant}.untrained.pth"


def make_untrained_detector(settings: Settings) -> Path:
    """A seeded untrained RF-DETR with the default taxonomy, saved as an rfdetr checkpoint."""
    import torch

    from anomaly.detector import rfdetr_class

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


def read_labels(path: Path) -> tuple[list[str], list[str | None]]:
    """Labels file -> (names, roles; None where the file names none). JSON: a list of names, or {"classes":
    [{"name", "role"}]}; text: one class a line, optionally `name,role`."""
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
    bad = sorted({r for r in roles if r} - set(taxonomy.ROLES))
    if bad:
        raise ConfigError(f"{path}: unknown roles {bad}; use {taxonomy.ROLES}")
    return names, roles


def find_labels(settings: Settings) -> Path | None:
    """DETECTOR_LABELS, else a labels file beside DETECTOR_WEIGHTS."""
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


def fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def resolve_detector_weights(settings: Settings) -> tuple[str, bool]:
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


def checkpoint_facts(path: Path) -> tuple[str | None, dict[str, str]]:
    """What a detector checkpoint says of itself besides its weights: the RF-DETR size (`model_name`, written by
    rfdetr's training; None where absent) and the roles `anomaly train` kept, by class name ({} where none)."""
    import torch

    from anomaly.detector import VARIANT_OF_MODEL_NAME

    entries = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    kept = entries.get(CHECKPOINT_CLASSES_KEY) or []
    roles = {c["name"]: c["role"] for c in kept if c.get("role") in taxonomy.ROLES}
    return VARIANT_OF_MODEL_NAME.get(str(entries.get("model_name", ""))), roles


def load_detector(settings: Settings):
    """-> (rfdetr model, its variant, slot class names, slot roles, weights description, untrained). A checkpoint
    that names its architecture (one rfdetr trained) is loaded as what it is, whatever DETECTOR_VARIANT says."""
    from anomaly.detector import load_rfdetr

    weights, untrained = resolve_detector_weights(settings)
    variant = settings.detector_variant
    if weights == "coco":
        try:
            model = load_rfdetr(variant, "coco")  # rfdetr downloads the official checkpoint
        except Exception as exc:
            if not settings.allow_untrained:
                raise WeightsMissingError(
                    f"The official RF-DETR {variant} COCO weights could not be downloaded "
                    f"({type(exc).__name__}). Put the file in ~/.roboflow/models/ (or RF_HOME), set "
                    "DETECTOR_WEIGHTS to a fine-tuned checkpoint, or set ALLOW_UNTRAINED_WEIGHTS=1 to export "
                    "an untrained model (tests and demos only)."
                ) from exc
            log.warning("COCO weights unavailable (%s); using untrained weights", type(exc).__name__)
            weights, untrained = str(make_untrained_detector(settings)), True
    kept_roles: dict[str, str] = {}
    if weights != "coco":
        named, kept_roles = checkpoint_facts(Path(weights))
        variant = named or variant
        if variant != settings.detector_variant:
            log.warning(
                "%s is an RF-DETR %s checkpoint; serving it as such (DETECTOR_VARIANT=%s is for other weights)",
                Path(weights).name,
                variant,
                settings.detector_variant,
            )
        model = load_rfdetr(variant, weights, settings.detector_num_classes)
    names, roles = slot_classes(model, settings, kept_roles)
    return model, variant, names, roles, weights, untrained


def slot_classes(model, settings: Settings, kept_roles: dict[str, str]) -> tuple[list[str], list[str]]:
    """One name and role per logit slot of the model. Names: a labels file (DETECTOR_LABELS or beside the weights),
    else the checkpoint's own. Roles: the labels file's, else those `anomaly train` kept in the checkpoint, else by
    name (anomaly.taxonomy.role_of)."""
    from rfdetr.assets.coco_classes import COCO_CLASS_NAMES, COCO_CLASSES

    slots = model.model_config.num_classes + 1
    labels = find_labels(settings)
    names, roles = read_labels(labels) if labels else (list(model.class_names), [None] * len(model.class_names))
    roles = [r or kept_roles.get(n) or taxonomy.role_of(n) for n, r in zip(names, roles)]
    if slots > len(names) and names == COCO_CLASS_NAMES:
        # Official COCO checkpoints: slot k is COCO category id k (sparse, 1..90).
        by_slot = dict(COCO_CLASSES)
        names = [by_slot.get(k, "") for k in range(slots)]
        roles = [taxonomy.role_of(n) for n in names]
    names = (names + [""] * slots)[:slots]
    roles = (roles + ["ignore"] * slots)[:slots]
    return names, roles


def detector_source(settings: Settings) -> dict:
    """What an export is made from (weights, labels, the knobs that change it), to tell when it is stale."""
    weights, untrained = resolve_detector_weights(settings)
    labels = find_labels(settings)
    return {
        "variant": settings.detector_variant,
        "weights": weights,
        "weights_fingerprint": fingerprint(Path(weights)) if weights != "coco" else "",
        "num_classes": settings.detector_num_classes,
        "labels": str(labels) if labels else "",
        "labels_fingerprint": fingerprint(labels) if labels else "",
        "untrained": untrained,
    }
