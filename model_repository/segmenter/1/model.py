"""Triton step 4: box-prompted SAM3 or SAM2.1 masks as bit-packed box crops, the frames of a dynamic batch
embedded together (anomaly.segmenter, anomaly.sam3; which one: anomaly.weights); a tiled frame is embedded as
full-resolution windows around its boxes (anomaly.tiling)."""

import json

import numpy as np

from anomaly import masks
from anomaly.config import settings
from anomaly.segmenter import ready_for_serving
from anomaly.serving import step_inputs, triton_io
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
        self.start_batches(args, on_gpu=self.segmenter.device == "cuda")

    def record(self):
        return {"segmenter": self.described()}

    def described(self) -> dict:
        """Which SAM, weights and device (anomaly.weights.segmenter_info), and how its batches run."""
        return self.loaded | {"batches": self.batching}

    def prepare(self, request):
        s = settings()
        # a copy: the request's tensors are gone once execute returns, and with OVERLAP_BATCHES SAM runs later
        boxes = step_inputs.finite("SEG_BOXES", triton_io.array(request, "SEG_BOXES")).reshape(-1, 4).copy()
        step_inputs.at_most("SEG_BOXES", len(boxes), s.max_detections)
        if not len(boxes):  # nothing to segment: no decoding, no SAM
            return []
        plan = step_inputs.tile_plan("TILING", triton_io.array(request, "TILING"), s.max_image_pixels)
        data = triton_io.image_bytes(request, "ENCODED")
        return self.segmenter.prepare_windows(data, boxes, plan.tiled, s.max_image_bytes, s.max_image_pixels)

    def run(self, frames):
        # the windows of every frame in the batch are embedded together, max_batch at a time
        crops_per_frame = self.segmenter.segment_windows(frames, self.max_batch)
        info = triton_io.bytes_tensor([json.dumps(self.described()).encode()]).reshape(1, 1)
        return [
            pack_crops(crops) | {"SEGMENTER": info, "SAM_WINDOWS": sam_windows(windows)}
            for crops, windows in zip(crops_per_frame, frames)
        ]


def sam_windows(frames: list) -> np.ndarray:
    """The windows SAM embedded for one frame, (1, K, 4) x0 y0 x1 y1: the response says how the frame was cut."""
    return np.asarray([f.window for f in frames], np.int32).reshape(1, len(frames), 4)
