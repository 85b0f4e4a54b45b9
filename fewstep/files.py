"""Files every layer shares: the cache root and a file's sha256. Standard library only, so
training, export, serving, the demo and the scripts all import it."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    """Where the project keeps what it can make again (distillation data,
    Analytic-Precond tables per teacher, TensorRT caches, the demo's exports):
    $FEWSTEP_CACHE, else ~/.cache/fewstep."""
    return Path(os.path.expanduser(os.environ.get("FEWSTEP_CACHE") or "~/.cache/fewstep"))


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
