"""RF-DETR -> ONNX (dynamic batch) + metadata, into the Triton model repository.

Which weights and classes: anomaly.weights (DETECTOR_WEIGHTS, the official COCO weights, or, only with
ALLOW_UNTRAINED_WEIGHTS=1, an untrained model with the default taxonomy).
"""

from __future__ import annotations

import logging
import shutil
import tempfile

from anomaly.config import Settings
from anomaly.detector import DetectorMetadata, export_files
from anomaly.weights import detector_source, load_detector

log = logging.getLogger(__name__)


def rfdetr_version() -> str:
    from importlib.metadata import version

    return version("rfdetr")


def export_detector(settings: Settings, force: bool = False) -> DetectorMetadata:
    """Export into <model_repository>/detector/1/ unless an export of the same source is already there."""
    onnx_path, meta_path = export_files(settings.model_repository)
    source = detector_source(settings)
    if not force and onnx_path.is_file() and meta_path.is_file():
        current = DetectorMetadata.load(meta_path)
        if current.source == source and current.rfdetr_version == rfdetr_version():
            log.info("detector export is up to date (%s)", onnx_path)
            return current
    model, variant, names, roles, weights, untrained = load_detector(settings)
    source = detector_source(settings)  # the untrained checkpoint may have just been written
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        exported = model.export(output_dir=tmp, dynamic_batch=True, verbose=False)
        shutil.move(str(exported), onnx_path)
    metadata = DetectorMetadata(
        variant=variant,
        resolution=int(model.model.resolution),
        means=list(model.means),
        stds=list(model.stds),
        class_names=names,
        roles=roles,
        num_select=int(getattr(model.model.postprocess, "num_select", 300)),
        weights=weights,
        untrained=untrained,
        rfdetr_version=rfdetr_version(),
        source=source,
    )
    metadata.save(meta_path)
    log.info("exported %s (%s, untrained=%s) to %s", variant, weights, untrained, onnx_path)
    return metadata
