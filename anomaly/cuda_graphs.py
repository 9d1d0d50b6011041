"""A model's forward replayed from CUDA graphs, one per batch size: RF-DETR and the SAM image encoder at small
batches are launch-bound on a big GPU (hundreds of small kernels; the CPU that launches them is shared with
every other step), and a replayed graph launches them all at once.

Batches pad up to the next captured size. Capture needs warm-up outside the graph, no host-device copies of
pageable memory and no synchronisation inside the forward; a forward that breaks those rules leaves the
model eager, with the reason in `note` (and the log), never an error.

Graphs share one memory pool (a capture reuses what earlier captures freed), so the pool holds the largest
graph's activations, not their sum. That is safe while no two of them replay at once and every replay's
outputs are copied out before the next one: each graph's outputs stay allocated for good, so other captures
never take them, and what one replay overwrites is another graph's scratch, or outputs already copied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext

log = logging.getLogger(__name__)


_capture_stream = None


def capture_stream():
    """The one stream every graph of this process is warmed up and captured on. cuBLAS keeps a workspace, for
    good, for each (thread, stream) it has run on: 32 MiB each on an H100 or H200 (torch's default there). A stream
    per captured size would hold one per size: SAM's 18 sizes (encoder and decoder) some 0.6 GB."""
    global _capture_stream
    import torch

    if _capture_stream is None:
        _capture_stream = torch.cuda.Stream()
    return _capture_stream


def graph_batch_sizes(max_batch: int) -> list[int]:
    """The batch sizes captured: powers of two up to the largest batch, and the largest."""
    return sorted({1, *[b for b in (2, 4, 8, 16, 32) if b <= max_batch], max_batch})


def graph_for(sizes, n: int) -> int | None:
    """The smallest captured batch size that holds `n` items (the rest of it is padding), None for eager."""
    return min((s for s in sizes if s >= n), default=None)


class GraphedForward:
    """`forward(x, *fixed)` for x of shape (n, *item_shape): replayed from a CUDA graph where one was captured
    for a batch size >= n, else run eagerly. `fixed` are further inputs whose shapes do not vary (e.g. the one
    frame's features the boxes of x are decoded from). `context` (e.g. an autocast factory) wraps warm-up,
    capture and eager runs alike. Outputs are nested tuples/lists/dicts of batch-first tensors, returned as
    copies."""

    def __init__(self, forward: Callable, context: Callable = nullcontext):
        self.forward, self.context = forward, context
        self.graphs: dict[int, tuple] = {}
        self.note = "eager"

    def capture(
        self, item_shape: tuple, dtype, device, sizes: list[int], name: str, fixed: tuple = (), pool=None
    ) -> None:
        """Capture one graph per batch size in `sizes` (e.g. graph_batch_sizes(max_batch)); `fixed` are example
        tensors of the fixed inputs (their shapes and dtypes are what later calls must pass), held once for all
        sizes. `pool` (torch.cuda.graph_pool_handle()) shares the memory pool with other GraphedForwards of
        this process, which must replay one at a time (one model instance's thread); default: a pool of this
        forward's own."""
        import torch

        sizes = sorted(sizes)
        if pool is None:
            pool = torch.cuda.graph_pool_handle()
        try:
            with torch.inference_mode():
                static_fixed = tuple(f.detach().clone() for f in fixed)  # one copy: every size reads the same
                for size in sizes:
                    static_in = torch.zeros((size, *item_shape), dtype=dtype, device=device)
                    side = capture_stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side), self.context():
                        for _ in range(3):  # warm-up outside the graph: lazy caches, cuDNN/cuBLAS choices
                            self.forward(static_in, *static_fixed)
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=side), self.context():
                        static_out = self.forward(static_in, *static_fixed)
                    self.graphs[size] = (graph, (static_in, *static_fixed), static_out)
            runs = sizes == list(range(sizes[0], sizes[-1] + 1)) and len(sizes) > 2
            self.note = f"CUDA graphs for batch sizes {f'{sizes[0]}-{sizes[-1]}' if runs else sizes}"
        except Exception as exc:  # noqa: BLE001 - eager still works
            self.graphs.clear()
            self.note = f"eager (CUDA graph capture failed: {type(exc).__name__}: {exc})"
            log.warning("%s: CUDA graph capture failed; running eager: %s", name, exc)

    @property
    def max_batch(self) -> int | None:
        """The largest captured batch size, None when eager."""
        return max(self.graphs, default=None)

    def __call__(self, x, *fixed):
        size = graph_for(self.graphs, x.shape[0])
        if size is None:
            with self.context():
                return self.forward(x, *fixed)
        graph, (static_in, *static_fixed), static_out = self.graphs[size]
        static_in[: x.shape[0]].copy_(x)
        for buffer, value in zip(static_fixed, fixed):
            buffer.copy_(value)
        graph.replay()
        return _take(static_out, x.shape[0])


def _take(out, n: int):
    """The first n items of every tensor in a nested output, copied out of the graph's static buffers (the
    next replay overwrites them)."""
    if isinstance(out, dict):
        return {k: _take(v, n) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_take(v, n) for v in out)
    return out[:n].clone() if hasattr(out, "clone") else out
