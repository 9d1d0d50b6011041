"""Triton stage 1: encoded image -> RGB frame and RF-DETR input (anomaly.pipeline.preprocess)."""

import time

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
        start = time.monotonic_ns()
        triton_io.options_of(request)  # refuse bad options before any work is done
        x, rgb = pipeline.preprocess(triton_io.image_bytes(pb_utils, request), self.meta, settings())
        return {
            "DET_INPUT": x,
            "RGB": rgb,
            "IMAGE_SIZE": np.array(rgb.shape[:2], np.int32),
            "START_NS": np.array([start], np.int64),
        }
