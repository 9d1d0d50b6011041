"""Box-prompted segmentation: one image embedding per frame, every box of the frame decoded from it.

Masks stay at box-crop size: SAM's 256x256 low-resolution logits are upsampled only over each box,
sampled exactly where the full-frame bilinear upsample of SAM2ImagePredictor would sample them, so the
crops equal the predictor's full-frame masks cut to the box without ever allocating N full frames.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SAM2_CONFIGS = {
    "tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
SAM2_CHECKPOINTS = {v: f"sam2.1_hiera_{v}.pt" for v in SAM2_CONFIGS}
SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/{name}"


@dataclass
class MaskCrop:
    box: tuple[int, int, int, int]  # x0, y0, x1, y1: pixel edges, the mask covers columns x0..x1-1
    mask: np.ndarray  # (y1 - y0, x1 - x0) bool
    score: float  # SAM's predicted IoU, clipped to [0, 1]


def crop_box(box: np.ndarray, image_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Float box -> the integer pixel window that contains it, at least one pixel, inside the image."""
    height, width = image_hw
    x0 = min(max(int(math.floor(box[0])), 0), width - 1)
    y0 = min(max(int(math.floor(box[1])), 0), height - 1)
    x1 = max(min(int(math.ceil(box[2])), width), x0 + 1)
    y1 = max(min(int(math.ceil(box[3])), height), y0 + 1)
    return x0, y0, x1, y1


def sam2_variant_from_path(path: str | Path) -> str | None:
    """`sam2.1_hiera_large.pt` -> `large`; None when the name says nothing."""
    name = Path(path).name.lower()
    for variant in ("base_plus", "tiny", "small", "large"):
        if variant in name or (variant == "base_plus" and "b+" in name):
            return variant
    return None


def resolve_device(device: str) -> str:
    import torch

    if device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        log.warning("DEVICE=cuda but torch sees no GPU; SAM runs on the CPU")
    return "cpu"


class Sam2Segmenter:
    """SAM2.1 image predictor used with box prompts."""

    name = "sam2.1"

    def __init__(self, variant: str, checkpoint: str | Path | None, device: str = "auto", threads: int = 0):
        import torch
        from sam2.build_sam import build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        if threads:
            torch.set_num_threads(threads)
        self.variant = variant
        self.device = resolve_device(device)
        model = build_sam2(SAM2_CONFIGS[variant], ckpt_path=str(checkpoint) if checkpoint else None, device=self.device)
        self.predictor = SAM2ImagePredictor(model)
        self._torch = torch

    def _autocast(self):
        torch = self._torch
        if self.device == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def segment(self, rgb: np.ndarray, boxes: np.ndarray) -> list[MaskCrop]:
        """RGB uint8 (H, W, 3) and float boxes (N, 4) xyxy -> one MaskCrop per box."""
        if len(boxes) == 0:
            return []
        torch = self._torch
        height, width = rgb.shape[:2]
        with torch.inference_mode(), self._autocast():
            self.predictor.set_image(rgb)
            # On a GPU all boxes go through the decoder at once; on a CPU one at a time is faster.
            step = len(boxes) if self.device == "cuda" else 1
            crops: list[MaskCrop] = []
            for start in range(0, len(boxes), step):
                chunk = np.asarray(boxes[start : start + step], np.float32)
                low_res, iou = self._decode(chunk)
                for i, box in enumerate(chunk):
                    window = crop_box(box, (height, width))
                    mask = self._upsample_crop(low_res[i : i + 1], window, (height, width))
                    crops.append(MaskCrop(window, mask, float(np.clip(iou[i], 0.0, 1.0))))
        return crops

    def _decode(self, boxes: np.ndarray):
        """Prompt encoder + mask decoder for `boxes`, as SAM2ImagePredictor._predict, minus its full-frame upsample."""
        torch = self._torch
        p = self.predictor
        _, _, _, box_coords = p._prep_prompts(None, None, boxes, None, normalize_coords=True)
        box_labels = torch.tensor([[2, 3]], dtype=torch.int, device=box_coords.device).repeat(len(boxes), 1)
        sparse, dense = p.model.sam_prompt_encoder(points=(box_coords, box_labels), boxes=None, masks=None)
        high_res = [feat[-1].unsqueeze(0) for feat in p._features["high_res_feats"]]
        low_res, iou, _, _ = p.model.sam_mask_decoder(
            image_embeddings=p._features["image_embed"][-1].unsqueeze(0),
            image_pe=p.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            repeat_image=len(boxes) > 1,
            high_res_features=high_res,
        )
        return low_res.float(), iou[:, 0].float().cpu().numpy()

    def _upsample_crop(self, low_res, window, image_hw) -> np.ndarray:
        """Bilinear samples of the (1, 1, 256, 256) logits at the window's pixel centres, thresholded at 0.

        grid_sample with align_corners=False and border padding samples source coordinate
        (x + 0.5) * 256 / W - 0.5, clamped to the grid, which is what F.interpolate to (H, W) samples."""
        torch = self._torch
        height, width = image_hw
        x0, y0, x1, y1 = window
        xs = (torch.arange(x0, x1, device=low_res.device, dtype=torch.float32) + 0.5) * (2.0 / width) - 1.0
        ys = (torch.arange(y0, y1, device=low_res.device, dtype=torch.float32) + 0.5) * (2.0 / height) - 1.0
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1)[None]
        logits = torch.nn.functional.grid_sample(
            low_res, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        return (logits[0, 0] > self.predictor.mask_threshold).cpu().numpy()
