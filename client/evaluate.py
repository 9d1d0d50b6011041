"""`anomaly evaluate DATASET --split test --url HOST:PORT --out DIR`: a labelled split through the served ensemble,
like any client, scored by anomaly.evaluation; DIR/eval.json and DIR/eval.html (per-class table, precision-recall
curves, the worst frames as annotated pictures beside their truth).

Each image is sent once with a low threshold (`ap_threshold`: the precision-recall curves need the weak
detections too) and masks; misses and false alarms are counted at the serving threshold (`threshold`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from anomaly.datasets import is_structure, read_dataset
from anomaly.evaluation import evaluate, worst_frames

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222} table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} th{background:#eee} td:first-child{text-align:left}
.banner{background:#c00;color:#fff;padding:1em;font-weight:bold} figure{display:inline-block;margin:6px}
svg text{font-size:11px} .pair img{max-width:480px;margin-right:4px}
"""
COLOURS = ("#c33", "#36c", "#393", "#c90", "#939", "#099", "#666", "#c6c")


def _e(value) -> str:
    return html.escape(str(value))


def run_split(split, url: str, protocol: str, ap_threshold: float, in_flight: int) -> tuple[dict, list[dict], float]:
    """Every image of the split through the service -> (responses by image id, refusals, seconds)."""
    from client import AnomalyClient, AnomalyServiceError

    local = threading.local()

    def client() -> AnomalyClient:
        if not hasattr(local, "client"):
            local.client = AnomalyClient(url, protocol)
        return local.client

    def send(image: dict):
        data = Path(image["path"]).read_bytes()
        options = {"confidence_threshold": ap_threshold, "include_masks": True, "frame_id": f"image-{image['id']}"}
        if image.get("mm_per_pixel"):
            options["mm_per_pixel"] = image["mm_per_pixel"]
        try:
            return image["id"], client().detect(data, **options), None
        except AnomalyServiceError as exc:
            return image["id"], None, {"image_id": image["id"], "file_name": image["file_name"], "error": str(exc)}

    started = time.monotonic()
    with ThreadPoolExecutor(max(1, in_flight)) as pool:
        answers = list(pool.map(send, split.images))
    seconds = time.monotonic() - started
    responses = {i: r for i, r, _ in answers if r is not None}
    return responses, [e for _, _, e in answers if e is not None], seconds


def evaluate_split(dataset: str | Path, split: str, url: str, protocol: str = "grpc", out: Path | None = None, *,
                   threshold: float = 0.3, ap_threshold: float = 0.05, mm_per_pixel: float | None = None,
                   structures: list[str] | None = None, in_flight: int = 4) -> dict:  # fmt: skip
    """Run and score the split; write eval.json and eval.html into `out` when given. -> the report. Raises
    anomaly.datasets.DatasetError on a dataset problem (before anything is sent)."""
    data = read_dataset(dataset, (split,))
    part = data.splits[split]
    gt = part.coco()
    roles = {c["name"] for c in gt["categories"] if is_structure(c, structures)}
    responses, refused, seconds = run_split(part, url, protocol, ap_threshold, in_flight)
    report = evaluate(gt, responses, threshold, roles, mm_per_pixel)
    models = next(iter(responses.values()), {}).get("models", {})
    report |= {
        "dataset": str(data.root),
        "split": split,
        "images": len(part.images),
        "has_masks": part.has_masks,
        "served_by": {"url": url, "protocol": protocol, "models": models},
        "untrained_weights": any(r.get("untrained_weights") for r in responses.values()),
        "ap_threshold": ap_threshold,
        "refused": refused,
        "seconds": round(seconds, 2),
        "frames_per_s": round(len(part.images) / seconds, 3) if seconds else None,
        # what a frame cost the service: SAM and geometry run once per answered defect
        "defects_per_frame": round(sum(len(r["anomalies"]) for r in responses.values()) / max(len(responses), 1), 2),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "eval.html").write_text(eval_html(report, part, responses))
    return report


def pr_svg(title: str, curves: dict[str, list]) -> str:
    """Precision against recall, one line per class, as inline SVG."""
    size, pad = 300, 30
    lines, legend = [], []
    for k, (name, precision) in enumerate(sorted(curves.items())):
        colour = COLOURS[k % len(COLOURS)]
        points = [(r / 100, p) for r, p in enumerate(precision) if p is not None]
        path = " ".join(f"{pad + x * (size - 2 * pad):.1f},{size - pad - y * (size - 2 * pad):.1f}" for x, y in points)
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
        legend.append(f'<text x="{size - pad - 80}" y="{pad + 12 * k}" fill="{colour}">{_e(name)}</text>')
    axes = (
        f'<line x1="{pad}" y1="{size - pad}" x2="{size - pad}" y2="{size - pad}" stroke="#999"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{size - pad}" stroke="#999"/>'
        f'<text x="{size / 2 - 15}" y="{size - 8}">recall</text>'
        f'<text x="2" y="{pad - 8}">precision</text>'
    )
    body = "".join(lines) or f'<text x="{pad + 10}" y="{size / 2}">no detections</text>'
    return (f'<figure><figcaption>{_e(title)}</figcaption><svg xmlns="http://www.w3.org/2000/svg" width="{size}" '
            f'height="{size}">{axes}{body}{"".join(legend)}</svg></figure>')  # fmt: skip


def _jpeg_uri(rgb: np.ndarray, width: int = 480) -> str:
    from PIL import Image

    img = Image.fromarray(rgb)
    img.thumbnail((width, width))
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def truth_response(split, image_id: int, structures: set[str]) -> dict:
    """The truth of one image in the response's shape, so that it is drawn as the answers are."""
    names = split.category_names()
    anomalies, found = [], []
    for a in split.annotations:
        if a["image_id"] != image_id:
            continue
        x, y, w, h = a["bbox"]
        box = {"x_min": int(x), "y_min": int(y), "x_max": int(round(x + w)), "y_max": int(round(y + h))}
        name = names.get(a["category_id"], str(a["category_id"]))
        if name in structures:
            found.append({"structure_type": name, "bbox": box, "confidence": 1.0})
            continue
        entry = {"defect_type": name, "bbox": box, "confidence": {"combined": 1.0},
                 "geometry": {"length_pixels": 0, "width_pixels": 0}}  # fmt: skip
        if isinstance(a.get("segmentation"), dict) and isinstance(a["segmentation"].get("counts"), str):
            entry["mask"] = a["segmentation"]
        anomalies.append(entry)
    return {"anomalies": anomalies, "structures": found}


def eval_html(report: dict, split, responses: dict[int, dict]) -> str:
    from anomaly.images import decode_image
    from anomaly.weights import UNTRAINED_BANNER
    from client.annotate import annotate

    structures = {n for n, c in report["per_class"].items() if c["role"] == "structure"}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Evaluation</title><style>{STYLE}</style>"
             "</head><body>"]  # fmt: skip
    if report["untrained_weights"]:
        parts.append(f'<p class="banner">{_e(UNTRAINED_BANNER.format(what="a model of the service"))}</p>')
    t = report["at_threshold"]
    parts.append(
        f"<h1>Evaluation: {_e(report['dataset'])}, split {_e(report['split'])}</h1>"
        f"<p class='summary'>{report['images']} images through {_e(report['served_by']['url'])}; box AP "
        f"{_fmt(report['box']['ap'])} (AP50 {_fmt(report['box']['ap50'])}), mask AP {_fmt(report['mask']['ap'])}; "
        f"at threshold {t['threshold']}: {t['matched']} of {t['truths']} found, {t['misses']} missed, "
        f"{t['false_alarms']} false alarms; {report['frames_per_s']} frames/s</p>"
    )
    head = ("<tr><th>class</th><th>role</th><th>box AP</th><th>box AP50</th><th>mask AP</th><th>truths</th>"
            "<th>found</th><th>misses</th><th>false alarms</th><th>length error px (median)</th>"
            "<th>width error px (median)</th><th>max width error px (median)</th></tr>")  # fmt: skip
    rows = []
    for name, c in report["per_class"].items():
        g = c["geometry"]
        cells = [c["role"], _fmt(c["box_ap"]), _fmt(c["box_ap50"]), _fmt(c["mask_ap"]), c["truths"], c["matched"],
                 c["misses"], c["false_alarms"], *(_fmt(g.get(k, {}).get("median_abs_px")) for k in
                                                   ("length", "width", "max_width"))]  # fmt: skip
        rows.append(f"<tr><td>{_e(name)}</td>" + "".join(f"<td>{_e(v)}</td>" for v in cells) + "</tr>")
    parts.append(f"<h2>Per class</h2><table class='classes'>{head}{''.join(rows)}</table>")
    parts.append("<h2>Precision and recall</h2>")
    parts.append(pr_svg("boxes, IoU 0.5", report["pr_curves"]["box_iou_0.5"]))
    if report["pr_curves"]["mask_iou_0.5"]:
        parts.append(pr_svg("masks, IoU 0.5", report["pr_curves"]["mask_iou_0.5"]))
    parts.append("<h2>Worst frames</h2><p>The service's answer (left) beside the truth (right).</p>")
    images = {i["id"]: i for i in split.images}
    for frame in worst_frames(report):
        image = images[frame["image_id"]]
        data = Path(image["path"]).read_bytes()
        rgb = decode_image(data, len(data) + 1, 10**10)
        served = responses.get(frame["image_id"], {"anomalies": [], "structures": []})
        parts.append(
            f"<div class='pair'><h3>{_e(image['file_name'])}: {frame['misses']} missed, {frame['false_alarms']} "
            f"false alarms{'' if frame['answered'] else ', refused by the service'}</h3>"
            f"<img src='{_jpeg_uri(annotate(rgb, served))}' alt='answer'>"
            f"<img src='{_jpeg_uri(annotate(rgb, truth_response(split, frame['image_id'], structures)))}' "
            "alt='truth'></div>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
