"""Triton step 4: box-prompted SAM3 or SAM2.1 masks as bit-packed box crops, the frames of a dynamic batch
embedded together (anomaly.segmenter, anomaly.sam3; which one: anomaly.weights). What it does with each request
(a tiled frame's windows, the early calls of EARLY_EMBEDDING) is anomaly.serving.sam_step."""

from anomaly.config import settings
from anomaly.segmenter import ready_for_serving
from anomaly.serving import reporting, steps, tensors
from anomaly.serving.embeddings import EarlyEmbeddings
from anomaly.serving.sam_step import SamStep
from anomaly.weights import UNTRAINED_BANNER, load_segmenter, segmenter_info, segmenter_title


class TritonPythonModel(steps.BatchedStage):
    uses_gpu = True

    def setup(self, args):
        self.segmenter, spec = load_segmenter(settings())
        max_batch = tensors.max_batch_size(args)
        ready_for_serving(self.segmenter, settings(), max_batch)  # SAM_COMPILE, CUDA_GRAPHS
        self.spec = spec
        steps.log.info("segmenter: %s", segmenter_info(self.segmenter, spec))
        if spec.untrained:
            title = segmenter_title(spec.kind, spec.variant)
            steps.log.warning(UNTRAINED_BANNER.format(what=f"the segmenter ({title})"))
        reporting.release_gpu_cache_after_load("segmenter")
        self.early = (
            tensors.config_parameter(args, "early_embedding", "off") == "on"
        )  # whether the ensemble makes early calls
        name, doc = "anomaly_sam_early_embedding_count", "early embeddings by outcome (anomaly.serving.embeddings)"
        outcomes = reporting.OutcomeCounter(name, doc, "segmenter", EarlyEmbeddings.OUTCOMES)
        self.step = SamStep(self.segmenter, settings(), max_batch, observe=outcomes)
        self.was_idle = True
        self.start_batches(args, on_gpu=self.segmenter.device == "cuda")

    def record(self):
        return {"segmenter": self.described(), "cuda_mps": reporting.cuda_mps_state()}

    def described(self) -> dict:
        """Which SAM, weights and device (anomaly.weights.segmenter_info, its runtime as it is now), how its batches
        run, whether the ensemble has it embed each frame early, and whether nvJPEG refuses its frames."""
        early = "on" if self.early else "off"
        info = segmenter_info(self.segmenter, self.spec) | {"batches": self.batching, "early_embedding": early}
        return reporting.with_gpu_decode_warning(info)

    def execute(self, requests):
        # early embeddings only where SAM has nothing else to do: under load they would only reorder its work
        self.was_idle = self.batches.idle if self.batches is not None else True
        return super().execute(requests)

    def prepare(self, request):
        return self.step.take_in(lambda name: tensors.optional_array(request, name), self.was_idle)

    def run(self, items):
        return self.step.run(items, self.described())
