"""Triton stage 2: RF-DETR forward pass on a dynamic batch (anomaly.detector.OnnxDetector)."""

import triton_python_backend_utils as pb_utils

from anomaly import triton_io
from anomaly.config import settings
from anomaly.detector import ONNX_BOXES, ONNX_INPUT, ONNX_LOGITS, DetectorMetadata, OnnxDetector


class TritonPythonModel:
    def initialize(self, args):
        triton_io.setup_logging()
        here = triton_io.metadata_path(args).parent
        self.meta = DetectorMetadata.load(here / "metadata.json")
        s = settings()
        self.detector = OnnxDetector(here / "model.onnx", s.compute_threads, s.device)
        triton_io.log.info("detector: RF-DETR %s on %s", self.meta.variant, self.detector.providers[0])

    def execute(self, requests):
        shape = (3, self.meta.resolution, self.meta.resolution)
        return triton_io.answer_batched(pb_utils, requests, ONNX_INPUT, shape, self.detector, (ONNX_BOXES, ONNX_LOGITS))
