#!/usr/bin/env python
"""CTM with the `ctm` vs the `analytic` preconditioning: sample quality against training iterations.

Trains CTM once per arm and seed through the real training loop (`fewstep train --method ctm`),
same seed, data, budget and options, differing only in the preconditioning (--arms: ctm,
analytic = the paper's, analytic-decay = the project's variant, ...; the first is the baseline); evaluates every checkpoint at 1 and 2 sampling steps, and reports the curves (PNG),
the speed-up of each arm over the baseline (the ratio of iterations each needs to reach the
same metric level, on the mean curve and per seed) and a JSON of everything.

  2-D gmm with its exact teacher (metric: sliced Wasserstein-2 to fresh data, lower is better):
    nice -n 10 python scripts/compare_precond.py gmm --seeds 0,1,2 --iters 1200 --every 100 \
        --arms ctm,analytic,analytic-decay --out runs/compare-precond-gmm
  Fashion-MNIST with an edm teacher (metric: FID of the one evaluator, training/evaluator.py):
    nice -n 10 python scripts/compare_precond.py fmnist --teacher runs/edm-fmnist --seeds 0 \
        --iters 2000 --every 250 --out runs/compare-precond-fmnist

Runs that already finished in --out are not trained again (the script can be resumed).
Extra KEY=VALUE arguments are passed to both runs as config overrides.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fewstep.training import checkpoint as ck
from fewstep.training.build import load_model
from fewstep.training.config import make_config
from fewstep.training.evaluator import ImageEvaluator, PointsEvaluator
from fewstep.training.loop import train
from fewstep.training.precond import PRECONDS

ARMS = ("ctm", "analytic", "analytic-decay")   # the default arms: CTM's own, the paper's, the project's variant


def arm_overrides(arm: str) -> list[str]:
    """Config overrides of an arm: a preconditioning name (ctm, analytic, analytic-decay, ...)."""
    if arm not in PRECONDS:
        raise SystemExit(f"compare_precond: unknown arm {arm!r} (known: {', '.join(PRECONDS)})")
    return [f"method.precond={arm}"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", choices=("gmm", "fmnist"))
    p.add_argument("--teacher", help="edm teacher checkpoint (fmnist); gmm uses the exact teacher by default")
    p.add_argument("--preset", help="default: toy (gmm), fmnist-cpu (fmnist)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--iters", type=int, default=1200)
    p.add_argument("--every", type=int, default=100, help="checkpoint / evaluation interval")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--samples", type=int, default=5000, help="samples per evaluation")
    p.add_argument("--ema", default="0.99", help="EMA decay evaluated (trained alongside)")
    p.add_argument("--out", required=True)
    p.add_argument("--arms", default=",".join(ARMS),
                   help="comma-separated preconditionings, the first is the baseline (default ctm,analytic,analytic-decay)")
    p.add_argument("--only", help="train and score this preconditioning only, then stop (run two "
                   "such processes side by side, then once more without --only to gather the curves)")
    p.add_argument("--no-train", action="store_true", help="evaluate the checkpoints already in --out")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return p.parse_intermixed_args(argv)


def run_dir(out: Path, pc: str, seed: int) -> Path:
    return out / f"{pc}-seed{seed}"


def train_one(args, pc: str, seed: int) -> float:
    d = run_dir(Path(args.out), pc, seed)
    cks = ck.list_checkpoints(d)
    if cks and int(ck.read_config(cks[-1])["step"]) >= args.iters:
        return 0.0
    teacher = args.teacher or ("exact" if args.data == "gmm" else None)
    if teacher is None:
        raise SystemExit("fmnist needs --teacher (an edm checkpoint)")
    ov = arm_overrides(pc) + [f"train.seed={seed}", f"train.iters={args.iters}", f"train.batch={args.batch}",
          f"train.ckpt_every={args.every}", "train.keep=0", "train.sample_every=0", f"train.ema=[{args.ema}]",
          f"train.log_every={min(50, args.every)}"] + list(args.overrides)
    cfg = make_config("ctm", data=args.data, preset=args.preset, teacher=teacher, overrides=ov)
    start = time.time()
    train(cfg, d, resume=bool(cks), progress=False)
    return time.time() - start


class GMMMetric:
    """The 2-D figure of `fewstep eval` (training/evaluator.py): sliced W2 to its one reference set."""
    name = "sliced W2"

    def __init__(self, n):
        self.ev = PointsEvaluator("gmm", n)
        self.id = self.ev.describe()

    def __call__(self, x):
        return self.ev.swd(x)


class FIDMetric:
    """The FID of `fewstep eval` (training/evaluator.py): the shipped feature network, the full
    test split, samples quantised to uint8 as served."""
    name = "FID (the shipped feature network)"

    def __init__(self, cfg):
        d = cfg["data"]
        self.ev = ImageEvaluator(d["name"], d.get("data_dir"), d.get("image_size"))
        self.id = self.ev.describe()

    def __call__(self, x):
        return self.ev.fid(x)


def evaluate_run(args, pc, seed, metric) -> dict:
    d = run_dir(Path(args.out), pc, seed)
    cache = d / "compare-eval.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    if done.get("evaluator") != metric.id:   # figures of another evaluator are scored again, never mixed
        done = {}
    done["evaluator"] = metric.id
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for c in ck.list_checkpoints(d):
        step = str(int(ck.read_config(c)["step"]))
        if step in done:
            continue
        model = load_model(c, ema=args.ema, device=dev)
        row = {}
        for steps in (1, 2):
            xs = [model.sample(steps, list(range(k, min(k + 1000, args.samples))), device=dev).float().cpu()
                  for k in range(0, args.samples, 1000)]
            row[str(steps)] = float(metric(torch.cat(xs)))
        done[step] = row
        cache.write_text(json.dumps(done, indent=1))
    return {int(k): v for k, v in done.items() if k != "evaluator"}


def best_so_far(curve):
    return np.minimum.accumulate(np.asarray(curve, float))


def iters_to(level, its, curve):
    """First iteration where the best-so-far curve reaches `level`, interpolated linearly in
    log(metric) between checkpoints; None if it never does."""
    b = np.log(best_so_far(curve))
    its = np.asarray(its, float)
    lv = np.log(level)
    hit = np.nonzero(b <= lv + 1e-12)[0]
    if not len(hit):
        return None
    k = int(hit[0])
    if k == 0 or b[k - 1] == b[k]:
        return float(its[k])
    w = (b[k - 1] - lv) / (b[k - 1] - b[k])
    return float(its[k - 1] + w * (its[k] - its[k - 1]))


def speedup(its, ctm_curve, an_curve, level=None):
    """Iterations ctm needs to reach `level` over those analytic needs (default level: ctm's
    final best-so-far value)."""
    level = float(best_so_far(ctm_curve)[-1]) if level is None else float(level)
    a, b = iters_to(level, its, ctm_curve), iters_to(level, its, an_curve)
    return {"level": level, "iters_ctm": a, "iters_analytic": b,
            "ratio": (a / b) if (a and b) else None}


def levels_of(curve, fractions=(0.5, 0.75, 0.9)):
    """Levels a fraction of the way (in log) from the first checkpoint's value to the best."""
    c = np.asarray(curve, float)
    first, best = c[0], c.min()
    return [float(first * (best / first) ** q) for q in fractions]


def plot(results, its, out: Path, metric_name, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for ax, steps in zip(axes, ("1", "2")):
        for pc, color in zip(results, ("C0", "C3", "C2", "C1")):
            curves = np.array([[results[pc][s][i][steps] for i in its] for s in results[pc]])
            for c in curves:
                ax.plot(its, c, color=color, alpha=0.25, lw=0.8)
            ax.plot(its, curves.mean(0), color=color, lw=2, label=f"{pc} (mean of {len(curves)} seeds)")
        ax.set_title(f"{steps}-step", fontsize=10)
        ax.set_xlabel("training iterations")
        ax.set_ylabel(metric_name)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if len(arms) < 2 or (args.only and args.only not in arms):
        raise SystemExit("compare_precond: --arms needs a baseline and at least one more arm; --only one of them")
    base = arms[0]
    times = {}
    for seed in seeds if not args.no_train else ():
        for pc in (args.only,) if args.only else arms:
            print(f"[compare] training ctm arm={pc} seed={seed}", file=sys.stderr, flush=True)
            times[f"{pc}-{seed}"] = round(train_one(args, pc, seed), 1)
    if args.data == "gmm":
        metric = GMMMetric(args.samples)
    else:
        metric = FIDMetric(ck.read_config(ck.find_checkpoint(run_dir(out, args.only or base, seeds[0]))))
    if args.only:   # its own checkpoints scored here, so the run without --only only gathers them
        for seed in seeds:
            evaluate_run(args, args.only, seed, metric)
        return
    results = {pc: {s: evaluate_run(args, pc, s, metric) for s in seeds} for pc in arms}
    its = sorted(set.intersection(*(set(r) for pc in arms for r in results[pc].values())))
    if not its:
        raise SystemExit(f"compare_precond: the runs in {out} share no checkpoint step (a run stopped by "
                         "train.time_limit before its first --every checkpoint?): no curve to compare")
    its_a = np.asarray(its)
    summary = {"data": args.data, "metric": metric.name, "evaluator": metric.id, "iters": its, "seeds": seeds, "arms": arms,
               "train_seconds": times, "argv": sys.argv[1:], "speedup": {}, "final": {}}
    fracs = (0.5, 0.75, 0.9)
    for steps in ("1", "2"):
        curves = {pc: np.array([[results[pc][s][i][steps] for i in its] for s in seeds]) for pc in arms}
        mb = curves[base].mean(0)
        lvls = levels_of(mb, fracs)
        summary["curve_" + steps] = {pc: c.mean(0).tolist() for pc, c in curves.items()}
        # the spread over seeds: sample std per checkpoint (0 with one seed)
        summary["std_" + steps] = {pc: (c.std(0, ddof=1) if len(seeds) > 1 else 0 * c[0]).tolist()
                                   for pc, c in curves.items()}
        summary["final"][steps] = {pc: {"last": float(c.mean(0)[-1]), "best": float(c.mean(0).min())}
                                   for pc, c in curves.items()}
        summary["speedup"][steps] = {}
        for pc in arms[1:]:
            ma = curves[pc].mean(0)
            per_seed = [[speedup(its_a, curves[base][k], curves[pc][k], lv)["ratio"] for lv in lvls]
                        for k in range(len(seeds))]
            summary["speedup"][steps][pc] = {
                "mean_curve": speedup(its_a, mb, ma),
                "levels": [speedup(its_a, mb, ma, lv) for lv in lvls],
                "per_seed_levels": per_seed}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(results, its, out / "curves.png", metric.name,
         f"CTM on {args.data}: {' vs '.join(arms)} preconditioning (seeds {args.seeds})")

    def fmt(v, nd=0):
        return "n/a" if v is None else f"{v:.{nd}f}"
    head = " | ".join(f"{st}-step {pc}" for st in ("1", "2") for pc in arms)
    print(f"| iters | {head} |")
    print("|---" * (1 + 2 * len(arms)) + "|")
    for k, i in enumerate(its):
        row = " | ".join(f"{summary['curve_' + st][pc][k]:.4g}"
                         + (f" ± {summary['std_' + st][pc][k]:.2g}" if len(seeds) > 1 else "")
                         for st in ("1", "2") for pc in arms)
        print(f"| {i} | {row} |")
    for steps in ("1", "2"):
        for pc in arms[1:]:
            sp = summary["speedup"][steps][pc]
            for q, (k, lv) in zip(fracs, enumerate(sp["levels"])):
                seeds_r = ", ".join(fmt(p[k], 2) for p in sp["per_seed_levels"])
                print(f"{steps}-step {pc}: level {lv['level']:.4g} ({int(q * 100)}% of the way, in log, from "
                      f"{base}'s first to its best value): {base} {fmt(lv['iters_ctm'])} iters, {pc} "
                      f"{fmt(lv['iters_analytic'])} -> ratio {fmt(lv['ratio'], 2)} (per seed: {seeds_r})")
    print(f"\nwrote {out / 'curves.png'} and {out / 'summary.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
