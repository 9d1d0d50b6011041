"""Triton step 4: box-prompted SAM3 or SAM2.1 masks as bit-packed box crops, the frames of a dynamic batch
embedded together (anomaly.segmenter, anomaly.sam3; which one: anomaly.weights); a tiled frame is embedded as
full-resolution windows around its boxes (anomaly.tiling). With EARLY_EMBEDDING the ensemble first calls it with
the image alone, in parallel with the detector: the embedding is made then and kept for the boxes' call
(anomaly.serving.embeddings)."""

import json

import numpy as np

from anomaly import masks
from anomaly.config import settings
from anomaly.segmenter import ready_for_serving
from anomaly.serving import step_inputs, triton_io
from anomaly.serving.embeddings import EarlyEmbeddings, EarlyImage
from anomaly.serving.overlap import Answered
from anomaly.serving.plan import config_parameter
from anomaly.weights import UNTRAINED_BANNER, load_segmenter, segmenter_info, segmenter_title


def pack_crops(crops: list) -> dict[str, np.ndarray]:
    """One frame's MaskCrops as this step's outputs (a leading batch axis of 1), masks bit-packed."""
    packed = np.empty((1, len(crops)), dtype=np.object_)
    for i, c in enumerate(crops):
        packed[0, i] = masks.pack(c.mask)
    return {
        "MASK_BOXES": np.asarray([c.box for c in crops], np.int32).reshape(1, len(crops), 4),
        "MASKS": packed,
        "MASK_SCORES": np.asarray([c.score for c in crops], np.float32).reshape(1, len(crops)),
    }


def key_tensor(key: str) -> np.ndarray:
    return triton_io.bytes_tensor([key.encode()]).reshape(1, 1)


class TritonPythonModel(triton_io.BatchedStage):
    uses_gpu = True

    def setup(self, args):
        self.segmenter, spec = load_segmenter(settings())
        max_batch = triton_io.max_batch_size(args)
        ready_for_serving(self.segmenter, settings(), max_batch)  # SAM_COMPILE, CUDA_GRAPHS
        self.loaded = segmenter_info(self.segmenter, spec)
        triton_io.log.info("segmenter: %s", self.loaded)
        if spec.untrained:
            title = segmenter_title(spec.kind, spec.variant)
            triton_io.log.warning(UNTRAINED_BANNER.format(what=f"the segmenter ({title})"))
        triton_io.release_gpu_cache_after_load("segmenter")
        self.early = config_parameter(args, "early_embedding", "off") == "on"  # whether the ensemble asks
        # a few frames' worth: early embeddings are made only while the step is idle, so few wait at once
        outcomes = triton_io.OutcomeCounter(
            "anomaly_sam_early_embedding_count", "early embeddings by outcome (anomaly.serving.embeddings)", "segmenter"
        )
        self.embeddings = EarlyEmbeddings(self.segmenter, capacity=4 * max_batch, observe=outcomes)
        self.was_idle = True
        self.start_batches(args, on_gpu=self.segmenter.device == "cuda")

    def record(self):
        return {"segmenter": self.described()}

    def described(self) -> dict:
        """Which SAM, weights and device (anomaly.weights.segmenter_info), how its batches run, and whether the
        ensemble has it embed each frame early."""
        return self.loaded | {"batches": self.batching, "early_embedding": "on" if self.early else "off"}

    def execute(self, requests):
        # early embeddings only where SAM has nothing else to do: under load they would only reorder its work
        self.was_idle = self.batches.idle if self.batches is not None else True
        return super().execute(requests)

    def prepare(self, request):
        s = settings()
        seg_boxes = triton_io.optional_array(request, "SEG_BOXES")
        if seg_boxes is None:
            return self.prepare_early(request)
        kept = triton_io.optional_array(request, "KEPT_EMBEDDING")
        key = step_inputs.text("KEPT_EMBEDDING", kept) if kept is not None else ""
        embedding = self.embeddings.take(key) if key else None  # taken first: a frame without boxes frees it too
        # a copy: the request's tensors are gone once execute returns, and with OVERLAP_BATCHES SAM runs later
        boxes = step_inputs.finite("SEG_BOXES", seg_boxes).reshape(-1, 4).copy()
        step_inputs.at_most("SEG_BOXES", len(boxes), s.max_detections)
        if not len(boxes):  # nothing to segment: no decoding, no SAM
            return []
        plan = step_inputs.tile_plan("TILING", triton_io.array(request, "TILING"), s.max_image_pixels)
        if embedding is not None and not plan.tiled:
            return self.segmenter.embedded_windows(embedding, boxes)
        data = triton_io.image_bytes(request, "ENCODED")
        return self.segmenter.prepare_windows(data, boxes, plan.tiled, s.max_image_bytes, s.max_image_pixels)

    def prepare_early(self, request):
        """A request without boxes: its image taken in to be embedded and kept, or declined at once with an empty
        EMBEDDING_KEY (anomaly.serving.embeddings.EarlyEmbeddings.offer says when)."""
        s = settings()
        plan = step_inputs.tile_plan("TILING", triton_io.array(request, "TILING"), s.max_image_pixels)
        image = self.embeddings.offer(
            lambda: triton_io.image_bytes(request, "ENCODED"), plan.tiled, self.was_idle, s.max_image_bytes,
            s.max_image_pixels,
        )  # fmt: skip
        return image if image is not None else Answered({"EMBEDDING_KEY": key_tensor("")})

    def run(self, items):
        outputs: list = [None] * len(items)
        early = [i for i, item in enumerate(items) if isinstance(item, EarlyImage)]
        if early:
            for i, key in zip(early, self.embeddings.embed([items[i] for i in early], self.max_batch)):
                outputs[i] = {"EMBEDDING_KEY": key_tensor(key)}
        frames = [item for item in items if not isinstance(item, EarlyImage)]
        if frames:
            # the windows of every frame in the batch are embedded together, max_batch at a time
            crops_per_frame = iter(self.segmenter.segment_windows(frames, self.max_batch))
            info = triton_io.bytes_tensor([json.dumps(self.described()).encode()]).reshape(1, 1)
            for i, item in enumerate(items):
                if outputs[i] is None:
                    crops = next(crops_per_frame)
                    outputs[i] = pack_crops(crops) | {"SEGMENTER": info, "SAM_WINDOWS": sam_windows(item)}
        return outputs


def sam_windows(frames: list) -> np.ndarray:
    """The windows SAM embedded for one frame, (1, K, 4) x0 y0 x1 y1: the response says how the frame was cut."""
    return np.asarray([f.window for f in frames], np.int32).reshape(1, len(frames), 4)
