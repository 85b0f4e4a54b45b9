"""Beyond one machine (deploy/, docs/deploy.md), checked offline as far as this machine allows.

- The native jump (`fewstep serve --jump-backend onnxruntime|tensorrt`): every generated
  config parses into Triton's ModelConfig protobuf and names files that exist; with only its
  backend swapped for the Python one, the same config (inputs, reshape, batching, warm-up
  files) loads in the real bundled tritonserver and serves the same samples.
- The container's entrypoint and probes against a real tritonserver, including a killed
  Python stub.
- `fewstep serve`'s import path imports no torch (the serving image has none).
- The Dockerfile (hadolint) and the entrypoint (shellcheck).
The Kubernetes manifests: tests/test_k8s.py; multi-node training: tests/test_multinode.py.

Nothing here runs NVIDIA's container or a cluster; docs/deploy.md says what was not run.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fewstep.serving.launcher import free_port
from conftest import require_triton, running_server

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROBE = DEPLOY / "probe.py"


def _model_config(text: str):
    from google.protobuf import text_format
    mc = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient (the serve extra)")
    return text_format.Parse(text, mc.ModelConfig())


def _write(repo, dirs, **opts):
    from fewstep.serving.repository import Options, write_repository
    return write_repository(repo, [str(d) for d in dirs], Options(**opts))


# --- the native jump's configs -------------------------------------------------------------------

@pytest.mark.parametrize("device,kind", [("gpu", "KIND_GPU"), ("auto", "KIND_GPU"), ("cpu", "KIND_CPU")])
def test_native_onnxruntime_configs_parse_and_name_files(served_model_dirs, tmp_path, device, kind):
    import tritonclient.grpc.model_config_pb2 as mc

    repo = tmp_path / "repo"
    _write(repo, [served_model_dirs["tiny"], served_model_dirs["toyc"]], jump_backend="onnxruntime",
           device=device, instances=2, threads=3)
    for name, classes in (("tiny", 0), ("toyc", 4)):
        cfgs = {p.parent.name: _model_config(p.read_text()) for p in repo.glob(f"{name}*/config.pbtxt")}
        assert set(cfgs) == {name, name + "_jump", name + "_sampler", name + "_stream"}
        jump = cfgs[name + "_jump"]
        assert (jump.platform, jump.backend) == ("onnxruntime_onnx", "onnxruntime")
        assert jump.instance_group[0].kind == getattr(mc.ModelInstanceGroup, kind)
        assert jump.instance_group[0].count == 2
        assert jump.HasField("dynamic_batching") and jump.dynamic_batching.max_queue_delay_microseconds == 0
        # intra-op threads matter to a CPU session only
        assert (jump.parameters["intra_op_thread_count"].string_value == "3") == (kind == "KIND_CPU")
        # the file Triton's onnxruntime backend loads: the export's graph, byte for byte
        model_file = repo / (name + "_jump") / "1" / "model.onnx"
        src = served_model_dirs[name] / "jump.onnx"
        assert model_file.read_bytes() == src.read_bytes()
        # inputs and outputs match the graph's, with [B, 1] scalars reshaped to the graph's [B]
        import onnx
        graph = onnx.load(str(src)).graph
        onnx_inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim][1:] for i in graph.input}
        assert [i.name for i in jump.input] == list(onnx_inputs)
        for inp in jump.input:
            reshaped = list(inp.reshape.shape) if inp.HasField("reshape") else list(inp.dims)
            assert reshaped == onnx_inputs[inp.name], inp.name
        assert [o.name for o in jump.output] == [o.name for o in graph.output] == ["x_s"]
        assert list(jump.output[0].dims) == [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim][1:]
        assert jump.max_batch_size == cfgs[name].max_batch_size
        # warm-up: batch 1 to the max batch, data files present with one float each
        sizes = [w.batch_size for w in jump.model_warmup]
        assert sizes[0] == 1 and sizes[-1] == jump.max_batch_size and sizes == sorted(set(sizes))
        for w in jump.model_warmup:
            assert set(w.inputs) == set(onnx_inputs)
            for key, winp in w.inputs.items():
                if winp.input_data_file:
                    data = repo / (name + "_jump") / "warmup" / winp.input_data_file
                    assert data.stat().st_size == 4
        t_max = json.loads((served_model_dirs[name] / "manifest.json").read_text())["sampler"]["t_max"]
        t = np.frombuffer((repo / (name + "_jump") / "warmup" / "t_max").read_bytes(), "<f4")
        assert t[0] == pytest.approx(t_max)
        assert ("class_label" in onnx_inputs) == bool(classes)
        # the sampler still calls it by BLS
        sampler = cfgs[name + "_sampler"]
        assert sampler.parameters["jump_model"].string_value == name + "_jump"
        assert sampler.parameters.get("jump_mode") is None or sampler.parameters["jump_mode"].string_value == "bls"


def _with_plan(src: Path, dest: Path, engines: list[dict]) -> Path:
    """A copy of an export with TensorRT engine entries (placeholder bytes, hashed in the
    manifest): serving only copies the plan, so its content does not matter here."""
    from fewstep.export.manifest import sha256_file
    shutil.copytree(src, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    for e in engines:
        (dest / e["file"]).write_bytes(b"placeholder, not a TensorRT plan: " + e["file"].encode())
        manifest["files"][e["file"]] = sha256_file(dest / e["file"])
    manifest["engines"] = engines
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return dest


def _engine(file="jump.nvidia_h200.trt10.5.0.fp16.plan", min_batch=1, max_batch=16):
    return {"file": file, "gpu": "nvidia_h200", "gpu_name": "NVIDIA H200", "tensorrt": "10.5.0",
            "precision": "fp16", "min_batch": min_batch, "opt_batch": min(8, max_batch), "max_batch": max_batch}


def test_native_tensorrt_config(served_model_dirs, tmp_path):
    import tritonclient.grpc.model_config_pb2 as mc

    from fewstep.errors import UserError
    src = _with_plan(served_model_dirs["tiny"], tmp_path / "tiny", [_engine()])
    repo = tmp_path / "repo"
    _write(repo, [src], jump_backend="tensorrt")
    jump = _model_config((repo / "tiny_jump" / "config.pbtxt").read_text())
    assert (jump.platform, jump.backend) == ("tensorrt_plan", "tensorrt")
    assert jump.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert (repo / "tiny_jump" / "1" / "model.plan").read_bytes() == (src / _engine()["file"]).read_bytes()
    assert "nvidia_h200" in (repo / "tiny_jump" / "config.pbtxt").read_text()  # says which GPU it needs
    with pytest.raises(UserError, match="GPU only"):
        _write(tmp_path / "r2", [src], jump_backend="tensorrt", device="cpu")
    with pytest.raises(UserError, match="no TensorRT engine"):
        _write(tmp_path / "r3", [served_model_dirs["tiny"]], jump_backend="tensorrt")
    two = _with_plan(served_model_dirs["tiny"], tmp_path / "two",
                     [_engine(), _engine("jump.nvidia_l4.trt10.5.0.fp16.plan")])
    with pytest.raises(UserError, match="2 engines"):
        _write(tmp_path / "r4", [two], jump_backend="tensorrt")
    small = _with_plan(served_model_dirs["tiny"], tmp_path / "small", [_engine(max_batch=4)])
    with pytest.raises(UserError, match="--max-batch 16"):
        _write(tmp_path / "r5", [small], jump_backend="tensorrt")


def test_native_backend_cli_errors(served_model_dirs, tmp_path, capsys):
    from fewstep.cli import main
    argv = ["serve", "--model", str(served_model_dirs["tiny"]), "--jump-backend", "onnxruntime"]
    assert main(argv) == 2
    assert "only the Python backend" in capsys.readouterr().err
    assert main(argv + ["--dry-run", "--repo", str(tmp_path / "r"), "--jump", "inline"]) == 2
    assert "use --jump bls" in capsys.readouterr().err
    assert not (tmp_path / "r" / "tiny").exists()
    assert main(argv + ["--dry-run", "--repo", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "tiny_jump" / "1" / "model.onnx").is_file()


# --- the serving image -------------------------------------------------------------------------------

NO_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):  # the serving image has no torch
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("no torch in the serving image")
sys.meta_path.insert(0, NoTorch())
"""


def test_serve_import_path_needs_no_torch(served_model_dirs, tmp_path):
    """`fewstep serve` (CLI, repository writer, launcher, client) and the Triton Python models
    import no torch: the image installs the project without it. Run in a fresh interpreter where
    importing torch fails."""
    from fewstep.serving.launcher import find_triton
    from fewstep.errors import UserError
    try:
        backend_utils = find_triton()["python_backend"]
    except UserError as e:
        pytest.skip(f"no tritonserver: {e}")
    script = NO_TORCH + f"""
from fewstep.cli import main
for backend in ("onnxruntime", "python"):
    assert main(["serve", "--dry-run", "--device", "cpu", "--jump-backend", backend, "--repo",
                 {str(tmp_path)!r} + "/" + backend, "--model", {str(served_model_dirs["tiny"])!r}]) == 0
import fewstep.serving.cli, fewstep.serving.launcher, fewstep.serving.repository, fewstep.serving.native_jump
import fewstep.serving.client, fewstep.serving.protocol
from fewstep.export import runner as export_runner
sys.path.insert(0, {str(backend_utils)!r})  # triton_python_backend_utils, as inside the stub
import fewstep.serving.models.jump, fewstep.serving.models.sampler, fewstep.serving.models.stream
import fewstep.serving.models.common
runner = export_runner.load_runner({str(served_model_dirs["tiny"])!r}, backend="onnxruntime", threads=1)
from fewstep.serving.protocol import ModelInfo, parse_request, run_group
import numpy as np
info = ModelInfo.from_manifest(runner.manifest, name="tiny")
x = run_group(runner, info, parse_request(info, {{"seed": np.array([[1]]), "steps": np.array([[2]])}}))
assert np.isfinite(x).all()
print("torch" in sys.modules, sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False []"
    assert (tmp_path / "onnxruntime" / "tiny_jump" / "1" / "model.onnx").is_file()


def _tool(name: str) -> str:
    path = shutil.which(name) or (str(Path(sys.executable).with_name(name))
                                  if Path(sys.executable).with_name(name).exists() else None)
    if path is None:
        pytest.skip(f"{name} is not installed (the test extra brings it on x86-64 Linux)")
    return path


def test_dockerfile_lints_clean_and_installs_what_it_says():
    """Static checks of deploy/Dockerfile; `make image-test` builds and starts it."""
    import re
    import tomllib
    for dockerfile in (DEPLOY / "Dockerfile", DEPLOY / "standin-base" / "Dockerfile"):
        out = subprocess.run([_tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
    text = (DEPLOY / "Dockerfile").read_text()
    # NVIDIA's image is the default base, swapped only by the build argument
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3(@sha256:[0-9a-f]{64})?", base)
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE_IMAGE}"]
    # every file it copies exists (the build context is the repository root) ...
    copied = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
    for src in copied:
        if "$" not in src:
            assert (ROOT / src).exists(), src
    # ... among them every folder the package maps in, which the build context keeps
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    ignored = {l.strip() for l in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()}
    for folder in {d.split("/")[0] for d in package_dirs.values()}:
        assert f"{folder}/" in copied and folder not in ignored, folder
    for arg in ("MODELS", "WHEELS"):  # the defaults are folders that exist
        default = re.search(rf"^ARG {arg}=(\S+)", text, re.M).group(1)
        assert (ROOT / default).is_dir(), default
    # tini is PID 1 and NVIDIA's entrypoint still runs before ours
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
    assert entry[0].endswith("/tini") and entry[1] == "--"
    assert entry[2:] == ["/opt/nvidia/nvidia_entrypoint.sh", "/opt/fewstep/deploy/entrypoint.sh"]
    # the whole dependency set is locked with hashes and installed with --require-hashes
    run_lines = " ".join(text.replace("\\\n", " ").split())
    assert re.search(r"pip install [^;&]*--require-hashes [^;&]*-r deploy/requirements-image\.lock", run_lines)
    lock = (DEPLOY / "requirements-image.lock").read_text()
    locked = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock, re.M))
    blocks = re.split(r"\n(?=\S)", lock.strip())
    assert all("--hash=sha256:" in b for b in blocks if not b.startswith("#")), "a pin without hashes"
    assert "torch" not in locked and "onnxruntime-gpu" in locked
    for name, version in re.findall(r"^([A-Za-z0-9_.-]+)(?:\[\w+\])?==(\S+)", (DEPLOY / "requirements-image.in").read_text(), re.M):
        assert locked.get(name) == version, f"{name}: the lock has {locked.get(name)}, the .in {version}"


def test_entrypoint_shellchecks_clean():
    out = subprocess.run([_tool("shellcheck"), str(DEPLOY / "entrypoint.sh"),
                          str(DEPLOY / "standin-base" / "nvidia_entrypoint.sh")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


TRITON_WRAPPER = """#!/usr/bin/env bash
# stands in for the container's /opt/tritonserver/bin/tritonserver: the bundled server, with
# the backend directory and environment `fewstep serve` gives it, on the entrypoint's arguments
exec {python} -c '
import os, sys, tempfile
from pathlib import Path
from fewstep.serving.launcher import find_triton, make_backend_dir, server_env
d = make_backend_dir(Path(tempfile.mkdtemp(prefix="fewstep-ep-")) / "backends")
b = str(find_triton()["binary"])
os.execve(b, [b, f"--backend-directory={{d}}"] + sys.argv[1:], server_env())
' "$@"
"""


def test_entrypoint_writes_the_repository_and_runs_triton(served_model_dirs, tmp_path):
    """deploy/entrypoint.sh as the container runs it, with the bundled tritonserver in place of
    the container's (so the jump stays on the Python backend): the repository from /models,
    HTTP off, the admin key restricting the model-repository protocol (with the launcher's
    protocols and header), and the probes passing. gRPC and metrics are moved to loopback
    ports for the test."""
    pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (the serve extra)")
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    from fewstep.errors import UserError
    from fewstep.serving.launcher import find_triton
    try:
        find_triton()
    except UserError as e:
        pytest.skip(f"no tritonserver: {e}")
    bin_dir, models = tmp_path / "bin", tmp_path / "models"
    bin_dir.mkdir()
    (bin_dir / "tritonserver").write_text(TRITON_WRAPPER.format(python=sys.executable))
    (bin_dir / "tritonserver").chmod(0o755)
    (bin_dir / "fewstep").symlink_to(Path(sys.executable).with_name("fewstep"))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "FEWSTEP_MODELS": str(models), "FEWSTEP_REPO": str(tmp_path / "repo"),
           "FEWSTEP_JUMP_BACKEND": "python", "FEWSTEP_DEVICE": "cpu", "FEWSTEP_ADMIN_KEY": "s3cret"}
    models.mkdir()
    empty = subprocess.run([str(DEPLOY / "entrypoint.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "no exported model dir" in empty.stderr
    for name in ("tiny", "toyc"):
        (models / name).symlink_to(served_model_dirs[name])
    grpc_port, metrics_port = free_port(), free_port()
    log = open(tmp_path / "entrypoint.log", "w")
    proc = subprocess.Popen([str(DEPLOY / "entrypoint.sh"), f"--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}",
                             f"--metrics-address=127.0.0.1",
                             f"--metrics-port={metrics_port}"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"127.0.0.1:{grpc_port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            ready = subprocess.run([sys.executable, str(PROBE), "infer", "--url", url, "--repo",
                                    str(tmp_path / "repo")], capture_output=True, text=True, timeout=120)
            if ready.returncode == 0:
                break
            assert proc.poll() is None, (tmp_path / "entrypoint.log").read_text()[-3000:]
            assert time.monotonic() < deadline, ready.stderr
            time.sleep(2)
        text = (tmp_path / "entrypoint.log").read_text()
        assert "Started GRPCInferenceService" in text and "HTTPService" not in text  # HTTP off
        assert {p.name for p in (tmp_path / "repo").iterdir()} == {
            "tiny", "tiny_jump", "tiny_sampler", "tiny_stream", "toyc", "toyc_jump", "toyc_sampler", "toyc_stream"}
        from fewstep.serving.launcher import ADMIN_HEADER, GRPC_ADMIN_HEADER, RESTRICTED
        entry = (DEPLOY / "entrypoint.sh").read_text()
        assert f'--grpc-restricted-protocol="{",".join(RESTRICTED)}:{ADMIN_HEADER}=' in entry
        client = grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        try:
            assert client.is_model_ready("tiny")  # inference-side calls need no key
            with pytest.raises(InferenceServerException):
                client.get_model_repository_index()
            index = client.get_model_repository_index(headers={GRPC_ADMIN_HEADER: "s3cret"}, as_json=True)
            assert {m["name"] for m in index["models"]} >= {"tiny", "toyc_jump"}
        finally:
            client.close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


# --- the native config on a real tritonserver (Python backend swapped in) --------------------------

def _as_python_jump(model_root: Path, export_dir: Path) -> None:
    """Replace only the backend of a native jump config by the Python one (the bundled server
    has no other): inputs, reshape, batching, instances and warm-up stay as generated."""
    from google.protobuf import text_format

    import tritonclient.grpc.model_config_pb2 as mc
    cfg = _model_config((model_root / "config.pbtxt").read_text())
    cfg.platform = ""
    cfg.backend = "python"
    for g in cfg.instance_group:
        g.kind = mc.ModelInstanceGroup.KIND_CPU
    for k, v in {"model_dir": "model", "backend": "onnxruntime", "threads": "1"}.items():
        cfg.parameters[k].string_value = v
    (model_root / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    version = model_root / "1"
    (version / "model.onnx").unlink()
    shutil.copy2(ROOT / "serving" / "models" / "jump.py", version / "model.py")
    shutil.copytree(export_dir, version / "model")


@pytest.fixture(scope="module")
def native_stack(served_model_dirs, tmp_path_factory):
    """A real tritonserver on a repository written with --jump-backend onnxruntime, its jumps
    swapped to the Python backend."""
    pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (the serve extra)")
    require_triton()
    repo = tmp_path_factory.mktemp("native") / "repo"
    written = _write(repo, [served_model_dirs["tiny"], served_model_dirs["toyc"]], jump_backend="onnxruntime",
                     device="gpu")
    for w in written:
        _as_python_jump(repo / (w["name"] + "_jump"), served_model_dirs[w["name"]])
    with running_server(repo, written, timeout=240, log_verbose=1) as server:
        yield server


def test_native_config_loads_warms_and_serves(native_stack, served_model_dirs):
    from fewstep.export.runner import load_runner
    from fewstep.serving.client import Client
    from fewstep.serving.protocol import ModelInfo, parse_request, run_group

    log = Path(native_stack.log_file).read_text(errors="replace")
    # Triton ran every warm-up sample (batch 1 .. max) before it reported the model ready
    for b in (1, 2, 4, 8, 16):
        assert f"running warmup sample 'batch_{b}'" in log
    runner = load_runner(str(served_model_dirs["tiny"]), backend="onnxruntime", threads=1)
    info = ModelInfo.from_manifest(runner.manifest, name="tiny")
    seeds = [3, 4, 5]
    with Client(native_stack.grpc_url) as c:
        got = c.infer("tiny", seeds, 4, outputs=("sample",))["sample"]
        got_c = c.infer("toyc", [7, 8], 2, class_labels=[1, 3], outputs=("sample",))["sample"]
    items = parse_request(info, {"seed": np.array(seeds, np.int64).reshape(-1, 1),
                                 "steps": np.full((3, 1), 4, np.int64)})
    ref = run_group(runner, info, items)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert got_c.shape == (2, 2) and np.isfinite(got_c).all()


# --- gRPC load balancing: the client's round_robin policy ---------------------------------------------

def _inference_count(url: str, model: str) -> int:
    import tritonclient.grpc as grpc
    c = grpc.InferenceServerClient(url)
    try:
        stats = c.get_inference_statistics(model, as_json=True)["model_stats"]
        return int(stats[0].get("inference_count", 0))
    finally:
        c.close()


def test_round_robin_channel_spreads_requests(triton_stack, native_stack):
    """What a headless Service's DNS name gives the client (several addresses): with the
    round_robin policy requests go to every server; with gRPC's default (pick_first) one
    connection takes them all, as it does behind a ClusterIP Service."""
    from fewstep.serving.client import Client, channel_options

    a, b = triton_stack.url, native_stack.grpc_url
    target = f"ipv4:{a},{b}"
    for policy, both in ((None, False), ("round_robin", True)):
        before = [_inference_count(u, "tiny") for u in (a, b)]
        args = {"grpc.lb_policy_name": policy} if policy else None
        sent = 0
        with Client(target, channel_args=args) as c:
            # round_robin uses a subchannel once it is connected: on a busy machine the second
            # may connect a few requests late, so send until both have answered (bounded)
            while sent < 16 or (both and sent < 64 and min(_inference_count(u, "tiny") - n
                                                           for u, n in zip((a, b), before)) == 0):
                c.infer("tiny", [sent], 1, outputs=("sample",))
                sent += 1
        delta = [_inference_count(u, "tiny") - n for u, n in zip((a, b), before)]
        assert sum(delta) == sent
        assert (min(delta) > 0) == both, (policy, delta)
    # the merge keeps tritonclient's defaults (message size) under the extra arguments
    opts = dict(channel_options({"grpc.lb_policy_name": "round_robin"}))
    assert opts["grpc.lb_policy_name"] == "round_robin" and opts["grpc.max_receive_message_length"] > 2 ** 30
    # and a short reconnect backoff, so that a restarted server is found again within a second
    assert dict(channel_options(None))["grpc.max_reconnect_backoff_ms"] == 1000


# --- Triton's metrics behind the autoscaler ----------------------------------------------------------

def _scrape(url: str) -> dict:
    """{(metric, model): value} of a Prometheus text page (Triton's model metrics)."""
    import re
    import urllib.request
    out = {}
    with urllib.request.urlopen(url, timeout=10) as r:
        for line in r.read().decode().splitlines():
            m = re.match(r'^(nv_inference_\w+)\{([^}]*)\}\s+(\S+)$', line)
            if m:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
                if "model" in labels:
                    out[(m.group(1), labels["model"])] = float(m.group(3))
    return out


def test_autoscaling_series_exist_and_mean_requests_in_flight(native_stack):
    """The adapter rules' series exist in the real server's metrics with the `model` labels
    their filters rely on, and the ensemble's request-duration counter grows by the time the
    requests spent in the server (so its rate is the requests in flight)."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    import yaml

    from fewstep.serving.client import Client
    rules = yaml.safe_load((DEPLOY / "k8s" / "monitoring" / "prometheus-adapter-values.yaml")
                           .read_text())["rules"]["custom"]
    used = {n for r in rules for n in re.findall(r"nv_inference_\w+", r["seriesQuery"] + r["metricsQuery"])}
    assert used == {"nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                    "nv_inference_compute_infer_duration_us"}
    before = _scrape(native_stack.metrics_url)
    models = {m for _, m in before}
    assert {"tiny", "tiny_jump", "tiny_sampler", "tiny_stream"} <= models
    for name in used:
        assert (name, "tiny_jump") in before and (name, "tiny") in before, name
    ensembles = [m for m in models if not re.fullmatch(r".+_(jump|sampler|stream)", m)]
    assert sorted(ensembles) == ["tiny", "toyc"]

    def one(seed):
        t0 = time.perf_counter()
        with Client(native_stack.grpc_url) as c:
            c.infer("tiny", [seed], 4, outputs=("sample",))
        return time.perf_counter() - t0

    with ThreadPoolExecutor(4) as pool:
        client_s = sum(pool.map(one, range(8)))
    after = _scrape(native_stack.metrics_url)
    server_s = (after[("nv_inference_request_duration_us", "tiny")]
                - before[("nv_inference_request_duration_us", "tiny")]) / 1e6
    # the server's time is the client's minus the network and client overhead
    assert 0.3 * client_s < server_s <= client_s, (server_s, client_s)
    assert after[("nv_inference_compute_infer_duration_us", "tiny_jump")] > \
        before[("nv_inference_compute_infer_duration_us", "tiny_jump")]


# --- the container's probes ------------------------------------------------------------------------

def _probe(server, mode: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROBE), mode, "--url", server.grpc_url, "--repo", str(server.repo),
                           "--timeout", str(timeout)], capture_output=True, text=True, timeout=120)


def _stub_pid(server, model: str) -> int:
    for pid in server.pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"triton_python_backend_stub" in c for c in cmd) and any(f"/{model}/1/model.py".encode() in c for c in cmd):
            return pid
    raise AssertionError(f"no stub process for {model}")


def test_probes_see_a_dead_model(native_stack, tmp_path):
    ok = _probe(native_stack, "ready")
    assert ok.returncode == 0, ok.stderr
    ok = _probe(native_stack, "infer")
    assert ok.returncode == 0, ok.stderr
    # a repository with a model the server does not have is not ready
    bad_repo = tmp_path / "repo"
    shutil.copytree(native_stack.repo / "tiny", bad_repo / "tiny")
    (bad_repo / "absent").mkdir()
    (bad_repo / "absent" / "config.pbtxt").write_text('name: "absent"\n')
    bad = subprocess.run([sys.executable, str(PROBE), "ready", "--url", native_stack.grpc_url, "--repo",
                          str(bad_repo)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "absent not ready" in bad.stderr
    # kill -9 the sampler's Python stub: the request-level probe must fail (the startup probe's check;
    # the liveness probe, `probe.py live`: tests/test_probes.py); the ready endpoints of Triton 2.51
    # may still say ready (docs/deploy.md)
    os.kill(_stub_pid(native_stack, "tiny_sampler"), signal.SIGKILL)
    time.sleep(1.0)
    dead = _probe(native_stack, "infer", timeout=5)
    assert dead.returncode == 1 and "tiny" in dead.stderr, dead.stderr
    ready = _probe(native_stack, "ready")
    print(f"after a killed stub: ready probe exit {ready.returncode} ({ready.stderr.strip() or 'ready'})")
    # unreachable server
    gone = subprocess.run([sys.executable, str(PROBE), "ready", "--url", f"127.0.0.1:{free_port()}",
                           "--repo", str(native_stack.repo), "--timeout", "2"], capture_output=True, text=True,
                          timeout=60)
    assert gone.returncode == 1 and "unhealthy" in gone.stderr
