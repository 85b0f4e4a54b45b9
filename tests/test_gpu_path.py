"""The GPU path, tested where there is no GPU: the sampler's BLS request, the version checks
against the target Triton container, and which ONNX Runtime provider runs the jump.

What needs a GPU, TensorRT or onnxruntime-gpu is faked here at the boundary (the provider
list, GPU presence, the BLS module) and said so; the real runs are scripts/gpu_check.sh's.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest


# --- the BLS request asks for its output in CPU memory ------------------------------------------------

class _FakeTensor:
    def __init__(self, name, array, memory="CPU"):
        self.name, self.array, self.memory = name, np.asarray(array), memory

    def as_numpy(self):
        if self.memory != "CPU":  # what python_backend's pb_tensor.cc says of a GPU tensor
            raise RuntimeError("Tensor is stored in GPU and cannot be converted to NumPy.")
        return self.array


def _fake_pb_utils(requests: list):
    """triton_python_backend_utils as far as JumpClient uses it. Its `<name>_jump` answers as a
    KIND_GPU jump on a native backend does: x_s in GPU memory unless the request prefers CPU
    (python_backend r24.10, request_executor.cc ResponseAlloc)."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_MEMORY_CPU, pb.TRITONSERVER_MEMORY_GPU = "CPU", "GPU"

    class PreferredMemory:
        def __init__(self, preferred_memory_type, preferred_device_id=0):
            self.type, self.device_id = preferred_memory_type, preferred_device_id

    class Response:
        def __init__(self, out):
            self.out = out

        def has_error(self):
            return False

    class InferenceRequest:
        def __init__(self, **kwargs):
            self.kwargs = kwargs
            requests.append(kwargs)

        def exec(self):
            x = next(t for t in self.kwargs["inputs"] if t.name == "x").array
            pref = self.kwargs.get("preferred_memory")
            memory = pref.type if pref is not None else "GPU"
            return Response(_FakeTensor("x_s", x * 0.5, memory))

    pb.Tensor = _FakeTensor
    pb.PreferredMemory = PreferredMemory
    pb.InferenceRequest = InferenceRequest
    pb.get_output_tensor_by_name = lambda resp, name: resp.out if resp.out.name == name else None
    return pb


def test_bls_jump_request_prefers_cpu_memory(monkeypatch):
    requests: list = []
    fake = _fake_pb_utils(requests)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    from fewstep.serving.models import common

    monkeypatch.setattr(common, "pb_utils", fake)
    jump = common.JumpClient("m_jump", max_batch=2)
    x = np.arange(3 * 4, dtype=np.float32).reshape(3, 4)
    out = jump(x, np.full(3, 0.9), np.full(3, 0.4))
    np.testing.assert_array_equal(out, x * 0.5)
    assert len(requests) == 2  # chunks of the jump's max batch
    for kw in requests:
        assert kw["model_name"] == "m_jump" and kw["requested_output_names"] == ["x_s"]
        pref = kw["preferred_memory"]
        assert (pref.type, pref.device_id) == (fake.TRITONSERVER_MEMORY_CPU, 0)
