"""Run configuration: presets, defaults, and KEY=VALUE overrides.

A config is a plain JSON-able dict with sections:
  method  {"name": ..., plus the method's options}
  data    {"name", "data_dir", "limit", "image_size"}
  net     {"preset", "arch", plus network kwargs}
  train   {iters, batch, lr, ...}
  teacher path of a teacher checkpoint (or "exact" for the 2-D gmm), or None
"""
from __future__ import annotations

import copy
import inspect
import json

from fewstep.errors import UserError
from fewstep.training.methods import method_class
from fewstep.training.networks import MLP, PRESETS_NET, SongUNet

TRAIN_DEFAULTS = {
    "iters": 1000,
    "batch": 64,          # global batch (split over DDP ranks)
    "lr": 2e-4,
    "optimizer": "adam",  # adam | adamw | radam
    "betas": [0.9, 0.999],
    "weight_decay": 0.0,
    "warmup": 200,        # linear lr warm-up, iterations
    "grad_clip": 1.0,     # max grad norm; 0 = off
    "ema": [0.999],       # one or more EMA decays; the first is the default for sampling
    "ema_warmup": True,   # decay min(ema, (1+step)/(10+step)): short runs' EMAs forget the init
    "seed": 0,
    "ckpt_every": 1000,
    "keep": 3,            # checkpoints kept
    "sample_every": 1000, # PNG grid of samples; 0 = off
    "log_every": 50,
    "bf16": True,         # autocast on GPU only
    "time_limit": 0,      # minutes of training before stopping with a checkpoint; 0 = off. Curricula
                          # (cud-distill stages) then follow the elapsed fraction of it
    "threads": 0,         # CPU threads for torch; 0 = auto: idle CPUs / local processes (training.loop.auto_threads)
}

# preset -> net preset (training.networks.PRESETS_NET) + training settings
PRESETS = {
    "tiny": {"net": "tiny", "train": {"iters": 200, "batch": 16, "lr": 5e-4, "warmup": 20,
                                       "ckpt_every": 100, "sample_every": 0, "log_every": 10}},
    "toy": {"net": "mlp", "train": {"iters": 4000, "batch": 512, "lr": 1e-3, "warmup": 100,
                                     "ema": [0.999], "ckpt_every": 2000, "sample_every": 2000}},
    "fmnist-cpu": {"net": "fmnist-cpu", "train": {"iters": 20000, "batch": 64, "lr": 5e-4,
                                                   "warmup": 500, "ema": [0.999, 0.9999],
                                                   "ckpt_every": 2000, "sample_every": 2000}},
    "fmnist": {"net": "fmnist", "train": {"iters": 50000, "batch": 256, "lr": 3e-4, "warmup": 5000,
                                           "ema": [0.9999, 0.999], "ckpt_every": 5000,
                                           "sample_every": 5000}},
    "cifar10": {"net": "cifar10", "data": "cifar10",
                "train": {"iters": 500000, "batch": 128, "lr": 2e-4, "warmup": 5000,
                          "ema": [0.9999], "ckpt_every": 10000, "sample_every": 10000}},
}

TOY_DATA = ("gmm", "moons", "checkerboard")


def default_preset(data_name: str) -> str:
    return "toy" if data_name in TOY_DATA else "fmnist-cpu"


# Filled from the data at train time, not options.
DATA_NET_KEYS = ("img_resolution", "in_channels", "out_channels", "label_dim", "dim")


def net_defaults(preset: str) -> dict:
    """A net preset with every constructor option spelled out, so each can be overridden."""
    p = copy.deepcopy(PRESETS_NET[preset])
    cls = {"unet": SongUNet, "mlp": MLP}[p["arch"]]
    out = {"arch": p["arch"]}
    for name, par in inspect.signature(cls.__init__).parameters.items():
        if par.default is not inspect.Parameter.empty and name not in DATA_NET_KEYS:
            v = par.default
            out[name] = list(v) if isinstance(v, tuple) else v
    out.update({k: list(v) if isinstance(v, tuple) else v for k, v in p.items()})
    return out


def make_config(method: str, data: str | None = None, preset: str | None = None,
                data_dir: str | None = None, teacher: str | None = None,
                overrides: list[str] | None = None) -> dict:
    mcls = method_class(method)
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    data = data or (PRESETS[preset].get("data") if preset else None) or "fmnist"
    preset = preset or default_preset(data)
    p = PRESETS[preset]
    cfg = {
        "method": {"name": method, **copy.deepcopy(mcls.defaults)},
        "data": {"name": data, "data_dir": data_dir, "limit": None, "image_size": None,
                 "conditional": False},
        "net": {"preset": p["net"], **net_defaults(p["net"])},
        # the method's own recipe (cd, ctm: sony/ctm's RAdam) over the preset's; overrides win
        "train": {**copy.deepcopy(TRAIN_DEFAULTS), **copy.deepcopy(p["train"]),
                  **copy.deepcopy(getattr(mcls, "train_defaults", {}))},
        "teacher": teacher,
    }
    for item in overrides or []:
        apply_override(cfg, item)
    return cfg


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(items) -> dict:
    """--set KEY=VALUE items (a method's sampling options) -> {KEY: JSON value (else the string)}."""
    out = {}
    for item in items or []:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise UserError(f"--set {item!r} is not KEY=VALUE")
        out[key] = parse_value(text)
    return out


def apply_override(cfg: dict, item: str) -> None:
    """KEY=VALUE: KEY is section.key (train.lr, net.dropout, method.dt_schedule, data.limit)
    or a bare key that names exactly one option; VALUE is JSON (else a string)."""
    if "=" not in item:
        raise UserError(f"override {item!r} is not KEY=VALUE")
    key, text = item.split("=", 1)
    sections = ("method", "data", "net", "train")
    if "." in key:
        section, name = key.split(".", 1)
        if section not in sections or name not in cfg[section] or (section, name) == ("method", "name"):
            raise UserError(f"unknown override key {key!r}")
    else:
        hits = [s for s in sections if key in cfg[s] and (s, key) != ("method", "name")]
        if not hits:
            raise UserError(f"unknown override key {key!r}")
        if len(hits) > 1:
            raise UserError(f"override key {key!r} is ambiguous: say {' or '.join(h + '.' + key for h in hits)}")
        section, name = hits[0], key
    value = parse_value(text)
    old = cfg[section][name]
    if isinstance(old, bool) and not isinstance(value, bool):
        raise UserError(f"{section}.{name} takes true or false, got {text!r}")
    if isinstance(old, (int, float)) and not isinstance(old, bool) and not isinstance(value, (int, float)):
        raise UserError(f"{section}.{name} takes a number, got {text!r}")
    if isinstance(old, list) and not isinstance(value, list):
        value = [value]
    cfg[section][name] = value
