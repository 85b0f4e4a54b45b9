#!/usr/bin/env python3
"""Ship a checkpoint as one of the demo's default models (`demo/models/<name>/`).

    .venv/bin/python scripts/ship_demo_models.py runs/demo/cud-fmnist --name cud_fmnist
    .venv/bin/python scripts/ship_demo_models.py runs/demo/cd-fmnist/checkpoints/step-0003000 --name cd_fmnist
    .venv/bin/python scripts/ship_demo_models.py demo/models/cd_fmnist --resave   # after re-scoring its eval.json

A run dir stands for its latest checkpoint. What is copied: the checkpoint's config.json,
ONE weights file (an EMA: by default the one its eval.json was measured on, else the
config's first EMA decay; `--ema none` takes the online weights), method.safetensors
(tensors some methods need at sampling time) and eval.json when present. `ship.json`
records the source, step, EMA, file hashes and a summary of the eval figures.
`fewstep demo` exports the shipped models on its first start (see export/shipped.py).
Optimizer state and the other EMAs are not copied: a shipped model stays well under 25 MB.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import sys
from pathlib import Path

from fewstep.export.manifest import check_recommended_steps, sha256_file  # sha256_file: the manifests' "sha256:<hex>"
from fewstep.export.shipped import MODELS_DIR, PROJECT_ROOT as ROOT, SHIP_FILE
from fewstep.errors import UserError
from fewstep.files import sha256_file as hex_sha256  # checkpoints record plain hex
from fewstep.training.checkpoint import find_checkpoint as find_run_checkpoint

SIZE_LIMIT = 25 * 1024 * 1024


def find_checkpoint(path: Path) -> Path:
    try:
        return find_run_checkpoint(path)
    except UserError as e:
        sys.exit(f"ship_demo_models: {e}")


def eval_summary(report) -> dict | None:
    """The figures of an eval.json worth showing: {metric: {steps: value}} where found."""
    if not isinstance(report, dict):
        return None
    out = {k: report[k] for k in ("metric", "evaluator_version", "features", "num", "ema", "gamma") if k in report}
    results = report.get("results") or report.get("steps")
    if results is not None:
        out["results"] = results
    return out


def pick_weights(ckpt: Path, cfg: dict, ema: str | None, report) -> str:
    names = sorted(p.name for p in ckpt.glob("ema-*.safetensors"))
    if ema == "none":
        return "model.safetensors"
    if ema is None and isinstance(report, dict) and report.get("ema") not in (None, ""):
        ema = str(report["ema"])
    if ema is None:
        emas = (cfg.get("train") or {}).get("ema") or []
        ema = str(emas[0]) if emas else None
    if ema is None:
        return "model.safetensors"
    name = f"ema-{ema}.safetensors"
    if name not in names:
        sys.exit(f"ship_demo_models: {ckpt} has no EMA {ema} (has: {', '.join(names) or 'none'})")
    return name


def record_checksums(model_dir: Path, weights: str) -> None:
    """config.json records the sha256 of the shipped tensors, as a saved checkpoint does
    (training/checkpoint.py), so loading verifies them instead of printing a note. The weights
    are also recorded as model.safetensors: the demo lays them out under that name too."""
    cfg = json.loads((model_dir / "config.json").read_text())
    sums = {weights: hex_sha256(model_dir / weights)}
    if weights != "model.safetensors":
        sums["model.safetensors"] = sums[weights]
    if (model_dir / "method.safetensors").is_file():
        sums["method.safetensors"] = hex_sha256(model_dir / "method.safetensors")
    cfg["sha256"] = sums
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def resave(model_dir: Path) -> dict:
    """A shipped model again, same weights: checksums in config.json, ship.json's file hashes
    and eval figures from the files as they are now (e.g. after re-scoring eval.json)."""
    info = json.loads((model_dir / SHIP_FILE).read_text())
    record_checksums(model_dir, info["weights"])
    before = info["files"].get(info["weights"])
    info["files"] = {f: sha256_file(model_dir / f) for f in info["files"] if (model_dir / f).is_file()}
    if info["files"][info["weights"]] != before:
        sys.exit(f"ship_demo_models: {model_dir}: the weights changed; ship them from their checkpoint instead")
    if (model_dir / "eval.json").is_file():
        info["eval"] = eval_summary(json.loads((model_dir / "eval.json").read_text()))
    info["bytes"] = sum((model_dir / f).stat().st_size for f in info["files"])
    (model_dir / SHIP_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def ship(src: Path, name: str, ema: str | None, models_dir: Path, note: str | None,
         recommended_steps: list[int] | None = None) -> Path:
    ckpt = find_checkpoint(src)
    cfg = json.loads((ckpt / "config.json").read_text())
    report = None
    if (ckpt / "eval.json").is_file():
        report = json.loads((ckpt / "eval.json").read_text())
    weights = pick_weights(ckpt, cfg, ema, report)
    if recommended_steps is not None:  # checked now, not at the demo's first export
        mcfg = cfg.get("method") or {}
        try:
            check_recommended_steps(recommended_steps, {"max_steps": int(mcfg.get("max_steps", 64)),
                                                        "default_steps": int(mcfg.get("default_steps", 1))})
        except UserError as e:
            sys.exit(f"ship_demo_models: --recommended-steps: {str(e).removeprefix('manifest: ')}")
    dest = models_dir / name
    tmp = models_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = ["config.json", weights] + [f for f in ("method.safetensors", "eval.json") if (ckpt / f).is_file()]
    for f in files:
        shutil.copy2(ckpt / f, tmp / f)
    record_checksums(tmp, weights)
    size = sum((tmp / f).stat().st_size for f in files)
    if size > SIZE_LIMIT:
        shutil.rmtree(tmp)
        sys.exit(f"ship_demo_models: {name} would be {size / 1e6:.1f} MB (limit {SIZE_LIMIT / 1e6:.0f} MB)")
    info = {
        "name": name,
        "method": (cfg.get("method") or {}).get("name"),
        "data": (cfg.get("data") or {}).get("name"),
        "preset": (cfg.get("net") or {}).get("preset"),
        "step": cfg.get("step"),
        "weights": weights,
        "ema": weights[len("ema-"):-len(".safetensors")] if weights.startswith("ema-") else None,
        # the step counts it was made for: the exported manifest's recommended_steps
        "recommended_steps": recommended_steps,
        "source": str(ckpt.resolve().relative_to(ROOT) if ckpt.resolve().is_relative_to(ROOT) else ckpt.resolve()),
        "files": {f: sha256_file(tmp / f) for f in files},
        "bytes": size,
        "eval": eval_summary(report),
        "note": note,
        "shipped": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (tmp / SHIP_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="checkpoint dir, or run dir (its latest checkpoint); with --resave a shipped model dir")
    p.add_argument("--resave", action="store_true",
                   help="re-record the checksums and eval figures of an already shipped model dir (same weights)")
    p.add_argument("--name", help="model name in the demo ([A-Za-z0-9_]; default: the run dir's name)")
    p.add_argument("--ema", help="EMA decay to ship, or 'none' (default: eval.json's, else the config's first)")
    p.add_argument("--models-dir", default=str(MODELS_DIR), help=f"default {MODELS_DIR.relative_to(ROOT)}")
    p.add_argument("--note", help="a line recorded in ship.json (e.g. 'development model, not the default')")
    p.add_argument("--recommended-steps", metavar="K[,K...]",
                   help="the step counts the model was made for (the page defaults to and suggests them; "
                        "must include the method's default step count; default: that count alone)")
    args = p.parse_args(argv)
    if args.resave:
        info = resave(Path(args.ckpt))
        print(f"{args.ckpt}: checksums recorded, weights {info['weights']} unchanged "
              f"(sha256 {info['files'][info['weights']][:12]})")
        return 0
    try:
        rec = None if args.recommended_steps is None else [int(k) for k in args.recommended_steps.split(",")]
    except ValueError:
        sys.exit(f"ship_demo_models: --recommended-steps takes comma-separated integers, "
                 f"got {args.recommended_steps!r}")
    src = Path(args.ckpt)
    default = src.name if src.parent.name != "checkpoints" else src.parent.parent.name
    name = re.sub(r"[^A-Za-z0-9_]", "_", args.name or default).strip("_")
    if not name or name.endswith(("_jump", "_sampler", "_stream")):
        sys.exit(f"ship_demo_models: bad model name {name!r}")
    dest = ship(src, name, args.ema, Path(args.models_dir), args.note, rec)
    info = json.loads((dest / SHIP_FILE).read_text())
    print(f"{dest}: {info['method']} step {info['step']} ({info['weights']}, {info['bytes'] / 1e6:.2f} MB) "
          f"from {info['source']}" + ("" if info["eval"] else "; no eval.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
