#!/usr/bin/env python
"""CUD ablation: rectified flow vs CUD RK12 / RK23 / RK34 (equal iterations and seeds), then
CUD + its 1-step stage; the metric at 1, 2, 4, 8, 16 sampling steps.

    nice -n 10 .venv/bin/python scripts/ablation_cud.py                      # 2-D track (gmm)
    nice -n 10 .venv/bin/python scripts/ablation_cud.py --data fmnist --preset fmnist-cpu \\
        --seeds 0 --iters 4000 --distill-iters 4000 --batch 64 --out runs/ablation-cud-fmnist

Every run goes through the real commands (`fewstep train`, `fewstep eval`) in this process,
with the same data order and initial weights per seed (train.seed). The metric is what
`fewstep eval` reports (the one evaluator, training/evaluator.py): sliced Wasserstein distance
on 2-D data (lower is better; the data-vs-data floor is printed too), FID on the shipped
feature network for images. An `eval*.json` left in --out by another evaluator is scored again;
the table refuses to put figures of different feature networks side by side.
RK23 / RK34 are sampled with their 2nd / 3rd head, as the CUD authors sample them
(`--eval-head main`: every arm with head 1). Runs already finished in --out are reused and interrupted ones resume from their last
checkpoint, so an interrupted ablation picks up where it stopped. Writes <out>/ablation.json
and <out>/table.md (mean +- sample std over seeds).

Arms (names for --arms): rf (time_scale 1, as CUD), rf-t999 (the rf default time input),
rk12, rk12-indep (independent coupling), rk12-phi25 (prior ShakeDrop phi 0.25, the authors'
training default), rk12-nosd (no prior ShakeDrop), rk23, rk34, rf-3x (rf with 3x the iterations, about
RK34's compute); `--distill-from ARM` adds ARM+1step, the
cud-distill student of each seed's ARM run (evaluated at 1 step; more steps are shown for
completeness but it is trained for 1).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from fewstep.cli import main as fewstep
from fewstep.errors import UserError
from fewstep.figures import EVALUATOR_VERSION, check_comparable
from fewstep.training import checkpoint as ck
from fewstep import sampling
from fewstep.training.data_2d import default_gmm
from fewstep.training.evaluator import PointsEvaluator

# The flow baseline gets CUD's time input (raw t, time_scale 1) so that the arms differ in the
# loss only; rf-t999 is the project's rf default (the net sees 999 t).
# rf-3x: the flow baseline with 3x the iterations, about RK34's compute (RK34 evaluates the
# net 7 times per step, 6 of them without gradient: ~2.8x RF's CPU time per step here).
ARMS = {  # name: (method, overrides, iterations factor)
    "rf": ("rf", ["method.time_scale=1"], 1),
    "rf-t999": ("rf", ["method.time_scale=999"], 1),
    "rk12": ("cud", ["method.pred_step=1"], 1),
    "rk12-indep": ("cud", ["method.pred_step=1", "method.coupling=independent"], 1),
    "rk12-phi25": ("cud", ["method.pred_step=1", "net.shakedrop_phi=0.25"], 1),
    "rk12-nosd": ("cud", ["method.pred_step=1", "method.prior_shakedrop=false"], 1),
    "rk23": ("cud", ["method.pred_step=2"], 1),
    "rk34": ("cud", ["method.pred_step=3"], 1),
    "rf-3x": ("rf", ["method.time_scale=1"], 3),
}


def finished(run: Path, iters: int) -> bool:
    cks = ck.list_checkpoints(run)
    return bool(cks) and ck.read_config(cks[-1]).get("step") == iters


def train(run: Path, method: str, args, extra: list[str], iters: int, teacher: Path | None = None) -> float:
    if finished(run, iters):
        return 0.0
    resume = bool(ck.list_checkpoints(run))  # an interrupted run continues from its last checkpoint
    if run.exists() and not resume:
        import shutil
        shutil.rmtree(run)
    argv = ["train", "--method", method, "--data", args.data, "--out", str(run), "--iters", str(iters),
            "--no-progress", f"train.seed={args.seed_now}", "train.sample_every=0",
            f"train.ckpt_every={iters}", "train.log_every=50"]
    if args.preset:
        argv += ["--preset", args.preset]
    if args.batch:
        argv += ["--batch", str(args.batch)]
    if teacher is not None:
        argv += ["--teacher", str(teacher)]
    argv += list(args.common) + extra + (["--resume"] if resume else [])
    c0 = time.process_time()
    rc = fewstep(argv)
    if rc != 0:
        raise SystemExit(f"training failed: {' '.join(argv)}")
    return time.process_time() - c0


def eval_head(arm: str, args) -> int:
    """The head an arm is sampled with. The CUD authors sample RK23 / RK34 models with their 2nd /
    3rd head (generate.py --generator 2 / 3, README); --eval-head main scores every arm with head 1."""
    if args.eval_head == "main":
        return 1
    for o in ARMS.get(arm, ("", [], 1))[1]:
        if o.startswith("method.pred_step="):
            return int(o.split("=", 1)[1])
    return 1


def eval_argv(run: Path, arm: str, args) -> tuple[list[str], Path]:
    """The `fewstep eval` command of a run, and the JSON it writes (named by EMA and head, so a
    result of another head is never reused)."""
    head = eval_head(arm, args)
    name = "eval" if args.eval_ema == "default" else f"eval-ema-{args.eval_ema}"
    out = run / (name + (f"-head{head}" if head != 1 else "") + ".json")
    argv = ["eval", "--ckpt", str(run), "--steps", args.steps, "--no-progress", "--out", str(out),
            "--ema", args.eval_ema]
    if head != 1:
        argv += ["--set", f"sample_head={head}"]
    if args.eval_num:
        argv += ["--num", str(args.eval_num)]
    return argv, out


def evaluate(run: Path, arm: str, args) -> dict:
    argv, out = eval_argv(run, arm, args)
    stale = out.is_file() and json.loads(out.read_text()).get("evaluator_version") != EVALUATOR_VERSION
    if not out.is_file() or stale:
        if fewstep(argv) != 0:
            raise SystemExit(f"eval failed: {' '.join(argv)}")
    return json.loads(out.read_text())


def exact_flow(args, steps: list[int]) -> dict[int, float] | None:
    """gmm only: the metric of Euler sampling with the *exact* flow velocity E[z - x | x_t]
    (from the mixture's closed-form denoiser), the same noise seeds and reference as
    `fewstep eval`: what a perfectly trained rectified flow gets at each step count."""
    if args.data != "gmm":
        return None
    gmm = default_gmm()
    num = args.eval_num or 5000

    def jump(x, t, s):
        tt = t.clamp(max=1 - 1e-9)[:, None]
        x0 = gmm.denoiser(x / (1 - tt), (tt / (1 - tt))[:, 0])
        return x + (s - t)[:, None] * (x - x0) / tt
    points = PointsEvaluator("gmm", num)
    spec = sampling.flow_spec(max_steps=1024)
    out = {}
    for k in steps:
        pts = sampling.sample(jump, spec, k, list(range(num)), (2,), like_x=torch.zeros(1, dtype=torch.float64))
        out[k] = points.swd(pts.float())
    return out


def mean_std(values):
    n = len(values)
    m = sum(values) / n
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return m, s


def table(results: dict, steps: list[int], metric: str, seeds: list[int]) -> str:
    lines = [f"| arm | " + " | ".join(f"{k} step{'s' if k > 1 else ''}" for k in steps) + " |",
             "|---|" + "---:|" * len(steps)]
    for arm, per_seed in results.items():
        cells = []
        for k in steps:
            vals = [per_seed[s][k] for s in seeds if s in per_seed and k in per_seed[s]]
            if not vals:
                cells.append("")
                continue
            m, sd = mean_std(vals)
            cells.append(f"{m:.4f} ± {sd:.4f}" if len(vals) > 1 else f"{m:.4f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="gmm")
    p.add_argument("--preset", help="default: the data's default preset (toy for 2-D)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--iters", type=int, default=3000, help="training iterations of every arm")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--arms", default="rf,rf-t999,rk12,rk12-indep,rk23,rk34,rf-3x")
    p.add_argument("--distill-from", default="rk12", help="arm whose runs get the 1-step stage ('' = none)")
    p.add_argument("--distill-iters", type=int, default=6000)
    p.add_argument("--distill-opts", default="", help="extra KEY=VALUE for cud-distill, comma-separated")
    p.add_argument("--steps", default="1,2,4,8,16")
    p.add_argument("--eval-num", type=int, help="samples per step count (default: fewstep eval's)")
    p.add_argument("--eval-ema", default="default",
                   help="weights to evaluate: an EMA decay, 'default' (the run's first EMA) or 'none' "
                        "(the online weights)")
    p.add_argument("--eval-head", choices=("authors", "main"), default="authors",
                   help="authors: RK23 / RK34 sampled with head 2 / 3 as the CUD authors do; main: head 1")
    p.add_argument("--common", nargs="*", default=[],
                   help="KEY=VALUE overrides for every arm (the 2-D ablation ran with the toy preset's "
                        "128x3 MLP)")
    p.add_argument("--arm-opts", action="append", default=[], metavar="ARM:KEY=VALUE",
                   help="an override for one arm, e.g. rf:method.time_scale=1")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 on a small busy CPU)")
    p.add_argument("--out", default="runs/ablation-cud")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    steps = [int(s) for s in args.steps.split(",")]
    arms = [a for a in args.arms.split(",") if a]
    for a in arms:
        if a not in ARMS:
            raise SystemExit(f"unknown arm {a!r} (known: {', '.join(ARMS)})")
    arm_opts: dict[str, list[str]] = {}
    for item in args.arm_opts:
        arm, _, kv = item.partition(":")
        arm_opts.setdefault(arm, []).append(kv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict[int, dict[int, float]]] = {}
    cpu: dict[str, float] = {}
    metric = None
    floor = []
    reports = []
    for seed in seeds:
        args.seed_now = seed
        for arm in arms:
            method, extra, factor = ARMS[arm]
            run = out / f"{arm}-s{seed}"
            cpu[arm] = cpu.get(arm, 0.0) + train(run, method, args, extra + arm_opts.get(arm, []),
                                                 args.iters * factor)
            rep = evaluate(run, arm, args)
            reports.append(rep)
            metric = rep["metric"]
            key = "swd" if metric == "swd" else "fid"
            results.setdefault(arm, {})[seed] = {r["steps"]: r[key] for r in rep["results"]}
            floor.append(rep["reference"].get(key))
            print(f"[ablation] seed {seed} {arm}: " + ", ".join(f"{r['steps']}:{r[key]:.4f}" for r in rep["results"]),
                  file=sys.stderr)
        if args.distill_from:
            teacher = out / f"{args.distill_from}-s{seed}"
            run = out / f"{args.distill_from}+1step-s{seed}"
            dopts = [o for o in args.distill_opts.split(",") if o] + arm_opts.get("distill", [])
            name = f"{args.distill_from}+1step"
            cpu[name] = cpu.get(name, 0.0) + train(run, "cud-distill", args, dopts, args.distill_iters, teacher)
            rep = evaluate(run, name, args)
            reports.append(rep)
            key = "swd" if rep["metric"] == "swd" else "fid"
            results.setdefault(name, {})[seed] = {r["steps"]: r[key] for r in rep["results"]}
            print(f"[ablation] seed {seed} {name}: " + ", ".join(f"{r['steps']}:{r[key]:.4f}" for r in rep["results"]),
                  file=sys.stderr)

    try:
        check_comparable(reports, "the ablation's figures")
    except UserError as e:   # one line, not a traceback
        raise SystemExit(f"ablation_cud: {e}") from None
    exact = exact_flow(args, steps)
    if exact is not None:
        results["exact flow velocity (no training)"] = {seeds[0]: exact}
    md = table(results, steps, metric, seeds)
    fl = [f for f in floor if f is not None]
    note = (f"\n\nmetric: {metric} (lower is better), mean ± sample std over seeds {seeds}; "
            f"data-vs-data floor {sum(fl) / len(fl):.4f}" if fl else "")
    (out / "table.md").write_text(md + note + "\n")
    (out / "ablation.json").write_text(json.dumps({
        "argv": sys.argv, "metric": metric, "seeds": seeds, "steps": steps, "iters": args.iters,
        "distill_iters": args.distill_iters, "results": results,
        "train_cpu_seconds_this_invocation": cpu}, indent=2) + "\n")
    print(md + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
