"""Sampling from checkpoints: image grids and 2-D scatter plots."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from fewstep.plots import save_scatter, steps_title  # noqa: F401  (save_scatter: the one 2-D plot)
from training import sampling


def grid_image(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """uint8 [B, H, W, C] -> one uint8 [rows*H, cols*W, C] image with 2-px gaps."""
    b, h, w, c = images.shape
    cols = cols or int(math.ceil(math.sqrt(b)))
    rows = int(math.ceil(b / cols))
    pad = 2
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(b):
        r, q = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images[i]
    return out


def save_png(img: np.ndarray, path) -> None:
    from PIL import Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp)
    tmp.replace(path)


def class_labels(num_classes: int, n: int, device="cpu"):
    return torch.arange(n, device=device) % num_classes if num_classes else None


def save_samples(x: torch.Tensor, path, title: str = "") -> None:
    """Images -> a PNG grid; 2-D points -> a scatter plot."""
    if x.dim() == 2:
        save_scatter(x.detach().float().cpu().numpy(), path, title)
    else:
        save_png(grid_image(sampling.to_uint8(x)), path)


@torch.no_grad()
def save_grid(method, net, cfg: dict, path, device="cpu", steps: int | None = None, num: int | None = None):
    """A fixed-seed sample grid during training (seeds 0..num-1, the method's default steps)."""
    was_training = net.training
    net.eval()
    shape = tuple(cfg["data"]["shape"])
    num = num or (2000 if len(shape) == 1 else 64)
    steps = steps or method.sampler_spec()["default_steps"]
    labels = class_labels(cfg["net"].get("label_dim", 0), num, device)
    x = method.sample(net, steps, list(range(num)), shape, labels=labels, device=device)
    save_samples(x, path, steps_title(method.name, steps))
    net.train(was_training)
