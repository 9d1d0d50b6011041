"""`anomaly train`: RF-DETR fine-tuned on a labelled dataset through rfdetr's own training (PyTorch Lightning), and
a run folder the service can serve as it is.

RUN_DIR holds:
  checkpoint_best.pth   rfdetr's best checkpoint (validation box AP), with the classes' names and roles added
                        (anomaly.weights.CHECKPOINT_CLASSES_KEY): DETECTOR_WEIGHTS serves it, class count, names
                        and which are structures come from it
  classes.json          the classes in the model's label order, with their roles
  metrics.json, .png    one record per epoch: losses, validation AP and AP50, seconds, training images/s
  serve.txt             the command that serves the checkpoint
  run.json              how the run was asked for (`--resume RUN_DIR` continues it from rfdetr/last.ckpt)
  rfdetr/               rfdetr's own output (its checkpoints, metrics.csv, training_config.json)

One line per epoch goes to stderr (losses, validation AP, time, ETA); what rfdetr and PyTorch Lightning print
themselves (their tables, warnings and logs) goes to RUN_DIR/train.log unless asked for on the terminal. The
dataset is checked first (anomaly.datasets); nothing trains on a set with a problem.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from anomaly.datasets import Dataset, is_structure, read_dataset, trained_categories

RFDETR_DIR = "rfdetr"
BEST = "checkpoint_best.pth"
# rfdetr writes its best checkpoint (of the regular and the EMA weights) under this name when training ends
RFDETR_BEST = ("checkpoint_best_total.pth", "checkpoint_best_ema.pth", "checkpoint_best_regular.pth")


class TrainingError(RuntimeError):
    """A run that cannot start or go on, said in words (no starting weights, nothing to resume)."""


@dataclass
class TrainRun:
    """How a run was asked for; kept in RUN_DIR/run.json so that `--resume` continues it as it was."""

    dataset: str
    variant: str = "nano"
    epochs: int = 10
    batch_size: int = 4
    lr: float = 1e-4
    resolution: int | None = None  # the variant's own when None
    init: str = "coco"  # coco (rfdetr's pretrained weights), none (seeded, untrained) or a checkpoint's path
    device: str = "auto"
    structures: list[str] | None = None  # None: by the dataset's names (anomaly.taxonomy)
    seed: int = 0
    max_minutes: float | None = None
    workers: int | None = None  # data loader processes; None: 2 on a GPU, 0 on a CPU
    augment: bool = True
    command: list[str] = field(default_factory=list)


def class_roles(dataset: Dataset, structures: list[str] | None) -> list[dict]:
    """The trained classes, in label order, each with its role: a `--structures` list names the structures (every
    other class is a defect); without one, by the dataset's categories (anomaly.datasets.is_structure)."""
    categories = trained_categories(dataset.splits["train"])
    names = [c["name"] for c in categories]
    unknown = sorted(set(structures or []) - set(names))
    if unknown:
        raise TrainingError(f"--structures names {unknown}, which the dataset does not have; its classes: {names}")
    return [{"name": c["name"], "role": "structure" if is_structure(c, structures) else "defect"} for c in categories]


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda: torch sees no GPU here; use --device cpu or auto")
    return requested


def build_model(run: TrainRun):
    """The rfdetr model training starts from: its pretrained COCO weights, a seeded untrained model, or a
    checkpoint (a run of ours, or any rfdetr checkpoint)."""
    import torch

    from anomaly.detector import rfdetr_class

    cls = rfdetr_class(run.variant)
    torch.manual_seed(run.seed)  # rfdetr initialises from the global generator
    if run.init == "none":
        return cls(pretrain_weights=None)
    if run.init == "coco":
        try:
            return cls()
        except Exception as exc:
            raise TrainingError(
                f"rfdetr's pretrained RF-DETR {run.variant} weights could not be had ({type(exc).__name__}: {exc}). "
                "Put them in RF_HOME (~/.roboflow/models), start from a checkpoint with --init PATH, or train from "
                "an untrained model with --init none (slow to learn: no pretrained backbone)."
            ) from exc
    if not Path(run.init).is_file():
        raise TrainingError(f"--init {run.init}: no such checkpoint")
    return cls(pretrain_weights=run.init)


class EpochReport:
    """The PyTorch Lightning callback `anomaly train` adds to rfdetr's trainer (through PTL's callback-factory
    entry point, `progress_callbacks`): one line per epoch on `stream`, the epoch's record appended to
    RUN_DIR/metrics.json, and a stop once the next epoch would pass the time budget."""

    LOSSES = ("loss", "loss_ce", "loss_bbox", "loss_giou")

    def __init__(self, out: Path, epochs: int, batch_size: int, stream, max_minutes: float | None):
        self.out, self.epochs, self.batch_size, self.stream = out, epochs, batch_size, stream
        self.max_seconds = max_minutes * 60 if max_minutes else None
        self.started = time.monotonic()
        self.records = load_metrics(out)
        self.stopped_for_time = False
        self._epoch_start = self._val_start = 0.0
        self._val_seconds = 0.0

    def callback(self):
        from pytorch_lightning import Callback

        report = self

        class _Report(Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                report._epoch_start, report._val_seconds = time.monotonic(), 0.0

            def on_validation_start(self, trainer, pl_module):
                report._val_start = time.monotonic()

            def on_validation_end(self, trainer, pl_module):
                report._val_seconds += time.monotonic() - report._val_start

            def on_train_epoch_end(self, trainer, pl_module):
                report.epoch_done(trainer)

        return _Report()

    def epoch_done(self, trainer) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        seconds = time.monotonic() - self._epoch_start
        training_s = max(seconds - self._val_seconds, 1e-9)
        images = int(trainer.num_training_batches) * self.batch_size
        ap = metrics.get("val/mAP_50_95", metrics.get("val/ema_mAP_50_95"))
        ap50 = metrics.get("val/mAP_50", metrics.get("val/ema_mAP_50"))
        record = {
            "epoch": int(trainer.current_epoch) + 1,
            **{k: _round(metrics.get(f"train/{k}")) for k in self.LOSSES},
            "val_ap": _round(ap),
            "val_ap50": _round(ap50),
            "seconds": round(seconds, 1),
            "validation_seconds": round(self._val_seconds, 1),
            "images_per_s": round(images / training_s, 3),
        }
        self.records = [r for r in self.records if r["epoch"] != record["epoch"]] + [record]
        save_metrics(self.out, self.records)
        elapsed = time.monotonic() - self.started
        recent = self.records[-3:]
        per_epoch = sum(r["seconds"] for r in recent) / len(recent)
        left = self.epochs - record["epoch"]
        eta = left * per_epoch
        if self.max_seconds is not None:  # a time-boxed run ends with its budget
            eta = min(eta, max(self.max_seconds - elapsed, 0.0))
        self.stream.write(
            f"epoch {record['epoch']}/{self.epochs}: loss {_fmt(record['loss'])} (ce {_fmt(record['loss_ce'])}, "
            f"bbox {_fmt(record['loss_bbox'])}, giou {_fmt(record['loss_giou'])}), val AP {_fmt(record['val_ap'])} "
            f"AP50 {_fmt(record['val_ap50'])}, {record['seconds']:.0f} s ({record['images_per_s']:.2f} images/s), "
            f"ETA {_duration(eta)}\n"
        )
        self.stream.flush()
        if self.max_seconds is not None and left > 0 and elapsed + per_epoch > self.max_seconds:
            self.stopped_for_time = True
            trainer.should_stop = True
            self.stream.write(
                f"stopping after epoch {record['epoch']}: another ({_duration(per_epoch)}) would pass the "
                f"{self.max_seconds / 60:g}-minute budget\n"
            )


def _round(value):
    return None if value is None or not math.isfinite(value) else round(value, 5)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


_ACTIVE: EpochReport | None = None


def progress_callbacks() -> list:
    """PyTorch Lightning's callback factory (entry point `pytorch_lightning.callbacks_factory` in pyproject.toml):
    the epoch report of the `anomaly train` run in progress, for the trainer rfdetr builds; nothing otherwise."""
    return [_ACTIVE.callback()] if _ACTIVE is not None else []


def load_metrics(out: Path) -> list[dict]:
    path = out / "metrics.json"
    return json.loads(path.read_text())["epochs"] if path.is_file() else []


def save_metrics(out: Path, records: list[dict]) -> None:
    (out / "metrics.json").write_text(json.dumps({"epochs": records}, indent=1) + "\n")


def plot_metrics(out: Path, records: list[dict]) -> Path:
    """metrics.png: the training loss and the validation AP / AP50 per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    figure, (loss_axis, ap_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in EpochReport.LOSSES:
        values = [r[key] for r in records]
        if any(v is not None for v in values):
            loss_axis.plot(epochs, [math.nan if v is None else v for v in values], marker=".", label=key)
    loss_axis.set(xlabel="epoch", ylabel="training loss", yscale="log", title="loss")
    loss_axis.legend(fontsize=8)
    for key, label in (("val_ap", "AP@[.5:.95]"), ("val_ap50", "AP50")):
        ap_axis.plot(epochs, [math.nan if r[key] is None else r[key] for r in records], marker=".", label=label)
    ap_axis.set(xlabel="epoch", ylabel="validation box AP", ylim=(0, 1), title="validation")
    ap_axis.legend(fontsize=8)
    figure.tight_layout()
    path = out / "metrics.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def serve_command(checkpoint: Path, variant: str) -> str:
    return f"DETECTOR_WEIGHTS={shlex.quote(str(checkpoint.resolve()))} DETECTOR_VARIANT={variant} make serve"


def finish(out: Path, variant: str, classes: list[dict], run: TrainRun) -> Path | None:
    """RUN_DIR's checkpoint_best.pth from rfdetr's best (the classes' names and roles added), classes.json,
    metrics.png and serve.txt. None when rfdetr wrote no checkpoint yet."""
    import torch

    from anomaly.weights import CHECKPOINT_CLASSES_KEY

    source = next((out / RFDETR_DIR / n for n in RFDETR_BEST if (out / RFDETR_DIR / n).is_file()), None)
    (out / "classes.json").write_text(json.dumps({"classes": classes}, indent=1) + "\n")
    records = load_metrics(out)
    if records:
        plot_metrics(out, records)
    if source is None:
        return None
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    checkpoint[CHECKPOINT_CLASSES_KEY] = classes
    checkpoint["anomaly_run"] = {"dataset": run.dataset, "from": source.name, "epochs": len(records)}
    best = out / BEST
    tmp = best.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(best)
    (out / "serve.txt").write_text(serve_command(best, variant) + "\n")
    return best


def _stream_handlers() -> list[logging.StreamHandler]:
    """The plain stream handlers of every logger but ours (files and our own log lines stay where they are)."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return [
        h
        for logger in loggers
        if isinstance(logger, logging.Logger) and not logger.name.startswith("anomaly")
        for h in logger.handlers
        if type(h) is logging.StreamHandler
    ]


@contextlib.contextmanager
def trainer_output_to(path: Path) -> Iterator[None]:
    """What the trainer prints (stdout, stderr, and the stream handlers of every logger but ours) goes to `path`;
    afterwards every handler writes where it did before (one made meanwhile, to the terminal's stderr)."""
    terminal = sys.stderr
    with open(path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        before = {h: h.stream for h in _stream_handlers()}
        for handler in before:
            handler.stream = log
        try:
            yield
        finally:
            for handler in _stream_handlers():
                handler.stream = before.get(handler, terminal) if handler.stream is log else handler.stream


def train(run: TrainRun, out: Path, resume: bool = False, stream=None, quiet_trainer: bool = True) -> dict:
    """Check the dataset, train, and write RUN_DIR (module docstring). -> a summary for the caller. Raises
    anomaly.datasets.DatasetError on a dataset problem (before anything trains) and TrainingError on a run that
    cannot start."""
    global _ACTIVE

    stream = stream or sys.stderr  # the process's at the call (a test's capture, say), not at import
    dataset = read_dataset(run.dataset, ("train", "valid"))
    classes = class_roles(dataset, run.structures)
    out.mkdir(parents=True, exist_ok=True)
    last = out / RFDETR_DIR / "last.ckpt"
    if resume and not last.is_file():
        raise TrainingError(f"--resume {out}: {last} does not exist (the run saved no epoch yet); start it again")
    (out / "run.json").write_text(json.dumps(asdict(run), indent=1) + "\n")
    device = resolve_device(run.device)

    def output():
        return trainer_output_to(out / "train.log") if quiet_trainer else contextlib.nullcontext()

    with output():
        model = build_model(run)
    workers = run.workers if run.workers is not None else (2 if device == "cuda" else 0)
    options = dict(
        dataset_dir=str(dataset.root),
        epochs=run.epochs,
        batch_size=run.batch_size,
        lr=run.lr,
        lr_encoder=run.lr * 1.5,  # rfdetr's own ratio (1e-4 and 1.5e-4 by default), kept for any --lr
        output_dir=str(out / RFDETR_DIR),
        device=device,
        num_workers=workers,
        seed=run.seed,
        checkpoint_interval=10**6,  # rfdetr then keeps last.ckpt (to resume), no archive of every epoch
        tensorboard=False,
        progress_bar=None,
        resume=str(last) if resume else None,
    )
    if run.resolution:
        options["resolution"] = run.resolution
    if not run.augment:  # what a test that overfits a batch wants: every epoch the same pixels
        options |= {"aug_config": {}, "multi_scale": False, "scale_jitter": False}
    if not resume:
        save_metrics(out, [])
    _ACTIVE = report = EpochReport(out, run.epochs, run.batch_size, stream, run.max_minutes)
    started = time.monotonic()
    try:
        with output():
            model.train(**options)
    finally:
        _ACTIVE = None
        best = finish(out, run.variant, classes, run)
    records = load_metrics(out)
    summary = {
        "run_dir": str(out),
        "checkpoint": str(best) if best else None,
        "classes": classes,
        "epochs_done": len(records),
        "minutes": round((time.monotonic() - started) / 60, 2),
        "stopped_for_time": report.stopped_for_time,
        "best_val_ap": max((r["val_ap"] for r in records if r["val_ap"] is not None), default=None),
        "serve": serve_command(best, run.variant) if best else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
