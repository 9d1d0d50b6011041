"""Triton step 6: the response JSON (anomaly.result.build_response) and the ensemble's typed outputs."""

import numpy as np

from anomaly import pipeline
from anomaly.config import settings
from anomaly.detector import Detections
from anomaly.result import Findings, build_response
from anomaly.scale import with_scale
from anomaly.serving import step_inputs, steps, tensors
from anomaly.tiling import describe


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
            geometries=pipeline.geometry_dicts(typed["GEOMETRY"]),
        )
        response = build_response(
            image_hw=got["image_hw"],
            findings=findings,
            metadata=self.meta,
            options=options,
            severity_thresholds_mm=s.severity_thresholds_mm,
            warnings=pipeline.warnings_for(self.meta, got["segmenter"], got["notes"], got["detector"]),
            processing_time_ms=0.0,  # stamped once the response is built (pipeline.finished)
            models=pipeline.models_info(self.meta, got["segmenter"], got["detector"]),
            tiling=describe(got["plan"], got["sam_windows"], int(got["segmenter"].get("resolution", 1024))),
        )
        response = pipeline.finished(response, got["start_ns"])
        return {"RESULT_JSON": np.array([pipeline.to_json(response)], dtype=np.object_)} | typed
