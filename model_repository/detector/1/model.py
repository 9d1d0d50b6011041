"""Triton step 2: RF-DETR on a dynamic batch of frames, decoded where the model runs (anomaly.detector)."""

import json
from dataclasses import asdict

from anomaly.config import settings
from anomaly.detector import ONNX_BOXES, ONNX_LOGITS, DetectorRunner
from anomaly.serving import in_service, triton_io
from anomaly.weights import UNTRAINED_BANNER


class TritonPythonModel(triton_io.StageModel):
    needs_detector_metadata = True  # its classes and their roles

    def setup(self, args):
        onnx_path = triton_io.export_files_of(args)[0]
        max_batch = int(json.loads(args["model_config"])["max_batch_size"])
        self.runner = DetectorRunner(self.meta, onnx_path, settings(), max_batch)
        self.info = triton_io.bytes_tensor([json.dumps(self.runner.info).encode()]).reshape(1, 1)
        in_service.write_record(args, {"detector": self.runner.info, "metadata": asdict(self.meta)})
        if self.meta.untrained:
            triton_io.log.warning(UNTRAINED_BANNER.format(what=f"the detector (RF-DETR {self.meta.variant})"))

    def execute(self, requests):
        def prepare(request):
            return self.runner.prepare(triton_io.image_bytes(request, "ENCODED"))[0]

        def run(inputs):
            boxes, logits = self.runner.run(inputs)
            return [
                {ONNX_BOXES: boxes[i : i + 1], ONNX_LOGITS: logits[i : i + 1], "DETECTOR": self.info}
                for i in range(len(inputs))
            ]

        return triton_io.answer_batch(requests, prepare, run)
