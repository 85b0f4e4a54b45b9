"""`<name>_jump`: the exported jump x_s = jump(x_t, t, s[, class_label]) behind Triton.

A Python-backend model around `export.runner` (ONNX Runtime on CPU or CUDA, a TensorRT
engine where one was built). Triton's dynamic batcher (zero queue delay) hands execute()
every request that queued while the previous batch ran; they are concatenated into one
runner call and split again. t, s are per sample, so jumps of different step counts and
of different sampler requests share a batch.

Parameters (config.pbtxt): model_dir (relative to the version dir), backend
(auto | onnxruntime | tensorrt), threads (intra-op threads; 0 = the runtime's default).
"""
import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from fewstep import jump
from fewstep.serving.protocol import InvalidInput, ModelInfo, parse_jump
from fewstep.export.runner import load_runner  # numpy here; onnxruntime and CUDA load with the session (after the GPU pin)


def _params(cfg):
    return {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = _params(cfg)
        model_dir = Path(params.get("model_dir", "model"))
        if not model_dir.is_absolute():
            model_dir = Path(args["model_repository"]) / args["model_version"] / model_dir
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            # one stub process per instance: pin it to its GPU before any CUDA library loads
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args.get("model_instance_device_id", "0"))
            device = "cuda"
        threads = int(params.get("threads", "0") or 0) or None

        self.runner = load_runner(str(model_dir), backend=params.get("backend", "auto") or "auto",
                                  device=device, threads=threads)
        self.info = ModelInfo.from_manifest(self.runner.manifest)
        self.num_classes = self.info.num_classes

    def _read(self, request):
        """The request's inputs, validated like the ensemble's (serving.protocol.parse_jump):
        anyone can call this model, so x, t, s and the label are checked before any work."""
        def get(name):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        return parse_jump(self.info, *(get(i.name) for i in (jump.X, jump.T, jump.S, jump.CLASS_LABEL)))

    def execute(self, requests):
        responses = [None] * len(requests)
        parts, sizes, keep = [], [], []
        for i, request in enumerate(requests):
            try:
                part = self._read(request)
            except InvalidInput as e:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
                continue
            parts.append(part)
            sizes.append(part[0].shape[0])
            keep.append(i)
        if parts:
            x = np.ascontiguousarray(np.concatenate([p[0] for p in parts]), dtype=np.float32)
            t = np.concatenate([p[1] for p in parts]).astype(np.float32)
            s = np.concatenate([p[2] for p in parts]).astype(np.float32)
            labels = np.concatenate([p[3] for p in parts]) if self.num_classes else None
            try:
                out = np.asarray(self.runner(x, t, s, labels), dtype=np.float32)
            except Exception as e:  # noqa: BLE001 - reported to every caller of this batch
                err = pb_utils.TritonError(f"jump failed: {type(e).__name__}: {e}")
                for i in keep:
                    responses[i] = pb_utils.InferenceResponse(error=err)
                return responses
            lo = 0
            for i, n in zip(keep, sizes):
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(jump.OUTPUT.name, np.ascontiguousarray(out[lo:lo + n]))])
                lo += n
        return responses

    def finalize(self):
        self.runner = None
