"""The request contract of a served model and the work behind it, in plain numpy.

Triton's Python models (serving/models/*.py) are thin: they read tensors, call
`parse_request` (validation: every bad input becomes an `InvalidInput` naming the field
and the allowed range); the sampler loop is `fewstep.sampling`'s, driven per sample by
`serving.scheduler` or per batch by `run_group`. Keeping this here,
free of Triton, lets unit tests cover it and keeps the models and the PyTorch sampler
on one code path.
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fewstep import sampling

# --- the request contract ----------------------------------------------------------------------
# The table `INPUTS` names, types, bounds and describes every request input. Looping over it:
# the Triton configs (serving.repository), `parse_request` (each input in the table is parsed,
# checked and handed to the sampler in its `Item`; one not in it is refused), the clients'
# keywords and tensors (serving.client), the page's limits (demo.checks) and the bench.

@dataclass(frozen=True)
class Input:
    """One input of `<name>`, `<name>_sampler` and `<name>_stream`: one value per image, so
    shape [1] after the batch dimension."""
    name: str
    dtype: str              # Triton's name of the type: INT64, FP32
    optional: bool          # may be left out (a conditional input: unless the model has classes)
    what: str               # its help: what it is (the config's comment, the clients' errors)
    limits: Callable        # model (ModelInfo or ModelMeta) -> (lo, hi) inclusive, or None: the model takes none
    noun: str = ""          # how an error names an allowed value ("must be NOUN in [lo, hi]")
    default: str = ""       # what applies when it is left out ("" for a required input)
    conditional: bool = False  # required exactly by class-conditional models, refused by the others
    field: str = ""         # its attribute of `Item`; "" = `Item.extra[name]`
    arg: str = ""           # the clients' keyword for a batch of its values ("" = its name)
    shape: tuple = (1,)     # per image

    def required(self, model) -> bool:
        return not self.optional or (self.conditional and bool(model.num_classes))

    @property
    def keyword(self) -> str:
        return self.arg or self.name

    @property
    def numpy(self) -> np.dtype:
        return np.dtype({"INT64": np.int64, "FP32": np.float32}[self.dtype])

    @property
    def config_type(self) -> str:
        return "TYPE_" + self.dtype


MAX_SEED = 2 ** 63 - 1
SEED_RANGE = (0, MAX_SEED)
GAMMA_RANGE = (0.0, 1.0)
# Integers are INT64 so that no value can wrap before it is checked: Triton converts an
# HTTP JSON number into a narrower input type by truncation (4294967297 -> INT32 1).
INPUTS = {i.name: i for i in (
    Input("seed", "INT64", False, "noise seed (the image depends only on it and the settings)",
          lambda model: SEED_RANGE, field="seed", arg="seeds"),
    Input("steps", "INT64", True, "sampler steps (default: the model's default_steps)",
          lambda model: (1, int(model.max_steps)), noun="an integer", default="the model's default_steps",
          field="steps"),
    Input("class_label", "INT64", True, "class label (required by a class-conditional model)",
          lambda model: (0, int(model.num_classes) - 1) if model.num_classes else None,
          conditional=True, field="label", arg="class_labels"),
    Input("gamma", "FP32", True, "sampler stochasticity (default: the model's gamma)",
          lambda model: GAMMA_RANGE, default="the model's gamma", field="gamma"),
)}
REQUIRED = tuple(name for name, i in INPUTS.items() if not i.optional)


def input_ranges(model) -> dict:
    """{input: (lo, hi)} inclusive, for a model (ModelInfo or ModelMeta: its max_steps and
    num_classes); an input the model takes none of (class_label, unconditional) is absent."""
    return {name: lim for name, inp in INPUTS.items() if (lim := inp.limits(model)) is not None}


def range_text(lo, hi) -> str:
    return f"[{lo:g}, {hi:g}]" if isinstance(lo, float) else f"[{lo}, {hi}]"


class InvalidInput(ValueError):
    """A bad request: the message names the field and the allowed values."""


def is_input_error(message: str) -> bool:
    """Whether an error message is one of the request's validation errors (`InvalidInput`
    names the input first; Triton's own say "inference input"): a gRPC stream carries only
    the message of an error, not its code."""
    head = message.split(":", 1)[0].strip()
    return head.split(" ")[-1] in INPUTS or "inference input" in message


@dataclass(frozen=True)
class ModelInfo:
    """What serving needs from a manifest."""
    name: str
    shape: tuple            # [C, H, W] or [D]
    num_classes: int
    spec: dict              # fewstep.sampling sampler spec
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

    @property
    def default_steps(self) -> int:
        return int(self.spec["default_steps"])


@dataclass(frozen=True)
class ModelMeta:
    """What a client knows of a served model: written by the server into the ensemble's
    config (`to_params`, GetModelConfig), read back by clients (`from_config`)."""
    name: str
    shape: tuple            # [C, H, W] or [D]
    num_classes: int
    max_steps: int
    default_steps: int
    max_batch: int
    gamma: float
    outputs: tuple
    method: str = ""        # the method that trained it (manifest), e.g. "cud"
    jump_lands: str = "s"   # "end": a consistency model, which re-noises after every jump
    recommended_steps: tuple = ()  # the step counts it was made for (manifest); () = (default_steps,)
    quality: dict | None = None    # {"metric", "num", "by_steps": {steps: value}}: eval figures, lower is better
    value_range: tuple = (-1.0, 1.0)
    gamma_sampling: bool = False   # the method's sampler is meant to take a gamma (manifest)

    # config parameter -> field; the config itself carries name, max_batch_size and the outputs
    PARAMS = {"image_shape": "shape", "num_classes": "num_classes", "max_steps": "max_steps",
              "default_steps": "default_steps", "gamma": "gamma", "method": "method", "jump_lands": "jump_lands",
              "value_range": "value_range", "recommended_steps": "recommended_steps", "quality": "quality",
              "gamma_sampling": "gamma_sampling"}
    TEXT = ("method", "jump_lands")  # plain strings; every other parameter is JSON

    @classmethod
    def from_info(cls, info: ModelInfo, outputs, method: str = "", recommended_steps=(), quality=None,
                  gamma_sampling: bool = False):
        return cls(info.name, tuple(info.shape), info.num_classes, info.max_steps, info.default_steps,
                   info.max_batch, float(info.spec.get("gamma", 0.0)), tuple(outputs), method,
                   str(info.spec.get("jump_lands", "s")), tuple(recommended_steps), quality, tuple(info.value_range),
                   bool(gamma_sampling))

    def to_params(self) -> dict:
        out = {}
        for key, f in self.PARAMS.items():
            v = getattr(self, f)
            out[key] = v if f in self.TEXT else json.dumps(list(v) if isinstance(v, tuple) else v)
        return out

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelMeta":
        """From a GetModelConfig answer (as JSON); InvalidInput for a model that is not an ensemble of ours."""
        p = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        if "image_shape" not in p:
            raise InvalidInput(f"model '{cfg.get('name')}' is not a fewstep model (call the ensemble, not its parts)")
        v = {f: (p[k] if f in cls.TEXT else json.loads(p[k])) for k, f in cls.PARAMS.items() if p.get(k)}
        return cls(name=cfg["name"], shape=tuple(v["shape"]), num_classes=int(v["num_classes"]),
                   max_steps=int(v["max_steps"]), default_steps=int(v["default_steps"]),
                   max_batch=int(cfg.get("max_batch_size", 0)), gamma=float(v.get("gamma", 0.0)),
                   outputs=tuple(o["name"] for o in cfg.get("output", [])), method=v.get("method", ""),
                   jump_lands=v.get("jump_lands", "s"),
                   recommended_steps=tuple(int(k) for k in v.get("recommended_steps") or ()),
                   quality=_quality(v.get("quality")), value_range=tuple(v.get("value_range", (-1.0, 1.0))),
                   gamma_sampling=bool(v.get("gamma_sampling", False)))

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    @property
    def made_for(self) -> tuple:
        """The step counts the model was made for (its default step count when the server does not say)."""
        return tuple(self.recommended_steps) or (self.default_steps,)

    def gamma_unused(self, steps: int) -> str | None:
        """Why a gamma sent with `steps` steps would change nothing (None when it is used)."""
        if self.jump_lands == "end":
            return (f"{self.name} is a consistency model: its sampler always re-noises after a jump "
                    f"(gamma is 1), so gamma does not apply")
        if steps == 1:
            return "gamma has no effect at 1 step (the one jump lands at the end; nothing is re-noised)"
        return None


def _quality(q) -> dict | None:
    """The `quality` parameter (step counts are JSON object keys, so strings there)."""
    if not isinstance(q, dict) or not isinstance(q.get("by_steps"), dict):
        return None
    return {**q, "by_steps": {int(k): float(v) for k, v in q["by_steps"].items()}}


@dataclass
class Item:
    """One image to make: its seed, step count, effective gamma and class label."""
    seed: int
    steps: int
    gamma: float
    label: int | None = None
    extra: dict = field(default_factory=dict)  # {name: value} of the table's inputs without a field of their own


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


def _in_range(name: str, col: np.ndarray, lo, hi) -> None:
    bad = ~np.isfinite(col) | (col < lo) | (col > hi)
    if bad.any():
        noun = f"{INPUTS[name].noun} " if name in INPUTS and INPUTS[name].noun else ""
        raise InvalidInput(f"{name}: must be {noun}in {range_text(lo, hi)}, got {col[bad][0].item()!r}")


def _parse_input(info: ModelInfo, inp: Input, raw, n: int) -> np.ndarray | None:
    """One input's [B] column, checked against the model (None: left out, where it may be)."""
    limits = inp.limits(info)
    if raw is None:
        if not inp.required(info):
            return None
        if inp.conditional:
            kind = "an integer" if inp.numpy.kind in "iu" else "a number"
            raise InvalidInput(f"{inp.name}: required by the class-conditional model '{info.name}': "
                               f"{kind} in {range_text(*limits)}")
        raise InvalidInput(f"{inp.name}: required input is missing")
    if limits is None:
        why = "is unconditional" if inp.conditional else f"takes no {inp.name}"
        raise InvalidInput(f"{inp.name}: model '{info.name}' {why}; send no {inp.name}")
    col = _column(inp.name, raw, inp.numpy, n)
    _in_range(inp.name, col, *limits)
    return col


def parse_request(info: ModelInfo, inputs: dict, max_images: int | None = None) -> list[Item]:
    """Validate one request's inputs ({name: array or None}), the one check of each value on the
    server; returns one Item per image (steps: the model's default_steps when not sent)."""
    unknown = sorted(set(k for k, v in inputs.items() if v is not None) - set(INPUTS))
    if unknown:
        raise InvalidInput(f"{unknown[0]}: unknown input (inputs are {', '.join(INPUTS)})")
    for name in REQUIRED:
        if inputs.get(name) is None:
            raise InvalidInput(f"{name}: required input is missing")
    seeds = _column("seed", inputs["seed"], INPUTS["seed"].numpy, None)
    n = seeds.shape[0]
    if n < 1:
        raise InvalidInput("seed: at least one image per request (batch >= 1)")
    limit = max_images or info.max_batch
    if n > limit:
        raise InvalidInput(f"seed: {n} images in one request; the maximum batch is {limit}")
    cols = {}
    for name, inp in INPUTS.items():  # every input of the table: parsed and checked, none dropped
        col = _parse_input(info, inp, inputs.get(name), n)
        if col is not None:
            cols[name] = col
    steps = cols.get("steps", np.full(n, info.default_steps))
    gammas, labels = cols.get("gamma"), cols.get("class_label")
    extra = {name: col for name, col in cols.items() if not INPUTS[name].field}
    return [Item(int(seeds[b]), int(steps[b]),
                 sampling.effective_gamma(info.spec, None if gammas is None else float(gammas[b])),
                 None if labels is None else int(labels[b]), {k: col[b].item() for k, col in extra.items()})
            for b in range(n)]


def run_group(jump, info: ModelInfo, items: list[Item], callback=None) -> np.ndarray:
    """Samples (float32 [B, *shape]) of items that share steps and gamma, by the whole-batch
    loop `fewstep.sampling.run_plan` (the stream model and the in-process baseline; the
    sampler model advances any mix of items per step with `serving.scheduler`). The items
    are checked already (`parse_request`).

    jump(x, t, s, labels) -> x_s on numpy arrays (labels int64 [B] or None).
    """
    steps, gamma = items[0].steps, items[0].gamma
    assert all(it.steps == steps and it.gamma == gamma for it in items)
    labels = None if items[0].label is None else np.array([it.label for it in items], dtype=np.int64)
    x = sampling.run_plan(lambda x, t, s: jump(x, t, s, labels), info.spec, sampling.step_plan(info.spec, steps, gamma),
                          [it.seed for it in items], info.shape, like_x=np.zeros((1,), np.float32), callback=callback)
    return np.asarray(x, dtype=np.float32)


def to_images(info: ModelInfo, x: np.ndarray) -> np.ndarray:
    """float samples [B, C, H, W] -> uint8 [B, H, W, C]."""
    return sampling.to_uint8(x, info.value_range)


def encode_png(img: np.ndarray) -> bytes:
    """uint8 [H, W, C] -> PNG bytes (grey for C = 1, RGB for C = 3): 8 bits, no row filter,
    zlib level 6. Written out here rather than through PIL: the sampler encodes every image
    the ensemble asks for (it asks for every output), and PIL's encoder costs 0.1-0.3 ms for
    a 28x28 image against about 0.03 ms for this (docs/PERFORMANCE.md)."""
    h, w, c = img.shape
    if c not in PNG_COLOR_TYPES or img.dtype != np.uint8:
        raise ValueError(f"encode_png: expected uint8 [H, W, 1 or 3], got {img.dtype} {list(img.shape)}")
    rows = np.zeros((h, 1 + w * c), np.uint8)  # each row: filter byte 0 (none), then its pixels
    rows[:, 1:] = img.reshape(h, w * c)
    header = struct.pack(">IIBBBBB", w, h, 8, PNG_COLOR_TYPES[c], 0, 0, 0)
    return b"".join((PNG_SIGNATURE, _png_chunk(b"IHDR", header), _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)),
                     _png_chunk(b"IEND", b"")))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOR_TYPES = {1: 0, 3: 2}  # channels -> PNG colour type (grey, RGB)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


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
    labels = _parse_input(info, INPUTS["class_label"], labels, n)  # checked as the request's class_label
    return x.astype(np.float32, copy=False), t, s, labels
