"""Tiled inference (anomaly.tiling) on a synthetic 6000 x 4000 photo.

RF-DETR with untrained weights finds nothing in particular, so the detector is stood in for by an oracle that
finds dark blobs in exactly the input RF-DETR would get (each window cut out of the photo and resized to the
detector's resolution by the real rfdetr_preprocess) and answers in RF-DETR's raw output format. Everything
after it is the service's own code: per-window selection, the move to full-image pixels, the merge. The SAM
windows are embedded by the real (untrained) SAM2.1 tiny."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from anomaly.detector import DetectorMetadata
from anomaly.images import rfdetr_preprocess
from anomaly.options import RequestOptions
from anomaly.pipeline import select
from anomaly.tiling import TilePlan, describe, merge_windows, plan_tiles, sam_windows, window_scale

RES = 576  # RF-DETR-M's input
MEANS, STDS = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
META = DetectorMetadata("medium", RES, MEANS, STDS, ["", "crack", "spalling"], ["ignore", "defect", "defect"])
QUERIES = 300
H, W = 4000, 6000

# Ground truth, x0 y0 x1 y1 in photo pixels (edges: x1 is one past the last dark column)
STRADDLING = (1400, 1200, 1650, 1240)  # across the edges of tile columns 2 and 3
IN_OVERLAP = (1500, 300, 1520, 320)  # wholly inside the overlap of tile columns 2 and 3
PAIR = ((2600, 700, 2640, 740), (2670, 700, 2710, 740))  # 30 px apart, one tile
HAIRLINE = (500, 3600, 900, 3603)  # a 3-pixel line crossing from tile column 0 into column 1
BLOB = (3000, 2000, 4500, 3200)  # larger than any tile
TRUTH = (STRADDLING, IN_OVERLAP, *PAIR, HAIRLINE, BLOB)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    rgb = np.full((H, W, 3), 200, np.uint8)
    for x0, y0, x1, y1 in TRUTH:
        rgb[y0:y1, x0:x1] = 20
    return rgb


def oracle(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A detector input (3, R, R) -> RF-DETR's raw outputs for it: (Q, 4) normalised cx cy w h and (Q, 3) logits,
    one confident `crack` query per dark blob the input shows, the other queries empty."""
    grey = (x * np.asarray(STDS, np.float32)[:, None, None] + np.asarray(MEANS, np.float32)[:, None, None]).mean(0)
    labels, count = ndimage.label(grey < 0.5)
    boxes = np.zeros((QUERIES, 4), np.float32)
    logits = np.full((QUERIES, 3), -10.0, np.float32)
    for q, (rows, cols) in enumerate(ndimage.find_objects(labels)[:QUERIES]):
        x0, x1, y0, y1 = cols.start / RES, cols.stop / RES, rows.start / RES, rows.stop / RES
        boxes[q] = [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]
        logits[q, 1] = 10.0
    return boxes, logits


def detect(rgb: np.ndarray, plan: TilePlan):
    """The oracle on every window of the plan, cut and prepared as the detector step prepares them."""
    raw = [oracle(rfdetr_preprocess(rgb[y0:y1, x0:x1], RES, MEANS, STDS)) for x0, y0, x1, y1 in plan.windows]
    return np.stack([b for b, _ in raw]), np.stack([lg for _, lg in raw])


def test_plan_covers_the_photo_with_overlapping_tiles_at_its_own_scale():
    plan = plan_tiles((H, W), RES, "auto", 64)
    assert plan.tiled and plan.windows[0] == (0, 0, W, H)
    tiles = np.asarray(plan.windows[1:])
    assert ((tiles[:, 2] - tiles[:, 0]) == RES).all() and ((tiles[:, 3] - tiles[:, 1]) == RES).all()
    covered = np.zeros((H, W), bool)
    for x0, y0, x1, y1 in tiles:
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    xs, ys = sorted(set(tiles[:, 0])), sorted(set(tiles[:, 1]))
    assert min(np.diff(xs)) <= RES - 64 and min(np.diff(ys)) <= RES - 64  # neighbours share at least 64 px
    assert len(tiles) == len(xs) * len(ys) == 12 * 8


@pytest.mark.parametrize(
    ("hw", "mode", "tiled"),
    [
        ((1080, 1920), "auto", False),  # a video frame: shrunk 3.3x, not tiled by auto
        ((2160, 3840), "auto", True),
        ((1080, 1920), "on", True),
        ((4000, 6000), "off", False),
        ((500, 560), "on", False),  # smaller than one tile
    ],
)
def test_which_frames_are_tiled(hw, mode, tiled):
    plan = plan_tiles(hw, RES, mode, 64)
    assert plan.tiled is tiled
    assert plan.windows[0] == (0, 0, hw[1], hw[0])
    assert plan.mode == mode and plan.reason
    assert TilePlan.from_json(plan.to_json()) == plan


def test_tile_boxes_come_back_once_in_full_image_pixels(photo):
    plan = plan_tiles((H, W), RES, "on", 64)
    boxes, logits = detect(photo, plan)
    det, seg_index, notes = select(boxes, logits, plan, 0.5, META, 100)
    got = sorted(tuple(round(float(v)) for v in b) for b in det.boxes)
    assert got == sorted(TRUTH)  # each defect once, to the pixel, the 3-pixel line included
    assert len(seg_index) == len(TRUTH) and not notes


def test_without_tiles_boxes_are_as_coarse_as_the_shrunk_photo(photo):
    """The same oracle on the whole photo shrunk to 576 px (a pixel there is 10.4 x 6.9 photo pixels): what
    tiling is for."""
    plan = plan_tiles((H, W), RES, "off", 64)
    boxes, logits = detect(photo, plan)
    det, _, _ = select(boxes, logits, plan, 0.5, META, 100)
    got = sorted(tuple(round(float(v)) for v in b) for b in det.boxes)
    assert got != sorted(TRUTH)
    line = [b for b in got if b[1] < HAIRLINE[3] and b[3] > HAIRLINE[1]]
    assert len(line) == 1 and line[0][3] - line[0][1] >= 6  # the 3-pixel line comes back at least twice as wide


def test_merge_keeps_apart_what_only_looks_alike():
    """Two windows: different classes at the same place stay two; a box cut by a tile edge joins the box that
    goes on across that edge; two boxes in one tile are never merged with each other."""
    from anomaly.detector import Detections

    plan = TilePlan("on", (600, 1100), 576, 64, ((0, 0, 1100, 600), (0, 0, 576, 576), (524, 0, 1100, 576)), "test")
    left = Detections(
        np.array([[500, 100, 576, 140], [540, 300, 560, 320], [540, 300, 560, 320], [100, 100, 120, 120]], np.float32),
        np.array([0.9, 0.8, 0.7, 0.6], np.float32),
        np.array([1, 1, 2, 1], np.int32),
    )
    right = Detections(
        np.array([[524, 102, 700, 139], [541, 301, 560, 320], [130, 100, 150, 120]], np.float32) + [0, 0, 0, 0],
        np.array([0.5, 0.95, 0.4], np.float32),
        np.array([1, 1, 1], np.int32),
    )
    empty = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))
    out = merge_windows([empty, left, right], plan)
    found = {
        (tuple(int(v) for v in b), int(c), round(float(s), 2)) for b, c, s in zip(out.boxes, out.class_ids, out.scores)
    }
    assert ((500, 100, 700, 140), 1, 0.9) in found  # cut at x=576 in the left tile, continued in the right one
    assert ((540, 300, 560, 320), 1, 0.95) in found  # the same crack seen by both tiles
    assert ((540, 300, 560, 320), 2, 0.7) in found  # spalling at the same place: another defect
    assert len(out) == 5  # and the two far-apart cracks, untouched


def test_linked_groups_are_the_connected_components():
    """The tile merge's grouping against scipy's connected components (the reference; the served code does
    without scipy, see linked_groups): random links, long chains linked in reverse order, no links at all."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from anomaly.tiling import linked_groups

    rng = np.random.default_rng(7)
    cases = [(n, rng.integers(0, n, k), rng.integers(0, n, k)) for n, k in ((1, 1), (12, 5), (60, 40), (300, 250))]
    chain = np.arange(199, 0, -1)
    cases += [(200, chain, chain - 1), (9, np.zeros(0, np.int64), np.zeros(0, np.int64))]
    for n, first, second in cases:
        graph = coo_matrix((np.ones(len(first), np.int8), (first, second)), shape=(n, n))
        expected_count, expected = connected_components(graph, directed=False)
        count, group = linked_groups(n, first, second)
        assert count == expected_count
        assert group.tolist() == expected.tolist()  # the same numbering: groups in order of their lowest item


def test_whole_image_pass_adds_only_what_tiles_missed():
    from anomaly.detector import Detections

    plan = TilePlan("on", (600, 1100), 576, 64, ((0, 0, 1100, 600), (0, 0, 576, 576), (524, 0, 1100, 576)), "test")
    whole = Detections(
        np.array([[95, 95, 125, 125], [10, 10, 1090, 590]], np.float32), np.array([0.7, 0.6], np.float32),
        np.array([1, 2], np.int32),
    )  # fmt: skip
    tile = Detections(
        np.array([[100, 100, 120, 120]], np.float32), np.array([0.5], np.float32), np.array([1], np.int32)
    )
    empty = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))
    out = merge_windows([whole, tile, empty], plan)
    assert [tuple(int(v) for v in b) for b in out.boxes] == [(100, 100, 120, 120), (10, 10, 1090, 590)]
    assert out.scores[0] == pytest.approx(0.7)  # the coarse duplicate's score goes to the finer box


def test_sam_windows_hold_every_box_once_at_full_resolution():
    boxes = np.array([STRADDLING, IN_OVERLAP, *PAIR, HAIRLINE, BLOB], np.float32)
    windows = sam_windows(boxes, (H, W), 1024)
    held = sorted(i for _, ids in windows for i in ids)
    assert held == list(range(len(boxes)))
    for (x0, y0, x1, y1), ids in windows:
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
        for i in ids:
            bx0, by0, bx1, by1 = boxes[i]
            assert x0 <= bx0 and y0 <= by0 and bx1 <= x1 and by1 <= y1
        scale = window_scale((x0, y0, x1, y1), 1024)
        assert scale == 1.0 or ids == [len(boxes) - 1]  # only the blob, larger than a window, is shrunk
    assert len(windows) < len(boxes)  # neighbours share a window


@pytest.mark.slow  # runs SAM's image encoder several times: make test, not make unit
def test_sam_sees_the_hairline_at_the_photos_scale(photo):
    """The real SAM2.1 tiny: a tiled frame's window shows the 3-pixel line 3 pixels wide, and its mask crop is
    the box's own size in photo pixels; without tiling SAM's input shrinks the line below a pixel."""
    from anomaly.segmenter import Sam2Segmenter

    sam = Sam2Segmenter("tiny", None, "cpu", threads=2)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG", compress_level=1)
    data = buf.getvalue()
    box = np.array([HAIRLINE], np.float32)

    def darkness_profile(frame):
        """The darkest value of each row of SAM's input near the line, over the line's columns."""
        grey = (frame.make_input().numpy() * np.asarray(STDS)[:, None, None] + np.asarray(MEANS)[:, None, None]).mean(0)
        (height, width), (wx, wy) = frame.hw, frame.window[:2]
        c0, c1 = int((HAIRLINE[0] - wx) * 1024 / width), int((HAIRLINE[2] - wx) * 1024 / width)
        r = int((HAIRLINE[1] - wy) * 1024 / height)
        return grey[max(r - 20, 0) : r + 20, c0:c1].min(axis=1)

    tiled = sam.prepare_windows(data, box, True, 1 << 30, 60_000_000)
    assert len(tiled) == 1 and tiled[0].hw == (1024, 1024)
    assert (darkness_profile(tiled[0]) < 0.2).sum() == 3  # three dark rows: the photo's own pixels
    whole = sam.prepare_windows(data, box, False, 1 << 30, 60_000_000)
    assert whole[0].hw == (H, W)
    assert (darkness_profile(whole[0]) < 0.2).sum() == 0  # shrunk 4x: grey smear, no dark row

    crop = sam.segment_windows([tiled], 1)[0][0]
    assert crop.box == HAIRLINE and crop.mask.shape == (3, 400)
    record = describe(plan_tiles((H, W), RES, "on", 64), np.asarray([f.window for f in tiled]), 1024)
    assert record["tiled"] and record["sam_windows"] == 1 and record["sam_scale"] == 1.0
    assert record["detector_tiles"] == 96 and record["tile_size"] == RES


def test_tiling_option_is_checked():
    from anomaly.errors import InputError
    from anomaly.options import parse_options

    assert parse_options({"tiling": "ON"}, 0.3) == RequestOptions(0.3, tiling="on")
    assert parse_options({}, 0.3).tiling is None
    with pytest.raises(InputError, match="tiling"):
        parse_options({"tiling": "sometimes"}, 0.3)
