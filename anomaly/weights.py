"""Where model weights come from: given files, official downloads, or (only when allowed) untrained models.

Untrained models are written to files once (seeded), so the server, the tests and the in-process
baselines all load the very same weights, through the same loading code as real checkpoints.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from anomaly.config import Settings
from anomaly.errors import WeightsMissingError
from anomaly.segmenter import SAM2_CHECKPOINTS, SAM2_CONFIGS, SAM2_URL, sam2_variant_from_path

log = logging.getLogger(__name__)

UNTRAINED_SEED = 20261126
UNTRAINED_BANNER = (
    "UNTRAINED WEIGHTS: {what} runs with untrained random weights; its output is meaningless. "
    "Provide real weights before inspecting anything (see README, 'Weights')."
)


@dataclass(frozen=True)
class SegmenterSpec:
    kind: str  # "sam2.1"
    variant: str
    checkpoint: str
    untrained: bool
    note: str = ""  # why this one was chosen when it is a fallback

    def describe(self) -> dict:
        return asdict(self)


def untrained_dir(settings: Settings) -> Path:
    return settings.weights_dir / "untrained"


def untrained_sam2_path(settings: Settings, variant: str) -> Path:
    return untrained_dir(settings) / f"sam2.1_hiera_{variant}.untrained.pt"


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


def segmenter_candidates(settings: Settings) -> tuple[list[SegmenterSpec], list[str]]:
    """The segmenter weights to try, best first, and notes on what was passed over and why."""
    notes: list[str] = []
    candidates: list[SegmenterSpec] = []
    given = Path(settings.sam_model_path)
    if not given.is_file():
        notes.append(f"SAM_MODEL_PATH={given} does not exist")
    elif "sam3" in given.name.lower():
        notes.append(f"SAM_MODEL_PATH={given} looks like SAM3 weights; this build serves SAM2.1, falling back")
    else:
        variant = sam2_variant_from_path(given) or settings.sam2_variant
        candidates.append(SegmenterSpec("sam2.1", variant, str(given), False))
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
    name = SAM2_CHECKPOINTS[settings.sam2_variant]
    return (
        "No usable segmenter weights: " + "; ".join(notes) + ". Download "
        f"{SAM2_URL.format(name=name)} into {settings.weights_dir}/ (or point SAM_MODEL_PATH at a SAM2.1 "
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
                make_untrained_sam2(spec.variant, Path(spec.checkpoint))
            segmenter = Sam2Segmenter(spec.variant, spec.checkpoint, settings.device, settings.compute_threads)
        except Exception as exc:  # a corrupt or mismatched checkpoint: say so and fall back
            message = f"{spec.checkpoint} could not be loaded as SAM2.1 {spec.variant} ({type(exc).__name__}: {exc})"
            log.error(message)
            failures.append(message)
            continue
        return segmenter, replace(spec, note="; ".join(filter(None, [spec.note, *failures])))
    raise WeightsMissingError(missing_sam_message(settings, notes + failures))


def segmenter_info(segmenter, spec: SegmenterSpec) -> dict:
    """What runs, for responses and /info: the chosen weights and the device they landed on."""
    return spec.describe() | {"device": segmenter.device, "runtime": segmenter.runtime}


def prepare_segmenter_weights(settings: Settings) -> SegmenterSpec:
    """The segmenter weights the server will try first, written now if they are the untrained ones, so the
    server, the tests and the baselines share one file. Raises WeightsMissingError when there are none."""
    candidates, notes = segmenter_candidates(settings)
    if not candidates:
        raise WeightsMissingError(missing_sam_message(settings, notes))
    spec = candidates[0]
    if spec.untrained:
        make_untrained_sam2(spec.variant, Path(spec.checkpoint))
    return spec
