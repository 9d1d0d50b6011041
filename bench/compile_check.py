"""Would torch.compile make SAM faster here? SAM's image encoder (one frame) and its prompt encoder + mask decoder
(`--boxes` boxes of that frame) timed as serving runs them (CUDA graphs on a GPU, bf16 autocast) and again
compiled by torch.compile (inductor's default mode: no autotuning, which did not finish in 5 minutes for the
SAM2.1-L encoder on an H100), with how long compiling took and how far the compiled outputs are from the eager
ones (features: largest difference against their largest value; masks: share of pixels that flip).

    python -m bench.compile_check [--boxes 10] [--repeats 20] [--out bench_output/compile_check.json]

Serving uses torch.compile only when asked (SAM_COMPILE=encoder or all): this run says whether it should (the
SAM2.1-L encoder, 1620 GFLOP and 7 GB of tensors a frame by bench.activation_memory, took 13.9 ms on an H100, a
few times what the card could do). The parts are compiled as SAM_COMPILE compiles them.
On a GPU machine without network: `bench/offline_gpu.sh compile`. It needs a C compiler (inductor's and
Triton's kernels are built at run time).
"""

from __future__ import annotations

import time

from anomaly.config import REPO_ROOT, load_settings
from bench.gpu import timed
from bench.sam3_gpu import grid_boxes


def compare(segmenter, prepared, coords, repeats: int) -> dict:
    """Eager (as served) against compiled, for the encoder and the decoder of one frame's `coords`."""
    import torch

    from anomaly.cuda_graphs import GraphedForward

    gpu = segmenter.device == "cuda"

    def ms(fn) -> float:
        def run():
            fn()
            if gpu:
                torch.cuda.synchronize()

        return timed(run, repeats)["p50_ms"]

    out: dict = {}
    with torch.inference_mode(), segmenter._autocast():
        features = segmenter._encode(prepared[None])
        frame = (features["image_embed"], *features["high_res_feats"])
        logits, _ = segmenter._decode(features, 0, coords)
        out["encoder_ms"] = ms(lambda: segmenter._encode(prepared[None]))
        out["decoder_ms"] = ms(lambda: segmenter._decode(features, 0, coords))
        for name, forward, x, fixed in (
            ("encoder", segmenter._embed, prepared[None], ()),
            ("decoder", segmenter._decode_boxes, coords, frame),
        ):
            # as SAM_COMPILE compiles them: the encoder for its batch sizes, the decoder dynamic in the box count
            compiled = GraphedForward(torch.compile(forward, dynamic=name == "decoder"), segmenter._autocast)
            start = time.perf_counter()
            if gpu:  # compiled during the capture's warm-up, then replayed from a graph like the served one
                compiled.capture(tuple(x.shape[1:]), x.dtype, "cuda", [len(x)], f"compiled {name}", fixed)
            else:
                compiled(x, *fixed)
            out[f"compiled_{name}_compile_s"] = round(time.perf_counter() - start, 1)
            out[f"compiled_{name}_ms"] = ms(lambda compiled=compiled, x=x, fixed=fixed: compiled(x, *fixed))
            out[f"compiled_{name}_cuda_graphs"] = compiled.note
            if name == "encoder":
                again = compiled(x)
                pairs = [(again["image_embed"], features["image_embed"])]
                pairs += list(zip(again["high_res_feats"], features["high_res_feats"]))
                out["compiled_encoder_feature_diff"] = max(
                    float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in pairs
                )
            else:
                again, _ = compiled(x, *fixed)
                out["compiled_decoder_mask_pixels_flipped"] = float(((again > 0) != (logits > 0)).float().mean())
    return out


def main(argv: list[str] | None = None) -> int:
    from bench.scenes import frame_and_boxes_parser, report

    description = __doc__.split("\n\n")[0]
    args = frame_and_boxes_parser("python -m bench.compile_check", description, 20, "compile_check.json").parse_args(
        argv
    )

    from anomaly.weights import load_segmenter

    settings = load_settings()
    segmenter, spec = load_segmenter(settings)
    if settings.cuda_graphs:
        segmenter.use_cuda_graphs(1)
    data = (REPO_ROOT / "samples" / args.image).read_bytes()
    prepared, hw = segmenter._prepare(data, settings.max_image_bytes, settings.max_image_pixels)
    coords = segmenter._box_coords(grid_boxes(hw, args.boxes), hw)
    result = {"segmenter": f"{spec.kind} {spec.variant}", "runtime": segmenter.runtime, "boxes": args.boxes}
    result |= compare(segmenter, prepared, coords, args.repeats)
    return report(result, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
