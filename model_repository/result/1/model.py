"""Triton step 6: the response JSON (anomaly.result.build_response) and the ensemble's typed outputs."""

import json
import time

import numpy as np

from anomaly import pipeline, triton_io
from anomaly.config import settings
from anomaly.detector import Detections
from anomaly.result import build_response


class TritonPythonModel(triton_io.StageModel):
    def handle(self, request):
        def get(name):
            return triton_io.array(request, name)

        def info(name):
            return json.loads(bytes(get(name).reshape(-1)[0]))

        options = triton_io.options_of(request)
        mask_boxes = get("MASK_BOXES").reshape(-1, 4)
        notes = [bytes(n).decode() for n in get("NOTES").reshape(-1)]
        segmenter, detector = info("SEGMENTER"), info("DETECTOR")
        typed = {
            "BOXES": get("BOXES_IN").reshape(-1, 4),
            "SCORES": get("SCORES_IN").reshape(-1),
            "CLASS_IDS": get("CLASS_IDS_IN").reshape(-1),
            "SEG_INDEX": get("SEG_INDEX_IN").reshape(-1),
            "MASK_SCORES": get("MASK_SCORES_IN").reshape(-1),
            "GEOMETRY": get("GEOMETRY_IN").reshape(-1, 5),
        }
        response = build_response(
            image_hw=tuple(int(v) for v in get("IMAGE_SIZE")),
            detections=Detections(typed["BOXES"], typed["SCORES"], typed["CLASS_IDS"]),
            metadata=self.meta,
            seg_index=typed["SEG_INDEX"],
            mask_boxes=mask_boxes,
            masks=pipeline.unpack_crops(mask_boxes, get("MASKS")) if options.include_masks else [],
            mask_scores=typed["MASK_SCORES"],
            geometries=pipeline.geometry_dicts(typed["GEOMETRY"]),
            options=options,
            severity_thresholds_mm=settings().severity_thresholds_mm,
            warnings=pipeline.warnings_for(self.meta, segmenter, notes, detector),
            processing_time_ms=(time.monotonic_ns() - int(get("START_NS")[0])) / 1e6,
            models=pipeline.models_info(self.meta, segmenter, detector),
        )
        return {"RESULT_JSON": np.array([pipeline.to_json(response)], dtype=np.object_)} | typed
