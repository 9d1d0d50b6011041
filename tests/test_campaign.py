"""`anomaly detect PATH... --out DIR` and `anomaly report DIR` against the real Triton: a folder with a corrupt
file, a PNG, a large JPEG and a short video gives JSON Lines, a COCO file pycocotools loads (masks decode,
areas match), a CSV, annotated images and an HTML report; the corrupt file is reported and skipped; a second
run resumes without sending anything again. The report is also opened in a real browser (chromium-headless-shell,
`make browser`): its thumbnails decode, its script runs without error and sorts the defect table."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import time
import urllib.request
from contextlib import ExitStack
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from client.cli import main as cli
from tests.conftest import REPO, SAMPLES

BROWSER_ROOT = REPO / ".browser" / "root"


@pytest.fixture(scope="module")
def campaign_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flight")
    (folder / "sub").mkdir()
    shutil.copy(SAMPLES / "pier_spalling.png", folder / "pier.png")
    (folder / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    deck = cv2.imread(str(SAMPLES / "bridge_deck.jpg"))
    cv2.imwrite(str(folder / "sub" / "large.jpg"), cv2.resize(deck, (4000, 2250)), [cv2.IMWRITE_JPEG_QUALITY, 90])
    (folder / "notes.txt").write_text("not media: left alone")
    video = cv2.VideoWriter(str(folder / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 5, (640, 360))
    small = cv2.resize(deck, (640, 360))
    for i in range(10):  # 2 s at 5 frames/s
        video.write(np.roll(small, 8 * i, axis=1))
    video.release()
    return folder


class Report(HTMLParser):
    """What a reader of report.html sees: the defect table's rows, thumbnails and links, the banner."""

    def __init__(self):
        super().__init__()
        self.rows, self.in_defects, self.thumbs, self.links, self.banner, self.svgs = 0, False, 0, [], False, 0
        self.in_tracks, self.track_images = False, 0  # the tracked defects' table (videos), each at its best frame

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and "defects" in (a.get("class") or ""):
            self.in_defects = True
        elif tag == "table" and "tracks" in (a.get("class") or ""):
            self.in_tracks = True
        elif tag == "tr" and self.in_defects:
            self.rows += 1
        elif tag == "img" and (a.get("src") or "").startswith("data:image/jpeg;base64,"):
            if self.in_tracks:
                self.track_images += 1
            else:
                self.thumbs += 1
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])
        elif tag == "p" and a.get("class") == "banner":
            self.banner = True
        elif tag == "svg":
            self.svgs += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self.in_defects = self.in_tracks = False


class Browser:
    """chromium-headless-shell driven over the DevTools protocol: open a page, evaluate JavaScript in it, and
    collect the exceptions its scripts throw."""

    def __init__(self, profile):
        binary = BROWSER_ROOT / "usr" / "lib" / "chromium" / "chromium-headless-shell"
        assert binary.is_file(), "no browser: run `make browser` (make test does)"
        libs = BROWSER_ROOT / "usr" / "lib" / "x86_64-linux-gnu"
        env = os.environ | {"LD_LIBRARY_PATH": f"{libs}:{libs / 'pulseaudio'}"}
        args = [
            str(binary),
            "--no-sandbox",  # Chromium's sandbox refuses to run as root, which CI is
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        self.stack = ExitStack()
        self.process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.stack.callback(self._stop)  # also when it fails to start below: no browser left behind
        try:
            port_file = profile / "DevToolsActivePort"  # the browser writes its port there once it listens
            deadline = time.monotonic() + 30
            while not (port_file.is_file() and port_file.read_text().strip()):
                assert time.monotonic() < deadline and self.process.poll() is None, "the browser did not start"
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as answer:
                page = next(t for t in json.load(answer) if t["type"] == "page")
            from websockets.sync.client import connect

            self.socket = self.stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None))
        except BaseException:
            self.stack.close()
            raise
        self.calls, self.events = 0, []

    def _stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    def call(self, method: str, **params) -> dict:
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=30))
            if message.get("id") == self.calls:
                assert "error" not in message, message
                return message["result"]
            self.events.append(message)

    def open(self, url: str) -> None:
        self.call("Runtime.enable")
        self.call("Page.enable")
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + 30
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            assert time.monotonic() < deadline, "the page did not load"
            self.events.append(json.loads(self.socket.recv(timeout=30)))

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    @property
    def script_errors(self) -> list:
        return [e["params"] for e in self.events if e.get("method") == "Runtime.exceptionThrown"]

    def close(self) -> None:
        self.stack.close()  # the socket, then the browser


def check_report_in_a_browser(report, anomalies: int, profile) -> None:
    """What a reader sees: every thumbnail decoded, no script error, and a click on a numeric column's header
    sorting the defect rows by it, ascending then descending."""
    browser = Browser(profile)
    try:
        browser.open(report.as_uri())
        assert browser.evaluate("document.querySelectorAll('table.defects tbody tr').length") == anomalies
        images = browser.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
        assert images and all(images)
        column = browser.evaluate(
            "Array.from(document.querySelectorAll('table.defects th')).findIndex(th => th.textContent == 'length px')"
        )
        assert column >= 0
        read = f"Array.from(document.querySelectorAll('table.defects tbody tr')).map(r => +r.cells[{column}].dataset.v)"
        before = browser.evaluate(read)
        browser.evaluate(f"document.querySelectorAll('table.defects th')[{column}].click()")
        ascending = browser.evaluate(read)
        browser.evaluate(f"document.querySelectorAll('table.defects th')[{column}].click()")
        descending = browser.evaluate(read)
        assert ascending == sorted(before) and descending == sorted(before, reverse=True)
        assert len(set(before)) > 1  # the sort had something to do
        # the tracked defects' table (the clip) sorts by its own columns, not by the defect table's
        frames = "Array.from(document.querySelectorAll('table.tracks tbody tr')).map(r => +r.cells[3].dataset.v)"
        seen = browser.evaluate(frames)
        browser.evaluate("document.querySelectorAll('table.tracks th')[3].click()")
        assert browser.evaluate(frames) == sorted(seen)
        assert browser.script_errors == []
    finally:
        browser.close()


def check_review_loop(campaign, photos, dataset, annotations: int) -> None:
    """The campaign's coco.json, as a reviewer exports it again from CVAT or Label Studio, trains as it is:
    `anomaly split` shares it out into rfdetr's layout, our checks pass, and rfdetr's own COCO loader reads every
    image and box of the training split."""
    from rfdetr.datasets.coco import CocoDetection

    assert cli(["split", str(campaign / "coco.json"), "--images", str(photos), "--out", str(dataset),
                "--valid", "0.2", "--test", "0.2"]) == 0  # fmt: skip
    assert cli(["check", str(dataset), "--splits", "train,valid,test"]) == 0
    total = 0
    for split in ("train", "valid", "test"):
        data = json.loads((dataset / split / "_annotations.coco.json").read_text())
        loader = CocoDetection(
            dataset / split, dataset / split / "_annotations.coco.json", None, remap_category_ids=True
        )
        assert len(loader) == len(data["images"])
        for k in range(len(loader)):
            image, target = loader[k]
            expected = [a for a in data["annotations"] if a["image_id"] == target["image_id"].item()]
            assert image.size == (target["orig_size"][1].item(), target["orig_size"][0].item())
            assert len(target["boxes"]) == len(expected)
        total += len(data["annotations"])
    assert total == annotations


def test_campaign_outputs_resume_and_report(triton, campaign_folder, tmp_path, capsys):
    from pycocotools.coco import COCO

    out = tmp_path / "out"
    args = ["detect", str(campaign_folder), "--out", str(out), "--url", triton.grpc_url, "--threshold", "0.25",
            "--fps", "2", "--in-flight", "3", "--mm-per-pixel", "0.5"]  # fmt: skip
    assert cli(args) == 2  # done, with one file that failed
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "frames/s" in err

    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    ids = sorted(r["frame_id"] for r in results)
    # 2 frames a second from a 5 frames/s video: the first frame at or after each half second
    assert ids == ["clip.mp4:0.000s", "clip.mp4:0.600s", "clip.mp4:1.000s", "clip.mp4:1.600s", "pier.png",
                   "sub/large.jpg"]  # fmt: skip
    large = next(r for r in results if r["frame_id"] == "sub/large.jpg")
    assert large["image_size"] == {"width": 4000, "height": 2250}
    assert large["tiling"]["tiled"] and large["tiling"]["detector_tiles"] == 40  # auto: 4000 px > 4 x 576
    assert not next(r for r in results if r["frame_id"] == "pier.png")["tiling"]["tiled"]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["frame_id"] for e in errors] == ["sub/broken.jpg"] and "image" in errors[0]["error"]

    coco = COCO(str(out / "coco.json"))
    anomalies = sum(len(r["anomalies"]) for r in results)
    structures = sum(len(r["structures"]) for r in results)
    assert len(coco.getImgIds()) == len(results) and len(coco.getAnnIds()) == anomalies + structures
    kinds = {c["name"]: c["supercategory"] for c in coco.loadCats(coco.getCatIds())}
    assert {a["defect_type"] for r in results for a in r["anomalies"]} == {n for n, k in kinds.items() if k == "defect"}
    assert all(Path(image["source"]).is_file() for image in coco.loadImgs(coco.getImgIds()))  # video frames: kept
    for ann in coco.loadAnns(coco.getAnnIds()):
        if kinds[coco.loadCats(ann["category_id"])[0]["name"]] == "structure":
            assert "segmentation" not in ann and ann["area"] == ann["bbox"][2] * ann["bbox"][3]
            continue
        mask = coco.annToMask(ann)
        assert mask.sum() == ann["area"] > 0
        x, y, w, h = ann["bbox"]
        assert mask[:, : int(x)].sum() == 0 and mask[: int(y)].sum() == 0  # the mask lies in its box
        assert mask[int(y + h) :].sum() == 0 and mask[:, int(x + w) :].sum() == 0
        assert {"length_pixels", "width_pixels", "structure_type"} <= set(ann["attributes"])

    with open(out / "defects.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == anomalies
    cracks = [r for r in rows if "crack" in r["defect_type"]]
    assert all(float(r["max_width_mm"]) == pytest.approx(float(r["max_width_pixels"]) * 0.5, abs=0.01) for r in cracks)
    assert len(list((out / "annotated").glob("*.jpg"))) == len(results)

    assert cli(["report", str(out)]) == 0
    page = Report()
    page.feed((out / "report.html").read_text())
    assert page.rows == anomalies + 1  # the header row too
    assert page.thumbs == len(results) and page.banner  # untrained weights here: said on the page
    with open(out / "tracks.csv") as handle:  # the clip's defects, each once, at its best frame
        tracks = list(csv.DictReader(handle))
    clip = [a for r in results if r["frame_id"].startswith("clip.mp4") for a in r["anomalies"]]
    assert len(tracks) == len({a["track_id"] for a in clip}) and page.track_images == len(tracks)
    assert page.svgs == (2 if cracks else 0)
    assert all((out / link).is_file() for link in page.links)
    check_report_in_a_browser(out / "report.html", anomalies, tmp_path / "browser")

    check_review_loop(out, campaign_folder, tmp_path / "dataset", anomalies + structures)

    # a second run sends nothing again: every frame is already in results.jsonl
    assert cli(args) == 2  # the broken file is tried again and still fails
    assert "6 already in" in capsys.readouterr().err
    assert len((out / "results.jsonl").read_text().splitlines()) == len(results)


def test_file_names_become_frame_ids_the_service_accepts():
    """Real photo names carry spaces, brackets and accents; the service's frame_id allows fewer characters.
    The id is derived the same way every time (a re-run resumes), and names that clean up alike stay apart."""
    from anomaly.options import frame_id_value
    from client.campaign import frame_id_for

    for name in ("DJI 0001 (copy).JPG", "pont/façade été.jpg", "x" * 300 + ".png", "pier3/DJI_0042.JPG"):
        frame_id = frame_id_for(name)
        assert frame_id_value(frame_id) == frame_id and frame_id_value(frame_id + ":1234.500s")
        assert frame_id_for(name) == frame_id
    assert frame_id_for("pier3/DJI_0042.JPG") == "pier3/DJI_0042.JPG"  # a clean name is kept as it is
    assert frame_id_for("a b.jpg") != frame_id_for("a_b.jpg")


def test_exports_are_writers_picked_by_name(tmp_path, capsys):
    """Each export is one writer (client.exports.WRITERS); --exports picks them, an unknown name is refused."""
    from client.exports import WRITERS, write_exports

    response = {
        "frame_id": "a.jpg",
        "image_size": {"width": 8, "height": 6},
        "anomalies": [
            {
                "anomaly_id": "anom_1",
                "defect_type": "crack",
                "structure_type": "unknown",
                "bbox": {"x_min": 1, "y_min": 1, "x_max": 4, "y_max": 3},
                "geometry": {"area_pixels": 4, "length_pixels": 3.0, "width_pixels": 1.3, "orientation_degrees": 0.0},
                "confidence": {"detection": 0.9, "segmentation": 0.8, "combined": 0.85},
            }
        ],
    }
    assert write_exports(tmp_path, [response], ("csv",)) == [tmp_path / "defects.csv"]
    assert not (tmp_path / "coco.json").exists()
    rows = list(csv.DictReader((tmp_path / "defects.csv").open()))
    assert [(r["frame_id"], r["defect_type"], r["length_pixels"]) for r in rows] == [("a.jpg", "crack", "3.0")]
    write_exports(tmp_path, [response])
    assert {file for file, _ in WRITERS.values()} <= {p.name for p in tmp_path.iterdir()}
    with pytest.raises(SystemExit):
        cli(["detect", "x.jpg", "--out", str(tmp_path), "--exports", "coco,shapefile"])
    assert "unknown export 'shapefile'" in capsys.readouterr().err
