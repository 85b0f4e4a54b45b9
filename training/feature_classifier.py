"""The feature classifier of `fewstep eval`'s FID: a small CNN trained on the train split of
the dataset being scored (on first use; cached under $FEWSTEP_CACHE/classifiers, keyed by
the exact train data and recipe). Its test accuracy is printed every time; below
TRUST_ACCURACY its FID is marked untrusted."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fewstep.errors import UserError
from fewstep.files import cache_root
from fewstep.training.data import load_dataset

CLASSIFIER_FORMAT = 1          # bump when the architecture or training recipe changes
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
    return cache_root() / "classifiers" / f"{tag}.safetensors"


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
    train = load_dataset(data_name, "train", data_dir=data_dir, limit=train_limit, image_size=image_size)
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
            log(f"cached classifier {path} does not match this train data or recipe: retraining")
        clf = None
    if clf is None:
        test = load_dataset(data_name, "test", data_dir=data_dir, image_size=image_size)
        if verbose:
            log(f"training the feature classifier on {len(train)} {data_name} train images "
                 f"({epochs} epochs, device {device}); cached for later runs")
        net, meta = train_classifier(train, test, epochs=epochs, device=device, progress=progress)
        meta.update(data=data_name, shape=list(train.shape), train_hash=fp, train_limit=train_limit)
        _write_cached(path, net, meta)
        clf = Classifier(net, meta, path, str(device))
        if verbose:
            log(f"feature classifier trained in {meta['train_seconds']:.0f} s")
    if verbose:
        trust = "trusted" if clf.trusted else f"NOT trusted (below {TRUST_ACCURACY:.0%})"
        log(f"feature classifier {path}: test accuracy {clf.test_accuracy:.2%} ({trust})")
    return clf
