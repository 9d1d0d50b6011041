"""SAM3 (Meta's `sam3` package) behind the segmenter interface of anomaly.segmenter.

SAM3's image model answers box prompts through its instance path: the image encoder runs once per frame, and
every box is decoded from that one embedding by the SAM-style prompt encoder and mask decoder of its tracker
(what `Sam3Processor.set_image` + `predict_inst(state, box=..., multimask_output=False)` do). Sam3Segmenter
runs that path with the crops, frame batching and CUDA graphs of Sam2Segmenter, whose code it reuses; only
the model, the input normalisation, the embedding and the logits' hole filling differ. The text encoder is
part of the checkpoint; it is loaded (so that a checkpoint missing it is refused like any other) and then
dropped, since box prompts never run it.

Checkpoints are loaded in SAM3's official layout ("detector.<image model key>", "tracker.<tracker key>",
optionally under "model"), strictly: every parameter must come from the file (sam3's own loader only prints
what is missing).
"""

from __future__ import annotations

import logging
from importlib.metadata import version
from pathlib import Path

from anomaly.segmenter import Sam2Segmenter

log = logging.getLogger(__name__)

SAM3_RESOLUTION = 1008  # Sam3Processor's input size
SAM3_MEAN, SAM3_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
TRACKER_PREFIX = "inst_interactive_predictor.model."
WORKED_AROUND = "0.1.4"  # the sam3 release the workarounds below were written for


class Sam3CheckpointError(ValueError):
    pass


# --- workarounds for sam3 0.1.4, applied only to that release ------------------------------------------------
_patched = False


def _patch_sam3_0_1_4() -> None:
    """sam3 0.1.4 on a machine without CUDA: two constructors allocate on "cuda" unconditionally
    (PositionEmbeddingSine's precomputed cache, TransformerDecoder's coordinate cache); built on the CPU
    here, they are the same values, and the model is moved to its device afterwards."""
    global _patched
    import torch

    if _patched or torch.cuda.is_available() or version("sam3") != WORKED_AROUND:
        return
    import sam3.model.decoder as decoder
    import sam3.model.position_encoding as position_encoding

    sine = position_encoding.PositionEmbeddingSine
    original_init = sine.__init__

    def init_on_cpu(self, *args, precompute_resolution=None, **kwargs):
        original_init(self, *args, precompute_resolution=None, **kwargs)
        if precompute_resolution is not None:  # the precompute 0.1.4 does, on the CPU
            for stride in (4, 8, 16, 32):
                size = (precompute_resolution // stride, precompute_resolution // stride)
                self.forward(torch.zeros((1, 1, *size)))
                self.cache[size] = self.cache[size].clone().detach()

    sine.__init__ = init_on_cpu
    original_coords = decoder.TransformerDecoder._get_coords  # a staticmethod: (H, W, device)
    decoder.TransformerDecoder._get_coords = staticmethod(lambda h, w, device: original_coords(h, w, "cpu"))
    _patched = True


def bpe_vocabulary() -> str:
    """sam3 0.1.4's wheel lacks the BPE vocabulary its text tokenizer opens at build time; open-clip-torch
    ships the same file (CLIP's bpe_simple_vocab_16e6.txt.gz)."""
    import sam3

    own = Path(sam3.__file__).parent.parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    if own.is_file():
        return str(own)
    import open_clip

    return str(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz")


def _builder():
    """sam3's model builder, imported with the workarounds in place. Importing it turns TF32 on for every
    CUDA matmul of the process (0.1.4's _setup_tf32); our exact paths need the process's own setting, so it
    is put back."""
    import torch

    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    import sam3.model_builder as builder

    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    _patch_sam3_0_1_4()
    return builder


# --- the model and its checkpoints -------------------------------------------------------------------------


def build_sam3(checkpoint: str | Path | None = None, device: str = "cpu"):
    """SAM3's image model with the instance (box prompt) path, its weights from `checkpoint` (strictly) or,
    without one, as initialised (seed first for an untrained model)."""
    builder = _builder()
    model = builder.build_sam3_image_model(
        bpe_path=bpe_vocabulary(), device="cpu", eval_mode=True, checkpoint_path=None, load_from_HF=False,
        enable_segmentation=True, enable_inst_interactivity=True,
    )  # fmt: skip
    if checkpoint is not None:
        load_official(model, checkpoint)
    return model.to(device)


def read_state(path: str | Path) -> dict:
    """A checkpoint's tensors, memory-mapped (a 3 GB file is not read to answer what it holds); a file in
    torch's legacy (pre-zip) format cannot be mapped and is read whole."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise Sam3CheckpointError(f"{path} holds a {type(state).__name__}, not a dictionary of weights")
    return state


def is_sam3_state(state: dict) -> bool:
    return any(k.startswith("detector.backbone.") for k in state) and any(k.startswith("tracker.") for k in state)


def to_model_keys(state: dict) -> dict:
    """The official layout -> the image model's state_dict keys (what sam3's loader maps)."""
    mapped = {k.removeprefix("detector."): v for k, v in state.items() if k.startswith("detector.")}
    mapped |= {TRACKER_PREFIX + k.removeprefix("tracker."): v for k, v in state.items() if k.startswith("tracker.")}
    return mapped


def to_official_layout(model) -> dict:
    """The image model's weights in the official checkpoint layout."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith(TRACKER_PREFIX):
            out["tracker." + key.removeprefix(TRACKER_PREFIX)] = value
        else:
            out["detector." + key] = value
    return {"model": out}


def load_official(model, path: str | Path) -> None:
    """Load an official-layout SAM3 checkpoint; every parameter and buffer of the model must be in it. Keys
    the image model does not use (the video tracker's own parts) are allowed and counted in the log."""
    mapped = to_model_keys(read_state(path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise Sam3CheckpointError(
            f"{path} does not fit SAM3's image model: {len(missing)} of its {len(expected)} weights are missing "
            f"(e.g. {', '.join(missing[:3])})"
        )
    unused = set(mapped) - set(expected)
    model.load_state_dict({k: mapped[k] for k in expected}, strict=True)
    if unused:
        log.info("%s: %d weights the image model does not use (the video tracker's) were left out", path, len(unused))


# --- the segmenter ---------------------------------------------------------------------------------------------


class Sam3Segmenter(Sam2Segmenter):
    """SAM3's box-prompted instance path, frames embedded in batches, boxes decoded per frame."""

    name = "sam3"

    def __init__(self, checkpoint: str | Path, device: str = "auto", threads: int = 0):
        self.variant = ""
        self._start(device, threads)
        self.sam3 = build_sam3(checkpoint, "cpu")
        # The text encoder (a third of SAM3's weights) is loaded with the checkpoint, to check that it is whole,
        # and then dropped: box prompts never run it.
        self.sam3.backbone.language_backbone = None
        self.sam3.to(self.device)
        self.predictor = self.sam3.inst_interactive_predictor  # threshold, hole area, feature sizes
        self.model = self.predictor.model  # the SAM-style prompt encoder and mask decoder every box goes through
        self.resolution = SAM3_RESOLUTION

    def _model_input(self, chw):
        """Upright RGB uint8 (3, H, W) -> the image encoder's input as Sam3Processor.set_image makes it: resized
        as uint8 with antialiasing, then scaled to [0, 1] and normalised with mean 0.5, std 0.5."""
        from torchvision.transforms.v2 import functional as F

        x = F.resize(chw, [self.resolution, self.resolution], antialias=True)
        return F.normalize(x.float() / 255.0, SAM3_MEAN, SAM3_STD)

    def _embed(self, inputs) -> dict:
        """(K, 3, S, S) -> features as Sam3Processor.set_image and predict_inst compute them: the SAM2-style
        neck's levels, the two finest through the mask decoder's conv_s0 / conv_s1, no_mem_embed added."""
        tracker = self.model
        backbone_out = self.sam3.backbone.forward_image(inputs)["sam2_backbone_out"]
        fpn = backbone_out["backbone_fpn"]
        fpn[0] = tracker.sam_mask_decoder.conv_s0(fpn[0])
        fpn[1] = tracker.sam_mask_decoder.conv_s1(fpn[1])
        _, vision_feats, _, _ = tracker._prepare_backbone_features(backbone_out)
        vision_feats[-1] = vision_feats[-1] + tracker.no_mem_embed
        k = inputs.shape[0]
        sizes = self.predictor._bb_feat_sizes
        feats = [feat.permute(1, 2, 0).view(k, -1, *size) for feat, size in zip(vision_feats[::-1], sizes[::-1])][::-1]
        return {"image_embed": feats[-1], "high_res_feats": feats[:-1]}

    def _postprocess_logits(self, low_res):
        """SAM3InteractiveImagePredictor fills background holes up to max_hole_area (256 low-res pixels) before
        upsampling; the same, with sam3's own connected components."""
        from sam3.perflib.connected_components import connected_components

        torch = self._torch
        transforms, threshold = self.predictor._transforms, self.predictor.mask_threshold
        if transforms.max_hole_area <= 0 or not len(low_res):
            return low_res
        labels, areas = connected_components((low_res <= threshold).to(torch.uint8))
        hole = (labels > 0) & (areas <= transforms.max_hole_area)
        return torch.where(hole, threshold + 10.0, low_res)
