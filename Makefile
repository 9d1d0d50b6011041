# Every target sets up what it needs (venv, Triton binaries, exported models) and is idempotent.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed
TRITON_STAMP := .triton/.installed
BROWSER_STAMP := .browser/.installed
IMAGE ?= anomaly-detection
TAG ?= latest
REGISTRY ?= your-registry

# Tests and the demo run untrained models (no weights can be downloaded here) and the smallest SAM.
DEV_ENV := ALLOW_UNTRAINED_WEIGHTS=$${ALLOW_UNTRAINED_WEIGHTS:-1} SAM2_VARIANT=$${SAM2_VARIANT:-tiny}

.PHONY: help venv triton browser models serve demo train-demo test unit perf bench bench-gpu bench-train soak lint docs lock image-lock hub docker-build docker-push clean

help:
	@echo "make serve   pod mode: Triton (HTTP 8000, gRPC 8001, metrics 8002) + REST gateway (8080)"
	@echo "make demo    run the bundled sample images end to end, write demo_output/"
	@echo "make train-demo  generate a synthetic dataset, train RF-DETR nano on it (~30 min on a CPU), serve and evaluate it"
	@echo "make test    lint, then the whole test suite (starts real tritonservers)"
	@echo "make unit    the tests that need no tritonserver (under a minute)"
	@echo "make perf    perf_analyzer on anomaly_pipeline over gRPC and HTTP"
	@echo "make bench   benchmarks: geometry, preprocessing, ensemble vs in-process latency, server memory"
	@echo "make bench-gpu  ensemble at several concurrencies, per-step times, in-process and plain-script baselines"
	@echo "make bench-train  anomaly train against rfdetr's own train() (images/s), and anomaly evaluate's frames/s"
	@echo "make soak    10 minutes at concurrency 8 with 10% bad inputs: errors, latency, memory growth"
	@echo "make lint    ruff and hadolint"
	@echo "make models  export the detector and prepare segmenter weights"
	@echo "make browser chromium-headless-shell in .browser/ (the report test opens the report in it)"
	@echo "make image-lock  resolve requirements-image.lock for the image's Python 3.12"
	@echo "make hub     write .runpod/hub.json, .runpod/tests.json and test_input.json from the settings"
	@echo "make docs    write docs/configuration.md from the settings table (anomaly/config.py)"
	@echo "make docker-build / docker-push  the pod/serverless image (Dockerfile)"

venv: $(VENV_STAMP)
$(VENV_STAMP): requirements.lock requirements-no-deps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -r requirements-no-deps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# tritonserver + Python backend (nvidia-pytriton wheel) and perf_analyzer (tritonclient 2.51.0 wheel) with
# the two libraries it links against, unpacked into .triton/ so nothing is installed system-wide.
triton: $(TRITON_STAMP)
$(TRITON_STAMP): | $(VENV_STAMP)
	rm -rf .triton/pkgs .triton/deb
	$(PY) -m pip install -q --no-deps --target .triton/pkgs nvidia-pytriton==0.7.0 tritonclient==2.51.0 \
		nvidia-cuda-runtime-cu12==12.9.79
	mkdir -p .triton/deb && cd .triton/deb && (apt-get download libb64-0d || (apt-get update -qq && apt-get download libb64-0d)) \
		&& dpkg -x libb64-0d_*.deb root
	touch $@

# chromium-headless-shell and the libraries it needs that this Debian image lacks, unpacked into .browser/ as
# the Triton binaries are (nothing installed system-wide): the tests open the campaign report in a real browser.
BROWSER_DEBS := chromium-headless-shell chromium-common libxnvctrl0 libdouble-conversion3 libharfbuzz-subset0 \
	libminizip1 libopenh264-7 libopus0 libogg0 libflac12 libasyncns0 libmp3lame0 libmpg123-0 libvorbis0a \
	libvorbisenc2 libsndfile1 libpulse0
browser: $(BROWSER_STAMP)
$(BROWSER_STAMP):
	rm -rf .browser && mkdir -p .browser/deb
	cd .browser/deb && (apt-get download $(BROWSER_DEBS) || (apt-get update -qq && apt-get download $(BROWSER_DEBS))) \
		&& for deb in *.deb; do dpkg -x $$deb ../root; done
	rm -rf .browser/deb
	touch $@

models: $(VENV_STAMP)
	$(PY) -m export

serve: $(VENV_STAMP) $(TRITON_STAMP)  # the entrypoint exports what is missing; pod mode unless RUNPOD_SERVERLESS says
	RUNPOD_SERVERLESS=$${RUNPOD_SERVERLESS:-false} $(PY) -m runpod_handler.entrypoint

demo: $(VENV_STAMP) $(TRITON_STAMP)
	$(DEV_ENV) $(PY) -m export
	$(DEV_ENV) $(PY) -m client.demo

# A first trained model made here: synthetic data, RF-DETR nano for TRAIN_MINUTES, served and evaluated against
# the untrained start (train_demo/summary.md). SAM stays untrained where no weights are: masks are then meaningless.
TRAIN_MINUTES ?= 30
train-demo: $(VENV_STAMP) $(TRITON_STAMP)
	$(DEV_ENV) $(PY) -m bench.train_demo --minutes $(TRAIN_MINUTES) $(TRAIN_DEMO_ARGS)

# `make test` (CI) = unit + e2e + lint; `make unit` is the fast inner loop: no tritonserver (under a minute).
test: lint $(VENV_STAMP) $(TRITON_STAMP) $(BROWSER_STAMP)
	$(DEV_ENV) $(PY) -m export
	$(DEV_ENV) $(PY) -m pytest -q

unit: $(VENV_STAMP)
	$(DEV_ENV) $(PY) -m export
	$(DEV_ENV) $(PY) -m pytest -q -m "not e2e and not slow"

perf: $(VENV_STAMP) $(TRITON_STAMP)
	$(DEV_ENV) $(PY) -m export
	$(DEV_ENV) $(PY) -m bench.perf

bench: $(VENV_STAMP) $(TRITON_STAMP)
	$(DEV_ENV) $(PY) -m export
	$(DEV_ENV) $(PY) -m bench.bench

bench-train: $(VENV_STAMP) $(TRITON_STAMP)
	$(DEV_ENV) $(PY) -m bench.train $(BENCH_TRAIN_ARGS)

soak: $(VENV_STAMP) $(TRITON_STAMP)
	$(DEV_ENV) $(PY) -m export
	$(DEV_ENV) $(PY) -m bench.soak $(SOAK_ARGS)

# On a GPU machine without network, point PY at a Python that has the project's packages and set TRITON_HOME
# (or unpack .triton/): `make bench-gpu PY=python3`. Nothing is installed or downloaded then.
# The workload: SAM2.1 large where there is a GPU, tiny on a CPU (untrained unless weights are given).
GPU_BENCH_ENV := ALLOW_UNTRAINED_WEIGHTS=$${ALLOW_UNTRAINED_WEIGHTS:-1} \
	SAM2_VARIANT=$${SAM2_VARIANT:-$$(nvidia-smi -L >/dev/null 2>&1 && echo large || echo tiny)}
bench-gpu: $(if $(filter $(VENV)/bin/python,$(PY)),$(VENV_STAMP) $(TRITON_STAMP))
	$(GPU_BENCH_ENV) $(PY) -m export
	$(GPU_BENCH_ENV) $(PY) -m bench.gpu $(BENCH_GPU_ARGS)

lint: $(VENV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

lock: $(VENV_STAMP)
	$(PY) -m pip install -q -r requirements.in
	( echo '# Exact environment of .venv (pip freeze), installed by `make venv` after torch. Regenerate: `make lock`.'; \
	  $(PY) -m pip freeze --exclude-editable | grep -v -E '^(anomaly|trackers==|pydeprecate==)' ) > requirements.lock

# What the container image installs besides torch: resolved for the base image's Python 3.12 (runpod_handler/image.py).
image-lock: $(VENV_STAMP)
	$(PY) -m runpod_handler.image

# docs/configuration.md from the settings table; tests/test_docs.py fails when it is stale.
docs: $(VENV_STAMP)
	$(PY) -m anomaly.config --markdown > docs/configuration.md

# The RunPod Hub files (.runpod/hub.json, .runpod/tests.json) and test_input.json, from the settings table.
hub: $(VENV_STAMP)
	$(PY) -m runpod_handler.hub

docker-build:
	docker build -t $(REGISTRY)/$(IMAGE):$(TAG) .

docker-push: docker-build
	docker push $(REGISTRY)/$(IMAGE):$(TAG)

clean:
	rm -rf demo_output bench_output perf_output .pytest_cache
