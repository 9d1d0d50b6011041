"""Triton step 4: box-prompted SAM3 or SAM2.1 masks as bit-packed box crops, the frames of a dynamic batch
embedded together (anomaly.segmenter, anomaly.sam3; which one: anomaly.weights)."""

import json

import numpy as np

from anomaly import masks
from anomaly.config import settings
from anomaly.serving import in_service, step_inputs, triton_io
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


class TritonPythonModel(triton_io.StageModel):
    def setup(self, args):
        self.segmenter, spec = load_segmenter(settings())
        if settings().cuda_graphs:
            self.segmenter.use_cuda_graphs(int(json.loads(args["model_config"])["max_batch_size"]))
        info = segmenter_info(self.segmenter, spec)
        in_service.write_record(args, {"segmenter": info})
        self.info = triton_io.bytes_tensor([json.dumps(info).encode()]).reshape(1, 1)
        triton_io.log.info("segmenter: %s", info)
        if spec.untrained:
            title = segmenter_title(spec.kind, spec.variant)
            triton_io.log.warning(UNTRAINED_BANNER.format(what=f"the segmenter ({title})"))

    def execute(self, requests):
        s = settings()

        def prepare(request):
            boxes = step_inputs.finite("SEG_BOXES", triton_io.array(request, "SEG_BOXES")).reshape(-1, 4)
            step_inputs.at_most("SEG_BOXES", len(boxes), s.max_detections)
            boxes = boxes.astype(np.float32)
            if not len(boxes):  # nothing to segment: no decoding, no SAM
                return None, None, boxes
            data = triton_io.image_bytes(request, "ENCODED")
            return (*self.segmenter.prepare(data, s.max_image_bytes, s.max_image_pixels), boxes)

        def run(frames):
            crops_per_frame = self.segmenter.segment_batch(frames)
            return [pack_crops(crops) | {"SEGMENTER": self.info} for crops in crops_per_frame]

        return triton_io.answer_batch(requests, prepare, run)
