"""The request contract of a served model and the work behind it, in plain numpy.

Triton's Python models (serving/models/*.py) are thin: they read tensors, call
`parse_request` (validation: every bad input becomes an `InvalidInput` naming the field
and the allowed range); the sampler loop is `training.sampling`'s, driven per sample by
`serving.scheduler` or per batch by `run_group`. Keeping this here,
free of Triton, lets unit tests cover it and keeps the models and the PyTorch sampler
on one code path.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from training import sampling

# inputs of `<name>`, `<name>_sampler` and `<name>_stream`: name -> (Triton dtype, numpy dtype).
# Integers are INT64 so that no value can wrap before it is checked: Triton converts an
# HTTP JSON number into a narrower input type by truncation (4294967297 -> INT32 1).
INPUTS = {
    "seed": ("TYPE_INT64", np.int64),
    "steps": ("TYPE_INT64", np.int64),
    "class_label": ("TYPE_INT64", np.int64),
    "gamma": ("TYPE_FP32", np.float32),
}
REQUIRED = ("seed", "steps")
MAX_SEED = 2 ** 63 - 1


class InvalidInput(ValueError):
    """A bad request: the message names the field and the allowed values."""


@dataclass(frozen=True)
class ModelInfo:
    """What serving needs from a manifest."""
    name: str
    shape: tuple            # [C, H, W] or [D]
    num_classes: int
    spec: dict              # training.sampling sampler spec
    max_batch: int
    value_range: tuple = (-1.0, 1.0)

    @classmethod
    def from_manifest(cls, manifest: dict, name: str | None = None) -> "ModelInfo":
        spec = {k: manifest["sampler"][k] for k in sampling.SPEC_KEYS}
        return cls(name=name or manifest["name"], shape=tuple(int(d) for d in manifest["image"]["shape"]),
                   num_classes=int(manifest.get("num_classes", 0)), spec=spec,
                   max_batch=int(manifest.get("max_batch", 64)),
                   value_range=tuple(float(v) for v in manifest["image"].get("value_range", (-1.0, 1.0))))

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    @property
    def image_shape(self) -> tuple:
        """[H, W, C] of the uint8 output."""
        c, h, w = self.shape
        return (h, w, c)

    @property
    def max_steps(self) -> int:
        return int(self.spec["max_steps"])


@dataclass
class Item:
    """One image to make: its seed, step count, effective gamma and class label."""
    seed: int
    steps: int
    gamma: float
    label: int | None = None


def _column(name: str, arr, dtype, batch: int | None) -> np.ndarray:
    """An input as a [B] array, checking dtype and shape [B, 1] (or [1] / [B] without batching)."""
    a = np.asarray(arr)
    if a.dtype != np.dtype(dtype):
        raise InvalidInput(f"{name}: expected dtype {np.dtype(dtype).name}, got {a.dtype.name}")
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    elif a.ndim != 1:
        raise InvalidInput(f"{name}: expected shape [batch, 1], got {list(a.shape)}")
    if batch is not None and a.shape[0] != batch:
        raise InvalidInput(f"{name}: has {a.shape[0]} values for a batch of {batch} (one per image)")
    return a


def parse_request(info: ModelInfo, inputs: dict, max_images: int | None = None) -> list[Item]:
    """Validate one request's inputs ({name: array or None}); returns one Item per image."""
    unknown = sorted(set(k for k, v in inputs.items() if v is not None) - set(INPUTS))
    if unknown:
        raise InvalidInput(f"{unknown[0]}: unknown input (inputs are {', '.join(INPUTS)})")
    for name in REQUIRED:
        if inputs.get(name) is None:
            raise InvalidInput(f"{name}: required input is missing")
    seeds = _column("seed", inputs["seed"], INPUTS["seed"][1], None)
    n = seeds.shape[0]
    if n < 1:
        raise InvalidInput("seed: at least one image per request (batch >= 1)")
    limit = max_images or info.max_batch
    if n > limit:
        raise InvalidInput(f"seed: {n} images in one request; the maximum batch is {limit}")
    if (seeds < 0).any():
        raise InvalidInput(f"seed: must be in [0, {MAX_SEED}], got {int(seeds[seeds < 0][0])}")
    steps = _column("steps", inputs["steps"], INPUTS["steps"][1], n)
    bad = (steps < 1) | (steps > info.max_steps)
    if bad.any():
        raise InvalidInput(f"steps: must be an integer in [1, {info.max_steps}], got {int(steps[bad][0])}")
    labels = None
    if inputs.get("class_label") is not None:
        labels = _column("class_label", inputs["class_label"], INPUTS["class_label"][1], n)
        if info.num_classes == 0:
            raise InvalidInput(f"class_label: model '{info.name}' is unconditional; send no class_label")
        bad = (labels < 0) | (labels >= info.num_classes)
        if bad.any():
            raise InvalidInput(f"class_label: must be in [0, {info.num_classes - 1}], got {int(labels[bad][0])}")
    elif info.num_classes > 0:
        raise InvalidInput(f"class_label: required by the class-conditional model '{info.name}': "
                           f"an integer in [0, {info.num_classes - 1}]")
    gammas = None
    if inputs.get("gamma") is not None:
        gammas = _column("gamma", inputs["gamma"], INPUTS["gamma"][1], n)
        bad = ~np.isfinite(gammas) | (gammas < 0) | (gammas > 1)
        if bad.any():
            raise InvalidInput(f"gamma: must be in [0, 1], got {float(gammas[bad][0])!r}")
    items = []
    for b in range(n):
        g = None if gammas is None else float(gammas[b])
        eff = sampling.check_request(info.spec, int(steps[b]), g)  # consistency models force gamma = 1
        items.append(Item(int(seeds[b]), int(steps[b]), float(eff), None if labels is None else int(labels[b])))
    return items


def run_group(jump, info: ModelInfo, items: list[Item], callback=None) -> np.ndarray:
    """Samples (float32 [B, *shape]) of items that share steps and gamma, by the whole-batch
    loop `training.sampling.sample` (the stream model and the in-process baseline; the
    sampler model advances any mix of items per step with `serving.scheduler`).

    jump(x, t, s, labels) -> x_s on numpy arrays (labels int64 [B] or None).
    """
    steps, gamma = items[0].steps, items[0].gamma
    assert all(it.steps == steps and it.gamma == gamma for it in items)
    labels = None if items[0].label is None else np.array([it.label for it in items], dtype=np.int64)
    x = sampling.sample(lambda x, t, s: jump(x, t, s, labels), info.spec, steps, [it.seed for it in items],
                        info.shape, gamma=gamma, like_x=np.zeros((1,), np.float32), callback=callback)
    return np.asarray(x, dtype=np.float32)


def to_images(info: ModelInfo, x: np.ndarray) -> np.ndarray:
    """float samples [B, C, H, W] -> uint8 [B, H, W, C]."""
    return sampling.to_uint8(x, info.value_range)


def encode_png(img: np.ndarray) -> bytes:
    """uint8 [H, W, C] -> PNG bytes (grey for C = 1, RGB for C = 3)."""
    from PIL import Image

    arr = img[:, :, 0] if img.shape[2] == 1 else img
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def chunks(n: int, size: int):
    for lo in range(0, n, size):
        yield lo, min(n, lo + size)



# --- `<name>_jump`: the raw jump, open to any client, validated like the ensemble ------------

def jump_x_limit(info: ModelInfo) -> float:
    """The largest |x| `<name>_jump` accepts: 100 times the scale of any x_t the sampler can
    make (a sample in the value range plus sigma(t_max) of noise), so a real input is never
    refused while 1e38 (whose jump overflows into garbage) is."""
    scale = max(abs(v) for v in info.value_range) + float(sampling.sigma(info.spec["process"], info.spec["t_max"]))
    return 100.0 * scale


def parse_jump(info: ModelInfo, x, t, s, labels=None):
    """Validate a jump request (x [B, *shape], t, s per sample, class labels); returns
    (x float32 [B, *shape], t [B], s [B], labels int64 [B] or None) or raises InvalidInput."""
    x = np.asarray(x)
    if x.ndim != 1 + len(info.shape) or tuple(x.shape[1:]) != tuple(info.shape):
        raise InvalidInput(f"x: expected shape [batch, {', '.join(str(d) for d in info.shape)}], got {list(x.shape)}")
    n = x.shape[0]
    if n < 1:
        raise InvalidInput("x: at least one sample (batch >= 1)")
    limit = jump_x_limit(info)
    bad = ~np.isfinite(x) | (np.abs(x) > limit)
    if bad.any():
        raise InvalidInput(f"x: every value must be finite with |x| <= {limit:g}, got {float(x[bad][0])!r}")
    # float32, as Triton hands them over: t_max and t_end are compared in the same precision
    lo, hi = float(np.float32(info.spec["t_end"])), float(np.float32(info.spec["t_max"]))
    cols = []
    for name, v in (("t", t), ("s", s)):
        v = _column(name, v, np.float32, n)
        bad = ~np.isfinite(v) | (v < lo) | (v > hi)
        if bad.any():
            raise InvalidInput(f"{name}: must be a time in [{lo:g}, {hi:g}] (the model's process), "
                               f"got {float(v[bad][0])!r}")
        cols.append(v)
    t, s = cols
    if (s > t).any():
        k = int(np.argmax(s > t))
        raise InvalidInput(f"s: must be <= t (a jump goes back in time), got s = {float(s[k])!r} > t = {float(t[k])!r}")
    if info.num_classes:
        if labels is None:
            raise InvalidInput(f"class_label: required, an integer in [0, {info.num_classes - 1}]")
        labels = _column("class_label", labels, np.int64, n)
        bad = (labels < 0) | (labels >= info.num_classes)
        if bad.any():
            raise InvalidInput(f"class_label: must be in [0, {info.num_classes - 1}], got {int(labels[bad][0])}")
    elif labels is not None:
        raise InvalidInput(f"class_label: model '{info.name}' is unconditional; send no class_label")
    return x.astype(np.float32, copy=False), t, s, labels
