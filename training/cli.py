"""`fewstep train`, `fewstep sample`, `fewstep eval`, `fewstep precond`, `fewstep features`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fewstep.training.methods import METHODS


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, choices=tuple(METHODS), help="the training method")
    p.add_argument("--preset", help="tiny, toy, fmnist-cpu, fmnist, cifar10 (default: fmnist-cpu; toy for 2-D data)")
    p.add_argument("--data", help="fmnist (default), mnist, cifar10, gmm, moons, checkerboard, or a folder of images")
    p.add_argument("--data-dir", help="where the dataset files are")
    p.add_argument("--teacher", help="teacher checkpoint (cd, ctm, cud-distill); 'exact' for the 2-D gmm")
    p.add_argument("--precond", help="cd, ctm: cm, ctm, analytic (the paper's Analytic-Precond) or the project's "
                                     "analytic-decay, analytic-full, analytic-none (shorthand for method.precond=...)")
    p.add_argument("--iters", type=int, help="training iterations (overrides the preset)")
    p.add_argument("--batch", type=int, help="global batch size (overrides the preset)")
    p.add_argument("--out", help="run directory (default: runs/<method>-<data>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. lr=1e-4 train.ema=[0.999,0.9999] method.solver=heun")


def run_train(args) -> int:
    from fewstep.options import check_range
    from fewstep.training.config import make_config
    from fewstep.training.loop import train

    overrides = list(args.overrides)
    if args.precond is not None:
        overrides.append(f"method.precond={args.precond}")
    if args.iters is not None:
        overrides.append(f"train.iters={args.iters}")
    if args.batch is not None:
        overrides.append(f"train.batch={args.batch}")
    cfg = make_config(args.method, data=args.data, preset=args.preset, data_dir=args.data_dir,
                      teacher=args.teacher, overrides=overrides)
    check_range("--iters", args.iters, 1)
    data_tag = Path(cfg["data"]["name"]).name
    out = args.out or f"runs/{cfg['method']['name']}-{data_tag}"
    last = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    if last is not None:
        print(f"checkpoint: {last}")
    return 0


def add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint dir or run dir (its latest checkpoint)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's default)")
    p.add_argument("--num", type=int, default=64, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="seeds are seed, seed+1, ...")
    p.add_argument("--gamma", type=float, help="stochastic sampling in [0, 1] (consistency models)")
    p.add_argument("--label", type=int, help="class label (class-conditional models); default: cycle")
    p.add_argument("--ema", default="default", help="EMA decay to use, or 'none' for the online weights")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a sampling option of the model's method, e.g. solver=heun, sample_head=2 (cud)")
    p.add_argument("--out", required=True, help="output PNG")


def run_sample(args) -> int:
    import torch

    from fewstep.errors import UserError
    from fewstep.options import check_range
    from fewstep.plots import steps_title
    from fewstep.training.build import load_model
    from fewstep.training.config import parse_sets
    from fewstep.training.sample_png import class_labels, save_samples

    check_range("--num", args.num, 1)
    check_range("--seed", args.seed, 0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.ckpt, ema=None if args.ema == "none" else args.ema, device=device,
                       method_opts=parse_sets(args.set))
    spec = model.method.sampler_spec()
    steps = spec["default_steps"] if args.steps is None else args.steps
    check_range("--steps", steps, 1, spec["max_steps"])
    check_range("--gamma", args.gamma, 0, 1)
    n_cls = model.num_classes
    if args.label is not None:
        if not n_cls:
            raise UserError("--label given but the model is unconditional")
        check_range("--label", args.label, 0, n_cls - 1)
        labels = torch.full((args.num,), args.label, device=device)
    else:
        labels = class_labels(n_cls, args.num, device)
    x = model.sample(steps, list(range(args.seed, args.seed + args.num)), labels=labels,
                     gamma=args.gamma, device=device)
    save_samples(x, args.out, steps_title(model.method.name, steps))
    print(f"wrote {args.out} ({args.num} samples, {steps} steps, from {model.ckpt})", file=sys.stderr)
    return 0


def add_eval_args(p: argparse.ArgumentParser) -> None:
    from fewstep.training.evaluate import add_args
    add_args(p)


def run_eval(args) -> int:
    from fewstep.training.evaluate import run
    return run(args)


def add_precond_args(p: argparse.ArgumentParser) -> None:
    from fewstep.training.precond_cli import add_args
    add_args(p)


def run_precond(args) -> int:
    from fewstep.training.precond_cli import run
    return run(args)


def add_features_args(p: argparse.ArgumentParser) -> None:
    from fewstep.training.feature_classifier import add_features_args as add
    add(p)


def run_features(args) -> int:
    from fewstep.training.feature_classifier import run_features as run
    return run(args)
