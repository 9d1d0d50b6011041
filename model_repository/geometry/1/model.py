"""Triton stage 5: geometry of every mask crop (anomaly.geometry via anomaly.pipeline.measure_all)."""

import cv2
import triton_python_backend_utils as pb_utils

from anomaly import pipeline, triton_io


class TritonPythonModel:
    def initialize(self, args):
        triton_io.setup_logging()
        cv2.setNumThreads(1)  # the SAM and detector processes own the cores

    def execute(self, requests):
        return triton_io.answer_each(pb_utils, requests, self._one)

    def _one(self, request):
        boxes = triton_io.array(pb_utils, request, "MASK_BOXES")
        packed = triton_io.array(pb_utils, request, "MASKS")
        return {"GEOMETRY": pipeline.measure_all(pipeline.unpack_crops(boxes, packed))}
