"""The `anomaly` command.

anomaly detect IMAGE... [--url HOST:PORT] [--protocol grpc|http] [--threshold T] [--include-masks]
                        [--mm-per-pixel MM] [--annotate-dir DIR]
    Sends each image through Triton's anomaly_pipeline; prints one response JSON object per line.
anomaly measure MASK.png... [--mm-per-pixel MM]
    Geometry of binary mask images (nonzero = mask) with the server's own code; one JSON per line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _detect(args: argparse.Namespace) -> int:
    from anomaly.config import settings
    from client import AnomalyClient, AnomalyServiceError

    s = settings()
    url = args.url or f"127.0.0.1:{s.triton_grpc_port if args.protocol == 'grpc' else s.triton_http_port}"
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
    from PIL import Image

    from anomaly.images import decode_image
    from client.annotate import annotate

    rgb = decode_image(data, len(data) + 1, 10**9)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{Path(path).stem}_annotated.jpg"
    Image.fromarray(annotate(rgb, response)).save(target, quality=90)
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


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomaly", description="Infrastructure defect detection client and tools")
    sub = parser.add_subparsers(dest="command", required=True)
    detect = sub.add_parser("detect", help="run images through Triton's anomaly_pipeline")
    detect.add_argument("images", nargs="+")
    detect.add_argument("--url", help="Triton address (default 127.0.0.1 and the gRPC or HTTP port)")
    detect.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    detect.add_argument("--threshold", type=float, help="confidence threshold in [0, 1] (default: the server's)")
    detect.add_argument("--include-masks", action="store_true", help="add each anomaly's COCO RLE mask")
    detect.add_argument("--mm-per-pixel", type=_positive, help="pixel size in mm: adds *_mm fields and severity")
    detect.add_argument("--frame-ids", action="store_true", help="use each file's name as its frame_id")
    detect.add_argument("--annotate-dir", help="write <name>_annotated.jpg with boxes, masks and labels here")
    detect.add_argument("--pretty", action="store_true", help="indent the JSON")
    detect.set_defaults(run=_detect)
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
