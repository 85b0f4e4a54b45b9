"""Preconditionings of a consistency (trajectory) model's jump, and Analytic-Precond.

Every student here (CD and CTM) jumps with

    G(x_t, t, s) = f(t, s) x_t + g(t, s) D_theta(x_t, t, s)            f(t,t) = 1, g(t,t) = 0

where D_theta is an EDM-preconditioned denoiser (c_skip(t) x + c_out(t) F(c_in(t) x, ...)), so
a student initialised from an EDM teacher starts with D_theta = the teacher's denoiser D.
A *preconditioning* is the pair of scalar functions (f, g):

  ctm       f = s/t, g = 1 - s/t: one Euler (DDIM) step of the teacher ODE with D replaced
            by the net (CTM's G = (s/t) x + (1 - s/t) g_theta).
  cm        CM's c_skip'(t) = sd^2 / ((t - s)^2 + sd^2), c_out'(t) = sd (t - s) / sqrt(sd^2 + t^2)
            on the raw net output F, rewritten against D_theta: g = c_out' / c_out = 1 - s/t,
            f = c_skip' - g c_skip (for s = eps this is exactly the consistency model's f).
  analytic  Analytic-Precond (docs/methods/analytic-precond.md): with lambda = -log t and
            h = D - l x, dx/dlambda = -(1 - l) x + h; h modelled as exponential in lambda with
            rate r_lambda along teacher trajectories. Then
                g(t, s) = int_{lam_t}^{lam_s} exp(-int_tau^{lam_s} (1 - l)) exp(int_{lam_t}^tau r) dtau
                f(t, s) = exp(-int_{lam_t}^{lam_s} (1 - l)) - l_t g(t, s)
            l_t = E[tr dD/dx] / d (Hutchinson), r = E<h, dh/dlambda> / E|h|^2 on teacher
            trajectories, both fitted once on a uniform lambda grid. Forms (`ANALYTIC_FORMS`):
            `analytic` = backward, the paper's backward-Euler form: h anchored at s and the
            jump solved implicitly for x_s, f = E / (1 + l_s g0), g = g0 / (1 + l_s g0);
            the project's own, opt-in: `analytic-decay` (r <- min(r, 0)), `analytic-full`
            (r as measured, the unstable forward form), `analytic-none` (r = 0).

The analytic coefficients are evaluated from tables as
    f = (s/t) exp(L(lam_s) - L(lam_t)) - l(lam_t) g,      g = (1 - s/t) R(lam_t, lam_s)
(L = int l dlambda, R = g / (1 - s/t), R(t, t) = 1), with linear / bilinear interpolation in
lambda written in difference form, so that zero statistics give CTM's f, g bit for bit and
f(t, t) = 1, g(t, t) = 0 hold exactly. The interpolation is plain torch (floor, gather),
so the exported ONNX jump carries the tables as constants.

The *consistency gap* of a preconditioning at (t, s) is E|g*(x_t) - D(x_t, t)|^2 / dim with
g* = (Phi_{t->s}(x_t) - f x_t) / g the denoiser that would make the jump exact (Phi = the
teacher's ODE flow, solved accurately): how far a student initialised from the teacher is from
its optimum. `consistency_gap` measures it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import math
import multiprocessing
import os
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from fewstep.errors import UserError
from fewstep.training.methods.base import bcast, ode_step
from fewstep.training.methods.edm import pf_ode_velocity
from fewstep.sampling import EDM_RHO, EDM_SIGMA_DATA, EDM_T_MAX, EDM_T_MIN, karras
from fewstep.training.data import DataError, load_dataset
from fewstep.files import cache_root, sha256_file
from fewstep.training.checkpoint import weights_file

# The Analytic-Precond names and the table form each one trains with (docs/methods/analytic-precond.md):
# `analytic` is the paper's method as far as its public text allows (the backward-Euler form);
# the others are the project's own variants, opt-in under their own names.
ANALYTIC_FORMS = {"analytic": "backward", "analytic-decay": "decay", "analytic-full": "full", "analytic-none": "none"}
PRECONDS = ("cm", "ctm") + tuple(ANALYTIC_FORMS)
DEFAULT_POINTS = 120
DEFAULT_SAMPLES = 4096
FIT_BATCH = 256           # samples per teacher call: per sample cheaper on a CPU than 1024 (measured)
FIT_FORMAT = 3            # bump when the fit computes the statistics differently (part of the cache key)
TRACE_PROBES = ("fd", "vjp", "jvp")
TRACE_DEFAULT = "fd"      # two forwards per point: the cheapest probe on a CPU (measured)
FD_STEP = 1e-3            # the forward difference's step along the probe, relative to x_t's scale sqrt(t^2 + sd^2):
                          # against vjp on the 2-D gmm, l within 6e-5 (a step relative to t alone: 1e-2, rounding)
RATE_CLIP = 20.0          # |r_lambda| is clipped here (it never is on the teachers we measured)
VARIANTS = ("decay", "full", "none", "backward")
TABLE_FORMAT = 1


# --- the three preconditionings -------------------------------------------------------------

class Precond:
    name = "base"

    def coeffs(self, t: torch.Tensor, s: torch.Tensor):
        """(f, g) for per-sample times t >= s > 0 ([B] tensors)."""
        raise NotImplementedError

    def apply(self, x, t, s, denoised):
        f, g = self.coeffs(t, s)
        return bcast(f, x) * x + bcast(g, x) * denoised

    def state_tensors(self) -> dict:
        return {}


class CTMPrecond(Precond):
    name = "ctm"

    def coeffs(self, t, s):
        ratio = s / t
        return ratio, 1 - ratio


class CMPrecond(Precond):
    name = "cm"

    def __init__(self, sigma_data: float = EDM_SIGMA_DATA):
        self.sigma_data = float(sigma_data)

    def coeffs(self, t, s):
        sd2 = self.sigma_data ** 2
        c_skip_cm = sd2 / ((t - s) ** 2 + sd2)
        c_skip_edm = sd2 / (t ** 2 + sd2)
        g = 1 - s / t                      # = c_out' / c_out_edm
        return c_skip_cm - g * c_skip_edm, g


def _interp1(pos: torch.Tensor, table: torch.Tensor):
    """Linear interpolation of table at fractional index pos (clamped to the ends)."""
    n = table.shape[0]
    i = pos.floor().clamp(0, n - 2)
    w = (pos - i).clamp(0.0, 1.0)
    i = i.long()
    a = table[i]
    return a + w * (table[i + 1] - a)


def _interp2(pi: torch.Tensor, pj: torch.Tensor, table: torch.Tensor):
    """Bilinear interpolation of a square table at fractional indices (pi, pj)."""
    n = table.shape[0]
    i = pi.floor().clamp(0, n - 2)
    wi = (pi - i).clamp(0.0, 1.0)
    j = pj.floor().clamp(0, n - 2)
    wj = (pj - j).clamp(0.0, 1.0)
    i, j = i.long(), j.long()
    flat = table.reshape(-1)
    k = i * n + j
    r00, r01, r10, r11 = flat[k], flat[k + 1], flat[k + n], flat[k + n + 1]
    r0 = r00 + wj * (r01 - r00)
    r1 = r10 + wj * (r11 - r10)
    return r0 + wi * (r1 - r0)


class AnalyticPrecond(Precond):
    """Analytic-Precond from fitted tables (see `fit_analytic` and `build_tables`)."""
    name = "analytic"
    KEYS = ("lam", "l", "rate", "L", "R")
    # tables["backward"] = 1: the implicit (backward) form, see build_tables; absent or 0: forward

    def __init__(self, tables: dict):
        missing = [k for k in self.KEYS if k not in tables]
        if missing:
            raise UserError(f"Analytic-Precond tables lack {', '.join(missing)}")
        self.tables = {k: torch.as_tensor(np.asarray(tables[k]) if not torch.is_tensor(tables[k])
                                           else tables[k]).detach().to(torch.float32).cpu()
                       for k in tables}
        lam = self.tables["lam"].double()
        self.n = int(lam.shape[0])
        self.lam0 = float(lam[0])
        self.dlam = float(lam[1] - lam[0])
        n = self.n
        if self.tables["R"].shape != (n, n) or any(self.tables[k].shape != (n,) for k in ("l", "rate", "L")):
            raise UserError("Analytic-Precond tables have inconsistent shapes")
        if not all(bool(torch.isfinite(v).all()) for v in self.tables.values()):
            raise UserError("Analytic-Precond tables hold non-finite values")
        self.backward = bool(float(self.tables["backward"].reshape(-1)[0])) if "backward" in self.tables else False
        self._dev = {}

    def _tab(self, name, like):
        key = (name, like.device, like.dtype)
        if key not in self._dev:
            self._dev[key] = self.tables[name].to(device=like.device, dtype=like.dtype)
        return self._dev[key]

    def coeffs(self, t, s):
        pos_t = (-t.log() - self.lam0) / self.dlam
        pos_s = (-s.log() - self.lam0) / self.dlam
        L, l, R = self._tab("L", t), self._tab("l", t), self._tab("R", t)
        ratio = s / t
        g = (1 - ratio) * _interp2(pos_t, pos_s, R)
        E = ratio * (_interp1(pos_s, L) - _interp1(pos_t, L)).exp()
        if self.backward:  # x_s = E x_t + g (D - l_s x_s), solved for x_s
            den = 1 + _interp1(pos_s, l) * g
            return E / den, g / den
        return E - _interp1(pos_t, l) * g, g

    def state_tensors(self):
        return {f"precond.{k}": v for k, v in self.tables.items()}

    @classmethod
    def from_state(cls, tensors: dict):
        tabs = {k[len("precond."):]: v for k, v in tensors.items() if k.startswith("precond.")}
        return cls(tabs) if tabs else None


def make_precond(name: str, sigma_data: float = EDM_SIGMA_DATA, tables: dict | None = None) -> Precond:
    """A preconditioning by name; the analytic ones from the teacher's raw tables (any form:
    rebuilt in the form the name says)."""
    if name == "ctm":
        return CTMPrecond()
    if name == "cm":
        return CMPrecond(sigma_data)
    if name in ANALYTIC_FORMS:
        if tables is None:
            raise UserError(f"the {name} preconditioning needs fitted tables (fewstep precond fit)")
        return AnalyticPrecond(tables_variant(tables, ANALYTIC_FORMS[name]))
    raise UserError(f"unknown preconditioning {name!r} (known: {', '.join(PRECONDS)})")


# --- tables from statistics ---------------------------------------------------------------------

def lambda_grid(points: int = DEFAULT_POINTS, t_min: float = EDM_T_MIN, t_max: float = EDM_T_MAX) -> np.ndarray:
    """Uniform grid in lambda = -log t, ascending (t descending from t_max to t_min)."""
    if points < 3:
        raise UserError(f"--points must be >= 3, got {points}")
    return np.linspace(-math.log(t_max), -math.log(t_min), int(points))


def _cumtrapz(y: np.ndarray, h: float) -> np.ndarray:
    out = np.zeros_like(y)
    out[1:] = np.cumsum(0.5 * h * (y[1:] + y[:-1]))
    return out


def build_tables(lam: np.ndarray, l: np.ndarray, rate: np.ndarray, backward: bool = False) -> dict:
    """Tables of the analytic coefficients from the statistics l, r on a uniform lambda grid.

    R[i, j] = g(t_i, t_j) / (1 - t_j / t_i), with g's integral done cell by cell: the factor
    exp(tau - lam_j) is integrated exactly and the rest, exp(L_j - L_tau + S_tau - S_i)
    (S = int r), linearly in each cell, so that l = r = 0 gives R = 1 to rounding.
    Only entries with j >= i - 1 (s <= t, plus the first band above, which bilinear
    interpolation near s = t touches) are meaningful; the others are set to 1.
    Also returns f and g on the nodes (j >= i; identity elsewhere) for inspection.

    backward: the exponential model of h is anchored at the end of the jump,
    h_tau = exp(-int_tau^{lam_s} r) h_s (the factor becomes exp(L_j - L_tau + S_tau - S_j)), and
    the jump is solved implicitly for x_s: x_s = E x_t + g0 (D - l_s x_s), i.e.
    f = E / (1 + l_s g0), g = g0 / (1 + l_s g0) (R stores g0; the lookup divides).
    """
    lam = np.asarray(lam, np.float64)
    l = np.asarray(l, np.float64)
    rate = np.asarray(rate, np.float64)
    n = lam.shape[0]
    h = float(lam[1] - lam[0])
    L = _cumtrapz(l, h)
    S = _cumtrapz(rate, h)
    R = np.ones((n, n))
    G = np.zeros((n, n))
    F = np.ones((n, n))
    for j in range(n):
        E = np.exp(lam - lam[j])                          # kernel exp(tau - lam_j) at the nodes
        K1 = E[1:] - E[:-1]                               # int_cell exp(tau - lam_j)
        K2 = (E[1:] * (h - 1) + E[:-1]) / h               # int_cell exp(tau - lam_j) (tau - a) / h
        rows = np.arange(0, min(j + 2, n))               # rows i <= j + 1 are needed
        # w_i(c) = exp(L_j - L_c + S_c - S_i): per row i, cells between i and j
        q = L[j] - L + S                                  # exponent without the -S_i part
        for i in rows:
            if i == j:
                continue
            a, b = (i, j) if i < j else (j, i)
            w = np.exp(q[a:b + 1] - (S[j] if backward else S[i]))
            cell = w[:-1] * K1[a:b] + (w[1:] - w[:-1]) * K2[a:b]
            gij = cell.sum() * (1.0 if i < j else -1.0)
            denom = 1.0 - math.exp(lam[i] - lam[j])
            R[i, j] = gij / denom
            if i < j:
                E_ij = math.exp(-(lam[j] - lam[i]) + L[j] - L[i])
                if backward:
                    den = 1.0 + l[j] * gij
                    G[i, j], F[i, j] = gij / den, E_ij / den
                else:
                    G[i, j], F[i, j] = gij, E_ij - l[i] * gij
    return {"lam": lam, "l": l, "rate": rate, "L": L, "S": S, "R": R, "f": F, "g": G,
            "backward": np.array([1.0 if backward else 0.0])}


# --- fitting the statistics -----------------------------------------------------------------------

def _progress(total, desc, enabled):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def _trace_probe(denoise, x, tt, yb, v, trace: str):
    """(D(x), v * (dD/dx) v) per element, by one of three probes (TRACE_PROBES):
    `fd` a forward difference along v (a second forward, no graph: the cheapest on a CPU,
    measured), `vjp` reverse mode (a forward with graph, then one vector-Jacobian product), `jvp`
    forward mode (one pass giving D and J v)."""
    if trace == "fd":
        eps = FD_STEP * torch.sqrt(tt * tt + EDM_SIGMA_DATA ** 2).reshape(-1, *([1] * (x.dim() - 1)))
        D = denoise(x, tt, yb)
        return D, (denoise(x + eps * v, tt, yb) - D) / eps * v
    if trace == "jvp":
        D, Jv = torch.func.jvp(lambda y: denoise(y, tt, yb), (x,), (v,))
        return D, (Jv * v)
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        D = denoise(x, tt, yb)
        (vJ,) = torch.autograd.grad((D * v).sum(), x)
    return D.detach(), (vJ * v)


def _check_fit_args(samples, trace):
    if samples < 1:
        raise UserError(f"--samples must be >= 1, got {samples}")
    if trace not in TRACE_PROBES:
        raise UserError(f"trace must be one of {', '.join(TRACE_PROBES)}, got {trace!r}")


def _fit_plan(x0, samples, points, batch, seed, t_min=EDM_T_MIN, t_max=EDM_T_MAX):
    """(lambda grid, its times, the samples each chunk walks): the same for any number of
    worker processes."""
    lam = lambda_grid(points, t_min, t_max)
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, x0.shape[0], (int(samples),), generator=gen)
    return lam, np.exp(-lam), [idx[k:k + batch] for k in range(0, int(samples), batch)]


def _tables_of_chunks(lam, chunk_sums, x0, samples: int, variant: str) -> dict:
    """The tables from every chunk's (l_sum, mom), summed in chunk order (so the same sums
    whichever process walked which chunk)."""
    l_sum = sum(c[0] for c in chunk_sums)
    mom = sum(c[1] for c in chunk_sums)
    return tables_from_sums(lam, l_sum, mom, samples, int(np.prod(x0.shape[1:])), variant)


def walk_chunk(denoise, x0, labels, rows, c: int, ts, *, seed: int = 0, trace: str = TRACE_DEFAULT, tick=None):
    """One chunk's sums along one teacher trajectory down the grid `ts`: (l_sum[n], mom[n, 7]).

    The batch starts on the marginal at ts[0] (x0 + t z) and takes one Euler (DDIM) step per grid
    point with the D the trace probe returns, so each point costs the probe alone. Chunk c draws
    its noise and probes from its own generator, so the sums do not depend on which process
    walks which chunk. tick(): called once per point (progress)."""
    n = len(ts)
    dev = x0.device
    xb = x0[rows].to(dev)
    yb = None if labels is None else labels[rows].to(dev)
    g_c = torch.Generator().manual_seed(int(seed) * 100003 + int(c))
    x = xb + float(ts[0]) * torch.randn(xb.shape, generator=g_c).to(dev, xb.dtype)
    dim = int(np.prod(x0.shape[1:]))
    l_sum = np.zeros(n)
    # moments for r between point i and i+1: <D,D'>, <x,D'>, <D,x'>, <x,x'>, |D|^2, <D,x>, |x|^2
    mom = np.zeros((n, 7))

    def f64(a, b):
        return float((a.double() * b.double()).sum())

    prev = None
    for i in range(n):
        tt = torch.full((x.shape[0],), float(ts[i]), device=dev, dtype=x.dtype)
        v = (torch.randint(0, 2, x.shape, generator=g_c) * 2 - 1).to(dev, x.dtype)
        with torch.no_grad():
            D, vJv = _trace_probe(denoise, x, tt, yb, v, trace)
            l_sum[i] = float(vJv.double().sum()) / dim
            if prev is not None:
                xp, Dp = prev
                mom[i - 1] = [f64(Dp, D), f64(xp, D), f64(Dp, x), f64(xp, x), f64(Dp, Dp), f64(Dp, xp), f64(xp, xp)]
            if i + 1 < n:
                prev = (x, D)
                x = x + (float(ts[i + 1]) - float(ts[i])) * (x - D) / float(ts[i])   # Euler = DDIM: D reused
        if tick is not None:
            tick()
    return l_sum, mom


def tables_from_sums(lam, l_sum, mom, samples: int, dim: int, variant: str) -> dict:
    """The tables of `build_tables` from the summed statistics of every chunk."""
    n = len(lam)
    l = l_sum / samples
    rate = np.zeros(n)
    h = float(lam[1] - lam[0])
    for i in range(n - 1):
        DD2, xD2, Dx2, xx2, DD, Dx, xx = mom[i]
        li, lj = l[i], l[i + 1]
        hh = DD - 2 * li * Dx + li * li * xx                    # E|h_i|^2 (sums)
        hh2 = (DD2 - li * xD2) - lj * (Dx2 - li * xx2)          # E<h_i, h_{i+1}>
        if hh > 1e-10 * max(xx, 1e-30):
            rate[i] = (hh2 - hh) / (h * hh)
    rate[n - 1] = rate[n - 2]
    tables = build_tables(lam, l, variant_rate(rate, variant), backward=variant == "backward")
    tables["rate_raw"] = rate
    tables["hh"] = (mom[:, 4] - 2 * l * mom[:, 5] + l * l * mom[:, 6]) / (samples * dim)
    return tables


def fit_analytic(denoise, x0: torch.Tensor, labels: torch.Tensor | None = None, *, points: int = DEFAULT_POINTS,
                 samples: int = DEFAULT_SAMPLES, t_min: float = EDM_T_MIN, t_max: float = EDM_T_MAX, batch: int = FIT_BATCH,
                 seed: int = 0, progress: bool = True, variant: str = "decay", trace: str = TRACE_DEFAULT,
                 log=None) -> dict:
    """Estimate l_lambda and r_lambda of a teacher denoiser and tabulate f, g (in this process).

    denoise(x, sigma[B], labels[B] or None) -> D (the teacher); x0: data samples [N, ...]
    (drawn with replacement to `samples`), labels: their class labels or None.
    Each chunk of `batch` samples walks ONE teacher trajectory down the lambda grid
    (`walk_chunk`). At every point one trace probe gives D, which serves three uses, so nothing
    is evaluated twice:
      l = mean Hutchinson estimate of tr(dD/dx) / dim (one Rademacher probe per sample);
      the Euler (DDIM) step to the next point;
      the finite difference dh/dlambda of the previous point (h = D - l x along the trajectory),
      whence r = E<h, dh/dlambda> / E|h|^2.
    So a point and sample cost the probe alone: two forwards with `fd` (docs/methods/
    analytic-precond.md, "What a fit costs"). `fit_teacher` spreads the chunks over processes.
    Returns the tables of `build_tables` (float64 numpy; r per `variant_rate`) plus the raw rate
    `rate_raw` and E|h|^2 / dim `hh`. log(msg): the ETA after the first chunk.
    """
    _check_fit_args(samples, trace)
    lam, ts, plan = _fit_plan(x0, samples, points, batch, seed, t_min, t_max)
    bar = _progress(len(lam) * len(plan), "precond fit", progress)
    start = time.time()
    chunk_sums = []
    for c, rows in enumerate(plan):
        chunk_sums.append(walk_chunk(denoise, x0, labels, rows, c, ts, seed=seed, trace=trace,
                                     tick=lambda: bar.update(1)))
        if c == 0 and log is not None and len(plan) > 1:
            _log_eta(log, time.time() - start, 1, len(plan), samples)
    bar.close()
    return _tables_of_chunks(lam, chunk_sums, x0, samples, variant)


def _log_eta(log, seconds, done, chunks, samples, workers=1):
    """The time a fit will take, from its first `done` chunks (each process walks one at a time)."""
    log(f"precond fit: {done} of {chunks} chunks in {seconds:.0f} s; about "
        f"{seconds * math.ceil(chunks / workers) / done / 60:.1f} min for all {samples} samples")


def variant_rate(rate_raw, variant: str) -> np.ndarray:
    """The rate r the tables use: `decay` = min(r, 0) (h is extrapolated only where it shrinks
    along the trajectory, which keeps g O(1) on every jump), `full` = r as measured (the plain
    forward form; g explodes on long jumps), `none` = 0 (only l: no model of h), `backward` = r
    as measured, used by the backward (implicit) form of build_tables."""
    r = np.clip(np.asarray(rate_raw, np.float64), -RATE_CLIP, RATE_CLIP)
    if variant == "decay":
        return np.minimum(r, 0.0)
    if variant in ("full", "backward"):
        return r
    if variant == "none":
        return np.zeros_like(r)
    raise UserError(f"unknown Analytic-Precond variant {variant!r} (known: {', '.join(VARIANTS)})")


def tables_variant(tables: dict, variant: str) -> dict:
    """Rebuild saved tables for another rate variant (from the raw statistics they keep)."""
    as_np = {k: (v.double().numpy() if torch.is_tensor(v) else np.asarray(v, np.float64)) for k, v in tables.items()}
    out = build_tables(as_np["lam"], as_np["l"], variant_rate(as_np["rate_raw"], variant),
                       backward=variant == "backward")
    out["rate_raw"], out["hh"] = as_np["rate_raw"], as_np.get("hh", np.zeros_like(as_np["l"]))
    return out


# --- saving and loading ---------------------------------------------------------------------------

def save_tables(path, tables: dict, meta: dict) -> Path:
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tens = {k: torch.as_tensor(np.asarray(v, np.float64)).to(torch.float32).contiguous() for k, v in tables.items()}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tens, str(tmp), metadata={"fewstep_precond": json.dumps({"format": TABLE_FORMAT, **meta})})
    os.replace(tmp, path)
    return path


def load_tables(path) -> tuple[dict, dict]:
    from safetensors import safe_open
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("fewstep_precond", "{}"))
            tabs = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user-facing error
        raise UserError(f"unreadable Analytic-Precond tables {path}: {e}") from None
    return tabs, meta


# --- teachers: where their tables live, their data, their denoiser -----------------------------------

def teacher_key(teacher) -> str:
    """What identifies a teacher's statistics: the sha256 of the weights it samples with (and of
    its config), or 'gmm-exact' for the closed-form 2-D teacher."""
    ckpt = getattr(teacher, "ckpt", None)
    if ckpt is None:
        return "gmm-exact"
    h = hashlib.sha256()
    for name in ("config.json", weights_file(getattr(teacher, "ema", None))):
        h.update(sha256_file(Path(ckpt) / name).encode())
    return h.hexdigest()[:16]


def teacher_tables_path(teacher, points=DEFAULT_POINTS, samples=DEFAULT_SAMPLES, seed=0) -> Path:
    """The cached tables of a teacher for these fit settings, shared by `fewstep precond`, cd and
    ctm: $FEWSTEP_CACHE/precond/<teacher checksum>-p<points>-n<samples>-s<seed>-f<format>.safetensors
    (a teacher whose weights change gets new tables; each teacher pays for a fit once)."""
    name = f"{teacher_key(teacher)}-p{int(points)}-n{int(samples)}-s{int(seed)}-f{FIT_FORMAT}.safetensors"
    return cache_root() / "precond" / name


def teacher_device(teacher) -> torch.device:
    net = getattr(teacher, "net", None)
    if net is not None:
        for p in net.parameters():
            return p.device
    return torch.device("cpu")


def teacher_data(teacher, n: int, seed: int = 0):
    """n training samples (and labels, for conditional teachers) of the teacher's data."""
    d = teacher.config["data"]
    if d.get("name") == "gmm" and getattr(teacher, "gmm", None) is not None:
        return teacher.gmm.sample(int(n), torch.Generator().manual_seed(int(seed))), None
    kw = {"image_size": d["image_size"]} if d.get("image_size") else {}
    try:
        ds = load_dataset(d["name"], "train", data_dir=d.get("data_dir"), limit=d.get("limit"), seed=0, **kw)
    except DataError as e:
        raise UserError(f"the teacher's data: {e}") from None
    labels = ds.labels if getattr(teacher, "num_classes", 0) else None
    return ds.x, labels


def _log(msg: str) -> None:
    print(f"[fewstep] {msg}", file=sys.stderr, flush=True)


# --- the fit of a teacher checkpoint, its chunks spread over worker processes -----------------------

_WORKER = {}
HEAP_KEEP = 256 << 20     # bytes: freed activations stay in the heap (glibc's mallopt), see keep_freed_memory


def keep_freed_memory() -> bool:
    """Keep the teacher's freed activations (~20 MB a tensor at batch 256) in this process's
    heap instead of returning them to the kernel: without it a fit spent a third of its CPU in
    page faults (1.8-2.6 ms of system time per point and sample, measured; 28 of 85 CPU minutes
    of the default fit on two processes). glibc only; False where it does not apply."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, HEAP_KEEP) and libc.mallopt(-1, HEAP_KEEP))   # M_MMAP_, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def _fit_worker_init(ckpt, ema, samples, seed, trace, ts, ticks):
    torch.set_num_threads(1)
    keep_freed_memory()
    _WORKER.update(spec=(ckpt, ema, samples), seed=seed, trace=trace, ts=ts, ticks=ticks)


def _fit_worker_chunk(job):
    w = _WORKER
    if "teacher" not in w:   # loaded by the first chunk, not the initializer: an error reaches the parent
        from fewstep.training.build import load_model   # here: build imports the methods, which import this module
        ckpt, ema, samples = w["spec"]
        w["teacher"] = load_model(ckpt, ema=ema)
        w["x0"], w["labels"] = teacher_data(w["teacher"], max(int(samples), 1), w["seed"])
    c, rows = job
    l_sum, mom = walk_chunk(w["teacher"].denoise, w["x0"], w["labels"], rows, c, w["ts"], seed=w["seed"],
                            trace=w["trace"], tick=lambda: w["ticks"].put(1))
    return c, l_sum, mom


def fit_workers(teacher) -> int:
    """Worker processes of a fit by default: one per thread torch may use (OMP_NUM_THREADS, a
    run's train.threads), each at one thread; one (in-process) for a teacher without a checkpoint
    or on a GPU."""
    if getattr(teacher, "ckpt", None) is None or teacher_device(teacher).type != "cpu":
        return 1
    return max(1, torch.get_num_threads())


def _fit_parallel(teacher, x0, samples, points, seed, batch, trace, workers, progress):
    lam, ts, plan = _fit_plan(x0, samples, points, batch, seed)
    workers = max(1, min(int(workers), len(plan)))
    bar = _progress(len(lam) * len(plan), f"precond fit ({workers} processes)", progress)
    ctx = multiprocessing.get_context("spawn")
    ticks = ctx.Queue()
    sums = {}
    start = time.time()
    with ctx.Pool(workers, initializer=_fit_worker_init,
                  initargs=(str(teacher.ckpt), getattr(teacher, "ema", None), samples, seed, trace, ts, ticks)) as pool:
        pending = pool.imap_unordered(_fit_worker_chunk, list(enumerate(plan)))
        done = threading.Event()
        failed = []

        def collect():
            try:
                for c, l_sum, mom in pending:
                    sums[c] = (l_sum, mom)
                    if len(sums) == 1 and len(plan) > 1:
                        _log_eta(_log, time.time() - start, 1, len(plan), samples, workers)
            except Exception as e:  # noqa: BLE001 - a worker's error, raised in the caller's thread below
                failed.append(e)
            finally:
                done.set()

        collector = threading.Thread(target=collect, daemon=True)
        collector.start()
        while not done.is_set():
            try:
                ticks.get(timeout=0.5)
                bar.update(1)
            except queue.Empty:
                pass
        collector.join()
        while not ticks.empty():
            ticks.get()
            bar.update(1)
    bar.close()
    if failed:
        raise failed[0]
    return _tables_of_chunks(lam, [sums[c] for c in range(len(plan))], x0, samples, "backward")


def fit_teacher(teacher, *, points=DEFAULT_POINTS, samples=DEFAULT_SAMPLES, seed=0, batch=FIT_BATCH,
                progress=True, out=None, trace=TRACE_DEFAULT, workers=None) -> tuple[dict, Path]:
    """Fit the tables of a teacher and save them (default: its cache entry, teacher_tables_path).
    workers: processes that walk the chunks (default `fit_workers`); the tables are the same for
    any number."""
    _check_fit_args(samples, trace)
    x0, labels = teacher_data(teacher, max(int(samples), 1), seed)
    workers = fit_workers(teacher) if workers is None else int(workers)
    start = time.time()
    if workers > 1:
        tables = _fit_parallel(teacher, x0, samples, points, seed, batch, trace, workers, progress)
    else:
        keep_freed_memory()
        dev = teacher_device(teacher)
        tables = fit_analytic(teacher.denoise, x0.to(dev), labels, points=points, samples=samples, seed=seed,
                              batch=batch, progress=progress, variant="backward", trace=trace, log=_log)
    meta = {"points": int(points), "samples": int(samples), "seed": int(seed), "fit_format": FIT_FORMAT,
            "teacher_key": teacher_key(teacher), "ema": getattr(teacher, "ema", None), "trace": trace,
            "workers": workers, "seconds": round(time.time() - start, 2)}
    path = save_tables(out or teacher_tables_path(teacher, points, samples, seed), tables, meta)
    return tables, path


def teacher_tables(teacher, *, points=DEFAULT_POINTS, samples=DEFAULT_SAMPLES, seed=0, progress=True,
                   log=True) -> dict:
    """The cached tables of a teacher for these settings, fitted (and cached) first if there are none."""
    path = teacher_tables_path(teacher, points, samples, seed)
    if path.is_file():
        tabs, _ = load_tables(path)
        return tabs
    if log:
        _log(f"fitting Analytic-Precond statistics ({points} points, {samples} samples) -> {path}")
    tabs, _ = fit_teacher(teacher, points=points, samples=samples, seed=seed, progress=progress)
    return tabs


# --- the consistency gap ---------------------------------------------------------------------------

def gap_times(n: int = 8, t_min: float = EDM_T_MIN, t_max: float = EDM_T_MAX, rho: float = EDM_RHO) -> np.ndarray:
    """n descending Karras times from t_max to t_min."""
    return karras(np.arange(n) / (n - 1), t_min, t_max, rho)


@torch.no_grad()
def consistency_gap(denoise, x0: torch.Tensor, preconds: dict, times, labels=None, *, samples: int = 512,
                    substeps: int = 64, seed: int = 0, batch: int = 512, progress: bool = False) -> dict:
    """E|g* - D|^2 / dim for every pair times[i] > times[j] and every preconditioning.

    The teacher ODE is solved from each t with Heun on a rho=7 grid of `substeps` steps
    down to the last time, passing through every later time of `times`.
    Returns {name: [K, K] numpy array (NaN where j <= i)}.
    """
    times = np.asarray(times, np.float64)
    k = len(times)
    out = {name: np.full((k, k), np.nan) for name in preconds}
    acc = {name: np.zeros((k, k)) for name in preconds}
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, x0.shape[0], (int(samples),), generator=gen)
    dim = int(np.prod(x0.shape[1:]))
    dev = x0.device
    bar = _progress(k - 1, "consistency gap", progress)
    for i in range(k - 1):
        t = float(times[i])
        # sub-grid from t to times[-1] that contains times[i+1:]
        sub = gap_times(substeps + 1, float(times[-1]), t)
        sub = np.unique(np.concatenate([sub, times[i:]]))[::-1]
        g_i = torch.Generator().manual_seed(int(seed) * 7919 + i)
        for b in range(0, int(samples), batch):
            xb = x0[idx[b:b + batch]].to(dev)
            yb = None if labels is None else labels[idx[b:b + batch]].to(dev)
            xt = xb + t * torch.randn(xb.shape, generator=g_i).to(dev, xb.dtype)
            tt = torch.full((xt.shape[0],), t, device=dev, dtype=xt.dtype)
            D = denoise(xt, tt, yb)
            x = xt
            velocity = pf_ode_velocity(lambda y, u: denoise(y, u, yb))
            for a, c in zip(sub[:-1], sub[1:]):
                x = ode_step(velocity, x, torch.full_like(tt, float(a)), torch.full_like(tt, float(c)))
                hit = np.nonzero(np.isclose(times, c, rtol=1e-12, atol=0))[0]
                for j in hit:
                    if j <= i:
                        continue
                    ss = torch.full_like(tt, float(times[j]))
                    for name, pc in preconds.items():
                        f, g = pc.coeffs(tt, ss)
                        gstar = (x - bcast(f, x) * xt) / bcast(g, x)
                        acc[name][i, j] += float(((gstar - D).double() ** 2).sum()) / dim
        bar.update(1)
    bar.close()
    for name in preconds:
        m = np.triu(np.ones((k, k), bool), 1)
        out[name][m] = acc[name][m] / samples
    return out
