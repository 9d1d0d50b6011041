"""Triton step 5: geometry of every mask crop of a frame (anomaly.geometry via anomaly.pipeline.measure_all),
shared with the worker processes the launcher chose for this machine (anomaly.geometry_workers)."""

import cv2

from anomaly import pipeline
from anomaly.config import settings
from anomaly.geometry_workers import GeometryWorkers
from anomaly.serving import step_inputs, steps, tensors


class TritonPythonModel(steps.StageModel):
    def setup(self, args):
        cv2.setNumThreads(1)  # parallel over masks instead; the SAM and detector processes own the rest
        processes = int(tensors.config_parameter(args, "workers", "1"))
        self.workers = GeometryWorkers(processes) if processes > 1 else None

    def handle(self, request):
        s = settings()
        boxes = step_inputs.crop_boxes("MASK_BOXES", tensors.array(request, "MASK_BOXES"), s.max_image_pixels)
        step_inputs.at_most("MASK_BOXES", len(boxes), s.max_detections)
        packed = tensors.array(request, "MASKS")
        step_inputs.packed_masks("MASKS", packed, boxes)
        return {"GEOMETRY": pipeline.measure_all(pipeline.unpack_crops(boxes, packed), self.workers)}

    def finalize(self):
        if self.workers is not None:
            self.workers.close()
