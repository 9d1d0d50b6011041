"""Triton stage 3: detections above the threshold, merged across the windows of a tiled frame, and the defects
to segment (anomaly.pipeline.select)."""

from anomaly import pipeline
from anomaly.config import settings
from anomaly.errors import InputError
from anomaly.serving import step_inputs, triton_io


class TritonPythonModel(triton_io.StageModel):
    needs_detector_metadata = True  # its classes and their roles

    def handle(self, request):
        options = triton_io.options_of(request)
        s = settings()
        boxes = step_inputs.finite("dets", step_inputs.shaped("dets", triton_io.array(request, "dets"), (1, None, 4)))
        logits = step_inputs.shaped("labels", triton_io.array(request, "labels"), (1, boxes.shape[1], None))
        plan = step_inputs.tile_plan("TILING", triton_io.array(request, "TILING"), s.max_image_pixels)
        windows = len(plan.windows)
        if boxes.shape[1] % windows:
            raise InputError("dets", f"holds {boxes.shape[1]} boxes, not a whole number for {windows} windows")
        det, seg_index, notes = pipeline.select(
            boxes[0].reshape(windows, -1, 4),
            logits[0].reshape(windows, -1, logits.shape[-1]),
            plan,
            options.confidence_threshold,
            self.meta,
            s.max_detections,
        )
        return {
            "BOXES": det.boxes.reshape(-1, 4),
            "SCORES": det.scores,
            "CLASS_IDS": det.class_ids,
            "SEG_BOXES": det.boxes[seg_index].reshape(-1, 4),
            "SEG_INDEX": seg_index,
            "NOTES": triton_io.bytes_tensor([n.encode() for n in notes]),
        }
