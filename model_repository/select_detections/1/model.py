"""Triton stage 3: detections above the threshold, merged across the windows of a tiled frame, and the defects
to segment (anomaly.pipeline.select)."""

from anomaly import pipeline
from anomaly.config import settings
from anomaly.serving import step_inputs, triton_io


class TritonPythonModel(triton_io.StageModel):
    needs_detector_metadata = True  # its classes and their roles

    def handle(self, request):
        options = triton_io.options_of(request)
        s = settings()
        plan = step_inputs.tile_plan("TILING", triton_io.array(request, "TILING"), s.max_image_pixels)
        boxes, logits = step_inputs.window_detections(lambda name: triton_io.array(request, name), plan)
        det, seg_index, notes = pipeline.select(
            boxes, logits, plan, options.confidence_threshold, self.meta, s.max_detections
        )
        return {
            "BOXES": det.boxes.reshape(-1, 4),
            "SCORES": det.scores,
            "CLASS_IDS": det.class_ids,
            "SEG_BOXES": det.boxes[seg_index].reshape(-1, 4),
            "SEG_INDEX": seg_index,
            "NOTES": triton_io.bytes_tensor([n.encode() for n in notes]),
        }
