"""`fewstep eval`: sample quality against step count.

Images: FID between Gaussian fits of features of generated samples and of the test split.
The features come from a small CNN classifier the project trains on the train split of
the same dataset (trained on first use, cached under $FEWSTEP_CACHE/classifiers, its test
accuracy printed every time; below 90% the metric is marked untrusted). Inception FID is
an option where a local TorchScript Inception feature extractor is given.

2-D data: sliced Wasserstein distance (and energy distance) between samples and fresh
data drawn from the generator of the dataset.

Writes a JSON report (default <checkpoint>/eval.json) and one PNG per step count beside it
(`<stem>-steps<k>.png`: a grid of the first 64 images, or a scatter plot), and prints a
small table.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fewstep.arglists import parse_steps
from fewstep.errors import UserError

CLASSIFIER_FORMAT = 1          # bump when the architecture or training recipe changes
TRUST_ACCURACY = 0.90          # below this test accuracy the classifier FID is not trusted
DEFAULT_EPOCHS = 5
GRID_IMAGES = 64


# ------------------------------------------------------------------------------------------
# metrics

def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64, unbiased) of features [N, D]."""
    f = feats.detach().cpu().double().numpy() if torch.is_tensor(feats) else np.asarray(feats, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {f.shape}")
    mu = f.mean(axis=0)
    d = f - mu
    cov = d.T @ d / (f.shape[0] - 1)
    return mu, cov


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigh, float64)."""
    a = (a + a.T) / 2
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) between two Gaussians.

    Uses tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2): both square roots are of symmetric
    PSD matrices, taken by eigendecomposition in float64 (no scipy needed, no complex parts).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"mismatched statistics: {mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}")
    r1 = _sqrt_psd(s1)
    m = r1 @ ((s2 + s2.T) / 2) @ r1
    tr_cross = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_cross)
    return max(fd, 0.0)


def high_freq_energy(x: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared 4-neighbour Laplacian [N] of images [N, C, H, W] (edges
    replicated): the energy of pixel-scale detail. Isolated bright or dark pixels (speckle,
    left-over noise) raise it; blur lowers it. Reported relative to the data's as `hf_ratio`."""
    p = torch.nn.functional.pad(x.float(), (1, 1, 1, 1), mode="replicate")
    lap = 4 * p[..., 1:-1, 1:-1] - p[..., :-2, 1:-1] - p[..., 2:, 1:-1] - p[..., 1:-1, :-2] - p[..., 1:-1, 2:]
    return (lap ** 2).flatten(1).mean(1)


def _as_points(a) -> torch.Tensor:
    t = a.detach() if torch.is_tensor(a) else torch.as_tensor(np.asarray(a))
    t = t.to("cpu", torch.float64)
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2:
        raise ValueError(f"need points [N, D], got shape {tuple(t.shape)}")
    return t


def _equal_size(a: torch.Tensor, b: torch.Tensor, g: torch.Generator):
    n = min(a.shape[0], b.shape[0])
    if a.shape[0] > n:
        a = a[torch.randperm(a.shape[0], generator=g)[:n]]
    if b.shape[0] > n:
        b = b[torch.randperm(b.shape[0], generator=g)[:n]]
    return a, b


def sliced_wasserstein(a, b, n_proj: int = 256, seed: int = 0) -> float:
    """Mean over `n_proj` random unit directions of the 1-D Wasserstein-2 distance between
    the projections of point sets a [N, D] and b [M, D] (the larger set is subsampled to
    the smaller one's size, so the sorted projections pair up one to one)."""
    a, b = _as_points(a), _as_points(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"dimension mismatch: {a.shape[1]} vs {b.shape[1]}")
    if min(a.shape[0], b.shape[0]) < 1:
        raise ValueError("need at least one point in each set")
    g = torch.Generator().manual_seed(int(seed))
    a, b = _equal_size(a, b, g)
    dirs = torch.randn(n_proj, a.shape[1], generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    pa = (dirs @ a.T).sort(dim=1).values          # [n_proj, N], sorted along the contiguous dim
    pb = (dirs @ b.T).sort(dim=1).values
    w2 = ((pa - pb) ** 2).mean(dim=1).sqrt()
    return float(w2.mean())


def _mean_dist(a: torch.Tensor, b: torch.Tensor, exclude_diag: bool, chunk: int = 2048) -> float:
    total = 0.0
    for i in range(0, a.shape[0], chunk):
        total += float(torch.cdist(a[i:i + chunk], b).sum())
    n, m = a.shape[0], b.shape[0]
    return total / (n * (n - 1) if exclude_diag else n * m)


def energy_distance(a, b, max_points: int = 5000, seed: int = 0) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (within-set terms exclude the
    diagonal: unbiased, so ~0, possibly slightly negative, for equal distributions).
    Each set is subsampled to `max_points` (the cost is quadratic)."""
    a, b = _as_points(a), _as_points(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"dimension mismatch: {a.shape[1]} vs {b.shape[1]}")
    if min(a.shape[0], b.shape[0]) < 2:
        raise ValueError("need at least two points in each set")
    g = torch.Generator().manual_seed(int(seed))
    if a.shape[0] > max_points:
        a = a[torch.randperm(a.shape[0], generator=g)[:max_points]]
    if b.shape[0] > max_points:
        b = b[torch.randperm(b.shape[0], generator=g)[:max_points]]
    return 2 * _mean_dist(a, b, False) - _mean_dist(a, a, True) - _mean_dist(b, b, True)


# ------------------------------------------------------------------------------------------
# the feature classifier

class FeatureNet(nn.Module):
    """A small, cheap CNN (about 1.4M multiply-adds per 28x28 image, so it trains on a
    2-core CPU in minutes): two stride-2 conv blocks (conv, BN, ReLU), adaptive pooling to
    7x7, a 128-d ReLU feature layer (the FID features) and a linear head."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, feat_dim: int = 128):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(7),
            nn.Flatten(),
            nn.Linear(2 * w * 49, feat_dim), nn.ReLU(inplace=True),
        )
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(feat_dim, num_classes)

    def forward(self, x):
        f = self.body(x)
        return f, self.head(self.drop(f))


@dataclass
class Classifier:
    net: FeatureNet
    meta: dict
    path: Path | None = None
    device: str = "cpu"

    @property
    def test_accuracy(self) -> float:
        return float(self.meta["test_accuracy"])

    @property
    def trusted(self) -> bool:
        return self.test_accuracy >= TRUST_ACCURACY

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch: int = 1000, return_logits: bool = False):
        """Images [N, C, H, W] in [-1, 1] -> features [N, 128] (float32, on the CPU)."""
        self.net.eval()
        feats, logits = [], []
        for i in range(0, x.shape[0], batch):
            f, y = self.net(x[i:i + batch].to(self.device, torch.float32))
            feats.append(f.float().cpu())
            logits.append(y.float().cpu())
        f = torch.cat(feats) if feats else torch.zeros(0, self.net.head.in_features)
        if return_logits:
            return f, torch.cat(logits)
        return f


def cache_dir() -> Path:
    return Path(os.path.expanduser(os.environ.get("FEWSTEP_CACHE") or "~/.cache/fewstep"))


def _data_tag(data_name: str) -> str:
    """A file-name-safe tag for a dataset name (folders: their name + a hash of the path)."""
    if re.fullmatch(r"[A-Za-z0-9_.-]+", data_name) and "/" not in data_name:
        return data_name
    p = Path(os.path.expanduser(data_name)).resolve()
    h = hashlib.sha256(str(p).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", p.name or "data") + "-" + h


def classifier_path(data_name: str, shape, train_limit: int | None = None) -> Path:
    tag = f"{_data_tag(data_name)}-{'x'.join(str(int(s)) for s in shape)}"
    if train_limit is not None:
        tag += f"-n{int(train_limit)}"
    return cache_dir() / "classifiers" / f"{tag}.safetensors"


def _fingerprint(x: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(x.numpy()).tobytes())
    h.update(np.ascontiguousarray(labels.numpy()).tobytes())
    return h.hexdigest()


def _load_data(data_name: str, split: str, data_dir=None, limit=None, image_size=None, seed: int = 0):
    from training.data import DataError, load_dataset
    kw = {"image_size": image_size} if image_size else {}
    try:
        return load_dataset(data_name, split, data_dir=data_dir, limit=limit, seed=seed, **kw)
    except DataError as e:
        raise UserError(str(e)) from None


def _log(msg: str) -> None:
    print(f"[fewstep eval] {msg}", file=sys.stderr, flush=True)


def _accuracy(clf: Classifier, x: torch.Tensor, labels: torch.Tensor) -> float:
    _, logits = clf.features(x, return_logits=True)
    return float((logits.argmax(1) == labels).double().mean())


def _read_cached(path: Path, device) -> Classifier | None:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("fewstep_classifier", "null"))
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError, ValueError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict):
        return None
    try:
        net = FeatureNet(int(meta["in_channels"]), int(meta["num_classes"]),
                         int(meta["width"]), int(meta["feat_dim"]))
        net.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError):
        return None
    net.to(device).eval().requires_grad_(False)
    return Classifier(net, meta, path, str(device))


def _write_cached(path: Path, net: FeatureNet, meta: dict) -> None:
    """Atomically: the weights with the metadata inside (the file the reader trusts), then a
    JSON copy of the metadata beside it for people."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f".tmp-{os.getpid()}"
    tmp = path.with_name(path.name + tag)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(tmp), metadata={"fewstep_classifier": json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)
    jpath = path.with_suffix(".json")
    jtmp = jpath.with_name(jpath.name + tag)
    jtmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(jtmp, jpath)


def train_classifier(train, test, epochs: int = DEFAULT_EPOCHS, batch: int = 128, lr: float = 2e-3,
                     seed: int = 0, device="cpu", progress: bool = True) -> tuple[FeatureNet, dict]:
    """Train a FeatureNet on Dataset `train`; returns (net in eval mode, metadata incl. the
    accuracy on Dataset `test`)."""
    from tqdm import tqdm
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    c = int(train.shape[0])
    net = FeatureNet(c, int(train.num_classes)).to(device)
    n = len(train)
    steps_per_epoch = max(1, math.ceil(n / batch))
    total = epochs * steps_per_epoch
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    t0 = time.time()
    bar = tqdm(total=total, disable=not progress, desc="train feature classifier", dynamic_ncols=True,
               file=sys.stderr)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            x = train.x[idx].to(device)
            y = train.labels[idx].to(device)
            _, logits = net(x)
            loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    train_seconds = time.time() - t0
    net.eval().requires_grad_(False)
    clf = Classifier(net, {}, None, str(device))
    acc = _accuracy(clf, test.x, test.labels)
    meta = {
        "format": CLASSIFIER_FORMAT, "arch": "FeatureNet", "in_channels": c,
        "num_classes": int(train.num_classes), "width": 32, "feat_dim": 128,
        "train_n": n, "test_n": len(test), "epochs": epochs, "batch": batch, "lr": lr, "seed": seed,
        "test_accuracy": round(acc, 5), "train_seconds": round(train_seconds, 1),
        "device": str(device),
    }
    return net, meta


def get_classifier(data_name: str, data_dir=None, train_limit: int | None = None,
                   epochs: int = DEFAULT_EPOCHS, device="cpu", image_size: int | None = None,
                   progress: bool = True, verbose: bool = True) -> Classifier:
    """The feature classifier for a dataset: loaded from the cache when a classifier trained
    on exactly this train data is there, else trained (and cached atomically).

    Its test accuracy is printed each time. Raises UserError for unlabeled or 2-D data.
    """
    train = _load_data(data_name, "train", data_dir, train_limit, image_size)
    if len(train.shape) != 3:
        raise UserError(f"the feature classifier is for image data; {data_name} has samples of shape "
                        f"{list(train.shape)}")
    if train.labels is None or train.num_classes < 2:
        raise UserError(f"the feature classifier needs class labels, and {data_name} has none "
                        "(a folder needs one subfolder per class); use --feature inception")
    fp = _fingerprint(train.x, train.labels)
    path = classifier_path(data_name, train.shape, train_limit)
    clf = _read_cached(path, device)
    if clf is not None and (clf.meta.get("format") != CLASSIFIER_FORMAT or clf.meta.get("train_hash") != fp
                            or clf.meta.get("epochs") != epochs):
        if verbose:
            _log(f"cached classifier {path} does not match this train data or recipe: retraining")
        clf = None
    if clf is None:
        test = _load_data(data_name, "test", data_dir, None, image_size)
        if verbose:
            _log(f"training the feature classifier on {len(train)} {data_name} train images "
                 f"({epochs} epochs, device {device}); cached for later runs")
        net, meta = train_classifier(train, test, epochs=epochs, device=device, progress=progress)
        meta.update(data=data_name, shape=list(train.shape), train_hash=fp, train_limit=train_limit)
        _write_cached(path, net, meta)
        clf = Classifier(net, meta, path, str(device))
        if verbose:
            _log(f"feature classifier trained in {meta['train_seconds']:.0f} s")
    if verbose:
        trust = "trusted" if clf.trusted else f"NOT trusted (below {TRUST_ACCURACY:.0%})"
        _log(f"feature classifier {path}: test accuracy {clf.test_accuracy:.2%} ({trust})")
    return clf


# ------------------------------------------------------------------------------------------
# Inception features (optional, from a local file only)

class InceptionFeatures:
    """A TorchScript Inception-v3 feature extractor loaded from a local file, called as
    `net(images_uint8_NCHW_3ch, return_features=True)` (the convention of the FID detector
    that StyleGAN/EDM use, `inception-2015-12-05`, saved with torch.jit.save) or, failing
    that keyword, `net(images)`; it returns features [N, D]."""

    def __init__(self, path, device="cpu"):
        self.path = Path(os.path.expanduser(str(path)))
        if not self.path.is_file():
            raise UserError(f"--inception-weights {self.path}: no such file (Inception weights are "
                            "not available offline; give a local TorchScript file)")
        try:
            with warnings.catch_warnings():   # torch.jit.load is deprecated, still the format in use
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(self.path), map_location=device).eval()
        except Exception as e:  # torch raises RuntimeError/ValueError for non-TorchScript files
            raise UserError(f"--inception-weights {self.path}: not a TorchScript module "
                            f"({str(e).splitlines()[0][:160]})") from None
        self.device = device
        self._kw = True

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch: int = 200) -> torch.Tensor:
        out = []
        for i in range(0, x.shape[0], batch):
            xb = x[i:i + batch].to(self.device, torch.float32)
            if xb.shape[1] == 1:
                xb = xb.repeat(1, 3, 1, 1)
            img = ((xb + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            if self._kw:
                try:
                    f = self.net(img, return_features=True)
                except (RuntimeError, TypeError):
                    self._kw = False
            if not self._kw:
                f = self.net(img)
            if isinstance(f, (tuple, list)):
                f = f[0]
            out.append(f.reshape(f.shape[0], -1).float().cpu())
        return torch.cat(out)


# ------------------------------------------------------------------------------------------
# `fewstep eval`

def add_args(p) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint dir or run dir (its latest checkpoint)")
    p.add_argument("--steps", default="1,2,4,8,16", help="comma-separated step counts (default: 1,2,4,8,16)")
    p.add_argument("--num", type=int, help="samples per step count (default: 10000 images, 5000 2-D points)")
    p.add_argument("--seed", type=int, default=0, help="seeds are seed .. seed+num-1 (default 0)")
    p.add_argument("--gamma", type=float, help="stochastic sampling in [0, 1] (consistency models)")
    p.add_argument("--ema", default="default", help="EMA decay to use, or 'none' for the online weights")
    p.add_argument("--batch", type=int, default=500, help="sampling batch size (default 500)")
    p.add_argument("--out", help="output JSON (default: <checkpoint>/eval.json); PNGs go beside it")
    p.add_argument("--feature", default="classifier", choices=("classifier", "inception"),
                   help="FID features: the project's classifier (default) or Inception (needs --inception-weights)")
    p.add_argument("--inception-weights", help="local TorchScript Inception-v3 FID feature extractor")
    p.add_argument("--data-dir", help="where the dataset files are (default: the checkpoint's)")
    p.add_argument("--classifier-limit", type=int,
                   help="train the feature classifier on the first N train images only (quick checks; "
                        "cached separately)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a sampling option of the model's method, e.g. solver=heun, sample_head=2 (cud)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _quantize(x: torch.Tensor) -> torch.Tensor:
    """Samples -> what a served uint8 image holds, back in [-1, 1]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def _sample_all(model, steps, seeds, labels, gamma, device, batch, progress, desc, consume):
    from tqdm import tqdm
    n = len(seeds)
    with tqdm(total=n, disable=not progress, desc=desc, unit="sample", dynamic_ncols=True,
              file=sys.stderr, leave=False) as bar:
        for i in range(0, n, batch):
            lab = labels[i:i + batch] if labels is not None else None
            x = model.sample(steps, seeds[i:i + batch], labels=lab, gamma=gamma, device=device)
            consume(x.detach())
            bar.update(len(seeds[i:i + batch]))


def run(args) -> int:
    from training.build import load_model
    from training.checkpoint import write_json
    from training.sample import class_labels, grid_image, save_png, save_scatter, steps_title
    from training.sampling import to_uint8

    steps_list = parse_steps(args.steps)
    if args.num is not None and args.num < 2:
        raise UserError(f"--num must be >= 2, got {args.num}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    if args.gamma is not None and not 0.0 <= args.gamma <= 1.0:
        raise UserError(f"--gamma must be in [0, 1], got {args.gamma}")
    if args.classifier_limit is not None and args.classifier_limit < 1:
        raise UserError(f"--classifier-limit must be >= 1, got {args.classifier_limit}")
    if args.inception_weights and args.feature != "inception":
        raise UserError("--inception-weights is used only with --feature inception")
    progress = not args.no_progress
    device = "cuda" if torch.cuda.is_available() else "cpu"

    from training.cli import parse_sets
    model = load_model(args.ckpt, ema=None if args.ema == "none" else args.ema, device=device,
                       method_opts=parse_sets(args.set))
    spec = model.method.sampler_spec()
    bad = [k for k in steps_list if not 1 <= k <= int(spec["max_steps"])]
    if bad:
        raise UserError(f"--steps must be in [1, {spec['max_steps']}] for this model, got {bad[0]}")
    dcfg = model.config["data"]
    data_name = dcfg["name"]
    data_dir = args.data_dir or dcfg.get("data_dir")
    image_size = dcfg.get("image_size")
    shape = tuple(model.shape)
    is_2d = len(shape) == 1
    num = args.num or (5000 if is_2d else 10000)
    out = Path(args.out) if args.out else Path(model.ckpt) / "eval.json"
    if out.suffix.lower() != ".json":
        raise UserError(f"--out must name a .json file, got {out}")
    seeds = list(range(args.seed, args.seed + num))
    labels = class_labels(model.num_classes, num, device)

    report = {
        "ckpt": str(model.ckpt), "method": model.method.name, "data": data_name,
        "ema": model.ema, "num": num, "seed": args.seed, "gamma": args.gamma,
        "step_in_training": model.config.get("step"), "device": device,
    }
    results = []
    t_sample = 0.0

    if is_2d:
        if args.feature != "classifier":
            raise UserError("--feature inception is for image data; 2-D data is scored with the "
                            "sliced Wasserstein distance")
        ref = _load_data(data_name, "test", data_dir, None, None, seed=args.seed + 1).x
        ref2 = _load_data(data_name, "test", data_dir, None, None, seed=args.seed + 2).x
        ref, ref2 = ref[:num], ref2[:num]
        floor = {"swd": sliced_wasserstein(ref2, ref, seed=args.seed),
                 "energy": energy_distance(ref2, ref, seed=args.seed)}
        report.update(metric="swd", classifier=None, reference={
            "what": "the metrics between two independent data samples of the same size (the noise floor)",
            "n": int(ref.shape[0]), **floor})
        for k in steps_list:
            chunks = []
            t0 = time.time()
            _sample_all(model, k, seeds, labels, args.gamma, device, args.batch, progress,
                        f"sample {k} steps", lambda x: chunks.append(x.float().cpu()))
            dt = time.time() - t0
            t_sample += dt
            pts = torch.cat(chunks)
            png = out.with_name(f"{out.stem}-steps{k}.png")
            save_scatter(pts.numpy(), png, steps_title(model.method.name, k), ref=ref.numpy())
            results.append({"steps": k, "swd": sliced_wasserstein(pts, ref, seed=args.seed),
                            "energy": energy_distance(pts, ref, seed=args.seed),
                            "seconds": round(dt, 3), "png": png.name})
    else:
        if args.feature == "inception":
            if not args.inception_weights:
                raise UserError("--feature inception needs --inception-weights FILE: Inception weights are "
                                "not available offline (give a local TorchScript Inception-v3 file)")
            extractor = InceptionFeatures(args.inception_weights, device)
            report.update(metric="fid-inception", classifier=None,
                          inception={"path": str(extractor.path)})
            test = _load_data(data_name, "test", data_dir, None, image_size)
            ref_feats = extractor.features(test.x)
        else:
            clf = get_classifier(data_name, data_dir=data_dir, train_limit=args.classifier_limit,
                                 device=device, image_size=image_size, progress=progress)
            test = _load_data(data_name, "test", data_dir, None, image_size)
            ref_feats, logits = clf.features(test.x, return_logits=True)
            acc = float((logits.argmax(1) == test.labels).double().mean()) if test.labels is not None else None
            extractor = clf
            report.update(metric="fid-classifier", classifier={
                "test_accuracy": acc if acc is not None else clf.test_accuracy,
                "trusted": bool((acc if acc is not None else clf.test_accuracy) >= TRUST_ACCURACY),
                "path": str(clf.path), "train_n": clf.meta.get("train_n"),
                "train_seconds": clf.meta.get("train_seconds")})
            if not report["classifier"]["trusted"]:
                _log(f"warning: the feature classifier's test accuracy is below {TRUST_ACCURACY:.0%}: "
                     "its FID is not to be trusted")
        if tuple(test.shape) != shape:
            raise UserError(f"the model makes {list(shape)} samples but the {data_name} test split holds "
                            f"{list(test.shape)}")
        ref_stats = feature_stats(ref_feats)
        # the noise floor: FID between num train images and the test split
        train_ref = _load_data(data_name, "train", data_dir, num, image_size)
        report["reference"] = {
            "what": "FID between the first num train images and the test split (the floor)",
            "n": len(train_ref), "fid": frechet_distance(*feature_stats(extractor.features(train_ref.x)),
                                                         *ref_stats)}
        report["test_n"] = int(test.x.shape[0])
        hf_data = high_freq_energy(test.x).mean().item()
        report["reference"]["hf_energy"] = hf_data
        del train_ref
        for k in steps_list:
            feats, grid, hf = [], [], []
            t0 = time.time()

            def consume(x):
                xq = _quantize(x)
                if sum(g.shape[0] for g in grid) < GRID_IMAGES:
                    grid.append(xq[:GRID_IMAGES].cpu())
                feats.append(extractor.features(xq))
                hf.append(high_freq_energy(xq).cpu())

            _sample_all(model, k, seeds, labels, args.gamma, device, args.batch, progress,
                        f"sample {k} steps", consume)
            dt = time.time() - t0
            t_sample += dt
            png = out.with_name(f"{out.stem}-steps{k}.png")
            save_png(grid_image(to_uint8(torch.cat(grid)[:GRID_IMAGES])), png)
            results.append({"steps": k, "fid": frechet_distance(*feature_stats(torch.cat(feats)), *ref_stats),
                            "hf_ratio": torch.cat(hf).mean().item() / hf_data,
                            "seconds": round(dt, 3), "png": png.name})

    report["results"] = results
    report["sample_seconds"] = round(t_sample, 3)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    _print_table(report)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _print_table(report: dict) -> None:
    cols = ["steps"] + (["swd", "energy"] if report["metric"] == "swd" else ["fid", "hf_ratio"]) + ["seconds"]
    print(f"{report['method']} on {report['data']}, {report['num']} samples, metric {report['metric']}"
          + (f" (classifier test accuracy {report['classifier']['test_accuracy']:.2%})"
             if report.get("classifier") else ""))
    print("  ".join(f"{c:>8}" for c in cols))
    for r in report["results"]:
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{v:>8d}" if isinstance(v, int) else f"{v:>8.4g}")
        print("  ".join(cells))
    ref = report.get("reference") or {}
    floor = ", ".join(f"{k} {ref[k]:.4g}" for k in ("fid", "swd", "energy") if k in ref)
    if floor:
        print(f"data vs data ({ref['n']} samples): {floor}")
