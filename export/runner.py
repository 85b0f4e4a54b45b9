"""Run the exported jump of a model dir: ONNX Runtime (CPU, CUDA, TensorRT EP) or a TensorRT engine.

    runner = load_runner("models/fmnist")            # backend="auto", device="cpu"
    x_s = runner(x, t, s)                            # labels=... for class-conditional models
    runner.manifest["sampler"]                       # drive fewstep.sampling.sample with it

Serving imports this module: it needs numpy, onnxruntime and jsonschema, not torch
(the TensorRT backend uses torch only for CUDA memory).
"""
from __future__ import annotations

import os
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from fewstep.export.manifest import ManifestError, read_manifest  # noqa: F401  (re-exported)
from fewstep.export.runtimes import onnx_ir_version, plan_refusal, trt_release
from fewstep import jump
from fewstep.errors import UserError
from fewstep.files import cache_root

# The runtimes a jump runs in: the one list of backend names. `load_runner` picks among them
# ("auto"), and serving's native Triton backends are these same two (serving/native_jump.py).
RUNTIMES = ("onnxruntime", "tensorrt")
BACKENDS = ("auto",) + RUNTIMES
DEVICES = ("cpu", "cuda")


def _check_inputs(manifest: dict, x, t, s, labels):
    """Cast and check the four inputs against the manifest; returns numpy arrays."""
    shape = tuple(manifest["image"]["shape"])
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise ValueError(f"x must be float32 [B, {', '.join(map(str, shape))}], got shape {list(x.shape)}")
    b = x.shape[0]
    if b < 1:
        raise ValueError("empty batch")
    t = np.ascontiguousarray(t, dtype=np.float32).reshape(-1)
    s = np.ascontiguousarray(s, dtype=np.float32).reshape(-1)
    if t.shape != (b,) or s.shape != (b,):
        raise ValueError(f"t and s must be float32 [B] with B = {b}, got {list(t.shape)} and {list(s.shape)}")
    if manifest["num_classes"] > 0:
        if labels is None:
            raise ValueError(f"this model is class-conditional ({manifest['num_classes']} classes): pass labels")
        labels = np.ascontiguousarray(labels, dtype=np.int64).reshape(-1)
        if labels.shape != (b,):
            raise ValueError(f"labels must be int64 [B] with B = {b}, got {list(labels.shape)}")
        if labels.min() < 0 or labels.max() >= manifest["num_classes"]:
            raise ValueError(f"labels must be in [0, {manifest['num_classes'] - 1}]")
    else:
        labels = None  # unconditional: labels are ignored
    return x, t, s, labels


class Runner:
    """runner(x, t, s, labels=None) -> x_s (numpy float32). `manifest`, `backend`, `device`."""

    backend = "none"

    def __init__(self, model_dir, manifest: dict, device: str):
        self.model_dir = Path(model_dir)
        self.manifest = manifest
        self.device = device

    def __call__(self, x, t, s, labels=None) -> np.ndarray:
        x, t, s, labels = _check_inputs(self.manifest, x, t, s, labels)
        return self._run(x, t, s, labels)

    def _run(self, x, t, s, labels) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self):
        return f"<{type(self).__name__} {self.manifest['name']} backend={self.backend} device={self.device}>"


# --- ONNX Runtime -----------------------------------------------------------------------------

def ort_session(onnx_path, device: str = "cpu", threads: int | None = None, tensorrt_ep: bool = False,
                fp16: bool = False, cache_dir=None, spinning: bool = False):
    """An InferenceSession tuned for latency: all graph optimisations, sequential execution,
    `threads` intra-op threads (default: ONNX Runtime's, one per physical core) that do not
    spin while idle (spinning=True lets them busy-wait: lower latency on cores of its own)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    # idle intra-op threads sleep instead of spinning: with several Triton instances (or other
    # processes) on the same cores, spinning threads burn the CPU the others need
    # (fmnist jump, 2 threads on 2 busy cores: 33.7 -> 20.6 ms CPU per call; docs/PERFORMANCE.md)
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if threads is not None:
        if int(threads) < 1:
            raise UserError(f"threads must be >= 1, got {threads}")
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    available = ort.get_available_providers()
    if device == "cpu":
        providers = ["CPUExecutionProvider"]
    else:
        why = cuda_provider_problem(available)
        if why:
            raise UserError(f"device 'cuda': {why}")
        if hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from the nvidia-* wheels of onnxruntime-gpu[cuda,cudnn]
            ort.preload_dlls()
        providers = [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE"}), "CPUExecutionProvider"]
        if tensorrt_ep:
            if "TensorrtExecutionProvider" not in available:
                raise UserError("the TensorRT execution provider is not in this onnxruntime build")
            cache = str(cache_dir or cache_root() / "ort-tensorrt")
            os.makedirs(cache, exist_ok=True)
            providers.insert(0, ("TensorrtExecutionProvider", {
                "trt_fp16_enable": bool(fp16), "trt_engine_cache_enable": True,
                "trt_engine_cache_path": cache, "trt_timing_cache_enable": True,
                "trt_timing_cache_path": cache}))
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=so, providers=providers)
    except Exception as e:  # ONNX Runtime raises its own types; an IR it cannot read gets one line
        max_ir = re.search(r"max supported IR version: (\d+)", str(e))
        if max_ir:
            raise UserError(f"{Path(onnx_path).name} is ONNX IR version {onnx_ir_version(onnx_path)}, onnxruntime "
                            f"{ort.__version__} here reads IR <= {max_ir.group(1)}: re-export it, or upgrade "
                            f"onnxruntime") from None
        raise
    if device != "cpu" and "CUDAExecutionProvider" not in session.get_providers():
        # ONNX Runtime drops a provider whose libraries fail to load and runs on the CPU
        raise UserError("ONNX Runtime could not start its CUDA provider (CUDA or cuDNN libraries missing or "
                        "mismatched; its log says which) and would run on the CPU: not falling back silently")
    return session


def cuda_provider_problem(available=None) -> str | None:
    """Why this onnxruntime cannot run a jump on CUDA, or None when it can."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return None
    have = ", ".join(available)
    try:
        gpu_build = version("onnxruntime-gpu")
    except PackageNotFoundError:
        gpu_build = None
    if gpu_build:  # both builds install the `onnxruntime` package: the CPU one's files won
        return (f"onnxruntime-gpu {gpu_build} is installed, but the onnxruntime package here is a CPU build "
                f"({have}): pip uninstall -y onnxruntime onnxruntime-gpu, then pip install -e '.[gpu]'")
    return f"this onnxruntime has no CUDA provider ({have}): pip install -e '.[gpu]' (onnxruntime-gpu)"


class OrtJump:
    """Callable (x, t, s, labels) -> x_s over one ONNX file (used by export's parity checks too)."""

    def __init__(self, onnx_path, device: str = "cpu", threads: int | None = None, **kw):
        self.session = ort_session(onnx_path, device, threads, **kw)
        self.names = [i.name for i in self.session.get_inputs()]
        self.output = self.session.get_outputs()[0].name

    def __call__(self, x, t, s, labels=None) -> np.ndarray:
        feeds = jump.feeds(x, t, s, labels if jump.CLASS_LABEL.name in self.names else None)
        return self.session.run([self.output], feeds)[0]


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, model_dir, manifest, device="cpu", threads=None, tensorrt_ep=False, spinning=False):
        super().__init__(model_dir, manifest, device)
        self.jump = OrtJump(self.model_dir / manifest["jump"]["file"], device, threads, tensorrt_ep=tensorrt_ep,
                            fp16=manifest["precision"] == "fp16", spinning=spinning)
        self.providers = self.jump.session.get_providers()

    def _run(self, x, t, s, labels):
        return self.jump(x, t, s, labels)


# --- TensorRT ---------------------------------------------------------------------------------

def gpu_tag(name: str) -> str:
    """GPU name -> the tag used in engine file names ('NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3')."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "gpu"


def pick_engine(manifest: dict, gpu: str, trt_version: str, precision: str | None = None):
    """The manifest's engine built for this GPU and TensorRT version (preferring `precision`)."""
    hits = [e for e in manifest["engines"]
            if e["gpu"] == gpu_tag(gpu) and trt_release(e["tensorrt"]) == trt_release(trt_version)]
    if precision is not None:
        hits = [e for e in hits if e["precision"] == precision] or hits
    return hits[0] if hits else None


class TensorRTRunner(Runner):
    """A deserialised TensorRT plan; CUDA buffers through torch (a CUDA build of torch is needed)."""

    backend = "tensorrt"

    def __init__(self, model_dir, manifest, engine: dict):
        super().__init__(model_dir, manifest, "cuda")
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise UserError("the TensorRT runner needs a CUDA build of torch and a visible GPU")
        self.torch, self.trt = torch, trt
        self.engine_info = engine
        self.logger = trt.Logger(trt.Logger.WARNING)
        data = (self.model_dir / engine["file"]).read_bytes()
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(data)
        if self.engine is None:
            raise UserError(f"TensorRT could not load {engine['file']} (built for another GPU or TensorRT?)")
        self.context = self.engine.create_execution_context()
        self.max_batch = int(engine["max_batch"])
        self.dtypes = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            self.dtypes[name] = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
        self.stream = torch.cuda.Stream()

    def _run(self, x, t, s, labels):
        torch = self.torch
        b = x.shape[0]
        if b > self.max_batch:
            return np.concatenate([self._run(x[i:i + self.max_batch], t[i:i + self.max_batch],
                                             s[i:i + self.max_batch],
                                             None if labels is None else labels[i:i + self.max_batch])
                                   for i in range(0, b, self.max_batch)])
        feeds = jump.feeds(x, t, s, labels)
        keep = []
        with torch.cuda.stream(self.stream):
            for name, arr in feeds.items():
                dev = torch.from_numpy(np.ascontiguousarray(arr.astype(self.dtypes[name], copy=False))).cuda(non_blocking=False)
                keep.append(dev)
                self.context.set_input_shape(name, tuple(arr.shape))
                self.context.set_tensor_address(name, dev.data_ptr())
            name = jump.OUTPUT.name
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=getattr(torch, str(self.dtypes[name])),
                              device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            self.stream.synchronize()
        return out.float().cpu().numpy()


def tensorrt_engine_here(manifest):
    """(engine entry, None) or (None, reason) for this machine."""
    try:
        import tensorrt as trt
    except ImportError:
        return None, "TensorRT is not installed"
    try:
        import torch
        if not torch.cuda.is_available():
            return None, "no CUDA device visible to torch"
        gpu = torch.cuda.get_device_name(0)
    except ImportError:
        return None, "torch is not installed"
    return engine_for(manifest, gpu, trt.__version__)


def engine_for(manifest: dict, gpu: str, trt_version: str):
    """(engine entry, None) or (None, reason): the model's plan for this GPU and TensorRT."""
    engine = pick_engine(manifest, gpu, trt_version, manifest.get("precision"))
    if engine is not None:
        return engine, None
    same_gpu = [e for e in manifest["engines"] if e["gpu"] == gpu_tag(gpu)]
    if same_gpu:  # built for this GPU, by another TensorRT: name both versions
        return None, plan_refusal(same_gpu[0], trt_version, "this machine")
    have = ", ".join(f"{e['gpu']}/trt{e['tensorrt']}" for e in manifest["engines"]) or "none"
    return None, f"no engine for {gpu_tag(gpu)} with TensorRT {trt_version} (model has: {have})"


def load_runner(model_dir, backend: str = "auto", device: str = "cpu", threads: int | None = None,
                tensorrt_ep: bool = False, verify_files: bool = True, spinning: bool = False) -> Runner:
    """A Runner for an exported model dir.

    backend: "onnxruntime", "tensorrt" (an engine of the model dir built for this GPU and
    TensorRT version), or "auto" (the engine when device is "cuda" and one fits, else ONNX
    Runtime). device: "cpu" or "cuda" (ONNX Runtime's CUDA EP; with tensorrt_ep=True its
    TensorRT EP first). threads: ONNX Runtime intra-op threads (default: one per core).
    spinning: let ONNX Runtime's idle threads busy-wait (default off: cores are often shared).
    """
    if backend not in BACKENDS:
        raise UserError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if device not in DEVICES:
        raise UserError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    manifest = read_manifest(model_dir, verify_files=verify_files)
    if backend == "tensorrt" or (backend == "auto" and device == "cuda"):
        engine, why = tensorrt_engine_here(manifest)
        if engine is not None:
            return TensorRTRunner(model_dir, manifest, engine)
        if backend == "tensorrt":
            raise UserError(f"{model_dir}: cannot run the TensorRT backend: {why}")
    return OnnxRuntimeRunner(model_dir, manifest, device, threads, tensorrt_ep=tensorrt_ep, spinning=spinning)
