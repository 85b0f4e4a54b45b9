"""A bounded soak of `fewstep serve`: mixed requests under load, two stub kills, a report.

    python scripts/soak.py --model models/fmnist                      # 10000 requests, 64 at once
    python scripts/soak.py --model DIR --requests 300 --kills 1 --concurrency 16   # what CI runs

It starts `fewstep serve` on free loopback ports (never another address), computes a serial
reference image for every (seed, steps) it will use (one request alone each), then sends
`--requests` requests from `--concurrency` clients: steps 1-8, 1-4 images each, and
`--bad-fraction` bad requests (steps out of range, gamma NaN or > 1, a negative seed, a class
label for an unconditional model). At evenly spaced points it kills a Python backend stub
with SIGKILL (the sampler's, then the jump's, ...) and measures the time until a request
sent after the kill succeeds again. A client whose request fails with UNAVAILABLE waits for
readiness before sending its next one, as a client behind a load balancer would.

Reported: requests, answers by status code, wrong images (any byte different from the serial
reference), bad requests not refused with INVALID_ARGUMENT, per kill the stub, the time to
recover (client-side and the watchdog's own figure) and the requests lost, and the RSS of
tritonserver plus its stubs before the load, before each kill and at the end.
The run stops by itself: after `--requests` requests or `--max-seconds`, whichever is first.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fewstep.serving.health import find_stubs  # noqa: E402
from fewstep.serving.launcher import free_port  # noqa: E402

HOST = "127.0.0.1"  # loopback only, by design
# fault -> (the stub's model suffix, the signal); "server" is SIGKILL of tritonserver itself
FAULTS = {"sampler": ("_sampler", signal.SIGKILL), "jump": ("_jump", signal.SIGKILL), "server": (None, signal.SIGKILL),
          "stop": ("_sampler", signal.SIGSTOP)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an exported model dir (an unconditional image model)")
    p.add_argument("--requests", type=int, default=10000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--kills", type=int, default=2, help="stub kills, evenly spaced over the run")
    p.add_argument("--bad-fraction", type=float, default=0.05)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--seeds", type=int, default=32, help="distinct seeds (each gets serial references)")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="stop sending after this long")
    p.add_argument("--timeout", type=float, default=120.0, help="client deadline per request (s)")
    p.add_argument("--rng", type=int, default=0, help="seed of the request mix")
    p.add_argument("--json", help="also write the report here")
    p.add_argument("--serve-arg", action="append", default=[], help="an extra `fewstep serve` argument")
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.kills < 0 or not 0 <= args.bad_fraction < 1:
        p.error("--requests and --concurrency must be >= 1, --kills >= 0, --bad-fraction in [0, 1)")
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
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
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


async def soak(args, serve: Serve, model: str, plan: list[dict], refs: dict) -> dict:
    from fewstep.serving.client import AsyncClient, ServingError

    codes: Counter = Counter()
    messages: dict = {}  # the first message of every error code
    wrong, checked, bad_not_refused = 0, 0, []
    done = 0
    kills: list[dict] = []
    kill_at = [int(len(plan) * (j + 1) / (args.kills + 1)) for j in range(args.kills)]
    failures: list[tuple[float, str]] = []  # (when, code) of every non-OK, non-INVALID_ARGUMENT answer
    successes_after: dict[int, float] = {}  # kill index -> first success of a request sent after it
    start = time.monotonic()
    queue = iter(plan)
    lock = asyncio.Lock()

    async def maybe_kill():
        while kill_at and done >= kill_at[0]:
            kill_at.pop(0)
            j = len(kills)
            rss = serve.rss_mb()
            instance = serve.kill_stub(KILL_ORDER[j % len(KILL_ORDER)])
            kills.append({"stub": instance, "at": time.monotonic(), "rss_mb_before": rss})

    async def worker(client):
        nonlocal done, wrong, checked
        while time.monotonic() - start < args.max_seconds:
            async with lock:
                req = next(queue, None)
            if req is None:
                return
            sent = time.monotonic()
            try:
                out = await client.generate(model, req["seeds"], req["steps"], req["labels"], req["gamma"])
                code = "OK"
            except ServingError as e:
                code, out = e.code, None
                messages.setdefault(code, e.message[:200])
            codes[code] += 1
            done += 1
            if req["bad"] is not None:
                if code not in ("INVALID_ARGUMENT", "UNAVAILABLE"):
                    bad_not_refused.append((req["bad"], code))
            elif code == "OK":
                for seed, img in zip(req["seeds"], out):
                    checked += 1
                    wrong += int(not (img == refs[(seed, req["steps"])]).all())
                for j, k in enumerate(kills):
                    if sent > k["at"] and j not in successes_after:
                        successes_after[j] = time.monotonic()
            if code not in ("OK", "INVALID_ARGUMENT"):
                failures.append((time.monotonic(), code))
                # like a client behind a load balancer: wait for readiness before the next one
                while not await client.ready() and time.monotonic() - start < args.max_seconds:
                    await asyncio.sleep(0.1)
            await maybe_kill()

    async with AsyncClient(serve.url, timeout=args.timeout) as client:
        await client.meta(model)
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
    elapsed = time.monotonic() - start
    # wait (bounded) for every kill's restart line before reading the figures: the requests can
    # end first, e.g. when another sampler instance answers while the killed one's restart runs
    deadline = time.monotonic() + 120
    while sum("ready again" in line for line in serve.lines) < len(kills) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    watchdog = [float(m.group(1)) for m in
                (re.search(r"ready again ([0-9.]+) s", line) for line in serve.lines) if m]
    for j, k in enumerate(kills):
        end = kills[j + 1]["at"] if j + 1 < len(kills) else float("inf")
        k["lost"] = sum(1 for t, _ in failures if k["at"] <= t < end)
        k["recover_s"] = round(successes_after[j] - k["at"], 2) if j in successes_after else None
        k["watchdog_restart_s"] = watchdog[j] if j < len(watchdog) else None
        k["at_s"] = round(k.pop("at") - start, 2)
    return {"requests": done, "not_sent": len(plan) - done, "seconds": round(elapsed, 1),
            "requests_per_s": round(done / elapsed, 1), "codes": dict(codes), "messages": messages,
            "images_checked": checked,
            "wrong_images": wrong, "bad_sent": sum(1 for r in plan[:done] if r["bad"]),
            "bad_not_refused": bad_not_refused, "kills": kills, "lost_unattributed": sum(
                1 for t, _ in failures if not kills or t < start + kills[0]["at_s"])}


def references(url: str, model: str, seeds: int, max_steps: int) -> dict:
    """The image of every (seed, steps), each from a request alone."""
    from fewstep.serving.client import Client

    refs = {}
    with Client(url, timeout=120) as client:
        for steps in range(1, max_steps + 1):
            for seed in range(seeds):
                refs[(seed, steps)] = client.generate(model, [seed], steps)[0]
    return refs


def run(args) -> dict:
    sys.path.insert(0, str(ROOT))
    from fewstep.serving.repository import read_manifest

    manifest = read_manifest(Path(args.model))
    if manifest.get("num_classes", 0) or len(manifest["image"]["shape"]) != 3:
        raise SystemExit("soak: give an unconditional image model")
    model = manifest.get("name") or Path(args.model).name
    with tempfile.TemporaryDirectory(prefix="fewstep-soak-") as tmp:
        serve = Serve(args.model, Path(tmp), args.serve_arg)
        try:
            serve.wait_ready(600)
            t0 = time.monotonic()
            refs = references(serve.url, model, args.seeds, args.max_steps)
            ref_s = time.monotonic() - t0
            rss_before = serve.rss_mb()
            plan = plan_requests(args, int(manifest["sampler"]["max_steps"]))
            report = asyncio.run(soak(args, serve, model, plan, refs))
            report["rss_mb"] = {"before": rss_before, "after": serve.rss_mb()}
            report["references"] = {"count": len(refs), "seconds": round(ref_s, 1)}
            report["watchdog_lines"] = [line for line in serve.lines if "watchdog" in line]
        finally:
            report_rc = serve.stop()
    report["serve_exit_code"] = report_rc
    report["load_average"] = os.getloadavg()
    report["settings"] = {k: getattr(args, k) for k in ("requests", "concurrency", "kills", "bad_fraction",
                                                        "max_steps", "max_batch", "seeds", "max_seconds")}
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    ok = report["wrong_images"] == 0 and not report["bad_not_refused"] and all(
        k["recover_s"] is not None for k in report["kills"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
