"""The 2-D track's data: `gmm` (a mixture of Gaussians with its exact denoiser), `moons` and
`checkerboard`, drawn from seeded generators (training/data.py's `load_dataset` serves them)."""
from __future__ import annotations

import math
from typing import Callable

import torch

NAMES = ("gmm", "moons", "checkerboard")


class GMM:
    """A fixed mixture of isotropic Gaussians in 2-D with known parameters."""

    def __init__(self, means, std: float, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64).reshape(-1, 2)
        k = self.means.shape[0]
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if w.shape[0] != k or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError("weights must be K non-negative numbers with a positive sum")
        self.weights = w / w.sum()
        if not std > 0:
            raise ValueError("std must be positive")
        self.std = float(std)

    @property
    def data_std(self) -> float:
        """Per-coordinate standard deviation of the mixture (averaged over the 2 axes)."""
        mean = (self.weights[:, None] * self.means).sum(0)
        var = (self.weights[:, None] * (self.means - mean) ** 2).sum(0).mean() + self.std ** 2
        return float(var.sqrt())

    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples [n, 2] float32 (on the generator's device, CPU without one)."""
        device = generator.device if generator is not None else torch.device("cpu")
        comp = torch.multinomial(self.weights.to(device), n, replacement=True,
                                 generator=generator)
        z = torch.randn(n, 2, generator=generator, device=device, dtype=torch.float64)
        return (self.means.to(device)[comp] + self.std * z).to(torch.float32)

    def _prep(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not torch.is_floating_point(x):
            x = x.float()
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        sigma = sigma.reshape(x.shape[0], 1)                          # [B, 1]
        means = self.means.to(device=x.device, dtype=x.dtype)          # [K, 2]
        return x, sigma, means

    def _log_resp(self, x, sigma, means):
        var = self.std ** 2 + sigma ** 2                                 # [B, 1]
        d2 = ((x[:, None, :] - means[None]) ** 2).sum(-1)               # [B, K]
        logw = self.weights.to(device=x.device, dtype=x.dtype).log()
        # isotropic, equal variances: the normalizer is the same for every component
        return logw[None] - d2 / (2 * var), var

    def denoiser(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Exact EDM denoiser E[x0 | x0 + sigma * z = x]; sigma scalar or per-sample [B]."""
        x, sig, means = self._prep(x, sigma)
        logits, var = self._log_resp(x, sig, means)
        resp = torch.softmax(logits, dim=-1)                            # stable (logsumexp)
        shrink = self.std ** 2 / var                                    # [B, 1]
        return shrink * x + (1 - shrink) * (resp @ means)

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """grad_x log p_sigma(x) = sum_k r_k (mu_k - x) / (std^2 + sigma^2)."""
        x, sig, means = self._prep(x, sigma)
        logits, var = self._log_resp(x, sig, means)
        return (torch.softmax(logits, dim=-1) @ means - x) / var

    def log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """log density [B] of the mixture convolved with N(0, sigma^2 I)."""
        x, sig, means = self._prep(x, sigma)
        logits, var = self._log_resp(x, sig, means)
        return torch.logsumexp(logits, dim=-1) - torch.log(2 * math.pi * var).reshape(-1)


def default_gmm() -> GMM:
    """8 equal components on a circle of radius 1, std 0.1: data std ~0.71 per axis."""
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = torch.stack([angles.cos(), angles.sin()], dim=1)
    return GMM(means, std=0.1)


def exact_denoiser(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The exact EDM denoiser D(x, sigma) for datasets that have one ('gmm'), else None."""
    if isinstance(name, str) and name.lower() == "gmm":
        return default_gmm().denoiser
    return None


def moons(n: int, g: torch.Generator, noise: float = 0.05) -> torch.Tensor:
    t = torch.rand(n, generator=g, dtype=torch.float64) * math.pi
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.where(upper, t.cos(), 1 - t.cos())
    y = torch.where(upper, t.sin(), 0.5 - t.sin())
    pts = torch.stack([x, y], 1) + noise * torch.randn(n, 2, generator=g, dtype=torch.float64)
    # fixed (not sample-based) centering/scaling so train and test share it:
    # mean (0.5, 0.25); per-axis variances 0.75 and ~0.244 (+ noise^2)
    rms = math.sqrt((0.75 + 0.2442) / 2 + noise ** 2)
    return (pts - torch.tensor([0.5, 0.25], dtype=torch.float64)) / rms


def checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    # uniform on the 8 "black" squares of a 4x4 board on [-2, 2]^2, scaled to [-1, 1]^2
    x1 = torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2
    x2 = (torch.rand(n, generator=g, dtype=torch.float64)
          - torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2)
    x2 = x2 + torch.floor(x1).remainder(2)
    return torch.stack([x1, x2], 1) * 0.5


def sample_points(name: str, n: int, g: torch.Generator) -> torch.Tensor:
    """n points [n, 2] of 2-D dataset `name` (one of NAMES) from generator g."""
    if name == "gmm":
        return default_gmm().sample(n, generator=g)
    if name == "moons":
        return moons(n, g)
    if name == "checkerboard":
        return checkerboard(n, g)
    raise ValueError(f"unknown 2-D dataset {name!r} (known: {', '.join(NAMES)})")
