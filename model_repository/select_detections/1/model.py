"""Triton stage 3: detections above the threshold, and the defects to segment (anomaly.pipeline.select)."""

from anomaly import pipeline, triton_io
from anomaly.config import settings


class TritonPythonModel(triton_io.StageModel):
    def handle(self, request):
        options = triton_io.options_of(request)
        det, seg_index, notes = pipeline.select(
            triton_io.array(request, "dets")[0],
            triton_io.array(request, "labels")[0],
            triton_io.array(request, "IMAGE_SIZE"),
            options.confidence_threshold,
            self.meta,
            settings().max_detections,
        )
        return {
            "BOXES": det.boxes.reshape(-1, 4),
            "SCORES": det.scores,
            "CLASS_IDS": det.class_ids,
            "SEG_BOXES": det.boxes[seg_index].reshape(-1, 4),
            "SEG_INDEX": seg_index,
            "NOTES": triton_io.bytes_tensor([n.encode() for n in notes]),
        }
