"""`fewstep eval`: FID / SWD / energy-distance maths, the shipped feature network and `fewstep features`,
and end-to-end runs on tiny checkpoints (2-D and images)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.cli import main as fewstep_main
from fewstep.training import metrics as M

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


# --- high-frequency energy (the speckle measure) ----------------------------------------------

def test_high_freq_energy_hand_values_speckle_and_blur():
    flat = torch.full((1, 1, 5, 5), 0.3)
    assert M.high_freq_energy(flat).item() == 0.0            # constant: no detail
    dot = torch.zeros(1, 1, 5, 5)
    dot[0, 0, 2, 2] = 1.0                                      # one bright pixel: centre 4, 4 neighbours -1
    assert M.high_freq_energy(dot).item() == pytest.approx((16 + 4) / 25)
    g = torch.Generator().manual_seed(0)
    img = torch.zeros(8, 1, 16, 16)
    img[:, :, 4:12, 4:12] = 1.0
    speckled = img + 0.3 * torch.randn(img.shape, generator=g)
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(img, (1, 1, 1, 1), mode="replicate"), 3, 1)
    e = M.high_freq_energy
    assert e(speckled).shape == (8,)
    assert e(speckled).mean() > 3 * e(img).mean()
    assert e(blurred).mean() < e(img).mean()


# --- Frechet distance -----------------------------------------------------------------------

def _random_cov(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_zero_for_identical_stats():
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(16), _random_cov(16, rng)
    assert M.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-6)
    # and clearly positive once anything differs
    assert M.frechet_distance(mu, s, mu + 0.5, s) == pytest.approx(16 * 0.25, rel=1e-6)
    assert M.frechet_distance(mu, s, mu, 2 * s) > 0.1


def test_frechet_closed_form_1d_and_diagonal():
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
    assert M.frechet_distance([0.0], [[1.0]], [2.0], [[4.0]]) == pytest.approx(4 + 1, rel=1e-9)
    assert M.frechet_distance(1.0, 9.0, -1.0, 1.0) == pytest.approx(4 + 4, rel=1e-9)
    rng = np.random.default_rng(1)
    m1, m2 = rng.standard_normal(5), rng.standard_normal(5)
    v1, v2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    want = float(((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    assert M.frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(want, rel=1e-9)
    # rotating both Gaussians by the same orthogonal matrix changes nothing
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    got = M.frechet_distance(q @ m1, q @ np.diag(v1) @ q.T, q @ m2, q @ np.diag(v2) @ q.T)
    assert got == pytest.approx(want, rel=1e-7)
    # singular covariances are fine (no NaN from the square roots)
    z = np.zeros((3, 3))
    assert M.frechet_distance(np.zeros(3), z, np.ones(3), np.eye(3)) == pytest.approx(3 + 3, rel=1e-9)


def test_feature_stats_matches_numpy():
    f = torch.randn(500, 7, dtype=torch.float64) * 2 + 1
    mu, cov = M.feature_stats(f)
    np.testing.assert_allclose(mu, f.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(f.numpy(), rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError):
        M.feature_stats(torch.zeros(1, 3))


# --- 2-D distances ------------------------------------------------------------------------------

def test_sliced_wasserstein_same_vs_shifted():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, 2, generator=g), torch.randn(4000, 2, generator=g)
    same = M.sliced_wasserstein(a, b, n_proj=128, seed=1)
    assert 0 <= same < 0.08
    # a shift by (1, 0): each direction sees |cos(theta)|, on average 2/pi
    shifted = M.sliced_wasserstein(a, b + torch.tensor([1.0, 0.0]), n_proj=128, seed=1)
    assert shifted == pytest.approx(2 / math.pi, abs=0.06)
    # unequal sizes are subsampled; deterministic given the seed
    c = torch.randn(1500, 2, generator=g)
    assert M.sliced_wasserstein(a, c, n_proj=64, seed=3) == M.sliced_wasserstein(a, c, n_proj=64, seed=3)
    assert M.sliced_wasserstein(a, c, n_proj=64, seed=3) < 0.1
    assert M.sliced_wasserstein(a, 2 * c, n_proj=64, seed=3) > 0.3


def test_energy_distance_same_vs_shifted():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1500, 2, generator=g), torch.randn(1500, 2, generator=g)
    same = M.energy_distance(a, b)
    assert abs(same) < 0.01
    shifted = M.energy_distance(a, b + torch.tensor([1.0, 0.0]))
    assert shifted > 0.2
    # grows with the shift
    assert M.energy_distance(a, b + torch.tensor([2.0, 0.0])) > shifted


# --- the feature classifier ----------------------------------------------------------------------

def _write_bars_dataset(root: Path, n_train=60, n_test=30, size=16, seed=0):
    """A labelled folder dataset: horizontal vs vertical bars, with noise."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in ("horizontal", "vertical"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.uniform(0, 60, (size, size))
                k = rng.integers(2, size - 3)
                if cls == "horizontal":
                    img[k:k + 2, :] = 255
                else:
                    img[:, k:k + 2] = 255
                Image.fromarray(img.astype(np.uint8), "L").save(d / f"{i:03d}.png")
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("FEWSTEP_CACHE", str(d))
    return d


def test_features_command_trains_once_and_eval_never_retrains(tmp_path, cache, monkeypatch, capsys):
    """`fewstep features` writes a network (sha256 printed); loading it never trains, and a
    missing or altered pinned file is one clear error."""
    from fewstep.errors import UserError
    from fewstep.training import feature_classifier as fc
    data = _write_bars_dataset(tmp_path / "bars")
    net = tmp_path / "bars-features.safetensors"
    assert fewstep_main(["features", "--data", str(data), "--out", str(net), "--epochs", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    sha = fc.sha256_file(net)
    assert sha in out
    meta = fc.read_feature_net(net).meta
    assert meta["train_n"] == 120 and meta["test_n"] == 60 and meta["seed"] == 0

    def boom(*a, **k):
        raise AssertionError("trained during an evaluation")
    monkeypatch.setattr(fc, "train_classifier", boom)
    clf = fc.get_classifier(str(data), features=net)
    assert clf.sha256 == sha and clf.test_accuracy >= 0.9, clf.meta   # an easy task: it must learn it
    assert clf.features(torch.zeros(3, 1, 16, 16)).shape == (3, 128)
    assert not (cache / "classifiers").exists()
    # a pinned file that is not the pinned one, or is gone: one error, no training
    with pytest.raises(UserError, match="not the pinned"):
        fc.read_feature_net(net, expect_sha256="0" * 64)
    with pytest.raises(UserError, match="missing"):
        fc.read_feature_net(tmp_path / "gone.safetensors")
    # a dataset with no shipped network: say how to make one
    with pytest.raises(UserError, match="fewstep features"):
        fc.get_classifier(str(data))


def test_features_command_refuses_unlabeled_and_2d_data(tmp_path, capsys):
    from PIL import Image
    d = tmp_path / "plain"
    d.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8), "L").save(d / f"{i}.png")
    assert fewstep_main(["features", "--data", str(d), "--out", str(tmp_path / "f.safetensors")]) == 2
    assert "labels" in capsys.readouterr().err
    assert fewstep_main(["features", "--data", "gmm", "--out", str(tmp_path / "f.safetensors")]) == 2
    assert "image data" in capsys.readouterr().err


@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="Fashion-MNIST not installed "
                    "(apt-get install dataset-fashion-mnist)")
def test_the_shipped_feature_network_is_pinned_and_scores_the_full_test_split(tmp_path):
    from fewstep.errors import UserError
    from fewstep.figures import EVALUATOR_VERSION, SHIPPED_FEATURE_NETS
    from fewstep.training import feature_classifier as fc
    from fewstep.training.evaluator import ImageEvaluator
    e = ImageEvaluator("fmnist", verbose=False)
    d = e.describe()
    assert d["features"]["sha256"] == SHIPPED_FEATURE_NETS["fmnist"][1] and d["evaluator_version"] == EVALUATOR_VERSION
    assert d["reference_n"] == 10000 and d["features"]["test_accuracy"] > 0.9
    assert "/" not in json.dumps(d)   # no paths in what reports record
    # the test split against itself is 0; its first half against the whole is small but not 0
    assert e.fid(e.test.x) < 1e-6 and 0 < e.fid(e.test.x[:5000]) < 2
    altered = tmp_path / "net.safetensors"
    blob = bytearray((fc.ASSETS / SHIPPED_FEATURE_NETS["fmnist"][0]).read_bytes())
    blob[-1] ^= 1
    altered.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="pinned"):
        fc.read_feature_net(altered, expect_sha256=SHIPPED_FEATURE_NETS["fmnist"][1])


def test_figures_of_different_feature_networks_are_refused():
    from fewstep.errors import UserError
    from fewstep.figures import check_comparable
    a = {"metric": "fid-classifier", "evaluator_version": 2, "features": {"sha256": "a" * 64}}
    b = {"metric": "fid-classifier", "evaluator_version": 2, "features": {"sha256": "b" * 64}}
    check_comparable([a, dict(a)])
    with pytest.raises(UserError) as e:
        check_comparable([a, b])
    assert "different feature networks" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError):   # a report of the evaluators before: no network named
        check_comparable([a, {"metric": "fid-classifier", "classifier": {"test_accuracy": 0.92}}])


# --- end to end ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gmm_ckpt(tmp_path_factory):
    run = tmp_path_factory.mktemp("gmm-run")
    rc = fewstep_main(["train", "--method", "rf", "--data", "gmm", "--preset", "toy", "--iters", "30",
                       "--out", str(run), "--no-progress", "train.batch=64", "train.sample_every=0"])
    assert rc == 0
    return run


def test_eval_2d_end_to_end(gmm_ckpt, tmp_path, capsys):
    out = tmp_path / "res" / "gmm.json"
    rc = fewstep_main(["eval", "--ckpt", str(gmm_ckpt), "--steps", "1,2", "--num", "400", "--batch", "150",
                       "--out", str(out), "--no-progress"])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["metric"] == "swd" and rep["method"] == "rf" and rep["data"] == "gmm"
    assert rep["num"] == 400 and rep["features"] is None and rep["evaluator_version"] >= 2
    assert [r["steps"] for r in rep["results"]] == [1, 2]
    for r in rep["results"]:
        assert math.isfinite(r["swd"]) and r["swd"] > 0 and math.isfinite(r["energy"])
        assert (out.parent / f"gmm-steps{r['steps']}.png").is_file()
    # 30 iterations of training are far from the data: worse than the data-vs-data floor
    assert min(r["swd"] for r in rep["results"]) > rep["reference"]["swd"]
    assert rep["sample_seconds"] >= 0 and not Path(rep["ckpt"]).is_absolute()
    table = capsys.readouterr().out
    assert "swd" in table and "energy" in table


def test_eval_default_out_is_beside_the_checkpoint(gmm_ckpt):
    rc = fewstep_main(["eval", "--ckpt", str(gmm_ckpt), "--steps", "1", "--num", "50", "--no-progress"])
    assert rc == 0
    ck = sorted((gmm_ckpt / "checkpoints").iterdir())[-1]
    assert json.loads((ck / "eval.json").read_text())["results"][0]["steps"] == 1
    assert (ck / "eval-steps1.png").is_file()


@pytest.mark.parametrize("bad", [
    ["--steps", "0"], ["--steps", "1,65"], ["--steps", "two"], ["--steps", ","], ["--num", "1"],
    ["--seed", "-1"], ["--batch", "0"], ["--gamma", "2"], ["--feature", "inception"],
])
def test_eval_bad_input_exit_code_2(gmm_ckpt, tmp_path, capsys, bad):
    rc = fewstep_main(["eval", "--ckpt", str(gmm_ckpt), "--num", "20", "--out", str(tmp_path / "e.json"),
                       "--no-progress", *bad])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e.json").exists()


def test_eval_missing_checkpoint(tmp_path, capsys):
    assert fewstep_main(["eval", "--ckpt", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def bars_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("bars")
    data = _write_bars_dataset(root / "data", n_train=40, n_test=20)
    run = root / "run"
    rc = fewstep_main(["train", "--method", "rf", "--data", str(data), "--preset", "tiny", "--iters", "2",
                       "--out", str(run), "--no-progress"])
    assert rc == 0
    assert fewstep_main(["features", "--data", str(data), "--out", str(root / "features.safetensors"),
                         "--epochs", "4", "--no-progress"]) == 0
    return run


def test_eval_images_end_to_end(bars_ckpt, tmp_path, cache, capsys):
    from fewstep.files import sha256_file
    out = tmp_path / "img.json"
    features = bars_ckpt.parent / "features.safetensors"
    rc = fewstep_main(["eval", "--ckpt", str(bars_ckpt), "--steps", "1,2", "--num", "70", "--batch", "32",
                       "--out", str(out), "--no-progress", "--features", str(features)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["metric"] == "fid-classifier" and rep["num"] == 70 and rep["test_n"] == 40
    c = rep["features"]
    assert 0 <= c["test_accuracy"] <= 1 and c["trusted"] == (c["test_accuracy"] >= 0.9)
    assert c["sha256"] == sha256_file(features) and rep["evaluator_version"] >= 2
    assert str(tmp_path) not in out.read_text() and str(bars_ckpt.parent) not in out.read_text()
    for r in rep["results"]:
        assert math.isfinite(r["fid"]) and r["fid"] >= 0
        # 2 iterations: samples are nearly raw noise, far more pixel-scale energy than bars
        assert r["hf_ratio"] > 2
        png = tmp_path / f"img-steps{r['steps']}.png"
        assert png.is_file()
        from PIL import Image
        with Image.open(png) as im:   # an 8x8 grid of 16x16 images with 2-px gaps
            assert im.size == (8 * 18 + 2, 8 * 18 + 2)
    # 2 iterations of training: noise, far from the data (the floor is train vs test)
    assert min(r["fid"] for r in rep["results"]) > rep["reference"]["fid"]
    assert "accuracy" in capsys.readouterr().out


def test_eval_inception_needs_local_weights(bars_ckpt, tmp_path, capsys):
    rc = fewstep_main(["eval", "--ckpt", str(bars_ckpt), "--steps", "1", "--num", "10",
                       "--feature", "inception", "--out", str(tmp_path / "e.json"), "--no-progress"])
    assert rc == 2 and "offline" in capsys.readouterr().err
    rc = fewstep_main(["eval", "--ckpt", str(bars_ckpt), "--steps", "1", "--num", "10", "--feature",
                       "inception", "--inception-weights", str(tmp_path / "none.pt"), "--no-progress"])
    assert rc == 2 and "no such file" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    rc = fewstep_main(["eval", "--ckpt", str(bars_ckpt), "--steps", "1", "--num", "10", "--feature",
                       "inception", "--inception-weights", str(junk), "--no-progress"])
    assert rc == 2 and "TorchScript" in capsys.readouterr().err


class _FakeInception(torch.nn.Module):
    """Stands in for the TorchScript FID Inception: uint8 NCHW 3-channel -> features."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        f = x.float() / 255.0
        return torch.cat([f.mean(dim=(2, 3)), f.std(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_eval_inception_with_a_local_torchscript_file(bars_ckpt, tmp_path):
    weights = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(_FakeInception()), str(weights))
    out = tmp_path / "inc.json"
    rc = fewstep_main(["eval", "--ckpt", str(bars_ckpt), "--steps", "1", "--num", "30", "--feature",
                       "inception", "--inception-weights", str(weights), "--out", str(out), "--no-progress"])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["metric"] == "fid-inception" and rep["inception"]["file"] == weights.name
    assert rep["features"] is None and math.isfinite(rep["results"][0]["fid"])
