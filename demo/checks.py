"""What the page and its API check and say, free of Gradio: a request's checks (one message a
bad field, before anything is sent), the model's texts (classes, step notes, figures) and the
error texts. demo/app.py (the page) and demo/api.py (its typed endpoints) both read these.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fewstep.serving.client import ModelMeta, ServingError
from fewstep.serving.protocol import GAMMA_RANGE, INPUTS, MAX_SEED, input_ranges, range_text

# the request inputs the page has controls of its own for; every other input of the table
# (serving.protocol.INPUTS) gets a number box (`extra_inputs`), checked here and sent
PAGE_INPUTS = ("seed", "steps", "class_label", "gamma")


def extra_inputs() -> list:
    """The table's inputs the page has no control of its own for: one number box each."""
    return [inp for name, inp in INPUTS.items() if name not in PAGE_INPUTS]

MAX_IMAGES = 16
COMPARE_STEPS = (1, 2, 4, 8)
DISPLAY_MIN = 160  # images are scaled up (nearest neighbour, integer factor) to at least this size
# the request contract's seed range, as far as the page's number boxes (JavaScript doubles) hold
# whole numbers exactly
SEED_MAX = min(MAX_SEED, 2**53 - 1)

FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(i) for i in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CLASS_NAMES = {"fmnist": FMNIST_CLASSES, "mnist": MNIST_CLASSES, "cifar10": CIFAR10_CLASSES}


# --- what the page shows, as plain functions (unit-tested without a browser) ---------------------

class BadInput(ValueError):
    """A value the page (or its API) refuses before sending anything; the message says why."""


def _shown(value) -> str:
    """A value as the user typed it (1000.0 from a number box reads 1000)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, str) else str(value)


def whole_number(what: str, value, lo: int, hi: int) -> int:
    """`value` as an int in [lo, hi], or BadInput: nothing is rounded or clamped."""
    rule = f"a whole number in [{lo}, {hi}]"
    if value is None or (isinstance(value, str) and not value.strip()):
        raise BadInput(f"{what} is empty: enter {rule}")
    if isinstance(value, bool):
        raise BadInput(f"{what} must be {rule}, got {value}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise BadInput(f"{what} must be {rule}, got {_shown(value)}") from None
    if not math.isfinite(f) or not f.is_integer() or not lo <= f <= hi:
        raise BadInput(f"{what} must be {rule}, got {_shown(value)}")
    return int(f)


def gamma_value(value) -> float:
    """A gamma in the contract's range ([0, 1]), or BadInput."""
    lo, hi = GAMMA_RANGE
    try:
        g = float(value)
    except (TypeError, ValueError):
        g = math.nan
    if not lo <= g <= hi:  # also NaN
        raise BadInput(f"gamma must be a number in {range_text(lo, hi)}, got {_shown(value)}")
    return g


def is_unreachable(err: Exception) -> bool:
    text = f"{getattr(err, 'code', '')} {getattr(err, 'message', err)}".lower()
    return any(k in text for k in ("unavailable", "failed to connect", "connection refused", "deadline_exceeded",
                                   "socket closed", "connect failed", "no ready server"))


def describe_error(err: Exception, url: str, doing: str = "", markdown: bool = True) -> str:
    """A one-paragraph message (`doing`: what the page was doing); Markdown for the page,
    plain text for API callers."""
    if isinstance(err, BadInput):  # the API names the parameter as it is spelled; the page starts a sentence
        if not markdown:
            return f"{err} (nothing was sent to the server)"
        text = f"⚠️ **{str(err)[0].upper()}{str(err)[1:]}.** Nothing was sent to the server."
    elif is_unreachable(err):
        text = (f"⚠️ **Triton is unreachable at `{url}`**{f' ({doing})' if doing else ''}. Is the server running? "
                f"(`fewstep serve`, or `fewstep demo` without `--url` starts one.) Details: "
                f"{getattr(err, 'message', str(err))[:300]}")
    elif isinstance(err, ServingError) and err.code in ("INVALID_ARGUMENT", "NOT_FOUND"):
        text = f"⚠️ **The server rejected the request** ({err.code}): {err.message}"
    elif isinstance(err, ServingError):
        text = f"⚠️ **The request failed** ({err.code}): {err.message[:500]}"
    else:
        text = f"⚠️ **The request failed**: {str(err)[:500]}"
    return text if markdown else text.replace("⚠️ ", "").replace("**", "").replace("`", "")


def format_latency(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms"


def display_images(images: np.ndarray, min_size: int = DISPLAY_MIN) -> list[np.ndarray]:
    """uint8 [K, H, W, C] -> K arrays for the gallery: grey as [H, W], scaled up by an integer factor."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    k, h, w, c = images.shape
    f = max(1, int(np.ceil(min_size / max(h, w))))
    out = []
    for img in images:
        if f > 1:
            img = img.repeat(f, axis=0).repeat(f, axis=1)
        out.append(np.ascontiguousarray(img[:, :, 0] if c == 1 else img))
    return out


def class_names(meta: ModelMeta, manifest: dict | None) -> list[str]:
    data = (((manifest or {}).get("training") or {}).get("config") or {}).get("data") or {}
    names = _CLASS_NAMES.get(data.get("name"))
    if names and len(names) == meta.num_classes:
        return list(names)
    return [f"class {i}" for i in range(meta.num_classes)]


def gamma_applies(meta: ModelMeta) -> bool:
    """Show the gamma control for stochastic samplers: a method whose sampler takes a gamma
    (the manifest's `gamma_sampling`: CTM), or a model whose default gamma is not 0.
    Consistency models (jump lands at the end) always re-noise."""
    return meta.jump_lands != "end" and (meta.gamma_sampling or meta.gamma > 0)


def steps_text(k: int) -> str:
    return f"{k} step{'s' if k != 1 else ''}"


def counts_text(ks) -> str:
    ks = list(ks)
    body = ", ".join(str(k) for k in ks[:-1]) + (" or " if len(ks) > 1 else "") + str(ks[-1])
    return f"{body} step{'s' if ks != [1] else ''}"


def metric_name(meta: ModelMeta) -> str:
    """'FID' or 'SWD': what `meta.quality` measures (both lower is better)."""
    return "SWD" if (meta.quality or {}).get("metric") == "swd" else "FID"


def figure_text(v: float) -> str:
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def quality_line(meta: ModelMeta) -> str:
    """The eval figure at each step count it was measured at; the counts it was made for in bold."""
    q = meta.quality
    if not q or not q.get("by_steps"):
        return ""
    made = set(meta.made_for)
    parts = [(f"**{k} → {figure_text(v)}** (made for)" if k in made else f"{k} → {figure_text(v)}")
             for k, v in q["by_steps"].items()]
    return (f"{metric_name(meta)} by steps ({q.get('metric')}, {q.get('num', '?')} samples, lower is better): "
            + " · ".join(parts))


def steps_note(meta: ModelMeta, steps: int) -> str:
    """What the manifest says about running `meta` at `steps` steps ('' when it says nothing)."""
    q = (meta.quality or {}).get("by_steps") or {}
    parts = []
    if steps in q:
        parts.append(f"{metric_name(meta)} {figure_text(q[steps])} at {steps_text(steps)}")
    if steps not in meta.made_for:
        best = [k for k in meta.made_for if k in q]
        parts.append(f"{meta.name} was made for {counts_text(meta.made_for)}"
                     + (f" ({metric_name(meta)} {figure_text(q[best[0]])} at {steps_text(best[0])})" if best else ""))
    return "; ".join(parts)


def compare_steps(meta: ModelMeta) -> list[int]:
    """The step counts the compare view shows: those the model was made for and those it was
    evaluated at; 1, 2, 4, 8 are added when that leaves fewer than two."""
    ks = set(meta.made_for) | set(((meta.quality or {}).get("by_steps") or {}))
    if len(ks) < 2:
        ks |= set(COMPARE_STEPS)
    return sorted(k for k in ks if 1 <= k <= meta.max_steps)


def model_info(meta: ModelMeta) -> str:
    shape = "×".join(str(d) for d in meta.shape)
    cond = f"{meta.num_classes} classes" if meta.num_classes else "unconditional"
    sampler = ("consistency sampling (re-noises after every jump)" if meta.jump_lands == "end"
               else f"gamma-sampling (default γ = {meta.gamma:g})" if gamma_applies(meta) else "deterministic sampler")
    line = (f"**{meta.name}** — method `{meta.method or '?'}` · {shape} · {cond} · "
            f"made for **{counts_text(meta.made_for)}** (default {meta.default_steps}; accepts 1–{meta.max_steps}) · {sampler} · "
            f"up to {meta.max_batch} images per request")
    q = quality_line(meta)
    return line + (f"  \n{q}" if q else "")


@dataclass(frozen=True)
class Request:
    """A checked request: what is sent to the server."""
    steps: int
    seeds: list
    label: int | None
    gamma: float | None
    values: dict = field(default_factory=dict)  # the other inputs of the table: {name: one value for every image}


def _extra_value(meta: ModelMeta, name: str, value):
    """One value of a table input the page has no control of its own for, checked as the server will."""
    inp = INPUTS.get(name)
    if inp is None or name in PAGE_INPUTS:
        raise BadInput(f"{name}: unknown input (the server's inputs are {', '.join(INPUTS)})")
    limits = inp.limits(meta)
    if limits is None:
        raise BadInput(f"{name}: {meta.name} takes no {name}")
    if inp.numpy.kind in "iu":
        return whole_number(name, value, *limits)
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and limits[0] <= v <= limits[1]):
        raise BadInput(f"{name}: must be a number in {range_text(*limits)}, got {_shown(value)}")
    return v


def check_request(meta: ModelMeta, steps=None, seed=0, num=1, label=None, gamma=None, **values) -> Request:
    """Check a request against the model before anything is sent; BadInput says what is wrong.
    steps None: the model's default. A label is required by a class-conditional model and refused
    by an unconditional one; a gamma is refused where it would change nothing. values: the other
    inputs of the table by name (None: not sent), each checked against its range."""
    limits = input_ranges(meta)  # the server's ranges (serving.protocol)
    steps = meta.default_steps if steps is None else whole_number("steps", steps, *limits["steps"])
    seed = whole_number("seed", seed, limits["seed"][0], SEED_MAX)
    num = whole_number("number of images", num, 1, min(MAX_IMAGES, meta.max_batch or MAX_IMAGES))
    if meta.num_classes:
        if label is None:
            raise BadInput(f"class label is required by the class-conditional model {meta.name}: "
                           f"a whole number in [0, {meta.num_classes - 1}]")
        label = whole_number("class label", label, *limits["class_label"])
    elif label is not None:
        raise BadInput(f"class label: {meta.name} is unconditional; send no class label")
    if gamma is not None:
        gamma = gamma_value(gamma)
        why = meta.gamma_unused(steps)
        if why:
            raise BadInput(f"gamma: {why}; send no gamma")
    for inp in extra_inputs():
        if values.get(inp.name) is None and inp.required(meta):
            raise BadInput(f"{inp.name}: required ({inp.what})")
    extra = {name: _extra_value(meta, name, v) for name, v in values.items() if v is not None}
    return Request(steps, list(range(seed, seed + num)), label, gamma, extra)


# --- the page -----------------------------------------------------------------------------------
