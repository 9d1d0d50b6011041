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
    """SAM2.1 prompted with boxes: frames are embedded in batches (the image encoder, once per frame), then
    every box of every frame is decoded from its frame's embedding."""

    name = "sam2.1"

    def __init__(self, variant: str, checkpoint: str | Path | None, device: str = "auto", threads: int = 0):
        import torch
        from sam2.build_sam import build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        from anomaly.cuda_graphs import GraphedForward

        if threads:
            torch.set_num_threads(threads)
        self.variant = variant
        self.device = resolve_device(device)
        model = build_sam2(SAM2_CONFIGS[variant], ckpt_path=str(checkpoint) if checkpoint else None, device=self.device)
        self.predictor = SAM2ImagePredictor(model)  # its transforms, feature sizes and threshold are the reference
        self.model = model
        self.resolution = model.image_size
        self._torch = torch
        self._encoder = GraphedForward(self._embed, self._autocast)

    def _autocast(self):
        torch = self._torch
        if self.device == "cuda":  # no weight-cast cache: it cannot live across CUDA graph replays
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        return torch.autocast("cpu", enabled=False)

    def use_cuda_graphs(self, max_batch: int) -> None:
        """On a GPU, replay the image encoder from CUDA graphs for batches of up to `max_batch` frames."""
        if self.device == "cuda":
            shape = (3, self.resolution, self.resolution)
            self._encoder.capture(shape, self._torch.float32, self.device, max_batch, "SAM image encoder")

    @property
    def runtime(self) -> str:
        precision = "bf16 autocast" if self.device == "cuda" else "fp32"
        return f"{precision} on {self.device}, image encoder {self._encoder.note}"

    # --- preparing frames ---
    def prepare(self, data: bytes, max_bytes: int, max_pixels: int, field: str = "image"):
        """Encoded image -> (SAM input (3, S, S) on this segmenter's device, (height, width)); decoded on the
        GPU when there is one (images.decode_to_tensor)."""
        from anomaly.images import decode_to_tensor, sam_input

        chw = decode_to_tensor(data, self.device, max_bytes, max_pixels, field)
        return sam_input(chw, self.resolution), (int(chw.shape[1]), int(chw.shape[2]))

    def prepare_rgb(self, rgb: np.ndarray):
        """RGB uint8 (H, W, 3) -> (SAM input, (height, width)), as SAM2ImagePredictor.set_image prepares it."""
        from anomaly.images import sam_input

        chw = self._torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).to(self.device)
        return sam_input(chw, self.resolution), rgb.shape[:2]

    # --- the model ---
    def embed(self, inputs) -> dict:
        """(K, 3, S, S) prepared frames -> their features, as SAM2ImagePredictor.set_image_batch computes them."""
        return self._encoder(inputs)

    def _embed(self, inputs) -> dict:
        model, p = self.model, self.predictor
        backbone_out = model.forward_image(inputs)
        _, vision_feats, _, _ = model._prepare_backbone_features(backbone_out)
        if model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
        k = inputs.shape[0]
        feats = [
            feat.permute(1, 2, 0).view(k, -1, *size) for feat, size in zip(vision_feats[::-1], p._bb_feat_sizes[::-1])
        ][::-1]
        return {"image_embed": feats[-1], "high_res_feats": feats[:-1]}

    def decode(self, features: dict, frames: np.ndarray, boxes: np.ndarray, sizes: np.ndarray):
        """Prompt encoder + mask decoder for `boxes` (N, 4) xyxy, box i on frame `frames[i]` of size `sizes[i]`
        (height, width), as SAM2ImagePredictor._predict minus its full-frame upsample.
        -> (low-res logits (N, 1, 256, 256) float32, predicted IoU (N,) numpy)."""
        torch = self._torch
        device = features["image_embed"].device
        frame_index = torch.as_tensor(frames, dtype=torch.long, device=device)
        wh = torch.as_tensor(np.asarray(sizes, np.float32)[:, ::-1].copy(), device=device)[:, None, :]
        coords = torch.as_tensor(np.asarray(boxes, np.float32), device=device).reshape(-1, 2, 2)
        coords = coords / wh * self.resolution  # SAM2Transforms.transform_boxes(normalize=True)
        labels = torch.tensor([[2, 3]], dtype=torch.int, device=device).repeat(len(boxes), 1)
        sparse, dense = self.model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        low_res, iou, _, _ = self.model.sam_mask_decoder(
            image_embeddings=features["image_embed"][frame_index],
            image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            repeat_image=False,  # one embedding per box, gathered above: boxes of several frames in one call
            high_res_features=[feat[frame_index] for feat in features["high_res_feats"]],
        )
        return low_res.float(), iou[:, 0].float().cpu().numpy()

    # --- what the pipeline calls ---
    def segment_batch(self, frames: list[tuple]) -> list[list[MaskCrop]]:
        """[(prepared input, (height, width), boxes (N, 4) xyxy)] -> one MaskCrop list per frame. Frames without
        boxes cost nothing; the others are embedded as one batch."""
        torch = self._torch
        out: list[list[MaskCrop]] = [[] for _ in frames]
        busy = [i for i, (_, _, boxes) in enumerate(frames) if len(boxes)]
        if not busy:
            return out
        frame_of_box = np.concatenate([np.full(len(frames[i][2]), k) for k, i in enumerate(busy)])
        boxes = np.concatenate([np.asarray(frames[i][2], np.float32).reshape(-1, 4) for i in busy])
        sizes = np.asarray([frames[i][1] for i in busy])[frame_of_box]
        with torch.inference_mode(), self._autocast():
            features = self.embed(torch.stack([frames[i][0] for i in busy]).to(self.device))
            # On a GPU all boxes go through the decoder at once; on a CPU one at a time is faster.
            step = len(boxes) if self.device == "cuda" else 1
            windows, masks, scores = [], [], []
            for start in range(0, len(boxes), step):
                part = slice(start, start + step)
                low_res, iou = self.decode(features, frame_of_box[part], boxes[part], sizes[part])
                for j, box in enumerate(boxes[part]):
                    hw = tuple(int(v) for v in sizes[start + j])
                    windows.append(crop_box(box, hw))
                    masks.append(self._upsample_crop(low_res[j : j + 1], windows[-1], hw))
                    scores.append(float(np.clip(iou[j], 0.0, 1.0)))
            # one device-to-host copy for all masks: each copy waits for the GPU
            flat = torch.cat([m.reshape(-1) for m in masks]).cpu().numpy()
            ends = np.cumsum([m.numel() for m in masks])
            crops = [
                MaskCrop(w, part.reshape(m.shape), score)
                for w, m, part, score in zip(windows, masks, np.split(flat, ends[:-1]), scores)
            ]
        for k, i in enumerate(busy):
            out[i] = [c for c, f in zip(crops, frame_of_box) if f == k]
        return out

    def segment(self, rgb: np.ndarray, boxes: np.ndarray) -> list[MaskCrop]:
        """RGB uint8 (H, W, 3) and float boxes (N, 4) xyxy -> one MaskCrop per box."""
        if len(boxes) == 0:
            return []
        prepared, hw = self.prepare_rgb(rgb)
        return self.segment_batch([(prepared, hw, boxes)])[0]

    def _upsample_crop(self, low_res, window, image_hw):
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
        return logits[0, 0] > self.predictor.mask_threshold
