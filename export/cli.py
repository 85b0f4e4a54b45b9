"""`fewstep export`: its arguments; the work is `export.exporter.export_model`."""
from __future__ import annotations

import argparse
import sys

FORMATS = ("onnx", "tensorrt")


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint dir or run dir (its latest checkpoint)")
    p.add_argument("--out", required=True, help="model dir to write (refused if it exists, unless --force)")
    p.add_argument("--format", default="onnx",
                   help="comma-separated: onnx (always written), tensorrt (a plan for this GPU). Default: onnx")
    p.add_argument("--ema", default="default", help="EMA decay to export, or 'none' for the online weights")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"),
                   help="TensorRT engine precision (the ONNX graph is always float32)")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch served (TensorRT profile max)")
    p.add_argument("--opt-batch", type=int, help="batch TensorRT tunes for (default: min(8, max batch))")
    p.add_argument("--name", help="model name (default: the basename of --out, as [A-Za-z0-9_])")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 18 or newer (default 18)")
    p.add_argument("--parity-steps", type=int,
                   help="steps of the end-to-end sampler parity check (default: the model's default, at most 8)")
    p.add_argument("--timing-cache", help="TensorRT timing cache file (default: under $FEWSTEP_CACHE)")
    p.add_argument("--recommended-steps", metavar="K[,K...]",
                   help="the step counts the model was made for, recorded in the manifest; clients default to "
                        "and suggest them (default: the method's default step count)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a sampling option of the model's method baked into the jump, e.g. solver=heun, "
                        "sample_head=2 (cud)")


def _formats(text: str) -> list[str]:
    from fewstep.errors import UserError
    items = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in items if f not in FORMATS]
    if bad or not items:
        raise UserError(f"--format takes a comma-separated list of {', '.join(FORMATS)}, got {text!r}")
    return items


def _step_list(text: str | None) -> list[int] | None:
    """--recommended-steps as given (order and repeats are the manifest check's to judge)."""
    from fewstep.errors import UserError
    if text is None:
        return None
    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise UserError(f"--recommended-steps takes comma-separated integers, got {text!r}") from None


def run_export(args) -> int:
    from fewstep.export.exporter import export_model
    from fewstep.training.config import parse_sets
    manifest = export_model(
        args.ckpt, args.out, formats=_formats(args.format), ema=args.ema, precision=args.precision,
        max_batch=args.max_batch, opt_batch=args.opt_batch, name=args.name, opset=args.opset,
        parity_steps=args.parity_steps, timing_cache=args.timing_cache, force=args.force,
        method_opts=parse_sets(args.set), recommended_steps=_step_list(args.recommended_steps),
        log=lambda msg: print(f"[export] {msg}", file=sys.stderr))
    print(args.out)
    return 0 if manifest else 1
