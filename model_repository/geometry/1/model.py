"""Triton stage 5: geometry of every mask crop (anomaly.geometry via anomaly.pipeline.measure_all)."""

import cv2

from anomaly import pipeline, triton_io


class TritonPythonModel(triton_io.StageModel):
    def setup(self, args):
        cv2.setNumThreads(1)  # the SAM and detector processes own the cores

    def handle(self, request):
        crops = pipeline.unpack_crops(triton_io.array(request, "MASK_BOXES"), triton_io.array(request, "MASKS"))
        return {"GEOMETRY": pipeline.measure_all(crops)}
