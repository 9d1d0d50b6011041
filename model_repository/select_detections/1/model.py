"""Triton stage 3: detections above the threshold, and the defects to segment (anomaly.pipeline.select)."""

import numpy as np
import triton_python_backend_utils as pb_utils

from anomaly import pipeline, triton_io
from anomaly.config import settings
from anomaly.detector import DetectorMetadata


class TritonPythonModel:
    def initialize(self, args):
        triton_io.setup_logging()
        self.meta = DetectorMetadata.load(triton_io.metadata_path(args))

    def execute(self, requests):
        return triton_io.answer_each(pb_utils, requests, self._one)

    def _one(self, request):
        options = triton_io.options_of(request)
        boxes = triton_io.array(pb_utils, request, "dets")[0]
        logits = triton_io.array(pb_utils, request, "labels")[0]
        image_hw = triton_io.array(pb_utils, request, "IMAGE_SIZE")
        det, seg_index, notes = pipeline.select(
            boxes, logits, image_hw, options.confidence_threshold, self.meta, settings().max_detections
        )
        return {
            "BOXES": det.boxes.reshape(-1, 4),
            "SCORES": det.scores,
            "CLASS_IDS": det.class_ids,
            "SEG_BOXES": det.boxes[seg_index].reshape(-1, 4),
            "SEG_INDEX": seg_index.astype(np.int32),
            "NOTES": triton_io.bytes_tensor([n.encode() for n in notes]),
        }
