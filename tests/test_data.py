"""Tests for training/data.py: loaders (IDX, CIFAR-10 binary, image folders), the 2-D track
and its exact GMM denoiser, and deterministic resumable batching. All data is written into
tmp_path; only test_real_fashion_mnist uses the installed Debian package (skipped if absent)."""

import gzip
import math
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.training.data import (
    FMNIST_DIR,
    GMM,
    Batches,
    DataError,
    Dataset,
    default_gmm,
    exact_denoiser,
    load_dataset,
)

# --------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray, gz: bool = False, magic: bytes | None = None):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = magic if magic is not None else struct.pack(">HBB", 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def tiny_images(n=5, h=4, w=3, seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
    imgs[0, 0, 0] = 0
    imgs[0, 0, 1] = 255
    imgs[0, 0, 2] = 51          # -> 51 / 127.5 - 1 = -0.6
    labels = np.arange(n, dtype=np.uint8) % 10
    return imgs, labels


def write_idx_pair(folder: Path, prefix="train", gz=False, n=5):
    imgs, labels = tiny_images(n)
    write_idx(folder / f"{prefix}-images-idx3-ubyte", imgs, gz)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
    return imgs, labels


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fmnist"])
def test_idx_round_trip(tmp_path, gz, name):
    imgs, labels = write_idx_pair(tmp_path, "train", gz)
    timgs, tlabels = write_idx_pair(tmp_path, "t10k", gz, n=3)
    ds = load_dataset(name, data_dir=str(tmp_path))
    assert isinstance(ds, Dataset) and ds.name == name
    assert ds.x.dtype == torch.float32 and ds.x.shape == (5, 1, 4, 3)
    assert ds.shape == (1, 4, 3) and len(ds) == 5
    assert ds.x[0, 0, 0, 0].item() == -1.0 and ds.x[0, 0, 0, 1].item() == 1.0
    assert ds.x[0, 0, 0, 2].item() == pytest.approx(-0.6, abs=1e-6)
    expected = torch.from_numpy(imgs.astype(np.float32))[:, None] / 127.5 - 1
    torch.testing.assert_close(ds.x, expected)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
    assert ds.num_classes == 10 and len(ds.class_names) == 10

    test = load_dataset(name, split="test", data_dir=str(tmp_path))
    assert len(test) == 3
    torch.testing.assert_close(test.x[:, 0], torch.from_numpy(timgs.astype(np.float32)) / 127.5 - 1)

    lim = load_dataset(name, data_dir=str(tmp_path), limit=2)
    assert len(lim) == 2 and torch.equal(lim.x, ds.x[:2]) and torch.equal(lim.labels, ds.labels[:2])

    big = load_dataset(name, data_dir=str(tmp_path), image_size=8)
    assert big.shape == (1, 8, 8) and big.x.min() >= -1 and big.x.max() <= 1


@pytest.mark.parametrize("corruption", ["magic", "dtype", "truncated", "trailing", "ndim"])
def test_corrupt_idx_raises(tmp_path, corruption):
    imgs, labels = tiny_images()
    img_path = tmp_path / "train-images-idx3-ubyte"
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    if corruption == "magic":
        write_idx(img_path, imgs, magic=b"\x12\x34\x08\x03")
    elif corruption == "dtype":
        write_idx(img_path, imgs, magic=b"\x00\x00\x42\x03")
    elif corruption == "ndim":       # 2-D "images"
        write_idx(img_path, imgs.reshape(5, 12))
    else:
        write_idx(img_path, imgs)
        data = img_path.read_bytes()
        img_path.write_bytes(data[:-7] if corruption == "truncated" else data + b"\x00" * 3)
    with pytest.raises(DataError) as e:
        load_dataset("mnist", data_dir=str(tmp_path))
    assert "train-images-idx3-ubyte" in str(e.value) and "\n" not in str(e.value)


def test_idx_count_mismatch_and_bad_gzip(tmp_path):
    imgs, labels = tiny_images()
    write_idx(tmp_path / "train-images-idx3-ubyte", imgs)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:4])
    with pytest.raises(DataError, match="5 images but"):
        load_dataset("mnist", data_dir=str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset("mnist", data_dir=str(tmp_path))


# --------------------------------------------------------------------------- CIFAR-10


def cifar_records(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    pix = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    pix[:, 0, 0, 0], pix[:, 1, 0, 0], pix[:, 2, 0, 0] = 255, 0, 51   # R, G, B of pixel (0,0)
    raw = np.concatenate([labels[:, None], pix.reshape(n, -1)], axis=1).tobytes()
    return labels, pix, raw


def test_cifar_binary_round_trip(tmp_path):
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    l1, p1, raw1 = cifar_records(3, 1)
    l2, p2, raw2 = cifar_records(2, 2)
    (d / "data_batch_1.bin").write_bytes(raw1)
    (d / "data_batch_2.bin").write_bytes(raw2)
    with pytest.warns(UserWarning, match="data_batch_3.bin"):
        ds = load_dataset("cifar10", data_dir=str(tmp_path))
    assert ds.shape == (3, 32, 32) and len(ds) == 5 and ds.num_classes == 10
    assert ds.labels.tolist() == l1.tolist() + l2.tolist()
    expected = torch.from_numpy(np.concatenate([p1, p2]).astype(np.float32)) / 127.5 - 1
    torch.testing.assert_close(ds.x, expected)
    assert ds.x[:, :, 0, 0].tolist()[0] == pytest.approx([1.0, -1.0, -0.6])  # CHW order

    with pytest.raises(DataError, match="test_batch.bin"):
        load_dataset("cifar10", split="test", data_dir=str(tmp_path))
    (d / "test_batch.bin").write_bytes(raw2[:-1])     # not a whole number of records
    with pytest.raises(DataError, match="multiple of 3073"):
        load_dataset("cifar10", split="test", data_dir=str(tmp_path))
    (d / "test_batch.bin").write_bytes(raw2)
    test = load_dataset("cifar10", split="test", data_dir=str(d), limit=1)
    assert len(test) == 1 and test.labels.tolist() == l2[:1].tolist()


# --------------------------------------------------------------------------- image folders


def save(path: Path, array: np.ndarray, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def test_image_folder_labeled(tmp_path):
    red = np.zeros((6, 6, 3), np.uint8)
    red[..., 0] = 255
    save(tmp_path / "cats" / "a.png", red)
    save(tmp_path / "cats" / "nested" / "b.jpg", np.full((10, 12, 3), 128, np.uint8))
    save(tmp_path / "dogs" / "c.bmp", np.full((8, 8), 255, np.uint8))        # grayscale
    clear = np.zeros((6, 6, 4), np.uint8)                                    # transparent
    save(tmp_path / "dogs" / "d.png", clear, "RGBA")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    ds = load_dataset(str(tmp_path))
    assert ds.shape == (3, 6, 6)                     # RGB, size of the first image
    assert len(ds) == 4 and ds.num_classes == 2 and ds.class_names == ("cats", "dogs")
    assert ds.labels.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(ds.x[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert ds.x[2].eq(1.0).all()                     # gray 255 replicated to 3 channels
    assert ds.x[3].eq(1.0).all()                     # transparency composited on white
    assert ds.x[1].sub(128 / 127.5 - 1).abs().max() < 0.05   # jpeg, cropped and resized

    small = load_dataset(str(tmp_path), image_size=4, limit=3)
    assert small.shape == (3, 4, 4) and len(small) == 3


def test_image_folder_unlabeled_grayscale_center_crop(tmp_path):
    img = np.zeros((4, 6), np.uint8)        # 4 high, 6 wide: the crop drops columns 0 and 5
    img[:, 0] = img[:, 5] = 255
    save(tmp_path / "only" / "x1.png", img)
    save(tmp_path / "only" / "z" / "x2.PNG", np.full((8, 8), 255, np.uint8))  # sorted 2nd
    ds = load_dataset(str(tmp_path))
    assert ds.labels is None and ds.num_classes == 0   # a single subfolder: unlabeled
    assert ds.shape == (1, 4, 4) and len(ds) == 2
    assert ds.x[0].eq(-1.0).all()
    assert ds.x[1].eq(1.0).all()


def test_image_folder_split_subfolders(tmp_path):
    save(tmp_path / "train" / "a" / "1.png", np.zeros((4, 4), np.uint8))
    save(tmp_path / "train" / "b" / "2.png", np.zeros((4, 4), np.uint8))
    save(tmp_path / "test" / "a" / "3.png", np.zeros((4, 4), np.uint8))
    tr = load_dataset(str(tmp_path))
    assert len(tr) == 2 and tr.class_names == ("a", "b")   # not classes 'train'/'test'
    te = load_dataset(str(tmp_path), split="test")
    assert len(te) == 1 and te.labels is None


def test_empty_folder_and_bad_image(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("hi")
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path))
    assert str(tmp_path) in str(e.value)
    (tmp_path / "sub" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset(str(tmp_path))


# --------------------------------------------------------------------------- missing data


def test_unknown_name():
    with pytest.raises(DataError) as e:
        load_dataset("imagenet-9000")
    msg = str(e.value)
    for n in ["fmnist", "mnist", "cifar10", "gmm", "moons", "checkerboard"]:
        assert n in msg


def test_bad_split_and_limit():
    with pytest.raises(DataError, match="split"):
        load_dataset("gmm", split="valid")
    with pytest.raises(DataError, match="limit"):
        load_dataset("gmm", limit=0)


def test_missing_data_messages(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("fmnist", data_dir=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path) in msg and "dataset-fashion-mnist" in msg and "--data-dir" in msg
    assert "train-images-idx3-ubyte" in msg and "\n" not in msg

    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("mnist")
    with pytest.raises(DataError) as e:
        load_dataset("mnist", split="test", data_dir=str(tmp_path))
    assert "t10k-images-idx3-ubyte" in str(e.value) and str(tmp_path) in str(e.value)

    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert "data_batch_1.bin" in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("cifar10")


def test_real_fashion_mnist():
    d = Path(FMNIST_DIR)
    if not (d / "t10k-images-idx3-ubyte.gz").exists() and not (d / "t10k-images-idx3-ubyte").exists():
        pytest.skip(f"Fashion-MNIST not installed in {d} (apt-get install dataset-fashion-mnist)")
    ds = load_dataset("fmnist", split="test")
    assert ds.shape == (1, 28, 28) and len(ds) == 10_000
    assert ds.x.min().item() == -1.0 and ds.x.max().item() == 1.0
    assert torch.bincount(ds.labels).tolist() == [1000] * 10


# --------------------------------------------------------------------------- 2-D track


@pytest.mark.parametrize("name", ["gmm", "moons", "checkerboard"])
def test_2d_datasets(name):
    ds = load_dataset(name)
    assert ds.shape == (2,) and len(ds) == 50_000 and ds.x.dtype == torch.float32
    assert ds.labels is None and ds.num_classes == 0
    assert ds.x.mean(0).abs().max() < 0.05
    std = ds.x.std(0)
    assert (std > 0.4).all() and (std < 1.3).all()
    assert torch.equal(load_dataset(name, seed=0).x, ds.x)                 # deterministic
    assert not torch.allclose(load_dataset(name, seed=1, limit=100).x, ds.x[:100])
    assert torch.equal(load_dataset(name, limit=100).x, ds.x[:100])       # limit = prefix
    test = load_dataset(name, split="test")
    assert len(test) == 10_000 and not torch.allclose(test.x[:100], ds.x[:100])


def test_checkerboard_alternating_squares():
    x = load_dataset("checkerboard", limit=5000).x
    assert x.abs().max() <= 1.0
    cells = torch.floor(2 * x).long()                 # squares of side 0.5 on [-1, 1]^2
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    assert len({tuple(c) for c in cells.tolist()}) == 8


def test_gmm_single_component_closed_form():
    mu, s = torch.tensor([[0.3, -0.7]]), 0.2
    g = GMM(mu, std=s)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(16, 2, dtype=dtype, generator=torch.Generator().manual_seed(0))
        sigma = torch.linspace(0.01, 5.0, 16, dtype=dtype)
        expected = mu.to(dtype) + (s**2 / (s**2 + sigma**2))[:, None] * (x - mu.to(dtype))
        out = g.denoiser(x, sigma)
        assert out.dtype == dtype
        torch.testing.assert_close(out, expected)


def test_gmm_denoiser_matches_monte_carlo():
    g = default_gmm()
    gen = torch.Generator().manual_seed(0)
    x0 = g.sample(400_000, generator=gen).double()
    queries = torch.tensor([[0.9, 0.2], [-0.3, 0.5], [0.0, 0.0], [1.5, -1.5]], dtype=torch.float64)
    for sigma in (0.3, 0.8):
        # self-normalized importance sampling with prior samples: E[x0 | x] under N(x; x0, s^2)
        logw = -((queries[:, None] - x0[None]) ** 2).sum(-1) / (2 * sigma**2)
        w = torch.softmax(logw, dim=1)
        mc = w @ x0
        exact = g.denoiser(queries, torch.full((4,), sigma, dtype=torch.float64))
        torch.testing.assert_close(exact, mc, atol=0.02, rtol=0)


def test_gmm_denoiser_limits_and_stability():
    g = default_gmm()
    x = g.means[:3].float() + torch.tensor([0.03, -0.02])
    torch.testing.assert_close(g.denoiser(x, 1e-4), x, atol=1e-5, rtol=0)   # sigma -> 0
    torch.testing.assert_close(g.denoiser(x, 0.0), x)
    far = torch.tensor([[3.0, -2.0], [0.1, 0.1]])
    torch.testing.assert_close(g.denoiser(far, torch.tensor([1e4, 1e4])),
                               g.mean().float().expand(2, 2), atol=1e-3, rtol=0)
    # far from every mode with small sigma: finite (logits ~ -4e7), all posterior mass on the
    # nearest mode (1, 0): D = a x + (1 - a) mu with a = std^2 / (std^2 + sigma^2) = 0.8
    out = g.denoiser(torch.tensor([[1e3, 1.0]]), torch.tensor([0.05]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([[800.2, 0.8]]))
    # scalar sigma == per-sample sigma; float64 keeps its dtype
    y = torch.randn(5, 2, dtype=torch.float64)
    torch.testing.assert_close(g.denoiser(y, 0.5), g.denoiser(y, torch.full((5,), 0.5, dtype=torch.float64)))
    # score is the gradient of log_prob
    y.requires_grad_(True)
    (grad,) = torch.autograd.grad(g.log_prob(y, 0.5).sum(), y)
    torch.testing.assert_close(g.score(y.detach(), 0.5), grad)
    assert exact_denoiser("gmm") is not None and exact_denoiser("moons") is None
    torch.testing.assert_close(exact_denoiser("gmm")(y.detach(), 0.5), g.denoiser(y.detach(), 0.5))


def test_gmm_samples_match_dataset_stats():
    g = default_gmm()
    assert 0.5 <= g.data_std <= 1.0
    x = load_dataset("gmm", limit=20_000).x
    assert abs(x.std().item() - g.data_std) < 0.02
    d = torch.cdist(x, g.means.float()).min(1).values
    assert d.mean().item() == pytest.approx(g.std * math.sqrt(math.pi / 2), rel=0.05)


# --------------------------------------------------------------------------- Batches


def indexed_dataset(n):
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 2)
    return Dataset("idx", x, torch.arange(n) % 3, 3)


def ids(xb):
    return xb[:, 0].long().tolist()


def test_batches_deterministic_and_resumable():
    ds = indexed_dataset(50)
    a = Batches(ds, batch=8, seed=3)
    seq = [ids(a.batch_at(k)[0]) for k in range(20)]
    b = Batches(ds, batch=8, seed=3)
    for k in [13, 2, 19, 0, 7, 13]:                        # any order: same batch for same step
        xb, yb = b.batch_at(k)
        assert ids(xb) == seq[k]
        assert yb.tolist() == [i % 3 for i in seq[k]]
    other = Batches(ds, batch=8, seed=4)
    assert [ids(other.batch_at(k)[0]) for k in range(20)] != seq


def test_batches_disjoint_ranks_and_epoch_coverage():
    n, batch, world = 48, 4, 3                              # one epoch = 4 steps
    ranks = [Batches(indexed_dataset(n), batch, seed=0, rank=r, world=world) for r in range(world)]
    for epoch in range(2):
        seen = []
        for step in range(epoch * 4, epoch * 4 + 4):
            per_rank = [ids(r.batch_at(step)[0]) for r in ranks]
            flat = sum(per_rank, [])
            assert len(set(flat)) == batch * world          # ranks disjoint within a step
            seen += flat
        assert sorted(seen) == list(range(n))               # every sample once per epoch
    e0 = sum((ids(r.batch_at(s)[0]) for s in range(4) for r in ranks), [])
    e1 = sum((ids(r.batch_at(s)[0]) for s in range(4, 8) for r in ranks), [])
    assert e0 != e1                                         # a fresh permutation per epoch


def test_batches_wrap_across_epochs():
    n = 10
    b = Batches(indexed_dataset(n), batch=4, seed=1)
    stream = sum((ids(b.batch_at(k)[0]) for k in range(5)), [])   # 20 = exactly 2 epochs
    assert sorted(stream[:10]) == list(range(n)) and sorted(stream[10:]) == list(range(n))
    assert b.epoch_of(2) == 0 and b.epoch_of(3) == 1
    big = Batches(indexed_dataset(n), batch=25, seed=1)            # batch larger than N
    xb, _ = big.batch_at(1)
    assert xb.shape == (25, 2)
    full = sum((ids(big.batch_at(k)[0]) for k in range(2)), [])
    assert all(sorted(full[i * 10:(i + 1) * 10]) == list(range(n)) for i in range(5))
    with pytest.raises(ValueError):
        Batches(indexed_dataset(n), batch=4, seed=0, rank=2, world=2)
