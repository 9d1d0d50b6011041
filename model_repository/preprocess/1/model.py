"""Triton step 1: refuse bad options and images early, from the header alone; decide the pixel size (the
request's, the setting's, or the photo's metadata: anomaly.scale) and whether the frame is detected in tiles
(anomaly.tiling); pass the bytes on."""

import json
import time

import numpy as np

from anomaly import pipeline
from anomaly.config import settings
from anomaly.images import read_header
from anomaly.scale import resolve_scale, scale_record
from anomaly.serving import steps, tensors


class TritonPythonModel(steps.StageModel):
    needs_detector_metadata = True  # its resolution sets the tile size

    def handle(self, request):
        start = time.monotonic_ns()
        options = tensors.options_of(request)  # refuse bad options before any work is done
        data = tensors.image_bytes(request)
        s = settings()
        header = read_header(data, s.max_image_bytes, s.max_image_pixels)
        scale = scale_record(resolve_scale(options, data))
        plan = pipeline.tile_plan((header.height, header.width), options, s, self.meta.resolution)
        return {
            "TILING": tensors.bytes_tensor([plan.to_json()]).reshape(1, 1),
            "SCALE": tensors.bytes_tensor([json.dumps(scale).encode()]).reshape(1, 1),
            "ENCODED": np.frombuffer(data, np.uint8).reshape(1, -1),  # uint8: half the cost of a string per hop
            "IMAGE_SIZE": np.array([header.height, header.width], np.int32),
            "START_NS": np.array([start], np.int64),
        }
