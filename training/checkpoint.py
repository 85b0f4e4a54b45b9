"""Checkpoints: safetensors weights + JSON, written atomically, never unpickled.

A run directory holds `config.json`, `metrics.jsonl`, `samples/` and
`checkpoints/step-NNNNNNN/`, each checkpoint with:
  config.json          the run's config plus {"step": N, "method": name, "format": 1}
  model.safetensors    the online network
  ema-<decay>.safetensors  one per EMA decay
  method.safetensors   tensors the method needs at sampling time (optional)
  train_state.safetensors + train_state.json   optimizer and RNG state (for --resume)
A checkpoint directory is written under a temporary name and renamed into place, so
a crash never leaves a half-written checkpoint where a reader would find it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fewstep.errors import UserError

FORMAT = 1


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
    write_json(tmp / "config.json", {**config, "step": step, "format": FORMAT})
    save_file(_contiguous(model), str(tmp / "model.safetensors"))
    for decay, sd in emas.items():
        save_file(_contiguous(sd), str(tmp / f"ema-{decay}.safetensors"))
    if method_tensors:
        save_file(_contiguous(method_tensors), str(tmp / "method.safetensors"))
    if train_tensors is not None:
        save_file(_contiguous(train_tensors), str(tmp / "train_state.safetensors"))
        write_json(tmp / "train_state.json", train_meta or {})
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
    if (path / "model.safetensors").is_file() or any(path.glob("ema-*.safetensors")):
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
    except (OSError, json.JSONDecodeError) as e:
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
    return sorted(p.name[len("ema-"):-len(".safetensors")] for p in ckpt.glob("ema-*.safetensors"))
