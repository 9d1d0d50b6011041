"""The `anomaly` command.

anomaly detect IMAGE... [--url HOST:PORT] [--protocol grpc|http] [--threshold T] [--include-masks]
                        [--mm-per-pixel MM] [--annotate-dir DIR]
    Sends each image through Triton's anomaly_pipeline; prints one response JSON object per line.
anomaly detect PATH... --out DIR [--in-flight N] [--fps F] [--exports coco,csv] [...]
    A campaign: files, folders, globs and videos -> DIR/results.jsonl, annotated/ and the exports (coco.json,
    defects.csv: client.exports) (client.campaign); a re-run skips the frames DIR already holds.
anomaly report DIR
    DIR/report.html from a campaign's outputs (client.report).
anomaly measure MASK.png... [--mm-per-pixel MM]
    Geometry of binary mask images (nonzero = mask) with the server's own code; one JSON per line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from client.exports import EXPORT_NAMES


def _url(args: argparse.Namespace) -> str:
    from anomaly.config import settings

    s = settings()
    return args.url or f"127.0.0.1:{s.triton_grpc_port if args.protocol == 'grpc' else s.triton_http_port}"


def _campaign(args: argparse.Namespace) -> int:
    from client.campaign import run_campaign
    from client.exports import WRITERS

    options = {"confidence_threshold": args.threshold, "mm_per_pixel": args.mm_per_pixel, "tiling": args.tiling}
    out = Path(args.out)
    counts = run_campaign(
        args.images, out, url=_url(args), protocol=args.protocol, in_flight=args.in_flight, fps=args.fps,
        options={k: v for k, v in options.items() if v is not None}, exports=args.exports,
    )  # fmt: skip
    files = ", ".join(WRITERS[name][0] for name in args.exports)
    print(
        f"{counts['sent']} frames answered, {counts['skipped']} already in {out / 'results.jsonl'}, "
        f"{counts['failed']} failed (errors.jsonl); wrote {files + ', ' if files else ''}annotated/",
        file=sys.stderr,
    )
    return 2 if counts["failed"] else 0


def _report(args: argparse.Namespace) -> int:
    from client.report import write_report

    out = Path(args.dir)
    if not (out / "results.jsonl").is_file():
        print(f"{out}: no results.jsonl (run `anomaly detect PATH... --out {out}` first)", file=sys.stderr)
        return 1
    print(f"wrote {write_report(out)}", file=sys.stderr)
    return 0


def _detect(args: argparse.Namespace) -> int:
    from client import AnomalyClient, AnomalyServiceError

    if args.out:
        return _campaign(args)
    url = _url(args)
    failures = 0
    with AnomalyClient(url, args.protocol) as client:
        for path in args.images:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                print(f"{path}: {exc.strerror}", file=sys.stderr)
                failures += 1
                continue
            try:
                response = client.detect(
                    data,
                    frame_id=Path(path).stem if args.frame_ids else None,
                    include_masks=args.include_masks or bool(args.annotate_dir),
                    confidence_threshold=args.threshold,
                    mm_per_pixel=args.mm_per_pixel,
                    tiling=args.tiling,
                )
            except AnomalyServiceError as exc:
                print(f"{path}: {exc}", file=sys.stderr)
                failures += 1
                continue
            if args.annotate_dir:
                written = _annotate(path, data, response, Path(args.annotate_dir))
                print(f"{path}: annotated image written to {written}", file=sys.stderr)
            if args.annotate_dir and not args.include_masks:
                for anomaly in response["anomalies"]:
                    anomaly.pop("mask", None)
            print(json.dumps(response, indent=2 if args.pretty else None), flush=True)
    return 1 if failures else 0


def _annotate(path: str, data: bytes, response: dict, out_dir: Path) -> Path:
    from client.annotate import write_annotated

    target = out_dir / f"{Path(path).stem}_annotated.jpg"
    write_annotated(data, response, target)
    return target


def _measure(args: argparse.Namespace) -> int:
    from PIL import Image

    from anomaly.geometry import measure, to_millimetres

    failures = 0
    for path in args.masks:
        try:
            with Image.open(path) as img:
                mask = np.asarray(img.convert("L")) != 0
        except (OSError, ValueError) as exc:
            print(f"{path}: not a readable mask image ({exc})", file=sys.stderr)
            failures += 1
            continue
        g = measure(mask)
        if args.mm_per_pixel:
            g |= to_millimetres(g, args.mm_per_pixel)
        print(json.dumps({"file": path, **g}), flush=True)
    return 1 if failures else 0


def _exports(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in EXPORT_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown export {unknown[0]!r}; known: {', '.join(EXPORT_NAMES)}")
    return names


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomaly", description="Infrastructure defect detection client and tools")
    sub = parser.add_subparsers(dest="command", required=True)
    detect = sub.add_parser("detect", help="run images (or, with --out, folders, globs and videos) through Triton")
    detect.add_argument("images", nargs="+", metavar="PATH")
    detect.add_argument("--url", help="Triton address (default 127.0.0.1 and the gRPC or HTTP port)")
    detect.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    detect.add_argument("--threshold", type=float, help="confidence threshold in [0, 1] (default: the server's)")
    detect.add_argument("--include-masks", action="store_true", help="add each anomaly's COCO RLE mask")
    detect.add_argument("--mm-per-pixel", type=_positive, help="pixel size in mm: adds *_mm fields and severity")
    detect.add_argument(
        "--tiling", choices=("auto", "off", "on"), help="detect large photos in tiles (default: the server's TILING)"
    )
    detect.add_argument("--frame-ids", action="store_true", help="use each file's name as its frame_id")
    detect.add_argument("--annotate-dir", help="write <name>_annotated.jpg with boxes, masks and labels here")
    detect.add_argument("--pretty", action="store_true", help="indent the JSON")
    detect.add_argument("--out", help="campaign mode: write results.jsonl, coco.json, defects.csv, annotated/ here")
    detect.add_argument("--in-flight", type=int, default=4, help="requests in flight to the server (campaign)")
    detect.add_argument("--fps", type=_positive, default=1.0, help="frames a second read from videos (campaign)")
    detect.add_argument(
        "--exports",
        type=_exports,
        default=EXPORT_NAMES,
        help=f"campaign exports written from results.jsonl, comma-separated (default: {','.join(EXPORT_NAMES)})",
    )
    detect.set_defaults(run=_detect)
    report = sub.add_parser("report", help="DIR/report.html from a campaign's outputs")
    report.add_argument("dir", metavar="DIR")
    report.set_defaults(run=_report)
    meas = sub.add_parser("measure", help="geometry of binary mask images, one JSON object per line")
    meas.add_argument("masks", nargs="+")
    meas.add_argument("--mm-per-pixel", type=_positive)
    meas.set_defaults(run=_measure)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
