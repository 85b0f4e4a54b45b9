"""Preconditionings cm / ctm / analytic: boundary conditions, tables, the consistency gap, CLI."""
import math

import numpy as np
import pytest
import torch

from fewstep.errors import UserError
from fewstep.training import precond as P

SD = 0.5


def gaussian_denoiser(x, sigma, labels=None):
    """Exact EDM denoiser of N(0, SD^2 I) data."""
    return (SD ** 2 / (SD ** 2 + sigma ** 2)).reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype) * x


def gmm_denoiser():
    from fewstep.training.data import default_gmm
    gmm = default_gmm()
    return (lambda x, s, y=None: gmm.denoiser(x, s)), gmm.sample(2048, torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def gmm_tables():
    den, x0 = gmm_denoiser()
    return P.fit_analytic(den, x0, points=60, samples=256, progress=False)


def all_preconds(tables):
    """cm, ctm, and the `decay` form of the tables (the fixture's) as "analytic-decay"."""
    return {"cm": P.CMPrecond(SD), "ctm": P.CTMPrecond(), "analytic-decay": P.AnalyticPrecond(tables)}


def test_boundary_condition_every_precond(gmm_tables):
    t = torch.tensor([80.0, 31.7, 5.0, 1.0, 0.37, 0.05, 0.0123, 0.002])  # on and off the table nodes
    for name, pc in all_preconds(gmm_tables).items():
        f, g = pc.coeffs(t, t.clone())
        assert torch.equal(f, torch.ones_like(t)), name
        assert torch.equal(g, torch.zeros_like(t)), name


def test_cm_is_the_consistency_model_parametrisation():
    """G = f x + g D with D = c_skip x + c_out F equals CM's c_skip' x + c_out' F at s = eps."""
    t = torch.tensor([80.0, 2.0, 0.1])
    eps = torch.full_like(t, 0.002)
    f, g = P.CMPrecond(SD).coeffs(t, eps)
    x, F = torch.randn(3, 4), torch.randn(3, 4)
    c_skip, c_out = SD ** 2 / (t ** 2 + SD ** 2), t * SD / (t ** 2 + SD ** 2).sqrt()
    D = c_skip[:, None] * x + c_out[:, None] * F
    cm_skip = SD ** 2 / ((t - 0.002) ** 2 + SD ** 2)
    cm_out = SD * (t - 0.002) / (SD ** 2 + t ** 2).sqrt()
    torch.testing.assert_close(f[:, None] * x + g[:, None] * D, cm_skip[:, None] * x + cm_out[:, None] * F)


def test_zero_statistics_give_ctm_exactly():
    lam = P.lambda_grid(40)
    tabs = P.build_tables(lam, np.zeros(40), np.zeros(40))
    assert np.all(np.float32(tabs["R"]) == 1.0)
    an, ctm = P.AnalyticPrecond(tabs), P.CTMPrecond()
    g = torch.Generator().manual_seed(0)
    t = torch.exp(torch.rand(500, generator=g) * (math.log(80) - math.log(0.002)) + math.log(0.002))
    s = t * torch.rand(500, generator=g)
    s = s.clamp(min=0.002)
    for a, b in zip(an.coeffs(t, s), ctm.coeffs(t, s)):
        assert torch.equal(a, b)


def test_gaussian_data_analytic_gap_vanishes_ctm_does_not():
    x0 = torch.randn(2048, 3) * SD
    tabs = P.fit_analytic(gaussian_denoiser, x0, points=60, samples=256, progress=False)
    # the trace estimate of a multiple of the identity is exact (up to the forward difference's float32 rounding)
    np.testing.assert_allclose(tabs["l"], SD ** 2 / (SD ** 2 + np.exp(-2 * tabs["lam"])), rtol=5e-5)
    times = P.gap_times(5)
    gaps = P.consistency_gap(gaussian_denoiser, x0, {"ctm": P.CTMPrecond(), "analytic": P.AnalyticPrecond(tabs)},
                             times, samples=128, substeps=32)
    iu = np.triu_indices(5, 1)
    an, ct = gaps["analytic"][iu], gaps["ctm"][iu]
    assert np.all(np.isfinite(an)) and np.all(np.isfinite(ct))
    assert an.max() < 1e-4
    assert ct.max() > 1e-2
    assert np.all(an < ct)


def test_tables_finite_and_order_one_on_the_whole_grid(gmm_tables):
    for key in ("l", "rate", "L", "R", "f", "g"):
        assert np.all(np.isfinite(gmm_tables[key])), key
    assert np.all((gmm_tables["l"] > -0.1) & (gmm_tables["l"] < 1.1))
    pc = P.AnalyticPrecond(gmm_tables)
    ts = torch.tensor(P.gap_times(40), dtype=torch.float32)
    T, S = torch.meshgrid(ts, ts, indexing="ij")
    keep = T >= S
    f, g = pc.coeffs(T[keep], S[keep])
    assert torch.isfinite(f).all() and torch.isfinite(g).all()
    assert g.abs().max() < 3.0 and f.abs().max() < 3.0
    assert (g >= 0).all()
    # the plain forward form is what explodes on long jumps (why `decay` is the default)
    full = P.AnalyticPrecond(P.tables_variant(gmm_tables, "full"))
    assert float(full.coeffs(T[keep], S[keep])[1].max()) > 10.0


def test_gmm_analytic_lowers_the_gap(gmm_tables):
    den, x0 = gmm_denoiser()
    times = P.gap_times(5)
    gaps = P.consistency_gap(den, x0, all_preconds(gmm_tables), times, samples=256, substeps=32)
    iu = np.triu_indices(5, 1)
    assert gaps["analytic-decay"][iu].mean() < 0.5 * gaps["ctm"][iu].mean()
    assert gaps["analytic-decay"][iu].mean() < 0.5 * gaps["cm"][iu].mean()


def test_tables_save_load_roundtrip(tmp_path, gmm_tables):
    path = P.save_tables(tmp_path / "t.safetensors", gmm_tables, {"points": 60})
    tabs, meta = P.load_tables(path)
    assert meta["points"] == 60 and meta["format"] == P.TABLE_FORMAT
    a, b = P.AnalyticPrecond(gmm_tables), P.AnalyticPrecond(tabs)
    t, s = torch.tensor([3.0, 0.5]), torch.tensor([0.1, 0.002])
    for u, v in zip(a.coeffs(t, s), b.coeffs(t, s)):
        assert torch.equal(u, v)
    st = a.state_tensors()
    c = P.AnalyticPrecond.from_state(st)
    assert torch.equal(c.coeffs(t, s)[0], a.coeffs(t, s)[0])
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError):
        P.load_tables(tmp_path / "bad.safetensors")


def test_analytic_coeffs_export_with_dynamic_batch(gmm_tables):
    """The coefficient lookup is plain tensor code: torch.export (the ONNX exporter's front end)
    captures it with the tables as constants and a dynamic batch, and it generalises."""
    pc = P.AnalyticPrecond(gmm_tables)

    class Coeffs(torch.nn.Module):
        def forward(self, t, s):
            return torch.stack(pc.coeffs(t, s))

    batch = torch.export.Dim("batch", min=1)
    prog = torch.export.export(Coeffs(), (torch.tensor([5.0, 2.0]), torch.tensor([1.0, 0.5])),
                               dynamic_shapes={"t": {0: batch}, "s": {0: batch}})
    t, s = torch.tensor([70.0, 0.3, 0.01]), torch.tensor([0.002, 0.2, 0.002])
    torch.testing.assert_close(prog.module()(t, s), torch.stack(pc.coeffs(t, s)))


def test_fit_probes_agree_and_a_teacher_checkpoint_keys_its_cache(tmp_path, monkeypatch):
    """The three trace probes give the same statistics; the cache key follows the teacher's weights."""
    den, x0 = gmm_denoiser()
    a = P.fit_analytic(den, x0, points=12, samples=128, progress=False, trace="vjp")
    for trace, rtol in (("jvp", 1e-4), ("fd", 1e-3)):      # fd: a forward difference in float32
        b = P.fit_analytic(den, x0, points=12, samples=128, progress=False, trace=trace)
        np.testing.assert_allclose(a["l"], b["l"], rtol=rtol, atol=1e-5, err_msg=trace)
        np.testing.assert_allclose(a["rate_raw"], b["rate_raw"], rtol=10 * rtol, atol=1e-4, err_msg=trace)
    from types import SimpleNamespace
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text("{}")
    (ck / "ema-0.999.safetensors").write_bytes(b"weights")
    t = SimpleNamespace(ckpt=ck, ema="0.999")
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    p1 = P.teacher_tables_path(t, 120, 4096)
    assert p1.parent == tmp_path / "cache" / "precond" and P.teacher_tables_path(t, 60, 512) != p1
    (ck / "ema-0.999.safetensors").write_bytes(b"other weights")
    assert P.teacher_tables_path(t, 120, 4096) != p1


def test_make_precond_errors():
    with pytest.raises(UserError):
        P.make_precond("nope")
    for name in P.ANALYTIC_FORMS:
        with pytest.raises(UserError, match="fitted tables"):
            P.make_precond(name)
    with pytest.raises(UserError):
        P.variant_rate(np.zeros(3), "nope")


def test_precond_cli_fit_and_gap(tmp_path, monkeypatch, capsys):
    from fewstep.cli import main
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    assert main(["precond", "fit", "--teacher", "exact", "--points", "30", "--samples", "128",
                 "--no-progress"]) == 0
    assert (tmp_path / "cache" / "precond" / f"gmm-exact-p30-n128-s0-f{P.FIT_FORMAT}.safetensors").is_file()
    out = tmp_path / "gap.png"
    assert main(["precond", "gap", "--teacher", "exact", "--precond", "cm,ctm,analytic", "--times", "4",
                 "--samples", "64", "--substeps", "8", "--out", str(out), "--no-progress"]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()
    table = capsys.readouterr().out
    assert "gap analytic" in table and "| 80 | 0.002 |" in table
    assert main(["precond", "gap", "--teacher", "exact", "--precond", "bogus"]) == 2
    # the cache entry is keyed by the settings: the same fit again is reused, another one is new
    assert main(["precond", "fit", "--teacher", "exact", "--points", "30", "--samples", "128", "--no-progress"]) == 0
    assert "already cached" in capsys.readouterr().err
    assert main(["precond", "fit", "--teacher", "exact", "--points", "20", "--samples", "128", "--no-progress"]) == 0
    names = {p.name.split("-s0")[0] for p in (tmp_path / "cache" / "precond").glob("gmm-exact-*.safetensors")}
    assert {"gmm-exact-p30-n128", "gmm-exact-p20-n128"} <= names   # (+ the default one `gap` fitted)
    assert main(["precond", "fit", "--teacher", "exact", "--samples", "0"]) == 2


# --- the backward (implicit) form beside decay ---------------------------------------------------

def test_backward_form_boundary_zero_stats_and_node_values(gmm_tables):
    lam = P.lambda_grid(40)
    zero = P.AnalyticPrecond(P.build_tables(lam, np.zeros(40), np.zeros(40), backward=True))
    assert zero.backward
    t = torch.tensor([80.0, 31.7, 5.0, 1.0, 0.37, 0.05, 0.0123, 0.002])
    s = (t * 0.3).clamp(min=0.002)
    for a, b in zip(zero.coeffs(t, s), P.CTMPrecond().coeffs(t, s)):
        assert torch.equal(a, b)
    bw = P.AnalyticPrecond(P.tables_variant(gmm_tables, "backward"))
    assert bw.backward and not P.AnalyticPrecond(gmm_tables).backward
    f, g = bw.coeffs(t, t.clone())
    assert torch.equal(f, torch.ones_like(t)) and torch.equal(g, torch.zeros_like(t))
    # on the nodes the lookup equals the implicit solve f = E / (1 + l_s g0), g = g0 / (1 + l_s g0)
    tabs = P.tables_variant(gmm_tables, "backward")
    tn = torch.tensor(np.exp(-tabs["lam"]), dtype=torch.float64)
    i, j = torch.tensor([0, 3, 10, 20, 30]), torch.tensor([40, 30, 55, 59, 31])
    f, g = P.AnalyticPrecond({k: torch.as_tensor(v) for k, v in tabs.items()}).coeffs(
        tn[i].float(), tn[j].float())
    np.testing.assert_allclose(f.numpy(), tabs["f"][i, j], rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(g.numpy(), tabs["g"][i, j], rtol=2e-4, atol=1e-5)
    l_s, tnp = tabs["l"][j], np.exp(-tabs["lam"])
    g0 = tabs["R"][i, j] * (1 - tnp[j] / tnp[i])                  # the explicit integral (R stores it)
    E = (tnp[j] / tnp[i]) * np.exp(tabs["L"][j] - tabs["L"][i])
    np.testing.assert_allclose(tabs["g"][i, j], g0 / (1 + l_s * g0), rtol=1e-10)
    np.testing.assert_allclose(tabs["f"][i, j], E / (1 + l_s * g0), rtol=1e-10)


def test_backward_form_stays_order_one_where_full_explodes(gmm_tables):
    bw = P.AnalyticPrecond(P.tables_variant(gmm_tables, "backward"))
    ts = torch.tensor(P.gap_times(40), dtype=torch.float32)
    T, S = torch.meshgrid(ts, ts, indexing="ij")
    keep = T >= S
    f, g = bw.coeffs(T[keep], S[keep])
    assert torch.isfinite(f).all() and torch.isfinite(g).all()
    assert (g >= 0).all() and g.max() < 1.5 and f.abs().max() < 1.5


def test_backward_flag_survives_save_and_state(tmp_path, gmm_tables):
    tabs = P.tables_variant(gmm_tables, "backward")
    path = P.save_tables(tmp_path / "t.safetensors", tabs, {"points": 60})
    loaded, _ = P.load_tables(path)
    pc = P.AnalyticPrecond(loaded)
    assert pc.backward
    again = P.AnalyticPrecond.from_state(pc.state_tensors())
    assert again.backward
    t, s = torch.tensor([40.0, 2.0]), torch.tensor([0.5, 0.01])
    for a, b in zip(pc.coeffs(t, s), again.coeffs(t, s)):
        assert torch.equal(a, b)


def test_the_names_say_the_form(monkeypatch, tmp_path):
    """`analytic` trains the paper's backward form, `analytic-decay` the project's variant;
    the old method.precond_variant is refused with the new names."""
    from fewstep.training.build import ExactGMMTeacher, build_method, build_net, resolve_net_config
    from fewstep.training.config import make_config
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    assert P.ANALYTIC_FORMS["analytic"] == "backward" and P.ANALYTIC_FORMS["analytic-decay"] == "decay"
    for name, backward in (("analytic", True), ("analytic-decay", False)):
        cfg = make_config("ctm", data="gmm", preset="toy", teacher="exact",
                          overrides=["net.hidden=16", "net.depth=1", f"method.precond={name}",
                                     "method.precond_points=20", "method.precond_samples=64"])
        resolve_net_config(cfg, (2,), 0)
        m = build_method(cfg, teacher=ExactGMMTeacher(cfg))
        m.init_student(build_net(cfg, m))
        assert m.precond.backward is backward
        tabs = P.tables_variant(P.load_tables(next((tmp_path / "precond").glob("gmm-exact-p20-n64-*")))[0],
                                P.ANALYTIC_FORMS[name])
        t, s = torch.tensor([40.0, 2.0]), torch.tensor([0.5, 0.01])
        for a, b in zip(m.precond.coeffs(t, s), P.AnalyticPrecond(tabs).coeffs(t, s)):
            torch.testing.assert_close(a, b)
    cfg = make_config("ctm", data="gmm", preset="toy", teacher="exact",
                      overrides=["method.precond=analytic", "method.precond_variant=decay"])
    with pytest.raises(UserError, match="analytic-decay"):
        build_method(cfg, teacher=ExactGMMTeacher(cfg))
    # a checkpoint of the old naming still loads for sampling (no teacher; its tables are in it)
    build_method(cfg)


def test_compare_precond_three_arms_end_to_end(tmp_path, monkeypatch):
    """fewstep.experiments.compare_precond (scripts/compare_precond.py): arms ctm / analytic /
    analytic-decay train with their own tables (the checkpoints say which form) and the summary
    has per-seed speed-ups."""
    import json

    from safetensors.torch import load_file

    from fewstep.training import checkpoint as ck
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    from fewstep.experiments import compare_precond as mod
    assert mod.arm_overrides("analytic-decay") == ["method.precond=analytic-decay"]
    out = tmp_path / "cmp"
    mod.main(["gmm", "--seeds", "0", "--iters", "4",
              "--every", "2", "--batch", "16", "--samples", "200", "--out", str(out),
              "net.hidden=16", "net.depth=1", "method.heun_steps=3", "method.N=6", "method.precond_points=20",
              "method.precond_samples=64", "data.limit=256", "train.warmup=1"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iters"] == [2, 4] and summary["arms"] == ["ctm", "analytic", "analytic-decay"]
    assert summary["evaluator"]["metric"] == "swd"
    assert summary["std_2"]["ctm"] == [0.0, 0.0]   # one seed: no spread
    for steps in ("1", "2"):
        assert set(summary["speedup"][steps]) == {"analytic", "analytic-decay"}
        assert len(summary["speedup"][steps]["analytic-decay"]["per_seed_levels"]) == 1
    for arm, flag in (("analytic-decay", 0.0), ("analytic", 1.0)):
        mt = load_file(str(ck.list_checkpoints(out / f"{arm}-seed0")[-1] / "method.safetensors"))
        assert float(mt["precond.backward"]) == flag
    assert (out / "curves.png").is_file()


@pytest.mark.slow
def test_fit_of_a_checkpoint_is_the_same_in_one_process_or_two(tmp_path, monkeypatch, capsys):
    """The chunks spread over worker processes sum to the in-process fit's tables, bit for bit,
    and the fit says how long it will take."""
    from fewstep.cli import main
    from fewstep.training.build import load_model
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "edm"
    assert main(["train", "--method", "edm", "--data", "gmm", "--preset", "toy", "--iters", "20", "--batch", "64",
                 "--out", str(run), "net.hidden=32", "net.depth=2", "train.sample_every=0"]) == 0
    teacher = load_model(run)
    one, _ = P.fit_teacher(teacher, points=8, samples=96, batch=32, workers=1, progress=False, out=tmp_path / "a")
    capsys.readouterr()
    two, path = P.fit_teacher(teacher, points=8, samples=96, batch=32, workers=2, progress=False, out=tmp_path / "b")
    for key in ("l", "rate_raw", "f", "g"):
        np.testing.assert_array_equal(one[key], two[key], err_msg=key)
    assert "precond fit: 1 of 3 chunks" in capsys.readouterr().err
    assert P.load_tables(path)[1]["workers"] == 2
    # a worker that cannot load the teacher fails the fit with its error (no hang, no silent retry)
    teacher.ckpt = tmp_path / "gone"
    with pytest.raises(UserError):
        P.fit_teacher(teacher, points=8, samples=96, batch=32, workers=2, progress=False, out=tmp_path / "c")
