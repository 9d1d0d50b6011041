"""An inspection campaign through the service: folders, globs and videos in; JSON Lines, annotated images and
the exports (client.exports: COCO, CSV) out (`anomaly detect PATH... --out DIR`, docs/campaigns.md).

Frames are read lazily (a video frame by frame at the asked rate), sent with a bounded number of requests in
flight, and written as they come back. `results.jsonl` is the record: a re-run skips every frame_id already
in it, and the COCO file and the CSV are rebuilt from it at the end. A file that cannot be read or that the
server refuses is reported on stderr and in `errors.jsonl`, and the run goes on.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from client.endpoint import EndpointSender, FrameFailed
from client.exports import EXPORT_NAMES, write_exports

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".m4v", ".webm"}
RESULTS, ERRORS, ANNOTATED = "results.jsonl", "errors.jsonl", "annotated"
FRAMES = "frames"  # the JPEGs of the video frames sent: every answered frame has a file its record names


@dataclass
class Frame:
    frame_id: str  # a file's path relative to what was named, or a video's name plus ":<seconds>s"
    source: str  # the file it came from
    data: bytes | None  # encoded image; None when it could not be read (error says why)
    error: str = ""
    video: bool = False  # a frame read from a video (its JPEG is kept in DIR/frames/)
    sequence: str = ""  # the video or --sequence folder it belongs to (its defects are tracked: client.tracks)
    at_s: float = 0.0  # its time in that sequence


def frame_id_for(name: str) -> str:
    """A file's name as a frame_id the service accepts (1-128 of A-Z a-z 0-9 _ . : / -): other characters
    become "_" and a short hash of the real name keeps two such names apart; long names are cut, room
    left for a video's ":<seconds>s". The same name always gives the same id, so a re-run resumes."""
    cleaned = re.sub(r"[^A-Za-z0-9_.:/\-]", "_", name)
    if cleaned == name and len(name) <= 100:
        return name
    return f"{cleaned[:90]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def find_inputs(paths: list[str]) -> list[tuple[Path, str, str]]:
    """Files, folders (recursively) and glob patterns -> (file, frame_id, the folder given or "") in a stable
    order."""
    found: list[tuple[Path, str, str]] = []
    for given in paths:
        if any(ch in given for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(given, recursive=True))
            found += [(m, frame_id_for(m.name), "") for m in matches if m.is_file()]
        elif Path(given).is_dir():
            root = Path(given)
            files = sorted(
                p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES
            )
            found += [(f, frame_id_for(str(f.relative_to(root))), frame_id_for(root.name)) for f in files]
        else:
            found.append((Path(given), frame_id_for(Path(given).name), ""))
    return found


def video_frames(path: Path, name: str, fps: float) -> Iterator[Frame]:
    """A video's frames at `fps` (by timestamp), JPEG-encoded, frame_id `<name>:<seconds>s`."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        yield Frame(name, str(path), None, "is not a readable video")
        return
    native = capture.get(cv2.CAP_PROP_FPS) or 25.0
    expected = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)  # what the container says it holds
    step, next_at, index = 1.0 / fps, 0.0, 0
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            at = index / native
            index += 1
            if at + 1e-9 < next_at:
                continue
            next_at += step
            ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
            data = jpeg.tobytes() if ok else None
            yield Frame(f"{name}:{at:.3f}s", str(path), data, "" if ok else "encode failed", video=True,
                        sequence=name, at_s=round(at, 3))  # fmt: skip
    finally:
        capture.release()
    if index < expected - 1:  # the stream broke off: the frames before it were sent and are kept
        at = index / native
        why = f"stopped decoding at frame {index} of {expected} ({at:.1f} s): the frames before it are kept"
        yield Frame(f"{name}:{at:.3f}s", str(path), None, why)


def frames(paths: list[str], fps: float, sequence: bool = False) -> Iterator[Frame]:
    """Every frame to send. With `sequence`, the images of each folder given are one sequence in name order,
    1/`fps` seconds apart (their defects are tracked like a video's)."""
    position: dict[str, int] = {}
    for path, name, folder in find_inputs(paths):
        if path.suffix.lower() in VIDEO_SUFFIXES:
            yield from video_frames(path, name, fps)
            continue
        group = folder if sequence and folder else ""
        index = position[group] = position.get(group, -1) + 1
        timing = {"sequence": group, "at_s": round(index / fps, 3)} if group else {}
        try:
            yield Frame(name, str(path.resolve()), path.read_bytes(), **timing)
        except OSError as exc:
            yield Frame(name, str(path), None, exc.strerror or str(exc))


def done_frame_ids(out: Path) -> set[str]:
    """frame_ids already answered in a previous run (a half-written last line is ignored)."""
    done = set()
    if (out / RESULTS).is_file():
        for line in (out / RESULTS).read_text().splitlines():
            try:
                done.add(json.loads(line)["frame_id"])
            except (ValueError, KeyError):
                continue
    return done


class Progress:
    """One line on stderr: frames done, frames/s, ETA (when the total is known)."""

    def __init__(self, total: int | None, stream=None):
        # sys.stderr as it is now, not when this module was imported (a test's captured stream may be closed since)
        self.total, self.stream, self.done, self.failed = total, stream or sys.stderr, 0, 0
        self.start = time.monotonic()

    def tick(self, failed: bool = False) -> None:
        self.done += 1
        self.failed += failed
        rate = self.done / max(time.monotonic() - self.start, 1e-6)
        total = f"/{self.total}" if self.total else ""
        eta = f", ETA {max(self.total - self.done, 0) / rate:.0f} s" if self.total and rate > 0 else ""
        failed_text = f", {self.failed} failed" if self.failed else ""
        self.stream.write(f"\r{self.done}{total} frames, {rate:.2f} frames/s{eta}{failed_text}   ")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def run_campaign(paths: list[str], out: Path, *, url: str = "", protocol: str = "grpc", in_flight: int = 4,
                 fps: float = 1.0, options: dict | None = None, annotate: bool = True,
                 exports: tuple[str, ...] = EXPORT_NAMES, endpoint: EndpointSender | None = None,
                 sequence: bool = False, tracking: dict | None = None) -> dict:  # fmt: skip
    """Send every frame not yet in out/results.jsonl, to the Triton at `url` or through a RunPod `endpoint`
    (client.endpoint, which holds its own options); write the outputs, then the `exports` (client.exports) from
    the whole record. Videos, and with `sequence` the folders given, have their defects tracked (client.tracks,
    `tracking`: kind, lost_s, min_frames). -> counts (sent, skipped, failed, seconds, tracks). Responses are kept
    whole, masks (COCO RLE) included: the COCO export is made from them."""
    from client import AnomalyClient, AnomalyServiceError
    from client.annotate import write_annotated

    out.mkdir(parents=True, exist_ok=True)
    done = done_frame_ids(out)
    local = threading.local()
    lock = threading.Lock()

    def client() -> AnomalyClient:
        if not hasattr(local, "client"):
            local.client = AnomalyClient(url, protocol)
        return local.client

    def send(frame: Frame) -> dict:
        if endpoint is not None:
            return endpoint.send(frame.frame_id, frame.data)
        return client().detect(frame.data, frame_id=frame.frame_id, include_masks=True, **(options or {}))

    counts = {"sent": 0, "skipped": 0, "failed": 0}
    started = time.monotonic()
    inputs = find_inputs(paths)
    videos = any(p.suffix.lower() in VIDEO_SUFFIXES for p, _, _ in inputs)
    progress = Progress(None if videos else sum(1 for _, name, _ in inputs if name not in done))

    def record_error(frame: Frame, message: str, tick: bool = True) -> None:
        counts["failed"] += 1
        print(f"\n{frame.source} ({frame.frame_id}): {message}", file=sys.stderr)
        with open(out / ERRORS, "a") as errors:
            errors.write(json.dumps({"frame_id": frame.frame_id, "source": frame.source, "error": message}) + "\n")
        if tick:
            progress.tick(failed=True)

    def finish(frame: Frame, future: Future) -> None:
        try:
            response = future.result()
        except (AnomalyServiceError, FrameFailed) as exc:
            record_error(frame, str(exc))
            return
        if annotate:
            write_annotated(frame.data, response, out / ANNOTATED / (safe_name(frame.frame_id) + ".jpg"))
        record = {**response, "source": frame.source}
        if frame.sequence:
            record |= {"sequence": frame.sequence, "at_s": frame.at_s}
        if frame.video:  # the record names a file holding the very pixels answered (review, training)
            kept = (out / FRAMES / (safe_name(frame.frame_id) + ".jpg")).resolve()
            kept.parent.mkdir(exist_ok=True)
            kept.write_bytes(frame.data)
            record |= {"source": str(kept), "video": frame.source}
        with lock, open(out / RESULTS, "a") as results:
            results.write(json.dumps(record) + "\n")
        counts["sent"] += 1
        progress.tick()

    pending: dict[Future, Frame] = {}
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        for frame in frames(paths, fps, sequence):
            if frame.frame_id in done:
                counts["skipped"] += 1
                continue
            if frame.data is None:
                record_error(frame, frame.error)
                continue
            while len(pending) >= in_flight:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    finish(pending.pop(future), future)
            pending[pool.submit(send, frame)] = frame
        for future in list(pending):
            wait([future])
            finish(pending.pop(future), future)
    progress.close()
    counts["seconds"] = time.monotonic() - started
    records = read_results(out)
    if any(r.get("sequence") for r in records):
        from client.tracks import track_campaign

        def frame_error(record: dict, message: str) -> None:
            record_error(Frame(record["frame_id"], record["source"], None), message, tick=False)

        counts["tracks"] = len(track_campaign(out, records, report_error=frame_error, **(tracking or {})))
    write_exports(out, records, exports)
    return counts


def safe_name(frame_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in frame_id)


def read_results(out: Path) -> list[dict]:
    """Every response of the campaign, from results.jsonl (a half-written last line is left out)."""
    responses = []
    if (out / RESULTS).is_file():
        for line in (out / RESULTS).read_text().splitlines():
            try:
                responses.append(json.loads(line))
            except ValueError:
                continue
    return responses
