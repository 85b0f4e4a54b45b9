#!/usr/bin/env python
"""Serving overheads: the BLS sampler loop's cost per step, and 1-step latency through
Triton against the in-process ONNX Runtime sampler (same model, batch 1, sequential).

    python scripts/bench_serving.py --preset fmnist-cpu            # random weights, exported here
    python scripts/bench_serving.py --model models/fmnist          # an exported model dir

Method. With one client sending one request at a time:
  * in-process: `export.runner` (ONNX Runtime, --threads intra-op threads) driven by
    `training.sampling.sample`; the jump alone at batch 1 is "the jump itself".
  * Triton: `fewstep serve`'s repository on the bundled tritonserver, the jump with the
    same thread count, requests to the ensemble `<name>` over gRPC on loopback.
  Latency against steps is fitted with a line; the BLS loop's overhead per step is the
  slope of the Triton line minus the in-process jump time (what a step costs beyond the
  jump: BLS request, Triton's scheduler, IPC to the jump's stub and back, numpy).
Weights do not change timings, so `--preset` uses a random-weight checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_model(preset: str, work: Path) -> Path:
    """Export a random-weight checkpoint of a preset (fmnist shape 1x28x28)."""
    import torch

    from export.cli import export_model
    from training import checkpoint as ck
    from training.build import build_method, build_net, resolve_net_config
    from training.config import make_config

    cfg = make_config("rf", data="fmnist", preset=preset)
    resolve_net_config(cfg, (1, 28, 28), 10)
    method = build_method(cfg)
    net = build_net(cfg, method)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    sd = net.state_dict()
    ckpt = ck.save_checkpoint(work / "run", 1, cfg, sd, {str(cfg["train"]["ema"][0]): sd})
    out = work / preset.replace("-", "_")
    export_model(ckpt, out, max_batch=64, parity_steps=1)
    return out


def timeit(fn, reps: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def interleaved(fa, fb, reps: int, warmup: int = 5) -> tuple[list[float], list[float]]:
    for _ in range(warmup):
        fa()
        fb()
    a, b = [], []
    for _ in range(reps):
        for fn, out in ((fa, a), (fb, b)):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return a, b


def group_cpu_s(pids) -> float:
    """utime + stime (s) of the given processes (the server and its stubs), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        total += int(rest[11]) + int(rest[12])
    return total / tick


def cpu_per_call(fn, reps: int, pids=()) -> float:
    """CPU ms per call: this process's CPU time plus that of `pids` (robust to a busy host)."""
    fn()
    c0, s0 = time.process_time(), group_cpu_s(pids)
    for _ in range(reps):
        fn()
    return ((time.process_time() - c0) + (group_cpu_s(pids) - s0)) * 1e3 / reps


def summary(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"median_ms": float(np.median(a)), "p10_ms": float(np.percentile(a, 10)),
            "p90_ms": float(np.percentile(a, 90)),
            "mean_ms": float(a.mean()), "n": len(ms)}


def fit(steps: list[int], medians: list[float]) -> tuple[float, float]:
    slope, intercept = np.polyfit(np.asarray(steps, float), np.asarray(medians, float), 1)
    return float(slope), float(intercept)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="exported model dir")
    src.add_argument("--preset", help="export a random-weight model of this training preset (tiny, fmnist-cpu, ...)")
    ap.add_argument("--steps", default="1,2,4,8", help="step counts (comma-separated)")
    ap.add_argument("--reps", type=int, default=60, help="timed requests per setting")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads, in-process and in Triton")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    from export.runner import load_runner
    from serving.client import Client
    from serving.launcher import Server
    from serving.repository import Options, write_repository
    from training import sampling

    steps_list = [int(s) for s in args.steps.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        tmp = Path(tmp)
        model_dir = Path(args.model) if args.model else make_model(args.preset, tmp)
        runner = load_runner(model_dir, backend="onnxruntime", device="cpu", threads=args.threads)
        man = runner.manifest
        name, spec, shape = man["name"], man["sampler"], tuple(man["image"]["shape"])
        print(f"model {name} ({man['method']}, {shape}), ONNX Runtime threads {args.threads}", file=sys.stderr)

        x = sampling.noise([0], 0, shape)
        t = np.full((1,), spec["t_max"], np.float32)
        s = np.full((1,), spec["t_end"], np.float32)
        labels = np.zeros((1,), np.int64) if man["num_classes"] else None
        lab = [0] if man["num_classes"] else None
        res = {"model": name, "method": man["method"], "shape": list(shape), "threads": args.threads,
               "reps": args.reps, "cpus": os.cpu_count(), "load_avg_before": os.getloadavg()[0],
               "inprocess": {}, "triton": {}}

        def local(n):
            return sampling.sample(lambda a, b, c: runner(a, b, c, labels), spec, n, [0], shape)

        repo = tmp / "repo"
        written = write_repository(repo, [str(model_dir)], Options(device="cpu", threads=args.threads))
        server = Server(repo, grpc_port=0, http_port=0, metrics_port=0, models=written[0]["models"],
                        log_file=tmp / "tritonserver.log")
        with server, Client(server.grpc_url) as client:
            import tritonclient.grpc as grpcclient

            raw = grpcclient.InferenceServerClient(server.grpc_url)
            ins = []
            feeds = [("x", x, "FP32"), ("t", t.reshape(1, 1), "FP32"), ("s", s.reshape(1, 1), "FP32")]
            if labels is not None:
                feeds.append(("class_label", labels.reshape(1, 1), "INT64"))
            for n_, arr, dt in feeds:
                i = grpcclient.InferInput(n_, list(arr.shape), dt)
                i.set_data_from_numpy(arr)
                ins.append(i)
            # in-process and Triton calls alternate, so both see the same load on a shared host
            settings = [("jump", lambda: runner(x, t, s, labels), lambda: raw.infer(name + "_jump", ins))]
            for n in steps_list:
                settings.append((f"steps_{n}", lambda n=n: local(n),
                                 lambda n=n: client.generate(name, [0], n, class_labels=lab)))
            pids = server.pids()
            for key, fa, fb in settings:
                a, b = interleaved(fa, fb, args.reps)
                tkey = "jump_direct" if key == "jump" else key
                res["inprocess"][key] = summary(a)
                res["triton"][tkey] = summary(b)
                res["inprocess"][key]["cpu_ms"] = cpu_per_call(fa, args.reps)
                res["triton"][tkey]["cpu_ms"] = cpu_per_call(fb, args.reps, pids)
            stats = raw.get_inference_statistics(name + "_jump", as_json=True)["model_stats"][0]
            inf = stats["inference_stats"]
            count = int(inf["success"]["count"])
            res["triton"]["jump_compute_infer_ms"] = int(inf["compute_infer"]["ns"]) / count / 1e6
            res["triton"]["jump_queue_ms"] = int(inf["queue"]["ns"]) / count / 1e6
            raw.close()
        res["load_avg_after"] = os.getloadavg()[0]

    res["fit"] = {}
    for stat in ("median_ms", "p10_ms", "cpu_ms"):
        loc = [res["inprocess"][f"steps_{n}"][stat] for n in steps_list]
        tri = [res["triton"][f"steps_{n}"][stat] for n in steps_list]
        slope_l, icpt_l = fit(steps_list, loc)
        slope_t, icpt_t = fit(steps_list, tri)
        jump = res["inprocess"]["jump"][stat]
        res["fit"][stat] = {"inprocess_ms_per_step": slope_l, "inprocess_intercept_ms": icpt_l,
                            "triton_ms_per_step": slope_t, "triton_intercept_ms": icpt_t,
                            "bls_overhead_ms_per_step": slope_t - jump,
                            "triton_minus_inprocess_ms_per_step": slope_t - slope_l}
        if 1 in steps_list:
            res["fit"][stat]["one_step_triton_minus_inprocess_ms"] = (
                res["triton"]["steps_1"][stat] - res["inprocess"]["steps_1"][stat])

    print(f"\nload average {res['load_avg_before']:.1f} -> {res['load_avg_after']:.1f} on {res['cpus']} CPUs")
    print("\n| setting | in-process ORT: median (p10, p90) ms; CPU ms | Triton: median (p10, p90) ms; CPU ms |")
    print("|---|---|---|")

    def cell(d):
        return f"{d['median_ms']:.2f} ({d['p10_ms']:.2f}, {d['p90_ms']:.2f}); {d['cpu_ms']:.2f}"

    print(f"| jump alone, batch 1 | {cell(res['inprocess']['jump'])} | {cell(res['triton']['jump_direct'])} "
          f"(gRPC straight to `{name}_jump`) |")
    for n in steps_list:
        print(f"| {n} step{'s' if n > 1 else ''} | {cell(res['inprocess'][f'steps_{n}'])} | "
              f"{cell(res['triton'][f'steps_{n}'])} |")
    print()
    for stat, f in res["fit"].items():
        line = (f"[{stat[:-3]}] ms per step: in-process {f['inprocess_ms_per_step']:.2f} ms, Triton "
                f"{f['triton_ms_per_step']:.2f} ms; BLS loop overhead beyond the jump "
                f"{f['bls_overhead_ms_per_step']:.2f} ms/step (beyond an in-process step: "
                f"{f['triton_minus_inprocess_ms_per_step']:.2f})")
        if "one_step_triton_minus_inprocess_ms" in f:
            line += f"; 1 step through Triton: +{f['one_step_triton_minus_inprocess_ms']:.2f} ms"
        print(line)
    print(f"Triton's statistics for {name}_jump: compute {res['triton']['jump_compute_infer_ms']:.2f} ms, "
          f"queue {res['triton']['jump_queue_ms']:.2f} ms per execution")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
