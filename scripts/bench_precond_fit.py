#!/usr/bin/env python
"""CPU cost of the Analytic-Precond fit per lambda point and sample, now against a git revision.

    OMP_NUM_THREADS=1 python scripts/bench_precond_fit.py runs/edm-tiny --points 5 --samples 512 --old 70512bf

Loads `fit_analytic` of training/precond.py at `--old` (git show) beside the current one (with
each trace probe of `--traces`), runs them in turn, `--repeat` times, on the teacher's data with
one thread in this process, and prints the CPU milliseconds per point and sample and the
extrapolation to the default 120 points x 4096 samples on one core. (`fewstep precond fit`
spreads the samples over one process per core: its own log gives the wall time.)
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fewstep.training import precond as P
from fewstep.training.build import load_model

ROOT = Path(__file__).resolve().parents[1]  # the checkout whose git history holds the old version


def old_module(rev: str):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:training/precond.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_precond.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_precond", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("teacher")
    p.add_argument("--points", type=int, default=5)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--old", help="git revision of the fit to compare with")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--traces", default=",".join(P.TRACE_PROBES[:2]), help="trace probes of the current fit")
    p.add_argument("--second-seed", action="store_true",
                   help="also the first probe with seed 1: the spread the differences are read against")
    a = p.parse_args()
    torch.set_num_threads(1)
    P.keep_freed_memory()
    teacher = load_model(a.teacher)
    x0, lab = P.teacher_data(teacher, a.samples)
    traces = a.traces.split(",")

    def now(trace, seed=0):
        return lambda: P.fit_analytic(teacher.denoise, x0, lab, points=a.points, samples=a.samples, progress=False,
                                      trace=trace, seed=seed, variant="backward")
    arms = [(f"now ({trace})", now(trace)) for trace in traces]
    if a.second_seed:
        arms.append((f"now ({traces[0]}), seed 1", now(traces[0], seed=1)))
    if a.old:
        old = old_module(a.old)
        arms.insert(0, (a.old, lambda: old.fit_analytic(teacher.denoise, x0, lab, points=a.points,
                                                        samples=a.samples, progress=False, variant="backward")))
    tables = {}
    for _ in range(a.repeat):
        for name, fn in arms:
            t0 = time.process_time()
            tables[name] = fn()
            ms = (time.process_time() - t0) / a.points / a.samples * 1e3
            print(f"{a.teacher} {name}: {ms:.2f} ms CPU per point and sample; 120 x 4096: "
                  f"{ms * 120 * 4096 / 6e4:.0f} min", flush=True)
    ref_name = f"now ({traces[0]})"
    ref = tables[ref_name]
    for name, tab in tables.items():
        if name != ref_name:
            print(f"{name} against {ref_name}: " + ", ".join(
                f"max |d{k}| {np.max(np.abs(tab[k][:-1] - ref[k][:-1])):.4f}" for k in ("l", "rate_raw", "f", "g")))


if __name__ == "__main__":
    main()
