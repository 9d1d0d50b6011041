"""Triton stage 3: detections above the threshold, merged across the windows of a tiled frame, and the defects
to segment (anomaly.pipeline.select)."""

from anomaly import pipeline
from anomaly.config import settings
from anomaly.serving import step_inputs, steps, tensors


class TritonPythonModel(steps.StageModel):
    needs_detector_metadata = True  # its classes and their roles

    def handle(self, request):
        options = tensors.options_of(request)
        s = settings()
        plan = step_inputs.tile_plan("TILING", tensors.array(request, "TILING"), s.max_image_pixels)
        boxes, logits = step_inputs.window_detections(lambda name: tensors.array(request, name), plan)
        det, seg_index, notes = pipeline.select(
            boxes, logits, plan, options.confidence_threshold, self.meta, s.max_detections
        )
        return {
            "BOXES": det.boxes.reshape(-1, 4),
            "SCORES": det.scores,
            "CLASS_IDS": det.class_ids,
            "SEG_BOXES": det.boxes[seg_index].reshape(-1, 4),
            "SEG_INDEX": seg_index,
            "NOTES": tensors.bytes_tensor([n.encode() for n in notes]),
        }
