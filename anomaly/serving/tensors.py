"""What a Triton Python model of the pipeline reads and sends: its inputs and request options, its outputs, and
an exception turned into that request's error (the caller's mistake, or an internal error with an id).

`triton_python_backend_utils` exists only inside Triton's stub process, so it is imported where used.
"""

from __future__ import annotations

import json
import logging
import traceback
import uuid
from pathlib import Path

import numpy as np

from anomaly.config import settings
from anomaly.detector import export_files
from anomaly.errors import InputError
from anomaly.options import RequestOptions, parse_options
from anomaly.serving.step_inputs import encoded_image

log = logging.getLogger("anomaly.triton")


def pb_utils():
    import triton_python_backend_utils

    return triton_python_backend_utils


def max_batch_size(args: dict) -> int:
    """The model's max_batch_size, from the config Triton loaded (the launcher's serving.pbtxt for this machine)."""
    return int(json.loads(args["model_config"])["max_batch_size"])


def config_parameter(args: dict, key: str, default: str) -> str:
    """A `parameters` entry of the model's own config, inside a Triton Python model's initialize()."""
    params = json.loads(args.get("model_config", "{}")).get("parameters", {})
    return params.get(key, {}).get("string_value", default)


def export_files_of(args: dict) -> tuple[Path, Path]:
    """(model.onnx, metadata.json) of the detector export, found from this model's own folder."""
    return export_files(Path(args["model_repository"]).parent)


def params_of(request) -> dict:
    raw = request.parameters()
    return json.loads(raw) if raw else {}


def options_of(request) -> RequestOptions:
    s = settings()
    return parse_options(params_of(request), s.confidence_threshold, s.mm_per_pixel)


def array(request, name: str) -> np.ndarray:
    tensor = pb_utils().get_input_tensor_by_name(request, name)
    if tensor is None:
        raise InputError(name, "is missing from the request")
    return tensor.as_numpy()


def optional_array(request, name: str) -> np.ndarray | None:
    """An input the model declares optional: its array, or None where the request does not carry it."""
    tensor = pb_utils().get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def image_bytes(request, name: str = "IMAGE") -> bytes:
    """The one encoded image of a request (step_inputs.encoded_image)."""
    return encoded_image(name, array(request, name))


def bytes_tensor(items: list[bytes]) -> np.ndarray:
    out = np.empty(len(items), dtype=np.object_)
    for i, item in enumerate(items):
        out[i] = item
    return out


def respond(outputs: dict[str, np.ndarray]):
    pb = pb_utils()
    return pb.InferenceResponse(output_tensors=[pb.Tensor(k, v) for k, v in outputs.items()])


def error_response(exc: BaseException):
    pb = pb_utils()
    if isinstance(exc, InputError):
        return pb.InferenceResponse(error=pb.TritonError(str(exc), pb.TritonError.INVALID_ARG))
    # The details stay in the log under an id the client can quote; exception texts may show internals.
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s: %s", error_id, "".join(traceback.format_exception(exc)))
    return pb.InferenceResponse(
        error=pb.TritonError(f"internal error {error_id} (the server log has the details)", pb.TritonError.INTERNAL)
    )
