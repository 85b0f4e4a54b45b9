"""Take the random initial weights out of a plain EMA (a run trained without EMA warm-up).

After n steps a plain EMA of decay d is  d^n * init + (1 - d^n) * A,  A the decayed average of
the trained weights. The initial weights are rebuilt exactly from the run's config and seed
(`training.build.build_initial_net`, which the loop calls), so A is recovered:
A = (ema - d^n * init) / (1 - d^n), Adam's bias correction. Writes an EMA-only checkpoint
dir that `fewstep eval` and `fewstep sample` take.

    .venv/bin/python scripts/debias_ema.py runs/gpu/cud-rk12 --ema 0.999 --out runs/gpu/cud-rk12-debiased
    .venv/bin/fewstep eval --ckpt runs/gpu/cud-rk12-debiased --steps 4,16 --num 1000

Runs started from a teacher's weights (cd, ctm, cud-distill) are refused: their initial
weights are not random, and the warm-up-free EMA of those mostly holds the teacher.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file

from fewstep.errors import UserError
from fewstep.training import checkpoint as ck
from fewstep.training.build import build_initial_net, build_method


def initial_weights(cfg: dict) -> tuple[dict, set]:
    """The net's weights at step 0, as the training loop built them, and which are parameters."""
    net = build_initial_net(cfg, build_method(cfg))
    return net.state_dict(), {name for name, _ in net.named_parameters()}


def debias(ckpt_path, ema: str, out) -> Path:
    ckpt = ck.find_checkpoint(ckpt_path)
    cfg = ck.read_config(ckpt)
    if cfg.get("teacher"):
        raise UserError(f"{ckpt}: started from the teacher {cfg['teacher']}, not from random weights")
    if cfg["train"].get("ema_warmup", False):
        raise UserError(f"{ckpt}: trained with EMA warm-up; its EMA holds no initial weights to remove")
    n, d = int(cfg["step"]), float(ema)
    keep = d ** n
    if keep >= 1.0:
        raise UserError(f"{ckpt}: an EMA of decay {ema} after {n} steps is all initial weights")
    state = ck.load_tensors(ckpt / f"ema-{ema}.safetensors")
    init, params = initial_weights(cfg)
    fixed = {}
    for k, v in state.items():
        if k in params:
            fixed[k] = ((v.double() - keep * init[k].double()) / (1.0 - keep)).to(v.dtype).contiguous()
        else:  # buffers are copied from the net, not averaged
            fixed[k] = v
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg["debiased_ema"] = {"from": str(ckpt), "ema": ema, "initial_fraction_removed": keep}
    save_file(fixed, str(out / f"ema-{ema}.safetensors"))
    if (ckpt / "method.safetensors").is_file():
        shutil.copy(ckpt / "method.safetensors", out / "method.safetensors")
    cfg["sha256"] = ck.hash_files(out)  # the checksums of these files, not the source's
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"{ckpt} step {n}: removed the {keep:.1%} of initial weights from EMA {ema} -> {out}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="a checkpoint dir, or a run dir (its latest checkpoint)")
    p.add_argument("--ema", default="0.999", help="the EMA decay to correct")
    p.add_argument("--out", required=True, help="where to write the corrected EMA-only checkpoint")
    args = p.parse_args(argv)
    try:
        debias(args.ckpt, args.ema, args.out)
    except UserError as e:
        print(f"debias_ema: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
