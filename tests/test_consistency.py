"""Consistency distillation (cd) and consistency trajectory models (ctm)."""
import math

import numpy as np
import pytest
import torch

from fewstep.errors import UserError
from fewstep import sampling
from fewstep.training.build import ExactGMMTeacher, Model, build_method, build_net, resolve_net_config
from fewstep.training.config import make_config

SMALL_MLP = ["net.hidden=32", "net.depth=2", "net.emb_dim=16"]


def cfg_for(method, shape=(2,), overrides=(), preset=None, teacher=None):
    data = "gmm" if len(shape) == 1 else "fmnist"
    cfg = make_config(method, data=data, preset=preset or ("toy" if data == "gmm" else "tiny"),
                      teacher=teacher, overrides=list(overrides))
    resolve_net_config(cfg, shape, 0)
    return cfg


def edm_teacher(shape=(2,), overrides=SMALL_MLP, seed=0):
    """An edm Model with random weights (the init tests need a teacher, not a good one)."""
    cfg = cfg_for("edm", shape, overrides)
    method = build_method(cfg)
    torch.manual_seed(seed)
    net = build_net(cfg, method)
    with torch.no_grad():  # a non-trivial output layer, so that D differs from c_skip x
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return Model(cfg, method, net.eval().requires_grad_(False))


def student(method, teacher, shape=(2,), overrides=SMALL_MLP):
    cfg = cfg_for(method, shape, overrides)
    m = build_method(cfg, teacher=teacher)
    net = build_net(cfg, m)
    m.init_student(net)
    return m, net.eval()


def xts(shape, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((b,) + tuple(shape), generator=g)
    t = torch.tensor([80.0, 10.0, 1.5, 0.4, 0.05, 0.01])[:b]
    s = t * torch.tensor([0.5, 0.01, 0.9, 0.3, 0.2, 0.5])[:b]
    return x, t, s.clamp(min=0.002)


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)])
def test_ctm_per_block_s_is_random_and_not_from_the_teacher(shape):
    """The default (sony/ctm): every block has its own affine_s; the s branch keeps its random
    init, everything else is the teacher's, so the student does NOT start as the teacher."""
    ov = SMALL_MLP if len(shape) == 1 else []
    teacher = edm_teacher(shape, ov)
    m, net = student("ctm", teacher, shape, ov)
    assert m.opts["s_embedding"] == "per-block" and net.s_per_block
    sd, tsd = net.state_dict(), teacher.net.state_dict()
    s_keys = [k for k in sd if k not in tsd]
    blocks = [n for n, mod in net.named_modules() if getattr(mod, "affine_s", None) is not None]
    assert blocks and all(f"{b}.affine_s.weight" in s_keys for b in blocks)
    assert {k for k in s_keys if "affine_s" not in k} == {f"map_layer{i}_s.{w}" for i in (0, 1) for w in ("weight", "bias")}
    for k in tsd:
        assert torch.equal(sd[k], tsd[k]), k
    assert all(sd[k].abs().sum() > 0 for k in s_keys if k.endswith("weight"))   # random, not zeroed
    x, t, s = xts(shape, 4 if len(shape) > 1 else 6)
    with torch.no_grad():
        assert not torch.allclose(m.denoise(net, x, t, s), teacher.denoise(x, t), atol=1e-3)


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)])
def test_ctm_shared_zero_student_starts_as_the_teacher(shape):
    ov = (SMALL_MLP if len(shape) == 1 else []) + ["method.s_embedding=shared-zero"]
    teacher = edm_teacher(shape, ov[:-1])
    m, net = student("ctm", teacher, shape, ov)
    assert net.two_times and not net.s_per_block
    x, t, s = xts(shape, 4 if len(shape) > 1 else 6)
    with torch.no_grad():
        D = teacher.denoise(x, t)
        for s_ in (s, t, torch.full_like(t, 0.002)):
            torch.testing.assert_close(m.denoise(net, x, t, s_), D, rtol=1e-5, atol=1e-6)
        # ctm preconditioning: the jump starts as one Euler (DDIM) step of the teacher
        r = (s / t).reshape((-1,) + (1,) * len(shape))
        torch.testing.assert_close(m.jump(net, x, t, s), r * x + (1 - r) * D, rtol=1e-5, atol=1e-6)


def test_cd_student_starts_as_the_teacher_and_lands_at_eps():
    teacher = edm_teacher()
    m, net = student("cd", teacher, overrides=SMALL_MLP + ["method.precond=ctm"])
    x, t, s = xts((2,))
    with torch.no_grad():
        D = teacher.denoise(x, t)
        r = (0.002 / t)[:, None]
        out = m.jump(net, x, t, s)
        torch.testing.assert_close(out, r * x + (1 - r) * D, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.jump(net, x, t, None), out)  # s is ignored: always lands at eps
    spec = m.sampler_spec()
    assert spec["jump_lands"] == "end" and spec["t_end"] == 0.002 and spec["process"] == "ve"


def test_student_must_match_the_teacher_net():
    teacher = edm_teacher()
    with pytest.raises(UserError, match="does not match"):
        student("ctm", teacher, overrides=["net.hidden=16", "net.depth=2", "net.emb_dim=16"])


def test_bad_options_are_user_errors():
    for bad in (["method.precond=nope"], ["method.distance=nope"], ["method.gamma=2"], ["method.s_embedding=nope"]):
        with pytest.raises(UserError):
            build_method(cfg_for("ctm", overrides=bad))


def _train(method_name, steps, seed=0, overrides=()):
    torch.manual_seed(seed)
    cfg = cfg_for(method_name, overrides=SMALL_MLP + list(overrides), teacher="exact")
    teacher = ExactGMMTeacher(cfg)
    m = build_method(cfg, teacher=teacher)
    net = build_net(cfg, m)
    m.init_student(net)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    data = teacher.gmm.sample(4096, torch.Generator().manual_seed(1))
    xe = data[:512]

    def eval_loss():
        state = torch.get_rng_state()
        torch.manual_seed(123)
        with torch.no_grad():
            val = m.loss(net, xe, None)[0].item()
        torch.set_rng_state(state)
        return val

    before = eval_loss()
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = data[torch.randint(0, len(data), (128,), generator=g)]
        loss, _ = m.loss(net, x, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, eval_loss(), m, net


def test_tiny_cd_run_lowers_its_loss():
    before, after, m, _ = _train("cd", 60, overrides=["method.target_ema=0.9"])
    assert math.isfinite(after) and after < 0.7 * before


def test_tiny_ctm_run_lowers_its_loss():
    before, after, m, net = _train("ctm", 60, overrides=["method.heun_steps=4", "method.N=10"])
    assert math.isfinite(after) and after < 0.7 * before
    assert set(m.train_modules()) == {"target"}
    # the target moved towards the student but is not the student
    pt, pn = next(m.target.parameters()), next(net.parameters())
    assert not torch.equal(pt, pn)


def _manual(m, net, steps, seeds, shape, gamma):
    spec = m.sampler_spec()
    grid = sampling.time_grid(spec, steps)
    eps = spec["t_end"]
    x = torch.from_numpy(sampling.noise(seeds, 0, shape)) * float(grid[0])
    b = len(seeds)
    for i in range(steps):
        t, t_next = float(grid[i]), float(grid[i + 1])
        if gamma == 0.0 or i == steps - 1:
            x = m.jump(net, x, torch.full((b,), t), torch.full((b,), t_next))
        else:  # CM multistep: jump to eps, re-noise to t_next
            x0 = m.jump(net, x, torch.full((b,), t), torch.full((b,), eps))
            z = torch.from_numpy(sampling.noise(seeds, i + 1, shape))
            x = x0 + math.sqrt(t_next ** 2 - eps ** 2) * z
    return x


def test_gamma_sampling_limits():
    teacher = edm_teacher()
    m, net = student("ctm", teacher)
    seeds = [3, 4, 5, 6]
    with torch.no_grad():
        det = m.sample(net, 3, seeds, (2,), gamma=0.0)
        torch.testing.assert_close(det, _manual(m, net, 3, seeds, (2,), 0.0))
        torch.testing.assert_close(det, m.sample(net, 3, seeds, (2,), gamma=0.0))
        cm = m.sample(net, 3, seeds, (2,), gamma=1.0)
        torch.testing.assert_close(cm, _manual(m, net, 3, seeds, (2,), 1.0))
        assert not torch.allclose(det, cm)
        # 1 step: G(x_T, T, eps), whatever gamma is
        one = m.sample(net, 1, seeds, (2,), gamma=0.5)
        x_T = torch.from_numpy(sampling.noise(seeds, 0, (2,))) * 80.0
        torch.testing.assert_close(one, m.jump(net, x_T, torch.full((4,), 80.0), torch.full((4,), 0.002)))
    # cd always samples as CM multistep (gamma forced to 1)
    mc, netc = student("cd", teacher)
    with torch.no_grad():
        torch.testing.assert_close(mc.sample(netc, 3, seeds, (2,), gamma=0.0), _manual(mc, netc, 3, seeds, (2,), 1.0))


def test_ctm_analytic_end_to_end_through_the_loop(tmp_path, monkeypatch):
    """train (fitting the tables first) -> checkpoint carries the tables and the target -> resume -> load."""
    from safetensors.torch import load_file

    from fewstep.training.build import load_model
    from fewstep.training.loop import train
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    ov = SMALL_MLP + ["method.precond=analytic", "method.precond_points=30", "method.precond_samples=64",
                      "method.heun_steps=3", "method.N=8", "train.batch=32", "train.iters=4", "train.ckpt_every=2",
                      "train.sample_every=0", "train.log_every=1", "train.warmup=1"]
    cfg = make_config("ctm", data="gmm", preset="toy", teacher="exact", overrides=ov)
    cfg["data"]["limit"] = 512
    last = train(cfg, tmp_path / "run", progress=False)
    assert len(list((tmp_path / "cache" / "precond").glob("gmm-exact-p*-n*-s0-f*.safetensors"))) == 1
    import json
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(1 <= r["teacher_steps"] <= 3 and r["dsm_weight"] >= 0 for r in recs)
    mt = load_file(str(last / "method.safetensors"))
    assert {"precond.l", "precond.R", "precond.L", "precond.lam"} <= set(mt)
    ts = load_file(str(last / "train_state.safetensors"))
    assert any(k.startswith("module.target.") for k in ts)
    cfg2 = make_config("ctm", data="gmm", preset="toy", teacher="exact", overrides=ov[:-5] + [
        "train.iters=6", "train.ckpt_every=2", "train.sample_every=0", "train.log_every=1", "train.warmup=1"])
    cfg2["data"]["limit"] = 512
    last = train(cfg2, tmp_path / "run", resume=True, progress=False)
    assert last.name == "step-0000006"
    model = load_model(last)
    assert model.method.precond.name == "analytic"
    for steps in (1, 2):
        x = model.sample(steps, list(range(16)))
        assert x.shape == (16, 2) and torch.isfinite(x).all()


# --- CTM as sony/ctm trains it (cm/karras_diffusion.py, cm/resample.py, cm/script_util.py) -------

def _reference_tk_law(N, K):
    """sony/ctm: k ~ P(k) prop. to k on 1..K (one per batch), then the t index uniform on
    0..N-1-k (UniformSampler.weights(k) = ones(N - k)). Returns P(k) and P(i) (exact)."""
    ks = np.arange(1, K + 1)
    pk = ks / ks.sum()
    pi = np.zeros(N - 1)
    for k, p in zip(ks, pk):
        pi[: N - k] += p / (N - k)
    return pk, pi


def _chi2(counts, probs):
    exp = probs * counts.sum()
    return float(((counts - exp) ** 2 / exp).sum())


def test_ctm_tk_law_matches_the_reference():
    m = build_method(cfg_for("ctm", overrides=SMALL_MLP))
    N, K = 18, 17
    pk, pi = _reference_tk_law(N, K)
    assert abs((np.arange(1, K + 1) * pk).sum() - 11.667) < 1e-3      # the reference's mean k
    g = torch.Generator().manual_seed(1234)
    kc, ic = np.zeros(K), np.zeros(N - 1)
    js_ok = True
    for _ in range(3000):
        k, i, u, j, grid = m.sample_times(8, "cpu", generator=g)
        kc[k - 1] += 1
        np.add.at(ic, i.numpy(), 1)
        js_ok &= bool(((u == i + k) & (j >= u) & (j <= N - 1)).all())
    assert js_ok
    # chi-square against the exact law: df 16 and 16; old law (t first, k falling) gives > 1000
    assert _chi2(kc, pk) < 16 + 6 * math.sqrt(32), _chi2(kc, pk)
    # i draws within a batch share k, so the effective sample is smaller: a looser bound
    assert _chi2(ic, pi) < 8 * (16 + 6 * math.sqrt(32)), _chi2(ic, pi)
    assert abs(kc @ np.arange(1, K + 1) / kc.sum() - 11.67) < 0.3
    assert abs(ic[0] / ic.sum() - pi[0]) < 0.03 and pi[0] > 0.25             # P(t = T) ~ 0.29


def test_ctm_s_is_uniform_on_the_rest_of_the_grid():
    m = build_method(cfg_for("ctm", overrides=SMALL_MLP + ["method.N=6", "method.heun_steps=1"]))
    g = torch.Generator().manual_seed(5)
    counts = np.zeros((5, 6))
    for _ in range(2000):
        k, i, u, j, _ = m.sample_times(16, "cpu", generator=g)
        np.add.at(counts, (i.numpy(), j.numpy()), 1)
    for i in range(5):   # k = 1: u = i + 1, s uniform on i + 1 .. 5
        row = counts[i, i + 1:]
        assert counts[i, : i + 1].sum() == 0
        assert _chi2(row, np.full(len(row), 1 / len(row))) < 25


def test_ctm_dsm_sigmas_half_lognormal_half_karras():
    m = build_method(cfg_for("ctm", overrides=SMALL_MLP))
    sig = m.dsm_sigmas(20000, "cpu", generator=torch.Generator().manual_seed(0)).numpy()
    logn, kar = np.log(sig[:10000]), sig[10000:]
    assert abs(logn.mean() + 1.2) < 0.05 and abs(logn.std() - 1.2) < 0.05
    lo = (80 ** (1 / 7) + 0.7 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7      # 0.7 of the way in t^(1/7)
    assert kar.max() <= 80.0 and kar.min() >= lo * (1 - 1e-9)
    # uniform in t^(1/7) over that range
    pos = (kar ** (1 / 7) - 80 ** (1 / 7)) / (lo ** (1 / 7) - 80 ** (1 / 7))
    assert abs(pos.mean() - 0.5) < 0.02 and abs(pos.std() - math.sqrt(1 / 12)) < 0.02


def _spy_G(m, monkeypatch):
    calls = []
    orig = m.G

    def spy(net, *a, **kw):
        calls.append((net, torch.is_grad_enabled()))
        return orig(net, *a, **kw)
    monkeypatch.setattr(m, "G", spy)
    return calls


@pytest.mark.parametrize("inner", ["online", "ema"])
def test_ctm_target_inner_jump(inner, monkeypatch):
    teacher = edm_teacher()
    m, net = student("ctm", teacher, overrides=SMALL_MLP + [f"method.target_inner={inner}"])
    net.train()
    calls = _spy_G(m, monkeypatch)
    x = torch.randn(16, 2)
    m.loss(net, x, None)
    no_grad = [c[0] for c in calls if not c[1]]
    # the target: G_tgt(G_inner(x_u, u, s), s, eps); the inner jump is evaluated first
    assert no_grad[0] is (net if inner == "online" else m.target)
    assert no_grad[1] is m.target


def test_ctm_adaptive_dsm_weight_is_the_gradient_norm_ratio_and_is_logged():
    teacher = edm_teacher()
    m, net = student("ctm", teacher)
    net.train()
    with torch.no_grad():  # move the student off the teacher so that both terms have gradients
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(64, 2)
    torch.manual_seed(3)
    loss, logs = m.loss(net, x, None)
    logged = m.interval_logs()
    w = logged["dsm_weight"]
    wl = net.out.weight
    # recompute both terms with the same randomness and compare the ratio by hand
    torch.manual_seed(3)
    captured = {}
    orig = m.adaptive_weight

    def cap(net_, lc, ld):
        captured["ctm"] = torch.autograd.grad(lc, wl, retain_graph=True)[0].norm()
        captured["dsm"] = torch.autograd.grad(ld, wl, retain_graph=True)[0].norm()
        return orig(net_, lc, ld)
    m.adaptive_weight = cap
    m.loss(net, x, None)
    assert w == pytest.approx(float(captured["ctm"] / (captured["dsm"] + 1e-4)), rel=1e-5)
    assert w != 1.0 and "teacher_steps" in logged and 1 <= logged["teacher_steps"] <= 17
    # fixed weight: logged as given
    m2, net2 = student("ctm", teacher, overrides=SMALL_MLP + ["method.dsm_weight=0.5"])
    m2.loss(net2.train(), x, None)
    assert m2.interval_logs()["dsm_weight"] == 0.5


def test_ctm_interval_logs_are_means_since_the_last_call():
    m = build_method(cfg_for("ctm", overrides=SMALL_MLP))
    for k in (2, 4, 9):
        m._note("teacher_steps", k)
    assert m.interval_logs() == {"teacher_steps": 5.0}
    assert m.interval_logs() == {}


@pytest.mark.parametrize("method", ["ctm", "cd"])
def test_target_runs_in_the_students_mode(method):
    """With dropout in the net (the fmnist preset), the target must see the student's setting."""
    teacher = edm_teacher((1, 8, 8), ["net.dropout=0.3"])
    m, net = student(method, teacher, (1, 8, 8), ["net.dropout=0.3"])
    net.train()
    m.loss(net, torch.randn(4, 1, 8, 8), None)
    assert m.target.training
    net.eval()
    m.loss(net, torch.randn(4, 1, 8, 8), None)
    assert not m.target.training


def test_cd_default_target_is_the_stop_gradient_online_net():
    """openai/consistency_models_cifar10 configs/cifar10_ve_cd.py (N = 18): mu = 0."""
    teacher = edm_teacher()
    m, net = student("cd", teacher)
    assert m.opts["target_ema"] == 0.0 and m.opts["N"] == 18
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
    m.loss(net.train(), torch.randn(8, 2), None)
    for pt, pn in zip(m.target.parameters(), net.parameters()):
        torch.testing.assert_close(pt, pn)


def test_ctm_and_cd_train_with_sony_ctms_optimiser():
    """RAdam, lr 4e-4, no warm-up, no clipping (sony/ctm train_util.py) over any preset; the
    loop builds that optimiser; a train.* override still wins."""
    from fewstep.training.config import make_config
    for method in ("ctm", "cd"):
        for preset in ("toy", "fmnist-cpu"):
            t = make_config(method, data="gmm" if preset == "toy" else "fmnist", preset=preset)["train"]
            assert (t["optimizer"], t["lr"], t["warmup"], t["grad_clip"]) == ("radam", 4e-4, 0, 0.0), (method, preset)
    assert make_config("ctm", data="gmm", overrides=["train.lr=1e-3"])["train"]["lr"] == 1e-3
    assert make_config("rf", data="gmm")["train"]["optimizer"] == "adam"


def test_ctm_dsm_sigmas_are_not_clamped():
    m = build_method(cfg_for("ctm", overrides=["method.p_mean=3.0", "method.p_std=2.0"]))
    sig = m.dsm_sigmas(4000, "cpu", torch.Generator().manual_seed(0))
    half = sig[:2000]
    assert half.max() > 80.0      # lognormal(3, 2) leaves [0.002, 80] as in the reference
    assert sig[2000:].min() >= 0.002 - 1e-12 and sig[2000:].max() <= 80.0 + 1e-9


def test_a_ctm_config_from_before_s_embedding_builds_the_old_net():
    cfg = cfg_for("ctm")
    cfg["method"].pop("s_embedding")
    m = build_method(cfg)
    assert m.opts["s_embedding"] == "shared-zero" and not build_net(cfg, m).s_per_block
