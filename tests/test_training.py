"""`anomaly train` through rfdetr's own trainer, then served as it is and evaluated like any client.

A few steps on a tiny generated set: the same two photos of one crack every step (no augmentation) must at least
halve the loss; the run folder holds what a user needs; `--resume` continues it; the checkpoint, exported and served
by a real tritonserver of its own, answers with the dataset's class name; `anomaly evaluate` scores a split through
that server and `--min-ap` gates on it. No pretrained backbone can be downloaded here, and RF-DETR from an untrained
start learns slowly (its loss falls by a quarter in 60 steps on richer photos, and a higher rate diverges): one
class, 128 px, 14 epochs of 5 steps, about three minutes on 2 cores. Which classes are structures travels with a
checkpoint: tested on an export of one that says so (no training needed for that)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys

import numpy as np
import pytest

from anomaly.synthetic import one_crack, write_scenes
from client.cli import main as cli

CLASS = "hairline_crack"  # no default class has this name: what the service answers comes from the checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # it trains and starts a server of its own


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two photos of one crack to learn from (validation and test: one more each), the class named as only this
    dataset names it."""
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("tiny")
    write_scenes(root, {s: [one_crack(rng) for _ in range(n)] for s, n in (("train", 2), ("valid", 1), ("test", 2))},
                 classes=("crack",))  # fmt: skip
    for split in ("train", "valid", "test"):
        path = root / split / "_annotations.coco.json"
        data = json.loads(path.read_text())
        data["categories"] = [{"id": 1, "name": CLASS, "supercategory": "defect"}]
        path.write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """A run of 14 epochs (5 steps of the same batch each), then resumed to 15. -> (RUN_DIR, its first run's
    terminal lines, its resumed run's)."""
    out = tmp_path_factory.mktemp("run") / "run"
    args = ["train", str(tiny), "--variant", "nano", "--epochs", "14", "--out", str(out), "--init", "none",
            "--batch-size", "2", "--lr", "1e-3", "--resolution", "128", "--no-augment"]  # fmt: skip
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli(args) == 0
    first = err.getvalue()
    with contextlib.redirect_stderr(err):
        assert cli(["train", "--resume", str(out), "--epochs", "15"]) == 0
    sys.stderr.write(err.getvalue())  # shown when a test fails
    return out, first, err.getvalue()[len(first) :]


def test_a_few_steps_overfit_the_batch_and_leave_a_servable_run(run):
    out, first, resumed = run
    epochs = json.loads((out / "metrics.json").read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(1, 16))  # fourteen, then the fifteenth after --resume
    assert min(e["loss"] for e in epochs[-3:]) <= 0.5 * epochs[0]["loss"], [e["loss"] for e in epochs]
    lines = re.findall(r"^epoch (\d+)/(\d+): loss [\d.]+ .* val AP \S+ AP50 \S+, \d+ s .*ETA", first, re.M)
    assert [int(n) for n, _ in lines] == list(range(1, 15)) and {t for _, t in lines} == {"14"}  # a line an epoch
    assert re.search(r"^epoch 15/15: ", resumed, re.M) and "epoch 1/" not in resumed  # continued, not restarted
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rf-detr" in (out / "train.log").read_text().lower()  # rfdetr's own output went there
    assert json.loads((out / "classes.json").read_text())["classes"] == [{"name": CLASS, "role": "defect"}]
    serve = (out / "serve.txt").read_text()
    assert f"DETECTOR_WEIGHTS={out / 'checkpoint_best.pth'}" in serve and "DETECTOR_VARIANT=nano" in serve


def test_the_checkpoint_is_served_as_it_is_and_evaluated(run, tiny, tmp_path):
    """Exported and served by a real Triton with no DETECTOR_NUM_CLASSES or labels file: the response names the
    dataset's class; plain tritonclient's typed outputs stay within it; `anomaly evaluate` writes what the
    interface promises and `--min-ap` gates."""
    import tritonclient.grpc as grpcclient

    from bench.serving import serve_checkpoint
    from client import AnomalyClient

    out = run[0]
    with serve_checkpoint(out / "checkpoint_best.pth", tmp_path / "served") as server:
        meta = json.loads((tmp_path / "served/model_repository/detector/1/metadata.json").read_text())
        assert (meta["class_names"][0], meta["roles"][0], meta["variant"], meta["resolution"]) == (
            CLASS, "defect", "nano", 128,
        )  # fmt: skip
        photo = (tiny / "train" / "train_0001.jpg").read_bytes()  # the batch it overfit: it finds its crack
        with AnomalyClient(server.grpc_url, "grpc") as client:
            response = client.detect(photo, confidence_threshold=0.3)
        assert response["anomalies"] and {a["defect_type"] for a in response["anomalies"]} == {CLASS}
        assert response["models"]["detector"]["name"] == "rf-detr-nano" and response["untrained_weights"] is not None
        with grpcclient.InferenceServerClient(server.grpc_url) as plain:  # an outsider's call, typed outputs only
            image = grpcclient.InferInput("IMAGE", [1], "BYTES")
            image.set_data_from_numpy(np.array([photo], dtype=np.object_))
            result = plain.infer("anomaly_pipeline", [image], outputs=[grpcclient.InferRequestedOutput("CLASS_IDS")],
                                 parameters={"confidence_threshold": 0.3})  # fmt: skip
            assert set(result.as_numpy("CLASS_IDS").tolist()) == {0}

        evaluated = tmp_path / "eval"
        args = ["evaluate", str(tiny), "--split", "train", "--url", server.grpc_url, "--out", str(evaluated),
                "--ap-threshold", "0.05"]  # fmt: skip  # the photos it learned: AP above nothing
        assert cli([*args, "--min-ap", "0.05"]) == 0
        report = json.loads((evaluated / "eval.json").read_text())
        assert list(report["per_class"]) == [CLASS] and report["images"] == 2 and report["has_masks"]
        assert report["box"]["ap50"] > 0 and report["mask"]["ap"] is not None
        assert report["at_threshold"]["truths"] == 2 and report["frames_per_s"] > 0
        html = (evaluated / "eval.html").read_text()
        assert "<svg" in html and "Per class" in html
        assert cli([*args, "--min-ap", "1.01"]) == 1  # no AP reaches this: the gate closes


@pytest.mark.parametrize("structures", [None, ["pier_cap"]])
def test_which_classes_are_structures_travels_with_the_checkpoint(tmp_path, structures):
    """`anomaly train` keeps each class's role in its checkpoint (from the dataset's categories, or --structures);
    the export serves those roles with no labels file, even for a name no taxonomy knows. Shown on a checkpoint
    with that key written as finish() writes it (training itself is the test above)."""
    import dataclasses

    import torch

    from anomaly.config import load_settings
    from anomaly.datasets import Dataset, Split
    from anomaly.training import class_roles
    from anomaly.weights import CHECKPOINT_CLASSES_KEY, make_untrained_detector
    from export.detector import export_detector

    categories = [{"id": 1, "name": "scaling", "supercategory": "defect"},
                  {"id": 2, "name": "pier_cap", "supercategory": "element"}]  # fmt: skip
    annotations = [{"id": c["id"], "image_id": 1, "category_id": c["id"]} for c in categories]
    split = Split("train", tmp_path, [{"id": 1}], annotations, categories)
    classes = class_roles(Dataset(tmp_path, "coco", {"train": split}), structures)
    expected = "structure" if structures else "defect"  # by name, pier_cap is no known structure
    assert classes == [{"name": "scaling", "role": "defect"}, {"name": "pier_cap", "role": expected}]
    settings = dataclasses.replace(load_settings(), detector_variant="nano", weights_dir=tmp_path / "weights",
                                   model_repository=tmp_path / "repo")  # fmt: skip
    checkpoint = torch.load(make_untrained_detector(settings), weights_only=False)
    checkpoint["args"] = {"class_names": ["scaling", "pier_cap"], "num_classes": 2}
    head = checkpoint["model"]
    for key in ("class_embed.weight", "class_embed.bias"):  # two classes and the background slot
        head[key] = head[key][:3]
    for key in [k for k in head if k.startswith("transformer.enc_out_class_embed")]:
        head[key] = head[key][:3]
    checkpoint[CHECKPOINT_CLASSES_KEY] = classes
    path = tmp_path / "trained.pth"
    torch.save(checkpoint, path)
    meta = export_detector(dataclasses.replace(settings, detector_weights=str(path)))
    assert meta.class_names[:2] == ["scaling", "pier_cap"] and meta.roles[:2] == ["defect", expected]
