"""RF-DETR as exported to ONNX: its metadata, an onnxruntime session, and rfdetr's postprocess.

The metadata file (written by `export/`) is the single source of the detector's resolution,
normalisation and classes; nothing on the serving side hard-codes them.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from anomaly.taxonomy import ROLES

log = logging.getLogger(__name__)

ONNX_INPUT = "input"
ONNX_BOXES = "dets"  # (B, Q, 4) normalised cx, cy, w, h
ONNX_LOGITS = "labels"  # (B, Q, slots) class logits


@dataclass
class DetectorMetadata:
    variant: str
    resolution: int
    means: list[float]
    stds: list[float]
    class_names: list[str]  # one per logit slot; "" for a slot that names nothing
    roles: list[str]  # one per logit slot: defect / structure / ignore
    num_select: int = 300
    weights: str = ""
    untrained: bool = False
    rfdetr_version: str = ""
    source: dict = field(default_factory=dict)  # what the export was made from, to skip needless re-exports

    def __post_init__(self):
        if len(self.class_names) != len(self.roles):
            raise ValueError(f"{len(self.class_names)} class names but {len(self.roles)} roles")
        bad = sorted(set(self.roles) - set(ROLES))
        if bad:
            raise ValueError(f"unknown roles {bad}; use {ROLES}")

    @classmethod
    def load(cls, path: str | Path) -> DetectorMetadata:
        with open(path) as f:
            return cls(**json.load(f))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def name(self, class_id: int) -> str:
        if 0 <= class_id < len(self.class_names) and self.class_names[class_id]:
            return self.class_names[class_id]
        return f"class_{class_id}"

    def role(self, class_id: int) -> str:
        return self.roles[class_id] if 0 <= class_id < len(self.roles) else "ignore"

    def classes_with_role(self, role: str) -> list[str]:
        return [n for n, r in zip(self.class_names, self.roles) if r == role]


def export_files(model_repository: Path) -> tuple[Path, Path]:
    """(model.onnx, metadata.json) of the detector export inside a Triton model repository."""
    version_dir = Path(model_repository) / "detector" / "1"
    return version_dir / "model.onnx", version_dir / "metadata.json"


@dataclass
class Detections:
    boxes: np.ndarray  # (N, 4) float32 x_min, y_min, x_max, y_max in image pixels
    scores: np.ndarray  # (N,) float32, descending
    class_ids: np.ndarray  # (N,) int32 logit slot

    def __len__(self) -> int:
        return len(self.scores)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x.astype(np.float32)))).astype(np.float32)


def select_detections(
    boxes_cxcywh: np.ndarray,
    logits: np.ndarray,
    image_hw: tuple[int, int],
    threshold: float,
    num_select: int = 300,
) -> Detections:
    """One image's raw outputs -> detections, as rfdetr's PostProcess and predict() do it: sigmoid over every
    query x class, top-`num_select` of the flattened scores (stable order), boxes scaled to the image and
    clamped, then `score > threshold` (top_above does the two cuts at once)."""
    height, width = image_hw
    prob = _sigmoid(logits).reshape(-1)
    order = top_above(prob, threshold, num_select)
    scores = prob[order]
    slots = logits.shape[-1]
    query, class_ids = order // slots, order % slots
    cx, cy, w, h = np.moveaxis(boxes_cxcywh[query].astype(np.float32), -1, 0)
    xyxy = np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)
    scale = np.array([width, height, width, height], np.float32)
    xyxy = np.clip(xyxy * scale, 0.0, scale)
    return Detections(
        boxes=xyxy.astype(np.float32), scores=scores.astype(np.float32), class_ids=class_ids.astype(np.int32)
    )


def top_above(prob: np.ndarray, threshold: float, k: int) -> np.ndarray:
    """Indices of the scores that are among the `k` largest (ties: the lower index first) and above
    `threshold`, in that order: what a stable sort of all of them, cut at k, then at the threshold, leaves.
    Only the scores above the threshold are sorted (a stable argsort of a frame's 300 x slots scores took most
    of the select step): they rank before every other score, so when k or fewer pass, all of them are in the
    top k, and when more pass, the top k are among them."""
    above = np.flatnonzero(prob > threshold)
    if len(above) > k:
        kth = np.partition(prob[above], len(above) - k)[len(above) - k]  # the k-th largest above the threshold
        above = above[prob[above] >= kth]  # the k largest and any tied with the last of them, in index order
    return above[np.argsort(-prob[above], kind="stable")][:k]


VARIANT_OF_MODEL_NAME = {"RFDETRNano": "nano", "RFDETRSmall": "small", "RFDETRMedium": "medium", "RFDETRLarge": "large"}


def rfdetr_class(variant: str):
    import rfdetr

    return {
        "nano": rfdetr.RFDETRNano,
        "small": rfdetr.RFDETRSmall,
        "medium": rfdetr.RFDETRMedium,
        "large": rfdetr.RFDETRLarge,
    }[variant]


def load_rfdetr(variant: str, weights: str, num_classes: int | None = None):
    """The rfdetr model object for a checkpoint ("coco": the official weights, downloaded into RF_HOME). A checkpoint
    is loaded as it was trained (its resolution, queries and class count: rfdetr's from_checkpoint); one that names
    neither its model nor a known file name is loaded into the variant's default architecture."""
    cls = rfdetr_class(variant)
    if weights == "coco":
        return cls()
    extra = {"num_classes": num_classes} if num_classes else {}
    try:
        return cls.from_checkpoint(weights, trust_checkpoint=True, **extra)
    except ValueError:
        return cls(pretrain_weights=weights, **extra)


# --- which runtime runs RF-DETR ------------------------------------------------------------------------------

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
TRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


@dataclass(frozen=True)
class BackendChoice:
    backend: str  # "onnxruntime" or "torch"
    device: str  # "cuda" or "cpu"
    providers: tuple[str, ...]  # onnxruntime's, best first; empty for torch
    precision: str  # "fp32" or "fp16"
    reason: str  # why this one, for the log, /info and every response
    warning: str = ""  # set when RF-DETR runs on the CPU although a GPU is there or was asked for

    def describe(self) -> dict:
        return asdict(self) | {"providers": list(self.providers)}


def choose_backend(requested: str, device: str, gpu: bool, ort_providers, precision: str = "fp32") -> BackendChoice:
    """DETECTOR_BACKEND, DEVICE, whether torch sees a GPU, onnxruntime's providers and DETECTOR_PRECISION -> what
    runs RF-DETR.

    auto, on a GPU: onnxruntime's TensorRT provider, else its CUDA provider, else the same checkpoint in torch.
    auto on a CPU: onnxruntime. `precision` applies on a GPU where the runtime offers it (TensorRT, torch);
    the CPU and onnxruntime's CUDA provider run fp32. An explicit choice that cannot run here is a start-up
    error."""
    from anomaly.errors import ConfigError

    if requested not in BACKENDS:
        raise ConfigError(f"DETECTOR_BACKEND={requested!r} must be one of {', '.join(BACKENDS)}")
    use_gpu = gpu and device != "cpu"
    trt, cuda = TRT_PROVIDER in ort_providers, CUDA_PROVIDER in ort_providers
    have = ", ".join(ort_providers) or "none"
    no_gpu_warning = "DEVICE=cuda, but no GPU is visible here: RF-DETR runs on the CPU" if device == "cuda" else ""
    on_cpu_warning = (
        f"A GPU is present but RF-DETR runs on the CPU: onnxruntime has no GPU provider ({have}). "
        "Install onnxruntime-gpu, or set DETECTOR_BACKEND=auto or torch to run the checkpoint in torch on the GPU."
    )
    if requested == "tensorrt":
        if not use_gpu:
            raise ConfigError("DETECTOR_BACKEND=tensorrt needs a GPU, and none is in use (DEVICE or no GPU seen)")
        if not trt:
            raise ConfigError(f"DETECTOR_BACKEND=tensorrt needs onnxruntime's {TRT_PROVIDER}; this one has {have}")
        providers = (TRT_PROVIDER, *((CUDA_PROVIDER,) if cuda else ()), CPU_PROVIDER)
        return BackendChoice("onnxruntime", "cuda", providers, precision, "DETECTOR_BACKEND=tensorrt")
    if requested == "torch":
        if use_gpu:
            return BackendChoice("torch", "cuda", (), precision, f"DETECTOR_BACKEND=torch, on the GPU in {precision}")
        return BackendChoice("torch", "cpu", (), "fp32", "DETECTOR_BACKEND=torch; no GPU in use", no_gpu_warning)
    if use_gpu and trt:
        providers = (TRT_PROVIDER, *((CUDA_PROVIDER,) if cuda else ()), CPU_PROVIDER)
        return BackendChoice(
            "onnxruntime", "cuda", providers, precision, f"{requested}: onnxruntime's TensorRT provider"
        )
    if use_gpu and cuda:
        return BackendChoice(
            "onnxruntime", "cuda", (CUDA_PROVIDER, CPU_PROVIDER), "fp32", f"{requested}: onnxruntime's CUDA provider"
        )
    if use_gpu and requested == "auto":
        return BackendChoice(
            "torch",
            "cuda",
            (),
            precision,
            f"auto: onnxruntime has no GPU provider ({have}); the checkpoint runs in torch",
        )
    if use_gpu:  # onnxruntime asked for, without a GPU provider
        return BackendChoice("onnxruntime", "cpu", (CPU_PROVIDER,), "fp32", requested, on_cpu_warning)
    why = "DEVICE=cpu" if device == "cpu" else "no GPU"
    return BackendChoice(
        "onnxruntime", "cpu", (CPU_PROVIDER,), "fp32", f"{requested}: {why}, onnxruntime on the CPU", no_gpu_warning
    )


def onnx_providers(choice: BackendChoice, engine_cache: Path | None = None) -> list:
    """onnxruntime's provider list for a choice; TensorRT engines (FP16 if chosen) are cached in `engine_cache`."""
    from anomaly.hardware import assigned_gpu

    device = {"device_id": assigned_gpu() or 0}  # the instance's own GPU where Triton gave it one (GPUS)
    out: list = []
    for name in choice.providers:
        if name == TRT_PROVIDER:
            options = device | {"trt_fp16_enable": choice.precision == "fp16"}
            if engine_cache is not None:
                engine_cache.mkdir(parents=True, exist_ok=True)
                options |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(engine_cache)}
            out.append((name, options))
        elif name == CUDA_PROVIDER:  # arena grown by what is asked; exact fp32 (no TF32, see TorchDetector)
            out.append((name, device | {"arena_extend_strategy": "kSameAsRequested", "use_tf32": 0}))
        else:
            out.append(name)
    return out


class OnnxDetector:
    """The exported RF-DETR graph in onnxruntime; takes a batch (B, 3, R, R) float32."""

    def __init__(self, onnx_path: str | Path, threads: int, providers: list):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Dynamic batching brings batch sizes 1..8 in any order; onnxruntime's CPU arena keeps every buffer it
        # ever grew for them (RSS 0.4 -> 2 GB and still growing in `make soak`). Without it RSS settles at
        # about 0.86 GB for RF-DETR-M at a few percent of speed.
        options.enable_cpu_mem_arena = False
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        self.providers = self.session.get_providers()

    def __call__(self, batch) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(batch, np.ndarray):  # a torch tensor prepared on the GPU
            batch = batch.float().cpu().numpy()
        boxes, logits = self.session.run([ONNX_BOXES, ONNX_LOGITS], {ONNX_INPUT: batch})
        return boxes, logits


class TorchDetector:
    """The RF-DETR checkpoint the ONNX export was made from, run by torch: the GPU path where onnxruntime has
    no GPU provider. Same graph as the export (rfdetr's export mode), in DETECTOR_PRECISION on a GPU, replayed
    from CUDA graphs (anomaly.cuda_graphs) unless `cuda_graphs` is False."""

    def __init__(
        self,
        meta: DetectorMetadata,
        device: str,
        precision: str,
        max_batch: int = 8,
        threads: int = 0,
        cuda_graphs: bool = True,
    ):
        import torch

        from anomaly.cuda_graphs import GraphedForward, graph_batch_sizes

        if threads and device == "cpu":
            torch.set_num_threads(threads)
        if device == "cuda" and precision == "fp32":
            # TF32 (torch's default for convolutions on Ampere and later) moved untrained RF-DETR scores by
            # up to 0.08 against onnxruntime on the CPU; with it off the two agree to 4e-7 (make bench-gpu,
            # gpu_checks)
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self._torch = torch
        num_classes = meta.source.get("num_classes") if isinstance(meta.source, dict) else None
        net = load_rfdetr(meta.variant, meta.weights, num_classes).model.model
        net.eval()
        net.export()  # forward(images) -> (boxes cxcywh, logits): the graph the ONNX file holds
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.device = torch.device(device)
        self.net = net.to(self.device, self.dtype)
        self.forward = GraphedForward(lambda x: self.net(x)[:2])
        if self.device.type == "cuda" and cuda_graphs:
            # rfdetr builds its spatial-shape tensor from a host copy each forward unless this cache is on
            for module in self.net.modules():
                if hasattr(module, "enable_cuda_graph_capture"):
                    module.enable_cuda_graph_capture()
            shape = (3, meta.resolution, meta.resolution)
            self.forward.capture(shape, self.dtype, self.device, graph_batch_sizes(max_batch), "RF-DETR")
        self.note = self.forward.note

    def __call__(self, batch) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch))
        x = x.to(self.device, self.dtype, non_blocking=True)
        with torch.inference_mode():
            boxes, logits = self.forward(x)
            return boxes.float().cpu().numpy(), logits.float().cpu().numpy()


def _torch_sees_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


class DetectorRunner:
    """The detector step: chooses what runs RF-DETR (choose_backend), prepares each image where the model runs
    (decoded and resized on the GPU for a GPU backend, by the exact numpy path on a CPU), runs batches."""

    def __init__(self, meta: DetectorMetadata, onnx_path: Path, settings, max_batch: int = 8, gpu: bool | None = None):
        import onnxruntime as ort

        from anomaly.hardware import gpu_unseen_warning, has_gpu

        unseen = False
        if gpu is None:  # torch is only imported where there is a GPU: on a CPU the detector runs without it
            present = has_gpu()
            gpu = present and _torch_sees_gpu()
            unseen = present and not gpu and settings.device != "cpu"
        self.meta, self.settings, self.max_batch = meta, settings, max_batch
        self.choice = choose_backend(
            settings.detector_backend, settings.device, gpu, ort.get_available_providers(), settings.detector_precision
        )
        warning = self.choice.warning or (gpu_unseen_warning("RF-DETR") if unseen else "")
        if self.choice.backend == "torch":
            self.model = TorchDetector(
                meta,
                self.choice.device,
                self.choice.precision,
                max_batch,
                settings.compute_threads,
                settings.cuda_graphs,
            )
            runtime = f"torch {self.choice.precision} on {self.choice.device}, {self.model.note}"
        else:
            providers = onnx_providers(self.choice, settings.weights_dir / "trt_cache")
            self.model = OnnxDetector(onnx_path, settings.compute_threads, providers)
            runtime = f"onnxruntime providers {self.model.providers}"
            if self.choice.device == "cuda" and self.model.providers[0] == CPU_PROVIDER:
                warning = f"onnxruntime could not start {self.choice.providers[0]}; RF-DETR runs on the CPU"
        self.input_device = self.choice.device
        self.info = self.choice.describe() | {"runtime": runtime, "warning": warning}
        (log.warning if warning else log.info)(
            "detector: RF-DETR %s, %s (%s)%s",
            meta.variant,
            runtime,
            self.choice.reason,
            f"; {warning}" if warning else "",
        )

    def prepare(self, data: bytes, field: str = "image"):
        """Encoded image -> (model input (3, R, R), (height, width)). Raises InputError naming `field`."""
        inputs, hw = self.prepare_windows(data, None, field)
        return inputs[0](), hw

    def prepare_windows(self, data: bytes, windows, field: str = "image"):
        """Encoded image -> ([for each window, a function making its model input (3, R, R)], (height, width)):
        the image is decoded now (a bad one raises InputError naming `field`); each window (x0, y0, x1, y1 in
        its pixels; None: the whole image) is cut out and prepared as rfdetr prepares one image only when
        run_all reaches its batch, so a tiled photo's ~100 windows (4 MB each) are never all in memory."""
        from anomaly.images import decode_image, decode_to_tensor, rfdetr_input, rfdetr_preprocess

        s, m = self.settings, self.meta
        if self.input_device == "cuda":
            image = decode_to_tensor(data, "cuda", s.max_image_bytes, s.max_image_pixels, field)
            hw = (int(image.shape[1]), int(image.shape[2]))

            def cut(x0, y0, x1, y1):
                return rfdetr_input(image[:, y0:y1, x0:x1], m.resolution, m.means, m.stds)
        else:
            image = decode_image(data, s.max_image_bytes, s.max_image_pixels, field)
            hw = image.shape[:2]

            def cut(x0, y0, x1, y1):
                return rfdetr_preprocess(image[y0:y1, x0:x1], m.resolution, m.means, m.stds)

        windows = windows or [(0, 0, hw[1], hw[0])]
        return [functools.partial(cut, *w) for w in windows], hw

    def run_all(self, inputs: list) -> tuple[np.ndarray, np.ndarray]:
        """prepare_windows' input makers -> (boxes (N, Q, 4), logits (N, Q, slots)), in batches of at most the
        step's batch size (a tiled frame brings dozens of windows), each batch's inputs made just before it runs."""
        parts = [
            self.run([make() for make in inputs[i : i + self.max_batch]]) for i in range(0, len(inputs), self.max_batch)
        ]
        return np.concatenate([b for b, _ in parts]), np.concatenate([lg for _, lg in parts])

    def run_frames(self, frames: list[list]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each frame's input makers (prepare_windows) -> per frame (boxes (W*Q, 4), logits (W*Q, slots)), its
        windows one after another. The windows of all frames go through the model together (run_all)."""
        boxes, logits = self.run_all([make for windows in frames for make in windows])
        bounds = np.cumsum([0] + [len(windows) for windows in frames])
        return [
            (boxes[a:b].reshape(-1, boxes.shape[-1]), logits[a:b].reshape(-1, logits.shape[-1]))
            for a, b in zip(bounds[:-1], bounds[1:])
        ]

    def run(self, inputs: list) -> tuple[np.ndarray, np.ndarray]:
        """Prepared inputs -> (boxes (B, Q, 4) cxcywh, logits (B, Q, slots)), one batch."""
        if isinstance(inputs[0], np.ndarray):
            return self.model(np.stack(inputs))
        import torch

        return self.model(torch.stack(inputs))
