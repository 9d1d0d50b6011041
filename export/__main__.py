"""`python -m export [--force]`: export the detector and make sure the segmenter has weights.

Idempotent: an export of the same weights, variant and labels is kept. Exits non-zero with a message
that names the missing file when no weights can be had and untrained weights are not allowed.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from anomaly.config import load_settings
from anomaly.errors import ConfigError
from anomaly.logs import setup_logging
from anomaly.weights import UNTRAINED_BANNER, prepare_segmenter_weights, segmenter_title
from export.detector import export_detector


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    parser.add_argument("--force", action="store_true", help="export again even when up to date")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # torch tracer chatter during export
    setup_logging(quiet=("rf-detr", "rfdetr", "torch", "py.warnings"))
    try:
        settings = load_settings()
        meta = export_detector(settings, force=args.force)
        spec = prepare_segmenter_weights(settings)
    except ConfigError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 2
    print(
        f"detector: RF-DETR {meta.variant} at {meta.resolution}px, {len(meta.class_names)} class slots, "
        f"weights {meta.weights}"
    )
    print(f"segmenter: {segmenter_title(spec.kind, spec.variant)}, weights {spec.checkpoint}")
    for what, untrained in (("the detector", meta.untrained), ("the segmenter", spec.untrained)):
        if untrained:
            print("WARNING " + UNTRAINED_BANNER.format(what=what), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
