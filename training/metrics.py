"""Sample-quality metrics: FID between Gaussian fits of features, pixel-scale detail, and the
distances of 2-D point sets (sliced Wasserstein, energy distance). Used by `fewstep eval`
(training/evaluate.py) and the scripts' comparisons."""
from __future__ import annotations

import numpy as np
import torch


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


def _point_sets(a, b, min_points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two point sets of the same dimension, each of at least `min_points` points (float64, CPU)."""
    a, b = _as_points(a), _as_points(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"dimension mismatch: {a.shape[1]} vs {b.shape[1]}")
    if min(a.shape[0], b.shape[0]) < min_points:
        raise ValueError(f"need at least {'one point' if min_points == 1 else f'{min_points} points'} in each set")
    return a, b


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
    a, b = _point_sets(a, b, 1)
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
    a, b = _point_sets(a, b, 2)
    g = torch.Generator().manual_seed(int(seed))
    if a.shape[0] > max_points:
        a = a[torch.randperm(a.shape[0], generator=g)[:max_points]]
    if b.shape[0] > max_points:
        b = b[torch.randperm(b.shape[0], generator=g)[:max_points]]
    return 2 * _mean_dist(a, b, False) - _mean_dist(a, a, True) - _mean_dist(b, b, True)
