#!/usr/bin/env bash
# `make bench-gpu` on a GPU machine that has Python 3.12 with torch but no network and none of our packages
# (the lent H100 of ../shared/DESIGN.md, "The GPU machine").
#
#   here:  bench/offline_gpu.sh pack         -> .gpu/ (about 47 MB): Triton from .triton/, the cp312 wheels
#                                               of our compiled dependencies, our pure-Python ones from .venv
#   there: bench/offline_gpu.sh run [ARGS]   in the repo root with .gpu/ beside it; ARGS go to bench.gpu
#          bench/offline_gpu.sh coldstart    the entrypoint twice (empty MODEL_REPOSITORY, then the same
#                                            one again): its `cold start:` lines
#          bench/offline_gpu.sh sam3 [ARGS]  SAM3 as served, memory and times, against Meta's path (bench.sam3_gpu)
#          bench/offline_gpu.sh compile [ARGS]  SAM's encoder and decoder as served against torch.compile'd
#                                               (bench.compile_check; needs a C compiler there)
#   here:  bench/offline_gpu.sh rehearse [ARGS]  `run` on a stand-in of that machine before a GPU session spends
#                                               its minutes: a Python 3.12 venv with the machine's packages
#                                               (numpy 2, scipy 1.18 ...; torch on the CPU, its CUDA build
#                                               downloaded once, 6 GB), a copy of HEAD and .gpu/,
#                                               SAM2.1 tiny; fails on any failed request or step warning
#                                               (GPU_STANDIN: where the stand-in venv is kept, default
#                                               /tmp/gpu-machine-standin; ANOMALY_OFFLINE_ENV: the venv `run`
#                                               makes, default /tmp/anomaly-env)
#
# Triton's Python stub imports numpy from the python on PATH and garbles BYTES tensors under numpy 2, so
# `run` makes a venv whose own site-packages (numpy 1.26.4, our dependencies, the repo) come first and the
# machine's (torch, scipy, OpenCV ...) after them.
set -euo pipefail
cd "$(dirname "$0")/.."

pack() {
    local site pkgs=.triton/pkgs
    site=$(.venv/bin/python -c 'import site; print(site.getsitepackages()[0])')
    rm -rf .gpu && mkdir -p .gpu/wheels
    # tritonserver, the Python backend, the 3.12 stub and the bundled libraries they load
    local libs
    libs=$(for f in $pkgs/pytriton/tritonserver/bin/tritonserver \
        $pkgs/pytriton/tritonserver/backends/python/libtriton_python.so \
        $pkgs/pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub; do
        ldd "$f" | grep -o 'nvidia_pytriton.libs/[^ ]*'
    done | sort -u)
    tar -C $pkgs -cJf .gpu/triton.tar.xz pytriton/tritonserver/bin \
        pytriton/tritonserver/backends/python/libtriton_python.so \
        pytriton/tritonserver/backends/python/triton_python_backend_utils.py \
        pytriton/tritonserver/python_backend_stubs/3.12 $libs
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        -d .gpu/wheels numpy==1.26.4 pydantic-core==2.46.5 pycocotools==2.0.11 python-rapidjson==1.25 regex==2026.11.19
    # pure-Python packages the machine lacks (it has torch, transformers, scipy, scikit-image, OpenCV, grpc)
    (cd "$site" && tar --exclude=__pycache__ -cJf "$OLDPWD/.gpu/pure.tar.xz" \
        rfdetr rfdetr-*.dist-info sam2 sam2-*.dist-info supervision supervision-*.dist-info \
        hydra hydra_core-*.dist-info omegaconf omegaconf-*.dist-info antlr4 antlr4_python3_runtime-*.dist-info \
        iopath iopath-*.dist-info defusedxml defusedxml-*.dist-info deprecate pydeprecate-*.dist-info \
        pydantic pydantic-2*.dist-info annotated_types annotated_types-*.dist-info \
        typing_inspection typing_inspection-*.dist-info typing_extensions.py typing_extensions-*.dist-info \
        tritonclient tritonclient-*.dist-info \
        sam3 sam3-*.dist-info open_clip open_clip_torch-*.dist-info timm timm-*.dist-info einops einops-*.dist-info \
        ftfy ftfy-*.dist-info wcwidth wcwidth-*.dist-info portalocker portalocker-*.dist-info)
    du -sh .gpu
}

setup_env() {
    local env=$1 site=$2 image_site=$3
    python3 -m venv --without-pip "$env"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu/wheels/*.whl
    tar -xJf .gpu/pure.tar.xz -C "$site"
    pwd >"$site/anomaly_repo.pth"
    echo "import site; site.addsitedir('$image_site')" >"$site/zz_machine_site.pth"
    # the machine's packages are built for numpy 2; scipy's Python code uses these numpy-2 names
    printf 'import numpy as np\nfor a, b in (("long", "int_"), ("ulong", "uint"), ("bool", "bool_")):\n    a in np.__dict__ or setattr(np, a, getattr(np, b))\n' >"$site/numpy2_names.py"
    echo "import numpy2_names" >"$site/zzz_numpy2_names.pth"
    mkdir -p .triton/pkgs && tar -xJf .gpu/triton.tar.xz -C .triton/pkgs
}

machine_env() {
    env=${ANOMALY_OFFLINE_ENV:-/tmp/anomaly-env}
    local py_version image_site site
    py_version=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    image_site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
    site=$env/lib/python$py_version/site-packages
    [ -f "$site/zzz_numpy2_names.pth" ] || setup_env "$env" "$site" "$image_site"
    # the 3.12 stub links libpython3.12.so
    export LD_LIBRARY_PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    "$env/bin/python" -c 'import numpy, torch, cv2, scipy, skimage, supervision, tritonclient.grpc, anomaly.pipeline, anomaly.geometry, export, bench.gpu; from rfdetr import RFDETRMedium; from sam2.sam2_image_predictor import SAM2ImagePredictor; print("numpy", numpy.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available())'
    export ALLOW_UNTRAINED_WEIGHTS=${ALLOW_UNTRAINED_WEIGHTS:-1} SAM2_VARIANT=${SAM2_VARIANT:-large}
}

run() {
    machine_env
    # what `make bench-gpu` runs (make may be missing there)
    "$env/bin/python" -m export
    "$env/bin/python" -m bench.gpu "$@"
}

sam3() {
    machine_env
    "$env/bin/python" -m bench.sam3_gpu "$@"
}

compile_check() {
    machine_env
    "$env/bin/python" -m bench.compile_check "$@"
}

coldstart() {
    machine_env
    local repo=/tmp/cold-model-repository log pid
    rm -rf "$repo"
    for start in first restart; do
        log=/tmp/coldstart-$start.log
        RUNPOD_SERVERLESS=false MODEL_REPOSITORY=$repo API_HOST=127.0.0.1 API_PORT=18080 TRITON_HTTP_PORT=18000 \
            TRITON_GRPC_PORT=18001 TRITON_METRICS_PORT=18002 "$env/bin/python" -m runpod_handler.entrypoint >"$log" 2>&1 &
        pid=$!
        for _ in $(seq 600); do
            grep -q "cold start:" "$log" && break
            kill -0 $pid 2>/dev/null || break
            sleep 0.5
        done
        kill -TERM $pid 2>/dev/null; wait $pid || true
        echo "$start: $(grep -o 'cold start:.*' "$log" || tail -5 "$log")"
    done
}

rehearse() {
    # What the lent machine has (../shared/DESIGN.md, "The GPU machine") as far as this machine's registries
    # give it: torch at this machine's cap, no CUDA; psutil and requests, which it had too.
    local standin=${GPU_STANDIN:-/tmp/gpu-machine-standin} python312 copy
    python312=$(for p in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
        "$p" -c 'import sysconfig; assert sysconfig.get_config_var("Py_ENABLE_SHARED")' 2>/dev/null && echo "$p" && break
    done || true)
    [ -n "$python312" ] || { echo "rehearse: needs a Python 3.12 built with libpython3.12.so (Triton's stub links it)" >&2; exit 2; }
    [ -d .gpu ] || { echo "rehearse: run bench/offline_gpu.sh pack first" >&2; exit 2; }
    if [ ! -x "$standin/bin/python3" ]; then
        "$python312" -m venv "$standin"
        "$standin/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 "numpy>=2" scipy==1.18.1 scikit-image \
            opencv-python-headless onnx onnxruntime transformers grpcio protobuf pillow psutil requests
    fi
    copy=$(mktemp -d /tmp/gpu-rehearsal.XXXXXX)
    git archive HEAD | tar -x -C "$copy"
    cp -r .gpu "$copy/"
    echo "rehearsal in $copy (HEAD $(git rev-parse --short HEAD); uncommitted changes are not in it)"
    (cd "$copy" && PATH="$standin/bin:$PATH" ANOMALY_OFFLINE_ENV="$copy/.env" SAM2_VARIANT=tiny OMP_NUM_THREADS=1 \
        bench/offline_gpu.sh run --out "$copy/gpu.json" "$@")
    cd "$copy" && .env/bin/python -c 'import json, sys; from bench.gpu import problems
found = problems(json.load(open(sys.argv[1])))
print("\n".join(["rehearsal: " + p for p in found] or ["rehearsal: clean"])); sys.exit(1 if found else 0)' gpu.json
    cd / && rm -rf "$copy"  # kept for a look when it failed
}

case "${1:-}" in
pack) pack ;;
run) shift; run "$@" ;;
coldstart) coldstart ;;
rehearse) shift; rehearse "$@" ;;
sam3) shift; sam3 "$@" ;;
compile) shift; compile_check "$@" ;;
*) echo "usage: $0 pack | rehearse [bench.gpu arguments] | run [bench.gpu arguments] | coldstart | sam3 [bench.sam3_gpu arguments] | compile [bench.compile_check arguments]" >&2; exit 2 ;;
esac
