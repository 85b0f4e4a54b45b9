"""`<m>_jump` of scripts/gpu_check.py's triton step: the jump in PyTorch, inside Triton.

A Python-backend model (copied into the repository as 1/model.py) that loads the checkpoint
in 1/model/ and runs the jump on its instance's device. On a GPU (KIND_GPU) it answers x_s
in GPU memory through DLPack, as Triton's native onnxruntime / tensorrt backends do on a
GPU: the case the sampler's BLS request must handle by asking for CPU memory. It says so
once in the server log ("x_s answered in GPU memory"), which the check looks for.
"""
import json
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

from fewstep.export.onnx_export import jump_module
from fewstep.training.build import load_model


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        ema = cfg.get("parameters", {}).get("ema", {}).get("string_value") or None
        self.device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            self.device = f"cuda:{args.get('model_instance_device_id', '0')}"
        model = load_model(Path(args["model_repository"]) / args["model_version"] / "model", ema=ema,
                           device=self.device)
        self.jump = jump_module(model).to(self.device)
        self.conditional = model.num_classes > 0
        self.said = False

    def _input(self, request, name, dtype):
        return torch.from_numpy(pb_utils.get_input_tensor_by_name(request, name).as_numpy()).to(self.device, dtype)

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = [self._input(request, "x", torch.float32), self._input(request, "t", torch.float32).reshape(-1),
                     self._input(request, "s", torch.float32).reshape(-1)]
            if self.conditional:
                feeds.append(self._input(request, "class_label", torch.int64).reshape(-1))
            with torch.inference_mode():
                out = self.jump(*feeds).float().contiguous()
            if out.is_cuda:
                tensor = pb_utils.Tensor.from_dlpack("x_s", to_dlpack(out))
                if not self.said:
                    pb_utils.Logger.log_info(f"x_s answered in GPU memory ({out.device})")
                    self.said = True
            else:
                tensor = pb_utils.Tensor("x_s", out.numpy())
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses
