"""Shared code of the sampler and stream models (runs inside the Triton Python stub)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from fewstep import jump
from fewstep.serving.protocol import INPUTS, InvalidInput, ModelInfo, chunks
from fewstep.export.runner import load_runner  # numpy here; onnxruntime and CUDA load with the session


def params(cfg: dict) -> dict:
    return {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}


def load_info(args: dict) -> tuple[dict, dict, ModelInfo]:
    """(model config, its parameters, ModelInfo from the manifest in the version dir)."""
    cfg = json.loads(args["model_config"])
    p = params(cfg)
    path = Path(args["model_repository"]) / args["model_version"] / p.get("manifest", "manifest.json")
    manifest = json.loads(path.read_text())
    return cfg, p, ModelInfo.from_manifest(manifest, name=p.get("model_name") or None)


def read_inputs(request) -> dict:
    """The request's inputs as numpy copies (tensor memory is freed when execute returns);
    None for each input it lacks. One pass over its tensors (get_input_tensor_by_name would
    walk them once per name)."""
    out = dict.fromkeys(INPUTS)
    for tensor in request.inputs():
        out[tensor.name()] = np.array(tensor.as_numpy(), copy=True)
    return out


def invalid(err: InvalidInput | str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err), pb_utils.TritonError.INVALID_ARG))


def internal(msg: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(msg, pb_utils.TritonError.INTERNAL))


def make_jump(args: dict, p: dict, info: ModelInfo):
    """The jump the sampler loop calls: the exported model run in this process (jump_mode
    "inline": ONNX Runtime on the CPU, or on the instance's GPU for a KIND_GPU instance; no
    BLS round trip and no process hop per step), or BLS requests to `<name>_jump` (jump_mode
    "bls": for a jump on a backend of its own, e.g. TensorRT or the native ONNX Runtime
    backend). `serving.repository.jump_mode` picks the default; docs/PERFORMANCE.md says why."""
    if p.get("jump_mode", "bls") == "inline":
        model_dir = Path(args["model_repository"]).parent / p["jump_dir"]
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            # one stub process per instance: pin it to its GPU before any CUDA library loads
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args.get("model_instance_device_id", "0"))
            device = "cuda"
        return LocalJump(model_dir, int(p.get("threads", "0") or 0), device=device,
                         backend=p.get("backend", "auto") or "auto", max_batch=info.max_batch)
    return JumpClient(p["jump_model"], int(p.get("jump_max_batch", info.max_batch)))


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to max_batch (and max_batch itself): the batch sizes a GPU jump runs."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class LocalJump:
    """jump(x, t, s, labels) -> x_s with `export.runner` in this process.

    On a GPU the batch is padded up to a power of two (`batch_buckets`): each new input
    shape costs cuDNN's algorithm search and a new allocation plan, so the shapes are few
    and all of them are run once by warm()."""

    def __init__(self, model_dir, threads: int = 0, device: str = "cpu", backend: str = "auto", max_batch: int = 64):
        if device == "cpu":
            backend = "onnxruntime"
        self.runner = load_runner(str(model_dir), backend=backend, device=device, threads=threads or None)
        self.device = device
        self.buckets = batch_buckets(max_batch) if device == "cuda" else None

    def __call__(self, x, t, s, labels=None):
        b = x.shape[0]
        if self.buckets is None or b in self.buckets:
            return self.runner(x, t, s, labels)
        n = next(k for k in self.buckets if k >= b)
        pad = lambda a: None if a is None else np.concatenate([a, np.repeat(a[:1], n - b, axis=0)])  # noqa: E731
        return self.runner(pad(x), pad(t), pad(s), pad(labels))[:b]

    def warm(self, info: ModelInfo) -> int:
        """Run each batch size this jump will see once (GPU buckets; on the CPU 1 and the max
        batch); returns the number of calls."""
        sizes = self.buckets or sorted({1, info.max_batch})
        spec = info.spec
        for n in sizes:
            x = np.zeros((n,) + tuple(info.shape), np.float32)
            labels = np.zeros((n,), np.int64) if info.num_classes else None
            self.runner(x, np.full((n,), spec["t_max"], np.float32), np.full((n,), spec["t_end"], np.float32), labels)
        return len(sizes)


class JumpClient:
    """jump(x, t, s, labels) -> x_s as BLS requests to `<name>_jump`, in chunks of its max batch.

    Each request asks for its output in CPU memory (`preferred_memory`): a jump on a GPU
    instance (native onnxruntime / tensorrt backend, KIND_GPU) would otherwise answer with
    x_s in GPU memory, which `as_numpy()` cannot read. On a CPU jump it changes nothing."""

    def __init__(self, model_name: str, max_batch: int):
        self.model_name = model_name
        self.max_batch = max(1, int(max_batch))
        self.output_memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)

    def __call__(self, x, t, s, labels=None):
        feeds = jump.feeds(x, t, s, labels, per_sample_shape=(-1, 1))  # [B, 1]: the config's per-sample dims
        outs = []
        for lo, hi in chunks(feeds[jump.X.name].shape[0], self.max_batch):
            inputs = [pb_utils.Tensor(name, a[lo:hi]) for name, a in feeds.items()]
            resp = pb_utils.InferenceRequest(model_name=self.model_name, requested_output_names=[jump.OUTPUT.name],
                                             inputs=inputs, preferred_memory=self.output_memory).exec()
            if resp.has_error():
                raise RuntimeError(f"{self.model_name}: {resp.error().message()}")
            outs.append(np.array(pb_utils.get_output_tensor_by_name(resp, jump.OUTPUT.name).as_numpy(), copy=True))
        return outs[0] if len(outs) == 1 else np.concatenate(outs)


class JumpCounters:
    """The scheduler's jump calls and image-steps as Triton custom metrics (Prometheus
    counters on the metrics port, labelled by model and instance), so `fewstep bench` and
    a monitor can read jump calls per image-step and the average jump batch.

    flush() is called from the scheduler 50 ms after it goes idle (and about once a second
    while busy): each metric update is a round trip to the server, kept off the path of
    back-to-back requests."""

    CALLS = "fewstep_sampler_jump_calls"
    IMAGE_STEPS = "fewstep_sampler_image_steps"

    def __init__(self, scheduler, model: str, instance: str):
        self.scheduler = scheduler  # a callable returning the scheduler (or None)
        self.sent = (0, 0)
        labels = {"model": model, "instance": instance}
        self.families = (
            pb_utils.MetricFamily(name=self.CALLS, description="jump calls made by the sampler's scheduler",
                                  kind=pb_utils.MetricFamily.COUNTER),
            pb_utils.MetricFamily(name=self.IMAGE_STEPS, description="samples advanced one step by those calls",
                                  kind=pb_utils.MetricFamily.COUNTER))
        self.metrics = tuple(f.Metric(labels=labels) for f in self.families)

    def flush(self) -> None:
        sched = self.scheduler()
        if sched is None:
            return
        now = (sched.calls, sched.image_steps)
        for metric, a, b in zip(self.metrics, now, self.sent):
            if a > b:
                metric.increment(a - b)
        self.sent = now
