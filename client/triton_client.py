"""A small client over tritonclient: image bytes in, the parsed response object out.

Works with any Triton serving `anomaly_pipeline`; the options travel as Triton request parameters.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from anomaly.options import OPTION_NAMES

MODEL = "anomaly_pipeline"
TYPED_OUTPUTS = ("BOXES", "SCORES", "CLASS_IDS", "SEG_INDEX", "MASK_SCORES", "GEOMETRY")


class AnomalyServiceError(RuntimeError):
    """The server refused or failed a request. `bad_input` is True for the caller's mistakes (HTTP 400,
    gRPC INVALID_ARGUMENT); the message names the field when the server did."""

    def __init__(self, message: str, status: str = "", bad_input: bool = False):
        super().__init__(message)
        self.status = status
        self.bad_input = bad_input


@dataclass
class Detection:
    """The response plus the ensemble's typed outputs (all detections above the threshold)."""

    response: dict
    arrays: dict[str, np.ndarray]


def _clean_message(text: str) -> str:
    """Triton prefixes ensemble errors with routing detail; keep the model's own words after it."""
    marker = "Failed to process the request(s) for model '"
    if marker in text:
        tail = text.split(marker, 1)[1]
        text = tail.split("', message: ", 1)[1] if "', message: " in tail else tail
    prefix = f"in ensemble '{MODEL}', "
    if text.startswith(prefix):
        text = text[len(prefix) :]
    return text.strip()


class AnomalyClient:
    def __init__(self, url: str = "127.0.0.1:8001", protocol: str = "grpc", model: str = MODEL, timeout_s: float = 600):
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be grpc or http, got {protocol!r}")
        self.url, self.protocol, self.model, self.timeout_s = url, protocol, model, timeout_s
        if protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        self._tc = tc
        kwargs = {"network_timeout": timeout_s, "connection_timeout": 10} if protocol == "http" else {}
        self._client = tc.InferenceServerClient(url, **kwargs)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> AnomalyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready() and self._client.is_model_ready(self.model))
        except Exception:  # noqa: BLE001 - not reachable is simply not ready
            return False

    def readiness(self, models: tuple[str, ...]) -> tuple[bool, dict[str, bool]]:
        """(server ready?, {model: ready?}); raises when Triton cannot be reached."""
        server = bool(self._client.is_server_ready())
        return server, {m: bool(self._client.is_model_ready(m)) for m in models}

    def server_version(self) -> str:
        meta = self._client.get_server_metadata()
        return meta.version if hasattr(meta, "version") else meta.get("version", "")

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.is_ready():
            if time.monotonic() > deadline:
                raise AnomalyServiceError(f"Triton at {self.url} ({self.protocol}) was not ready after {timeout_s} s")
            time.sleep(0.5)

    def detect_full(self, image: bytes, **options) -> Detection:
        """Image bytes and request options (anomaly.options.OPTIONS: confidence_threshold, include_masks, frame_id,
        mm_per_pixel, tiling; None leaves one to the server's default) -> the response and the typed outputs."""
        from tritonclient.utils import InferenceServerException

        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"unknown option {unknown[0]!r}; the options are {', '.join(OPTION_NAMES)}")
        tensor = self._tc.InferInput("IMAGE", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
        params = {k: v for k, v in options.items() if v is not None}
        outputs = [self._tc.InferRequestedOutput(name) for name in ("RESULT_JSON", *TYPED_OUTPUTS)]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            result = self._client.infer(self.model, [tensor], outputs=outputs, parameters=params or None, **kwargs)
        except InferenceServerException as exc:
            status = str(exc.status() or "")
            bad = status in ("400", "StatusCode.INVALID_ARGUMENT")
            raise AnomalyServiceError(_clean_message(exc.message() or str(exc)), status, bad) from None
        response = json.loads(result.as_numpy("RESULT_JSON").reshape(-1)[0])
        return Detection(response, {name: result.as_numpy(name) for name in TYPED_OUTPUTS})

    def detect(self, image: bytes, **options) -> dict:
        """Image bytes -> the response object (frame_id, image_size, anomalies, ...)."""
        return self.detect_full(image, **options).response
