"""Shared code of the sampler and stream models (runs inside the Triton Python stub)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.protocol import INPUTS, InvalidInput, ModelInfo, chunks


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
    """The request's inputs as numpy copies (tensor memory is freed when execute returns)."""
    out = {}
    for name in INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        out[name] = None if tensor is None else np.array(tensor.as_numpy(), copy=True)
    return out


def invalid(err: InvalidInput | str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err), pb_utils.TritonError.INVALID_ARG))


def internal(msg: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(msg, pb_utils.TritonError.INTERNAL))


def make_jump(args: dict, p: dict, info: ModelInfo):
    """The jump the sampler loop calls: BLS requests to `<name>_jump` (jump_mode "bls", the
    default), or the exported model run in this process (jump_mode "inline": no BLS round
    trip and no process hop per step; ONNX Runtime on the CPU)."""
    if p.get("jump_mode", "bls") == "inline":
        model_dir = Path(args["model_repository"]).parent / p["jump_dir"]
        return LocalJump(model_dir, int(p.get("threads", "0") or 0))
    return JumpClient(p["jump_model"], int(p.get("jump_max_batch", info.max_batch)))


class LocalJump:
    """jump(x, t, s, labels) -> x_s with `export.runner` in this process. ONNX Runtime releases
    the GIL, so the sampler's worker threads run their loops' jumps in parallel."""

    def __init__(self, model_dir, threads: int = 0):
        from export.runner import load_runner

        self.runner = load_runner(str(model_dir), backend="onnxruntime", device="cpu", threads=threads or None)

    def __call__(self, x, t, s, labels=None):
        return self.runner(x, t, s, labels)


class JumpClient:
    """jump(x, t, s, labels) -> x_s as BLS requests to `<name>_jump`, in chunks of its max batch."""

    def __init__(self, model_name: str, max_batch: int):
        self.model_name = model_name
        self.max_batch = max(1, int(max_batch))

    def __call__(self, x, t, s, labels=None):
        x = np.ascontiguousarray(x, dtype=np.float32)
        t = np.asarray(t, dtype=np.float32).reshape(-1, 1)
        s = np.asarray(s, dtype=np.float32).reshape(-1, 1)
        outs = []
        for lo, hi in chunks(x.shape[0], self.max_batch):
            inputs = [pb_utils.Tensor("x", x[lo:hi]), pb_utils.Tensor("t", t[lo:hi]), pb_utils.Tensor("s", s[lo:hi])]
            if labels is not None:
                inputs.append(pb_utils.Tensor("class_label", np.asarray(labels[lo:hi], np.int64).reshape(-1, 1)))
            resp = pb_utils.InferenceRequest(model_name=self.model_name, requested_output_names=["x_s"],
                                             inputs=inputs).exec()
            if resp.has_error():
                raise RuntimeError(f"{self.model_name}: {resp.error().message()}")
            outs.append(np.array(pb_utils.get_output_tensor_by_name(resp, "x_s").as_numpy(), copy=True))
        return outs[0] if len(outs) == 1 else np.concatenate(outs)
