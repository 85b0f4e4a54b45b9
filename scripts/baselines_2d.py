"""Baselines on the 2-D track: rf and edm, Euler and Heun, sliced Wasserstein at 1-16 steps.

    python scripts/baselines_2d.py --data gmm,checkerboard --seeds 0,1 --iters 3000 --out runs/baselines

Trains each (data, method, seed) with the `toy` preset (skipped when the run exists), samples
5000 points per step count and solver, and prints a Markdown table of the mean (+- std over
seeds) sliced Wasserstein distance (x100) to the reference set of `fewstep eval`
(training/evaluator.py).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fewstep.cli import main as fewstep
from fewstep.training.build import load_model
from fewstep.training.evaluator import PointsEvaluator

STEPS = (1, 2, 4, 8, 16)


def evaluate(run: Path, data: str, solver: str, num: int) -> dict:
    model = load_model(run, method_opts={"solver": solver})
    points = PointsEvaluator(data, num)   # the reference of `fewstep eval`
    out = {}
    for k in STEPS:
        x = model.sample(k, list(range(num)))
        out[k] = points.swd(x)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="gmm,checkerboard")
    p.add_argument("--methods", default="rf,edm")
    p.add_argument("--seeds", default="0")
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--num", type=int, default=5000)
    p.add_argument("--out", default="runs/baselines")
    a = p.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    results = []
    for data in a.data.split(","):
        for method in a.methods.split(","):
            for seed in [int(s) for s in a.seeds.split(",")]:
                run = out / f"{method}-{data}-s{seed}"
                if not (run / "checkpoints").is_dir():
                    t0 = time.time()
                    rc = fewstep(["train", "--method", method, "--data", data, "--preset", "toy",
                                  "--iters", str(a.iters), "--out", str(run), "--no-progress",
                                  f"train.seed={seed}", "train.threads=1", "train.sample_every=0"])
                    assert rc == 0, f"training {run} failed"
                    print(f"trained {run} in {time.time() - t0:.0f}s", flush=True)
                ips = [json.loads(l)["images_per_s"] for l in (run / "metrics.jsonl").read_text().splitlines()]
                for solver in ("euler", "heun"):
                    swd = evaluate(run, data, solver, a.num)
                    results.append({"data": data, "method": method, "seed": seed, "solver": solver,
                                    "swd": swd, "images_per_s": float(np.median(ips))})
                    print(json.dumps(results[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n| data | method | solver | " + " | ".join(f"{k} steps" for k in STEPS) + " | train img/s |")
    print("|---" * (len(STEPS) + 4) + "|")
    keys = sorted({(r["data"], r["method"], r["solver"]) for r in results}, key=lambda k: (k[0], k[1], k[2]))
    for key in keys:
        rs = [r for r in results if (r["data"], r["method"], r["solver"]) == key]
        cells = []
        for k in STEPS:
            v = np.array([r["swd"][k] for r in rs]) * 100
            cells.append(f"{v.mean():.2f}" + (f" ± {v.std():.2f}" if len(v) > 1 else ""))
        print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + f" | {np.median([r['images_per_s'] for r in rs]):.0f} |")


if __name__ == "__main__":
    main()
