"""Triton stage 1: encoded image -> RGB frame and RF-DETR input (anomaly.pipeline.preprocess)."""

import time

import numpy as np

from anomaly import pipeline, triton_io
from anomaly.config import settings


class TritonPythonModel(triton_io.StageModel):
    def handle(self, request):
        start = time.monotonic_ns()
        triton_io.options_of(request)  # refuse bad options before any work is done
        x, rgb = pipeline.preprocess(triton_io.image_bytes(request), self.meta, settings())
        return {
            "DET_INPUT": x,
            "RGB": rgb,
            "IMAGE_SIZE": np.array(rgb.shape[:2], np.int32),
            "START_NS": np.array([start], np.int64),
        }
