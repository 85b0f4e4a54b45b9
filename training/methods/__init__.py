"""The registry of training methods: name -> class. Each method lives in its own file."""
from __future__ import annotations

import importlib

from fewstep.errors import UserError

# name -> "module:Class"; modules are imported on use.
METHODS = {
    "rf": "training.methods.rf:RectifiedFlow",
    "edm": "training.methods.edm:EDM",
    "cud": "training.methods.cud:CUD",
    "cud-distill": "training.methods.cud_distill:CUDDistill",
    "cd": "training.methods.cd:ConsistencyDistillation",
    "ctm": "training.methods.ctm:CTM",
}


def method_class(name: str):
    if name not in METHODS:
        raise UserError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)
