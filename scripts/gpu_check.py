"""The Python steps of scripts/gpu_check.sh (run on a GPU host; see docs/PERFORMANCE.md, "GPU").

    python scripts/gpu_check.py model DIR              # a random-weight `fmnist` net, exported to DIR
    python scripts/gpu_check.py parity DIR OUT.json    # ONNX Runtime CUDA against CPU: jump and sampler
    python scripts/gpu_check.py ort-modes DIR OUT.json # run() vs IO binding vs CUDA graphs, per batch
    python scripts/gpu_check.py summary OUTDIR         # OUTDIR/summary.md from the files above and the benches

Random weights: timings do not depend on the weight values, only on the graph.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BATCHES = (1, 16, 64)


def model(out: str) -> None:
    """The `fmnist` preset U-Net (rectified flow: one net call per jump, as CUD's Euler jump),
    random weights, exported with `fewstep export` (max batch 64, its parity checks included)."""
    from fewstep.export.exporter import export_model
    from fewstep.training import checkpoint as ck
    from fewstep.training.build import build_method, build_net, resolve_net_config
    from fewstep.training.config import make_config

    cfg = make_config("rf", data="fmnist", preset="fmnist")
    resolve_net_config(cfg, (1, 28, 28), 10)
    method = build_method(cfg)
    sd = build_net(cfg, method).state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = ck.save_checkpoint(Path(tmp) / "run", 1, cfg, sd, {str(cfg["train"]["ema"][0]): sd},
                                  method.state_tensors())
        export_model(ckpt, Path(out), max_batch=64, name="fmnist", parity_steps=2)


def _inputs(manifest: dict, b: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, *manifest["image"]["shape"])).astype(np.float32)
    t = np.full((b,), 0.9, np.float32)
    s = np.full((b,), 0.4, np.float32)
    return x, t, s


def parity(model_dir: str, out: str) -> None:
    from fewstep.export.runner import load_runner
    from fewstep.serving.protocol import Item, ModelInfo, run_group

    cpu = load_runner(model_dir, backend="onnxruntime", device="cpu")
    gpu = load_runner(model_dir, backend="onnxruntime", device="cuda")
    res = {"providers": gpu.providers, "jump_max_abs_diff": {}}
    for b in BATCHES:
        x, t, s = _inputs(cpu.manifest, b)
        res["jump_max_abs_diff"][b] = float(np.abs(cpu(x, t, s) - gpu(x, t, s)).max())
    info = ModelInfo.from_manifest(cpu.manifest)
    items = [Item(seed, 4, 0.0) for seed in range(8)]
    a, g = run_group(cpu, info, items), run_group(gpu, info, items)
    res["sampler_4_steps_max_abs_diff"] = float(np.abs(a - g).max())
    res["ok"] = bool(res["sampler_4_steps_max_abs_diff"] < 1e-2 and max(res["jump_max_abs_diff"].values()) < 1e-3)
    Path(out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))


def _median_ms(fn, n: int = 200, warm: int = 20) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def ort_modes(model_dir: str, out: str) -> None:
    """One jump at each batch: session.run() on host arrays (what serving does now), IO binding
    with inputs and output on the GPU (no host copies), and CUDA graphs (captured on the first
    run of fixed buffers, replayed after), where ONNX Runtime can capture this graph."""
    import onnxruntime as ort

    from fewstep.export.runner import read_manifest

    manifest = read_manifest(Path(model_dir))
    path = str(Path(model_dir) / manifest["jump"]["file"])

    def session(graph: bool):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts = {"cudnn_conv_algo_search": "EXHAUSTIVE"}
        if graph:
            opts["enable_cuda_graph"] = "1"
        return ort.InferenceSession(path, so, providers=[("CUDAExecutionProvider", opts), "CPUExecutionProvider"])

    plain = session(False)
    res = {"onnxruntime": ort.__version__, "batches": {}}
    for b in BATCHES:
        x, t, s = _inputs(manifest, b)
        row = {}
        row["run_ms"] = _median_ms(lambda: plain.run(["x_s"], {"x": x, "t": t, "s": s}))
        io = plain.io_binding()
        vals = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in (("x", x), ("t", t), ("s", s))}
        for k, v in vals.items():
            io.bind_ortvalue_input(k, v)
        io.bind_output("x_s", "cuda", 0)
        row["io_binding_ms"] = _median_ms(lambda: plain.run_with_iobinding(io))
        try:
            sess = session(True)
            gio = sess.io_binding()
            for k, v in vals.items():
                gio.bind_ortvalue_input(k, v)
            y = ort.OrtValue.ortvalue_from_shape_and_type([b, *manifest["image"]["shape"]], np.float32, "cuda", 0)
            gio.bind_ortvalue_output("x_s", y)
            sess.run_with_iobinding(gio)  # captures the graph
            row["cuda_graph_ms"] = _median_ms(lambda: sess.run_with_iobinding(gio))
            ref = plain.run(["x_s"], {"x": x, "t": t, "s": s})[0]
            row["cuda_graph_max_abs_diff"] = float(np.abs(y.numpy() - ref).max())
        except Exception as e:  # noqa: BLE001 - reported: not every graph can be captured
            row["cuda_graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        res["batches"][b] = row
        print(b, json.dumps(row), flush=True)
    Path(out).write_text(json.dumps(res, indent=2) + "\n")


def _f(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}"


def summary(outdir: str) -> None:
    d = Path(outdir)
    lines = ["# GPU check", ""]
    env = d / "env.txt"
    if env.is_file():
        lines += ["```", env.read_text().strip()[:3000], "```", ""]
    if (d / "parity.json").is_file():
        p = json.loads((d / "parity.json").read_text())
        lines += [f"Parity CUDA vs CPU: jump max abs diff {p['jump_max_abs_diff']}, 4-step sampler "
                  f"{p['sampler_4_steps_max_abs_diff']:.2e}: {'OK' if p['ok'] else 'FAILED'}", ""]
    if (d / "ort_modes.json").is_file():
        m = json.loads((d / "ort_modes.json").read_text())
        lines += ["| batch | run() ms | IO binding ms | CUDA graph ms |", "|---|---|---|---|"]
        for b, row in m["batches"].items():
            lines.append(f"| {b} | {_f(row.get('run_ms'), 3)} | {_f(row.get('io_binding_ms'), 3)} | "
                         f"{_f(row.get('cuda_graph_ms'), 3) if 'cuda_graph_ms' in row else row.get('cuda_graph_error')} |")
        lines.append("")
    for mode in ("inline", "bls"):
        f = d / f"bench_{mode}.json"
        if not f.is_file():
            lines += [f"bench `--jump {mode}`: no result", ""]
            continue
        r = json.loads(f.read_text())
        rows = [x for x in r["results"] if x["source"] == "triton" and not x.get("mix")]
        ort_rows = {x["steps"]: x for x in r["results"] if x["source"] == "onnxruntime"}
        lines += [f"## `--jump {mode}` ({r['jump']})", "",
                  "| steps | in-process ORT CUDA p50 ms | Triton c=1 p50 ms | c=1 img/s | c=16 p50 ms | c=16 img/s |"
                  " c=16 calls/img-step |", "|---|---|---|---|---|---|---|"]
        for k in r["settings"]["steps"]:
            lo = next((x for x in rows if x["steps"] == k and x["concurrency"] == 1), {})
            hi = next((x for x in rows if x["steps"] == k and x["concurrency"] == 16), {})
            lines.append(f"| {k} | {_f((ort_rows.get(k) or {}).get('p50_ms'))} | {_f(lo.get('p50_ms'))} | "
                         f"{_f(lo.get('images_per_s'), 1)} | {_f(hi.get('p50_ms'))} | {_f(hi.get('images_per_s'), 1)} | "
                         f"{_f((hi.get('jump_calls') or {}).get('calls_per_image_step'), 3)} |")
        lines += ["", "summary: `" + json.dumps(r["summary"], default=str)[:2000] + "`", ""]
    (d / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    {"model": model, "parity": parity, "ort-modes": ort_modes, "summary": summary}[cmd](*rest)
