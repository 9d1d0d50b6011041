"""Box-prompted segmentation: one image embedding per frame, every box of the frame decoded from it.

Masks stay at box-crop size: SAM's low-resolution logits (256 x 256 for SAM2.1, 288 x 288 for SAM3) are
upsampled only over each box, sampled exactly where the predictor's full-frame bilinear upsample would sample
them, so the crops equal its full-frame masks cut to the box without ever allocating N full frames.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
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
# Mask-decoder CUDA graphs are captured for every box count from 1 to 16: a frame's boxes replay the graph of
# their count, more than 16 go in chunks of 16. The decoder's cost grows with its boxes (each box decodes from
# its own copy of the frame's embedding: 3.6 GFLOP and 165 MiB of tensors a box, bench.activation_memory), so
# padding 10 boxes to a 16-box graph cost 6/16 of it. The graphs share one pool, sized by the largest.
DECODER_GRAPH_SIZES = tuple(range(1, 17))


@dataclass
class MaskCrop:
    box: tuple[int, int, int, int]  # x0, y0, x1, y1: pixel edges, the mask covers columns x0..x1-1
    mask: np.ndarray  # (y1 - y0, x1 - x0) bool
    score: float  # SAM's predicted IoU, clipped to [0, 1]


@dataclass
class Embedding:
    """One image's features from SAM's image encoder, made before its boxes were known (early embedding,
    anomaly.serving.embeddings): the image embedding and the high-resolution features, each with a batch axis
    of 1, on the segmenter's device, and the size of the image they were made from."""

    tensors: tuple
    hw: tuple[int, int]


@dataclass
class SamFrame:
    """One image SAM embeds for a frame: the whole frame, or a window of a tiled frame."""

    window: tuple[int, int, int, int]  # x0, y0, x1, y1 in the frame's pixels
    held: list[int]  # which of the frame's boxes are decoded from it
    make_input: Callable[[], object]  # makes the (3, S, S) tensor when its batch is embedded (12 MB each)
    boxes: np.ndarray  # those boxes (len(held), 4) in the window's pixels
    embedded: Embedding | None = None  # its features, where they were made beforehand (then no encoder pass)

    @property
    def hw(self) -> tuple[int, int]:
        return self.window[3] - self.window[1], self.window[2] - self.window[0]


def pixel_windows(boxes: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Float boxes (N, 4) -> (N, 4) int64: for each, the integer pixel window that contains it, at least one
    pixel, inside the image."""
    height, width = image_hw
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    x0 = np.clip(np.floor(boxes[:, 0]), 0, width - 1)
    y0 = np.clip(np.floor(boxes[:, 1]), 0, height - 1)
    x1 = np.maximum(np.minimum(np.ceil(boxes[:, 2]), width), x0 + 1)
    y1 = np.maximum(np.minimum(np.ceil(boxes[:, 3]), height), y0 + 1)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.int64)


def host_box_coords(boxes: np.ndarray, image_hw: tuple[int, int], resolution: int) -> np.ndarray:
    """Boxes (N, 4) xyxy in pixels of a frame of `image_hw` -> (N, 2, 2) float32 corner points in SAM input
    pixels: each corner divided by the frame's (width, height) and times the input size, in float32, as
    SAM2Transforms.transform_boxes(normalize=True) computes them with torch."""
    height, width = image_hw
    coords = np.asarray(boxes, np.float32).reshape(-1, 2, 2)
    return coords / np.asarray([width, height], np.float32) * np.float32(resolution)


def _no_input():
    raise RuntimeError("this frame was embedded beforehand: it has no input to make")


def frame_features(features: dict, frame: int) -> tuple:
    """Frame `frame` of a batch's features (from embed) as the mask decoder takes them: (image embedding,
    high-resolution features 0 and 1), each with a batch axis of 1 (views, nothing copied)."""
    return (features["image_embed"][frame : frame + 1], *(f[frame : frame + 1] for f in features["high_res_feats"]))


def resolve_device(device: str) -> tuple[str, str]:
    """DEVICE -> (where SAM runs, a warning where that is the CPU on a machine with a GPU, else "")."""
    import torch

    from anomaly.hardware import gpu_unseen_warning, has_gpu

    if device == "cpu":
        return "cpu", ""
    if torch.cuda.is_available():
        return "cuda", ""
    if has_gpu():
        warning = gpu_unseen_warning("SAM")
    elif device == "cuda":
        warning = "DEVICE=cuda but torch sees no GPU: SAM runs on the CPU"
    else:
        return "cpu", ""
    log.warning(warning)
    return "cpu", warning


def ready_for_serving(segmenter, settings, max_batch: int) -> None:
    """What a loaded SAM gets before it serves, as the settings ask: its image encoder (SAM_COMPILE=encoder) or
    also its mask decoder (all) compiled by inductor, then its CUDA graphs (CUDA_GRAPHS) for batches of up to
    `max_batch` frames. The Triton step and the in-process pipeline both call this."""
    if settings.sam_compile in ("encoder", "all"):
        segmenter.compile_encoder()
    if settings.sam_compile == "all":
        segmenter.compile_decoder()
    if settings.cuda_graphs:
        segmenter.use_cuda_graphs(max_batch)


class CompiledForward:
    """`forward` through torch.compile (inductor, default mode), compiled on its first call. If compiling fails
    (inductor builds its kernels with a C compiler at run time, which an image may lack), it runs `forward` itself
    from then on, with a warning in the log and `state` saying so (/info, responses' models): a failed compile
    costs speed, not every request."""

    def __init__(self, torch, forward: Callable, dynamic: bool, part: str):
        import os

        self.eager, self.part, self.failed = forward, part, torch._dynamo.exc.TorchDynamoException
        self.compiled: Callable | None = torch.compile(forward, dynamic=dynamic)
        self.state = "compiled by inductor"
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default")
        log.info("SAM %s: compiled by inductor on its first forward (cache %s)", part, cache)

    def __call__(self, *args):
        if self.compiled is None:
            return self.eager(*args)
        try:
            return self.compiled(*args)
        except self.failed as exc:  # compiling failed, not the model: the eager forward serves
            log.warning("SAM %s: torch.compile failed, running eager from now on: %s", self.part, exc)
            self.compiled, self.state = None, f"eager (torch.compile failed: {type(exc).__name__})"
            return self.eager(*args)


def store_in_bf16(module) -> int:
    """Keep the weights and biases of `module`'s linear and (transposed) convolution layers in bf16; returns how
    many values. Under bf16 autocast these layers cast them to bf16 in every forward anyway (the cast cache is
    off: it cannot live across CUDA graph replays), so the outputs are the same bit for bit, while the fp32
    copies (0.85 GB for SAM2.1-L's image encoder) and the casts go: 1.3 GB of memory traffic an encoder forward,
    and about a hundred small kernels each mask-decoder forward. Norms, embeddings and position embeddings stay
    fp32, as autocast runs them."""
    import torch

    count = 0
    for layer in module.modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            for param in layer.parameters(recurse=False):
                param.data = param.data.to(torch.bfloat16)
                count += param.numel()
    return count


class Sam2Segmenter:
    """SAM2.1 prompted with boxes: frames are embedded in batches (the image encoder, once per frame), then
    every box of every frame is decoded from its frame's embedding.

    What its callers use: `prepare_windows` (a frame and its boxes -> what SAM embeds: the frame, or a tiled
    photo's windows), `segment_windows` (those frames -> a mask crop per box); for early embedding `image_to_embed`,
    `embed_images` and `embedded_windows`; `use_cuda_graphs`, `compile_encoder` and `compile_decoder` to set it up
    for serving (ready_for_serving); and `runtime`, `device`, `warning`, `resolution` to describe it. The rest is
    its own (benchmarks and tests time and check those pieces)."""

    name = "sam2.1"

    def __init__(self, variant: str, checkpoint: str | Path | None, device: str = "auto", threads: int = 0):
        from sam2.build_sam import build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.variant = variant
        self._start(device, threads)
        model = build_sam2(SAM2_CONFIGS[variant], ckpt_path=str(checkpoint) if checkpoint else None, device=self.device)
        if self.device == "cuda":
            store_in_bf16(model.image_encoder)
            store_in_bf16(model.sam_mask_decoder)  # its conv_s0 / conv_s1 are run on the encoder's features too
        self.predictor = SAM2ImagePredictor(model)  # its transforms, feature sizes and threshold are the reference
        self.model = model  # forward_image, and the prompt encoder and mask decoder every box goes through
        self.resolution = model.image_size

    def _start(self, device: str, threads: int) -> None:
        """What every SAM of this interface sets up before its model: threads, device, the graphed forwards."""
        import torch

        from anomaly.cuda_graphs import GraphedForward

        if threads:
            torch.set_num_threads(threads)
        self.device, self.warning = resolve_device(device)
        self._torch = torch
        self._encoder = GraphedForward(self._embed, self._autocast)
        self._decoder = GraphedForward(self._decode_boxes, self._autocast)
        self._box_labels = torch.tensor([[2, 3]], dtype=torch.int, device=self.device)

    def _autocast(self):
        torch = self._torch
        if self.device == "cuda":  # no weight-cast cache: it cannot live across CUDA graph replays
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        return torch.autocast("cpu", enabled=False)

    def compile_encoder(self) -> None:
        """The image encoder through torch.compile (inductor, default mode: autotuning did not finish in 5
        minutes for SAM2.1-L on an H100). It compiles on its first forward at each batch size, which the CUDA
        graphs' warm-up makes before capturing the compiled kernels. Inductor keeps what it built in
        TORCHINDUCTOR_CACHE_DIR, which the launcher sets to WEIGHTS_DIR/inductor_cache for Triton's model processes
        (unless the operator set it), so the next start on the same volume is quicker."""
        self._encoder.forward = CompiledForward(self._torch, self._embed, False, "image encoder")

    def compile_decoder(self) -> None:
        """The prompt encoder + mask decoder through torch.compile, like the encoder (compile_encoder), but dynamic
        in the box count: one compile serves the counts 2 and up (torch specialises a count of 1, a second one),
        where a static compile per count would be 16 of them before the decoder's CUDA graphs are captured."""
        self._decoder.forward = CompiledForward(self._torch, self._decode_boxes, True, "mask decoder")

    def use_cuda_graphs(self, max_batch: int) -> None:
        """On a GPU, replay the image encoder from CUDA graphs for batches of up to `max_batch` frames, and the
        prompt encoder + mask decoder for each box count of DECODER_GRAPH_SIZES (more go in chunks)."""
        from anomaly.cuda_graphs import graph_batch_sizes

        if self.device != "cuda":
            return
        torch = self._torch
        shape = (3, self.resolution, self.resolution)
        # one pool for both: a frame's boxes are decoded after its embedding, never during (SAM2.1-L, counted on
        # the CPU: encoder 540 MiB of activations at batch 2, decoder 387 MiB for 16 boxes; the sum otherwise)
        pool = torch.cuda.graph_pool_handle()
        sizes = graph_batch_sizes(max_batch)
        self._encoder.capture(shape, torch.float32, self.device, sizes, "SAM image encoder", pool=pool)
        with torch.inference_mode(), self._autocast():
            features = self._encode(torch.zeros((1, *shape), device=self.device))
        frame = (features["image_embed"], *features["high_res_feats"])
        self._decoder.capture(
            (2, 2), torch.float32, self.device, list(DECODER_GRAPH_SIZES), "SAM mask decoder", frame, pool=pool
        )

    @property
    def runtime(self) -> str:
        precision = "bf16 autocast, encoder and mask decoder weights in bf16" if self.device == "cuda" else "fp32"

        def compiled(part) -> str:
            forward = part.forward
            return f"{forward.state}, " if isinstance(forward, CompiledForward) else ""

        return (
            f"{precision} on {self.device}, image encoder {compiled(self._encoder)}{self._encoder.note}, "
            f"mask decoder {compiled(self._decoder)}{self._decoder.note}"
        )

    # --- preparing frames ---
    def _prepare(self, data: bytes, max_bytes: int, max_pixels: int, field: str = "image"):
        """Encoded image -> (SAM input (3, S, S) on this segmenter's device, (height, width)); decoded on the
        GPU when there is one (images.decode_to_tensor)."""
        from anomaly.images import decode_to_tensor

        chw = decode_to_tensor(data, self.device, max_bytes, max_pixels, field)
        return self._model_input(chw), (int(chw.shape[1]), int(chw.shape[2]))

    def prepare_windows(self, data: bytes, boxes: np.ndarray, tiled: bool, max_bytes: int, max_pixels: int,
                        field: str = "image") -> list[SamFrame]:  # fmt: skip
        """Encoded image and its boxes (N, 4) -> what SAM embeds for them: the whole image, or for a tiled frame
        full-resolution windows around groups of the boxes (anomaly.tiling.sam_windows), each with its boxes."""
        from anomaly.images import decode_to_tensor
        from anomaly.tiling import sam_windows

        chw = decode_to_tensor(data, self.device, max_bytes, max_pixels, field)
        height, width = int(chw.shape[1]), int(chw.shape[2])
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if not tiled:
            return [SamFrame((0, 0, width, height), list(range(len(boxes))), lambda: self._model_input(chw), boxes)]
        out = []
        for (x0, y0, x1, y1), held in sam_windows(boxes, (height, width), self.resolution):
            local = boxes[held] - np.array([x0, y0, x0, y0], np.float32)
            make = functools.partial(self._model_input, chw[:, y0:y1, x0:x1])  # a view: nothing copied yet
            out.append(SamFrame((x0, y0, x1, y1), held, make, local))
        return out

    def image_to_embed(self, data: bytes, max_bytes: int, max_pixels: int, field: str = "image") -> tuple:
        """Encoded image -> (make_input, (height, width)) for embed_images: decoded now (on the GPU when there is
        one), its SAM input made when its batch is embedded."""
        from anomaly.images import decode_to_tensor

        chw = decode_to_tensor(data, self.device, max_bytes, max_pixels, field)
        return functools.partial(self._model_input, chw), (int(chw.shape[1]), int(chw.shape[2]))

    @staticmethod
    def embedded_windows(embedding: Embedding, boxes: np.ndarray) -> list[SamFrame]:
        """The whole image SAM embedded beforehand (embed_images) and its boxes, as prepare_windows gives an
        untiled image: nothing to decode, nothing to embed."""
        height, width = embedding.hw
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        return [SamFrame((0, 0, width, height), list(range(len(boxes))), _no_input, boxes, embedding)]

    def segment_windows(self, frames: list[list[SamFrame]], max_batch: int) -> list[list[MaskCrop]]:
        """Each image's SamFrames (prepare_windows) -> one MaskCrop per box of the image, in its box order and
        its pixels. The frames of all images are embedded `max_batch` at a time, their inputs made per batch."""
        flat = [f for image in frames for f in image]
        crops: list[list[MaskCrop]] = []
        for start in range(0, len(flat), max(1, max_batch)):
            chunk = flat[start : start + max(1, max_batch)]
            crops += self._segment_batch([(f.embedded or f.make_input(), f.hw, f.boxes) for f in chunk])
        found = iter(crops)
        out = []
        for image in frames:
            ordered: list[MaskCrop] = [None] * sum(len(f.held) for f in image)  # type: ignore[list-item]
            for f in image:
                x0, y0 = f.window[:2]
                for j, c in zip(f.held, next(found)):
                    box = (c.box[0] + x0, c.box[1] + y0, c.box[2] + x0, c.box[3] + y0)
                    ordered[j] = MaskCrop(box, c.mask, c.score)
            out.append(ordered)
        return out

    def _prepare_rgb(self, rgb: np.ndarray):
        """RGB uint8 (H, W, 3) -> (SAM input, (height, width)), as SAM2ImagePredictor.set_image prepares it."""
        chw = self._torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).to(self.device)
        return self._model_input(chw), rgb.shape[:2]

    def _model_input(self, chw):
        """Upright RGB uint8 (3, H, W) -> the image encoder's input, as SAM2ImagePredictor.set_image makes it."""
        from anomaly.images import sam_input

        return sam_input(chw, self.resolution)

    # --- the model ---
    def _encode(self, inputs) -> dict:
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

    def _box_coords(self, boxes: np.ndarray, image_hw):
        """Boxes (N, 4) xyxy in pixels of a frame of `image_hw` -> (N, 2, 2) corner points in SAM input
        pixels, as SAM2Transforms.transform_boxes(normalize=True) makes them (the same float32 division and
        product, done on the host), on this segmenter's device."""
        return self._to_device(host_box_coords(boxes, image_hw, self.resolution))

    def _to_device(self, array: np.ndarray):
        """A small host array on this segmenter's device without waiting for the GPU: copied from pinned memory
        asynchronously. A copy from ordinary memory waits until everything queued on the GPU has run (torch
        synchronises it), which after the image encoder's launch would leave the CPU idle for its whole run
        and then the card idle while the CPU launches the next step."""
        tensor = self._torch.from_numpy(np.ascontiguousarray(array))
        if self.device != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _decode_boxes(self, coords, image_embed, high_res_0, high_res_1):
        """Prompt encoder + mask decoder for the boxes `coords` (N, 2, 2) of one frame, from that frame's
        features (batch 1, broadcast over the boxes), as SAM2ImagePredictor._predict minus its full-frame
        upsample. -> (low-res logits (N, 1, h, w) float32, predicted IoU (N,) float32). No host copies
        or synchronisation: it is captured as a CUDA graph per box count."""
        labels = self._box_labels.expand(coords.shape[0], 2)  # a box is corner points labelled 2 and 3
        sparse, dense = self.model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        low_res, iou, _, _ = self.model.sam_mask_decoder(
            image_embeddings=image_embed,
            image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            repeat_image=True,
            high_res_features=[high_res_0, high_res_1],
        )
        return low_res.float(), iou[:, 0].float()

    def _decode(self, features: dict, frame: int, coords):
        """The boxes `coords` (from box_coords) of frame `frame` of `features` (from embed)."""
        return self._decoder(coords, *frame_features(features, frame))

    # --- a batch of frames ---
    def _segment_batch(self, frames: list[tuple]) -> list[list[MaskCrop]]:
        """[(prepared input or its Embedding, (height, width), boxes (N, 4) xyxy)] -> one MaskCrop list per frame.
        Frames without boxes cost nothing; the others that are not embedded yet are embedded as one batch, then
        each frame's boxes are decoded from its own embedding: on a GPU as many at once as the largest
        mask-decoder graph holds (all when eager), on a CPU one at a time (faster there)."""
        torch = self._torch
        out: list[list[MaskCrop]] = [[] for _ in frames]
        busy = [i for i, (_, _, boxes) in enumerate(frames) if len(boxes)]
        if not busy:
            return out
        with torch.inference_mode(), self._autocast():
            # the boxes go to the device before the encoder is launched: nothing after it waits for the GPU
            # until the masks come back in one copy
            all_coords = [self._box_coords(frames[i][2], frames[i][1]) for i in busy]
            own = {i: frames[i][0].tensors for i in busy if isinstance(frames[i][0], Embedding)}
            to_embed = [i for i in busy if i not in own]
            if to_embed:
                features = self._encode(torch.stack([frames[i][0] for i in to_embed]).to(self.device))
                own.update((i, frame_features(features, k)) for k, i in enumerate(to_embed))
            low_res, ious = [], []
            for i, coords in zip(busy, all_coords):
                step = 1 if self.device != "cuda" else (self._decoder.max_batch or len(coords))
                for start in range(0, len(coords), step):
                    logits, iou = self._decoder(coords[start : start + step], *own[i])
                    low_res.append(logits)
                    ious.append(iou)
            boxes32 = [np.asarray(frames[i][2], np.float32) for i in busy]  # the prompts SAM was given
            windows = [[tuple(w) for w in pixel_windows(b, frames[i][1]).tolist()] for b, i in zip(boxes32, busy)]
            sizes = [frames[i][1] for i, frame_windows in zip(busy, windows) for _ in frame_windows]
            flat_windows = [w for frame_windows in windows for w in frame_windows]
            masks = self._upsample_crops(self._postprocess_logits(torch.cat(low_res)), flat_windows, sizes)
            scores = np.clip(torch.cat(ious).cpu().numpy(), 0.0, 1.0)
        crops = iter(MaskCrop(w, m, float(s)) for w, m, s in zip(flat_windows, masks, scores))
        for i, frame_windows in zip(busy, windows):
            out[i] = [next(crops) for _ in frame_windows]
        return out

    def embed_images(self, images: list[tuple], max_batch: int) -> list[Embedding]:
        """[(make_input, (height, width))] -> each image's Embedding, kept for its boxes to come (early
        embedding): embedded `max_batch` at a time, each copied out of its batch so it holds only its own."""
        torch = self._torch
        out = []
        step = max(1, max_batch)
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(images), step):
                chunk = images[start : start + step]
                features = self._encode(torch.stack([make() for make, _ in chunk]).to(self.device))
                for k, (_, hw) in enumerate(chunk):
                    out.append(Embedding(tuple(t.clone() for t in frame_features(features, k)), hw))
        return out

    def _postprocess_logits(self, low_res):
        """The reference predictor's clean-up of low-resolution logits before upsampling: none for SAM2.1
        (SAM2ImagePredictor's hole and sprinkle areas default to 0)."""
        return low_res

    def _upsample_crops(self, low_res, windows: list, sizes: list, budget: int = 1 << 23) -> list[np.ndarray]:
        """Bilinear samples of the (N, 1, h, w) logits at each window's pixel centres, thresholded at 0:
        box j's crop of what F.interpolate of its logits to its frame's (height, width) would give.

        grid_sample with align_corners=False and border padding samples source coordinate
        (x + 0.5) * w / W - 0.5, clamped to the grid, which is what F.interpolate to (H, W) samples. Boxes go
        through grid_sample together, padded to the largest window of their group (groups of similar size,
        at most `budget` samples each), and come to the host in one copy: per box, the handful of small
        kernels and the copy each waited on the GPU."""
        torch = self._torch
        areas = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in windows]
        order = sorted(range(len(windows)), key=lambda j: -areas[j])
        groups, group, tall, wide = [], [], 0, 0
        for j in order:
            x0, y0, x1, y1 = windows[j]
            t, w = max(tall, y1 - y0), max(wide, x1 - x0)
            if group and (len(group) + 1) * t * w > budget:
                groups.append((group, tall, wide))
                group, t, w = [], y1 - y0, x1 - x0
            group, tall, wide = [*group, j], t, w
        if group:
            groups.append((group, tall, wide))
        device = low_res.device
        parts = []
        for group, tall, wide in groups:
            box = np.asarray([windows[j] for j in group], np.float32)
            # the per-pixel scale 2 / size as float32 of the float64 quotient, as a Python scalar would give
            scale = np.asarray([(2.0 / sizes[j][1], 2.0 / sizes[j][0]) for j in group], np.float32)
            scale, corner = (self._to_device(a).to(device) for a in (scale, box[:, :2]))
            xs = (corner[:, :1] + torch.arange(wide, device=device, dtype=torch.float32) + 0.5) * scale[:, :1] - 1.0
            ys = (corner[:, 1:] + torch.arange(tall, device=device, dtype=torch.float32) + 0.5) * scale[:, 1:] - 1.0
            grid = torch.stack([xs[:, None, :].expand(-1, tall, -1), ys[:, :, None].expand(-1, -1, wide)], dim=-1)
            logits = torch.nn.functional.grid_sample(
                low_res[group], grid, mode="bilinear", padding_mode="border", align_corners=False
            )
            parts.append((logits[:, 0] > self.predictor.mask_threshold).reshape(-1))
        flat = torch.cat(parts).cpu().numpy()  # one device-to-host copy: each copy waits for the GPU
        masks: list[np.ndarray] = [None] * len(windows)  # type: ignore[list-item]
        offset = 0
        for group, tall, wide in groups:
            block = flat[offset : offset + len(group) * tall * wide].reshape(len(group), tall, wide)
            offset += block.size
            for k, j in enumerate(group):
                x0, y0, x1, y1 = windows[j]
                masks[j] = np.ascontiguousarray(block[k, : y1 - y0, : x1 - x0])
        return masks
