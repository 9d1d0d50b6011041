"""Triton stage 2: RF-DETR forward pass on a dynamic batch (anomaly.detector.OnnxDetector)."""

from anomaly import triton_io
from anomaly.config import settings
from anomaly.detector import ONNX_BOXES, ONNX_INPUT, ONNX_LOGITS, OnnxDetector
from anomaly.weights import UNTRAINED_BANNER


class TritonPythonModel(triton_io.StageModel):
    def setup(self, args):
        s = settings()
        onnx_path = triton_io.metadata_path(args).parent / "model.onnx"
        self.detector = OnnxDetector(onnx_path, s.compute_threads, s.device, s.weights_dir / "trt_cache")
        triton_io.log.info("detector: RF-DETR %s on %s", self.meta.variant, self.detector.providers[0])
        if self.meta.untrained:
            triton_io.log.warning(UNTRAINED_BANNER.format(what=f"the detector (RF-DETR {self.meta.variant})"))

    def execute(self, requests):
        shape = (3, self.meta.resolution, self.meta.resolution)
        return triton_io.answer_batched(requests, ONNX_INPUT, shape, self.detector, (ONNX_BOXES, ONNX_LOGITS))
