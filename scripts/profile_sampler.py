"""Where a request's time goes in `<name>_sampler`: its own stage timings (serving.trace),
py-spy attached to the sampler's Python stubs under a steady load, and the CPU of every
process per request (docs/PERFORMANCE.md).

    PYTHONPATH=$PWD python scripts/profile_sampler.py --export /tmp/models/cud_fmnist --steps 1,4 --seconds 10

Starts `fewstep serve` on the export (the defaults: inline jump, its instances), then for each
step count sends one request at a time (1 image, the `image` output, as `fewstep bench`
does) for `--seconds`. The table gives, in milliseconds per request: the stub's stages as it
timed them itself (wall time, means: serving/trace.py); what `py-spy record` saw in each
part of the stub's work, sorted by Python stack (samples / rate / requests; py-spy counts a
thread that runs or waits for a core, not one that sleeps); and the CPU time of each
process from /proc (client, tritonserver, each stub).
A request the sampler refuses at once (seed -1) gives the floor: the gRPC client, the
server, the ensemble and one round trip into a stub and back, with no work; measured back to
back, and again with the server idle before each refusal as long as a 1-step request spends
in the stub (the cadence of one request at a time: the server's threads sleep through the
jump, and a request after a few milliseconds idle costs more here than one right after another).
Last, the 1-step request taken apart (`paired`): `--rounds` rounds of the in-process sampler
then one Triton request, with each side's jump, the stub's own time and what is left outside it.
Needs py-spy (pip install py-spy) and permission to attach to the stubs (same user).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fewstep import sampling
from fewstep.export.runner import load_runner
from fewstep.serving.client import Client, ServingError
from fewstep.serving.protocol import Item, ModelInfo, run_group, to_images
from fewstep.serving.reaper import cpu_seconds
from fewstep.serving.repository import Options
from fewstep.serving.session import served
try:  # a checkout from before serving/trace.py is profiled without the stub's own stage timings
    from fewstep.serving.trace import ENV as TRACE_ENV, STAGES, TOTAL, read_traces, stage_means
except ImportError:
    TRACE_ENV, STAGES, TOTAL = "FEWSTEP_SAMPLER_TRACE", (), None

    def read_traces(paths):
        return []

    def stage_means(records):
        return {}

# (part, test on the sample's frames "func (file:line)", first match wins)
PARTS = [
    ("jump: ONNX Runtime run()", lambda fr: any("onnxruntime_inference_collection" in f for f in fr)),
    ("counters flush (metrics IPC)", lambda fr: any(f.startswith("flush (") for f in fr)),
    ("noise (per-sample generators)", lambda fr: any(f.startswith(("noise (", "start_noise (")) for f in fr)),
    ("PNG encoding", lambda fr: any(f.startswith("encode_png (") for f in fr)),
    ("images (quantise)", lambda fr: any(f.startswith("to_images (") for f in fr)),
    ("stub C++ (no Python frame: IPC, tensors)", lambda fr: not fr or fr == [""]),
    ("thread hand-offs (queue, condition, GIL)",
     lambda fr: fr[-1].split("(")[-1].startswith(("threading.py", "concurrent/futures", "queue.py"))),
    ("response tensors", lambda fr: any(f.startswith("_response (") for f in fr)),
    ("send (response sender)", lambda fr: any(f.startswith("_answer (") for f in fr)),
    ("request: read, parse, submit", lambda fr: any(f.startswith("execute (") for f in fr)),
    ("jump: input checks (runner)", lambda fr: any("export/runner.py" in f for f in fr)),
    ("scheduler tick bookkeeping", lambda fr: any(f.startswith("_tick (") for f in fr)),
]
OTHER = "other"


def classify(stack: str) -> str:
    frames = [f for f in stack.split(";") if f]
    for part, test in PARTS:
        if test(frames):
            return part
    return OTHER


def read_raw(path: Path) -> collections.Counter:
    """py-spy's raw (collapsed) output -> samples per part."""
    out = collections.Counter()
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if n.isdigit():
            out[classify(stack)] += int(n)
    return out


def stub_pids(server) -> dict:
    """{pid: model name} of the server's Python stubs (from their model.py path)."""
    out = {}
    for pid in server.pids():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(args) > 1 and args[1].endswith(b"model.py"):
            out[pid] = Path(args[1].decode()).parent.parent.name
    return out


def load(client, model: str, steps: int, seconds: float, first_seed: int) -> list:
    """One request at a time for `seconds`; the latencies (s)."""
    lat, seed, end = [], first_seed, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        client.infer(model, [seed], steps, outputs=("image",))
        lat.append(time.perf_counter() - t0)
        seed += 1
    return lat


def refused(client, model: str, n: int, gap_s: float = 0.0) -> list:
    """Latencies (s) of n requests the sampler refuses in execute(), each after `gap_s` idle."""
    lat = []
    for _ in range(n):
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        try:
            client.infer(model, [-1], 1, outputs=("image",))
        except ServingError as e:
            assert e.code == "INVALID_ARGUMENT", e
        lat.append(time.perf_counter() - t0)
    return lat


def paired(client, model: str, export: str, work: Path, n: int) -> dict:
    """The 1-step request taken apart: n rounds of the in-process sampler (the bench's baseline:
    ONNX Runtime, 1 thread, this process; its jump timed on its own) then one Triton request,
    one at a time, so both see the same host. Medians, ms, of: each side's request, each
    side's jump (Triton's from the stub's trace), the stub's time for the request, and what
    is left outside the stub (gRPC client, server, ensemble, IPC)."""
    runner = load_runner(export, backend="onnxruntime", threads=1)
    info = ModelInfo.from_manifest(runner.manifest)
    gamma = sampling.check_request(info.spec, 1)
    jump_s = []

    def timed_jump(*a):
        t0 = time.perf_counter()
        out = runner(*a)
        jump_s.append(time.perf_counter() - t0)
        return out

    label = 0 if info.num_classes else None
    labels = None if label is None else [label]
    for old in work.glob("trace.*.jsonl"):
        old.unlink()
    local, served_lat = [], []
    for i in range(n):
        t0 = time.perf_counter()
        x = run_group(timed_jump, info, [Item(20_000_000 + i, 1, gamma, label)])
        if info.is_image:
            to_images(info, x)
        local.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        client.infer(model, [20_000_000 + i], 1, class_labels=labels, outputs=("image",))
        served_lat.append(time.perf_counter() - t0)
    time.sleep(0.2)  # the last trace line is written after the response is sent
    recs = sorted(read_traces(work.glob("trace.*.jsonl")), key=lambda r: r["exec"])[-n:]
    if len(recs) < n:
        return {}
    stub = [r["sent"] - r["exec"] for r in recs]
    med = lambda a: float(np.median(a)) * 1e3  # noqa: E731
    return {"rounds": n, "in-process request": med(local), "in-process jump": med(jump_s),
            "Triton request": med(served_lat), "stub: the jump": med([r["jump_s"] for r in recs]),
            "stub: the rest (read, validate, noise, settle, response)": med(
                [t - r["jump_s"] for t, r in zip(stub, recs)]),
            "outside the stub (client, gRPC, server, ensemble, IPC)": med(
                [lat - t for lat, t in zip(served_lat, stub)])}


def measure(server, client, model: str, run, pyspy: str | None, rate: int, seconds: float, work: Path, tag: str):
    """run() under py-spy on the sampler stubs; (latencies, CPU s per process, samples per part)."""
    stubs = stub_pids(server)
    samplers = [p for p, m in stubs.items() if m.endswith("_sampler")]
    procs = []
    if pyspy:
        for pid in samplers:
            procs.append(subprocess.Popen(
                [pyspy, "record", "--pid", str(pid), "--rate", str(rate), "--duration", str(int(seconds)),
                 "--format", "raw", "--nonblocking", "-o", str(work / f"{tag}-{pid}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)  # attached before the load starts
    for old in work.glob("trace.*.jsonl"):
        old.unlink()
    cpu0 = {p: cpu_seconds([p]) for p in [server.proc.pid, *stubs]}
    client_cpu0 = time.process_time()
    lat = run()
    cpu = {p: cpu_seconds([p]) - c for p, c in cpu0.items()}
    cpu["client"] = time.process_time() - client_cpu0
    for proc in procs:
        proc.wait()
    parts = collections.Counter()
    for pid in samplers:
        parts.update(read_raw(work / f"{tag}-{pid}.txt"))
    names = {server.proc.pid: "tritonserver", **{p: f"stub {m} ({p})" for p, m in stubs.items()}, "client": "client"}
    time.sleep(0.2)  # the last answer's trace line is written after its send returns
    return lat, {names[p]: v for p, v in cpu.items()}, parts, stage_means(read_traces(work.glob("trace.*.jsonl")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, help="an exported model dir")
    ap.add_argument("--steps", default="1,4", help="step counts, comma-separated (default 1,4)")
    ap.add_argument("--seconds", type=float, default=10.0, help="load (and py-spy) seconds per step count")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--no-py-spy", action="store_true", help="CPU per process only")
    ap.add_argument("--rounds", type=int, default=300,
                    help="rounds of in-process / Triton 1-step requests taken apart (default 300)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    pyspy = None if args.no_py_spy else (shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"))
    if pyspy and not Path(pyspy).exists():
        raise SystemExit("py-spy not found: pip install py-spy (or --no-py-spy)")
    steps_list = [int(s) for s in args.steps.split(",")]
    tmp = tempfile.TemporaryDirectory()
    work = Path(tmp.name)
    os.environ[TRACE_ENV] = str(work / "trace")  # the stubs inherit the server's environment
    server, written = served([args.export], Options(), grpc_port=0, http_port=0, metrics_port=0)
    model = written[0]["name"]
    report = {"model": model, "rate": args.rate, "seconds": args.seconds, "load_avg": [list(os.getloadavg())],
              "steps": {}}
    with tmp, server, Client(server.grpc_url) as client:
        load(client, model, max(steps_list), 1.0, 10_000_000)  # warm: client, channel, both instances
        lat, cpu, _, _ = measure(server, client, model, lambda: refused(client, model, 500), None, args.rate,
                              0, work, "floor")
        report["floor"] = {"p50_ms": sorted(lat)[len(lat) // 2] * 1e3,
                           "cpu_ms_per_request": {k: v * 1e3 / len(lat) for k, v in cpu.items()}}
        for k in steps_list:
            lat, cpu, parts, stages = measure(server, client, model, lambda: load(client, model, k, args.seconds, 1000 * k),
                                      pyspy, args.rate, args.seconds, work, f"steps{k}")
            n = len(lat)
            report["steps"][k] = {
                "requests": n, "p50_ms": sorted(lat)[n // 2] * 1e3,
                "cpu_ms_per_request": {p: v * 1e3 / n for p, v in cpu.items()},
                "stub_ms_per_request": {p: c / args.rate * 1e3 / n for p, c in parts.most_common()},
                "stages_ms_per_request": stages,
            }
        # the floor again with the server idle before each request as long as a 1-step request
        # spends in the stub: at concurrency 1 the server's threads sleep through the jump, and
        # on this host a request after a few ms idle costs more than one right after another
        first = report["steps"][min(steps_list)]["stages_ms_per_request"].get(TOTAL)
        gap_s = (first or report["steps"][min(steps_list)]["p50_ms"]) / 1e3
        lat, cpu, _, _ = measure(server, client, model, lambda: refused(client, model, 300, gap_s), None,
                                 args.rate, 0, work, "floor-idle")
        report["floor_after_idle"] = {"gap_ms": gap_s * 1e3, "p50_ms": sorted(lat)[len(lat) // 2] * 1e3,
                                      "cpu_ms_per_request": {k: v * 1e3 / len(lat) for k, v in cpu.items()}}
        if STAGES:
            report["paired"] = paired(client, model, args.export, work, args.rounds)
        report["load_avg"].append(list(os.getloadavg()))
    print(table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def table(report: dict) -> str:
    steps = sorted(report["steps"], key=int)
    lo, hi = steps[0], steps[-1]
    per_step = (lambda a, b: (b - a) / (int(hi) - int(lo))) if hi != lo else None
    head = "| part | " + " | ".join(f"{k} step{'s' if int(k) > 1 else ''}, ms/request" for k in steps)
    head += " | per step, ms |" if per_step else " |"
    lines = [head, "|---" * (len(steps) + 1 + bool(per_step)) + "|"]

    def row(name, vals):
        cells = [f"{v:.3f}" for v in vals]
        if per_step:
            cells.append(f"{per_step(vals[0], vals[-1]):+.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    for name in [n for n, _ in STAGES] + ([TOTAL] if STAGES else []):
        vals = [report["steps"][k]["stages_ms_per_request"].get(name) for k in steps]
        if all(v is not None for v in vals):
            row(f"stub stage: {name}" if name != TOTAL else f"**stub stage: {name}**", vals)
    parts = [p for p, _ in PARTS] + [OTHER]
    for p in parts:
        vals = [report["steps"][k]["stub_ms_per_request"].get(p, 0.0) for k in steps]
        if any(vals):
            row(f"py-spy: {p}", vals)
    row("**stub, py-spy samples in all**", [sum(report["steps"][k]["stub_ms_per_request"].values()) for k in steps])
    procs = list(report["steps"][lo]["cpu_ms_per_request"])
    for p in procs:
        row(f"CPU of {p} (/proc)", [report["steps"][k]["cpu_ms_per_request"].get(p, 0.0) for k in steps])
    row("**CPU, every process**", [sum(report["steps"][k]["cpu_ms_per_request"].values()) for k in steps])
    row("latency p50", [report["steps"][k]["p50_ms"] for k in steps])
    fl = report["floor"]
    lines.append("")
    lines.append(f"floor (a request refused in execute), back to back: p50 {fl['p50_ms']:.2f} ms; CPU ms per "
                 "request " + ", ".join(f"{p} {v:.2f}" for p, v in fl["cpu_ms_per_request"].items() if v))
    fi = report.get("floor_after_idle")
    if fi:
        lines.append(f"floor after {fi['gap_ms']:.1f} ms idle (the 1-step request's time in the stub): p50 "
                     f"{fi['p50_ms']:.2f} ms; CPU ms per request "
                     + ", ".join(f"{p} {v:.2f}" for p, v in fi["cpu_ms_per_request"].items() if v))
    pa = report.get("paired")
    if pa:
        lines.append("")
        lines.append(f"1 step, {pa['rounds']} rounds of in-process then Triton, medians (ms): "
                     + "; ".join(f"{k} {v:.3f}" for k, v in pa.items() if k != "rounds"))
    lines.append("requests: " + ", ".join(f"{k} steps {report['steps'][k]['requests']}" for k in steps)
                 + f"; load average {report['load_avg'][0][0]:.2f} -> {report['load_avg'][-1][0]:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
