"""`fewstep precond fit|gap`: Analytic-Precond statistics of a teacher, and consistency gaps.

  fewstep precond fit --teacher CKPT [--points 120] [--samples 4096] [--force]
      estimate l and r of the teacher on `points` lambdas with `samples` data samples
      (Hutchinson traces along teacher trajectories), tabulate f(t, s), g(t, s) and cache them
      per teacher checksum and fit settings ($FEWSTEP_CACHE/precond/), where `fewstep train
      --method cd|ctm --precond analytic*` finds them; an existing entry is reused (--force
      fits again). The time left is shown as the fit runs.
  fewstep precond gap --teacher CKPT --precond cm,ctm,analytic [--times 8]
      the consistency gap E|g* - D|^2 / dim on the (t, s) pairs of a Karras grid, as a table
      (and JSON) and a PNG heat map; also the jump error of the student at initialisation,
      E|Phi - (f x + g D)|^2 / dim = g^2 * gap.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from fewstep.errors import UserError
from fewstep.plots import save_figure
from fewstep.sampling import EDM_SIGMA_DATA
from fewstep.training import precond as P

GAP_NAMES = P.PRECONDS


FIT_ONLY = ("points", "trace", "workers")
GAP_ONLY = ("precond", "times", "substeps")


def add_args(p: argparse.ArgumentParser) -> None:
    # One flat parser (the fewstep CLI parses intermixed arguments, which rules out subparsers).
    p.add_argument("action", choices=("fit", "gap"),
                   help="fit: fit the statistics and save the tables; gap: measure consistency gaps")
    p.add_argument("--teacher", required=True, help="edm teacher checkpoint (or run dir); 'exact' for the 2-D gmm")
    p.add_argument("--points", type=int, help=f"fit: lambda points (default {P.DEFAULT_POINTS})")
    p.add_argument("--samples", type=int,
                   help=f"data samples (default: fit {P.DEFAULT_SAMPLES} per point, gap 512)")
    p.add_argument("--precond", help=f"gap: comma-separated, from {', '.join(GAP_NAMES)} (default cm,ctm,analytic; "
                                     "analytic is the paper's backward form, analytic-* the project's variants "
                                     "of the same statistics)")
    p.add_argument("--times", type=int, help="gap: Karras times from 80 to 0.002, pairs t > s (default 8)")
    p.add_argument("--substeps", type=int, help="gap: Heun steps of the accurate teacher ODE solve (default 64)")
    p.add_argument("--batch", type=int, default=P.FIT_BATCH, help=f"samples per teacher call (default {P.FIT_BATCH})")
    p.add_argument("--trace", choices=P.TRACE_PROBES,
                   help=f"fit: the Jacobian-trace probe (default {P.TRACE_DEFAULT}: a forward difference, the cheapest "
                        "on a CPU, measured; vjp reverse mode, jvp forward mode)")
    p.add_argument("--workers", type=int,
                   help="fit: processes that walk the samples (default: one per thread torch may use, "
                        "OMP_NUM_THREADS; the tables are the same for any number)")
    p.add_argument("--force", action="store_true", help="fit: fit again even when the cache holds these tables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="fit: the tables file (default: beside the teacher checkpoint); "
                                 "gap: the PNG heat map (default <teacher ckpt>/precond-gap.png), JSON beside it")
    p.add_argument("--no-progress", action="store_true")


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_teacher(spec: str):
    from fewstep.training.build import load_model, load_teacher_model
    if spec == "exact":
        return load_teacher_model("exact", {"data": {"name": "gmm"}})
    teacher = load_model(spec, device=_device())
    if teacher.config["method"].get("name") != "edm":
        raise UserError(f"--teacher must be an edm checkpoint, got method {teacher.config['method'].get('name')!r}")
    return teacher


def _positive(name, v):
    if v < 1:
        raise UserError(f"--{name} must be >= 1, got {v}")


def run(args) -> int:
    wrong = [k for k in (GAP_ONLY if args.action == "fit" else FIT_ONLY) if getattr(args, k) is not None]
    if wrong:
        raise UserError(f"precond {args.action} takes no --{wrong[0]}")
    if args.action == "fit":
        args.points = P.DEFAULT_POINTS if args.points is None else args.points
        args.samples = P.DEFAULT_SAMPLES if args.samples is None else args.samples
        return run_fit(args)
    args.precond = args.precond or "cm,ctm,analytic"
    args.times = 8 if args.times is None else args.times
    args.samples = 512 if args.samples is None else args.samples
    args.substeps = 64 if args.substeps is None else args.substeps
    return run_gap(args)


def run_fit(args) -> int:
    _positive("samples", args.samples)
    _positive("batch", args.batch)
    if args.workers is not None:
        _positive("workers", args.workers)
    if args.points < 3:
        raise UserError(f"--points must be >= 3, got {args.points}")
    teacher = load_teacher(args.teacher)
    cached = P.teacher_tables_path(teacher, args.points, args.samples, args.seed)
    if not args.out and cached.is_file() and not args.force:
        print(f"{cached}: this teacher's tables for these settings are already cached (--force fits again)",
              file=sys.stderr)
        return 0
    tables, path = P.fit_teacher(teacher, points=args.points, samples=args.samples, seed=args.seed,
                                 batch=args.batch, progress=not args.no_progress, out=args.out,
                                 trace=args.trace or P.TRACE_DEFAULT, workers=args.workers)
    _, meta = P.load_tables(path)
    g = tables["g"]
    print(f"wrote {path} ({args.points} points, {args.samples} samples, {meta.get('seconds')} s); "
          f"l in [{tables['l'].min():.3g}, {tables['l'].max():.3g}], "
          f"max g(t,s) = {g.max():.3g}", file=sys.stderr)
    return 0


def gap_preconds(names, teacher, sigma_data=EDM_SIGMA_DATA, progress=True) -> dict:
    out = {}
    tabs = None
    for name in names:
        if name in ("cm", "ctm"):
            out[name] = P.make_precond(name, sigma_data)
        elif name in P.ANALYTIC_FORMS:
            if tabs is None:
                tabs = P.teacher_tables(teacher, progress=progress)
            out[name] = P.make_precond(name, tables=tabs)
        else:
            raise UserError(f"unknown preconditioning {name!r} (known: {', '.join(GAP_NAMES)})")
    return out


def format_gap_table(times, gaps: dict, gs: dict) -> str:
    """Markdown: one row per (t, s) pair, gap and jump error per preconditioning."""
    names = list(gaps)
    head = "| t | s | " + " | ".join(f"gap {n}" for n in names) + " | " + \
        " | ".join(f"jump err {n}" for n in names) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(names))]
    k = len(times)
    for i in range(k - 1):
        for j in range(i + 1, k):
            row = [f"{times[i]:.3g}", f"{times[j]:.3g}"]
            row += [f"{gaps[n][i, j]:.3g}" for n in names]
            row += [f"{gaps[n][i, j] * gs[n][i, j] ** 2:.3g}" for n in names]
            lines.append("| " + " | ".join(row) + " |")
    # summary: mean over the 1-step column (s = eps) and the intermediate jumps
    one = {n: float(np.nanmean(gaps[n][:-1, -1])) for n in names}
    mid = {n: float(np.nanmean(gaps[n][:, :-1][np.triu(np.ones((k, k - 1), bool), 1)])) for n in names}
    lines.append("")
    lines.append("mean gap, jumps to eps: " + ", ".join(f"{n} {one[n]:.3g}" for n in names))
    lines.append("mean gap, intermediate jumps (s > eps): " + ", ".join(f"{n} {mid[n]:.3g}" for n in names))
    return "\n".join(lines)


def gap_heatmap(times, gaps: dict, path, title=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(gaps)
    vals = np.concatenate([np.log10(np.maximum(v[np.isfinite(v)], 1e-12)) for v in gaps.values()])
    vmin, vmax = float(vals.min()), float(vals.max())
    fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names) + 1.2, 3.4), dpi=110, squeeze=False,
                             layout="constrained")
    k = len(times)
    labels = [f"{t:.3g}" for t in times]
    im = None
    for ax, n in zip(axes[0], names):
        m = np.log10(np.maximum(gaps[n], 1e-12))
        im = ax.imshow(np.where(np.isfinite(gaps[n]), m, np.nan), vmin=vmin, vmax=vmax, cmap="viridis")
        ax.set_title(n, fontsize=9)
        ax.set_xticks(range(k), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(k), labels, fontsize=6)
        ax.set_xlabel("s", fontsize=8)
        if ax is axes[0][0]:
            ax.set_ylabel("t", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="log10 gap", shrink=0.9)
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def measure_gap(teacher, names, *, times=8, samples=512, substeps=64, batch=256, seed=0, progress=True):
    ts = P.gap_times(times)
    pcs = gap_preconds(names, teacher, progress=progress)
    x0, labels = P.teacher_data(teacher, max(samples, 1), seed)
    dev = P.teacher_device(teacher)
    gaps = P.consistency_gap(teacher.denoise, x0.to(dev), pcs, ts, labels, samples=samples, substeps=substeps,
                             seed=seed, batch=batch, progress=progress)
    gs = {}
    tt = torch.tensor(ts, dtype=torch.float32)
    for n, pc in pcs.items():
        f, g = pc.coeffs(tt[:, None].expand(times, times).reshape(-1), tt[None, :].expand(times, times).reshape(-1))
        gs[n] = g.reshape(times, times).double().numpy()
    return ts, gaps, gs


def run_gap(args) -> int:
    names = [n.strip() for n in args.precond.split(",") if n.strip()]
    if not names:
        raise UserError("--precond: name at least one preconditioning")
    for n in names:
        if n not in GAP_NAMES:
            raise UserError(f"--precond: unknown preconditioning {n!r} (known: {', '.join(GAP_NAMES)})")
    if args.times < 2:
        raise UserError(f"--times must be >= 2, got {args.times}")
    for k in ("samples", "substeps", "batch"):
        _positive(k, getattr(args, k))
    teacher = load_teacher(args.teacher)
    ts, gaps, gs = measure_gap(teacher, names, times=args.times, samples=args.samples, substeps=args.substeps,
                               batch=args.batch, seed=args.seed, progress=not args.no_progress)
    if args.out:
        out = Path(args.out)
    elif getattr(teacher, "ckpt", None) is not None:
        out = Path(teacher.ckpt) / "precond-gap.png"
    else:
        out = Path("precond-gap.png")
    gap_heatmap(ts, gaps, out, title=f"consistency gap, teacher {args.teacher}")
    report = {"teacher": args.teacher, "times": ts.tolist(), "samples": args.samples, "substeps": args.substeps,
              "gap": {n: np.where(np.isfinite(v), v, -1).tolist() for n, v in gaps.items()},
              "g": {n: v.tolist() for n, v in gs.items()}}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(format_gap_table(ts, gaps, gs))
    print(f"wrote {out} and {out.with_suffix('.json')}", file=sys.stderr)
    return 0
