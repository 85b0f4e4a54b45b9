"""A checkpoint -> a model dir {jump.onnx, manifest.json, optional TensorRT plan}: `export_model`,
the library function behind `fewstep export` (export/cli.py), the demo's first start and the
scripts. Written under a temporary name and renamed into place, so a reader never finds half
a model dir."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from fewstep import jump
from fewstep.errors import UserError
from fewstep.options import check_range
from fewstep.export import runtimes
from fewstep.export.manifest import (FORMAT_VERSION, ONNX_FILE, check_recommended_steps, sanitize_name, sha256_file,
                                     write_manifest)
from fewstep.export.onnx_export import export_onnx, jump_parity, random_inputs, sampler_parity
from fewstep.export.runner import OrtJump, TensorRTRunner
from fewstep.export.tensorrt_build import build_engine, unavailable_reason
from fewstep.training.build import load_model


def _read_eval(ckpt: Path):
    path = ckpt / "eval.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        print(f"fewstep export: warning: {path} is unreadable; eval left null", file=sys.stderr)
        return None
    return data if isinstance(data, dict) else {"value": data}


def _solver(method) -> str | None:
    solver = getattr(method, "opts", {}).get("solver")
    return solver if solver in ("euler", "heun") else None


def export_model(ckpt, out, formats=("onnx",), ema="default", precision="fp32", max_batch=64,
                 opt_batch=None, name=None, opset=18, parity_steps=None, timing_cache=None,
                 force=False, log=None, method_opts=None, recommended_steps=None) -> dict:
    """Export a checkpoint to a model dir; returns the manifest written. Raises UserError.

    recommended_steps: the step counts the model was made for (default: [its default steps])."""
    log = log or (lambda msg: None)
    out = Path(out)
    formats = list(formats)
    if precision not in ("fp32", "fp16"):
        raise UserError(f"--precision must be fp32 or fp16, got {precision!r}")
    check_range("--max-batch", max_batch, 1)
    opt_batch = min(8, max_batch) if opt_batch is None else opt_batch
    check_range("--opt-batch", opt_batch, 1, max_batch)
    if opset < 18:
        raise UserError(f"--opset must be 18 or newer, got {opset}")
    check_range("--parity-steps", parity_steps, 1)
    if (out.exists() or out.is_symlink()) and not force:
        raise UserError(f"{out} exists (use --force to replace it)")
    if "tensorrt" in formats:
        why = unavailable_reason()
        if why:
            raise UserError(f"--format tensorrt: {why}; nothing written")

    t0 = time.time()
    model = load_model(ckpt, ema=None if ema == "none" else ema, device="cpu", method_opts=method_opts)
    spec = model.method.sampler_spec()
    check_range("--parity-steps", parity_steps, 1, int(spec["max_steps"]))
    try:
        recommended = check_recommended_steps(
            [int(spec["default_steps"])] if recommended_steps is None else recommended_steps, spec)
    except UserError as e:
        raise UserError(f"--recommended-steps: {str(e).removeprefix('manifest: ')}") from None
    log(f"loaded {model.method.name} from {model.ckpt} (ema {model.ema or 'none'})")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        info = export_onnx(model, tmp / ONNX_FILE, opset=opset)
        info["ir_version"] = runtimes.onnx_ir_version(tmp / ONNX_FILE)  # what the file says
        log(f"wrote {ONNX_FILE} (opset {info['opset']}, IR {info['ir_version']}, "
            f"{(tmp / ONNX_FILE).stat().st_size / 1e6:.2f} MB) in {time.time() - t0:.1f}s")
        ort_jump = OrtJump(tmp / ONNX_FILE, "cpu", threads=1)  # small checks: one thread is enough
        parity = jump_parity(model, ort_jump)
        parity.update(sampler_parity(model, ort_jump, steps=parity_steps))
        log(f"parity: jump max abs {parity['onnx_vs_torch_max_abs']:.2e} (tol {parity['tolerance']:.1e}), "
            f"sampler max abs {parity['sampler_max_abs']:.2e} over {parity['sampler_steps']} steps")

        files = {ONNX_FILE: sha256_file(tmp / ONNX_FILE)}
        engines = []
        if "tensorrt" in formats:
            per_sample = {i.name: i.shape(model.shape) for i in jump.inputs(model.num_classes)}
            engine = build_engine(tmp / ONNX_FILE, tmp, per_sample, precision=precision, min_batch=1,
                                  opt_batch=opt_batch, max_batch=max_batch, timing_cache=timing_cache)
            engine.update(_tensorrt_parity(tmp, engine, model, ort_jump))
            engines.append(engine)
            files[engine["file"]] = sha256_file(tmp / engine["file"])
        for note in runtimes.container_notes(tmp / ONNX_FILE, engines):
            log(f"note: {note}")
            log(f"wrote {engine['file']}")

        cfg = model.config
        shape = [int(d) for d in model.shape]
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": sanitize_name(name if name else out.resolve().name),
            "method": model.method.name,
            "image": {"shape": shape, "channels": shape[0] if len(shape) == 3 else 1,
                      "value_range": [-1.0, 1.0]},
            "num_classes": int(model.num_classes),
            "sampler": dict(spec),
            "recommended_steps": recommended,
            "gamma_sampling": bool(model.method.gamma_sampling),
            "solver": _solver(model.method),
            "jump": {"file": ONNX_FILE, "opset": info["opset"], "ir_version": info["ir_version"],
                     "inputs": info["inputs"],
                     "output": info["output"], "dtype": "float32"},
            "max_batch": int(max_batch),
            "opt_batch": int(opt_batch),
            "precision": precision,
            "engines": engines,
            "training": {"ckpt": str(Path(model.ckpt).resolve()), "step": cfg.get("step"), "ema": model.ema,
                         "config": cfg},
            "eval": _read_eval(Path(model.ckpt)),
            "parity": parity,
            "files": files,
        }
        write_manifest(tmp, manifest)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported {out} in {time.time() - t0:.1f}s")
    return manifest


def _tensorrt_parity(tmp: Path, engine: dict, model, ort_jump) -> dict:
    """TensorRT vs ONNX Runtime on random inputs, where this process can run the engine."""
    try:
        manifest = {"image": {"shape": list(model.shape)}, "num_classes": model.num_classes}
        runner = TensorRTRunner(tmp, manifest, engine)
    except Exception as e:  # e.g. a CPU-only torch: the engine is built but not checked here
        return {"parity": None, "parity_note": f"not checked: {str(e)[:200]}"}
    worst = 0.0
    b = min(7, engine["max_batch"])
    feeds = random_inputs(model.method.sampler_spec(), model.shape, model.num_classes, b)
    ref = ort_jump(*jump.args(feeds))
    got = runner(*jump.args(feeds))
    worst = float(np.max(np.abs(got - ref)))
    return {"parity": {"tensorrt_vs_onnx_max_abs": worst, "batch": b}}


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished dir to `out`; an existing `out` (--force) goes only once tmp is complete."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
