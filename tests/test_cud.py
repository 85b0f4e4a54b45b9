"""Catch-Up Distillation (cud) and its 1-step final distillation (cud-distill).

Loss terms against hand computations with constant / linear "networks", the stop-gradient,
the end mask, the Runge-Kutta slopes, the dt schedules, the heads' zero init, sampling
options, trajectory data generation and resume, and tiny real runs whose loss falls.
"""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from fewstep.cli import main
from fewstep.errors import UserError
from fewstep import sampling
from fewstep.training.methods.cud import CUD, CouplingEncoder, gaussian_kl
from fewstep.training.methods.cud_distill import CUDDistill, generate_trajectories, teacher_trajectories

EPS = 1e-5


class FakeNet(torch.nn.Module):
    """v(x, t) = a x + b t (+ c); extra heads return k-th constants. Records every call."""

    def __init__(self, a=0.0, b=0.0, c=0.0, heads=(), learn_a=False):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(float(a))) if learn_a else a
        self.b, self.c, self.head_values = b, c, list(heads)
        self.calls = []

    def forward(self, x, t, s=None, class_labels=None, return_features=False, heads=False):
        self.calls.append({"grad": torch.is_grad_enabled(), "t": t.detach().clone(), "heads": heads})
        v = self.a * x + self.b * t.reshape((-1,) + (1,) * (x.dim() - 1)) + self.c
        if heads:
            return [v] + [torch.full_like(x, h) + 0 * v for h in self.head_values]
        return v


def cud(**opts):
    return CUD({"coupling": "independent", **opts})


def bc(v, x):
    return v.reshape((-1,) + (1,) * (x.dim() - 1))


# --- dt schedules, end mask, weights ----------------------------------------------------------

@pytest.mark.parametrize("tn", [4, 16])
def test_dt_schedules_range(tn):
    torch.manual_seed(0)
    t = torch.rand(4000) * (1 - EPS) + EPS
    dt = cud(dt_schedule="uniform", tn=tn).draw_dt(t)
    assert dt.min() >= 0 and dt.max() <= 1 / tn and dt.std() > 0
    assert dt.mean().item() == pytest.approx(0.5 / tn, rel=0.05)
    assert torch.allclose(cud(dt_schedule="rule", tn=tn).draw_dt(t), t / tn)
    assert torch.all(cud(dt_schedule="origin", tn=tn).draw_dt(t) == 1 / tn)
    for bad in ({"dt_schedule": "cosine"}, {"tn": 0}, {"pred_step": 4}, {"sample_head": 2}, {"coupling": "vae"},
                {"time_scale": 999.0}):
        with pytest.raises(UserError):
            cud(**bad)


def test_end_mask_uses_pred_step_times_dt():
    dt = torch.full((4,), 0.0625)
    t = torch.tensor([EPS, EPS + 0.5 * 0.0625, EPS + 1.5 * 0.0625, EPS + 2.5 * 0.0625])
    assert cud(pred_step=1).end_mask(t, dt).tolist() == [False, False, True, True]
    assert cud(pred_step=2).end_mask(t, dt).tolist() == [False, False, False, True]
    assert cud(pred_step=3).end_mask(t, dt).tolist() == [False, False, False, False]


def test_adaptive_weights():
    m = cud(adaptive_weight=True, w_catchup=1.0, w_gt=0.5)
    assert m.weights(0.25) == pytest.approx((0.5, 2 * 0.75 * 0.5))
    assert cud().weights(0.7) == (1.0, 1.0)


# --- loss terms by hand ------------------------------------------------------------------------

def test_rk12_loss_by_hand_linear_net():
    """v = a x + b t: the whole loss() (draws, previous-moment target, end mask) by hand."""
    a, b = 0.7, -0.4
    m = cud(pred_step=1, dt_schedule="uniform", tn=2)  # tn=2: big dt, so some samples hit the end mask
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    loss, logs = m.loss(FakeNet(a, b), x, None)
    torch.manual_seed(5)
    z = torch.randn_like(x)
    t = torch.rand(64) * (1 - EPS) + EPS
    dt = torch.rand(64) / 2
    xt = bc(t, x) * z + (1 - bc(t, x)) * x
    v = a * xt + b * bc(t, x)
    x_prev = xt - bc(dt, x) * v
    target = a * x_prev + b * bc((t - dt).clamp(EPS, 1), x)
    mask = t >= EPS + dt
    assert 0 < mask.sum() < 64
    target = torch.where(bc(mask, x).bool(), target, z - x)
    expected = ((v - target) ** 2).mean() + ((v - (z - x)) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["loss_catchup"] == pytest.approx(((v - target) ** 2).mean().item(), rel=1e-5)
    assert logs["end_frac"] == pytest.approx(1 - mask.float().mean().item())


@pytest.mark.parametrize("k", [1, 2, 3])
def test_loss_terms_constant_net_with_heads(k):
    """Constant heads c_1..c_k: every catch-up target is c_1 (the main head's output) where
    the mask keeps it, else z - x; loss = w1 sum_m mse(c_m, T) + w2 sum_m mse(c_m, z - x)."""
    c = [0.3, -0.2, 0.5][:k]
    m = cud(pred_step=k, w_catchup=0.7, w_gt=1.3)
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(8, 1, 3, 3, generator=g), torch.randn(8, 1, 3, 3, generator=g)
    t = torch.linspace(EPS, 1, 8)
    dt = torch.full((8,), 0.1)
    loss, logs = m.catchup_loss(FakeNet(c=c[0], heads=c[1:]), x, z, t, dt)
    gt = z - x
    keep = bc(t >= EPS + k * 0.1, x).bool()
    l_cu = sum(((cm - torch.where(keep, torch.full_like(x, c[0]), gt)) ** 2).mean() for cm in c)
    l_gt = sum(((cm - gt) ** 2).mean() for cm in c)
    assert loss.item() == pytest.approx(0.7 * l_cu.item() + 1.3 * l_gt.item(), rel=1e-5)


def test_adaptive_weights_in_the_loss():
    m = cud(adaptive_weight=True)
    x, z = torch.zeros(4, 2), torch.ones(4, 2)
    t, dt = torch.full((4,), 0.5), torch.full((4,), 0.05)
    loss, logs = m.catchup_loss(FakeNet(c=0.25), x, z, t, dt, progress=0.3)
    # catch-up target = 0.25 (constant net): 0; gt = 1: (0.75)^2
    assert logs["loss_catchup"] == pytest.approx(0.0)
    assert loss.item() == pytest.approx(2 * 0.7 * 0.75 ** 2)


def test_coupling_encoder_kl_term():
    enc = CouplingEncoder((2,))
    e = torch.randn(16, 2)
    z, mu, logvar = enc(torch.randn(16, 2), e)
    assert torch.equal(z, e) and gaussian_kl(mu, logvar).item() == 0.0  # starts independent
    with torch.no_grad():
        enc.out.bias.copy_(torch.tensor([0.5, -1.0, math.log(0.25), 0.0]))  # mu = (.5, -1), logvar = (ln .25, 0)
    x = torch.randn(16, 2)
    z, mu, logvar = enc(x, e)
    assert torch.allclose(z, torch.tensor([0.5, -1.0]) + torch.tensor([0.5, 1.0]) * e)
    kl = 0.5 * ((-1 - math.log(0.25) + 0.25 + 0.25) + (-1 - 0 + 1 + 1)) / 2
    assert gaussian_kl(mu, logvar).item() == pytest.approx(kl, rel=1e-6)
    # in the loss: catch-up + gt + kl_weight * KL, with z from the encoder
    m = CUD({"coupling": "encoder", "kl_weight": 20.0})
    m.encoder = enc
    torch.manual_seed(2)
    loss, logs = m.loss(FakeNet(c=0.0), x, None)
    assert logs["kl"] == pytest.approx(kl, rel=1e-6)
    torch.manual_seed(2)
    e = torch.randn_like(x)
    zz = torch.tensor([0.5, -1.0]) + torch.tensor([0.5, 1.0]) * e
    t = torch.rand(16) * (1 - EPS) + EPS
    dt = torch.rand(16) / 16
    keep = bc(t >= EPS + dt, x).bool()
    gt = zz - x
    expected = (torch.where(keep, 0.0, gt) ** 2).mean() + (gt ** 2).mean() + 20 * kl
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_coupling_encoder_learns_through_the_flow_loss():
    m = CUD({"coupling": "encoder", "prior_shakedrop": False})
    from fewstep.training.networks import MLP
    net = MLP(dim=2, hidden=16, depth=1)
    m.init_student(net)
    assert set(m.train_modules()) == {"encoder"}
    loss, _ = m.loss(net, torch.randn(32, 2), None)
    loss.backward()
    assert m.encoder.out.weight.grad is not None and m.encoder.out.weight.grad.abs().sum() > 0


# --- stop-gradient --------------------------------------------------------------------------------

def test_no_gradient_reaches_the_previous_moment_pass():
    """v = w x with a learnable w: the gradient is the one of a loss whose target is a constant."""
    net = FakeNet(a=0.8, learn_a=True)
    m = cud(pred_step=1)
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g)
    t, dt = torch.full((16,), 0.6), torch.full((16,), 0.1)
    loss, _ = m.catchup_loss(net, x, z, t, dt)
    loss.backward()
    assert [c["grad"] for c in net.calls] == [True, False, False]
    w = 0.8
    xt = 0.6 * z + 0.4 * x
    target = w * (xt - 0.1 * w * xt)  # previous-moment output, a constant for the gradient
    grad = (2 * (w * xt - target) * xt).mean() + (2 * (w * xt - (z - x)) * xt).mean()
    assert net.a.grad.item() == pytest.approx(grad.item(), rel=1e-5)
    # all RK passes run without gradient too
    net3 = FakeNet(a=0.8, learn_a=True)
    cud(pred_step=3).catchup_loss(net3, x, z, t, dt)
    assert [c["grad"] for c in net3.calls] == [True] + [False] * 6


# --- Runge-Kutta slopes and targets -----------------------------------------------------------------

def test_rk_slope_coefficients():
    t, dt = torch.tensor([0.9, 0.5]), torch.tensor([0.0625, 0.03])
    x = torch.zeros(2, 1)
    h = dt[:, None]

    def sq(y, u):  # v = t^2: exact mean velocity over [t-h, t] is t^2 - t h + h^2/3
        return (u ** 2)[:, None] + 0 * y

    def lin(y, u):  # v = t: exact mean t - h/2
        return u[:, None] + 0 * y
    tt = t[:, None]
    assert torch.allclose(cud(pred_step=1).rk_slope(sq, x, t, dt), tt ** 2)
    assert torch.allclose(cud(pred_step=2).rk_slope(lin, x, t, dt), tt - h / 2)
    assert torch.allclose(cud(pred_step=2).rk_slope(sq, x, t, dt), tt ** 2 - tt * h + h ** 2 / 2)
    # RK34's 5/12, 2/3, -1/12 (with k3 at t - 2h) integrates a quadratic velocity exactly
    assert torch.allclose(cud(pred_step=3).rk_slope(lin, x, t, dt), tt - h / 2)
    assert torch.allclose(cud(pred_step=3).rk_slope(sq, x, t, dt), tt ** 2 - tt * h + h ** 2 / 3, atol=1e-7)


def test_catchup_targets_on_linear_flow():
    """v(x, t) = x: targets T_m = v(x - m h slope) = x (1 - m h s) with s the RK slope factor."""
    net = FakeNet(a=1.0)
    x = torch.tensor([[1.0], [2.0]])
    t, dt = torch.tensor([0.8, 0.6]), torch.tensor([0.05, 0.1])
    h = dt[:, None]
    slope = {1: 1.0, 2: 1 - h / 2, 3: 1 - h / 2 - h ** 2 / 48}
    for k in (1, 2, 3):
        T = cud(pred_step=k).catchup_targets(net, x, t, dt)
        assert len(T) == k
        for m_, Tm in enumerate(T, start=1):
            assert torch.allclose(Tm, x * (1 - m_ * h * slope[k]), atol=1e-6)
    # times given to the net: t, t - dt, ..., clamped to [eps, 1]
    net.calls.clear()
    cud(pred_step=2).catchup_targets(net, x, torch.tensor([0.05, 0.6]), torch.tensor([0.05, 0.1]))
    assert torch.allclose(net.calls[1]["t"], torch.tensor([EPS, 0.5]))
    assert torch.allclose(net.calls[3]["t"], torch.tensor([EPS, 0.4]))


# --- network options: heads and shakedrop -------------------------------------------------------------

def test_net_overrides_and_heads_zero_init():
    from fewstep.training.networks import PRESETS_NET, build_net
    m = cud(pred_step=3)
    assert m.net_overrides() == {"extra_heads": 2, "prior_shakedrop": True}
    assert cud(prior_shakedrop=False).net_overrides() == {"extra_heads": 0}
    torch.manual_seed(0)
    # out_init_weight 0.2: a visible main head (EDM's default 1e-5 starts it near zero too)
    unet = build_net({**PRESETS_NET["tiny"], "img_resolution": 8, "in_channels": 1, "out_channels": 1,
                      "out_init_weight": 0.2, **m.net_overrides()})
    mlp = build_net({**PRESETS_NET["mlp"], "dim": 2, "hidden": 32, "depth": 2, "extra_heads": 2})
    for net, x in ((unet, torch.randn(4, 1, 8, 8)), (mlp, torch.randn(4, 2))):
        out = net(x, torch.full((4,), 0.5), heads=True)
        assert len(out) == 3
        assert out[0].abs().mean() > 1e-2
        assert out[1].abs().max() < 1e-3 and out[2].abs().max() < 1e-3


# --- sampling ----------------------------------------------------------------------------------------

def test_jump_with_heads_and_solvers():
    net = FakeNet(a=2.0, heads=[0.5])
    x = torch.ones(1, 1)
    t, s = torch.tensor([1.0]), torch.tensor([0.5])
    assert cud(pred_step=2).jump(net, x, t, s).item() == pytest.approx(0.0)            # Euler, main head
    assert cud(pred_step=2, sample_head=2).jump(net, x, t, s).item() == pytest.approx(1 - 0.25)  # head 2: v = 0.5
    assert cud(solver="heun").jump(net, x, t, s).item() == pytest.approx(1 - 0.5 * 0.5 * (2 + 0))
    # 1 step through the shared sampler: x = z - v(z, 1)
    m = cud()
    out = m.sample(FakeNet(a=0.5, b=1.0), 1, [3, 4], (2,))
    z = torch.from_numpy(sampling.noise([3, 4], 0, (2,)))
    assert torch.allclose(out, z - (0.5 * z + 1.0), atol=1e-6)
    assert m.sampler_spec()["process"] == "flow" and m.sampler_spec()["grid"] == "uniform"


# --- cud-distill: trajectory data ---------------------------------------------------------------------

class CountingTeacher:
    def __init__(self, a=0.5, fail_after=None):
        self.method = cud(prior_shakedrop=False)
        self.net = FakeNet(a=a)
        self.fail_after = fail_after
        self.n = 0
        orig = self.net.forward

        def forward(*args, **kw):
            self.n += 1
            if self.fail_after is not None and self.n > self.fail_after:
                raise KeyboardInterrupt("simulated interruption")
            return orig(*args, **kw)
        self.net.forward = forward


def test_teacher_trajectories_by_hand():
    """v = a x, 16 Euler steps: x_i = z (1 - a/16)^i, x0_hat_i = x_i (1 - a t_i), t_i = 1 - i/16."""
    a = 0.5
    z = torch.randn(5, 2)
    out = teacher_trajectories(CountingTeacher(a), z, None, 16, [8, 11, 14])
    for j, i in enumerate((8, 11, 14)):
        assert torch.allclose(out[j], z * (1 - a / 16) ** i * (1 - a * (1 - i / 16)), atol=1e-6)


def test_distill_data_generation_and_resume(tmp_path):
    kw = dict(num=50, steps=16, keep=[8, 11, 14], seed=7, shape=(2,), batch=16, progress=False)
    full = generate_trajectories(CountingTeacher(), tmp_path / "a.safetensors", meta={"k": 1}, **kw)
    data = load_file(str(full))
    assert data["z"].dtype == torch.float16 and data["z"].shape == (50, 2)
    assert data["targets"].dtype == torch.float16 and data["targets"].shape == (3, 50, 2)
    assert not (tmp_path / "a.safetensors.parts").exists()
    # the targets are the teacher's x0_hat from the stored (float16) z
    ref = teacher_trajectories(CountingTeacher(), data["z"].float(), None, 16, [8, 11, 14])
    assert torch.allclose(data["targets"].float(), ref, atol=2e-3)

    # interrupted after 2 of 4 chunks (15 teacher calls per chunk: steps 0..14), then resumed
    path = tmp_path / "b.safetensors"
    with pytest.raises(KeyboardInterrupt):
        generate_trajectories(CountingTeacher(fail_after=2 * 15 + 3), path, **kw)
    assert not path.exists()
    assert len(list((tmp_path / "b.safetensors.parts").glob("chunk-*.safetensors"))) == 2
    again = CountingTeacher()
    generate_trajectories(again, path, meta={"k": 1}, **kw)
    assert again.n == 2 * 15  # only the two missing chunks were computed
    resumed = load_file(str(path))
    assert all(torch.equal(resumed[k], data[k]) for k in data)


# --- tiny real runs -------------------------------------------------------------------------------------

TOY = ["--data", "gmm", "--preset", "toy", "--no-progress", "net.hidden=32", "net.depth=2",
       "train.batch=128", "train.sample_every=0", "train.log_every=10", "train.warmup=10", "train.lr=2e-3"]


def _losses(run: Path, key="loss"):
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cud_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cud") / "run"
    rc = main(["train", "--method", "cud", "--out", str(out), "--iters", "200", *TOY,
               "method.pred_step=2", "train.ckpt_every=100"])
    assert rc == 0
    return out


def test_tiny_cud_run_loss_falls_and_keeps_its_encoder(cud_run):
    gt = _losses(cud_run, "loss_gt")
    assert sum(gt[-5:]) / 5 < 0.8 * sum(gt[:2]) / 2
    last = sorted((cud_run / "checkpoints").iterdir())[-1]
    st = load_file(str(last / "train_state.safetensors"))
    assert any(k.startswith("module.encoder.") for k in st)
    model_keys = load_file(str(last / "model.safetensors"))
    assert any(k.startswith("heads.0.") for k in model_keys)  # pred_step 2: one extra head
    # sampling from either head, with either solver, through the CLI
    for extra in ([], ["--set", "sample_head=2", "--set", "solver=heun"]):
        assert main(["sample", "--ckpt", str(cud_run), "--steps", "2", "--num", "16", *extra,
                     "--out", str(cud_run / "s.png")]) == 0
    assert main(["sample", "--ckpt", str(cud_run), "--set", "pred_step=3", "--out", str(cud_run / "s.png")]) == 2
    assert main(["sample", "--ckpt", str(cud_run), "--set", "sample_head=3", "--out", str(cud_run / "s.png")]) == 2
    from fewstep.training.build import load_model
    m1 = load_model(cud_run)
    m2 = load_model(cud_run, method_opts={"sample_head": 2})
    x, t, s = torch.randn(8, 2), torch.ones(8), torch.zeros(8)
    assert m2.method.opts["sample_head"] == 2
    assert torch.allclose(m2.jump(x, t, s), x - m2.net(x, t, heads=True)[1])
    assert not torch.allclose(m1.jump(x, t, s), m2.jump(x, t, s))


def test_tiny_cud_distill_run(cud_run, tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "distill"
    rc = main(["train", "--method", "cud-distill", "--teacher", str(cud_run), "--out", str(out), "--iters", "90",
               *TOY, "method.num_trajs=512", "method.gen_batch=256",
               "train.log_every=5"])
    assert rc == 0
    files = list((tmp_path / "cache" / "cud-distill").glob("*.safetensors"))
    assert len(files) == 1
    stages = _losses(out, "stage")
    assert stages == sorted(stages) and set(stages) == {0, 1, 2}
    lx = _losses(out, "loss_x")
    assert min(lx[-3:]) < lx[0]
    from fewstep.training.build import load_model
    student = load_model(out)
    assert student.method.sampler_spec()["default_steps"] == 1
    # a teacher whose options differ from the student's is refused
    with pytest.raises(UserError, match="time_scale"):
        CUDDistill({"prior_shakedrop": False, "time_scale": 999.0},
                   teacher=SimpleNamespace(method=cud(prior_shakedrop=False), net=FakeNet()))


def test_distill_refuses_a_teacher_with_another_shakedrop_phi():
    from fewstep.training.networks import SongUNet
    unet = dict(img_resolution=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1,),
                num_blocks=1, attn_resolutions=(), prior_shakedrop=True)
    teacher = SimpleNamespace(method=cud(), net=SongUNet(**unet, shakedrop_phi=0.25))
    with pytest.raises(UserError, match="net.shakedrop_phi=0.25"):
        CUDDistill({}, teacher=teacher).init_student(SongUNet(**unet, shakedrop_phi=0.75))


@pytest.mark.slow  # two exports
def test_export_bakes_the_chosen_head_and_solver(cud_run, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model"
    assert main(["export", "--ckpt", str(cud_run), "--out", str(out), "--parity-steps", "2",
                 "--set", "sample_head=2", "--set", "solver=heun"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "cud" and manifest["solver"] == "heun"
    assert manifest["training"]["config"]["method"]["sample_head"] == 2
    from fewstep.export.runner import OrtJump
    from fewstep.training.build import load_model
    ref = load_model(cud_run, method_opts={"sample_head": 2, "solver": "heun"})
    x = torch.randn(4, 2)
    t, s = torch.full((4,), 0.75), torch.full((4,), 0.5)
    got = OrtJump(out / "jump.onnx", "cpu", threads=1)(x.numpy(), t.numpy(), s.numpy(), None)
    assert torch.allclose(torch.from_numpy(got), ref.jump(x, t, s), atol=1e-5)
