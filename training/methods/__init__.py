"""The registry of training methods: name -> class. Each method lives in its own file."""
from __future__ import annotations

import importlib

from fewstep.errors import UserError

# name -> "module:Class"; modules are imported on use.
METHODS = {
    "rf": "fewstep.training.methods.rf:RectifiedFlow",
    "edm": "fewstep.training.methods.edm:EDM",
    "cud": "fewstep.training.methods.cud:CUD",
    "cud-distill": "fewstep.training.methods.cud_distill:CUDDistill",
    "cd": "fewstep.training.methods.cd:ConsistencyDistillation",
    "ctm": "fewstep.training.methods.ctm:CTM",
}


def method_class(name: str):
    if name not in METHODS:
        raise UserError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)
