"""The shared training loop: config overrides, atomic checkpoints, exact resume, DDP, CLI errors."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fewstep.cli import main
from fewstep.errors import UserError
from fewstep.training import checkpoint as ck
from fewstep.training.config import apply_override, make_config

TOY = ["--data", "gmm", "--preset", "toy", "--no-progress", "net.hidden=32", "net.depth=2",
       "train.batch=64", "train.sample_every=0", "train.log_every=1"]


def train(tmp, *extra, method="rf"):
    return main(["train", "--method", method, "--out", str(tmp), *TOY, *extra])


def test_overrides_types_and_errors():
    cfg = make_config("rf", data="gmm")
    apply_override(cfg, "lr=1e-3")
    apply_override(cfg, "train.ema=[0.9,0.99]")
    apply_override(cfg, "method.solver=heun")
    apply_override(cfg, "ema=0.5")
    assert cfg["train"]["lr"] == 1e-3 and cfg["method"]["solver"] == "heun" and cfg["train"]["ema"] == [0.5]
    for bad in ("nope=1", "train.nope=1", "lr", "lr=fast", "bf16=3"):
        with pytest.raises(UserError):
            apply_override(cfg, bad)
    with pytest.raises(UserError, match="unknown method"):
        make_config("nomethod")
    with pytest.raises(UserError, match="unknown preset"):
        make_config("rf", preset="huge")


def test_checkpoint_is_atomic_and_keeps_last_k(tmp_path):
    sd = {"w": torch.arange(4.0)}
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, step, {"method": {"name": "rf"}, "net": {}}, sd, {"0.9": sd}, keep=2)
    names = [p.name for p in ck.list_checkpoints(tmp_path)]
    assert names == ["step-0000003", "step-0000004"]
    # a half-written checkpoint (temp dir) is never picked up
    (tmp_path / "checkpoints" / ".tmp-step-0000009").mkdir()
    assert ck.find_checkpoint(tmp_path).name == "step-0000004"
    assert torch.equal(load_file(str(ck.find_checkpoint(tmp_path) / "ema-0.9.safetensors"))["w"], sd["w"])
    # a checkpoint dir that keeps only an EMA (shipped, or copied back from a GPU run) is one too
    only_ema = tmp_path / "only-ema"
    shutil.copytree(ck.find_checkpoint(tmp_path), only_ema)
    (only_ema / "model.safetensors").unlink()
    assert ck.find_checkpoint(only_ema) == only_ema


@pytest.mark.parametrize("optimizer", ["adam", "radam"])   # radam: the cd / ctm default (sony/ctm's)
def test_resume_continues_exactly(tmp_path, optimizer):
    a, b = tmp_path / "a", tmp_path / "b"
    opt = f"train.optimizer={optimizer}"
    assert train(a, "--iters", "12", "train.ckpt_every=6", "train.keep=5", opt) == 0
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step-0000012")
    # b's log still holds steps 7-12: the resumed run replaces them, not appends to them
    assert train(b, "--iters", "12", "train.ckpt_every=6", "train.keep=5", "--resume", opt) == 0
    la = [json.loads(l)["loss"] for l in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (b / "metrics.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 12
    for f in ("model.safetensors", "ema-0.999.safetensors"):
        wa = load_file(str(a / "checkpoints/step-0000012" / f))
        wb = load_file(str(b / "checkpoints/step-0000012" / f))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ema_warmup(tmp_path):
    from fewstep.training.loop import ema_decay
    assert ema_decay(0.999, 0, True) == pytest.approx(0.1)
    assert ema_decay(0.999, 90, True) == pytest.approx(0.91)
    assert ema_decay(0.999, 20000, True) == 0.999 and ema_decay(0.999, 0, False) == 0.999
    # one step from the same initial weights: the EMA sits 0.1 (warm-up) or 0.999 (plain) of
    # the way back from the online weights towards the initial ones
    dist = {}
    for warm in ("true", "false"):
        run = tmp_path / warm
        assert train(run, "--iters", "1", f"train.ema_warmup={warm}") == 0
        c = ck.find_checkpoint(run)
        w, e = load_file(str(c / "model.safetensors")), load_file(str(c / "ema-0.999.safetensors"))
        dist[warm] = sum(((e[k] - w[k]).double() ** 2).sum() for k in w).sqrt().item()
    assert dist["true"] / dist["false"] == pytest.approx(0.1 / 0.999, rel=1e-3)


def test_debias_ema_recovers_the_trained_average(tmp_path):
    """fewstep.training.debias_ema (scripts/debias_ema.py) rebuilds the initial weights from the config and seed: after one
    plain-EMA step (0.9 init + 0.1 online) the corrected EMA is exactly the online weights,
    after three it is their (1, d, d^2)-weighted average."""
    from fewstep.training import debias_ema as mod

    run = tmp_path / "plain"
    assert train(run, "--iters", "3", "train.ckpt_every=1", "train.keep=5", "train.ema=[0.9]",
                 "train.ema_warmup=false", "train.warmup=0", "train.lr=0.01") == 0
    online = [load_file(str(run / f"checkpoints/step-000000{i}/model.safetensors")) for i in (1, 2, 3)]
    for n in (1, 3):
        out = mod.debias(run / f"checkpoints/step-000000{n}", "0.9", tmp_path / f"fixed{n}")
        fixed = load_file(str(out / "ema-0.9.safetensors"))
        w = [0.9 ** (n - 1 - i) for i in range(n)]
        for k, v in fixed.items():
            want = sum(wi * o[k] for wi, o in zip(w, online[:n])) / sum(w)
            assert torch.allclose(v, want, atol=1e-5), k
    plain = load_file(str(run / "checkpoints/step-0000001/ema-0.9.safetensors"))
    assert any((plain[k] - online[0][k]).abs().max() > 1e-3 for k in plain)  # the plain EMA is not
    assert main(["eval", "--ckpt", str(tmp_path / "fixed3"), "--steps", "1", "--num", "50", "--no-progress"]) == 0
    warm = tmp_path / "warm"
    assert train(warm, "--iters", "1") == 0
    with pytest.raises(UserError, match="warm-up"):
        mod.debias(warm, "0.999", tmp_path / "x")


def test_resume_of_a_run_older_than_an_option(tmp_path, capsys):
    """A run saved before a net option existed resumes (it was built with the default);
    changing an option the run does record is refused."""
    run = tmp_path / "old"
    assert train(run, "--iters", "4", "train.ckpt_every=2", "train.keep=5") == 0
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    cfg_file = run / "checkpoints" / "step-0000002" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["net"]["norm"]                       # as if saved before the option was added
    cfg_file.write_text(json.dumps(cfg))
    assert train(run, "--iters", "4", "--resume") == 0
    resumed = ck.read_config(ck.find_checkpoint(run))
    assert resumed["step"] == 4 and "norm" not in resumed["net"]  # built as the run was: the default
    assert train(run, "--iters", "6", "--resume", "net.hidden=64") == 2
    assert "net.hidden" in capsys.readouterr().err


def test_time_limit_stops_with_a_checkpoint_and_resumes(tmp_path, capsys):
    """train.time_limit ends a run long before --iters, with a checkpoint that --resume continues."""
    run = tmp_path / "run"
    assert train(run, "--iters", "1000000", "train.time_limit=0.001", "train.ema=[0.0,0.999]") == 0
    assert "train.time_limit" in capsys.readouterr().err
    first = ck.list_checkpoints(run)[-1]
    step = int(ck.read_config(first)["step"])
    assert 1 <= step < 1000000
    # EMA decay 0 follows the online weights exactly (the fused update's direction)
    w, e = load_file(str(first / "model.safetensors")), load_file(str(first / "ema-0.0.safetensors"))
    assert all(torch.equal(w[k], e[k]) for k in w)
    assert train(run, "--iters", "1000000", "train.time_limit=0.001", "train.ema=[0.0,0.999]", "--resume") == 0
    assert int(ck.read_config(ck.list_checkpoints(run)[-1])["step"]) > step


def test_net_preset_must_fit_the_data(tmp_path, capsys):
    assert main(["train", "--method", "rf", "--data", "gmm", "--preset", "tiny", "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "does not fit gmm" in err and "--preset toy" in err
    assert not (tmp_path / "r").exists()


def test_progress_follows_the_time_budget():
    import time

    from fewstep.training.loop import _progress
    assert _progress(250, 1000, time.time(), 0) == 0.25
    assert 0.45 < _progress(10, 1000000, time.time() - 30, 1.0) < 0.6   # half of a 1-minute budget
    assert _progress(10, 1000000, time.time() - 600, 1.0) == 1.0


def test_bad_inputs_fail_cleanly_and_damage_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--iters", "3") == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert train(run, "--iters", "3") == 2  # existing run without --resume
    assert train(tmp_path / "x", "--iters", "0") == 2
    assert train(tmp_path / "y", "--iters", "3", "bogus=1") == 2
    with pytest.raises(SystemExit) as exit_info:  # the choices are the method registry's names
        main(["train", "--method", "nope", "--out", str(tmp_path / "z")])
    assert exit_info.value.code == 2
    assert main(["train", "--method", "rf", "--data", str(tmp_path / "empty_missing"), "--out",
                 str(tmp_path / "w"), "--iters", "2"]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--method", "rf", "--data", str(empty), "--out", str(tmp_path / "v"), "--iters", "2"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "unknown override key 'bogus'" in err
    assert "invalid choice: 'nope' (choose from 'rf', 'edm', 'cud', 'cud-distill', 'cd', 'ctm')" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert not (tmp_path / "x").exists() and not (tmp_path / "v").exists()
    # sample: a checkpoint from another method's config / a corrupt weights file
    ckpt = ck.find_checkpoint(run)
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    (bad / "ema-0.999.safetensors").write_bytes(b"not a safetensors file")
    assert main(["sample", "--ckpt", str(bad), "--out", str(tmp_path / "s.png")]) == 2
    cfg = json.loads((bad / "config.json").read_text())
    cfg["method"]["name"] = "edm"
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["sample", "--ckpt", str(bad), "--out", str(tmp_path / "s.png")]) == 2
    assert main(["sample", "--ckpt", str(run), "--steps", "0", "--out", str(tmp_path / "s.png")]) == 2
    assert not (tmp_path / "s.png").exists()
    assert main(["sample", "--ckpt", str(run), "--steps", "2", "--num", "300", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_edm_on_2d_loss_falls(tmp_path):
    assert train(tmp_path, "--iters", "150", method="edm") == 0
    losses = [json.loads(l)["loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20


@pytest.mark.slow  # two training processes
def test_ddp_two_processes_gloo(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "fewstep", "train", "--method", "rf", "--out", str(tmp_path),
           "--iters", "6", *TOY, "train.ckpt_every=3"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    finally:  # never leave worker processes behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert "world=2" in err
    st = load_file(str(tmp_path / "checkpoints/step-0000006/train_state.safetensors"))
    assert "rng.cpu.0" in st and "rng.cpu.1" in st and not torch.equal(st["rng.cpu.0"], st["rng.cpu.1"])
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 6


def test_default_threads_do_not_oversubscribe(tmp_path, monkeypatch, capsys):
    """train.threads=0 (the default): the CPUs we may use, less the busy ones, shared among
    the local processes; torch's own default (every CPU) ran 10x slower on a busy machine."""
    import fewstep.training.loop as loop
    assert loop.auto_threads(cpus=2, load=7.0, machine_cpus=2, procs=1)[0] == 1       # busy 2-core machine
    assert loop.auto_threads(cpus=16, load=0.3, machine_cpus=16, procs=1)[0] == 16    # idle
    assert loop.auto_threads(cpus=8, load=6.0, machine_cpus=8, procs=1)[0] == 2
    assert loop.auto_threads(cpus=16, load=0.0, machine_cpus=16, procs=4)[0] == 4     # 4 ranks under torchrun
    assert loop.auto_threads(cpus=4, load=40.0, machine_cpus=64, procs=1)[0] == 4     # a cpuset on a big host
    n = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 7.0, 7.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(loop, "_cgroup_cpu_quota", lambda: None)
    try:
        torch.set_num_threads(2)  # what torch takes on its own on 2 CPUs
        assert train(tmp_path / "busy", "--iters", "2") == 0
        assert torch.get_num_threads() == 1
        assert "threads=1 (auto: 2 CPUs, load 7.0" in capsys.readouterr().err
        assert train(tmp_path / "set", "--iters", "2", "train.threads=2") == 0  # the config wins
        assert torch.get_num_threads() == 2 and "threads=2 (train.threads)" in capsys.readouterr().err
    finally:
        torch.set_num_threads(n)


@pytest.mark.slow  # a teacher run and a distillation run
def test_short_cud_distill_run_stores_only_what_it_draws(tmp_path, monkeypatch, capsys):
    """6 iterations on the tiny preset (batch 16) need 96 teacher trajectories, not the
    default 50000; the generation reports its progress."""
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    tiny = ["--preset", "tiny", "--no-progress", "data.limit=64"]
    teacher = tmp_path / "teacher"
    assert main(["train", "--method", "cud", "--out", str(teacher), "--iters", "2", *tiny]) == 0
    assert main(["train", "--method", "cud-distill", "--teacher", str(teacher), "--out", str(tmp_path / "student"),
                 "--iters", "6", *tiny]) == 0
    err = capsys.readouterr().err
    files = list((tmp_path / "cache" / "cud-distill").glob("*.safetensors"))
    assert len(files) == 1 and load_file(str(files[0]))["z"].shape[0] == 6 * 16
    assert "generating 96 teacher trajectories" in err and "cud-distill trajectories: 96/96" in err


def test_steps_title_grammar():
    from fewstep.plots import steps_title
    assert steps_title("cud", 1) == "cud 1 step" and steps_title("cd", 4) == "cd 4 steps"


def test_generate_and_sample_draw_2d_samples_alike(triton_stack, tmp_path):
    """The same 2-D samples from `fewstep sample` (PyTorch) and `fewstep generate` (Triton)
    give the same plot; generate draws it without importing torch."""
    import numpy as np
    from PIL import Image

    sampled, generated = tmp_path / "sample.png", tmp_path / "generate.png"
    ckpt = triton_stack.dirs["ckpt"] / "run-toyc"
    assert main(["sample", "--ckpt", str(ckpt), "--steps", "2", "--num", "64", "--label", "1",
                 "--out", str(sampled)]) == 0
    code = ("import sys; from fewstep.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'generate imported torch'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "generate", "--url", triton_stack.url, "--model", "toyc",
                        "--steps", "2", "--num", "64", "--class-label", "1", "--out", str(generated)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = np.asarray(Image.open(sampled).convert("RGB")), np.asarray(Image.open(generated).convert("RGB"))
    assert a.shape == b.shape
    differ = (np.abs(a.astype(int) - b.astype(int)).max(axis=-1) > 8).mean()
    assert differ < 0.002, f"{differ:.2%} of the pixels differ"
