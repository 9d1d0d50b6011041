"""`make demo`: the main job once, end to end, on the bundled sample images.

Starts tritonserver (unless one already answers), sends every image in samples/ through anomaly_pipeline
over gRPC, prints each response JSON, writes demo_output/<name>_annotated.jpg, and stops the server.
"""

from __future__ import annotations

import json
import sys

from PIL import Image

from anomaly.config import REPO_ROOT, load_settings
from anomaly.images import decode_image
from anomaly.serving.triton_server import running_server
from client.annotate import annotate
from client.triton_client import AnomalyClient

SAMPLES = sorted(p for p in (REPO_ROOT / "samples").iterdir() if p.suffix.lower() in (".jpg", ".png"))


def main() -> int:
    out = REPO_ROOT / "demo_output"
    out.mkdir(exist_ok=True)
    warned = set()
    with running_server(load_settings(), out / "triton.log") as server:
        with AnomalyClient(server.grpc_url, "grpc") as client:
            for path in SAMPLES:
                data = path.read_bytes()
                response = client.detect(data, frame_id=path.stem, include_masks=True, mm_per_pixel=0.2)
                target = out / f"{path.stem}_annotated.jpg"
                Image.fromarray(annotate(decode_image(data, len(data) + 1, 10**9), response)).save(target)
                for anomaly in response["anomalies"]:  # keep the printout readable: masks are in the picture
                    anomaly["mask"] = f"<COCO RLE {anomaly['mask']['size']}>"
                print(json.dumps(response, indent=2), flush=True)
                print(f"-> {target.relative_to(REPO_ROOT)}", file=sys.stderr)
                warned.update(response["warnings"])
    for warning in sorted(warned):
        print(f"WARNING {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
