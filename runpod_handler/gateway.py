"""Pod-mode REST API (docs/api.md, "REST gateway"), in front of Triton (which stays reachable on its own ports).

  GET  /health          200 only when Triton and every model are ready, else 503
  GET  /ping            RunPod load-balancing health: 204 while starting, 200 when ready, 503 when it was
                        ready and no longer is
  GET  /info            detector, segmenter, weights (and whether untrained), classes, versions, device
  POST /detect          {"image": b64, "frame_id"?, "include_masks"?, "confidence_threshold"?, "mm_per_pixel"?,
                         "tiling"?}
  POST /detect/batch    {"images": [b64...], "frame_ids"?: [...], same options}
  POST /detect/upload   multipart: file, and the same options as form fields
  GET  /docs            OpenAPI documentation (/openapi.json)

Status codes: 400 a field is malformed or missing (the message names it), 413 body too large, 422 the
image itself is unusable (corrupt, too many pixels, ...), 503 Triton not ready. Run with
`uvicorn runpod_handler.gateway:app --host $API_HOST --port $API_PORT` (the entrypoint does).
"""

from __future__ import annotations

import hmac
import importlib.metadata
import inspect
import logging
import threading
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from anomaly.config import settings
from anomaly.detector import DetectorMetadata
from anomaly.errors import InputError
from anomaly.options import OPTION_NAMES, OPTIONS, parse_options
from anomaly.result import models_info, warnings_for
from anomaly.serving import in_service
from client import AnomalyClient, AnomalyServiceError
from runpod_handler.jobs import Job, parse_batch, parse_single, run_job

log = logging.getLogger("anomaly.gateway")
PIPELINE_MODELS = ("preprocess", "detector", "select_detections", "segmenter", "geometry", "result", "anomaly_pipeline")

app = FastAPI(
    title="Infrastructure anomaly detection",
    version=importlib.metadata.version("anomaly-inspection"),
    description="RF-DETR + SAM3 or SAM2.1 on Triton: defects with boxes, masks, measured geometry and structure.",
)


def _body_model(name: str, fields: dict, options) -> type[BaseModel]:
    """A JSON body's model: its own fields, then the request options (anomaly.options.OPTIONS) it takes, each
    optional; fields it does not know are refused."""
    for o in options:
        fields[o.name] = (o.kind | None, Field(None, description=o.doc))
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


IMAGE_DOC = "base64 of a JPEG, PNG, WebP, BMP or TIFF image (a data: URL also works)"
DetectRequest = _body_model("DetectRequest", {"image": (str, Field(description=IMAGE_DOC))}, OPTIONS)
BatchRequest = _body_model(  # a batch names its frames in frame_ids, one per image
    "BatchRequest",
    {
        "images": (list[str], Field(description="base64 images")),
        "frame_ids": (list[str] | None, Field(None, description="one per image")),
    },
    [o for o in OPTIONS if o.name != "frame_id"],
)


_local = threading.local()


def triton() -> AnomalyClient:
    """One gRPC client per worker thread."""
    if not hasattr(_local, "client"):
        _local.client = AnomalyClient(settings().triton_url, "grpc")
    return _local.client


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message})


def _run(job: Job) -> Any:
    try:
        return run_job(triton(), job)
    except AnomalyServiceError as exc:
        if exc.bad_input:
            return _error(422, str(exc))
        if not triton().is_ready():
            return _error(503, f"Triton is not ready: {exc}")
        log.error("Triton failed: %s", exc)
        return _error(500, str(exc))


OPEN_PATHS = ("/health", "/ping")


class RequestGuard:
    """Pure ASGI middleware, outermost: the optional API key (API_KEY; /health and /ping stay open: the platform
    probes them without credentials), and the body limit
    (MAX_REQUEST_BYTES) enforced on the bytes as they arrive, so a chunked body with no Content-Length cannot
    grow past it in memory either."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s = settings()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if s.api_key and scope["path"] not in OPEN_PATHS:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {s.api_key}".encode()):
                response = _error(401, "authorization: send the header 'Authorization: Bearer <API_KEY>'")
                response.headers["WWW-Authenticate"] = "Bearer"
                return await response(scope, receive, send)
        limit = s.max_request_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _too_large(length)(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise StarletteHTTPException(
                    413, f"request body passed the {limit} bytes allowed (MAX_REQUEST_BYTES) while arriving"
                )
            return message

        await self.app(scope, counted, send)


def _too_large(length: str) -> JSONResponse:
    limit = settings().max_request_bytes
    return _error(413, f"request body is {length} bytes, more than the {limit} allowed (MAX_REQUEST_BYTES)")


app.add_middleware(RequestGuard)

NOT_JSON = 'body: {what}; send one JSON object such as {{"image": "<base64>", "frame_id": "deck-1"}}'


@app.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body that is not JSON at all is a 400 that says so; a field of the wrong type stays FastAPI's 422,
    which names the field."""
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        where = errors[0].get("loc", ("body", "?"))[-1]
        why = (errors[0].get("ctx") or {}).get("error", "JSON decode error")
        return _error(400, NOT_JSON.format(what=f"is not valid JSON ({why} at character {where})"))
    return await request_validation_exception_handler(request, exc)


@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":  # FastAPI's catch-all
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, StarletteHTTPException):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:  # the body limit tripped while FastAPI read the body
            return await http_error(request, cause)
        return _error(400, NOT_JSON.format(what="could not be parsed as JSON (nested too deeply, or not text)"))
    return await http_exception_handler(request, exc)


@app.exception_handler(InputError)
async def input_error(_request: Request, exc: InputError) -> JSONResponse:
    return _error(400, str(exc))


def readiness() -> dict:
    client = AnomalyClient(settings().triton_url, "grpc")
    try:
        server, models = client.readiness(PIPELINE_MODELS)
    except Exception as exc:  # noqa: BLE001 - unreachable Triton is simply not ready
        return {"ready": False, "triton": f"unreachable at {settings().triton_url}: {type(exc).__name__}", "models": {}}
    finally:
        client.close()
    return {
        "ready": bool(server and all(models.values())),
        "triton": "ready" if server else "not ready",
        "models": models,
    }


@app.get("/health", summary="ready only when Triton and every model of the pipeline are ready")
def health():
    state = readiness()
    body = {"status": "ok" if state["ready"] else "unavailable", **state}
    return JSONResponse(status_code=200 if state["ready"] else 503, content=body)


_ready_once = threading.Event()  # /ping: was Triton ever ready behind this gateway?


@app.get("/ping", summary="RunPod load-balancing health: 204 starting, 200 ready, 503 no longer ready")
def ping():
    """The load balancer sends traffic to a worker once this says 200, counts its cold start from the first 204
    to the first 200, and drops a worker that answers anything else. In load-balancing mode the entrypoint
    starts this gateway before the export and Triton, so the worker says 'starting' instead of not answering."""
    state = readiness()
    if state["ready"]:
        _ready_once.set()
        return JSONResponse(status_code=200, content={"status": "healthy"})
    if not _ready_once.is_set():
        return Response(status_code=204)
    return JSONResponse(status_code=503, content={"status": "unhealthy", **state})


def models_in_service(model_repository: Path) -> dict:
    """What the running detector and segmenter steps loaded (their start-up records, anomaly.serving.in_service),
    in the shape every response's `models` has, with the model warnings (untrained, detector on the CPU)."""
    detector = in_service.read_record(model_repository, "detector")
    segmenter = in_service.read_record(model_repository, "segmenter")
    meta = DetectorMetadata(**detector["metadata"])
    models = models_info(meta, segmenter["segmenter"], detector["detector"])
    models["detector"]["loaded_at"] = detector["loaded_at"]
    models["segmenter"]["loaded_at"] = segmenter["loaded_at"]
    return {
        "meta": meta,
        "models": models,
        "warnings": warnings_for(meta, segmenter["segmenter"], [], detector["detector"]),
        "cuda_mps": segmenter.get("cuda_mps", "off"),  # both GPU steps run in the one environment the launcher set
        "instances": {"detector": detector["instances"], "segmenter": segmenter["instances"]},
    }


@app.get("/info", summary="models, weights, classes, versions and device in service")
def info():
    s = settings()
    state = readiness()
    if not state["ready"]:
        return _error(503, f"Triton is not ready ({state['triton']})")

    # Triton is ready, so every step has started and written what it loaded.
    try:
        loaded = models_in_service(s.model_repository)
    except FileNotFoundError as exc:  # a Triton with another model repository than this gateway's
        return _error(503, f"no start-up record of the models in {s.model_repository} ({exc.filename})")
    meta = loaded["meta"]
    versions = {}
    for package in ("rfdetr", "sam2", "torch", "onnxruntime", "tritonclient", "runpod", "anomaly-inspection"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    versions["triton_server"] = triton().server_version()
    detector = loaded["models"]["detector"]
    segmenter = loaded["models"]["segmenter"]
    return {
        "mode": s.runpod_mode,
        "detector": detector | {"variant": meta.variant},
        "segmenter": segmenter | {"sam_model_path": s.sam_model_path},
        "untrained_weights": bool(detector.get("untrained") or segmenter.get("untrained")),
        "warnings": loaded["warnings"],
        "classes": {
            "defects": meta.classes_with_role("defect"),
            "structures": meta.classes_with_role("structure"),
        },
        "device": {
            "segmenter": segmenter.get("device"),
            "detector": detector.get("device"),
            "detector_backend": detector.get("backend"),
            "detector_runtime": detector.get("runtime"),
            "cuda_mps": loaded["cuda_mps"],
            "instances": loaded["instances"],  # which GPU each instance runs on (GPUS); gpu null: its own choice
        },
        "versions": versions,
        "defaults": {
            "confidence_threshold": s.confidence_threshold,
            "mm_per_pixel": s.mm_per_pixel,
            "severity_thresholds_mm": list(s.severity_thresholds_mm),
            "max_detections": s.max_detections,
            "max_batch_images": s.max_batch_images,
            "tiling": s.tiling,
            "tile_overlap": s.tile_overlap,
        },
        "triton": {"url": s.triton_url, "http_port": s.triton_http_port, "grpc_port": s.triton_grpc_port},
    }


@app.post("/detect", summary="one base64 image -> the response object")
def detect(body: DetectRequest):
    return _run(parse_single(body.model_dump(exclude_none=True), settings()))


@app.post("/detect/batch", summary="several base64 images -> {results, count, failed}")
def detect_batch(body: BatchRequest):
    s = settings()
    return _run(parse_batch(body.model_dump(exclude_none=True), s, s.max_batch_images))


UPLOAD_FIELDS = ("file", *OPTION_NAMES)


async def detect_upload(request: Request, file: UploadFile, **fields):
    unknown = sorted(set((await request.form()).keys()) - set(UPLOAD_FIELDS))  # the form FastAPI already parsed
    if unknown:  # a misspelt confidence_treshold must not fall back to the default silently
        raise InputError(unknown[0], f"is not a known form field; expected {', '.join(UPLOAD_FIELDS)}")
    s = settings()
    options = parse_options(fields, s.confidence_threshold, s.mm_per_pixel)
    data = await file.read(s.max_image_bytes + 1)
    if len(data) > s.max_image_bytes:
        raise InputError("file", f"is more than the {s.max_image_bytes} bytes allowed (MAX_IMAGE_BYTES)")
    if not data:
        raise InputError("file", "is empty")
    return await run_in_threadpool(_run, Job([(options.frame_id, data)], options, batch=False))


# The form's fields are the request options, as FastAPI reads them from the signature (and lists them in /docs).
detect_upload.__signature__ = inspect.Signature(
    [
        inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request),
        inspect.Parameter(
            "file", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[UploadFile, File(description="the image file")]
        ),
        *(
            inspect.Parameter(
                o.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[o.kind | None, Form(description=o.doc)],
            )
            for o in OPTIONS
        ),
    ]
)
app.post("/detect/upload", summary="multipart image upload -> the response object")(detect_upload)


@app.get("/", include_in_schema=False)
def root():
    return {"service": app.title, "docs": "/docs", "health": "/health", "started": _STARTED}


_STARTED = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
