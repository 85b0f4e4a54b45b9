"""Export: ONNX parity for every registered method, sampler parity through ONNX Runtime,
the manifest contract, reproducible re-export, bad inputs, TensorRT (skips without it)."""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fewstep.export import exporter, onnx_export  # noqa: E402
from fewstep.export.exporter import export_model  # noqa: E402
from fewstep.export.manifest import (ManifestError, read_manifest, recommended_steps, sha256_file, step_quality,  # noqa: E402
                             validate)
from fewstep.export.runner import load_runner  # noqa: E402
from fewstep.cli import main as fewstep_main  # noqa: E402
from fewstep.training import checkpoint as ck  # noqa: E402
from fewstep import sampling  # noqa: E402
from fewstep.training.build import build_method, build_net, load_model, resolve_net_config  # noqa: E402
from fewstep.training.config import make_config  # noqa: E402
from fewstep.training.methods import METHODS  # noqa: E402

SHAPE = (1, 28, 28)


def analytic_tables(points: int = 24) -> dict:
    """Analytic-Precond tables built by training.precond from smooth, non-zero statistics
    (what `fewstep precond fit` would measure on a teacher; fitting one is too slow here)."""
    from fewstep.training import precond as P
    lam = P.lambda_grid(points)
    l = 0.4 / (1.0 + np.exp(-lam))                 # l -> 0 at high noise, grows towards the data
    rate = -0.3 * np.exp(-0.5 * (lam - 1.0) ** 2)  # decaying h, as the default "decay" variant keeps
    tables = P.build_tables(lam, l, rate)
    tables["rate_raw"], tables["hh"] = rate, np.ones_like(l)
    return tables


def _use_analytic(method) -> None:
    from fewstep.training import precond as P
    method.precond = P.AnalyticPrecond(analytic_tables())


# Per-method set-up beyond the defaults: (config overrides, hook on the fresh Method object).
# CTM is exported with its analytic tables: the family whose jump carries tables.
SETUP = {"ctm": (["method.precond=analytic"], _use_analytic)}


def make_checkpoint(root: Path, method: str, conditional: bool = False, overrides=(), seed: int = 0) -> Path:
    """A real checkpoint (config + safetensors, written by training.checkpoint) of a `tiny`
    model of `method`, with random weights: parity does not need a trained net, and every
    layer (zero-initialised ones too) is perturbed so that each one matters.
    Methods that keep tensors for sampling (analytic tables) save them as training would."""
    extra, hook = SETUP.get(method, ([], None))
    ov = extra + list(overrides) + (["data.conditional=true"] if conditional else [])
    cfg = make_config(method, preset="tiny", overrides=ov)
    resolve_net_config(cfg, SHAPE, 10)
    m = build_method(cfg)
    if hook is not None:
        hook(m)
    net = build_net(cfg, m)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    sd = net.state_dict()
    emas = {str(d): sd for d in cfg["train"]["ema"][:1]}
    return ck.save_checkpoint(root, 1, cfg, sd, emas, m.state_tensors())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def exported(work):
    """export(method, conditional) -> (checkpoint, model dir, manifest), each exported once."""
    cache = {}

    def get(method, conditional=False):
        key = (method, conditional)
        if key not in cache:
            tag = method + ("-cond" if conditional else "") + "-tiny"
            ckpt = make_checkpoint(work / "ckpts" / tag, method, conditional)
            out = work / "models" / tag
            cache[key] = (ckpt, out, export_model(ckpt, out))
        return cache[key]
    return get


@pytest.fixture(scope="module")
def rf_ckpt(exported):
    return exported("rf")[0]


@pytest.fixture(scope="module")
def rf_model_dir(exported):
    return exported("rf")[1]


def _torch_jump(model, feeds):
    labels = feeds.get("class_label")
    with torch.no_grad():
        return model.jump(torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["t"]), torch.from_numpy(feeds["s"]),
                          None if labels is None else torch.from_numpy(labels)).numpy()


# --- parity for every method in the registry ------------------------------------------------------

def _method_cases():
    cases = []
    for name in sorted(METHODS):
        # one class-conditional case exercises the class_label input (the EDM teacher)
        cases.append(pytest.param(name, name == "edm", id=name + ("-cond" if name == "edm" else "")))
    return cases


@pytest.mark.slow  # an export of every method
@pytest.mark.parametrize("method,conditional", _method_cases())
def test_parity_each_method(exported, method, conditional):
    ckpt, out, manifest = exported(method, conditional)

    # what export wrote validates and matches the method
    assert read_manifest(out) == manifest
    model = load_model(ckpt)
    assert manifest["method"] == method
    assert manifest["sampler"] == model.method.sampler_spec()
    assert manifest["image"] == {"shape": list(SHAPE), "channels": 1, "value_range": [-1.0, 1.0]}
    assert manifest["num_classes"] == (10 if conditional else 0)
    assert manifest["jump"]["inputs"] == ["x", "t", "s"] + (["class_label"] if conditional else [])
    assert manifest["jump"]["opset"] >= 18
    p = manifest["parity"]
    assert 0 <= p["onnx_vs_torch_max_abs"] <= p["tolerance"] <= 1e-2
    assert p["sampler_max_abs"] <= onnx_export.SAMPLER_ATOL
    assert p["sampler_steps"] == min(manifest["sampler"]["default_steps"], onnx_export.MAX_PARITY_STEPS)

    # independent check through the runner, on other inputs and an unseen batch size
    runner = load_runner(out, threads=1)
    feeds = onnx_export.random_inputs(manifest["sampler"], SHAPE, manifest["num_classes"], batch=5, seed=99)
    got = runner(feeds["x"], feeds["t"], feeds["s"], feeds.get("class_label"))
    ref = _torch_jump(model, feeds)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.max(np.abs(got - ref)) <= p["tolerance"]
    # the method's tensors (analytic tables) travel inside the graph: the model dir needs no other file
    assert sorted(os.listdir(out)) == ["jump.onnx", "manifest.json"]


@pytest.mark.slow  # two exports of a CTM student
def test_ctm_analytic_tables_change_the_jump(exported):
    """The ctm case really runs Analytic-Precond (not CTM's own f, g), so its parity covers the tables."""
    import onnx
    from onnx import numpy_helper

    ckpt, out, _ = exported("ctm")
    model = load_model(ckpt)
    assert model.method.opts["precond"] == "analytic"
    # the tables the jump interpolates (l, L, R) are constants of the graph
    inits = [numpy_helper.to_array(i).ravel() for i in onnx.load(str(out / "jump.onnx")).graph.initializer]
    for key in ("precond.l", "precond.L", "precond.R"):
        v = model.method.state_tensors()[key].float().numpy().ravel()
        assert any(a.shape == v.shape and np.allclose(a, v) for a in inits), key
    feeds = onnx_export.random_inputs(model.method.sampler_spec(), SHAPE, 0, batch=4, seed=3)
    analytic = _torch_jump(model, feeds)
    from fewstep.training import precond as P
    model.method.precond = P.make_precond("ctm")
    assert np.max(np.abs(analytic - _torch_jump(model, feeds))) > 1e-3


@pytest.mark.slow  # exports and samples every step count
def test_sampler_parity_through_runner(exported):
    """The shared sampler driven by the runner (ONNX Runtime) gives PyTorch's images for the same
    seeds and step count: EDM (Heun, karras grid), class-conditional, stochastic gamma."""
    ckpt, out, _ = exported("edm", True)
    model = load_model(ckpt)
    runner = load_runner(out, threads=1)
    spec = runner.manifest["sampler"]
    seeds = [5, 17, 3, 8]
    labels = np.array([0, 9, 4, 4], np.int64)
    for steps, gamma in ((1, None), (3, None), (4, 0.5)):
        ref = model.sample(steps, seeds, labels=torch.from_numpy(labels), gamma=gamma).numpy()
        got = sampling.sample(lambda x, t, s: runner(x, t, s, labels), spec, steps, seeds, SHAPE, gamma=gamma)
        assert np.max(np.abs(got - ref)) <= 1e-3, (steps, gamma)
        # as served images: at most one uint8 level apart (rounding at a level boundary)
        assert np.max(np.abs(sampling.to_uint8(got).astype(int) - sampling.to_uint8(ref).astype(int))) <= 1


# --- the manifest ----------------------------------------------------------------------------------

def test_manifest_validates_and_rejects(rf_model_dir):
    m = read_manifest(rf_model_dir)
    schema = json.loads((Path(onnx_export.__file__).with_name("manifest.schema.json")).read_text())
    assert set(schema["required"]) <= set(m)
    assert m["name"] == "rf_tiny" and m["format_version"] == 1
    assert m["files"]["jump.onnx"] == sha256_file(rf_model_dir / "jump.onnx")
    assert m["training"]["step"] == 1 and m["training"]["ema"] == "0.999"
    assert m["training"]["config"]["method"]["name"] == "rf"
    assert m["eval"] is None and m["engines"] == [] and m["solver"] == "euler"

    def broken(edit):
        bad = copy.deepcopy(m)
        edit(bad)
        with pytest.raises(ManifestError):
            validate(bad)

    broken(lambda d: d.pop("sampler"))
    broken(lambda d: d["sampler"].update(process="vp"))
    broken(lambda d: d.update(num_classes=10))          # class_label input missing
    broken(lambda d: d["jump"].update(opset=17))
    broken(lambda d: d.update(name="has space"))
    broken(lambda d: d["files"].update({"jump.onnx": "md5:00"}))
    broken(lambda d: d["image"].update(channels=3))
    # the step counts it was made for: the default alone unless --recommended-steps says more
    assert m["recommended_steps"] == [m["sampler"]["default_steps"]]
    broken(lambda d: d.update(recommended_steps=[]))
    broken(lambda d: d.update(recommended_steps=[2, 1]))                       # not ascending
    broken(lambda d: d.update(recommended_steps=[m["sampler"]["max_steps"] + 1]))
    broken(lambda d: d.update(recommended_steps=[k for k in (1, 2, 3) if k != m["sampler"]["default_steps"]]))
    # the jump contract is fewstep.jump's: a jump of other inputs is refused in one line
    other = copy.deepcopy(m)
    other["jump"]["inputs"] = ["x", "t", "sigma"]
    with pytest.raises(ManifestError) as refused:
        validate(other)
    assert "\n" not in str(refused.value)
    assert "takes (x, t, sigma) -> x_s, but this fewstep speaks (x, t, s) -> x_s" in str(refused.value)
    old = copy.deepcopy(m)
    old.pop("recommended_steps")  # manifests written before the field still read
    validate(old)
    assert recommended_steps(old) == [m["sampler"]["default_steps"]]


def test_serving_refuses_a_jump_contract_it_does_not_speak(rf_model_dir, tmp_path, capsys):
    """`fewstep serve` reads the manifest's jump.inputs: another contract is one line, before any file is written."""
    from fewstep.cli import main

    src = tmp_path / "other"
    shutil.copytree(rf_model_dir, src)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["jump"]["inputs"] = ["x", "t", "s", "guidance"]
    (src / "manifest.json").write_text(json.dumps(manifest))
    assert main(["serve", "--model", str(src), "--repo", str(tmp_path / "repo"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "takes (x, t, s, guidance) -> x_s" in err, err
    assert not (tmp_path / "repo" / "rf_tiny_jump").exists()


def test_step_quality_reads_eval_figures():
    """`fewstep eval` names the metric by its features and keys each result by the quantity; a
    classifier FID is shown only when it was measured on a shipped feature network."""
    from fewstep.figures import SHIPPED_FEATURE_NETS
    sha = SHIPPED_FEATURE_NETS["fmnist"][1]
    ev = {"metric": "fid-classifier", "num": 10000, "features": {"sha256": sha},
          "results": [{"steps": 2, "fid": 153.7, "png": "x.png"}, {"steps": 1, "fid": 192.6}, {"steps": 4}]}
    assert step_quality({"eval": ev}) == {"metric": "fid-classifier", "num": 10000, "features": sha,
                                          "by_steps": {1: 192.6, 2: 153.7}}
    # another network's figures, or the old evaluators' (no network named), are not shown
    assert step_quality({"eval": {**ev, "features": {"sha256": "f" * 64}}}) is None
    assert step_quality({"eval": {k: v for k, v in ev.items() if k != "features"}}) is None
    assert step_quality({"eval": {"metric": "swd", "num": 500, "results": [{"steps": 1, "swd": 0.1}]}})["by_steps"] \
        == {1: 0.1}
    assert step_quality({"eval": None}) is None and step_quality({"eval": {"results": []}}) is None


def test_read_manifest_detects_corruption(work, rf_model_dir):
    import shutil
    bad = work / "corrupt-model"
    shutil.copytree(rf_model_dir, bad)
    data = bytearray((bad / "jump.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "jump.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="hash"):
        read_manifest(bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="unreadable"):
        load_runner(bad)
    with pytest.raises(ManifestError, match="no manifest"):
        read_manifest(work)


def test_runner_checks_inputs(rf_model_dir):
    runner = load_runner(rf_model_dir, backend="onnxruntime", threads=1)
    assert runner.backend == "onnxruntime" and runner.providers == ["CPUExecutionProvider"]
    x = np.zeros((2,) + SHAPE, np.float32)
    t = np.array([1.0, 0.5], np.float32)
    out = runner(x.astype(np.float64), t, t * 0.5)       # float64 is cast to float32
    assert out.dtype == np.float32 and out.shape == x.shape
    with pytest.raises(ValueError, match="x must be"):
        runner(np.zeros((2, 28, 28), np.float32), t, t)
    with pytest.raises(ValueError, match="t and s"):
        runner(x, t[:1], t)
    with pytest.raises(Exception, match="backend"):
        load_runner(rf_model_dir, backend="torch")


# --- reproducible re-export, --force, never a half-written dir ------------------------------------

@pytest.mark.slow  # two more exports
def test_reexport_is_reproducible(rf_ckpt, rf_model_dir, capsys):
    first = read_manifest(rf_model_dir)
    rc = fewstep_main(["export", "--ckpt", str(rf_ckpt), "--out", str(rf_model_dir)])
    assert rc == 2 and "exists" in capsys.readouterr().err          # refused without --force
    rc = fewstep_main(["export", "--ckpt", str(rf_ckpt), "--out", str(rf_model_dir), "--force"])
    assert rc == 0
    second = read_manifest(rf_model_dir)
    assert second["files"] == first["files"]
    assert second["parity"] == first["parity"]
    assert [p.name for p in rf_model_dir.parent.iterdir() if p.name.startswith(".")] == []


def test_parity_failure_is_loud_and_writes_nothing(work, exported, monkeypatch, capsys):
    """A graph that is not the checkpoint's (another rf model's jump.onnx) fails the real parity check."""
    _, other_dir, _ = exported("rf")
    ckpt = make_checkpoint(work / "ckpts" / "rf-other", "rf", seed=1)

    def wrong_graph(model, path, opset=18):
        Path(path).write_bytes((other_dir / "jump.onnx").read_bytes())
        return {"opset": opset, "inputs": ["x", "t", "s"], "output": "x_s"}

    monkeypatch.setattr(exporter, "export_onnx", wrong_graph)  # the name the exporter calls
    out = work / "never"
    rc = fewstep_main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "jumps differ" in err[-1] and "max abs error" in err[-1], err
    assert not out.exists() and not any(p.name.startswith(".never") for p in work.iterdir())


def test_jump_parity_catches_a_wrong_graph(rf_ckpt):
    model = load_model(rf_ckpt)
    ok = onnx_export.jump_parity(model, lambda x, t, s, labels: _torch_jump(model, {"x": x, "t": t, "s": s}))
    assert ok["onnx_vs_torch_max_abs"] == 0.0
    with pytest.raises(onnx_export.ParityError, match="differ"):
        onnx_export.jump_parity(model, lambda x, t, s, labels: _torch_jump(model, {"x": x, "t": t, "s": s * 0.9}))


# --- bad inputs: one line, exit code 2, nothing written -------------------------------------------

def _fails(argv, capsys, *needles):
    rc = fewstep_main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def test_bad_inputs(work, rf_ckpt, capsys):
    import shutil
    bad = work / "bad"
    bad.mkdir()
    out = str(bad / "out")
    _fails(["export", "--ckpt", str(bad / "missing"), "--out", out], capsys, "does not exist")
    _fails(["export", "--ckpt", str(bad), "--out", out], capsys, "no checkpoint")

    corrupt = bad / "corrupt"
    shutil.copytree(rf_ckpt, corrupt)
    (corrupt / "ema-0.999.safetensors").write_bytes(b"\x00garbage" * 10)
    _fails(["export", "--ckpt", str(corrupt), "--out", out], capsys, "corrupt")

    truncated = bad / "truncated"
    shutil.copytree(rf_ckpt, truncated)
    (truncated / "config.json").write_text('{"method": {"name": "rf"')
    _fails(["export", "--ckpt", str(truncated), "--out", out], capsys, "config.json")

    unknown = bad / "unknown"
    shutil.copytree(rf_ckpt, unknown)
    cfg = json.loads((unknown / "config.json").read_text())
    cfg["method"]["name"] = "no-such-method"
    (unknown / "config.json").write_text(json.dumps(cfg))
    _fails(["export", "--ckpt", str(unknown), "--out", out], capsys, "unknown method")

    _fails(["export", "--ckpt", str(rf_ckpt), "--out", out, "--format", "onnx,coreml"], capsys, "--format")
    _fails(["export", "--ckpt", str(rf_ckpt), "--out", out, "--max-batch", "0"], capsys, "--max-batch")
    _fails(["export", "--ckpt", str(rf_ckpt), "--out", out, "--opset", "17"], capsys, "--opset")
    _fails(["export", "--ckpt", str(rf_ckpt), "--out", out, "--recommended-steps", "1,x"], capsys,
           "--recommended-steps takes comma-separated integers")
    _fails(["export", "--ckpt", str(rf_ckpt), "--out", out, "--recommended-steps", "1,2"], capsys,
           "--recommended-steps", "must include sampler.default_steps")

    from fewstep.export.tensorrt_build import unavailable_reason
    why = unavailable_reason()
    if why is not None:  # the usual case on CPU machines: a clear error, nothing written
        err = _fails(["export", "--ckpt", str(rf_ckpt), "--out", out, "--format", "onnx,tensorrt"], capsys,
                     "nothing written")
        assert "TensorRT" in err or "GPU" in err
    assert sorted(p.name for p in bad.iterdir()) == ["corrupt", "truncated", "unknown"]


# --- TensorRT (skips without it) ------------------------------------------------------------------

def test_tensorrt_engine(work, rf_ckpt):
    from fewstep.export.tensorrt_build import unavailable_reason
    why = unavailable_reason()
    if why is not None:
        pytest.skip(why)
    if not torch.cuda.is_available():
        pytest.skip("the TensorRT runner needs a CUDA build of torch")
    out = work / "trt"
    m = export_model(rf_ckpt, out, formats=["onnx", "tensorrt"], precision="fp16", max_batch=16, opt_batch=4)
    (eng,) = m["engines"]
    assert eng["file"].endswith(".fp16.plan") and (out / eng["file"]).stat().st_size > 0
    assert (eng["min_batch"], eng["opt_batch"], eng["max_batch"]) == (1, 4, 16)
    assert m["files"][eng["file"]] == sha256_file(out / eng["file"])
    trt_runner = load_runner(out, backend="tensorrt", device="cuda")
    ort_runner = load_runner(out, backend="onnxruntime")
    feeds = onnx_export.random_inputs(m["sampler"], SHAPE, 0, batch=3)
    a = trt_runner(feeds["x"], feeds["t"], feeds["s"])
    b = ort_runner(feeds["x"], feeds["t"], feeds["s"])
    assert np.max(np.abs(a - b)) < 5e-2
