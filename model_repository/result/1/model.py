"""Triton step 6: the response JSON (anomaly.result.frame_response) and the ensemble's typed outputs."""

import numpy as np

from anomaly import pipeline
from anomaly.config import settings
from anomaly.detector import Detections
from anomaly.result import Findings, frame_response, to_json
from anomaly.scale import with_scale
from anomaly.serving import step_inputs, steps, tensors


class TritonPythonModel(steps.StageModel):
    needs_detector_metadata = True  # its classes and their roles

    def handle(self, request):
        s = settings()
        got = step_inputs.result_inputs(lambda name: tensors.array(request, name), s.max_image_pixels, s.max_detections)
        options = with_scale(tensors.options_of(request), got["scale"])  # as the preprocess step decided
        typed, mask_boxes = got["typed"], got["mask_boxes"]
        findings = Findings(
            detections=Detections(typed["BOXES"], typed["SCORES"], typed["CLASS_IDS"]),
            seg_index=typed["SEG_INDEX"],
            mask_boxes=mask_boxes,
            masks=pipeline.unpack_crops(mask_boxes, got["masks"]) if options.include_masks else [],
            mask_scores=typed["MASK_SCORES"],
            geometries=pipeline.geometry_dicts(typed["GEOMETRY"], got["widths"]),
        )
        response = frame_response(
            image_hw=got["image_hw"],
            findings=findings,
            metadata=self.meta,
            options=options,
            severity_thresholds_mm=s.severity_thresholds_mm,
            notes=got["notes"],
            detector=got["detector"],
            segmenter=got["segmenter"],
            plan=got["plan"],
            sam_windows=got["sam_windows"],
            start_ns=got["start_ns"],
        )
        return {"RESULT_JSON": np.array([to_json(response)], dtype=np.object_)} | typed
