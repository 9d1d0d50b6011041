"""The `anomaly` command.

anomaly detect IMAGE... [--url HOST:PORT] [--protocol grpc|http] [--threshold T] [--include-masks]
                        [--mm-per-pixel MM] [--annotate-dir DIR]
    Sends each image through Triton's anomaly_pipeline; prints one response JSON object per line.
anomaly detect PATH... --out DIR [--in-flight N] [--fps F] [--exports coco,csv] [...]
    A campaign: files, folders, globs and videos -> DIR/results.jsonl, annotated/ and the exports (coco.json,
    defects.csv: client.exports) (client.campaign); a re-run skips the frames DIR already holds.
anomaly detect PATH... --out DIR --endpoint ID_OR_URL [--load-balancing] [--price-per-second P] [...]
    The same campaign through a RunPod serverless endpoint (client.endpoint): jobs, retries, DIR/jobs.jsonl.
anomaly report DIR
    DIR/report.html from a campaign's outputs (client.report).
anomaly measure MASK.png... [--mm-per-pixel MM] [--image PHOTO]
    Geometry of binary mask images (nonzero = mask) with the server's own code; one JSON per line. With the photo
    the masks were drawn on, each is measured as a crack, its width read from the photo (anomaly.crack_width).
anomaly train DATASET --variant V --epochs N --out RUN_DIR [...] | anomaly train --resume RUN_DIR
    Fine-tune RF-DETR on a COCO or YOLO dataset (anomaly.training); RUN_DIR/checkpoint_best.pth is servable.
anomaly evaluate DATASET --split test [--url HOST:PORT] --out DIR [--min-ap X]
    The split through the served ensemble, scored (client.evaluate): DIR/eval.json, DIR/eval.html.
anomaly check DATASET [--splits train,valid,test]
    The dataset's problems, each with its file and annotation (what train and evaluate check first).
anomaly split COCO_JSON [--images DIR] --out DATASET [--valid F --test F]
    One COCO file (a campaign's, reviewed in CVAT or Label Studio) shared out into train/valid/test.
anomaly synthesize OUT [--train N --valid N --test N --seed S]
    A synthetic inspection dataset with its truth (anomaly.synthetic), COCO with masks.
anomaly compare BEFORE_DIR AFTER_DIR --out DIR [--pairs FILE]
    Two campaigns of the same asset, defect by defect (client.compare): DIR/changes.csv (new, grown, unchanged,
    gone), DIR/changes.html.

Exit status: 0 done; 1 something failed (a frame, a run, an AP under --min-ap); 2 the input is unusable (a
dataset problem, named with its file).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from anomaly.config import VARIANTS
from anomaly.errors import InputError
from client.exports import EXPORT_NAMES


def _url(args: argparse.Namespace) -> str:
    from anomaly.config import settings

    s = settings()
    return args.url or f"127.0.0.1:{s.triton_grpc_port if args.protocol == 'grpc' else s.triton_http_port}"


def _campaign(args: argparse.Namespace) -> int:
    import os

    from client.campaign import run_campaign
    from client.endpoint import CampaignStopped, EndpointSender
    from client.exports import WRITERS

    options = {"confidence_threshold": args.threshold, "mm_per_pixel": args.mm_per_pixel, "tiling": args.tiling}
    options = {k: v for k, v in options.items() if v is not None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        endpoint = None
        if args.endpoint:
            endpoint = EndpointSender(
                args.endpoint, out, api_key=os.environ.get("RUNPOD_API_KEY"), options=options,
                load_balancing=args.load_balancing, attempts=args.attempts, job_timeout_s=args.job_timeout,
            )  # fmt: skip
        counts = run_campaign(
            args.images, out, url="" if endpoint else _url(args), protocol=args.protocol, in_flight=args.in_flight,
            fps=args.fps, options=options, exports=args.exports, endpoint=endpoint, sequence=args.sequence,
            tracking={"min_frames": args.min_frames},
        )  # fmt: skip
    except CampaignStopped as exc:
        print(f"\nanomaly detect: stopped: {exc}", file=sys.stderr)
        return 1
    files = ", ".join(WRITERS[name][0] for name in args.exports)
    if "tracks" in counts:
        files = f"tracks.csv ({counts['tracks']} tracked defects), " + files
    rate = counts["sent"] / max(counts["seconds"], 1e-6)
    print(
        f"{counts['sent']} frames answered ({rate:.2f} frames/s), {counts['skipped']} already in "
        f"{out / 'results.jsonl'}, {counts['failed']} failed (errors.jsonl); wrote {files + ', ' if files else ''}"
        "annotated/",
        file=sys.stderr,
    )
    if endpoint is not None:
        usage = endpoint.usage.summary(args.price_per_second)
        (out / "endpoint_usage.json").write_text(json.dumps(usage | {"frames": counts["sent"], "frames_per_s": rate}))
        print(_usage_line(usage, args.price_per_second), file=sys.stderr)
    return 2 if counts["failed"] else 0


def _usage_line(usage: dict, price: float | None) -> str:
    """The endpoint's part of a campaign's summary: jobs, retries, the workers' seconds and what they cost."""
    line = (
        f"endpoint: {usage['jobs_submitted']} jobs submitted, {usage['jobs_collected_from_earlier_run']} collected "
        f"from an earlier run, {usage['retries']} retries; "
    )
    if usage["worker_execution_s"] is None:
        return line + "the endpoint reported no execution times (a local API server does not)"
    line += f"workers executed {usage['worker_execution_s']:.1f} s (queued {usage['queue_delay_s']:.1f} s)"
    if price is not None:
        line += f", cost {usage['cost']:.4f} at {price} a second"
    return line


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
    if args.endpoint:
        print("anomaly detect: --endpoint sends a campaign: give --out DIR too", file=sys.stderr)
        return 2
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

    masks, failures = {}, 0
    for path in args.masks:
        try:
            with Image.open(path) as img:
                masks[path] = np.asarray(img.convert("L")) != 0
        except (OSError, ValueError) as exc:
            print(f"{path}: not a readable mask image ({exc})", file=sys.stderr)
            failures += 1
    if args.image:
        try:
            found = _measure_on_photo(args.image, masks)
        except InputError as exc:
            print(str(exc), file=sys.stderr)
            return 2
    else:
        found = {path: measure(mask) for path, mask in masks.items()}
    for path, g in found.items():
        if args.mm_per_pixel:
            g |= to_millimetres(g, args.mm_per_pixel)
        print(json.dumps({"file": path, **g}), flush=True)
    return 1 if failures else 0


def _measure_on_photo(photo: str, masks: dict[str, np.ndarray]) -> dict[str, dict]:
    """Each mask (of the photo's size) measured as a crack of `photo`, its width read from the photo where the
    photo can tell (anomaly.crack_width), as the service measures a frame's cracks."""
    import dataclasses

    from anomaly.config import settings
    from anomaly.masks import box_crop
    from anomaly.pipeline import geometry_dicts, gray_frame, measure_frame

    s = dataclasses.replace(settings(), subpixel_width=True)
    try:
        data = Path(photo).read_bytes()
    except OSError as exc:
        raise InputError(photo, f"cannot be read ({exc.strerror})") from None
    gray = gray_frame(data, s, field=photo)
    for path, mask in masks.items():
        if mask.shape != gray.shape:
            raise InputError(path, f"is {mask.shape[1]}x{mask.shape[0]} but the photo {photo} is "
                             f"{gray.shape[1]}x{gray.shape[0]}; a mask must have its photo's size")  # fmt: skip
    placed = [box_crop(m) for m in masks.values()]
    crops = [crop for crop, _ in placed]
    boxes = np.asarray([box for _, box in placed], np.int32).reshape(-1, 4)
    table, widths = measure_frame(crops, boxes, [True] * len(crops), lambda: gray, s)
    return dict(zip(masks, geometry_dicts(table, widths)))


def _exports(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in EXPORT_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown export {unknown[0]!r}; known: {', '.join(EXPORT_NAMES)}")
    return names


def _dataset_error(exc) -> int:
    print(str(exc), file=sys.stderr)
    return 2


def _train(args: argparse.Namespace) -> int:
    from anomaly.datasets import DatasetError
    from anomaly.training import TrainingError, TrainRun, train

    if args.resume:
        out = Path(args.resume)
        saved = out / "run.json"
        if not saved.is_file():
            print(f"--resume {out}: no run.json there (not a run folder of `anomaly train`)", file=sys.stderr)
            return 2
        run = TrainRun(**json.loads(saved.read_text()))
        if args.epochs:
            run.epochs = args.epochs  # continue to more epochs than first asked
    else:
        if not (args.dataset and args.out):
            print("anomaly train: give DATASET and --out RUN_DIR (or --resume RUN_DIR)", file=sys.stderr)
            return 2
        out = Path(args.out)
        structures = [s.strip() for s in args.structures.split(",") if s.strip()] if args.structures else None
        run = TrainRun(dataset=args.dataset, variant=args.variant, epochs=args.epochs or 10, batch_size=args.batch_size,
                       lr=args.lr, resolution=args.resolution, init=args.init, device=args.device,
                       structures=structures, seed=args.seed, max_minutes=args.max_minutes, workers=args.workers,
                       augment=not args.no_augment, command=sys.argv)  # fmt: skip
    try:
        summary = train(run, out, resume=bool(args.resume), quiet_trainer=not args.verbose)
    except DatasetError as exc:
        return _dataset_error(exc)
    except TrainingError as exc:
        print(f"anomaly train: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1))
    if summary["serve"]:
        print(f"serve it: {summary['serve']}", file=sys.stderr)
    return 0 if summary["checkpoint"] else 1


def _evaluate(args: argparse.Namespace) -> int:
    from anomaly.datasets import DatasetError
    from client.evaluate import evaluate_split

    structures = [s.strip() for s in args.structures.split(",") if s.strip()] if args.structures else None
    try:
        report = evaluate_split(
            args.dataset, args.split, _url(args), args.protocol, Path(args.out), threshold=args.threshold,
            ap_threshold=args.ap_threshold, mm_per_pixel=args.mm_per_pixel, structures=structures,
            in_flight=args.in_flight,
        )  # fmt: skip
    except DatasetError as exc:
        return _dataset_error(exc)
    t = report["at_threshold"]
    print(
        f"box AP {report['box']['ap']} (AP50 {report['box']['ap50']}), mask AP {report['mask']['ap']}; at threshold "
        f"{t['threshold']}: {t['matched']}/{t['truths']} found, {t['misses']} missed, {t['false_alarms']} false "
        f"alarms; {report['frames_per_s']} frames/s; wrote {Path(args.out) / 'eval.json'}, eval.html",
        file=sys.stderr,
    )
    if report["refused"]:
        print(f"{len(report['refused'])} images were refused by the service (eval.json: refused)", file=sys.stderr)
    if args.min_ap is not None and (report["box"]["ap"] or 0.0) < args.min_ap:
        print(f"box AP {report['box']['ap']} is below --min-ap {args.min_ap}", file=sys.stderr)
        return 1
    return 0


def _check(args: argparse.Namespace) -> int:
    from anomaly.datasets import DatasetError, read_dataset

    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    try:
        data = read_dataset(args.dataset, splits)
    except DatasetError as exc:
        return _dataset_error(exc)
    counts = ", ".join(f"{n} {len(s.images)} images / {len(s.annotations)} objects" for n, s in data.splits.items())
    print(f"{data.root}: {data.layout}, classes {data.class_names()}; {counts}; no problem found")
    return 0


def _split(args: argparse.Namespace) -> int:
    from anomaly.datasets import DatasetError, split_coco

    try:
        data = split_coco(args.annotations, args.images, args.out, args.valid, args.test, args.seed)
    except DatasetError as exc:
        return _dataset_error(exc)
    counts = ", ".join(f"{n} {len(s.images)}" for n, s in data.splits.items())
    print(f"wrote {data.root} ({counts} images; classes {data.class_names()})", file=sys.stderr)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from client.compare import compare_campaigns

    try:
        counts = compare_campaigns(Path(args.before), Path(args.after), Path(args.out),
                                   Path(args.pairs) if args.pairs else None)  # fmt: skip
    except InputError as exc:
        print(f"anomaly compare: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"anomaly compare: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    print(
        f"{counts['frames']} frames compared: {counts['new']} new, {counts['grown']} grown, {counts['unchanged']} "
        f"unchanged, {counts['gone']} gone; wrote {Path(args.out) / 'changes.csv'}, changes.html",
        file=sys.stderr,
    )
    return 1 if counts["failed"] else 0


def _synthesize(args: argparse.Namespace) -> int:
    from anomaly.synthetic import write_dataset

    splits = {"train": args.train, "valid": args.valid, "test": args.test}
    out = write_dataset(Path(args.out), {k: v for k, v in splits.items() if v}, seed=args.seed)
    print(f"wrote {out} ({', '.join(f'{k} {v}' for k, v in splits.items() if v)} images)", file=sys.stderr)
    return 0


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
    detect.add_argument(
        "--fps", type=_positive, default=1.0, help="frames a second read from videos, or a --sequence's rate (campaign)"
    )
    detect.add_argument(
        "--sequence", action="store_true", help="each folder is an ordered sequence: its defects are tracked (campaign)"
    )
    detect.add_argument(
        "--min-frames", type=int, default=1, help="drop tracks seen in fewer frames, flicker (videos, sequences)"
    )
    detect.add_argument(
        "--endpoint", metavar="ID_OR_URL",
        help="campaign through a RunPod serverless endpoint: its id (key from RUNPOD_API_KEY) or its base URL",
    )  # fmt: skip
    detect.add_argument(
        "--load-balancing", action="store_true", help="the endpoint is a load-balancing one: frames go to its /detect"
    )
    detect.add_argument("--attempts", type=int, default=4, help="tries per frame on the endpoint (default 4)")
    detect.add_argument(
        "--job-timeout", type=_positive, default=600.0, help="seconds a frame's job may take before it is retried"
    )
    detect.add_argument("--price-per-second", type=float, help="the endpoint's price per worker second, for the cost")
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
    meas.add_argument(
        "--image", metavar="PHOTO", help="the photo the masks were drawn on: crack widths below the pixel from it"
    )
    meas.set_defaults(run=_measure)

    train = sub.add_parser("train", help="fine-tune RF-DETR on a COCO or YOLO dataset; RUN_DIR is servable")
    train.add_argument("dataset", nargs="?", metavar="DATASET", help="train/ valid/ (test/) in COCO or YOLO layout")
    train.add_argument("--variant", choices=VARIANTS, default="nano")
    train.add_argument("--epochs", type=int, help="epochs to train (default 10; with --resume, to continue to)")
    train.add_argument("--out", metavar="RUN_DIR", help="where the checkpoint, metrics and serve command go")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last epoch")
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--lr", type=float, default=1e-4, help="learning rate (rfdetr's default 1e-4)")
    train.add_argument("--resolution", type=int, help="input size (default: the variant's; a multiple of 32)")
    train.add_argument("--init", default="coco",
                       help="start from: coco (rfdetr's pretrained weights, downloaded), none (untrained, seeded), "
                            "or a checkpoint's path")  # fmt: skip
    train.add_argument("--structures", help="comma-separated classes that are structures (default: by name)")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    train.add_argument("--max-minutes", type=_positive, help="stop after the epoch past which another would not fit")
    train.add_argument("--workers", type=int, help="data loader processes (default: 2 on a GPU, 0 on a CPU)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-augment", action="store_true", help="the same pixels every epoch (overfitting checks)")
    train.add_argument("--verbose", action="store_true", help="rfdetr's own output on the terminal, not in train.log")
    train.set_defaults(run=_train)

    ev = sub.add_parser("evaluate", help="a labelled split through the served ensemble: AP, misses, geometry error")
    ev.add_argument("dataset", metavar="DATASET")
    ev.add_argument("--split", default="test")
    ev.add_argument("--url", help="Triton address (default 127.0.0.1 and the gRPC or HTTP port)")
    ev.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    ev.add_argument("--out", default="eval", metavar="DIR", help="where eval.json and eval.html go (default eval/)")
    ev.add_argument("--threshold", type=float, default=0.3, help="the serving threshold: misses and false alarms")
    ev.add_argument("--ap-threshold", type=float, default=0.05, help="the threshold sent for the AP curves")
    ev.add_argument("--mm-per-pixel", type=_positive, help="pixel size of images whose entry gives none")
    ev.add_argument("--structures", help="comma-separated classes that are structures (default: by name)")
    ev.add_argument("--in-flight", type=int, default=4, help="requests in flight to the server")
    ev.add_argument("--min-ap", type=float, help="exit 1 when the box AP@[.5:.95] is below this")
    ev.set_defaults(run=_evaluate)

    check = sub.add_parser("check", help="a dataset's problems, each named with its file and annotation")
    check.add_argument("dataset", metavar="DATASET")
    check.add_argument("--splits", default="train,valid", help="the splits that must be there (default train,valid)")
    check.set_defaults(run=_check)

    split = sub.add_parser("split", help="one COCO file (a reviewed campaign) -> train/valid/test in rfdetr's layout")
    split.add_argument("annotations", metavar="COCO_JSON")
    split.add_argument("--images", help="the folder its file_names are under (default: the JSON's folder; then "
                                        "each image's `source`)")  # fmt: skip
    split.add_argument("--out", required=True, metavar="DATASET")
    split.add_argument("--valid", type=float, default=0.15, help="share of the images for validation")
    split.add_argument("--test", type=float, default=0.15, help="share of the images held out for evaluate")
    split.add_argument("--seed", type=int, default=0)
    split.set_defaults(run=_split)

    synth = sub.add_parser("synthesize", help="a synthetic inspection dataset with its truth (COCO, masks)")
    synth.add_argument("out", metavar="OUT")
    synth.add_argument("--train", type=int, default=200)
    synth.add_argument("--valid", type=int, default=20)
    synth.add_argument("--test", type=int, default=20)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(run=_synthesize)
    comp = sub.add_parser("compare", help="two campaigns of the same asset, defect by defect: new, grown, gone")
    comp.add_argument("before", metavar="BEFORE_DIR")
    comp.add_argument("after", metavar="AFTER_DIR")
    comp.add_argument("--out", required=True, metavar="DIR", help="where changes.csv and changes.html go")
    comp.add_argument("--pairs", metavar="FILE", help="CSV lines before_frame_id,after_frame_id (default: by frame_id)")
    comp.set_defaults(run=_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
