"""RF-DETR as exported to ONNX: its metadata, an onnxruntime session, and rfdetr's postprocess.

The metadata file (written by `export/`) is the single source of the detector's resolution,
normalisation and classes; nothing on the serving side hard-codes them.
"""

from __future__ import annotations

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
    clamped, then `score > threshold`."""
    height, width = image_hw
    prob = _sigmoid(logits).reshape(-1)
    k = min(num_select, prob.size)
    order = np.argsort(-prob, kind="stable")[:k]
    scores = prob[order]
    slots = logits.shape[-1]
    query, class_ids = order // slots, order % slots
    cx, cy, w, h = np.moveaxis(boxes_cxcywh[query].astype(np.float32), -1, 0)
    xyxy = np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)
    scale = np.array([width, height, width, height], np.float32)
    xyxy = np.clip(xyxy * scale, 0.0, scale)
    keep = scores > threshold
    return Detections(
        boxes=xyxy[keep].astype(np.float32),
        scores=scores[keep].astype(np.float32),
        class_ids=class_ids[keep].astype(np.int32),
    )


def rfdetr_class(variant: str):
    import rfdetr

    return {
        "nano": rfdetr.RFDETRNano,
        "small": rfdetr.RFDETRSmall,
        "medium": rfdetr.RFDETRMedium,
        "large": rfdetr.RFDETRLarge,
    }[variant]


def load_rfdetr(variant: str, weights: str, num_classes: int | None = None):
    """The rfdetr model object for a checkpoint ("coco": the official weights, downloaded into RF_HOME)."""
    cls = rfdetr_class(variant)
    if weights == "coco":
        return cls()
    return cls(pretrain_weights=weights, **({"num_classes": num_classes} if num_classes else {}))


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


def choose_backend(requested: str, device: str, gpu: bool, ort_providers) -> BackendChoice:
    """DETECTOR_BACKEND, DEVICE, whether torch sees a GPU and onnxruntime's providers -> what runs RF-DETR.

    auto, on a GPU: onnxruntime's TensorRT provider, else its CUDA provider, else the same checkpoint in torch
    (fp16). auto on a CPU: onnxruntime. An explicit choice that cannot run here is a start-up error."""
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
        return BackendChoice("onnxruntime", "cuda", providers, "fp16", "DETECTOR_BACKEND=tensorrt")
    if requested == "torch":
        if use_gpu:
            return BackendChoice("torch", "cuda", (), "fp16", "DETECTOR_BACKEND=torch, on the GPU in fp16")
        return BackendChoice("torch", "cpu", (), "fp32", "DETECTOR_BACKEND=torch; no GPU in use", no_gpu_warning)
    if use_gpu and trt:
        providers = (TRT_PROVIDER, *((CUDA_PROVIDER,) if cuda else ()), CPU_PROVIDER)
        return BackendChoice("onnxruntime", "cuda", providers, "fp16", f"{requested}: onnxruntime's TensorRT provider")
    if use_gpu and cuda:
        return BackendChoice(
            "onnxruntime", "cuda", (CUDA_PROVIDER, CPU_PROVIDER), "fp32", f"{requested}: onnxruntime's CUDA provider"
        )
    if use_gpu and requested == "auto":
        return BackendChoice(
            "torch", "cuda", (), "fp16", f"auto: onnxruntime has no GPU provider ({have}); the checkpoint runs in torch"
        )
    if use_gpu:  # onnxruntime asked for, without a GPU provider
        return BackendChoice("onnxruntime", "cpu", (CPU_PROVIDER,), "fp32", requested, on_cpu_warning)
    why = "DEVICE=cpu" if device == "cpu" else "no GPU"
    return BackendChoice(
        "onnxruntime", "cpu", (CPU_PROVIDER,), "fp32", f"{requested}: {why}, onnxruntime on the CPU", no_gpu_warning
    )


def onnx_providers(choice: BackendChoice, engine_cache: Path | None = None) -> list:
    """onnxruntime's provider list for a choice; TensorRT builds FP16 engines cached in `engine_cache`."""
    out: list = []
    for name in choice.providers:
        if name == TRT_PROVIDER:
            options = {"trt_fp16_enable": True}
            if engine_cache is not None:
                engine_cache.mkdir(parents=True, exist_ok=True)
                options |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(engine_cache)}
            out.append((name, options))
        elif name == CUDA_PROVIDER:  # grow the GPU arena by what is asked, not by doubling
            out.append((name, {"arena_extend_strategy": "kSameAsRequested"}))
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


def graph_batch_sizes(max_batch: int) -> list[int]:
    """The batch sizes captured as CUDA graphs: powers of two up to the largest batch, and the largest."""
    return sorted({1, *[b for b in (2, 4, 8, 16, 32) if b <= max_batch], max_batch})


def graph_for(sizes, n: int) -> int | None:
    """The smallest captured batch size that holds `n` frames (the rest of it is padding), None for eager."""
    return min((s for s in sizes if s >= n), default=None)


class TorchDetector:
    """The RF-DETR checkpoint the ONNX export was made from, run by torch: the GPU path where onnxruntime has
    no GPU provider. Same graph as the export (rfdetr's export mode), fp16 on a GPU, where each batch size up
    to `max_batch` is replayed from a CUDA graph (RF-DETR-M at batch 1 is launch-bound: a graph removes
    most of the ~10 ms of kernel launches). A graph that cannot be captured leaves that model eager."""

    def __init__(self, meta: DetectorMetadata, device: str, precision: str, max_batch: int = 8, threads: int = 0):
        import torch

        if threads and device == "cpu":
            torch.set_num_threads(threads)
        self._torch = torch
        num_classes = meta.source.get("num_classes") if isinstance(meta.source, dict) else None
        net = load_rfdetr(meta.variant, meta.weights, num_classes).model.model
        net.eval()
        net.export()  # forward(images) -> (boxes cxcywh, logits): the graph the ONNX file holds
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.device = torch.device(device)
        self.net = net.to(self.device, self.dtype)
        self.shape = (3, meta.resolution, meta.resolution)
        self.graphs: dict[int, tuple] = {}
        self.note = ""
        if self.device.type == "cuda":
            self._capture(max_batch)

    def _capture(self, max_batch: int) -> None:
        torch = self._torch
        sizes = graph_batch_sizes(max_batch)
        pool = torch.cuda.graph_pool_handle()
        try:
            with torch.inference_mode():
                for size in sizes:
                    static_in = torch.zeros((size, *self.shape), dtype=self.dtype, device=self.device)
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        for _ in range(3):  # warm-up outside the graph, as capture requires
                            self.net(static_in)
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        static_out = self.net(static_in)
                    self.graphs[size] = (graph, static_in, static_out)
            self.note = f"CUDA graphs for batch sizes {sizes}"
        except Exception as exc:  # noqa: BLE001 - eager still works
            self.graphs.clear()
            self.note = f"eager (CUDA graph capture failed: {type(exc).__name__}: {exc})"
            log.warning("RF-DETR CUDA graph capture failed; running eager: %s", exc)

    def __call__(self, batch) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch))
        x = x.to(self.device, self.dtype, non_blocking=True)
        n = x.shape[0]
        with torch.inference_mode():
            size = graph_for(self.graphs, n)
            if size is None:
                boxes, logits = self.net(x)[:2]
            else:
                graph, static_in, static_out = self.graphs[size]
                static_in[:n].copy_(x)
                graph.replay()
                boxes, logits = (t[:n] for t in static_out[:2])
            return boxes.float().cpu().numpy(), logits.float().cpu().numpy()


def _torch_sees_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


class DetectorRunner:
    """The detector step: chooses what runs RF-DETR (choose_backend), prepares each image where the model runs
    (decoded and resized on the GPU for a GPU backend, by the exact numpy path on a CPU), runs batches."""

    def __init__(self, meta: DetectorMetadata, onnx_path: Path, settings, max_batch: int = 8, gpu: bool | None = None):
        import onnxruntime as ort

        if gpu is None:  # torch is only imported where there is a GPU: on a CPU the detector runs without it
            from anomaly.serving import has_gpu

            gpu = has_gpu() and _torch_sees_gpu()
        self.meta, self.settings = meta, settings
        self.choice = choose_backend(settings.detector_backend, settings.device, gpu, ort.get_available_providers())
        warning = self.choice.warning
        if self.choice.backend == "torch":
            self.model = TorchDetector(
                meta, self.choice.device, self.choice.precision, max_batch, settings.compute_threads
            )
            runtime = self.model.note or f"torch {self.choice.precision} on {self.choice.device}"
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
        from anomaly.images import decode_image, decode_to_tensor, rfdetr_input, rfdetr_preprocess

        s, m = self.settings, self.meta
        if self.input_device == "cuda":
            chw = decode_to_tensor(data, "cuda", s.max_image_bytes, s.max_image_pixels, field)
            return rfdetr_input(chw, m.resolution, m.means, m.stds), (int(chw.shape[1]), int(chw.shape[2]))
        rgb = decode_image(data, s.max_image_bytes, s.max_image_pixels, field)
        return rfdetr_preprocess(rgb, m.resolution, m.means, m.stds), rgb.shape[:2]

    def run(self, inputs: list) -> tuple[np.ndarray, np.ndarray]:
        """Prepared inputs -> (boxes (B, Q, 4) cxcywh, logits (B, Q, slots)), one batch."""
        if isinstance(inputs[0], np.ndarray):
            return self.model(np.stack(inputs))
        import torch

        return self.model(torch.stack(inputs))
