"""What the segmenter step does with its requests, apart from Triton (model_repository/segmenter wires it in).

A request with SEG_BOXES is a frame to segment: its boxes decoded from the embedding an early call kept for it
(KEPT_EMBEDDING, anomaly.serving.embeddings), else from its image embedded now, whole or in full-resolution
windows around the boxes for a tiled frame (anomaly.tiling). A request without SEG_BOXES is an early call: its
image embedded and kept while SAM is idle, answered with the key (EMBEDDING_KEY, empty where declined).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from anomaly import masks
from anomaly.config import Settings
from anomaly.errors import InputError
from anomaly.serving import step_inputs, tensors
from anomaly.serving.embeddings import EarlyEmbeddings, EarlyImage
from anomaly.serving.overlap import Answered


def strings(items: list[bytes]) -> np.ndarray:
    """A (1, N) tensor of bytes objects: a string output of a step with a batch axis."""
    return tensors.bytes_tensor(items).reshape(1, len(items))


def pack_crops(crops: list) -> dict[str, np.ndarray]:
    """One frame's MaskCrops as the step's outputs (a leading batch axis of 1), masks bit-packed."""
    return {
        "MASK_BOXES": np.asarray([c.box for c in crops], np.int32).reshape(1, len(crops), 4),
        "MASKS": strings([masks.pack(c.mask) for c in crops]),
        "MASK_SCORES": np.asarray([c.score for c in crops], np.float32).reshape(1, len(crops)),
    }


def sam_windows(frames: list) -> np.ndarray:
    """The windows SAM embedded for one frame, (1, K, 4) x0 y0 x1 y1: the response says how the frame was cut."""
    return np.asarray([f.window for f in frames], np.int32).reshape(1, len(frames), 4)


class SamStep:
    """`take_in(get, idle)` for each request (`get(name)` is the input's array or None), then `run(items, info)`
    over a batch of what was taken in: one outputs dict per item."""

    def __init__(self, segmenter, settings: Settings, max_batch: int, observe: Callable[[str], None] | None = None):
        self.segmenter, self.settings, self.max_batch = segmenter, settings, max_batch
        # a few batches' worth: early embeddings are made only while SAM is idle, so few wait at once
        self.early = EarlyEmbeddings(segmenter, capacity=4 * max_batch, observe=observe)

    def take_in(self, get: Callable[[str], np.ndarray | None], idle: bool):
        s = self.settings
        plan = step_inputs.tile_plan("TILING", step_inputs.required("TILING", get("TILING")), s.max_image_pixels)

        def image() -> bytes:  # read where it is decoded: not for a declined early call or a kept embedding
            return step_inputs.encoded_image("ENCODED", step_inputs.required("ENCODED", get("ENCODED")))

        seg_boxes = get("SEG_BOXES")
        if seg_boxes is None:  # an early call: embedded and kept, or declined at once
            taken = self.early.offer(image, plan.tiled, idle, s.max_image_bytes, s.max_image_pixels)
            return taken if taken is not None else Answered({"EMBEDDING_KEY": strings([b""])})
        kept = get("KEPT_EMBEDDING")
        key = step_inputs.text("KEPT_EMBEDDING", kept) if kept is not None else ""
        # taken first: a frame without boxes frees it too; the image sent with the key must be the key's
        embedding = self.early.take(key, image() if get("ENCODED") is not None else None) if key else None
        # a copy: the request's tensors are gone once execute returns, and with OVERLAP_BATCHES SAM runs later
        boxes = step_inputs.finite("SEG_BOXES", seg_boxes).reshape(-1, 4).copy()
        step_inputs.at_most("SEG_BOXES", len(boxes), s.max_detections)
        if not len(boxes):  # nothing to segment: no decoding, no SAM
            return []
        if embedding is not None and tuple(embedding.hw) != tuple(plan.image_hw):  # another frame's key
            raise InputError("KEPT_EMBEDDING", f"is the key of a {embedding.hw} image, not of this {plan.image_hw} one")
        if embedding is not None and not plan.tiled:
            return self.segmenter.embedded_windows(embedding, boxes)
        return self.segmenter.prepare_windows(image(), boxes, plan.tiled, s.max_image_bytes, s.max_image_pixels)

    def run(self, items: list, info: dict) -> list[dict]:
        outputs: list = [None] * len(items)
        early = [i for i, item in enumerate(items) if isinstance(item, EarlyImage)]
        for i, key in zip(early, self.early.embed([items[i] for i in early], self.max_batch)):
            outputs[i] = {"EMBEDDING_KEY": strings([key.encode()])}
        frames = [item for item in items if not isinstance(item, EarlyImage)]
        if frames:
            # the windows of every frame in the batch are embedded together, max_batch at a time
            crops_per_frame = iter(self.segmenter.segment_windows(frames, self.max_batch))
            described = strings([json.dumps(info).encode()])
            for i, item in enumerate(items):
                if outputs[i] is None:
                    outputs[i] = pack_crops(next(crops_per_frame)) | {
                        "SEGMENTER": described,
                        "SAM_WINDOWS": sam_windows(item),
                    }
        return outputs
