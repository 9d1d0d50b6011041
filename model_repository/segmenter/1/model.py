"""Triton stage 4: box-prompted SAM2.1 masks as bit-packed box crops (anomaly.segmenter)."""

import json

import triton_python_backend_utils as pb_utils

from anomaly import pipeline, triton_io
from anomaly.config import settings
from anomaly.weights import UNTRAINED_BANNER, load_segmenter, segmenter_info


class TritonPythonModel:
    def initialize(self, args):
        triton_io.setup_logging()
        self.segmenter, self.spec = load_segmenter(settings())
        info = segmenter_info(self.segmenter, self.spec)
        self.info = json.dumps(info).encode()
        triton_io.log.info("segmenter: %s", info)
        if self.spec.untrained:
            triton_io.log.warning(UNTRAINED_BANNER.format(what=f"the segmenter (SAM2.1 {self.spec.variant})"))

    def execute(self, requests):
        return triton_io.answer_each(pb_utils, requests, self._one)

    def _one(self, request):
        rgb = triton_io.array(pb_utils, request, "RGB")
        boxes = triton_io.array(pb_utils, request, "SEG_BOXES")
        crops = self.segmenter.segment(rgb, boxes)
        return pipeline.pack_crops(crops) | {"SEGMENTER": triton_io.bytes_tensor([self.info])}
