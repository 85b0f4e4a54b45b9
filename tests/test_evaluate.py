"""`fewstep eval`: FID / SWD / energy-distance maths, the feature classifier and its cache,
and end-to-end runs on tiny checkpoints (2-D and images)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.cli import main as fewstep_main
from fewstep.training import evaluate as ev

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a small, shared CPU two threads thrash (several times slower)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --- high-frequency energy (the speckle measure) ----------------------------------------------

def test_high_freq_energy_hand_values_speckle_and_blur():
    flat = torch.full((1, 1, 5, 5), 0.3)
    assert ev.high_freq_energy(flat).item() == 0.0            # constant: no detail
    dot = torch.zeros(1, 1, 5, 5)
    dot[0, 0, 2, 2] = 1.0                                      # one bright pixel: centre 4, 4 neighbours -1
    assert ev.high_freq_energy(dot).item() == pytest.approx((16 + 4) / 25)
    g = torch.Generator().manual_seed(0)
    img = torch.zeros(8, 1, 16, 16)
    img[:, :, 4:12, 4:12] = 1.0
    speckled = img + 0.3 * torch.randn(img.shape, generator=g)
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(img, (1, 1, 1, 1), mode="replicate"), 3, 1)
    e = ev.high_freq_energy
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
    assert ev.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-6)
    # and clearly positive once anything differs
    assert ev.frechet_distance(mu, s, mu + 0.5, s) == pytest.approx(16 * 0.25, rel=1e-6)
    assert ev.frechet_distance(mu, s, mu, 2 * s) > 0.1


def test_frechet_closed_form_1d_and_diagonal():
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
    assert ev.frechet_distance([0.0], [[1.0]], [2.0], [[4.0]]) == pytest.approx(4 + 1, rel=1e-9)
    assert ev.frechet_distance(1.0, 9.0, -1.0, 1.0) == pytest.approx(4 + 4, rel=1e-9)
    rng = np.random.default_rng(1)
    m1, m2 = rng.standard_normal(5), rng.standard_normal(5)
    v1, v2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    want = float(((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    assert ev.frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(want, rel=1e-9)
    # rotating both Gaussians by the same orthogonal matrix changes nothing
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    got = ev.frechet_distance(q @ m1, q @ np.diag(v1) @ q.T, q @ m2, q @ np.diag(v2) @ q.T)
    assert got == pytest.approx(want, rel=1e-7)
    # singular covariances are fine (no NaN from the square roots)
    z = np.zeros((3, 3))
    assert ev.frechet_distance(np.zeros(3), z, np.ones(3), np.eye(3)) == pytest.approx(3 + 3, rel=1e-9)


def test_feature_stats_matches_numpy():
    f = torch.randn(500, 7, dtype=torch.float64) * 2 + 1
    mu, cov = ev.feature_stats(f)
    np.testing.assert_allclose(mu, f.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(f.numpy(), rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError):
        ev.feature_stats(torch.zeros(1, 3))


# --- 2-D distances ------------------------------------------------------------------------------

def test_sliced_wasserstein_same_vs_shifted():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, 2, generator=g), torch.randn(4000, 2, generator=g)
    same = ev.sliced_wasserstein(a, b, n_proj=128, seed=1)
    assert 0 <= same < 0.08
    # a shift by (1, 0): each direction sees |cos(theta)|, on average 2/pi
    shifted = ev.sliced_wasserstein(a, b + torch.tensor([1.0, 0.0]), n_proj=128, seed=1)
    assert shifted == pytest.approx(2 / math.pi, abs=0.06)
    # unequal sizes are subsampled; deterministic given the seed
    c = torch.randn(1500, 2, generator=g)
    assert ev.sliced_wasserstein(a, c, n_proj=64, seed=3) == ev.sliced_wasserstein(a, c, n_proj=64, seed=3)
    assert ev.sliced_wasserstein(a, c, n_proj=64, seed=3) < 0.1
    assert ev.sliced_wasserstein(a, 2 * c, n_proj=64, seed=3) > 0.3


def test_energy_distance_same_vs_shifted():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1500, 2, generator=g), torch.randn(1500, 2, generator=g)
    same = ev.energy_distance(a, b)
    assert abs(same) < 0.01
    shifted = ev.energy_distance(a, b + torch.tensor([1.0, 0.0]))
    assert shifted > 0.2
    # grows with the shift
    assert ev.energy_distance(a, b + torch.tensor([2.0, 0.0])) > shifted


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


def test_classifier_trains_and_cache_is_reused(tmp_path, cache, monkeypatch, capsys):
    data = _write_bars_dataset(tmp_path / "bars")
    clf = ev.get_classifier(str(data), epochs=8, progress=False)
    assert clf.path.is_file() and clf.path.parent == cache / "classifiers"
    assert clf.path.with_suffix(".json").is_file()
    meta = json.loads(clf.path.with_suffix(".json").read_text())
    assert meta["train_n"] == 120 and meta["test_n"] == 60
    assert clf.test_accuracy >= 0.9, clf.meta   # an easy task: it must learn it
    assert "test accuracy" in capsys.readouterr().err
    feats = clf.features(torch.zeros(3, 1, 16, 16))
    assert feats.shape == (3, 128)

    # second use: loaded from the cache, no training
    def boom(*a, **k):
        raise AssertionError("retrained although a cached classifier was there")
    from fewstep.training import feature_classifier
    monkeypatch.setattr(feature_classifier, "train_classifier", boom)
    again = ev.get_classifier(str(data), epochs=8, progress=False)
    assert again.path == clf.path and again.test_accuracy == clf.test_accuracy
    torch.testing.assert_close(again.features(torch.zeros(3, 1, 16, 16)), feats)
    assert "test accuracy" in capsys.readouterr().err

    # different train data (one more image): the cache does not match, so it retrains
    from PIL import Image
    Image.fromarray(np.zeros((16, 16), np.uint8), "L").save(data / "train" / "vertical" / "zzz.png")
    with pytest.raises(AssertionError, match="retrained"):
        ev.get_classifier(str(data), epochs=8, progress=False)


def test_classifier_refuses_unlabeled_and_2d_data(tmp_path, cache):
    from fewstep.errors import UserError
    from PIL import Image
    d = tmp_path / "plain"
    d.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8), "L").save(d / f"{i}.png")
    with pytest.raises(UserError, match="labels"):
        ev.get_classifier(str(d), progress=False)
    with pytest.raises(UserError, match="image data"):
        ev.get_classifier("gmm", progress=False)


@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="Fashion-MNIST not installed "
                    "(apt-get install dataset-fashion-mnist)")
def test_classifier_on_fashion_mnist_subset(cache):
    clf = ev.get_classifier("fmnist", train_limit=2000, epochs=2, progress=False)
    assert clf.path.name == "fmnist-1x28x28-n2000.safetensors"
    assert clf.meta["train_n"] == 2000 and clf.meta["test_n"] == 10000
    assert clf.test_accuracy > 0.6   # 10 classes, chance is 0.1


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
    assert rep["num"] == 400 and rep["classifier"] is None
    assert [r["steps"] for r in rep["results"]] == [1, 2]
    for r in rep["results"]:
        assert math.isfinite(r["swd"]) and r["swd"] > 0 and math.isfinite(r["energy"])
        assert (out.parent / f"gmm-steps{r['steps']}.png").is_file()
    # 30 iterations of training are far from the data: worse than the data-vs-data floor
    assert min(r["swd"] for r in rep["results"]) > rep["reference"]["swd"]
    assert rep["sample_seconds"] >= 0 and Path(rep["ckpt"]).is_dir()
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
    return run


def test_eval_images_end_to_end(bars_ckpt, tmp_path, cache, capsys):
    out = tmp_path / "img.json"
    rc = fewstep_main(["eval", "--ckpt", str(bars_ckpt), "--steps", "1,2", "--num", "70", "--batch", "32",
                       "--out", str(out), "--no-progress"])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["metric"] == "fid-classifier" and rep["num"] == 70 and rep["test_n"] == 40
    c = rep["classifier"]
    assert 0 <= c["test_accuracy"] <= 1 and c["trusted"] == (c["test_accuracy"] >= 0.9)
    assert Path(c["path"]).is_file() and Path(c["path"]).parent == cache / "classifiers"
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
    assert rep["metric"] == "fid-inception" and rep["inception"]["path"] == str(weights)
    assert rep["classifier"] is None and math.isfinite(rep["results"][0]["fid"])
