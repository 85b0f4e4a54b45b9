"""`fewstep bench`: latency and throughput against sampling steps and concurrency, over gRPC.

    fewstep bench --url 127.0.0.1:8001 --model fmnist --steps 1,2,4,8,16 --concurrency 1,4,16 \\
                  --requests 200 --warmup 20 --export models/fmnist --ckpt runs/fmnist --out bench/fmnist

For every (steps, concurrency) cell it drives the ensemble `<model>` with `concurrency`
asyncio workers (tritonclient.grpc.aio, one channel), each sending one request of `batch`
images at a time (distinct seeds), after `warmup` unrecorded requests at the same
setting; it records the client-side latency of every request, the errors by gRPC code, and
Triton's statistics (queue and compute time, executions) of each composing model
(`<model>`, `<model>_sampler`, `<model>_jump`) as the difference of GetInferenceStatistics
before and after the cell.

Baselines in the same run, so the serving overhead is a measured ratio:
  * onnxruntime: the in-process sampler on the exported model dir (`--export DIR`): the
    same code the sampler model runs (`serving.protocol.run_group` over `export.runner`),
    with no Triton, gRPC or BLS between the steps;
  * pytorch: the checkpoint (`--ckpt`) sampled eagerly by its training method.
Baselines run one request at a time. When concurrency 1 is measured, the baseline calls
and the Triton requests alternate request by request, so that all of them see the same
background load (a shared host); otherwise the baselines run before the Triton cells.

`--mix 1:0.5,8:0.5` adds a mixed cell per concurrency: each request draws its step count
from the weights, and the latency is reported per step count. Every Triton cell also
reports jump calls per image-step and the average jump batch, from the sampler's own
counters (Triton metrics, `--metrics-url`) and, with `--jump bls`, the jump model's
statistics.

`--serve` starts a tritonserver on the `--export` dir for the run (then the CPU time of the
server and its stubs per request is reported too); `--serve` without `--export` benchmarks
every shipped model (demo/models: the large `cd_fmnist` and the small `cud_fmnist`) one
after the other and prints their serving overheads side by side. Outputs, under `--out`: bench.csv
(perf_analyzer-like columns, latencies in microseconds), bench.json (everything, in ms),
latency_vs_steps.png, throughput_vs_concurrency.png, and with `--quality EVAL.json` (a
`fewstep eval` report) the FID of each step count and quality_vs_latency.png.
"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from fewstep.errors import UserError  # noqa: F401  (part of this API)
from fewstep.serving.bench_measure import Bench, Cell  # noqa: F401
from fewstep.serving.bench_plan import Plan, add_bench_args, check_args, make_plan, parse_mix  # noqa: F401
from fewstep.serving.bench_report import (  # noqa: F401  (the summary is part of the benchmark's API)
    CSV_COLUMNS, _slope, build_report, console_table, read_quality, shipped_table, summarize, write_outputs)
from fewstep.serving.bench_stats import (  # noqa: F401
    jump_calls, parse_jump_counters, parse_stats, read_jump_counters, stats_delta)
from fewstep.export import shipped
from fewstep.serving.launcher import find_triton
from fewstep.serving.repository import Options
from fewstep.serving.session import served


def run_bench(args) -> int:
    if args.serve and not args.export:
        return run_shipped(args)
    report = bench_one(args)
    print(console_table(report))
    return 0


def run_shipped(args) -> int:
    """`--serve` without --export: every shipped model (demo/models: the large cd_fmnist and
    the small cud_fmnist), exported on first use as `fewstep demo` does, each on a server of
    its own with the same plan; outputs in --out/<name>/, the figures side by side at the end
    and in --out/summary.json. A shipped model's eval.json gives the quality column."""
    import copy
    import json


    check_args(args, shipped=True)
    exports = shipped.prepare_all(log=lambda msg: print(msg, file=sys.stderr))
    reports = {}
    for src, export in zip(shipped.shipped_models(), exports):
        sub = copy.copy(args)
        sub.export, sub.out, sub.model = str(export), str(Path(args.out) / src.name), None
        if sub.quality is None and (src / "eval.json").is_file():
            sub.quality = str(src / "eval.json")
        reports[src.name] = report = bench_one(sub)
        print(console_table(report) + "\n")
    print(shipped_table(reports))
    out = Path(args.out) / "summary.json"
    out.write_text(json.dumps({name: {"export": rep.get("export"), "summary": rep["summary"],
                                      "machine": rep["machine"]} for name, rep in reports.items()},
                              indent=2, default=str) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def bench_one(args) -> dict:
    """One model's run (its own server with --serve); writes its outputs, returns bench.json's content."""
    plan = check_args(args)
    if args.serve:
        find_triton()
        server, written = served([f"{args.model}={args.export}" if args.model else args.export], Options(
            device=args.device, threads=args.threads or 0, instances=args.instances, jump=args.jump),
            grpc_port=0, http_port=0, metrics_port=0)
        name = written[0]["name"]
        print(f"starting tritonserver on {args.export} as '{name}'", file=sys.stderr)
        with server:
            report = _measure(Bench(args, plan, name, server), server.grpc_url)
    else:
        report = _measure(Bench(args, plan, args.model), args.url)
    report["export"] = args.export
    paths = write_outputs(report, Path(args.out))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return report


def _measure(bench: Bench, url: str) -> dict:
    seconds, load0, load1 = asyncio.run(bench.run(url))
    return build_report(bench, url, seconds, load0, load1)
