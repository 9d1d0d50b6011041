"""Triton step 2: RF-DETR on a dynamic batch of frames, decoded where the model runs (anomaly.detector); a tiled
frame's windows (anomaly.tiling) go through the same batches, its outputs are the windows' one after another."""

import json
from dataclasses import asdict

from anomaly.config import settings
from anomaly.detector import ONNX_BOXES, ONNX_LOGITS, DetectorRunner
from anomaly.errors import InputError
from anomaly.serving import reporting, step_inputs, steps, tensors
from anomaly.weights import UNTRAINED_BANNER


class TritonPythonModel(steps.BatchedStage):
    needs_detector_metadata = True  # its classes and their roles
    uses_gpu = True

    def setup(self, args):
        onnx_path = tensors.export_files_of(args)[0]
        max_batch = tensors.max_batch_size(args)
        self.runner = DetectorRunner(self.meta, onnx_path, settings(), max_batch)
        if self.meta.untrained:
            steps.log.warning(UNTRAINED_BANNER.format(what=f"the detector (RF-DETR {self.meta.variant})"))
        reporting.release_gpu_cache_after_load("detector")
        self.start_batches(args, on_gpu=self.runner.choice.device == "cuda")

    def record(self):
        return {"detector": self.described(), "metadata": asdict(self.meta), "cuda_mps": reporting.cuda_mps_state()}

    def described(self) -> dict:
        """What runs RF-DETR and why (anomaly.detector.DetectorRunner), how its batches run, and whether nvJPEG
        refuses its frames."""
        return reporting.with_gpu_decode_warning(self.runner.info | {"batches": self.batching})

    def prepare(self, request):
        plan = step_inputs.tile_plan("TILING", tensors.array(request, "TILING"), settings().max_image_pixels)
        inputs, image_hw = self.runner.prepare_windows(tensors.image_bytes(request, "ENCODED"), plan.windows)
        if tuple(image_hw) != plan.image_hw:
            raise InputError("TILING", f"is for a {plan.image_hw} image, but ENCODED is {tuple(image_hw)}")
        return inputs

    def run(self, per_request):  # every window of every frame in the batch goes through RF-DETR together
        info = tensors.bytes_tensor([json.dumps(self.described()).encode()]).reshape(1, 1)
        return [
            {ONNX_BOXES: boxes[None], ONNX_LOGITS: logits[None], "DETECTOR": info}
            for boxes, logits in self.runner.run_frames(per_request)
        ]
