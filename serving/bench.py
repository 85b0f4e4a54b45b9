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
server and its stubs per request is reported too). Outputs, under `--out`: bench.csv
(perf_analyzer-like columns, latencies in microseconds), bench.json (everything, in ms),
latency_vs_steps.png, throughput_vs_concurrency.png, and with `--quality EVAL.json` (a
`fewstep eval` report) the FID of each step count and quality_vs_latency.png.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fewstep.errors import UserError
from serving.bench_report import (  # noqa: F401  (re-exported: the summary is part of the benchmark's API)
    CSV_COLUMNS, _slope, console_table, read_quality, summarize, write_outputs)

SOURCES = ("triton", "onnxruntime", "pytorch")
PERCENTILES = (50, 90, 95, 99)



# --- arguments ----------------------------------------------------------------------------------

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
                   help="start a tritonserver on the --export dir for this run (ignores --url)")
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


def parse_list(text: str, flag: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4] (sorted, unique, each >= 1)."""
    try:
        vals = [int(v) for v in str(text).replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise UserError(f"{flag}: expected at least one value")
    bad = [v for v in vals if v < 1]
    if bad:
        raise UserError(f"{flag}: values must be >= 1, got {bad[0]}")
    return sorted(set(vals))


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
    steps = parse_list(args.steps, "--steps") if args.steps is not None else ([] if mix else [1, 2, 4, 8, 16])
    conc = parse_list(args.concurrency, "--concurrency")
    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    if args.requests is not None and args.requests < 1:
        raise UserError(f"--requests must be >= 1, got {args.requests}")
    if args.duration is not None and not args.duration > 0:
        raise UserError(f"--duration must be > 0 seconds, got {args.duration}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    if args.timeout is not None and not args.timeout > 0:
        raise UserError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.gamma is not None and not 0.0 <= args.gamma <= 1.0:
        raise UserError(f"--gamma must be in [0, 1], got {args.gamma}")
    if args.threads is not None and args.threads < 0:
        raise UserError(f"--threads must be >= 0, got {args.threads}")
    requests = args.requests if args.requests is not None or args.duration is not None else 100
    return Plan(steps, conc, args.batch, requests, args.duration, args.warmup, mix)


# --- measurements -------------------------------------------------------------------------------

@dataclass
class Cell:
    """The measured requests of one source at one (steps, concurrency)."""
    source: str
    steps: int
    concurrency: int
    batch: int
    latencies_ms: list = field(default_factory=list)
    errors: dict = field(default_factory=dict)      # gRPC code -> count
    error_messages: list = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    cpu_counted: bool = False
    server: dict | None = None                       # composing model -> stats delta
    mix: str | None = None                           # the --mix this row is a part of
    jump_calls: dict | None = None                   # jump_calls(): of the whole cell

    def error(self, code: str, message: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1
        if len(self.error_messages) < 5 and message not in self.error_messages:
            self.error_messages.append(message)

    def row(self) -> dict:
        """Summary in ms (bench.json): counts, latency percentiles, throughput, server times."""
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        n = int(lat.size)
        r = {"source": self.source, "steps": self.steps, "concurrency": self.concurrency, "batch": self.batch,
             "requests": n, "errors": int(sum(self.errors.values())), "error_codes": dict(self.errors),
             "images": n * self.batch, "wall_s": self.wall_s}
        for p in PERCENTILES:
            r[f"p{p}_ms"] = float(np.percentile(lat, p)) if n else None
        r["avg_ms"] = float(lat.mean()) if n else None
        r["min_ms"] = float(lat.min()) if n else None
        r["max_ms"] = float(lat.max()) if n else None
        r["images_per_s"] = n * self.batch / self.wall_s if self.wall_s > 0 else None
        r["requests_per_s"] = n / self.wall_s if self.wall_s > 0 else None
        r["cpu_ms_per_request"] = self.cpu_s * 1e3 / n if (self.cpu_counted and n) else None
        if self.error_messages:
            r["error_messages"] = list(self.error_messages)
        if self.server is not None:
            r["server"] = self.server
        if self.mix is not None:
            r["mix"] = self.mix
        if self.jump_calls is not None:
            r["jump_calls"] = self.jump_calls
        return r


class Seeds:
    """Distinct seeds for every image of the run, from --seed on."""

    def __init__(self, first: int):
        self.next = int(first)

    def take(self, n: int) -> list[int]:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def labels_for(seeds: list[int], num_classes: int):
    return [s % num_classes for s in seeds] if num_classes else None


# --- Triton statistics ---------------------------------------------------------------------------

STAT_PARTS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def parse_stats(js: dict) -> dict:
    """GetInferenceStatistics JSON -> {model: {inference_count, execution_count, <part>_count, <part>_ns}}."""
    out = {}
    for m in js.get("model_stats", []):
        inf = m.get("inference_stats", {}) or {}
        d = {"inference_count": int(m.get("inference_count", 0) or 0),
             "execution_count": int(m.get("execution_count", 0) or 0)}
        for part in STAT_PARTS:
            v = inf.get(part, {}) or {}
            d[f"{part}_count"] = int(v.get("count", 0) or 0)
            d[f"{part}_ns"] = int(v.get("ns", 0) or 0)
        out[m["name"]] = d
    return out


def stats_delta(before: dict, after: dict, names: list[str]) -> dict:
    """Per composing model, what happened between two snapshots; times in ms per request."""
    out = {}
    for name in names:
        a, b = after.get(name), before.get(name, {})
        if a is None:
            continue
        d = {k: a[k] - b.get(k, 0) for k in a}
        req = d["success_count"]
        per = (lambda ns: ns / req / 1e6) if req else (lambda ns: None)
        out[name] = {
            "requests": req, "failed": d["fail_count"], "inferences": d["inference_count"],
            "executions": d["execution_count"],
            "avg_batch": d["inference_count"] / d["execution_count"] if d["execution_count"] else None,
            "request_ms": per(d["success_ns"]), "queue_ms": per(d["queue_ns"]),
            "compute_input_ms": per(d["compute_input_ns"]), "compute_infer_ms": per(d["compute_infer_ns"]),
            "compute_output_ms": per(d["compute_output_ns"]),
            "compute_ms": per(d["compute_input_ns"] + d["compute_infer_ns"] + d["compute_output_ns"]),
        }
    return out


def process_cpu_s(pids) -> float:
    """utime + stime (s) of processes, from /proc (the server and its Python stubs)."""
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


COUNTER_NAMES = {"fewstep_sampler_jump_calls": "calls", "fewstep_sampler_image_steps": "image_steps"}


def parse_jump_counters(text: str, model: str) -> dict | None:
    """Prometheus text -> {"calls", "image_steps"} of `<model>_sampler`, summed over its
    instances (the sampler's scheduler counts them: serving.models.common.JumpCounters)."""
    out = {}
    want = f'model="{model}_sampler"'
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        key = COUNTER_NAMES.get(name.strip().removesuffix("_total"))
        if key is None or want not in rest:
            continue
        out[key] = out.get(key, 0) + int(float(line.rsplit(" ", 1)[1]))
    return out if len(out) == 2 else None


def read_jump_counters(metrics_url: str | None, model: str, timeout: float = 5.0) -> dict | None:
    """The sampler's jump counters from Triton's metrics endpoint (None when not there)."""
    import urllib.error
    import urllib.request

    if not metrics_url:
        return None
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout) as r:
            return parse_jump_counters(r.read().decode("utf-8", "replace"), model)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def jump_calls(before: dict | None, after: dict | None, server: dict | None, model: str) -> dict:
    """Jump calls per image-step and the average jump batch of a cell: from the sampler's
    counters ("sampler": the calls its schedulers made) and, when the jump runs as its own
    model (bls), from Triton's statistics of `<model>_jump` ("jump_model": its executions,
    where calls of several samplers may meet). The headline figures take the sampler's."""
    out = {}
    if before is not None and after is not None:
        calls, steps = after["calls"] - before["calls"], after["image_steps"] - before["image_steps"]
        out["sampler"] = {"calls": calls, "image_steps": steps}
    jump = (server or {}).get(model + "_jump") or {}
    if jump.get("inferences"):
        out["jump_model"] = {"calls": jump["executions"], "image_steps": jump["inferences"]}
    for part in out.values():
        part["calls_per_image_step"] = part["calls"] / part["image_steps"] if part["image_steps"] else None
        part["avg_batch"] = part["image_steps"] / part["calls"] if part["calls"] else None
    head = out.get("sampler") or out.get("jump_model")
    if head and head["image_steps"]:
        out["calls_per_image_step"] = head["calls_per_image_step"]
        out["avg_batch"] = head["avg_batch"]
        out["from"] = "sampler" if "sampler" in out else "jump_model"
    return out


# --- the baselines -------------------------------------------------------------------------------

def onnxruntime_baseline(export_dir: str, threads: int | None, meta, device: str = "cpu"):
    """A callable (seeds, steps, labels, gamma) running the sampler in-process on ONNX Runtime."""
    from export.runner import load_runner
    from serving.protocol import Item, ModelInfo, run_group, to_images
    from training import sampling

    path = Path(export_dir)
    if not path.is_dir():
        raise UserError(f"--export {export_dir}: not a directory")
    runner = load_runner(path, backend="onnxruntime", device="cuda" if device == "gpu" else "cpu",
                         threads=threads or None)
    info = ModelInfo.from_manifest(runner.manifest)
    if tuple(info.shape) != tuple(meta.shape) or info.num_classes != meta.num_classes:
        raise UserError(f"--export {export_dir} is not the served model: it makes {list(info.shape)} samples with "
                        f"{info.num_classes} classes, the server's '{meta.name}' {list(meta.shape)} with "
                        f"{meta.num_classes}")

    def call(seeds, steps, labels, gamma):
        g = sampling.check_request(info.spec, steps, gamma)
        items = [Item(s, steps, g, None if labels is None else labels[i]) for i, s in enumerate(seeds)]
        x = run_group(runner, info, items)
        return to_images(info, x) if info.is_image else x

    return call, {"backend": "onnxruntime", "providers": runner.providers, "threads": threads or "default"}


def pytorch_baseline(ckpt: str, threads: int | None, meta):
    """A callable (seeds, steps, labels, gamma) sampling the checkpoint with PyTorch (eager, CPU)."""
    import torch

    from training import sampling
    from training.build import load_model

    if not Path(ckpt).exists():
        raise UserError(f"--ckpt {ckpt}: no such file or directory")
    model = load_model(ckpt)
    if tuple(model.shape) != tuple(meta.shape):
        raise UserError(f"--ckpt {ckpt} is not the served model: it makes {list(model.shape)} samples, "
                        f"the server's '{meta.name}' {list(meta.shape)}")
    if threads:
        torch.set_num_threads(int(threads))
    value_range = tuple(model.config["data"].get("value_range", (-1.0, 1.0))) \
        if isinstance(model.config.get("data"), dict) else (-1.0, 1.0)

    def call(seeds, steps, labels, gamma):
        lab = None if labels is None else torch.tensor(labels, dtype=torch.long)
        with torch.inference_mode():
            x = model.sample(steps, seeds, labels=lab, gamma=gamma)
        return sampling.to_uint8(x, value_range) if len(meta.shape) == 3 else x.numpy()

    return call, {"backend": "pytorch", "torch": torch.__version__, "threads": torch.get_num_threads()}


# --- the run ---------------------------------------------------------------------------------------

class Progress:
    def __init__(self, total, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            # shown on a terminal only (disable=None), not in logs
            self.bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True, leave=True, disable=None)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Bench:
    def __init__(self, args, plan: Plan):
        self.args = args
        self.plan = plan
        self.seeds = Seeds(args.seed)
        self.baselines: dict = {}           # source -> callable
        self.baseline_info: dict = {}
        self.server_pids = None             # with --serve: a callable returning the pids
        self.metrics_url = None             # Triton metrics: the sampler's jump counters
        self.cells: list[Cell] = []

    # --- one request --------------------------------------------------------------------------
    async def _triton_once(self, client, cell: Cell | None, steps: int):
        from serving.client import ServingError

        seeds = self.seeds.take(self.plan.batch)
        labels = labels_for(seeds, self.meta.num_classes)
        self.sent_total += 1
        t0 = time.perf_counter()
        try:
            await client.infer(self.model, seeds, steps, labels, self.args.gamma, outputs=(self.output,))
        except ServingError as e:
            if cell is not None:
                cell.error(e.code, e.message)
            return False
        except Exception as e:  # noqa: BLE001 - e.g. a dropped connection: counted, not fatal
            if cell is not None:
                cell.error("UNKNOWN", f"{type(e).__name__}: {e}")
            return False
        if cell is not None:
            cell.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        return True

    def _baseline_once(self, source: str, cell: Cell | None, steps: int) -> None:
        seeds = self.seeds.take(self.plan.batch)
        labels = labels_for(seeds, self.meta.num_classes)
        c0, t0 = time.process_time(), time.perf_counter()
        self.baselines[source](seeds, steps, labels, self.args.gamma)
        if cell is not None:
            cell.latencies_ms.append((time.perf_counter() - t0) * 1e3)
            cell.cpu_s += time.process_time() - c0
            cell.cpu_counted = True

    def _more(self, done: int, deadline: float | None) -> bool:
        if self.plan.requests is not None:
            return done < self.plan.requests
        return time.perf_counter() < deadline

    # --- cells ----------------------------------------------------------------------------------
    async def _stats(self):
        js = await self.raw.get_inference_statistics("", as_json=True, client_timeout=30)
        return parse_stats(js)

    async def _settled_stats(self, wait_s: float = 5.0) -> dict:
        """Statistics once Triton has counted every request this run sent (warm-up ones too)
        and they stopped moving. Triton counts a request when it is released, which can be
        after its response reached us (the sampler answers from its own thread), so a
        snapshot taken at once can miss the last requests."""
        before = self.stats_origin
        sent = self.sent_total
        deadline = time.perf_counter() + wait_s
        last = None
        while True:
            after = await self._stats()
            # the sampler's counters (flushed when its scheduler goes idle) must stop moving too
            after["__counters__"] = await asyncio.to_thread(read_jump_counters, self.metrics_url, self.model)
            a, b = after.get(self.model, {}), before.get(self.model, {})
            counted = sum(a.get(k, 0) - b.get(k, 0) for k in ("success_count", "fail_count"))
            # every request counted by the ensemble, and nothing moved since the last look
            if (counted >= sent and after == last) or time.perf_counter() > deadline:
                return after
            last = after
            await asyncio.sleep(0.02)

    def _server_cpu(self) -> float | None:
        return process_cpu_s(self.server_pids()) if self.server_pids else None

    async def triton_cell(self, client, steps: int, conc: int, paired: list[str]) -> list[Cell]:
        """Triton at `conc` requests in flight; with `paired` baselines (conc 1) alternating."""
        plan = self.plan
        cell = Cell("triton", steps, conc, plan.batch)
        base = {s: Cell(s, steps, 1, plan.batch) for s in paired}
        self.progress.describe(f"steps {steps} conc {conc}" + (f" (+{', '.join(paired)})" if paired else ""))
        # warm-up at the same setting, unrecorded
        for _ in range(plan.warmup if paired else 0):
            for s in paired:
                self._baseline_once(s, None, steps)
        if plan.warmup:
            remaining = plan.warmup

            async def warm():
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    await self._triton_once(client, None, steps)

            await asyncio.gather(*(warm() for _ in range(min(conc, plan.warmup))))

        before = await self._settled_stats()
        server_cpu0 = self._server_cpu()
        deadline = time.perf_counter() + plan.duration if plan.duration else None
        issued = 0
        client_cpu = 0.0
        t_start = time.perf_counter()
        if paired:
            while self._more(issued, deadline):
                issued += 1
                for s in paired:
                    self._baseline_once(s, base[s], steps)
                c0 = time.process_time()
                t0 = time.perf_counter()
                await self._triton_once(client, cell, steps)
                cell.wall_s += time.perf_counter() - t0
                client_cpu += time.process_time() - c0
                self.progress.update()
        else:
            c0 = time.process_time()

            async def worker():
                nonlocal issued
                while self._more(issued, deadline):
                    issued += 1
                    await self._triton_once(client, cell, steps)
                    self.progress.update()

            await asyncio.gather(*(worker() for _ in range(conc)))
            cell.wall_s = time.perf_counter() - t_start
            client_cpu = time.process_time() - c0
        for s in paired:
            base[s].wall_s = sum(base[s].latencies_ms) / 1e3
        after = await self._settled_stats()
        server_cpu1 = self._server_cpu()
        cell.server = stats_delta(before, after, self.composing)
        cell.jump_calls = jump_calls(before.get("__counters__"), after.get("__counters__"), cell.server, self.model)
        if server_cpu0 is not None:
            cell.cpu_s = client_cpu + (server_cpu1 - server_cpu0)
            cell.cpu_counted = True
        return [cell] + [base[s] for s in paired]

    async def mix_cell(self, client, conc: int) -> list[Cell]:
        """`conc` requests in flight, each drawing its step count from --mix; one Cell per step
        count (its requests' latencies; images/s over the whole cell's wall time)."""
        plan = self.plan
        label = ",".join(f"{k}:{w:g}" for k, w in plan.mix)
        ks = [k for k, _ in plan.mix]
        probs = [w for _, w in plan.mix]
        rng = np.random.default_rng([self.args.seed, conc])
        cells = {k: Cell("triton", k, conc, plan.batch, mix=label) for k in ks}
        self.progress.describe(f"mix {label} conc {conc}")

        def draw() -> int:
            return int(rng.choice(ks, p=probs))

        remaining = plan.warmup

        async def warm():
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await self._triton_once(client, None, draw())

        if plan.warmup:
            await asyncio.gather(*(warm() for _ in range(min(conc, plan.warmup))))
        before = await self._settled_stats()
        server_cpu0 = self._server_cpu()
        deadline = time.perf_counter() + plan.duration if plan.duration else None
        issued = 0
        c0, t0 = time.process_time(), time.perf_counter()

        async def worker():
            nonlocal issued
            while self._more(issued, deadline):
                issued += 1
                k = draw()
                await self._triton_once(client, cells[k], k)
                self.progress.update()

        await asyncio.gather(*(worker() for _ in range(conc)))
        wall, client_cpu = time.perf_counter() - t0, time.process_time() - c0
        after = await self._settled_stats()
        server_cpu1 = self._server_cpu()
        server = stats_delta(before, after, self.composing)
        calls = jump_calls(before.get("__counters__"), after.get("__counters__"), server, self.model)
        out = []
        for k, cell in cells.items():
            cell.wall_s, cell.server, cell.jump_calls = wall, server, calls
            if server_cpu0 is not None and len(cell.latencies_ms):
                # the cell's CPU, shared out by image-steps
                share = len(cell.latencies_ms) * k / max(1, sum(len(c.latencies_ms) * j for j, c in cells.items()))
                cell.cpu_s = (client_cpu + server_cpu1 - server_cpu0) * share
                cell.cpu_counted = True
            out.append(cell)
        return out

    def baseline_cell(self, source: str, steps: int) -> Cell:
        """A baseline alone, one request at a time (when concurrency 1 is not measured)."""
        cell = Cell(source, steps, 1, self.plan.batch)
        self.progress.describe(f"steps {steps} {source}")
        for _ in range(self.plan.warmup):
            self._baseline_once(source, None, steps)
        deadline = time.perf_counter() + self.plan.duration if self.plan.duration else None
        done = 0
        while self._more(done, deadline):
            self._baseline_once(source, cell, steps)
            done += 1
        cell.wall_s = sum(cell.latencies_ms) / 1e3
        return cell

    # --- setup and the whole run --------------------------------------------------------------------
    async def connect(self, url: str):
        """Open the clients; clear errors for an unreachable server and an unknown model."""
        import tritonclient.grpc.aio as aio
        from tritonclient.utils import InferenceServerException

        from serving.client import AsyncClient, ServingError

        self.raw = aio.InferenceServerClient(url)
        try:
            ready = await self.raw.is_server_ready(client_timeout=10)
        except InferenceServerException as e:
            await self.raw.close()
            msg = str(e.message() if hasattr(e, "message") else e).splitlines()[0]
            raise UserError(f"cannot reach a Triton server at {url} ({msg})") from None
        if not ready:
            await self.raw.close()
            raise UserError(f"the server at {url} is not ready")
        client = AsyncClient(url, timeout=self.args.timeout)
        if not getattr(self, "metrics_url", None):
            self.metrics_url = self.args.metrics_url or f"http://{url.rsplit(':', 1)[0]}:8002/metrics"
        try:
            self.meta = await client.meta(self.model)
        except ServingError as e:
            await client.close()
            await self.raw.close()
            raise UserError(f"--model {self.model}: {e.message}") from None
        self.server_version = (await self.raw.get_server_metadata(as_json=True)).get("version")
        # requests this run sent, and the statistics before the first: see _settled_stats
        self.sent_total = 0
        self.stats_origin = await self._stats()
        self.jump_params = {}
        try:
            cfg = (await self.raw.get_model_config(self.model + "_jump", as_json=True))["config"]
            self.jump_params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
            self.jump_instances = sum(int(g.get("count", 1)) for g in cfg.get("instance_group", []))
            self.jump_kind = ",".join(sorted({g.get("kind", "") for g in cfg.get("instance_group", [])}))
        except InferenceServerException:
            self.jump_instances, self.jump_kind = None, None
        self.sampler_params = {}
        try:
            cfg = (await self.raw.get_model_config(self.model + "_sampler", as_json=True))["config"]
            self.sampler_params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
            self.sampler_params["instances"] = sum(int(g.get("count", 1)) for g in cfg.get("instance_group", []))
        except InferenceServerException:
            pass
        return client

    def check_against_model(self) -> None:
        meta, plan = self.meta, self.plan
        too_many = [s for s in plan.steps + [k for k, _ in plan.mix or []] if s > meta.max_steps]
        if too_many:
            raise UserError(f"--steps: {too_many[0]} is above the model's max_steps ({meta.max_steps}) "
                            f"for '{meta.name}'")
        if meta.max_batch and plan.batch > meta.max_batch:
            raise UserError(f"--batch: {plan.batch} is above the model's max batch ({meta.max_batch})")

    def baseline_threads(self) -> int | None:
        if self.args.threads is not None:
            return self.args.threads or None
        t = int(self.jump_params.get("threads", "0") or 0)
        return t or None

    async def run(self, url: str) -> dict:
        args, plan = self.args, self.plan
        client = await self.connect(url)
        try:
            self.check_against_model()
            self.output = "image" if self.meta.is_image else "sample"
            self.composing = [self.model, self.model + "_sampler", self.model + "_jump"]
            threads = self.baseline_threads()
            if args.export:
                self.baselines["onnxruntime"], self.baseline_info["onnxruntime"] = \
                    onnxruntime_baseline(args.export, threads, self.meta, getattr(args, "device", "cpu"))
            if args.ckpt:
                self.baselines["pytorch"], self.baseline_info["pytorch"] = \
                    pytorch_baseline(args.ckpt, threads, self.meta)
            paired = list(self.baselines) if 1 in plan.concurrency else []
            per_cell = plan.requests if plan.requests is not None else None
            cells = (len(plan.steps) + (1 if plan.mix else 0)) * len(plan.concurrency)
            total = None if per_cell is None else per_cell * cells
            if total is not None and not paired:
                total += per_cell * len(plan.steps) * len(self.baselines)
            self.progress = Progress(total, enabled=not args.no_progress)
            self.first_request = None
            if args.serve:
                # the first request a fresh server gets (the models warmed themselves before ready);
                # the client's own first call (gRPC, protobuf) is paid first by a request that
                # Triton refuses before any model runs (an output the model does not have)
                from serving.client import ServingError
                try:
                    await client.infer(self.model, [0], 1, None, None, outputs=("no_such_output",))
                except ServingError:
                    pass
                k = min(plan.steps or [k for k, _ in plan.mix])
                first = Cell("triton", k, 1, plan.batch)
                await self._triton_once(client, first, k)
                self.first_request = {"steps": k, "ms": first.latencies_ms[0] if first.latencies_ms else None}
            load0 = os.getloadavg()
            t0 = time.time()
            try:
                for steps in plan.steps:
                    if not paired:
                        for source in self.baselines:
                            self.cells.append(self.baseline_cell(source, steps))
                            self.progress.update(len(self.cells[-1].latencies_ms))
                    for conc in plan.concurrency:
                        self.cells.extend(await self.triton_cell(client, steps, conc,
                                                                 paired if conc == 1 else []))
                if plan.mix:
                    for conc in plan.concurrency:
                        self.cells.extend(await self.mix_cell(client, conc))
            finally:
                self.progress.close()
            load1 = os.getloadavg()
        finally:
            await client.close()
            await self.raw.close()
        return self.report(url, load0, load1, time.time() - t0)

    def report(self, url, load0, load1, seconds) -> dict:
        args, plan, meta = self.args, self.plan, self.meta
        rows = [c.row() for c in self.cells]
        quality = read_quality(args.quality) if args.quality else None
        if quality:
            for r in rows:
                r["quality"] = quality["values"].get(r["steps"])
        try:
            import onnxruntime
            ort_version = onnxruntime.__version__
        except ImportError:
            ort_version = None
        return {
            "model": self.model, "url": url, "server_version": self.server_version,
            "meta": {"shape": list(meta.shape), "num_classes": meta.num_classes, "max_steps": meta.max_steps,
                     "max_batch": meta.max_batch, "default_steps": meta.default_steps, "gamma": meta.gamma},
            "jump": {"instances": self.jump_instances, "kind": self.jump_kind,
                     "threads": self.sampler_params.get("threads") or self.jump_params.get("threads"),
                     "backend": self.jump_params.get("backend"),
                     "mode": self.sampler_params.get("jump_mode", "bls")},
            "sampler": {"instances": self.sampler_params.get("instances"),
                        "workers": self.sampler_params.get("workers")},
            "metrics_url": self.metrics_url,
            "settings": {"steps": plan.steps, "mix": plan.mix, "concurrency": plan.concurrency, "batch": plan.batch,
                         "requests": plan.requests, "duration": plan.duration, "warmup": plan.warmup,
                         "seed": args.seed, "gamma": args.gamma, "served_by_bench": bool(args.serve),
                         "baselines_paired_with_concurrency_1": bool(self.baselines) and 1 in plan.concurrency},
            "baselines": self.baseline_info,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "processor": platform.processor() or platform.machine(),
                        "python": platform.python_version(), "onnxruntime": ort_version,
                        "load_avg_start": list(load0), "load_avg_end": list(load1)},
            "seconds": seconds,
            "quality": quality,
            "results": rows,
            "summary": summarize(rows, plan, self.first_request),
        }


# --- entry point ---------------------------------------------------------------------------------------

def run_bench(args) -> int:
    plan = make_plan(args)
    if args.serve and not args.export:
        raise UserError("--serve needs --export DIR (the model to serve)")
    if args.instances < 0:
        raise UserError(f"--instances must be >= 0 (0 = auto), got {args.instances}")
    if args.quality:
        read_quality(args.quality)  # fail before the run, not after it
    if args.export and not Path(args.export).is_dir():
        raise UserError(f"--export {args.export}: not a directory")
    if args.ckpt and not Path(args.ckpt).exists():
        raise UserError(f"--ckpt {args.ckpt}: no such file or directory")
    out = Path(args.out)
    if args.serve:
        return _run_served(args, plan, out)
    if not args.model:
        raise UserError("--model NAME is required (the model name the server serves)")
    bench = Bench(args, plan)
    bench.model = args.model
    report = asyncio.run(bench.run(args.url))
    return _finish(report, out)


def _finish(report: dict, out: Path) -> int:
    paths = write_outputs(report, out)
    print(console_table(report))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


def _run_served(args, plan: Plan, out: Path) -> int:
    from serving.launcher import Server, find_triton
    from serving.repository import Options, read_manifest, write_repository

    find_triton()
    manifest = read_manifest(Path(args.export))
    name = args.model or manifest.get("name") or Path(args.export).resolve().name
    with tempfile.TemporaryDirectory(prefix="fewstep-bench-") as tmp:
        repo = Path(tmp) / "repo"
        written = write_repository(repo, [f"{name}={args.export}"], Options(
            device=args.device, threads=args.threads or 0, instances=args.instances, jump=args.jump))
        print(f"starting tritonserver on {args.export} as '{name}'", file=sys.stderr)
        with Server(repo, grpc_port=0, http_port=0, metrics_port=0, models=written[0]["models"],
                    log_file=Path(tmp) / "tritonserver.log") as server:
            bench = Bench(args, plan)
            bench.model = name
            bench.server_pids = server.pids
            bench.metrics_url = server.metrics_url
            report = asyncio.run(bench.run(server.grpc_url))
    return _finish(report, out)
