"""What Triton serves equals what the upstream libraries compute in-process on the same weights:
RF-DETR's own predict() for the detector, SAM2ImagePredictor for the masks."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly.images import decode_image
from tests.conftest import SAMPLES, assert_served_mask_matches

THRESHOLD = 0.25
MARGIN = 2e-3  # detections this close to the threshold may fall either side of it


def iou_xyxy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) -> (N, M)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


@pytest.fixture(scope="module")
def rfdetr_model(exported):
    """rfdetr's own model class loading the very checkpoint the ONNX export was made from."""
    import torch

    from anomaly.detector import rfdetr_class

    torch.set_num_threads(2)
    return rfdetr_class(exported.variant)(pretrain_weights=exported.weights)


def _match(ours_boxes, ours_scores, ours_classes, ref_boxes, ref_scores, ref_classes):
    """Every detection clear of the threshold on one side has a partner on the other side."""
    iou = iou_xyxy(ours_boxes, ref_boxes) if len(ours_boxes) and len(ref_boxes) else np.zeros((len(ours_boxes), 0))
    checked = 0
    for i in np.nonzero(ours_scores > THRESHOLD + MARGIN)[0]:
        j = int(np.argmax(iou[i])) if iou.shape[1] else -1
        candidates = [k for k in range(iou.shape[1]) if iou[i, k] >= 0.99 and ref_classes[k] == ours_classes[i]]
        assert candidates, f"detection {i} {ours_boxes[i]} class {ours_classes[i]} has no partner (best {j})"
        assert min(abs(ref_scores[k] - ours_scores[i]) for k in candidates) <= 1e-3
        checked += 1
    return checked


@pytest.mark.parametrize("sample", ["bridge_deck.jpg", "pier_spalling.png"])
def test_detector_through_triton_matches_rfdetr_predict(grpc_client, rfdetr_model, sample):
    data = (SAMPLES / sample).read_bytes()
    served = grpc_client.detect_full(data, confidence_threshold=THRESHOLD).arrays
    rgb = decode_image(data, 1 << 30, 1 << 30)
    ref = rfdetr_model.predict(rgb, threshold=THRESHOLD)
    ours = (served["BOXES"], served["SCORES"], served["CLASS_IDS"])
    theirs = (ref.xyxy, ref.confidence, ref.class_id)
    assert _match(*ours, *theirs) > 0
    assert _match(*theirs, *ours) > 0


@pytest.fixture(scope="module")
def sam_predictor(exported):
    import torch
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from anomaly.config import load_settings
    from anomaly.segmenter import SAM2_CONFIGS
    from anomaly.weights import segmenter_candidates

    torch.set_num_threads(2)
    spec = segmenter_candidates(load_settings())[0][0]
    return SAM2ImagePredictor(build_sam2(SAM2_CONFIGS[spec.variant], spec.checkpoint, device="cpu"))


def test_masks_through_triton_match_sam2_image_predictor(grpc_client, sam_predictor):
    data = (SAMPLES / "pier_spalling.png").read_bytes()
    served = grpc_client.detect_full(data, include_masks=True, confidence_threshold=THRESHOLD)
    anomalies = served.response["anomalies"]
    assert anomalies
    boxes = served.arrays["BOXES"][served.arrays["SEG_INDEX"]]
    sam_predictor.set_image(decode_image(data, 1 << 30, 1 << 30))
    for anomaly, box, score in zip(anomalies, boxes, served.arrays["MASK_SCORES"]):
        full, iou_pred, _ = sam_predictor.predict(box=box, multimask_output=False)
        assert_served_mask_matches(anomaly, full[0], box)
        assert score == pytest.approx(float(np.clip(iou_pred[0], 0, 1)), abs=1e-4)
