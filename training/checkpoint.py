"""Checkpoints: safetensors weights + JSON, written atomically, never unpickled.

A run directory holds `config.json`, `metrics.jsonl`, `samples/` and
`checkpoints/step-NNNNNNN/`, each checkpoint with:
  config.json          the run's config plus {"step": N, "format": 1, "sha256": {file: hex}}
  model.safetensors    the online network
  ema-<decay>.safetensors  one per EMA decay
  method.safetensors   tensors the method needs at sampling time (optional)
  train_state.safetensors + train_state.json   optimizer and RNG state (for --resume)
A checkpoint directory is written under a temporary name and renamed into place, so
a crash never leaves a half-written checkpoint where a reader would find it. config.json is
written last and records the sha256 of every other file: a reader verifies the files it
loads (`verify`), so bytes damaged on disk later are refused instead of sampled from, and
`--resume` falls back to the newest intact checkpoint (`newest_intact`). Checkpoints from
before the hashes load unverified (with a note, once).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fewstep.errors import UserError
from fewstep.files import sha256_file

FORMAT = 1
MODEL_FILE = "model.safetensors"        # the online network
METHOD_FILE = "method.safetensors"      # tensors the method needs at sampling time


def weights_file(ema: str | None) -> str:
    """The file of one set of a checkpoint's weights: EMA `ema`'s, or the online net's (None)."""
    return f"ema-{ema}.safetensors" if ema else MODEL_FILE


def derived_file(stem: str, ema: str | None) -> str:
    """The name of a file made from one set of a checkpoint's weights and kept beside them
    (e.g. Analytic-Precond tables): <stem>.safetensors for the online net,
    <stem>-ema<decay>.safetensors for an EMA."""
    return f"{stem}-ema{ema}.safetensors" if ema else f"{stem}.safetensors"


def write_json(path: Path, obj) -> None:
    """Atomic JSON write (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _contiguous(tensors: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def optimizer_to_flat(opt: torch.optim.Optimizer):
    """Optimizer state -> (tensors, json): no pickling needed to save or load it."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir, step: int, config: dict, model: dict, emas: dict[str, dict],
                    method_tensors: dict | None = None, train_tensors: dict | None = None,
                    train_meta: dict | None = None, keep: int = 3) -> Path:
    ckdir = Path(run_dir) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / f"step-{step:07d}"
    tmp = ckdir / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_contiguous(model), str(tmp / MODEL_FILE))
    for decay, sd in emas.items():
        save_file(_contiguous(sd), str(tmp / weights_file(decay)))
    if method_tensors:
        save_file(_contiguous(method_tensors), str(tmp / METHOD_FILE))
    if train_tensors is not None:
        save_file(_contiguous(train_tensors), str(tmp / "train_state.safetensors"))
        write_json(tmp / "train_state.json", train_meta or {})
    # config.json last, with the hashes of everything else: in the same directory rename
    write_json(tmp / "config.json", {**config, "step": step, "format": FORMAT, "sha256": hash_files(tmp)})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir) -> list[Path]:
    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.is_dir():
        return []
    return sorted(p for p in ckdir.iterdir() if p.is_dir() and p.name.startswith("step-"))


def find_checkpoint(path) -> Path:
    """A checkpoint dir, or a run dir (its latest checkpoint)."""
    path = Path(path)
    # a checkpoint dir holds its weights; a shipped or copied one may keep only an EMA
    if (path / MODEL_FILE).is_file() or any(path.glob(weights_file("*"))):
        return path
    cks = list_checkpoints(path)
    if cks:
        return cks[-1]
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    raise UserError(f"no checkpoint in {path} (expected model.safetensors, ema-*.safetensors or checkpoints/step-*/)")


def read_config(ckpt: Path) -> dict:
    try:
        cfg = json.loads((ckpt / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {ckpt}: unreadable config.json ({e})") from None
    if not isinstance(cfg, dict) or "method" not in cfg or "net" not in cfg:
        raise UserError(f"checkpoint {ckpt}: config.json is not a fewstep checkpoint config")
    return cfg


def load_tensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"corrupt or unreadable weights file {path}: {e}") from None


def ema_names(ckpt: Path) -> list[str]:
    prefix, suffix = weights_file("*").split("*")
    return sorted(p.name[len(prefix):-len(suffix)] for p in ckpt.glob(weights_file("*")))


# --- integrity ---------------------------------------------------------------------------------

class CorruptCheckpoint(UserError):
    """A checkpoint whose files do not match what was written."""


def hash_files(ckpt: Path) -> dict[str, str]:
    """{name: sha256} of every file of a checkpoint dir but config.json (which holds them)."""
    return {p.name: sha256_file(p) for p in sorted(Path(ckpt).iterdir())
            if p.is_file() and p.name != "config.json"}


_UNVERIFIED_NOTED = False


def verify(ckpt: Path, names: list[str] | None = None, cfg: dict | None = None) -> None:
    """Check the named files (default: every recorded one) against the hashes in config.json;
    raise CorruptCheckpoint with a one-line reason. A checkpoint from before the hashes is
    only checked for readable safetensors headers, with a note (once per process)."""
    global _UNVERIFIED_NOTED
    ckpt = Path(ckpt)
    cfg = read_config(ckpt) if cfg is None else cfg
    recorded = cfg.get("sha256")
    if not isinstance(recorded, dict):
        if not _UNVERIFIED_NOTED:
            _UNVERIFIED_NOTED = True
            print(f"[fewstep] note: checkpoint {ckpt} records no checksums (saved by an older fewstep): "
                  "its files are not verified", file=sys.stderr)
        for name in names if names is not None else [p.name for p in ckpt.glob("*.safetensors")]:
            try:
                with safe_open(str(ckpt / name), framework="pt"):
                    pass
            except (SafetensorError, OSError, ValueError) as e:
                raise CorruptCheckpoint(f"checkpoint {ckpt}: {name} is unreadable ({e})") from None
        return
    for name in names if names is not None else sorted(recorded):
        path = ckpt / name
        if name not in recorded:
            raise CorruptCheckpoint(f"checkpoint {ckpt}: {name} has no checksum in config.json "
                                    "(added after the save?)")
        if not path.is_file():
            raise CorruptCheckpoint(f"checkpoint {ckpt}: {name} is missing")
        if sha256_file(path) != recorded[name]:
            raise CorruptCheckpoint(f"checkpoint {ckpt}: {name} does not match the sha256 recorded at save "
                                    "(the file is corrupt)")


def check_resumable(ckpt: Path) -> dict:
    """The config of a checkpoint that --resume can load completely (raises CorruptCheckpoint)."""
    try:
        cfg = read_config(ckpt)
    except UserError as e:
        raise CorruptCheckpoint(str(e)) from None
    needed = [MODEL_FILE, "train_state.safetensors", "train_state.json"]
    needed += [weights_file(d) for d in cfg.get("train", {}).get("ema", [])]
    recorded = cfg.get("sha256")
    for name in needed:
        if not (ckpt / name).is_file():
            raise CorruptCheckpoint(f"checkpoint {ckpt}: {name} is missing")
    verify(ckpt, sorted(set(recorded) | set(needed)) if isinstance(recorded, dict) else
           [n for n in needed if n.endswith(".safetensors")], cfg)
    read_train_meta(ckpt)
    return cfg


def read_train_meta(ckpt: Path) -> dict:
    path = Path(ckpt) / "train_state.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(f"checkpoint {ckpt}: unreadable train_state.json ({e})") from None
    if not isinstance(meta, dict) or "optimizer" not in meta:
        raise CorruptCheckpoint(f"checkpoint {ckpt}: train_state.json holds no optimizer state")
    return meta


def newest_intact(run_dir) -> tuple[Path | None, list[tuple[Path, str]]]:
    """For --resume: the newest checkpoint that loads completely, and the newer ones that
    do not, each with its reason (newest first)."""
    bad = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            check_resumable(ckpt)
        except CorruptCheckpoint as e:
            bad.append((ckpt, str(e)))
            continue
        return ckpt, bad
    return None, bad


def set_aside(ckpt: Path) -> Path:
    """Rename a corrupt checkpoint to corrupt-step-N[.k]: kept for inspection, never loaded,
    never counted among the kept checkpoints, never overwritten by a new save."""
    dest = ckpt.with_name("corrupt-" + ckpt.name)
    k = 1
    while dest.exists():
        dest = ckpt.with_name(f"corrupt-{ckpt.name}.{k}")
        k += 1
    os.replace(ckpt, dest)
    return dest
