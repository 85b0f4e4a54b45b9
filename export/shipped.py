"""The project's shipped models (the demo's defaults, the bench's `--serve` without --export):
small checkpoints in `demo/models/`, exported on demand. Here in the export layer, below both
the demo and serving, which use them.

A shipped model is a directory `demo/models/<name>/` holding

    config.json            the checkpoint's config (the run's config plus its step)
    ema-<decay>.safetensors   one set of weights (the EMA the eval figures were measured on)
                              (`model.safetensors` when the run kept no EMA)
    method.safetensors     tensors the method needs at sampling time (when it has any)
    eval.json              `fewstep eval`'s report of that checkpoint (when there is one)
    ship.json              where it came from: source checkpoint, step, EMA, file hashes,
                           and `recommended_steps`, the step counts it was made for

written by `scripts/ship_demo_models.py`. `fewstep demo` exports each one on first start
into a cache dir (`<cache>/<name>/model`, a `fewstep export` model dir) and reuses that
export while the source hash (the shipped files plus the training and export code that
export runs) is unchanged. This module imports neither torch nor gradio at import time.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from pathlib import Path

from fewstep.errors import UserError
from fewstep.files import cache_root, sha256_file

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = PROJECT_ROOT / "demo" / "models"
SHIP_FILE = "ship.json"
EXPORT_MAX_BATCH = 16  # the page asks for 1..16 images in one request
# the code an export runs (loading the checkpoint, the net, the method's jump, the sampler for
# the parity check, the exporter): a change there re-exports, so the export is what this code makes
_CODE_GLOBS = ("training/build.py", "training/networks.py", "training/config.py",
               "training/checkpoint.py", "training/precond.py", "training/methods/*.py", "export/*.py",
               "export/*.json", "fewstep/*.py")


def default_cache_dir() -> Path:
    return cache_root() / "demo-models"


def shipped_models(root: Path | None = None) -> list[Path]:
    """The shipped model dirs under `root` (default demo/models), sorted by name."""
    root = Path(root) if root is not None else MODELS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / SHIP_FILE).is_file())


def read_ship(src: Path) -> dict:
    try:
        info = json.loads((Path(src) / SHIP_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"shipped model {src}: unreadable {SHIP_FILE} ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("weights"), str):
        raise UserError(f"shipped model {src}: {SHIP_FILE} names no weights file")
    return info


def source_hash(src: Path) -> str:
    """Hash of a shipped model's files and of the code its export runs (+ library versions)."""
    src = Path(src)
    h = hashlib.sha256()
    for p in sorted(src.iterdir()):
        if p.is_file():
            h.update(p.name.encode() + b"\0" + sha256_file(p).encode() + b"\n")
    for pattern in _CODE_GLOBS:
        for p in sorted(PROJECT_ROOT.glob(pattern)):
            h.update(p.relative_to(PROJECT_ROOT).as_posix().encode() + b"\0" + sha256_file(p).encode() + b"\n")
    try:
        from importlib.metadata import version
        h.update(" ".join(version(d) for d in ("torch", "onnx", "onnxscript")).encode())
    except Exception:  # a missing package: export_model will say so
        pass
    return h.hexdigest()[:20]


def _checkpoint_from_shipped(src: Path, dest: Path, info: dict) -> str | None:
    """Lay the shipped files out as a checkpoint dir load_model reads; returns the EMA name."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    weights = src / info["weights"]
    if not weights.is_file():
        raise UserError(f"shipped model {src}: weights file {info['weights']} is missing")
    shutil.copy2(src / "config.json", dest / "config.json")
    # load_model finds a checkpoint by its model.safetensors; the shipped weights stand in
    # for the online ones too, and are exported under their EMA name
    shutil.copy2(weights, dest / "model.safetensors")
    ema = None
    if info["weights"].startswith("ema-"):
        shutil.copy2(weights, dest / info["weights"])
        ema = info["weights"][len("ema-"):-len(".safetensors")]
    for extra in ("method.safetensors", "eval.json"):
        if (src / extra).is_file():
            shutil.copy2(src / extra, dest / extra)
    return ema


def prepare_model(src: Path, cache_dir: Path | None = None, log=print, force: bool = False) -> Path:
    """The exported model dir of a shipped model, exporting it first when needed."""
    src = Path(src)
    info = read_ship(src)
    name = info.get("name") or src.name
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    base = cache / name
    base.mkdir(parents=True, exist_ok=True)
    out = base / "model"
    stamp = base / "source-hash"
    with open(base / ".lock", "w") as lock:  # two demos starting at once export once
        fcntl.flock(lock, fcntl.LOCK_EX)
        key = source_hash(src)
        if not force and (out / "manifest.json").is_file() and stamp.is_file() and stamp.read_text().strip() == key:
            return out
        try:
            from fewstep.export.exporter import export_model  # here: torch and onnx (the export extra), first start only
        except ImportError as e:
            raise UserError(f"exporting the demo models needs the export extra ({e}): "
                            f"pip install -e '.[export,serve,demo]'") from None
        log(f"exporting the default model {name} (first start, or its sources changed) ...")
        ckpt = base / "ckpt"
        ema = _checkpoint_from_shipped(src, ckpt, info)
        stamp.unlink(missing_ok=True)
        export_model(ckpt, out, ema=ema or "none", max_batch=EXPORT_MAX_BATCH, name=name, force=True,
                     recommended_steps=info.get("recommended_steps"),
                     log=lambda msg: log(f"  [export {name}] {msg}"))
        stamp.write_text(key + "\n")
    return out


def prepare_all(root: Path | None = None, cache_dir: Path | None = None, log=print) -> list[Path]:
    models = shipped_models(root)
    if not models:
        raise UserError(f"no shipped models in {root or MODELS_DIR} (scripts/ship_demo_models.py puts them "
                        f"there); or pass exported model dirs with --model")
    return [prepare_model(m, cache_dir, log=log) for m in models]
