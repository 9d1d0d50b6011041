"""Datasets: the synthetic generator's truth, and every dataset problem named with its file and annotation before
anything trains (anomaly.datasets; `anomaly check`, and `anomaly train` exiting 2)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from anomaly.datasets import DatasetError, read_dataset
from anomaly.synthetic import CLASSES, write_dataset
from client.cli import main as cli


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A small synthetic dataset, written once: the copy each test breaks."""
    return write_dataset(tmp_path_factory.mktemp("clean"), {"train": 4, "valid": 2, "test": 2}, seed=3)


@pytest.fixture
def dataset(clean, tmp_path):
    return shutil.copytree(clean, tmp_path / "set")


def edit(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def problems(root, splits=("train", "valid")) -> list[str]:
    with pytest.raises(DatasetError) as err:
        read_dataset(root, splits)
    assert all(p in str(err.value) for p in err.value.problems[:25])  # the message quotes them
    return err.value.problems


def test_the_generator_is_deterministic_and_its_truth_consistent(clean, tmp_path):
    """The same seed writes the same files; every crack's recorded width is what its mask measures."""
    from anomaly.geometry import measure
    from anomaly.masks import rle_to_mask

    again = write_dataset(tmp_path / "again", {"train": 4, "valid": 2, "test": 2}, seed=3)
    for split in ("train", "valid", "test"):
        a, b = (root / split / "_annotations.coco.json" for root in (clean, again))
        assert a.read_text() == b.read_text()
        for image in json.loads(a.read_text())["images"]:
            assert (clean / split / image["file_name"]).read_bytes() == (
                again / split / image["file_name"]
            ).read_bytes()
    data = read_dataset(clean, ("train", "valid", "test"))
    assert data.class_names() == list(CLASSES) and data.layout == "coco"
    cracks = [a for s in data.splits.values() for a in s.annotations if a["category_id"] == CLASSES.index("crack") + 1]
    assert cracks, "the set has cracks"
    for a in cracks:
        mask = rle_to_mask(a["segmentation"])
        ys, xs = np.nonzero(mask)
        g = measure(mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
        assert g["max_width_pixels"] == pytest.approx(a["attributes"]["width_px"], abs=1.6)
        assert g["length_pixels"] == pytest.approx(a["attributes"]["length_px"], rel=0.15, abs=6)
        assert a["area"] == mask.sum() and a["bbox"][2] == xs.max() - xs.min() + 1


def test_a_clean_set_passes_and_check_says_so(clean, capsys):
    assert cli(["check", str(clean), "--splits", "train,valid,test"]) == 0
    assert "no problem found" in capsys.readouterr().out


def test_each_problem_is_named_with_its_file_and_annotation(dataset):
    train, valid = dataset / "train" / "_annotations.coco.json", dataset / "valid" / "_annotations.coco.json"
    first = json.loads(train.read_text())["images"][0]

    def break_train(data):
        a, b, c = data["annotations"][:3]
        a["bbox"] = [first["width"] - 10, 5, 40, 20]  # past the right edge
        a["image_id"] = first["id"]
        b["bbox"] = [10, 10, 0, 25]  # zero area
        c["category_id"] = 99
        data["annotations"].append(dict(data["annotations"][3]))  # the same annotation id twice
        data["images"].append(dict(data["images"][1]))  # the same image id twice
        data["images"].append(dict(data["images"][2], id=1000, file_name="gone.jpg"))

    edit(train, break_train)
    edit(valid, lambda data: data["categories"].__setitem__(0, {"id": 1, "name": "fissure", "supercategory": "defect"}))
    (dataset / "train" / first["file_name"]).write_bytes(b"\xff\xd8 not really a JPEG")
    found = problems(dataset)
    expected = [
        ("train/_annotations.coco.json", "runs outside the"),
        ("train/_annotations.coco.json", "has zero area"),
        ("train/_annotations.coco.json", "category_id 99 is not among the categories"),
        ("train/_annotations.coco.json", "annotation id"),
        ("train/_annotations.coco.json", "image id"),
        ("train/gone.jpg", "does not exist"),
        (f"train/{first['file_name']}", "does not decode"),
        ("valid/_annotations.coco.json", "differ from the train split's"),
    ]
    for where, what in expected:
        assert any(where in p and what in p for p in found), (where, what, found)
    assert any("annotation" in p and f"image {first['id']}" in p and "outside" in p for p in found)


def test_missing_and_empty_splits_are_named(dataset, capsys):
    shutil.rmtree(dataset / "valid")
    edit(dataset / "test" / "_annotations.coco.json", lambda data: data.update(images=[], annotations=[]))
    found = problems(dataset, ("train", "valid", "test"))
    assert any("valid/_annotations.coco.json: is missing" in p for p in found)
    assert any("test/_annotations.coco.json" in p and "has no images" in p for p in found)
    assert cli(["train", str(dataset), "--out", str(dataset / "run"), "--init", "none"]) == 2
    err = capsys.readouterr().err
    assert "valid/_annotations.coco.json: is missing" in err and "nothing was trained" in err
    assert not (dataset / "run" / "rfdetr").exists()  # nothing started


def test_yolo_layout_read_and_its_problems_named(tmp_path):
    """A YOLO set (data.yaml, <split>/images, <split>/labels) reads into the same shape, boxes in pixels; a bad
    line is named by its label file and line."""
    from PIL import Image

    root = tmp_path / "yolo"
    (root / "data.yaml").parent.mkdir()
    (root / "data.yaml").write_text("names: [crack, beam]\n")
    for split in ("train", "valid"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir()
        Image.new("RGB", (200, 100), (128, 128, 128)).save(root / split / "images" / "a.jpg")
        (root / split / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.25 0.5 0.5 1.0\n")
    data = read_dataset(root)
    assert data.layout == "yolo" and data.class_names() == ["crack", "beam"]
    assert data.splits["train"].annotations[0]["bbox"] == pytest.approx([80, 30, 40, 40])
    (root / "train" / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n7 0.5 0.5 0.2 0.2\n0 0.95 0.5 0.3 0.2\n")
    (root / "train" / "labels" / "b.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    found = problems(root)
    assert any("train/labels/a.txt: line 2" in p and "class 7" in p for p in found)
    assert any("train/labels/a.txt: line 3" in p and "runs outside" in p for p in found)
    assert any("train/labels/b.txt" in p and "has no image" in p for p in found)
