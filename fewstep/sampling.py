"""Processes, time grids and the N-step sampler loop, written once.

Everything here is plain array code that runs on torch tensors (training-time
sampling and evaluation) and on numpy arrays (Triton's Python models), so the
two cannot drift. No torch import: serving imports this module without torch.

A *sampler spec* (a dict, stored in checkpoints and in `manifest.json`) says
how a model is sampled:

    process     "flow" (x_t = (1-t) x + t z, t in [0, 1]) or
                "ve"   (x_t = x + t z, t = sigma, EDM-style)
    grid        "uniform" (flows) or "karras" (rho-spaced, EDM-style)
    t_max       where sampling starts (1 for flows, 80 for EDM)
    t_min       the smallest noise level of a karras grid (0.002)
    t_end       where sampling ends (0; a consistency model's eps)
    rho         karras spacing (7)
    jump_lands  "s": the jump goes to the time it is asked for (flows, EDM, CTM);
                "end": it always lands at t_end (consistency models), so the
                sampler must re-noise after every jump (gamma = 1).
    gamma       default stochasticity in [0, 1] (CTM's gamma-sampling)
    max_steps   the largest step count a server accepts
    default_steps

The noise of a sample depends only on its own seed (and the step index), never
on the other samples in its batch: `noise(seeds, k, shape)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# EDM's noise range, Karras spacing and data scale (Karras et al. 2022), used by the VE
# sampler spec, the EDM and consistency methods and Analytic-Precond: here only.
EDM_T_MIN = 0.002
EDM_T_MAX = 80.0
EDM_RHO = 7.0
EDM_SIGMA_DATA = 0.5

SPEC_KEYS = ("process", "grid", "t_max", "t_min", "t_end", "rho", "jump_lands",
             "gamma", "max_steps", "default_steps")


def flow_spec(**kw) -> dict:
    spec = dict(process="flow", grid="uniform", t_max=1.0, t_min=0.0, t_end=0.0, rho=1.0,
                jump_lands="s", gamma=0.0, max_steps=64, default_steps=4)
    spec.update(kw)
    return spec


def ve_spec(**kw) -> dict:
    spec = dict(process="ve", grid="karras", t_max=EDM_T_MAX, t_min=EDM_T_MIN, t_end=0.0, rho=EDM_RHO,
                jump_lands="s", gamma=0.0, max_steps=64, default_steps=8)
    spec.update(kw)
    return spec


# --- processes: x_t = alpha(t) x + sigma(t) z -------------------------------------------

def alpha(process: str, t):
    if process == "flow":
        return 1.0 - t
    if process == "ve":
        return 1.0 + 0.0 * t
    raise ValueError(f"unknown process {process!r}")


def sigma(process: str, t):
    if process in ("flow", "ve"):
        return t
    raise ValueError(f"unknown process {process!r}")


def renoise(process: str, x, s: float, t: float, z):
    """Move a sample from time s up to time t >= s with fresh noise z.

    x_t = (a_t/a_s) x_s + sqrt(sig_t^2 - (a_t/a_s)^2 sig_s^2) z keeps the marginals of
    the forward process exact (for VE this is CTM's x + sqrt(t^2 - s^2) z).
    """
    ratio = float(alpha(process, t)) / float(alpha(process, s))
    var = float(sigma(process, t)) ** 2 - (ratio * float(sigma(process, s))) ** 2
    return ratio * x + math.sqrt(max(var, 0.0)) * z


# --- time grids ----------------------------------------------------------------------------

def karras(u, t_min: float, t_max: float, rho: float):
    """Karras (rho-spaced) times at fractions u of the way from t_max (u = 0) to t_min (u = 1):
    (t_max^(1/rho) + u (t_min^(1/rho) - t_max^(1/rho)))^rho. u: a numpy array or a torch
    tensor; the times are of its type. The sampler's grid, the consistency models' training
    grid, the exporter's random times and the consistency gap's times all come from here."""
    inv = 1.0 / float(rho)
    hi, lo = float(t_max) ** inv, float(t_min) ** inv
    return (hi + u * (lo - hi)) ** float(rho)


def times_at(spec: dict, u):
    """The spec's times at fractions u of the way from t_max (u = 0) to t_end (u = 1): the
    uniform-or-Karras choice, made here only (the sampler's grid, the exporter's random times).
    A karras grid reaches t_min at u = 1; `time_grid` and the callers put t_end there."""
    t_max, t_end = float(spec["t_max"]), float(spec["t_end"])
    if spec["grid"] == "uniform":
        return t_max + u * (t_end - t_max)
    if spec["grid"] == "karras":
        return karras(u, spec["t_min"], t_max, spec["rho"])
    raise ValueError(f"unknown grid {spec['grid']!r}")


def time_grid(spec: dict, steps: int) -> np.ndarray:
    """Descending times t_0 = t_max > ... > t_steps = t_end (float64, steps + 1 points).

    karras: the rho-spaced schedule over steps + 1 points from t_max to t_min, with its
    last point replaced by t_end, so every step is a real move (none is spent going from
    t_min to 0).
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    steps = int(steps)
    u = np.arange(steps + 1, dtype=np.float64) / steps
    grid = times_at(spec, u)
    # the ends exactly: (t_max ** (1/rho)) ** rho can round one ulp off t_max
    grid[0], grid[-1] = float(spec["t_max"]), float(spec["t_end"])
    return grid


def landing_time(spec: dict, t_next: float, gamma: float) -> float:
    """Where a jump aims before re-noising to t_next (CTM's gamma-sampling).

    gamma = 0: straight to t_next (deterministic); gamma = 1: all the way to t_end and
    re-noise (consistency-model multistep sampling).
    """
    t_end = float(spec["t_end"])
    return math.sqrt(1.0 - gamma * gamma) * (t_next - t_end) + t_end


# --- noise from seeds ------------------------------------------------------------------------

def noise(seeds, step: int, shape) -> np.ndarray:
    """Standard normal float32 noise [B, *shape]: sample b's draw depends on seeds[b] and step only."""
    out = np.empty((len(seeds),) + tuple(shape), dtype=np.float32)
    for b, seed in enumerate(seeds):
        seed = int(seed)
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        out[b] = np.random.default_rng([seed, int(step)]).standard_normal(tuple(shape), dtype=np.float32)
    return out


# --- array helpers that work on numpy and torch -----------------------------------------------

def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def like(arr: np.ndarray, x):
    """numpy array -> the array type, dtype and device of x."""
    if _is_torch(x):
        import torch
        return torch.from_numpy(np.ascontiguousarray(arr)).to(device=x.device, dtype=x.dtype)
    return np.asarray(arr, dtype=x.dtype)


def full_like_batch(x, value: float):
    """A per-sample [B] array filled with value, of x's array type, dtype and device."""
    return like(np.full((x.shape[0],), value, dtype=np.float32), x)


# --- the sampler loop ------------------------------------------------------------------------

def check_request(spec: dict, steps, gamma=None) -> float:
    """Validate steps and gamma against a spec; returns the gamma to use."""
    if isinstance(steps, bool) or int(steps) != steps or not 1 <= int(steps) <= int(spec["max_steps"]):
        raise ValueError(f"steps must be an integer in [1, {spec['max_steps']}], got {steps!r}")
    g = float(spec.get("gamma", 0.0)) if gamma is None else float(gamma)
    if not (0.0 <= g <= 1.0):  # also rejects NaN
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    return effective_gamma(spec, g)


def effective_gamma(spec: dict, gamma: float | None = None) -> float:
    """The gamma the sampler uses (of a checked request): the spec's when None; a consistency
    model (its jump lands at the end) always re-noises, gamma 1."""
    g = float(spec.get("gamma", 0.0)) if gamma is None else float(gamma)
    return 1.0 if spec["jump_lands"] == "end" else g


@dataclass(frozen=True)
class Step:
    """One step of the sampler: jump from t to s, then (when s < t_next) re-noise up to t_next."""
    t: float
    s: float
    t_next: float


def step_plan(spec: dict, steps: int, gamma: float) -> tuple:
    """The steps of an N-step sampler with an effective gamma (from `check_request`).

    The same plan drives the whole-batch loop below and serving's per-sample scheduler
    (serving/scheduler.py), so both walk the same grid with the same landing times.
    """
    grid = time_grid(spec, steps)
    n = len(grid) - 1
    plan = []
    for i in range(n):
        t, t_next = float(grid[i]), float(grid[i + 1])
        last = i == n - 1
        s = t_next if (last or gamma == 0.0) else landing_time(spec, t_next, gamma)
        plan.append(Step(t, s, t_next))
    return tuple(plan)


def start_noise(spec: dict, plan: tuple, seeds, shape) -> np.ndarray:
    """x at the first time of the plan: each sample's seed-0 noise, scaled (float32 numpy)."""
    return noise(seeds, 0, shape) * float(sigma(spec["process"], plan[0].t))


def settle(process: str, x, step: Step, i: int, seeds, shape):
    """x just after step i's jump -> x at the step's end: re-noised from the seeds (step i + 1)
    up to t_next when the jump landed below it, unchanged otherwise."""
    if step.s == step.t_next:
        return x
    return renoise(process, x, step.s, step.t_next, like(noise(seeds, i + 1, shape), x))


def sample(jump, spec: dict, steps: int, seeds, shape, *, gamma=None, like_x=None, callback=None):
    """Run the N-step sampler.

    jump(x, t, s) -> x_s with t, s per-sample [B] arrays; `like_x` is an array whose type,
    dtype and device the samples take (a torch tensor or a numpy array; numpy float32 by
    default). `callback(i, x)` is called after every step (previews). Returns x at t_end.
    """
    plan = step_plan(spec, steps, check_request(spec, steps, gamma))
    return run_plan(jump, spec, plan, seeds, shape, like_x=like_x, callback=callback)


def run_plan(jump, spec: dict, plan: tuple, seeds, shape, *, like_x=None, callback=None):
    """The loop of `sample` over a plan from `step_plan` (of a request checked already)."""
    proto = np.zeros((1,), np.float32) if like_x is None else like_x
    x = like(start_noise(spec, plan, seeds, shape), proto)
    for i, step in enumerate(plan):
        x = jump(x, full_like_batch(x, step.t), full_like_batch(x, step.s))
        x = settle(spec["process"], x, step, i, seeds, shape)
        if callback is not None:
            callback(i, x)
    return x


def to_uint8(x, value_range=(-1.0, 1.0)) -> np.ndarray:
    """[B, C, H, W] samples -> uint8 [B, H, W, C] images (numpy)."""
    if _is_torch(x):
        x = x.detach().float().cpu().numpy()
    lo, hi = value_range
    img = (np.asarray(x, dtype=np.float32) - lo) * (255.0 / (hi - lo))
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return img.transpose(0, 2, 3, 1)
