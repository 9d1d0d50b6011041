"""Triton step 5: geometry of every mask crop of a frame (anomaly.pipeline.measure_frame: anomaly.geometry, shared
with the worker processes the launcher chose for this machine, anomaly.geometry_workers; narrow cracks' widths
from the photo, anomaly.crack_width)."""

import cv2

from anomaly import pipeline
from anomaly.config import settings
from anomaly.geometry_workers import GeometryWorkers
from anomaly.serving import step_inputs, steps, tensors


class TritonPythonModel(steps.StageModel):
    needs_detector_metadata = True  # which defects are cracks

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
        # Which masks are cracks, and the frame to read their widths from: the ensemble sends both; a caller that
        # sends masks alone gets the masks' widths.
        class_ids = tensors.optional_array(request, "CLASS_IDS")
        seg_index = tensors.optional_array(request, "SEG_INDEX")
        has_frame = tensors.optional_array(request, "ENCODED") is not None
        cracks = [False] * len(boxes)
        if class_ids is not None and seg_index is not None and has_frame:
            seg_index = step_inputs.indices("SEG_INDEX", seg_index, len(class_ids.reshape(-1)))
            step_inputs.same_count({"SEG_INDEX": len(seg_index), "MASK_BOXES": len(boxes)})
            cracks = pipeline.crack_flags(self.meta, class_ids, seg_index)
        table, widths = pipeline.measure_frame(
            pipeline.unpack_crops(boxes, packed),
            boxes,
            cracks,
            lambda: pipeline.gray_frame(tensors.image_bytes(request, "ENCODED"), s, "ENCODED"),
            s,
            self.workers,
        )
        return {"GEOMETRY": table, "WIDTH": widths}

    def finalize(self):
        if self.workers is not None:
            self.workers.close()
