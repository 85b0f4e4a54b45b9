#!/usr/bin/env python
"""Per-jump latency: PyTorch eager vs ONNX Runtime (CPU) on the same exported model.

    nice -n 10 .venv/bin/python scripts/bench_jump.py                 # fmnist-preset cud model
    .venv/bin/python scripts/bench_jump.py --ckpt runs/cud-fmnist     # a trained checkpoint

Without --ckpt it writes a checkpoint of the `fmnist` preset network (random weights: latency
does not depend on them) for --method, exports it with `fewstep export` (parity checks
included), then times one jump x_t -> x_s per call at each batch size. PyTorch and ONNX
Runtime runs alternate, so both see the same machine load; the figures are medians (with
p10 / p90) over --repeats calls after --warmup calls. Prints a Markdown table; --json
writes the raw figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if "--passive" in sys.argv:  # must be set before torch (OpenMP) loads
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
import torch  # noqa: E402

from fewstep.export.exporter import export_model  # noqa: E402
from fewstep.export.onnx_export import random_inputs  # noqa: E402
from fewstep.export.runner import load_runner  # noqa: E402
from fewstep.training import checkpoint as ck  # noqa: E402
from fewstep.training.build import build_method, build_net, load_model, resolve_net_config  # noqa: E402
from fewstep.training.config import make_config  # noqa: E402


def make_checkpoint(root: Path, method: str, preset: str) -> Path:
    cfg = make_config(method, preset=preset)
    resolve_net_config(cfg, (1, 28, 28), 10)
    m = build_method(cfg)
    net = build_net(cfg, m)
    sd = net.state_dict()
    return ck.save_checkpoint(root / "run", 1, cfg, sd, {str(cfg["train"]["ema"][0]): sd}, m.state_tensors())


def pct(values, q):
    return float(np.percentile(np.asarray(values), q))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="checkpoint or run dir (default: a fresh fmnist-preset checkpoint)")
    ap.add_argument("--method", default="cud", help="method of the fresh checkpoint (default cud)")
    ap.add_argument("--preset", default="fmnist", help="preset of the fresh checkpoint (default fmnist)")
    ap.add_argument("--work", help="keep the checkpoint and the model dir here, and reuse them on the next run "
                                   "(default: a temporary dir)")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--repeats", type=int, default=50, help="timed calls per backend and batch")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both backends")
    ap.add_argument("--passive", action="store_true",
                    help="PyTorch's idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE) instead of spinning, "
                         "as ONNX Runtime's do in export.runner; matters on shared, busy cores")
    ap.add_argument("--ort-spin", action="store_true", help="let ONNX Runtime's idle threads spin")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="bench_jump-")
    work = Path(args.work) if args.work else Path(tmp.name)
    model_dir = work / "model"
    if (model_dir / "manifest.json").is_file():
        ckpt = load_runner(model_dir).manifest["training"]["ckpt"]
        print(f"[bench] reusing {model_dir} (from {ckpt})", file=sys.stderr)
    else:
        ckpt = args.ckpt or make_checkpoint(work, args.method, args.preset)
        t0 = time.time()
        export_model(ckpt, model_dir, log=lambda m: print(f"[export] {m}", file=sys.stderr))
        print(f"[bench] exported in {time.time() - t0:.1f}s", file=sys.stderr)
    model = load_model(ckpt)
    runner = load_runner(model_dir, threads=args.threads, spinning=args.ort_spin)
    man = runner.manifest
    n_params = sum(p.numel() for p in model.net.parameters())

    rows = []
    for b in [int(v) for v in args.batches.split(",")]:
        feeds = random_inputs(man["sampler"], man["image"]["shape"], man["num_classes"], b, seed=7)
        labels = feeds.get("class_label")
        tx, tt, ts = (torch.from_numpy(feeds[k]) for k in ("x", "t", "s"))
        tl = None if labels is None else torch.from_numpy(labels)

        def run_torch():
            with torch.inference_mode():
                return model.jump(tx, tt, ts, tl)

        def run_ort():
            return runner(feeds["x"], feeds["t"], feeds["s"], labels)

        err = float(np.max(np.abs(run_torch().numpy() - run_ort())))
        for _ in range(args.warmup):
            run_torch()
            run_ort()
        times = {"torch": [], "onnxruntime": []}
        cpu = {"torch": [], "onnxruntime": []}
        for _ in range(args.repeats):  # alternate, so both backends see the same load
            for name, fn in (("torch", run_torch), ("onnxruntime", run_ort)):
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.process_time() - c0) * 1e3)
        row = {"batch": b, "max_abs_diff": err}
        for name, v in times.items():
            # cpu_ms: CPU time of this process per call (all its threads); on a loaded machine
            # it is steadier than the wall clock, which also counts time spent descheduled
            row[name] = {"median_ms": statistics.median(v), "p10_ms": pct(v, 10), "p90_ms": pct(v, 90),
                         "cpu_median_ms": statistics.median(cpu[name])}
        row["speedup"] = row["torch"]["median_ms"] / row["onnxruntime"]["median_ms"]
        rows.append(row)
        print(f"[bench] batch {b}: torch {row['torch']['median_ms']:.2f} ms, "
              f"onnxruntime {row['onnxruntime']['median_ms']:.2f} ms", file=sys.stderr)

    import onnxruntime
    info = {"method": man["method"], "preset": man["training"]["config"]["net"].get("preset"),
            "params": n_params, "shape": man["image"]["shape"], "solver": man["solver"],
            "threads": args.threads, "torch_passive": args.passive, "ort_spin": args.ort_spin, "repeats": args.repeats, "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "load_avg": os.getloadavg()}
    print(f"\n{info['method']} / {info['preset']} net ({n_params / 1e6:.2f}M params, {info['shape']}), "
          f"{args.threads} threads (PyTorch OpenMP {'passive' if args.passive else 'default'}, "
          f"ONNX Runtime {'spinning' if args.ort_spin else 'not spinning'}), medians of {args.repeats} calls (p10-p90), "
          f"torch {info['torch']}, onnxruntime {info['onnxruntime']}, load avg {info['load_avg'][0]:.1f}\n")
    print("| batch | PyTorch eager, ms (p10-p90) | ONNX Runtime CPU, ms (p10-p90) | speed-up "
          "| CPU time ms: PyTorch / ORT | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        pt, ox = r["torch"], r["onnxruntime"]
        print(f"| {r['batch']} | {pt['median_ms']:.1f} ({pt['p10_ms']:.1f}-{pt['p90_ms']:.1f}) "
              f"| {ox['median_ms']:.1f} ({ox['p10_ms']:.1f}-{ox['p90_ms']:.1f}) | {r['speedup']:.2f}x "
              f"| {pt['cpu_median_ms']:.1f} / {ox['cpu_median_ms']:.1f} | {r['max_abs_diff']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
