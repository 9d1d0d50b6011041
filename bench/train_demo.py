"""`make train-demo`: a first trained model made here, and how right it is, start to end.

1. a synthetic inspection dataset (anomaly.synthetic: cracks of known width, spalling, corrosion, beams and
   columns on concrete; COCO with masks; train/valid/test; fixed seed) in OUT/dataset;
2. RF-DETR trained on it through `anomaly train` for about --minutes (from an untrained start: no pretrained
   weights can be downloaded where this is developed), into OUT/run;
3. the seeded untrained model of the same architecture and the trained checkpoint each exported, served by a
   Triton of their own and run over the held-out test split through `anomaly evaluate` (OUT/eval_untrained,
   OUT/eval_trained);
4. OUT/summary.json and OUT/summary.md: AP per class before and after, the machine, the minutes, the curve.
Masks and geometry come from the segmenter the settings give (untrained SAM2.1 where no weights are): its mask AP
and geometry errors then say nothing of the detector, and the summary says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from anomaly.config import REPO_ROOT


def untrained_checkpoint(run, dataset, path: Path) -> Path:
    """The seeded, untrained model of the run's architecture and classes, saved as a checkpoint rfdetr loads as it
    was built (its resolution and class count): what training starts from, for the 'before' column."""
    import torch

    from anomaly.datasets import read_dataset
    from anomaly.detector import rfdetr_class
    from anomaly.training import class_roles
    from anomaly.weights import CHECKPOINT_CLASSES_KEY

    data = read_dataset(dataset, ("train", "valid"), decode=False)
    classes = class_roles(data, run.structures)
    names = [c["name"] for c in classes]
    torch.manual_seed(run.seed)
    extra = {"resolution": run.resolution} if run.resolution else {}
    model = rfdetr_class(run.variant)(pretrain_weights=None, num_classes=len(names), **extra)
    checkpoint = {
        "model": model.model.model.state_dict(),
        "args": {"class_names": names, "num_classes": len(names)},
        "model_name": type(model).__name__,
        "model_config": model.model_config.model_dump(mode="json"),
        CHECKPOINT_CLASSES_KEY: classes,
    }
    torch.save(checkpoint, path)
    return path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}"


def summary_markdown(result: dict) -> str:
    before, after = result["untrained"], result["trained"]
    lines = [
        f"Trained on {result['machine']}: {result['epochs_done']} epochs in {result['train_minutes']} min "
        f"({result['images_per_s']} training images/s), RF-DETR {result['variant']} at {result['resolution']} px, "
        f"from an untrained start; evaluated on the {after['images']} held-out test photos.",
        "",
        "| class | role | box AP untrained | box AP trained | box AP50 trained | misses / truths trained |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in after["per_class"].items():
        b = before["per_class"][name]
        lines.append(f"| {name} | {c['role']} | {_fmt(b['box_ap'])} | {_fmt(c['box_ap'])} | {_fmt(c['box_ap50'])} | "
                     f"{c['misses']} / {c['truths']} |")  # fmt: skip
    lines.append(f"| all | | {_fmt(before['box']['ap'])} | {_fmt(after['box']['ap'])} | {_fmt(after['box']['ap50'])} "
                 f"| {after['at_threshold']['misses']} / {after['at_threshold']['truths']} |")  # fmt: skip
    lines += ["", f"Mask AP trained {_fmt(after['mask']['ap'])} (masks from {result['segmenter']})."]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "train_demo")
    parser.add_argument("--minutes", type=float, default=30.0, help="the training's time budget")
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--valid", type=int, default=20)
    parser.add_argument("--test", type=int, default=30)
    parser.add_argument("--variant", default="nano")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--ap-threshold", type=float, default=0.05)
    args = parser.parse_args(argv)

    from anomaly.synthetic import write_dataset
    from anomaly.training import TrainRun, train
    from bench.serving import serve_checkpoint
    from client.evaluate import evaluate_split

    dataset = args.out / "dataset"
    if not (dataset / "test" / "_annotations.coco.json").is_file():
        write_dataset(dataset, {"train": args.train, "valid": args.valid, "test": args.test}, seed=0)
    run = TrainRun(dataset=str(dataset), variant=args.variant, epochs=1000, batch_size=args.batch_size, lr=args.lr,
                   resolution=args.resolution, init="none", max_minutes=args.minutes,
                   command=["python", "-m", "bench.train_demo", *(argv or sys.argv[1:])])  # fmt: skip
    started = time.monotonic()
    summary = train(run, args.out / "run")
    train_minutes = round((time.monotonic() - started) / 60, 1)
    reports = {}
    for name, checkpoint in (
        ("untrained", untrained_checkpoint(run, dataset, args.out / "untrained.pth")),
        ("trained", Path(summary["checkpoint"])),
    ):
        with serve_checkpoint(checkpoint, args.out / f"served_{name}") as server:
            reports[name] = evaluate_split(dataset, "test", server.grpc_url, out=args.out / f"eval_{name}",
                                           ap_threshold=args.ap_threshold)  # fmt: skip
    epochs = json.loads((args.out / "run" / "metrics.json").read_text())["epochs"]
    segmenter = reports["trained"]["served_by"]["models"].get("segmenter", {})
    result = {
        "machine": machine(),
        "variant": args.variant,
        "resolution": json.loads((args.out / "served_trained/model_repository/detector/1/metadata.json").read_text())[
            "resolution"
        ],
        "epochs_done": summary["epochs_done"],
        "train_minutes": train_minutes,
        "images_per_s": round(sum(e["images_per_s"] for e in epochs) / len(epochs), 3),
        "segmenter": f"{segmenter.get('name', '?')}{', untrained' if segmenter.get('untrained') else ''}",
        "untrained": reports["untrained"],
        "trained": reports["trained"],
        "curve": [{k: e[k] for k in ("epoch", "loss", "val_ap", "val_ap50")} for e in epochs],
    }
    (args.out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "summary.md").write_text(summary_markdown(result))
    print(summary_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
