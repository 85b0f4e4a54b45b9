"""A TensorRT plan from jump.onnx, through TensorRT's Python API.

One optimisation profile over the batch (min 1, opt, max) shared by all inputs, FP16
when asked, a persistent timing cache (so a rebuild on the same GPU is fast), and an
engine file named after the GPU, the TensorRT version and the precision:
`jump.<gpu>.trt<version>.<precision>.plan`. Where TensorRT or a GPU is missing,
`unavailable_reason()` says so and nothing is built: never a placeholder file.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from fewstep.export.runner import gpu_tag
from fewstep.errors import UserError
from fewstep.files import cache_root

WORKSPACE_BYTES = 4 << 30


def gpu_name() -> str | None:
    """The first GPU's name, from torch (CUDA build) or nvidia-smi; None without a GPU."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30)
            names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
            if out.returncode == 0 and names:
                return names[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def unavailable_reason() -> str | None:
    """Why a TensorRT engine cannot be built here, or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return ("TensorRT is not installed (pip install -e '.[tensorrt]', the target container's TensorRT, on a "
                "machine with an NVIDIA GPU)")
    except Exception as e:  # a broken install (missing CUDA libraries) raises other errors
        return f"TensorRT cannot be imported ({type(e).__name__}: {e})"
    if gpu_name() is None:
        return "no NVIDIA GPU is visible (TensorRT builds engines for the GPU it runs on)"
    return None


def engine_filename(gpu: str, trt_version: str, precision: str) -> str:
    return f"jump.{gpu_tag(gpu)}.trt{trt_version}.{precision}.plan"


def default_timing_cache(gpu: str, trt_version: str) -> Path:
    return cache_root() / "tensorrt" / f"timing.{gpu_tag(gpu)}.trt{trt_version}.cache"


def build_engine(onnx_path, out_dir, input_shapes: dict, precision: str = "fp32", min_batch: int = 1,
                 opt_batch: int = 8, max_batch: int = 64, timing_cache=None,
                 workspace: int = WORKSPACE_BYTES) -> dict:
    """Build and write the plan into out_dir; returns its manifest `engines` entry.

    input_shapes: input name -> per-sample shape (without the batch), of the jump contract's
    inputs (fewstep.jump: `{i.name: i.shape(sample_shape) for i in inputs(num_classes)}`).
    """
    why = unavailable_reason()
    if why:
        raise UserError(f"cannot build a TensorRT engine: {why}")
    import tensorrt as trt

    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UserError(f"TensorRT profile needs 1 <= min <= opt <= max batch, got {min_batch}, {opt_batch}, {max_batch}")
    gpu = gpu_name()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # TensorRT 8: explicit batch is a flag
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {Path(onnx_path).name}: {errs[:400]}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    if precision == "fp16":
        if not getattr(builder, "platform_has_fast_fp16", True):
            raise UserError(f"--precision fp16: this GPU ({gpu}) has no fast FP16")
        config.set_flag(trt.BuilderFlag.FP16)

    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name not in input_shapes:
            raise UserError(f"unexpected ONNX input {tensor.name!r}")
        rest = tuple(int(d) for d in input_shapes[tensor.name])
        profile.set_shape(tensor.name, (min_batch,) + rest, (opt_batch,) + rest, (max_batch,) + rest)
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(gpu, trt.__version__)
    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=True)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError("TensorRT failed to build the engine (see the TensorRT log above)")
    name = engine_filename(gpu, trt.__version__, precision)
    path = Path(out_dir) / name
    path.write_bytes(bytes(plan))

    try:  # keep the timing cache for the next build on this GPU (written atomically)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(cache_path.name + f".tmp{os.getpid()}")
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        os.replace(tmp, cache_path)
    except OSError:
        pass
    return {"file": name, "gpu": gpu_tag(gpu), "gpu_name": gpu, "tensorrt": trt.__version__,
            "precision": precision, "min_batch": int(min_batch), "opt_batch": int(opt_batch),
            "max_batch": int(max_batch)}
