#!/usr/bin/env python
"""The GPU check's steps (scripts/gpu_check.sh runs them; docs/PERFORMANCE.md, "GPU").

    python scripts/gpu_check.py jump   [--device cuda|cpu] [--batches 1,4,16,64] [--json OUT]
    python scripts/gpu_check.py triton [--device cuda|cpu] [--json OUT]

Sized for what a GPU host lent to this project has: PyTorch with CUDA, and nothing else of
ours (no onnxruntime-gpu, TensorRT, onnx or tritonclient; nothing can be fetched).

`jump`: the jump of each shipped demo model (demo/models/*) in PyTorch, per batch: eager,
and replayed from a CUDA graph (captured once per batch on static buffers). Prints a
Markdown table: median ms per call, images per second, and the graph's largest difference
from eager. With --device cpu (no GPU) only eager runs: the dry run of the same code.

`triton`: Triton from a slimmed pytriton (scripts/slim_triton.py, found on PYTHONPATH) on the
first shipped model: `<m>_sampler` (the product's sampler, BLS mode) calls `<m>_jump`, a
KIND_GPU Python model that runs the jump in PyTorch on CUDA and answers x_s in GPU memory
(DLPack). The sampler's request asks for CPU memory (serving.models.common.JumpClient), so
its images must equal the in-process PyTorch sampler's. Spoken to over Triton's HTTP API
with the standard library (no tritonclient on the host). With --device cpu the same runs on
the CPU (x_s in CPU memory): the dry run.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from fewstep.export.shipped import _checkpoint_from_shipped, read_ship, shipped_models
from fewstep.export.onnx_export import jump_module, random_inputs
from fewstep.training.build import load_model

JUMP_MODEL = Path(__file__).with_name("gpu_check_jump_model.py")  # <m>_jump of the triton step


def load_shipped(src: Path, work: Path, device: str):
    """(name, training.build.Model on device) of a shipped demo model."""
    info = read_ship(src)
    ckpt = work / src.name
    ema = _checkpoint_from_shipped(src, ckpt, info)
    return info.get("name") or src.name, load_model(ckpt, ema=ema, device=device), ckpt, ema


def _feeds(model, batch: int, device: str) -> list[torch.Tensor]:
    spec = model.method.sampler_spec()
    f = random_inputs(spec, model.shape, model.num_classes, batch, seed=0)
    names = ["x", "t", "s"] + (["class_label"] if model.num_classes > 0 else [])
    return [torch.from_numpy(f[n]).to(device) for n in names]


def _median_ms(fn, sync, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_jump(module, feeds, device: str, repeats: int, warmup: int) -> dict:
    """Eager and (on CUDA) CUDA-graph median ms of one jump call on these inputs."""
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    row = {}
    with torch.inference_mode():
        ref = module(*feeds)
        row["eager_ms"] = _median_ms(lambda: module(*feeds), sync, repeats, warmup)
        if not cuda:
            row["graph"] = "n/a (CUDA only)"
            return row
        static = [f.clone() for f in feeds]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream before capture, as CUDA graphs need
            for _ in range(3):
                module(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = module(*static)
        except Exception as e:  # noqa: BLE001 - reported: not every jump can be captured
            row["graph"] = f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            return row
        graph.replay()
        sync()
        row["graph_max_abs_diff"] = float((out - ref).abs().max())
        row["graph_ms"] = _median_ms(graph.replay, sync, repeats, warmup)
    return row


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "device": device}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def run_jump(args) -> int:
    device = _device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fewstep-gpu-check-") as tmp:
        for src in shipped_models():
            name, model, _, _ = load_shipped(src, Path(tmp), device)
            module = jump_module(model).to(device)
            for b in batches:
                row = {"model": name, "method": model.method.name, "batch": b}
                row.update(time_jump(module, _feeds(model, b, device), device, args.repeats, args.warmup))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    env = environment(device)
    print(f"jump in PyTorch on {env.get('gpu', device)} (torch {env['torch']}, CUDA {env['cuda']}); median of "
          f"{args.repeats} calls after {args.warmup}\n")
    print("| model | batch | eager ms | CUDA graph ms | images/s (graph) | graph vs eager max abs |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        g = r.get("graph_ms")
        graph = f"{g:.3f}" if g is not None else r.get("graph")
        rate = f"{r['batch'] / g * 1e3:.0f}" if g else "-"
        diff = f"{r['graph_max_abs_diff']:.1e}" if "graph_max_abs_diff" in r else "-"
        print(f"| {r['model']} ({r['method']}) | {r['batch']} | {r['eager_ms']:.3f} | {graph} | {rate} | {diff} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    return 0


def _device(wanted: str) -> str:
    if wanted == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device (use --device cpu for the dry run)")
    return "cuda:0" if wanted == "cuda" else "cpu"


# --- Triton: the sampler's BLS request to a jump that answers in GPU memory ------------------------

def _http(url: str, body: dict | None = None, timeout: float = 60.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, (json.loads(r.read() or b"null") if body is not None else None)


def write_check_repository(repo: Path, name: str, model, ckpt: Path, ema: str | None, kind: str) -> list[str]:
    """`<name>_jump` (PyTorch, scripts/gpu_check_jump_model.py) and `<name>_sampler` (the
    product's, jump mode bls) as serving.repository writes them; returns the model names."""
    from fewstep.serving import repository as r
    from fewstep.serving.protocol import ModelInfo

    spec = model.method.sampler_spec()
    manifest = {"name": name, "method": model.method.name, "num_classes": int(model.num_classes), "max_batch": 16,
                "image": {"shape": [int(d) for d in model.shape], "value_range": [-1.0, 1.0]}, "sampler": dict(spec)}
    info = ModelInfo.from_manifest(manifest)
    opts = r.Options(device="gpu" if kind == "KIND_GPU" else "cpu", jump="bls", png=False, instances=1)
    plan = r.ServingPlan(jump="bls", instances=1, jump_instances=1, threads=1, sampler_kind="KIND_CPU")
    jump_dir = repo / f"{name}_jump"
    (jump_dir / "1").mkdir(parents=True)
    shutil.copy2(JUMP_MODEL, jump_dir / "1" / "model.py")
    shutil.copytree(ckpt, jump_dir / "1" / "model")
    config = r.jump_config(info, opts, kind, plan)
    config += f'parameters {{ key: "ema" value {{ string_value: "{ema or ""}" }} }}\n'
    (jump_dir / "config.pbtxt").write_text(config)
    r._write_python_model(repo / f"{name}_sampler", "sampler.py", r.sampler_config(info, opts, plan), manifest)
    r.write_warmup_files(repo, info, plan)
    return [f"{name}_jump", f"{name}_sampler"]


def run_triton(args) -> int:
    from fewstep.serving.launcher import Server, find_triton
    from fewstep.serving.protocol import ModelInfo, parse_request, run_group

    device = _device(args.device)
    kind = "KIND_GPU" if device.startswith("cuda") else "KIND_CPU"
    paths = find_triton()  # the slimmed one when its folder leads PYTHONPATH
    print(f"tritonserver: {paths['binary']}", file=sys.stderr)

    class HttpServer(Server):
        """Readiness over Triton's HTTP API (no tritonclient on the host)."""

        def _get(self, path):
            try:
                return _http(f"http://127.0.0.1:{self._http_upstream}{path}", timeout=2.0)[0] == 200
            except OSError:
                return False

        def server_ready(self):
            return self._get("/v2/health/ready")

        def model_ready(self, name):
            return self._get(f"/v2/models/{name}/ready")

    src = shipped_models()[0]
    with tempfile.TemporaryDirectory(prefix="fewstep-gpu-check-") as tmp:
        name, model, ckpt, ema = load_shipped(src, Path(tmp) / "ckpt", device)
        repo = Path(tmp) / "repo"
        names = write_check_repository(repo, name, model, ckpt, ema, kind)
        server = HttpServer(repo, grpc_port=0, http_port=0, metrics_port=0, http=True, models=names,
                            log_file=Path(tmp) / "tritonserver.log")
        t0 = time.time()
        server.start(timeout=args.timeout)
        try:
            started = time.time() - t0
            seeds, steps = list(range(8)), min(4, int(model.method.sampler_spec()["max_steps"]))
            body = {"inputs": [{"name": "seed", "datatype": "INT64", "shape": [len(seeds), 1], "data": seeds},
                               {"name": "steps", "datatype": "INT64", "shape": [len(seeds), 1],
                                "data": [steps] * len(seeds)}]}
            if model.num_classes:
                body["inputs"].append({"name": "class_label", "datatype": "INT64", "shape": [len(seeds), 1],
                                       "data": [s % model.num_classes for s in seeds]})
            body["outputs"] = [{"name": "sample"}]
            t1 = time.time()
            _, answer = _http(f"{server.http_url}/v2/models/{name}_sampler/infer", body)
            latency = time.time() - t1
            out = next(o for o in answer["outputs"] if o["name"] == "sample")
            got = np.asarray(out["data"], np.float32).reshape(out["shape"])
            log = Path(server.log_file).read_text(errors="replace")
        finally:
            server.stop()
        # the same samples in this process: the sampler loop over the PyTorch jump on the same device
        module = jump_module(model).to(device)

        def jump(x, t, s, labels=None):
            feeds = [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (x, t, s)]
            if labels is not None:
                feeds.append(torch.from_numpy(np.asarray(labels, np.int64)).to(device))
            with torch.inference_mode():
                return module(*feeds).float().cpu().numpy()

        info = ModelInfo.from_manifest({"name": name, "num_classes": int(model.num_classes), "max_batch": 16,
                                        "image": {"shape": list(model.shape)}, "sampler": model.method.sampler_spec()})
        column = lambda values: np.asarray(values, np.int64).reshape(-1, 1)  # noqa: E731
        request = {"seed": column(seeds), "steps": column([steps] * len(seeds)), "gamma": None,
                   "class_label": column([s % model.num_classes for s in seeds]) if model.num_classes else None}
        ref = run_group(jump, info, parse_request(info, request, 16))  # the items as the sampler reads them
    diff = float(np.abs(got - ref).max())
    gpu_answer = "x_s answered in GPU memory" in log
    result = {"env": environment(device), "model": name, "kind": kind, "server_start_s": round(started, 1),
              "request_s": round(latency, 3), "images": len(seeds), "steps": steps, "max_abs_diff_vs_torch": diff,
              "jump_answered_in_gpu_memory": gpu_answer, "ok": diff < 1e-3 and (gpu_answer or kind == "KIND_CPU")}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    j = sub.add_parser("jump", help="the jump in PyTorch per batch: eager and CUDA graphs")
    j.add_argument("--batches", default="1,4,16,64")
    j.add_argument("--repeats", type=int, default=50)
    j.add_argument("--warmup", type=int, default=10)
    t = sub.add_parser("triton", help="the sampler's BLS request to a jump answering in GPU memory")
    t.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for the server")
    for s in (j, t):
        s.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
        s.add_argument("--json", help="write the figures here too")
    args = p.parse_args(argv)
    return run_jump(args) if args.cmd == "jump" else run_triton(args)


if __name__ == "__main__":
    sys.exit(main())
