"""The feature network of the project's FID: a small CNN classifier trained ONCE on the train
split (`fewstep features`, a fixed seed, one CPU thread) and shipped in training/assets/,
pinned by its sha256 (fewstep/figures.py). It is never trained behind the user's back: a
missing or altered file is an error. Its test accuracy is printed every time; below
TRUST_ACCURACY its FID is marked untrusted."""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fewstep.errors import UserError
from fewstep.figures import SHIPPED_FEATURE_NETS
from fewstep.files import sha256_file
from fewstep.training.data import load_dataset
from fewstep.options import check_range

CLASSIFIER_FORMAT = 1          # bump when the architecture or training recipe changes
ASSETS = Path(__file__).resolve().parent / "assets"
TRUST_ACCURACY = 0.90          # below this test accuracy the classifier FID is not trusted
DEFAULT_EPOCHS = 5


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
    sha256: str | None = None

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


def _fingerprint(x: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(x.numpy()).tobytes())
    h.update(np.ascontiguousarray(labels.numpy()).tobytes())
    return h.hexdigest()


def log(msg: str) -> None:
    """A progress line of `fewstep eval` (stderr)."""
    print(f"[fewstep eval] {msg}", file=sys.stderr, flush=True)


def _accuracy(clf: Classifier, x: torch.Tensor, labels: torch.Tensor) -> float:
    _, logits = clf.features(x, return_logits=True)
    return float((logits.argmax(1) == labels).double().mean())


def read_feature_net(path, device="cpu", expect_sha256: str | None = None) -> Classifier:
    """A feature network file -> Classifier. Missing, unreadable or (with expect_sha256) not the
    pinned file: one UserError. Never trains."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if not path.is_file():
        raise UserError(f"the feature network {path} is missing; restore it (git checkout -- {path}) "
                        "rather than train a new one: a new network makes figures that cannot be "
                        "compared with the project's")
    sha = sha256_file(path)
    if expect_sha256 is not None and sha != expect_sha256:
        raise UserError(f"the feature network {path} has sha256 {sha[:12]}, not the pinned {expect_sha256[:12]}; "
                        f"restore it (git checkout -- {path}): its figures would not be comparable")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("fewstep_classifier", "null"))
            state = {k: f.get_tensor(k) for k in f.keys()}
        net = FeatureNet(int(meta["in_channels"]), int(meta["num_classes"]),
                         int(meta["width"]), int(meta["feat_dim"]))
        net.load_state_dict(state)
    except (OSError, SafetensorError, ValueError, json.JSONDecodeError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path} is not a fewstep feature network ({e})") from None
    net.to(device).eval().requires_grad_(False)
    return Classifier(net, meta, path, str(device), sha)


def write_feature_net(path, net: FeatureNet, meta: dict) -> str:
    """Atomically write the weights with their metadata inside; returns the file's sha256."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(tmp), metadata={"fewstep_classifier": json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)
    return sha256_file(path)


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


def shipped_feature_net(data_name: str, device="cpu") -> Classifier:
    """The project's feature network of a dataset (training/assets/, pinned by sha256 in
    fewstep/figures.py). UserError when the dataset has none: train one with `fewstep features`
    and pass it as `--features FILE`."""
    if data_name not in SHIPPED_FEATURE_NETS:
        raise UserError(f"no shipped feature network for {data_name!r} (shipped: {', '.join(SHIPPED_FEATURE_NETS)}): "
                        f"train one once with `fewstep features --data {data_name} --out FILE` and pass "
                        "--features FILE (its sha256 is recorded with every figure)")
    name, sha = SHIPPED_FEATURE_NETS[data_name]
    return read_feature_net(ASSETS / name, device, expect_sha256=sha)


def get_classifier(data_name: str, features=None, device="cpu", verbose: bool = True) -> Classifier:
    """The feature network of an evaluation: the file `features` when given, else the shipped
    one of `data_name`. Never trains. Logs its name, sha256 and test accuracy."""
    clf = read_feature_net(features, device) if features else shipped_feature_net(data_name, device)
    if verbose:
        trust = "trusted" if clf.trusted else f"NOT trusted (below {TRUST_ACCURACY:.0%})"
        log(f"feature network {clf.path.name} sha256 {clf.sha256[:12]}: test accuracy "
            f"{clf.test_accuracy:.2%} ({trust})")
    return clf


def add_features_args(p) -> None:
    p.add_argument("--data", default="fmnist", help="labelled image dataset (default fmnist)")
    p.add_argument("--data-dir", help="where the dataset files are")
    p.add_argument("--out", required=True, help="the feature network file to write (.safetensors)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0, the shipped network's)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p.add_argument("--limit", type=int, help="train on the first N train images only (quick checks)")
    p.add_argument("--no-progress", action="store_true")


def run_features(args) -> int:
    """`fewstep features`: train a feature network once (one CPU thread, a fixed seed) and write
    it. The shipped one is pinned by sha256; a new file is a new evaluator."""
    check_range("--epochs", args.epochs, 1)
    check_range("--limit", args.limit, 1)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out must name a .safetensors file, got {out}")
    train = load_dataset(args.data, "train", data_dir=args.data_dir, limit=args.limit)
    if len(train.shape) != 3:
        raise UserError(f"feature networks are for image data; {args.data} has samples of shape {list(train.shape)}")
    if train.labels is None or train.num_classes < 2:
        raise UserError(f"a feature network needs class labels, and {args.data} has none "
                        "(a folder needs one subfolder per class)")
    test = load_dataset(args.data, "test", data_dir=args.data_dir)
    torch.set_num_threads(1)   # one thread: the same seed gives the same network on this CPU
    log(f"training a feature network on {len(train)} {args.data} train images ({args.epochs} epochs, seed {args.seed})")
    net, meta = train_classifier(train, test, epochs=args.epochs, seed=args.seed, progress=not args.no_progress)
    meta.update(data=args.data, shape=list(train.shape), train_hash=_fingerprint(train.x, train.labels),
                train_limit=args.limit)
    meta.pop("train_seconds", None)   # not part of what the network is
    sha = write_feature_net(out, net, meta)
    print(f"wrote {out}: test accuracy {meta['test_accuracy']:.2%}, sha256 {sha}")
    return 0
