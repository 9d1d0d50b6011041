"""`anomaly report DIR`: one self-contained HTML page (DIR/report.html) from a campaign's outputs
(client.campaign): counts by defect type, severity and structure, histograms of crack widths and lengths,
a sortable table of every defect, thumbnails of the annotated frames linked to the full images, and the
untrained-weights banner when any answer came from untrained models. A video's or a sequence's defects count
once per track (client.tracks), and each track is shown by its best frame. No file outside the page is needed to
read it (thumbnails are embedded); the links to full images point into DIR/annotated/.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from client.campaign import ANNOTATED, ERRORS, read_results, safe_name
from client.exports import defect_rows

SORT_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(th => th.addEventListener('click', () => {
  const col = th.cellIndex, body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
  const asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
  const key = r => { const v = r.cells[col].dataset.v ?? r.cells[col].textContent; const n = parseFloat(v);
                     return isNaN(n) ? v : n; };
  rows.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (asc ? 1 : -1));
  rows.forEach(r => body.appendChild(r));
}));
"""
STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222} table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left} th{background:#eee;cursor:pointer}
.banner{background:#c00;color:#fff;padding:1em;font-weight:bold} .thumbs a{display:inline-block;margin:4px}
.counts{display:flex;gap:2em;flex-wrap:wrap} svg text{font-size:11px}
"""
TABLE_COLUMNS = (
    ("frame_id", "frame"), ("defect_type", "defect"), ("structure_type", "structure"), ("confidence", "confidence"),
    ("length_pixels", "length px"), ("width_pixels", "width px"), ("max_width_pixels", "max width px"),
    ("area_pixels", "area px"), ("length_mm", "length mm"), ("max_width_mm", "max width mm"), ("severity", "severity"),
)  # fmt: skip


def _e(value) -> str:
    return html.escape(str(value))


def counts_table(title: str, counter: Counter) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{v}</td></tr>" for k, v in counter.most_common())
    head = f"<caption>{_e(title)}</caption><tr><th>value</th><th>count</th></tr>"
    return f'<table class="counts-{_e(title).replace(" ", "-")}">{head}{rows}</table>'


def histogram_svg(title: str, values: list[float], unit: str, bins: int = 12) -> str:
    """Bars of a histogram as inline SVG (no script, no library)."""
    if not values:
        return f'<figure class="histogram"><figcaption>{_e(title)}: no values</figcaption></figure>'
    counts, edges = np.histogram(values, bins=bins)
    width, height, bar = 480, 160, 480 / bins
    top = max(int(counts.max()), 1)
    bars = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - 20 - c / top * (height - 40):.1f}" width="{bar - 2:.1f}" '
        f'height="{c / top * (height - 40):.1f}" fill="#c33">'
        f"<title>{edges[i]:.2f}-{edges[i + 1]:.2f} {unit}: {c}</title></rect>"
        for i, c in enumerate(counts)
    )
    low, high = f"{edges[0]:.2f}", f"{edges[-1]:.2f} {_e(unit)}"
    axis = f'<text x="0" y="{height - 4}">{low}</text><text x="{width - 60}" y="{height - 4}">{high}</text>'
    return (
        f'<figure class="histogram"><figcaption>{_e(title)} ({len(values)} cracks)</figcaption>'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">{bars}{axis}</svg></figure>'
    )


def thumbnail_uri(path: Path, width: int = 240) -> str:
    from PIL import Image

    with Image.open(path) as img:
        img.thumbnail((width, width))
        buffer = io.BytesIO()
        img.convert("RGB").save(buffer, "JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def best_frame_uri(track, records: dict, width: int = 160) -> str:
    """The track's best frame cut around its box (a margin of half the box), as an embedded JPEG; "" without the
    frame's file."""
    from PIL import Image

    best = track.best
    source = Path(records[best["frame_id"]].get("source", ""))
    if not source.is_file():
        return ""
    b = best["anomaly"]["bbox"]
    dx, dy = (b["x_max"] - b["x_min"]) // 2 + 8, (b["y_max"] - b["y_min"]) // 2 + 8
    with Image.open(source) as img:
        crop = img.convert("RGB").crop((b["x_min"] - dx, b["y_min"] - dy, b["x_max"] + dx, b["y_max"] + dy))
        crop.thumbnail((width, width))
        buffer = io.BytesIO()
        crop.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def best_row(track) -> dict:
    """A track as the defect table's row of its best frame (highest combined confidence)."""
    best = track.best
    return next(defect_rows([{"frame_id": best["frame_id"], "anomalies": [best["anomaly"]]}]))


def tracks_section(tracks: list, responses: list[dict]) -> str:
    records = {r["frame_id"]: r for r in responses}
    rows = []
    for track in tracks:
        row = track.row()
        uri = best_frame_uri(track, records)
        image = f'<img src="{uri}" alt="track {track.track_id}">' if uri else ""
        cells = [row["track_id"], row["defect_type"], row["sequence"], row["frames_seen"],
                 f"{row['first_s']}-{row['last_s']} s", row["largest_length_pixels"], row["largest_max_width_pixels"],
                 row["largest_length_mm"], row["largest_max_width_mm"], row["best_frame"]]  # fmt: skip
        rows.append("<tr>" + "".join(f'<td data-v="{_e(c)}">{_e(c)}</td>' for c in cells) + f"<td>{image}</td></tr>")
    header = "".join(
        f"<th>{h}</th>"
        for h in (
            "track",
            "defect",
            "sequence",
            "frames",
            "seen",
            "longest px",
            "widest px",
            "longest mm",
            "widest mm",
            "best frame",
            "",
        )  # fmt: skip
    )
    return (
        f"<h2>Tracked defects</h2><p>Each defect of a video or sequence once, shown at its best frame.</p>"
        f'<table class="sortable tracks"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def build_report(out: Path) -> str:
    from anomaly.tracking import summarise
    from anomaly.weights import UNTRAINED_BANNER

    responses = read_results(out)
    rows = list(defect_rows(responses))
    tracks = summarise(responses)
    # what the counts count: a defect of a photo once, a tracked defect of a video or sequence once (not per frame)
    in_sequences = {r["frame_id"] for r in responses if r.get("sequence")}
    counted = [r for r in rows if r["frame_id"] not in in_sequences] + [best_row(t) for t in tracks]
    untracked = sum(1 for r in rows if r["frame_id"] in in_sequences and not r["track_id"])
    errors = (out / ERRORS).read_text().splitlines() if (out / ERRORS).is_file() else []
    head = f"<meta charset='utf-8'><title>Inspection report</title><style>{STYLE}</style>"
    parts = [f"<!doctype html><html><head>{head}</head><body>"]
    if any(r.get("untrained_weights") for r in responses):
        parts.append(f'<p class="banner">{_e(UNTRAINED_BANNER.format(what="the service"))}</p>')
    tracked = f" ({len(tracks)} tracked through videos and sequences)" if tracks else ""
    parts.append(
        f"<h1>Inspection report</h1><p class='summary'>{len(responses)} frames, {len(counted)} defects{tracked}, "
        f"{len(rows)} detections, {len(errors)} frames failed; "
        f"written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}</p>"
    )
    if untracked:
        parts.append(f"<p class='flicker'>{untracked} detections in videos or sequences belong to no "
                     "track (seen in fewer frames than --min-frames) and are not counted.</p>")  # fmt: skip
    parts.append('<div class="counts">')
    parts.append(counts_table("defect type", Counter(r["defect_type"] for r in counted)))
    parts.append(counts_table("severity", Counter(r["severity"] or "not rated" for r in counted)))
    parts.append(counts_table("structure", Counter(r["structure_type"] for r in counted)))
    parts.append("</div>")
    cracks = [r for r in counted if "crack" in r["defect_type"].lower()]
    mm = all(r["max_width_mm"] != "" for r in cracks) and cracks
    width_key, length_key, unit = (
        ("max_width_mm", "length_mm", "mm") if mm else ("max_width_pixels", "length_pixels", "px")
    )
    parts.append(histogram_svg("crack widths (max)", [float(r[width_key]) for r in cracks], unit))
    parts.append(histogram_svg("crack lengths", [float(r[length_key]) for r in cracks], unit))
    if tracks:  # a video's defects, each once, before every detection of them
        parts.append(tracks_section(tracks, responses))
    header = "".join(f"<th>{_e(label)}</th>" for _, label in TABLE_COLUMNS)
    body = "".join(
        "<tr>"
        + "".join(f'<td data-v="{_e(r.get(key, ""))}">{_e(r.get(key, ""))}</td>' for key, _ in TABLE_COLUMNS)
        + "</tr>"
        for r in rows
    )
    parts.append(
        f'<h2>Defects</h2><table class="sortable defects"><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>'
    )
    thumbs = []
    for response in responses:
        image = out / ANNOTATED / (safe_name(response["frame_id"]) + ".jpg")
        if image.is_file():
            name, link = _e(response["frame_id"]), _e(f"{ANNOTATED}/{image.name}")
            thumbs.append(f'<a href="{link}" title="{name}"><img src="{thumbnail_uri(image)}" alt="{name}"></a>')
    parts.append(f'<h2>Annotated frames</h2><div class="thumbs">{"".join(thumbs)}</div>')
    if errors:
        items = "".join(f"<li>{_e(json.loads(e)['source'])}: {_e(json.loads(e)['error'])}</li>" for e in errors)
        parts.append(f"<h2>Frames that failed</h2><ul class='errors'>{items}</ul>")
    parts.append(f"<script>{SORT_SCRIPT}</script></body></html>")
    return "".join(parts)


def write_report(out: Path) -> Path:
    target = out / "report.html"
    target.write_text(build_report(out))
    return target
