"""A bounded soak of `fewstep serve` with the project's own client: mixed requests under load,
one fault of each kind in turn, a report.

    python scripts/soak.py --model models/fmnist                 # 10000 requests, 64 at once, 4 faults
    python scripts/soak.py --model DIR --requests 300 --concurrency 16 --seeds 4   # what CI runs

(scripts/soak.py is this module's `main`; tests/test_faults.py runs it short.)

It starts `fewstep serve` (`--jump bls` by default, so that the sampler calls NAME_jump) on free
loopback ports (never another address), computes a serial reference image for every (seed,
steps) it will use (one request alone each), then sends `--requests` requests from
`--concurrency` workers through `serving.client.AsyncClient`, which retries UNAVAILABLE and
missed deadlines within each request's deadline (`--timeout`): steps 1-8, 1-4 images each, and
`--bad-fraction` bad requests (steps out of range, gamma NaN or > 1, a negative seed, a class
label for an unconditional model). At evenly spaced points, each after the previous fault's
recovery, it injects the `--faults` in turn: SIGKILL of the sampler's stub (`sampler`), of the
jump's (`jump`), of tritonserver itself (`server`), and SIGSTOP of the sampler's stub (`stop`).

Reported, per fault (the requests that ended between it and the next one): client-visible errors
(a good request not answered, a bad one not refused with INVALID_ARGUMENT), wrong images (any
byte different from the serial reference), when serve noticed the fault and when every model
was ready again (from serve's watchdog lines), the p99 latency of the requests in flight during
the recovery, the retries, and the RSS of tritonserver plus its stubs before the fault and
before the next one (or at the end). The run stops by itself: after `--requests` requests or
`--max-seconds`, whichever is first. Exit 0 when no error was visible and no image was wrong.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from fewstep.serving.client import AsyncClient, Client, ServingError
from fewstep.serving.health import find_stubs
from fewstep.serving.launcher import PACKAGE_DIR, free_port
from fewstep.serving.repository import read_manifest

HOST = "127.0.0.1"  # loopback only, by design
# fault -> (the stub's model suffix, the signal); "server" is SIGKILL of tritonserver itself
FAULTS = {"sampler": ("_sampler", signal.SIGKILL), "jump": ("_jump", signal.SIGKILL), "server": (None, signal.SIGKILL),
          "stop": ("_sampler", signal.SIGSTOP)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an exported model dir (an unconditional image model)")
    p.add_argument("--requests", type=int, default=10000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--faults", type=lambda v: [f for f in v.split(",") if f], default=list(FAULTS),
                   help="faults to inject in turn, evenly spaced (each after the previous one's recovery): "
                        f"comma-separated of {', '.join(FAULTS)} (default: all; '' = none)")
    p.add_argument("--jump", default="bls", choices=("inline", "bls", "auto"),
                   help="serve's --jump (default bls: the sampler then calls NAME_jump, so its stub's death matters)")
    p.add_argument("--bad-fraction", type=float, default=0.05)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--seeds", type=int, default=32, help="distinct seeds (each gets serial references)")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="stop sending after this long")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="client deadline per request, retries included (s; the client's default)")
    p.add_argument("--rng", type=int, default=0, help="seed of the request mix")
    p.add_argument("--json", help="also write the report here")
    p.add_argument("--serve-arg", action="append", default=[], help="an extra `fewstep serve` argument")
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or not 0 <= args.bad_fraction < 1:
        p.error("--requests and --concurrency must be >= 1, --bad-fraction in [0, 1)")
    unknown = [f for f in args.faults if f not in FAULTS]
    if unknown:
        p.error(f"--faults: unknown {', '.join(unknown)} (known: {', '.join(FAULTS)})")
    return args


# --- the server under test --------------------------------------------------------------------

def _die_with_parent() -> None:
    """In the child: SIGINT when the soak dies (even by SIGKILL), so `serve` never outlives it."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT)


class Serve:
    """`fewstep serve` in a subprocess; its stdout/stderr lines are kept."""

    def __init__(self, model: str, workdir: Path, extra: list[str]):
        self.grpc_port = free_port(HOST)
        cmd = [sys.executable, "-m", "fewstep", "serve", "--model", model, "--host", HOST,
               "--grpc-port", str(self.grpc_port), "--http-port", str(free_port(HOST)),
               "--metrics-port", str(free_port(HOST)), "--device", "cpu", "--threads", "1",
               "--repo", str(workdir / "repo"), "--log-file", str(workdir / "tritonserver.log"), *extra]
        # the checkout's fewstep (or the installed one), as the soak's own
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")]))
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, preexec_fn=_die_with_parent)
        self.lines: list[str] = []
        self.times: list[float] = []  # time.monotonic() when each line was read
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    def _read(self):
        for line in self.proc.stdout:
            self.times.append(time.monotonic())
            self.lines.append(line.rstrip("\n"))
            if line.startswith("ready:"):
                self.ready.set()

    def wait_ready(self, timeout: float) -> None:
        if not self.ready.wait(timeout) or self.proc.poll() is not None:
            raise RuntimeError("fewstep serve did not become ready:\n" + "\n".join(self.lines[-30:]))

    def triton_pid(self) -> int | None:
        """The tritonserver process that `fewstep serve` runs now (it changes at a restart)."""
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                argv0 = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            rest = stat[stat.rindex(")") + 2:].split()
            if int(rest[1]) == self.proc.pid and rest[0] != "Z" and Path(argv0).name == "tritonserver":
                return int(d.name)
        return None

    def rss_mb(self) -> float | None:
        """Resident memory of tritonserver and its stubs (MiB)."""
        pid = self.triton_pid()
        if pid is None:
            return None
        total = 0
        for p in [pid] + [s.pid for s in find_stubs(pid)]:
            try:
                for line in Path(f"/proc/{p}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return round(total / 1024, 1)

    def kill_stub(self, suffix: str, sig: int = signal.SIGKILL) -> str | None:
        """Send `sig` to the first stub of the model whose name ends with `suffix`; its instance."""
        pid = self.triton_pid()
        stubs = [s for s in find_stubs(pid)] if pid else []
        stub = next((s for s in stubs if s.model.endswith(suffix)), None)
        if stub is None:
            return None
        os.kill(stub.pid, sig)
        return stub.instance

    def inject(self, fault: str) -> str | None:
        """One fault of FAULTS; what was hit (None: nothing to hit)."""
        if fault == "server":
            pid = self.triton_pid()
            if pid is None:
                return None
            os.kill(pid, signal.SIGKILL)
            return f"tritonserver (pid {pid})"
        suffix, sig = FAULTS[fault]
        return self.kill_stub(suffix, sig)

    def lines_since(self, t: float) -> list[tuple[float, str]]:
        return [(tt, line) for tt, line in zip(list(self.times), list(self.lines)) if tt >= t]

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


# --- the request mix ------------------------------------------------------------------------

BAD_KINDS = ("steps=0", "steps>max", "gamma=nan", "gamma>1", "seed<0", "label-on-unconditional")


def plan_requests(args, model_max_steps: int) -> list[dict]:
    rng = random.Random(args.rng)
    out = []
    for i in range(args.requests):
        k = rng.randint(1, args.max_batch)
        req = {"i": i, "seeds": [rng.randrange(args.seeds) for _ in range(k)],
               "steps": rng.randint(1, args.max_steps), "gamma": None, "labels": None, "bad": None}
        if rng.random() < args.bad_fraction:
            kind = rng.choice(BAD_KINDS)
            req["bad"] = kind
            if kind == "steps=0":
                req["steps"] = 0
            elif kind == "steps>max":
                req["steps"] = model_max_steps + 1
            elif kind == "gamma=nan":
                req["gamma"] = float("nan")
            elif kind == "gamma>1":
                req["gamma"] = 1.5
            elif kind == "seed<0":
                req["seeds"][0] = -1
            else:
                req["labels"] = [0] * k
        out.append(req)
    return out


def _p99(values: list[float]) -> float | None:
    return round(float(sorted(values)[max(0, int(round(0.99 * len(values))) - 1)]), 3) if values else None


async def soak(args, serve: Serve, model: str, plan: list[dict], refs: dict) -> dict:
    """Send the plan from `concurrency` workers through the project's AsyncClient (which retries
    transient failures within each request's deadline), injecting the faults in turn."""
    records: list[dict] = []   # per request: sent, done, code, retries, wrong, bad
    messages: dict = {}        # the first message of every error code
    faults: list[dict] = []
    fault_at = [int(len(plan) * (j + 1) / (len(args.faults) + 1)) for j in range(len(args.faults))]
    start = time.monotonic()
    queue = iter(plan)
    lock = asyncio.Lock()

    def recovered(j: int) -> float | None:
        """When serve said the fault j's restart (or reload) was done."""
        f = faults[j]
        return next((t for t, line in serve.lines_since(f["at"]) if "ready again" in line), None)

    def maybe_inject():
        j = len(faults)
        if j >= len(fault_at) or len(records) < fault_at[j] or (j and recovered(j - 1) is None):
            return
        kind = args.faults[j]
        rss = serve.rss_mb()
        at = time.monotonic()
        faults.append({"fault": kind, "hit": serve.inject(kind), "at": at, "rss_mb_before": rss})

    async def worker(client):
        while time.monotonic() - start < args.max_seconds:
            async with lock:
                req = next(queue, None)
            if req is None:
                return
            retried: list = []
            sent = time.monotonic()
            try:
                out = await client.generate(model, req["seeds"], req["steps"], retried=retried,
                                            class_labels=req["labels"], gamma=req["gamma"])
                code = "OK"
            except ServingError as e:
                code, out = e.code, None
                messages.setdefault(code, e.message[:200])
            wrong = 0
            if code == "OK" and req["bad"] is None:
                wrong = sum(int(not (img == refs[(seed, req["steps"])]).all()) for seed, img in zip(req["seeds"], out))
            records.append({"sent": sent, "done": time.monotonic(), "code": code, "retries": len(retried),
                            "retry_codes": sorted({e.code for e in retried}),
                            "bad": req["bad"], "images": len(req["seeds"]) if code == "OK" else 0, "wrong": wrong})
            maybe_inject()

    async with AsyncClient(serve.url, timeout=args.timeout) as client:
        await client.meta(model)
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
    elapsed = time.monotonic() - start
    # every fault's recovery line before the figures (the requests can end first)
    deadline = time.monotonic() + 120
    while faults and recovered(len(faults) - 1) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    rss_end = serve.rss_mb()
    return {"records": records, "faults": faults, "messages": messages, "elapsed": elapsed, "start": start,
            "rss_end": rss_end, "recovered": [recovered(j) for j in range(len(faults))]}


def visible_error(r: dict) -> bool:
    """What a user would see as a failure: a good request not answered, or a bad one not refused."""
    return r["code"] != "OK" if r["bad"] is None else r["code"] != "INVALID_ARGUMENT"


def summarise(run: dict, serve: Serve) -> dict:
    """The report: totals, and per fault the figures of the window from it to the next one."""
    records, faults, start = run["records"], run["faults"], run["start"]
    codes = Counter(r["code"] for r in records)
    table = []
    for j, f in enumerate(faults):
        end = faults[j + 1]["at"] if j + 1 < len(faults) else float("inf")
        window = [r for r in records if f["at"] <= r["done"] < end]
        ready = run["recovered"][j]
        lines = serve.lines_since(f["at"])
        noticed = next((t for t, line in lines if "watchdog:" in line and ("restarting" in line or "reloading" in line)),
                       None)
        during = [r["done"] - r["sent"] for r in records
                  if ready is not None and r["sent"] <= ready and r["done"] >= f["at"] and r["bad"] is None]
        table.append({
            "fault": f["fault"], "hit": f["hit"], "at_s": round(f["at"] - start, 2),
            "noticed_s": None if noticed is None else round(noticed - f["at"], 2),
            "recover_s": None if ready is None else round(ready - f["at"], 2),
            "requests": len(window), "client_visible_errors": sum(visible_error(r) for r in window),
            "wrong_images": sum(r["wrong"] for r in window), "retried_requests": sum(r["retries"] > 0 for r in window),
            "retries": sum(r["retries"] for r in window),
            "requests_during_recovery": len(during), "p99_during_recovery_s": _p99(during),
            "rss_mb_before": f["rss_mb_before"],
            "rss_mb_after": faults[j + 1]["rss_mb_before"] if j + 1 < len(faults) else run["rss_end"],
            "watchdog": [line for _, line in lines if "watchdog:" in line][:2],
            "slowest": [{"sent_s": round(r["sent"] - f["at"], 2), "seconds": round(r["done"] - r["sent"], 2),
                         "retries": r["retries"], "retry_codes": r["retry_codes"]}
                        for r in sorted(window, key=lambda r: r["sent"] - r["done"])[:3]],
        })
    first = faults[0]["at"] if faults else float("inf")
    calm = [r["done"] - r["sent"] for r in records if r["done"] < first and r["bad"] is None]
    return {"requests": len(records), "seconds": round(run["elapsed"], 1),
            "requests_per_s": round(len(records) / run["elapsed"], 1), "codes": dict(codes),
            "messages": run["messages"], "images_checked": sum(r["images"] for r in records if r["bad"] is None),
            "wrong_images": sum(r["wrong"] for r in records),
            "client_visible_errors": sum(visible_error(r) for r in records),
            "bad_sent": sum(1 for r in records if r["bad"]),
            "bad_not_refused": sum(1 for r in records if r["bad"] and r["code"] != "INVALID_ARGUMENT"),
            "retries": sum(r["retries"] for r in records), "p99_before_faults_s": _p99(calm),
            "errors_before_faults": sum(visible_error(r) for r in records if r["done"] < first),
            "faults": table}


def markdown_table(report: dict) -> str:
    """The per-fault table of docs/serving.md."""
    head = ("| fault | client-visible errors | wrong images | noticed | recovered | p99 during recovery | "
            "retried requests | RSS before → after |\n|---|---|---|---|---|---|---|---|")
    rows = [f"| {f['fault']} ({f['hit']}) | {f['client_visible_errors']} of {f['requests']} | {f['wrong_images']} | "
            f"{f['noticed_s']} s | {f['recover_s']} s | {f['p99_during_recovery_s']} s "
            f"({f['requests_during_recovery']} requests) | {f['retried_requests']} | "
            f"{f['rss_mb_before']} → {f['rss_mb_after']} MiB |" for f in report["faults"]]
    return "\n".join([head, *rows])


def references(url: str, model: str, seeds: int, max_steps: int) -> dict:
    """The image of every (seed, steps), each from a request alone."""
    refs = {}
    with Client(url, timeout=120) as client:
        for steps in range(1, max_steps + 1):
            for seed in range(seeds):
                refs[(seed, steps)] = client.generate(model, [seed], steps)[0]
    return refs


def run(args) -> dict:
    manifest = read_manifest(Path(args.model))
    if manifest.get("num_classes", 0) or len(manifest["image"]["shape"]) != 3:
        raise SystemExit("soak: give an unconditional image model")
    model = manifest.get("name") or Path(args.model).name
    with tempfile.TemporaryDirectory(prefix="fewstep-soak-") as tmp:
        serve = Serve(args.model, Path(tmp), ["--jump", args.jump, *args.serve_arg])
        try:
            serve.wait_ready(600)
            t0 = time.monotonic()
            refs = references(serve.url, model, args.seeds, args.max_steps)
            ref_s = time.monotonic() - t0
            rss_before = serve.rss_mb()
            plan = plan_requests(args, int(manifest["sampler"]["max_steps"]))
            report = summarise(asyncio.run(soak(args, serve, model, plan, refs)), serve)
            report["not_sent"] = len(plan) - report["requests"]
            report["rss_mb"] = {"before": rss_before, "after": serve.rss_mb()}
            report["references"] = {"count": len(refs), "seconds": round(ref_s, 1)}
            report["watchdog_lines"] = [line for line in serve.lines if "watchdog" in line]
        finally:
            report_rc = serve.stop()
    report["serve_exit_code"] = report_rc
    report["load_average"] = os.getloadavg()
    report["settings"] = {k: getattr(args, k) for k in ("requests", "concurrency", "faults", "jump", "bad_fraction",
                                                        "max_steps", "max_batch", "seeds", "max_seconds", "timeout")}
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    print(markdown_table(report))
    if args.json:
        Path(args.json).write_text(text + "\n")
    ok = report["wrong_images"] == 0 and report["client_visible_errors"] == 0 and all(
        f["recover_s"] is not None for f in report["faults"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
