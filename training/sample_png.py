"""PNG files of a model's samples: an image grid, or a scatter plot of 2-D points
(`fewstep sample`, `fewstep eval` and the training loop's `samples/step-N.png`)."""
from __future__ import annotations

import torch

from fewstep.images import grid_image, save_png
from fewstep.plots import save_scatter, steps_title
from fewstep import sampling


def class_labels(num_classes: int, n: int, device="cpu"):
    """Labels 0, 1, ..., num_classes - 1, 0, ... for n samples; None for an unconditional model."""
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
