"""Triton stage 4: box-prompted SAM2.1 masks as bit-packed box crops (anomaly.segmenter)."""

import json

from anomaly import pipeline, triton_io
from anomaly.config import settings
from anomaly.weights import UNTRAINED_BANNER, load_segmenter, segmenter_info


class TritonPythonModel(triton_io.StageModel):
    def setup(self, args):
        self.segmenter, spec = load_segmenter(settings())
        info = segmenter_info(self.segmenter, spec)
        self.info = json.dumps(info).encode()
        triton_io.log.info("segmenter: %s", info)
        if spec.untrained:
            triton_io.log.warning(UNTRAINED_BANNER.format(what=f"the segmenter (SAM2.1 {spec.variant})"))

    def handle(self, request):
        rgb = triton_io.array(request, "RGB")
        crops = self.segmenter.segment(rgb, triton_io.array(request, "SEG_BOXES"))
        return pipeline.pack_crops(crops) | {"SEGMENTER": triton_io.bytes_tensor([self.info])}
