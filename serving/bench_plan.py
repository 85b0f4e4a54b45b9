"""`fewstep bench`'s plan: its arguments, checked before anything runs, as a `Plan` of cells."""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from fewstep.options import parse_int_list, require
from fewstep.errors import UserError
from fewstep.serving.protocol import GAMMA_RANGE, range_text


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC HOST:PORT (default 127.0.0.1:8001)")
    p.add_argument("--model", help="model name (the ensemble, as `fewstep serve` printed); "
                                   "default with --serve: the export's name")
    p.add_argument("--steps", help="step counts, comma-separated (default 1,2,4,8,16; none with --mix)")
    p.add_argument("--mix", metavar="STEPS:WEIGHT,...",
                   help="a mixed workload, e.g. 1:0.5,8:0.5: each request draws its step count by weight; "
                        "one cell per concurrency, latency reported per step count")
    p.add_argument("--concurrency", default="1,4,16",
                   help="requests in flight, comma-separated (default 1,4,16)")
    p.add_argument("--batch", type=int, default=1, help="images per request (default 1)")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--requests", type=int, help="measured requests per cell (default 100)")
    amount.add_argument("--duration", type=float, help="seconds of measurement per cell (instead of --requests)")
    p.add_argument("--warmup", type=int, default=10, help="unrecorded requests before each cell (default 10)")
    p.add_argument("--out", default="bench", help="output dir (default ./bench)")
    p.add_argument("--export", metavar="DIR",
                   help="the served model's export dir: adds the in-process ONNX Runtime baseline")
    p.add_argument("--ckpt", help="the model's checkpoint (or run dir): adds the PyTorch eager baseline")
    p.add_argument("--threads", type=int,
                   help="intra-op threads of the in-process baselines (and of the jump with --serve); "
                        "default: what the server's jump uses (its `threads` parameter, 0 = runtime default)")
    p.add_argument("--serve", action="store_true",
                   help="start a tritonserver on the --export dir for this run (ignores --url); without "
                        "--export: every shipped model (the large cd_fmnist and the small cud_fmnist), one after "
                        "the other, their serving overheads side by side")
    p.add_argument("--instances", type=int, default=0,
                   help="with --serve: instances that run the jump (0 = auto, see `fewstep serve --instances`)")
    p.add_argument("--jump", default="auto", choices=("auto", "inline", "bls"),
                   help="with --serve: how the sampler runs its steps (see `fewstep serve --jump`)")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                   help="where the jump runs: the in-process ONNX Runtime baseline (CUDA for gpu) and, "
                        "with --serve, the server's jump (default cpu)")
    p.add_argument("--metrics-url", help="the server's Prometheus metrics (default: HOST:8002/metrics of --url; "
                                         "with --serve its own): the sampler's jump counters")
    p.add_argument("--quality", metavar="EVAL.json",
                   help="a `fewstep eval` report: adds FID (or SWD) per step count and the quality-vs-latency plot")
    p.add_argument("--seed", type=int, default=0, help="first seed; every image gets its own (default 0)")
    p.add_argument("--gamma", type=float, help="sampler stochasticity in [0, 1] (default: the model's)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclass
class Plan:
    steps: list
    concurrency: list
    batch: int
    requests: int | None
    duration: float | None
    warmup: int
    mix: list | None = None         # [(steps, probability)], or None


def parse_mix(text: str) -> list:
    """'1:0.5,8:0.5' -> [(1, 0.5), (8, 0.5)] (weights normalised to sum 1)."""
    out = {}
    for part in str(text).replace(" ", "").split(","):
        k, sep, w = part.partition(":")
        try:
            k, w = int(k), float(w)
        except ValueError:
            raise UserError(f"--mix: expected STEPS:WEIGHT pairs like 1:0.5,8:0.5, got {part!r}") from None
        if not sep or k < 1 or not w > 0 or not math.isfinite(w) or k in out:
            raise UserError(f"--mix: each pair needs steps >= 1 (once) and a weight > 0, got {part!r}")
        out[k] = w
    total = sum(out.values())
    return [(k, w / total) for k, w in sorted(out.items())]


def make_plan(args) -> Plan:
    mix = parse_mix(args.mix) if getattr(args, "mix", None) else None
    if args.steps is not None:
        steps = sorted(parse_int_list(args.steps, "--steps", low=1))
    else:
        steps = [] if mix else [1, 2, 4, 8, 16]
    conc = sorted(parse_int_list(args.concurrency, "--concurrency", low=1))
    positive, at_least_0, at_least_1 = (lambda v: v > 0), (lambda v: v >= 0), (lambda v: v >= 1)
    require(args, {"batch": (at_least_1, ">= 1"), "requests": (at_least_1, ">= 1"),
                   "duration": (positive, "> 0 seconds"), "warmup": (at_least_0, ">= 0"),
                   "timeout": (positive, "> 0 seconds"), "seed": (at_least_0, ">= 0"),
                   "gamma": (lambda v: GAMMA_RANGE[0] <= v <= GAMMA_RANGE[1], f"in {range_text(*GAMMA_RANGE)}"),
                   "threads": (at_least_0, ">= 0"),
                   "instances": (at_least_0, ">= 0 (0 = auto)")})
    requests = args.requests if args.requests is not None or args.duration is not None else 100
    return Plan(steps, conc, args.batch, requests, args.duration, args.warmup, mix)


def check_args(args, shipped: bool = False) -> Plan:
    """Every argument checked (before a server is reached or started); the plan. shipped:
    `--serve` without --export (every shipped model), where --model and --ckpt do not apply."""
    plan = make_plan(args)
    if shipped and (args.model or args.ckpt):
        raise UserError("--serve without --export benchmarks the shipped models: --model and --ckpt need --export DIR")
    if args.quality:
        read_quality(args.quality)  # fail before the run, not after it
    if args.export and not Path(args.export).is_dir():
        raise UserError(f"--export {args.export}: not a directory")
    if args.ckpt and not Path(args.ckpt).exists():
        raise UserError(f"--ckpt {args.ckpt}: no such file or directory")
    if not args.serve and not args.model:
        raise UserError("--model NAME is required (the model name the server serves)")
    return plan


def check_against_model(plan: Plan, meta) -> None:
    """The plan against the served model's limits (its ModelMeta)."""
    too_many = [s for s in plan.steps + [k for k, _ in plan.mix or []] if s > meta.max_steps]
    if too_many:
        raise UserError(f"--steps: {too_many[0]} is above the model's max_steps ({meta.max_steps}) for '{meta.name}'")
    if meta.max_batch and plan.batch > meta.max_batch:
        raise UserError(f"--batch: {plan.batch} is above the model's max batch ({meta.max_batch})")


def read_quality(path) -> dict:
    """A `fewstep eval` report -> {"metric", "key", "values": {steps: value}, "path"}."""
    p = Path(path)
    try:
        report = json.loads(p.read_text())
    except OSError as e:
        raise UserError(f"--quality {path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--quality {path}: not JSON ({e})") from None
    results = report.get("results") if isinstance(report, dict) else None
    if not isinstance(results, list) or not results:
        raise UserError(f"--quality {path}: not a `fewstep eval` report (no results)")
    key = next((k for k in ("fid", "swd") if k in results[0]), None)
    if key is None or any("steps" not in r or key not in r for r in results):
        raise UserError(f"--quality {path}: every result needs 'steps' and 'fid' (or 'swd')")
    return {"path": str(p), "metric": report.get("metric", key), "key": key,
            "values": {int(r["steps"]): float(r[key]) for r in results}}
