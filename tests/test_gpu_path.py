"""The GPU path, tested where there is no GPU: the sampler's BLS request, the version checks
against the target Triton container, and which ONNX Runtime provider runs the jump.

What needs a GPU, TensorRT or onnxruntime-gpu is faked here at the boundary (the provider
list, GPU presence, the BLS module) and said so; the real runs are scripts/gpu_check.sh's.
"""
from __future__ import annotations

import json
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


# --- the versions a model must match -----------------------------------------------------------------

def _copy_export(src, dest, ir_version=None, engines=None):
    """A copy of an export whose jump.onnx claims another IR version and/or that carries
    TensorRT engine entries (placeholder plans: serving only copies them), rehashed."""
    import shutil

    import onnx

    from fewstep.export.manifest import sha256_file

    shutil.copytree(src, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    if ir_version is not None:
        proto = onnx.load(str(dest / "jump.onnx"))
        proto.ir_version = ir_version
        (dest / "jump.onnx").write_bytes(proto.SerializeToString())
        manifest["files"]["jump.onnx"] = sha256_file(dest / "jump.onnx")
    for e in engines or []:
        (dest / e["file"]).write_bytes(b"placeholder, not a TensorRT plan")
        manifest["files"][e["file"]] = sha256_file(dest / e["file"])
        manifest["engines"] = manifest["engines"] + [e]
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return dest


def _engine(tensorrt: str, gpu: str = "nvidia_h100_80gb_hbm3", max_batch: int = 16):
    return {"file": f"jump.{gpu}.trt{tensorrt}.fp16.plan", "gpu": gpu, "gpu_name": gpu, "tensorrt": tensorrt,
            "precision": "fp16", "min_batch": 1, "opt_batch": 8, "max_batch": max_batch}


@pytest.fixture
def no_container_env(monkeypatch):
    from fewstep.export import runtimes

    monkeypatch.delenv(runtimes.CONTAINER_ENV, raising=False)
    monkeypatch.delenv(runtimes.NVIDIA_RELEASE_ENV, raising=False)


def test_target_container_table_env_and_custom(no_container_env):
    from fewstep.errors import UserError
    from fewstep.export.runtimes import DEFAULT_CONTAINER, target_container

    default = target_container()
    assert default.name == DEFAULT_CONTAINER == "24.10"
    assert (default.tensorrt, default.onnxruntime, default.max_onnx_ir, default.triton) == ("10.5.0", "1.19.2", 10,
                                                                                          "2.51.0")
    assert target_container(environ={"NVIDIA_TRITON_SERVER_VERSION": "24.10"}) == default
    custom = target_container(environ={"FEWSTEP_TRITON_CONTAINER": "tensorrt=10.8.0,onnx-ir=11,name=25.01",
                                       "NVIDIA_TRITON_SERVER_VERSION": "24.10"})  # ours before NVIDIA's
    assert (custom.name, custom.tensorrt, custom.max_onnx_ir) == ("25.01", "10.8.0", 11)
    assert target_container("tensorrt=10.6.0,onnx-ir=10").tensorrt == "10.6.0"  # the option first
    # NVIDIA's image of a release the table does not know: say how to name its versions
    with pytest.raises(UserError, match=r"NVIDIA_TRITON_SERVER_VERSION.*'25\.03' is not in fewstep's table.*"
                                        r"tensorrt=10\.8\.0,onnx-ir=10"):
        target_container(environ={"NVIDIA_TRITON_SERVER_VERSION": "25.03"})
    with pytest.raises(UserError, match="--triton-container"):
        target_container("tensorrt=ten")


def test_onnx_ir_version_is_read_without_onnx(served_model_dirs, tmp_path):
    import onnx

    from fewstep.errors import UserError
    from fewstep.export.runtimes import onnx_ir_version

    src = served_model_dirs["tiny"] / "jump.onnx"
    assert onnx_ir_version(src) == onnx.load(str(src)).ir_version
    # the export records it in the manifest
    assert json.loads((served_model_dirs["tiny"] / "manifest.json").read_text())["jump"]["ir_version"] == \
        onnx_ir_version(src)
    assert onnx_ir_version(_copy_export(served_model_dirs["tiny"], tmp_path / "m", ir_version=11) / "jump.onnx") == 11
    (tmp_path / "not.onnx").write_bytes(b"\x12\x03abc")  # a string field, no ir_version
    with pytest.raises(UserError, match="not an ONNX model"):
        onnx_ir_version(tmp_path / "not.onnx")


def _dry_run(capsys, tmp_path, model, backend, *extra):
    from fewstep.cli import main

    rc = main(["serve", "--dry-run", "--jump-backend", backend, "--repo", str(tmp_path / f"repo-{backend}"),
               "--model", str(model), *extra])
    err = capsys.readouterr().err
    return rc, err


def test_dry_run_refuses_an_onnx_ir_the_container_cannot_read(served_model_dirs, tmp_path, capsys,
                                                             no_container_env):
    rc, err = _dry_run(capsys, tmp_path, served_model_dirs["tiny"], "onnxruntime")  # the export: IR 10
    assert rc == 0, err
    new = _copy_export(served_model_dirs["tiny"], tmp_path / "ir11", ir_version=11)
    rc, err = _dry_run(capsys, tmp_path, new, "onnxruntime")
    lines = [line for line in err.splitlines() if "error" in line]
    assert rc == 2 and len(lines) == 1, err
    assert "IR version 11" in lines[0] and "IR <= 10" in lines[0] and "24.10" in lines[0] and "1.19.2" in lines[0]
    # another container, named by its versions, reads IR 11
    rc, err = _dry_run(capsys, tmp_path, new, "onnxruntime", "--triton-container", "tensorrt=10.8.0,onnx-ir=11")
    assert rc == 0, err


def test_dry_run_refuses_a_plan_of_another_tensorrt(served_model_dirs, tmp_path, capsys, no_container_env,
                                                   monkeypatch):
    ok = _copy_export(served_model_dirs["tiny"], tmp_path / "ok", engines=[_engine("10.5.0.18")])
    rc, err = _dry_run(capsys, tmp_path, ok, "tensorrt")  # 24.10 runs 10.5.0: the build number does not matter
    assert rc == 0, err
    other = _copy_export(served_model_dirs["tiny"], tmp_path / "other", engines=[_engine("10.6.0")])
    rc, err = _dry_run(capsys, tmp_path, other, "tensorrt")
    lines = [line for line in err.splitlines() if "error" in line]
    assert rc == 2 and len(lines) == 1, err
    assert "TensorRT 10.6.0" in lines[0] and "TensorRT 10.5.0" in lines[0] and "24.10" in lines[0]
    assert "tensorrt==10.5.0" in lines[0]
    monkeypatch.setenv("FEWSTEP_TRITON_CONTAINER", "tensorrt=10.6.0,onnx-ir=10")
    rc, err = _dry_run(capsys, tmp_path, other, "tensorrt")
    assert rc == 0, err


def test_the_python_jump_refuses_an_ir_its_onnxruntime_cannot_read(served_model_dirs, tmp_path):
    import onnxruntime as ort

    from fewstep.errors import UserError
    from fewstep.export.runner import load_runner

    assert load_runner(served_model_dirs["tiny"], threads=1).backend == "onnxruntime"
    new = _copy_export(served_model_dirs["tiny"], tmp_path / "ir99", ir_version=99)
    with pytest.raises(UserError) as e:
        load_runner(new, threads=1)
    msg = str(e.value)
    assert "\n" not in msg and "IR version 99" in msg and f"onnxruntime {ort.__version__}" in msg
    assert "IR <= " in msg


def test_the_python_jump_names_both_tensorrt_versions():
    """The in-process TensorRT runner's choice of plan (TensorRT itself is not installed here:
    test_export.py's test_tensorrt_engine runs it on a GPU machine, and skips here)."""
    from fewstep.export.runner import engine_for

    manifest = {"engines": [_engine("10.5.0"), _engine("10.5.0", gpu="nvidia_l4")], "precision": "fp16"}
    engine, why = engine_for(manifest, "NVIDIA H100 80GB HBM3", "10.5.0.18")
    assert why is None and engine["gpu"] == "nvidia_h100_80gb_hbm3"
    engine, why = engine_for(manifest, "NVIDIA H100 80GB HBM3", "10.7.0")
    assert engine is None and "built with TensorRT 10.5.0" in why and "runs TensorRT 10.7.0" in why
    engine, why = engine_for(manifest, "NVIDIA A10G", "10.5.0")
    assert engine is None and "no engine for nvidia_a10g" in why


# --- which provider runs the jump (a GPU and onnxruntime-gpu faked) -----------------------------------

@pytest.fixture
def fake_host(monkeypatch):
    """Set what this host has: a GPU or not, the providers onnxruntime lists, whether the
    onnxruntime-gpu distribution is installed."""
    import onnxruntime as ort

    from fewstep.export import runner
    from fewstep.serving import launcher

    def set_host(gpu: bool, providers: list[str], gpu_dist: str | None = None):
        monkeypatch.setattr(launcher, "gpu_present", lambda: gpu)
        monkeypatch.setattr(ort, "get_available_providers", lambda: list(providers))

        def version(name):
            if name == "onnxruntime-gpu" and gpu_dist:
                return gpu_dist
            raise runner.PackageNotFoundError(name)

        monkeypatch.setattr(runner, "version", version)

    return set_host


CPU_ONLY = ["AzureExecutionProvider", "CPUExecutionProvider"]
WITH_CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _serve_lines(capsys, tmp_path, model, *extra):
    from fewstep.cli import main

    rc = main(["serve", "--dry-run", "--repo", str(tmp_path / "repo"), "--model", str(model), *extra])
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if "runs on" in line or "error" in line]


def test_no_gpu_runs_on_the_cpu_provider_and_a_requested_gpu_is_one_line(served_model_dirs, tmp_path, capsys,
                                                                           fake_host):
    fake_host(gpu=False, providers=CPU_ONLY)
    rc, lines = _serve_lines(capsys, tmp_path, served_model_dirs["tiny"])
    assert rc == 0 and lines == ["tiny: the jump runs on ONNX Runtime's CPUExecutionProvider"]
    rc, lines = _serve_lines(capsys, tmp_path, served_model_dirs["tiny"], "--device", "gpu")
    assert rc == 2 and lines == ["fewstep serve: error: --device gpu: no NVIDIA GPU is visible on this host"]


def test_a_gpu_without_onnxruntime_gpu_is_said(served_model_dirs, tmp_path, capsys, fake_host):
    fake_host(gpu=True, providers=CPU_ONLY)
    rc, lines = _serve_lines(capsys, tmp_path, served_model_dirs["tiny"])  # auto: the CPU, and why
    assert rc == 0 and len(lines) == 1
    assert "CPUExecutionProvider (a GPU is present, but this onnxruntime has no CUDA provider" in lines[0]
    assert "pip install -e '.[gpu]'" in lines[0]
    assert "KIND_CPU" in (tmp_path / "repo" / "tiny_sampler" / "config.pbtxt").read_text()
    rc, lines = _serve_lines(capsys, tmp_path, served_model_dirs["tiny"], "--device", "gpu")
    assert rc == 2 and len(lines) == 1 and "--device gpu: this onnxruntime has no CUDA provider" in lines[0]
    # both builds installed, the CPU one's files on top: say that, not "install onnxruntime-gpu"
    fake_host(gpu=True, providers=CPU_ONLY, gpu_dist="1.31.1")
    rc, lines = _serve_lines(capsys, tmp_path, served_model_dirs["tiny"], "--device", "gpu")
    assert rc == 2 and len(lines) == 1
    assert "onnxruntime-gpu 1.31.1 is installed, but the onnxruntime package here is a CPU build" in lines[0]


def test_a_gpu_with_the_cuda_provider_runs_the_jump_there(served_model_dirs, tmp_path, capsys, fake_host):
    fake_host(gpu=True, providers=WITH_CUDA)
    for extra in ((), ("--device", "gpu")):
        rc, lines = _serve_lines(capsys, tmp_path, served_model_dirs["tiny"], *extra)
        assert rc == 0 and lines == ["tiny: the jump runs on ONNX Runtime's CUDAExecutionProvider on the GPU"]
        assert "kind: KIND_GPU" in (tmp_path / "repo" / "tiny_sampler" / "config.pbtxt").read_text()
    rc, lines = _serve_lines(capsys, tmp_path, served_model_dirs["tiny"], "--device", "cpu")
    assert rc == 0 and lines == ["tiny: the jump runs on ONNX Runtime's CPUExecutionProvider"]


def test_a_cuda_provider_that_does_not_start_is_refused(served_model_dirs, monkeypatch):
    """onnxruntime lists CUDA (faked here) but the session runs without it, as when CUDA or cuDNN
    libraries fail to load: ONNX Runtime would run on the CPU; the runner refuses."""
    import onnxruntime as ort

    from fewstep.errors import UserError
    from fewstep.export.runner import ort_session

    monkeypatch.setattr(ort, "get_available_providers", lambda: list(WITH_CUDA))
    with pytest.raises(UserError, match="could not start its CUDA provider.*not falling back silently"):
        ort_session(served_model_dirs["tiny"] / "jump.onnx", device="cuda", threads=1)


# --- scripts/gpu_check.py: its CPU dry run (the GPU run is the lent host's) ---------------------------

GPU_CHECK = [sys.executable, "scripts/gpu_check.py"]


@pytest.mark.slow  # a subprocess that exports
def test_gpu_check_jump_table_on_the_cpu():
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(GPU_CHECK + ["jump", "--device", "cpu", "--batches", "1,2", "--repeats", "2", "--warmup", "1"],
                         cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "fmnist" in line]
    shipped = sorted(p.name for p in (root / "demo" / "models").iterdir() if (p / "ship.json").is_file())
    assert len(rows) == 2 * len(shipped) >= 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) > 0 and cells[3] == "n/a (CUDA only)"  # eager ms; no CUDA graphs on the CPU


@pytest.mark.slow  # a tritonserver
def test_gpu_check_triton_bls_on_the_cpu(tmp_path):
    """The triton step with the bundled tritonserver (the GPU host gets the slimmed one): the
    product's sampler in BLS mode over a PyTorch jump, against the in-process sampler."""
    import os
    import subprocess
    from pathlib import Path

    from conftest import require_triton

    require_triton()
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(GPU_CHECK + ["triton", "--device", "cpu", "--json", str(tmp_path / "t.json")], cwd=root,
                         capture_output=True, text=True, timeout=400,
                         env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["ok"] and result["kind"] == "KIND_CPU" and result["images"] == 8
    assert result["max_abs_diff_vs_torch"] < 1e-3
    assert result["jump_answered_in_gpu_memory"] is False  # on the CPU the jump answers in CPU memory


def test_demo_refuses_a_missing_gpu_before_exporting(tmp_path, capsys, fake_host):
    pytest.importorskip("gradio", reason="the demo needs gradio (demo extra)")
    from conftest import require_triton
    from fewstep.cli import main

    require_triton()
    fake_host(gpu=False, providers=CPU_ONLY)
    rc = main(["demo", "--device", "gpu", "--cache-dir", str(tmp_path / "cache")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and err == ["fewstep demo: error: --device gpu: no NVIDIA GPU is visible on this host"]
    assert not (tmp_path / "cache").exists()  # said before any export
