"""Shared fixtures.

`triton_server` (session): a real `tritonserver` (the one nvidia-pytriton bundles) on free
loopback ports, serving a tiny exported model; yields (grpc_url, model_name, model_dir).
The demo and benchmark tests reuse it. It skips when Triton, tritonclient or ONNX
export is unavailable.

The exported test models are real `fewstep export` outputs of random-weight `tiny`
checkpoints. Exporting takes a while on a small CPU, so they are kept in pytest's cache
dir under a hash of the training and export sources (a change there re-exports them);
FEWSTEP_TEST_NO_CACHE=1 always re-exports.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVED_MAX_BATCH = 16
# Tests that start a real tritonserver (through these fixtures) are the long end-to-end lane:
# `make test-fast` (-m "not slow") keeps only the one marked `smoke` among them.
SERVER_FIXTURES = {"served_model_dirs", "triton_stack", "triton_server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("smoke"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op torch thread: the nets under test are tiny, and on a small shared CPU a
    second thread only adds contention (several times slower), beside a Triton server too."""
    import torch  # here, not at the top: collecting the torch-free tests should not load it

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sources_key() -> str:
    h = hashlib.sha256()
    for pattern in ("training/*.py", "training/methods/*.py", "export/*.py", "export/*.json", "fewstep/*.py",
                    "tests/conftest.py"):
        for p in sorted(ROOT.glob(pattern)):
            h.update(p.relative_to(ROOT).as_posix().encode())
            h.update(p.read_bytes())
    try:
        import onnx
        import torch
        h.update(f"{torch.__version__} {onnx.__version__}".encode())
    except ImportError:
        pass
    return h.hexdigest()[:16]


def make_test_checkpoint(root: Path, name: str, data: str = "fmnist", conditional: bool = False,
                         method: str = "rf") -> Path:
    """A random-weight checkpoint (every layer perturbed, so each one matters) of a tiny
    model: `tiny` U-Net at 1x28x28 for images, a small MLP for 2-D data."""
    import torch

    from fewstep.training import checkpoint as ck
    from fewstep.training.build import build_method, build_net, resolve_net_config
    from fewstep.training.config import make_config

    overrides = ["data.conditional=true"] if conditional else []
    if data in ("gmm", "moons", "checkerboard"):
        cfg = make_config(method, data=data, preset="toy", overrides=overrides)
        cfg["net"].update(hidden=32, depth=1)
        resolve_net_config(cfg, (2,), 4)
    else:
        cfg = make_config(method, data=data, preset="tiny", overrides=overrides)
        resolve_net_config(cfg, (1, 28, 28), 10)
    m = build_method(cfg)
    net = build_net(cfg, m)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    sd = net.state_dict()
    return ck.save_checkpoint(root / f"run-{name}", 1, cfg, sd, {str(cfg["train"]["ema"][0]): sd},
                              m.state_tensors())


def _export_models(dest: Path) -> None:
    from fewstep.export.exporter import export_model

    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # tiny: rectified flow, images; toyc: a consistency model (jumps land at t_end, the
    # sampler re-noises between steps) on 2-D data with class labels
    for name, data, cond, method in (("tiny", "fmnist", False, "rf"), ("toyc", "gmm", True, "cd")):
        ckpt = make_test_checkpoint(tmp / "ckpt", name, data=data, conditional=cond, method=method)
        export_model(ckpt, tmp / name, max_batch=SERVED_MAX_BATCH, name=name, parity_steps=2)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


@pytest.fixture(scope="session")
def served_model_dirs(request, tmp_path_factory) -> dict:
    """{"tiny": rf image model dir (unconditional), "toyc": cd 2-D class-conditional model dir, "ckpt": their runs}."""
    pytest.importorskip("onnxruntime", reason="serving tests need onnxruntime (the export extra)")
    pytest.importorskip("onnxscript", reason="serving tests export a model (the export extra)")
    if os.environ.get("FEWSTEP_TEST_NO_CACHE"):
        dest = tmp_path_factory.mktemp("served") / "models"
    else:
        dest = Path(request.config.cache.mkdir("fewstep-served-models")) / _sources_key()
    if not (dest / "tiny" / "manifest.json").is_file() or not (dest / "toyc" / "manifest.json").is_file():
        _export_models(dest)
    return {"tiny": dest / "tiny", "toyc": dest / "toyc", "ckpt": dest / "ckpt"}


def require_triton() -> dict:
    """The bundled tritonserver's paths, or a skip naming why it is missing."""
    from fewstep.errors import UserError
    from fewstep.serving.launcher import find_triton

    try:
        return find_triton()
    except UserError as e:
        pytest.skip(f"no tritonserver: {e}")


@contextlib.contextmanager
def running_server(repo: Path, written: list, timeout: float = 180, **server_args):
    """A real tritonserver on free loopback ports serving what `write_repository` wrote to
    `repo`, its log beside the repository; stopped on exit."""
    from fewstep.serving.launcher import Server

    server = Server(repo, grpc_port=0, http_port=0, metrics_port=0, models=[n for w in written for n in w["models"]],
                    log_file=Path(repo).parent / "tritonserver.log", **server_args)
    server.start(timeout=timeout)
    try:
        yield server
    finally:
        server.stop()


def start_serve(args: list[str], timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """`fewstep serve ARGS` in a session of its own; (the process, what it printed up to its
    "Ctrl-C" ready line, or until it exited or `timeout` passed). The caller stops it."""
    proc = subprocess.Popen([sys.executable, "-m", "fewstep.cli", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C" in line:
            break
    return proc, "".join(lines)


def stop_serve(proc: subprocess.Popen) -> None:
    """SIGKILL of a `start_serve` process group still running (a test's clean-up), and its pipe closed."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    proc.stdout.close()


def raw_infer(url: str, model: str, inputs, outputs=None, headers=None):
    """One request through tritonclient itself, none of our client's checks in the way: inputs
    are (name, array, Triton dtype); returns its InferResult."""
    import tritonclient.grpc as grpcclient  # the serve extra: the tests that call this skip without it

    c = grpcclient.InferenceServerClient(url)
    try:
        ins = []
        for name, arr, dtype in inputs:
            inp = grpcclient.InferInput(name, list(arr.shape), dtype)
            inp.set_data_from_numpy(arr)
            ins.append(inp)
        wanted = None if outputs is None else [grpcclient.InferRequestedOutput(o) for o in outputs]
        return c.infer(model, ins, outputs=wanted, headers=headers, client_timeout=60)
    finally:
        c.close()


@pytest.fixture(scope="session")
def triton_stack(served_model_dirs, tmp_path_factory):
    """The running server: SimpleNamespace(server, url, models, dirs, repo)."""
    pytest.importorskip("tritonclient.grpc", reason="serving tests need tritonclient[grpc] (the serve extra)")
    from fewstep.serving.repository import Options, write_repository

    require_triton()
    repo = tmp_path_factory.mktemp("triton") / "repo"
    written = write_repository(repo, [str(served_model_dirs["tiny"]), str(served_model_dirs["toyc"])],
                               Options(device="cpu", threads=1))
    names = [n for w in written for n in w["models"]]
    with running_server(repo, written) as server:
        yield SimpleNamespace(server=server, url=server.grpc_url, models=names, dirs=served_model_dirs, repo=repo)


@pytest.fixture(scope="session")
def triton_server(triton_stack):
    """(grpc_url, model_name, model_dir) of a tiny unconditional image model behind a real tritonserver."""
    return triton_stack.url, "tiny", triton_stack.dirs["tiny"]
