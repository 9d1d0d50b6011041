# One image, every RunPod mode (README, "RunPod"): RUNPOD_SERVERLESS=false (pod: Triton + REST gateway), true
# (queue-based serverless worker) or lb (load-balancing endpoint: the REST gateway on PORT). Built FROM the
# official Triton server image, whose Python backend runs the pipeline's models. No Docker engine where this
# is developed: `make lint` runs hadolint on it and tests/test_image.py resolves what it installs.
#
# The base fixes the Python everything is pinned for: Triton 25.01 (Triton 2.54, CUDA 12.8, Ubuntu 24.04,
# Python 3.12); requirements-image.lock is resolved for exactly that (runpod_handler/image.py).
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:25.01-py3
FROM ${TRITON_IMAGE}

# torch and torchvision come from the PyTorch index of the base's CUDA (the host driver must support it).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Weights copied into /models at build time, space-separated paths inside the build context, e.g.
# --build-arg BAKE_WEIGHTS="bake/sam2.1_hiera_large.pt bake/rf-detr-medium.pth" (README, "Cold start").
ARG BAKE_WEIGHTS=""

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04 images ship a user `ubuntu` with uid 1000; ours takes that uid. The venv module's ensurepip
# is a separate Ubuntu package; its version is the base release's.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --create-home --uid 1000 app \
    && python3 -m venv /opt/venv \
    && mkdir -p /app /models \
    && chown app:app /app /models

WORKDIR /app
COPY requirements-image.lock requirements-no-deps.txt ./
# 1. torch from the PyTorch index; 2. everything else, exact versions, wheels only (the lock is complete, so
# no dependency is resolved here), and trackers, which asks for a numpy this stack cannot take
# (requirements-no-deps.txt); 3. the packages PyPI has only as source, built against what 1-2 installed.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1 \
    && pip install --no-cache-dir --no-deps --only-binary=:all: -r requirements-image.lock \
    && pip install --no-cache-dir --no-deps --only-binary=:all: -r requirements-no-deps.txt \
    && SAM2_BUILD_CUDA=0 pip install --no-cache-dir --no-deps --no-build-isolation --no-binary=:all: \
        sam2==1.1.0 iopath==0.1.10 antlr4-python3-runtime==4.9.3

COPY --chown=app:app . /app
RUN pip install --no-cache-dir --no-deps -e /app

# Baked weights (before VOLUME: later writes to a volume path are discarded). BuildKit's bind mount reads them
# from the build context without a layer of their own.
RUN --mount=type=bind,target=/context \
    for f in ${BAKE_WEIGHTS}; do \
        cp "/context/${f}" /models/ || { echo "BAKE_WEIGHTS: ${f} is not in the build context" >&2; exit 1; }; \
    done \
    && chown -R app:app /models

USER 1000:1000
# Triton binds all interfaces inside the container; the gateway listens on 8080 (8000 is Triton's HTTP).
ENV RUNPOD_SERVERLESS=false \
    PORT=8080 \
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
