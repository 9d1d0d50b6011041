"""How much memory each CUDA-graphed forward's activations take at its captured sizes, counted on the CPU: a
graph's private pool must hold the peak of the tensors alive during its forward, so these peaks are what the
graphs cost on a GPU (within the allocator's rounding; kernels may pick other scratch sizes there). Also each
forward's arithmetic (torch's FLOP counter) and the bytes it allocates in all, which bound its time on a GPU.

    python -m bench.activation_memory [--sam-variant large] [--encoder-batches 1,2] [--decoder-boxes 1,4,16]
        [--detector-batches 1,8]

Counted with torch's profiler (every allocation and free of the CPU allocator, in order); SAM's image encoder
runs under bf16 autocast with its weights in bf16, as on a GPU. Takes about a minute for SAM2.1-L on 2 cores.
"""

from __future__ import annotations

import argparse

MIB = 2**20


def allocations(fn) -> tuple[int, int]:
    """(the most bytes held at once, the bytes allocated in all) by tensors fn() allocates; what was allocated
    before it does not count."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = total = 0
    for event in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if event.name() == "[memory]":
            live += event.nbytes()
            peak = max(peak, live)
            total += max(event.nbytes(), 0)
    return peak, total


def measured(fn) -> tuple[float, float, float]:
    """(peak MiB, MiB allocated in all, GFLOP) of fn()."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    peak, total = allocations(fn)
    return peak / MIB, total / MIB, counter.get_total_flops() / 1e9


def sam_peaks(variant: str, batches: list[int], boxes: list[int]) -> dict[str, tuple]:
    import torch

    from anomaly.segmenter import Sam2Segmenter, store_in_bf16

    segmenter = Sam2Segmenter(variant, None, device="cpu")
    segmenter.model.requires_grad_(False)
    store_in_bf16(segmenter.model.image_encoder)  # as on a GPU (Sam2Segmenter)
    store_in_bf16(segmenter.model.sam_mask_decoder)
    size = segmenter.resolution
    out = {}
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        for k in batches:
            x = torch.zeros(k, 3, size, size)
            out[f"SAM2.1-{variant} image encoder, batch {k}"] = measured(lambda x=x: segmenter._embed(x))
        features = segmenter._embed(torch.zeros(1, 3, size, size))
        frame = (features["image_embed"], *features["high_res_feats"])
        for n in boxes:
            coords = torch.rand(n, 2, 2) * size
            key = f"SAM2.1-{variant} prompt encoder + mask decoder, {n} boxes"
            out[key] = measured(lambda c=coords: segmenter._decode_boxes(c, *frame))
    return out


def detector_peaks(batches: list[int]) -> dict[str, tuple]:
    import torch

    from anomaly.config import settings
    from anomaly.detector import DetectorMetadata, export_files, load_rfdetr

    meta = DetectorMetadata.load(export_files(settings().model_repository)[1])
    num_classes = meta.source.get("num_classes") if isinstance(meta.source, dict) else None
    net = load_rfdetr(meta.variant, meta.weights, num_classes).model.model
    net.eval().requires_grad_(False)  # FLOP counting tracks modules with autograd hooks: no weight may need grad
    net.export()
    out = {}
    with torch.inference_mode():
        for k in batches:
            x = torch.zeros(k, 3, meta.resolution, meta.resolution)
            out[f"RF-DETR {meta.variant} (fp32), batch {k}"] = measured(lambda x=x: net(x)[:2])
    return out


def main(argv: list[str] | None = None) -> int:
    ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sam-variant", default="large")
    parser.add_argument("--encoder-batches", type=ints, default=[1, 2])
    parser.add_argument("--decoder-boxes", type=ints, default=[1, 4, 10, 16])
    parser.add_argument("--detector-batches", type=ints, default=[1, 8])
    args = parser.parse_args(argv)
    rows = sam_peaks(args.sam_variant, args.encoder_batches, args.decoder_boxes)
    rows |= detector_peaks(args.detector_batches)
    print(f"{'forward (counted on the CPU)':<56}{'peak MiB':>10}{'allocated MiB':>15}{'GFLOP':>8}")
    for name, (peak, total, gflop) in rows.items():
        print(f"{name:<56}{peak:>10.0f}{total:>15.0f}{gflop:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
