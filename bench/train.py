"""`make bench-train`: what `anomaly train` costs over rfdetr's own train(), and how fast `anomaly evaluate` runs.

1. training images/s: the same synthetic set, model, seed and options trained through `anomaly train`
   (anomaly.training.train: the dataset check, the epoch report, the run folder) and through rfdetr's train()
   called directly, alternated `--rounds` times in this process after one untimed epoch (the first training of a
   process pays about 8 s of warming up); images/s = epochs x images an epoch / median wall seconds of the call,
   and their ratio (the wrapper should cost nothing: >= 0.95).
2. evaluation frames/s: the wrapper's checkpoint served by a Triton of its own, its test split through
   `anomaly evaluate` (SAM on every defect above --ap-threshold: the frames/s depends on it).
Results go to stdout and bench_output/train.json. Untrained start (no pretrained weights here), small resolution.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from anomaly.config import REPO_ROOT


def direct(run, out: Path) -> None:
    """rfdetr's train() with the very options anomaly.training gives it, without our wrapper around it."""
    import torch

    from anomaly.detector import rfdetr_class

    torch.manual_seed(run.seed)
    model = rfdetr_class(run.variant)(pretrain_weights=None)
    model.train(dataset_dir=run.dataset, epochs=run.epochs, batch_size=run.batch_size, lr=run.lr,
                lr_encoder=run.lr * 1.5, output_dir=str(out), device="cpu", num_workers=0, seed=run.seed,
                checkpoint_interval=10**6, tensorboard=False, progress_bar=None,
                resolution=run.resolution)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__)
    parser.add_argument("--images", type=int, default=16, help="training images (validation: a quarter)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two")
    parser.add_argument("--ap-threshold", type=float, default=0.05, help="anomaly evaluate's default")
    args = parser.parse_args(argv)

    from anomaly.synthetic import write_dataset
    from anomaly.training import TrainRun, train
    from bench.serving import serve_checkpoint
    from client.evaluate import evaluate_split

    out = REPO_ROOT / "bench_output" / "train_bench"
    shutil.rmtree(out, ignore_errors=True)
    data = write_dataset(out / "data", {"train": args.images, "valid": max(1, args.images // 4), "test": 4}, seed=0)
    run = TrainRun(dataset=str(data), variant="nano", epochs=args.epochs, batch_size=2, lr=1e-4,
                   resolution=args.resolution, init="none", device="cpu", workers=0)  # fmt: skip
    with open(out / "warm_up.log", "w") as log:  # imports and first-use costs, paid by neither side
        import contextlib

        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            direct(dataclasses.replace(run, epochs=1), out / "warm_up")
    seconds: dict[str, list[float]] = {"anomaly_train": [], "rfdetr_train": []}
    for k in range(args.rounds):
        for name in seconds:
            folder = out / f"{name}_{k}"
            started = time.perf_counter()
            if name == "anomaly_train":
                train(run, folder)
            else:
                with open(out / f"{name}_{k}.log", "w") as log:  # as quiet as the wrapper keeps it
                    import contextlib

                    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                        direct(run, folder)
            seconds[name].append(time.perf_counter() - started)
    per_epoch = max(args.images, 5 * run.batch_size)  # rfdetr samples at least 5 batches an epoch
    rate = {n: round(args.epochs * per_epoch / statistics.median(s), 3) for n, s in seconds.items()}
    result = {
        "images": args.images,
        "epochs": args.epochs,
        "resolution": args.resolution,
        "seconds": {n: [round(v, 1) for v in s] for n, s in seconds.items()},
        "images_per_s": rate,
        "anomaly_over_rfdetr": round(rate["anomaly_train"] / rate["rfdetr_train"], 3),
    }
    print(json.dumps(result), flush=True)
    with serve_checkpoint(out / "anomaly_train_0" / "checkpoint_best.pth", out / "served") as server:
        report = evaluate_split(data, "test", server.grpc_url, ap_threshold=args.ap_threshold)
    result["evaluate"] = {
        "images": report["images"],
        "frames_per_s": report["frames_per_s"],
        "defects_per_frame": report["defects_per_frame"],
        "ap_threshold": args.ap_threshold,
    }
    print(json.dumps(result["evaluate"]), flush=True)
    (REPO_ROOT / "bench_output" / "train.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
