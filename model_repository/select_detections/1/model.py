"""Triton stage 3: detections above the threshold, and the defects to segment (anomaly.pipeline.select)."""

from anomaly import pipeline
from anomaly.config import settings
from anomaly.serving import step_inputs, triton_io


class TritonPythonModel(triton_io.StageModel):
    needs_detector_metadata = True  # its classes and their roles

    def handle(self, request):
        options = triton_io.options_of(request)
        s = settings()
        boxes = step_inputs.finite("dets", step_inputs.shaped("dets", triton_io.array(request, "dets"), (1, None, 4)))
        logits = step_inputs.shaped("labels", triton_io.array(request, "labels"), (1, boxes.shape[1], None))
        image_hw = step_inputs.image_size("IMAGE_SIZE", triton_io.array(request, "IMAGE_SIZE"), s.max_image_pixels)
        det, seg_index, notes = pipeline.select(
            boxes[0], logits[0], image_hw, options.confidence_threshold, self.meta, s.max_detections
        )
        return {
            "BOXES": det.boxes.reshape(-1, 4),
            "SCORES": det.scores,
            "CLASS_IDS": det.class_ids,
            "SEG_BOXES": det.boxes[seg_index].reshape(-1, 4),
            "SEG_INDEX": seg_index,
            "NOTES": triton_io.bytes_tensor([n.encode() for n in notes]),
        }
