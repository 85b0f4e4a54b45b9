"""Two checkouts' serving of one export, measured in the same run: before against after.

    PYTHONPATH=$PWD python scripts/ab_serving.py --export /tmp/models/cud_fmnist \\
        --a /work/before --b $PWD --steps 1,2,4 --requests 150 --out ab.json

`fewstep serve` runs from each checkout (its own code in its stubs), on free ports. At
concurrency 1 the requests go round robin, one at a time: the in-process ONNX Runtime
sampler (`serving.bench_baselines`, this process), server A, server B (the order turns each
round), so all three see the same background load on a shared host; latency p50 per step
count, and CPU per request: this process's CPU around each call plus each server's
processes (/proc) over the block (so the servers run without the watchdog's probes). Then
images/s at `--concurrency` requests in flight, blocks of A and B alternating. The ratios to
the in-process sampler, and the overhead split per request and per step, are computed as
`fewstep bench` does.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fewstep.serving.bench_baselines import onnxruntime_baseline
from fewstep.serving.bench_report import _intercept, _slope
from fewstep.serving.client import AsyncClient, Client
from fewstep.serving.launcher import free_port
from fewstep.serving.reaper import cpu_seconds, process_group_members


class Served:
    """`fewstep serve` of one checkout on free ports (loopback), stopped by SIGTERM."""

    def __init__(self, checkout: str, export: str, log: Path, extra: str = ""):
        self.port = free_port()
        env = dict(os.environ, PYTHONPATH=str(Path(checkout).resolve()))
        # no watchdog probes: each is a jump of every model every 2 s, and this script charges
        # a server's CPU over the whole block to its requests (on cd_fmnist the probes read as
        # +1 ms of CPU per step; docs/PERFORMANCE.md)
        cmd = [sys.executable, "-m", "fewstep", "serve", "--model", export, "--grpc-port", str(self.port),
               "--http-port", str(free_port()), "--metrics-port", str(free_port()), "--probe-interval", "0",
               *extra.split()]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"fewstep serve exited ({self.proc.returncode}); see {self.log.name}")
            if "ready:" in Path(self.log.name).read_text():
                return
            time.sleep(0.5)
        raise SystemExit(f"fewstep serve not ready in {timeout} s; see {self.log.name}")

    def pids(self) -> list[int]:
        """tritonserver and its stubs (the process group of the serve's child)."""
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                        out += process_group_members(int(d.name))
                except (OSError, IndexError, ValueError):
                    pass
        return sorted(set(out))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def round_robin(servers: dict, baseline, model: str, steps: int, n: int, warmup: int, seed0: int) -> dict:
    """n rounds of one request each (in-process, then the servers), the order turning."""
    names = ["in-process"] + list(servers)
    lat = {k: [] for k in names}
    cpu = {k: 0.0 for k in names}
    clients = {k: Client(s.url) for k, s in servers.items()}
    seed = seed0
    pids = {k: s.pids() for k, s in servers.items()}
    try:
        for i in range(warmup + n):
            if i == warmup:
                srv0 = {k: cpu_seconds(p) for k, p in pids.items()}
            order = names[i % len(names):] + names[:i % len(names)]
            for k in order:
                c0, t0 = time.process_time(), time.perf_counter()
                if k == "in-process":
                    baseline([seed], steps, None, None)
                else:
                    clients[k].infer(model, [seed], steps, outputs=("image",))
                if i >= warmup:
                    lat[k].append((time.perf_counter() - t0) * 1e3)
                    cpu[k] += time.process_time() - c0
                seed += 1
        for k, p in pids.items():
            cpu[k] += cpu_seconds(p) - srv0[k]
    finally:
        for c in clients.values():
            c.close()
    return {k: {"p50_ms": float(np.median(lat[k])), "cpu_ms": cpu[k] * 1e3 / n} for k in names}


async def throughput(url: str, model: str, steps: int, conc: int, n: int, seed0: int) -> float:
    """images/s with `conc` requests in flight (n requests in all)."""
    async with AsyncClient(url) as client:
        left = [n]

        async def worker(w):
            while left[0] > 0:
                left[0] -= 1
                await client.infer(model, [seed0 + left[0]], steps, outputs=("image",))

        await asyncio.gather(*(worker(w) for w in range(conc)))  # warm: connections, threads
        left[0] = n
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(conc)))
        return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True)
    ap.add_argument("--a", required=True, help="checkout A (before)")
    ap.add_argument("--b", required=True, help="checkout B (after)")
    ap.add_argument("--a-args", default="", help="more `fewstep serve` arguments for A (e.g. '--instances 1')")
    ap.add_argument("--b-args", default="", help="... for B")
    ap.add_argument("--steps", default="1,2,4")
    ap.add_argument("--requests", type=int, default=150, help="rounds per step count at concurrency 1")
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight for images/s (0: skip)")
    ap.add_argument("--out", help="JSON of the figures")
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    export = str(Path(args.export).resolve())
    logs = Path(args.out or "ab").with_suffix("")
    servers = {"A": Served(args.a, export, Path(f"{logs}-A.log"), args.a_args),
               "B": Served(args.b, export, Path(f"{logs}-B.log"), args.b_args)}
    try:
        for s in servers.values():
            s.wait_ready()
        model = json.loads((Path(export) / "manifest.json").read_text())["name"]
        with Client(servers["A"].url) as c:
            meta = c.meta(model)
        baseline, _ = onnxruntime_baseline(export, 1, meta)
        load0 = os.getloadavg()
        res = {k: round_robin(servers, baseline, model, k, args.requests, args.warmup, 1000 * k) for k in steps}
        scale = {}
        if args.concurrency:
            k = min(steps)
            for name in ("A", "B"):
                scale[name] = {"c1": [], "chi": []}
            for _ in range(2):
                for name, s in servers.items():
                    scale[name]["c1"].append(asyncio.run(throughput(s.url, model, k, 1, 60, 10**6)))
                    scale[name]["chi"].append(asyncio.run(throughput(s.url, model, k, args.concurrency, 160, 10**6)))
        load1 = os.getloadavg()
    finally:
        for s in servers.values():
            s.stop()
    report = {"export": export, "a": args.a, "b": args.b, "load_avg": [list(load0), list(load1)], "steps": res,
              "summary": {}}
    print(f"{model}: load average {load0[0]:.2f} -> {load1[0]:.2f}")
    print("| | " + " | ".join(f"{k} step{'s' if k > 1 else ''}" for k in steps) + " |")
    print("|---" * (len(steps) + 1) + "|")
    for who in ("in-process", "A", "B"):
        print(f"| {who}: p50 ms, CPU ms | " + " | ".join(f"{res[k][who]['p50_ms']:.2f}, {res[k][who]['cpu_ms']:.2f}"
                                                        for k in steps) + " |")
    for who in ("A", "B"):
        over = {k: res[k][who]["p50_ms"] - res[k]["in-process"]["p50_ms"] for k in steps}
        cpu_over = {k: res[k][who]["cpu_ms"] - res[k]["in-process"]["cpu_ms"] for k in steps}
        per_step = _slope(steps, [res[k][who]["p50_ms"] for k in steps]) - \
            _slope(steps, [res[k]["in-process"]["p50_ms"] for k in steps]) if len(steps) > 1 else None
        cpu_step = _slope(steps, [res[k][who]["cpu_ms"] for k in steps]) - \
            _slope(steps, [res[k]["in-process"]["cpu_ms"] for k in steps]) if len(steps) > 1 else None
        k = min(steps)
        sm = {"p50_ratio": res[k][who]["p50_ms"] / res[k]["in-process"]["p50_ms"],
              "cpu_ratio": res[k][who]["cpu_ms"] / res[k]["in-process"]["cpu_ms"],
              "overhead_ms_per_step": per_step,
              "overhead_ms_per_request": None if per_step is None else _intercept(over, per_step),
              "cpu_overhead_ms_per_step": cpu_step,
              "cpu_overhead_ms_per_request": None if cpu_step is None else _intercept(cpu_over, cpu_step)}
        if scale:
            sm[f"images_per_s_c{args.concurrency}_vs_c1"] = float(np.mean(scale[who]["chi"]) / np.mean(scale[who]["c1"]))
        report["summary"][who] = sm
        print(f"{who}: " + ", ".join(f"{key} {v:.2f}" for key, v in sm.items() if v is not None))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
