"""Labelled datasets in the layouts rfdetr trains from, read and checked before anything trains on them.

COCO (Roboflow's layout): `<split>/_annotations.coco.json` beside the split's images, splits `train`, `valid`
(or `val`) and `test`. YOLO (Roboflow's and Ultralytics' layout): `data.yaml` naming the classes, and
`<split>/images/` with `<split>/labels/*.txt` (`class cx cy w h`, normalised). Both are read into one shape
(`Split`: COCO-style images and annotations with class names), which the training and the evaluation use.

A problem is named with its file and the annotation (a missing or undecodable image, a box outside its image or
of zero area, an unknown category, an empty split, duplicated ids, classes that differ between splits), every one
of them at once: `DatasetError` lists them all, so a set is mended in one pass and nothing trains on a broken one.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "valid", "test")
COCO_FILE = "_annotations.coco.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
BOX_TOLERANCE = 1.0  # pixels a box may pass its image's edge by (rounding in editors' exports)
LISTED = 25  # problems quoted in the error's message; all of them are in `problems`


class DatasetError(ValueError):
    """The dataset's problems, each `file: where: what`."""

    def __init__(self, root: Path, problems: list[str]):
        self.problems = problems
        shown = problems[:LISTED]
        more = f"\n  ... and {len(problems) - LISTED} more" if len(problems) > LISTED else ""
        super().__init__(
            f"{root}: {len(problems)} problem{'s' * (len(problems) != 1)} in the dataset; nothing was trained:\n  "
            + "\n  ".join(shown)
            + more
        )


@dataclass
class Split:
    """One split as COCO sees it: `images` (id, file_name, width, height, and `path`, the file), `annotations`
    (id, image_id, category_id, bbox [x, y, w, h] in pixels, area, segmentation where given) and `categories`
    (id, name). `source` is the file the annotations came from."""

    name: str
    source: Path
    images: list[dict] = field(default_factory=list)
    annotations: list[dict] = field(default_factory=list)
    categories: list[dict] = field(default_factory=list)

    def coco(self) -> dict:
        """The split as a COCO dict (pycocotools' COCO reads it: the images carry no `path`)."""
        images = [{k: v for k, v in image.items() if k != "path"} for image in self.images]
        annotations = [{k: v for k, v in a.items() if not k.startswith("_")} for a in self.annotations]
        return {"images": images, "annotations": annotations, "categories": self.categories}

    def category_names(self) -> dict[int, str]:
        return {int(c["id"]): str(c["name"]) for c in self.categories}

    @property
    def has_masks(self) -> bool:
        return any(a.get("segmentation") for a in self.annotations)


@dataclass
class Dataset:
    root: Path
    layout: str  # "coco" or "yolo"
    splits: dict[str, Split]

    def class_names(self) -> list[str]:
        """The classes a model trained on this set has, in its label order (rfdetr's: the train split's categories
        by id, a grouping category that nothing is annotated with and that others name as supercategory left out)."""
        return [c["name"] for c in trained_categories(self.splits["train"])]


def is_structure(category: dict, structures: list[str] | None = None) -> bool:
    """Whether a category is a structural element rather than a defect: named in `structures` when that list is
    given, else filed under a `structure` supercategory or named as a known structural element (anomaly.taxonomy)."""
    from anomaly import taxonomy

    if structures is not None:
        return category["name"] in structures
    grouped = str(category.get("supercategory", "")).lower() in ("structure", "structures")
    return grouped or taxonomy.role_of(category["name"]) == "structure"


def trained_categories(split: Split) -> list[dict]:
    """The categories rfdetr turns into labels, in label order."""
    from rfdetr.datasets.coco import filter_parent_categories

    annotated = {int(a["category_id"]) for a in split.annotations}
    return filter_parent_categories(sorted(split.categories, key=lambda c: int(c["id"])), annotated)


def read_dataset(root: str | Path, splits: tuple[str, ...] = ("train", "valid"), decode: bool = True) -> Dataset:
    """Read and check the named splits (each required) of the dataset at `root`; every image is decoded when
    `decode`. Raises DatasetError naming every problem found."""
    root = Path(root)
    problems: list[str] = []
    if not root.is_dir():
        raise DatasetError(root, [f"{root}: is not a folder"])
    layout = "yolo" if _yolo_yaml(root) and not any((root / s / COCO_FILE).is_file() for s in SPLITS) else "coco"
    found: dict[str, Split] = {}
    for name in splits:
        split = _read_yolo_split(root, name, problems) if layout == "yolo" else _read_coco_split(root, name, problems)
        if split is not None:
            found[name] = split
    for split in found.values():
        _check_split(root, split, problems, decode)
    if layout == "coco" and "train" in found:
        reference = found["train"].category_names()
        for split in found.values():
            if split.name != "train" and split.category_names() != reference:
                problems.append(
                    f"{_rel(root, split.source)}: categories {_names(split.category_names())} differ from the "
                    f"train split's {_names(reference)}: every split must name the same classes with the same ids"
                )
    if problems:
        raise DatasetError(root, problems)
    return Dataset(root, layout, found)


def _rel(root: Path, path: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _names(categories: dict[int, str]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(categories.items())) + "}"


def _split_folder(root: Path, name: str) -> Path:
    if name == "valid" and not (root / "valid").exists() and (root / "val").exists():
        return root / "val"
    return root / name


def _read_coco_split(root: Path, name: str, problems: list[str]) -> Split | None:
    path = _split_folder(root, name) / COCO_FILE
    where = _rel(root, path)
    if not path.is_file():
        problems.append(f"{where}: is missing (the {name} split's annotations)")
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{where}: is not readable JSON ({exc})")
        return None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        problems.append(f"{where}: needs `images` and `annotations` lists (COCO instances)")
        return None
    if not isinstance(data.get("categories"), list):
        problems.append(f"{where}: needs a `categories` list")
        return None
    split = Split(name, path, data["images"], data["annotations"], data["categories"])
    for image in split.images:
        if isinstance(image, dict) and isinstance(image.get("file_name"), str):
            image["path"] = path.parent / image["file_name"]
    return split


def _check_split(root: Path, split: Split, problems: list[str], decode: bool) -> None:
    where = _rel(root, split.source)
    image_ids, category_ids = _unique(where, "image", split.images, problems), None
    category_ids = _unique(where, "category", split.categories, problems)
    _unique(where, "annotation", split.annotations, problems)
    if not split.images:
        problems.append(f"{where}: the {split.name} split has no images")
    elif split.name == "train" and not split.annotations:
        problems.append(f"{where}: the train split has no annotations: there is nothing to learn")
    images = {i["id"]: i for i in split.images if isinstance(i, dict) and i.get("id") in image_ids}
    for image in images.values():
        if not isinstance(image.get("file_name"), str):
            problems.append(f"{where}: image {image['id']}: has no file_name")
        elif not Path(image["path"]).is_file():
            problems.append(f"{where}: image {image['id']}: {_rel(root, Path(image['path']))} does not exist")
        for key in ("width", "height"):
            if not isinstance(image.get(key), int) or image[key] <= 0:
                problems.append(f"{where}: image {image['id']}: {key} {image.get(key)!r} is not a positive integer")
    for a in split.annotations:
        if not isinstance(a, dict) or "id" not in a:
            continue
        image = images.get(a.get("image_id"))
        if image is None:
            problems.append(f"{where}: annotation {a['id']}: image_id {a.get('image_id')!r} is no image of this file")
            continue
        # a YOLO box is named by its label file and line; a COCO one by its file, id and image
        about = a.get("_line") or f"{where}: annotation {a['id']} (image {image['id']} {image.get('file_name', '')!r})"
        if a.get("category_id") not in category_ids:
            problems.append(f"{about}: category_id {a.get('category_id')!r} is not among the categories")
        problems.extend(f"{about}: {p}" for p in _box_problems(a.get("bbox"), image))
        if a.get("segmentation"):
            problem = _segmentation_problem(a["segmentation"], image)
            if problem:
                problems.append(f"{about}: {problem}")
    if decode:
        readable = [i for i in images.values() if isinstance(i.get("file_name"), str) and Path(i["path"]).is_file()]
        with ThreadPoolExecutor(4) as pool:
            for image, problem in zip(readable, pool.map(_decode_problem, readable)):
                if problem:
                    problems.append(f"{where}: image {image['id']}: {_rel(root, Path(image['path']))} {problem}")


def _unique(where: str, kind: str, items: list, problems: list[str]) -> set:
    """The ids of `items`, each duplicate and each item without an integer id reported."""
    seen: set = set()
    for item in items:
        ident = item.get("id") if isinstance(item, dict) else None
        if not isinstance(ident, int) or isinstance(ident, bool):
            problems.append(f"{where}: a {kind} entry has no integer id ({str(item)[:60]})")
        elif ident in seen:
            problems.append(f"{where}: {kind} id {ident} is used twice")
        else:
            seen.add(ident)
    return seen


def _box_problems(box, image: dict) -> list[str]:
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        return [f"bbox {box!r} is not [x, y, width, height]"]
    x, y, w, h = box
    if w <= 0 or h <= 0:
        return [f"bbox {box} has zero area"]
    width, height = image.get("width"), image.get("height")
    if isinstance(width, int) and isinstance(height, int):
        t = BOX_TOLERANCE
        if x < -t or y < -t or x + w > width + t or y + h > height + t:
            return [f"bbox {box} runs outside the {width} x {height} image"]
    return []


def _segmentation_problem(segmentation, image: dict) -> str:
    """Whether pycocotools can make this annotation's mask for its image."""
    from pycocotools import mask as coco_mask

    try:
        if isinstance(segmentation, dict):
            size = list(segmentation.get("size", []))
            if size != [image.get("height"), image.get("width")]:
                hw = [image.get("height"), image.get("width")]
                return f"RLE size {size} is not the image's [height, width] {hw}"
            rle = segmentation
            if isinstance(rle.get("counts"), list):
                rle = coco_mask.frPyObjects(rle, *size)
            coco_mask.decode(rle)
        else:
            polygons = [p for p in segmentation if len(p) >= 6]
            if not polygons:
                return "segmentation has no polygon of 3 or more points"
            coco_mask.frPyObjects(polygons, image["height"], image["width"])
    except Exception as exc:  # noqa: BLE001 - whatever pycocotools says of it
        return f"segmentation cannot be read ({type(exc).__name__}: {exc})"
    return ""


def _decode_problem(image: dict) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image["path"]) as img:
            img.load()
            size = img.size
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        return f"does not decode ({type(exc).__name__}: {str(exc)[:80]})"
    if (image.get("width"), image.get("height")) != size and isinstance(image.get("width"), int):
        return f"is {size[0]} x {size[1]}, but its entry says {image.get('width')} x {image.get('height')}"
    return ""


# --- YOLO -----------------------------------------------------------------------------------------------------


def _yolo_yaml(root: Path) -> Path | None:
    for name in ("data.yaml", "data.yml"):
        if (root / name).is_file():
            return root / name
    return None


def _yolo_names(path: Path) -> list[str]:
    """The class names a data.yaml declares (`names:` as a list, a mapping, or an inline list)."""
    text = path.read_text()
    try:
        import yaml

        data = yaml.safe_load(text) or {}
        names = data.get("names")
    except ImportError:  # pragma: no cover - PyYAML ships with our dependencies
        names = None
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names)]
    if isinstance(names, list):
        return [str(n) for n in names]
    match = re.search(r"^names:\s*\[(.*)\]", text, re.M)
    return [n.strip().strip("'\"") for n in match.group(1).split(",")] if match else []


def _read_yolo_split(root: Path, name: str, problems: list[str]) -> Split | None:
    """A YOLO split as COCO: boxes in pixels from the normalised label lines, category ids 0.. as data.yaml
    numbers them."""
    from PIL import Image, UnidentifiedImageError

    yaml_path = _yolo_yaml(root)
    names = _yolo_names(yaml_path)
    folder = _split_folder(root, name)
    images_dir, labels_dir = folder / "images", folder / "labels"
    if not images_dir.is_dir():
        problems.append(f"{_rel(root, images_dir)}: is missing (the {name} split's images)")
        return None
    split = Split(name, labels_dir, categories=[{"id": i, "name": n} for i, n in enumerate(names)])
    if not names:
        problems.append(f"{_rel(root, yaml_path)}: names no classes (`names:`)")
    files = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    stems = {p.relative_to(images_dir).with_suffix("") for p in files}
    for label in sorted(labels_dir.rglob("*.txt")) if labels_dir.is_dir() else []:
        if label.relative_to(labels_dir).with_suffix("") not in stems:
            problems.append(f"{_rel(root, label)}: has no image beside it in {_rel(root, images_dir)}")
    for image_id, path in enumerate(files, start=1):
        try:
            with Image.open(path) as img:
                width, height = img.size
        except (OSError, UnidentifiedImageError) as exc:
            problems.append(f"{_rel(root, path)}: does not decode ({type(exc).__name__})")
            width = height = 0
        split.images.append({"id": image_id, "file_name": str(path.relative_to(images_dir)), "width": width,
                             "height": height, "path": path})  # fmt: skip
        label = labels_dir / path.relative_to(images_dir).with_suffix(".txt")
        if not label.is_file():
            continue  # an image with no label file has no objects
        for n, line in enumerate(label.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{_rel(root, label)}: line {n}"
            try:
                cls, values = int(fields[0]), [float(v) for v in fields[1:]]
            except ValueError:
                problems.append(f"{where}: {line.strip()!r} is not `class cx cy w h`")
                continue
            if len(values) == 4:
                cx, cy, w, h = values
            elif len(values) >= 6 and len(values) % 2 == 0:  # a polygon: its box
                xs, ys = values[0::2], values[1::2]
                cx, cy, w, h = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)
            else:
                problems.append(f"{where}: {line.strip()!r} is not `class cx cy w h` or a polygon")
                continue
            if not 0 <= cls < len(names):
                problems.append(f"{where}: class {cls} is not among data.yaml's {len(names)} names")
                continue
            box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
            split.annotations.append({"id": len(split.annotations) + 1, "image_id": image_id, "category_id": cls,
                                      "bbox": box, "area": box[2] * box[3], "iscrowd": 0,
                                      "_line": where})  # fmt: skip
    return split


# --- one reviewed COCO file -> a dataset ---------------------------------------------------------------------


def split_coco(annotations: str | Path, images: str | Path | None, out: str | Path, valid: float = 0.15,
               test: float = 0.15, seed: int = 0) -> Dataset:  # fmt: skip
    """One COCO file (a campaign's coco.json, or what CVAT or Label Studio export after review) -> a dataset in
    rfdetr's layout at `out`: its images shared out at random among train, valid and test (by `valid` and `test`,
    each split at least one image), each split's `_annotations.coco.json` beside links to (or copies of) its
    images. An image is found at `images`/file_name, else at its `source` (where a campaign read it). The result
    is checked (read_dataset) before it is returned."""
    import os
    import random
    import shutil

    annotations, out = Path(annotations), Path(out)
    data = json.loads(annotations.read_text())
    root = Path(images) if images else annotations.parent
    problems, found = [], {}
    for image in data.get("images", []):
        candidates = [root / str(image.get("file_name", "")), Path(str(image.get("source") or ""))]
        path = next((p for p in candidates if str(p) not in ("", ".") and p.is_file()), None)
        if path is None:
            problems.append(f"{annotations.name}: image {image.get('id')}: {image.get('file_name')!r} is neither in "
                            f"{root} nor at its source {image.get('source')!r}")  # fmt: skip
        found[image.get("id")] = path
    if problems:
        raise DatasetError(annotations, problems)
    order = sorted(found)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_test = max(1, round(n * test)) if test > 0 else 0
    n_valid = max(1, round(n * valid))
    if n - n_test - n_valid < 1:
        raise DatasetError(annotations, [f"{annotations.name}: {n} images are too few for train, valid and test"])
    parts = {"test": order[:n_test], "valid": order[n_test : n_test + n_valid], "train": order[n_test + n_valid :]}
    for name, ids in parts.items():
        if not ids:
            continue
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        chosen = set(ids)
        images_out = []
        for image in data["images"]:
            if image["id"] not in chosen:
                continue
            source = found[image["id"]]
            file_name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(image["file_name"]))
            if Path(file_name).suffix.lower() not in IMAGE_SUFFIXES:
                file_name += source.suffix.lower() or ".jpg"
            target = folder / file_name
            if not target.exists():
                try:
                    os.link(source, target)
                except OSError:  # another file system, or links not allowed
                    shutil.copy2(source, target)
            images_out.append(image | {"file_name": file_name})
        coco = {**{k: v for k, v in data.items() if k not in ("images", "annotations")}, "images": images_out,
                "annotations": [a for a in data.get("annotations", []) if a.get("image_id") in chosen]}  # fmt: skip
        (folder / COCO_FILE).write_text(json.dumps(coco) + "\n")
    return read_dataset(out, tuple(name for name, ids in parts.items() if ids))
