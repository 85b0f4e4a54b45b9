"""The measuring of `fewstep bench`: cells of requests to the ensemble over gRPC (`AsyncClient`,
one channel, `concurrency` workers), the baselines between them, the server's statistics and
CPU around each cell. The plan is serving/bench_plan.py, the report serving/bench_report.py."""
from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from fewstep.errors import UserError
from fewstep.serving.bench_plan import Plan, check_against_model
from fewstep.serving.bench_stats import jump_calls, parse_stats, read_jump_counters, stats_delta
from fewstep.serving.client import AsyncClient, ServingError
from fewstep.serving.reaper import cpu_seconds
from fewstep.serving.bench_baselines import onnxruntime_baseline, pytorch_baseline

PERCENTILES = (50, 90, 95, 99)


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
    retried: list = field(default_factory=list)      # the client's retries (serving.client): ServingErrors

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
             "images": n * self.batch, "wall_s": self.wall_s, "retries": len(self.retried)}
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
    def __init__(self, args, plan: Plan, model: str, server=None):
        self.args = args
        self.plan = plan
        self.model = model
        self.server = server                # with --serve: the serving.launcher.Server
        self.metrics_url = server.metrics_url if server is not None else None
        self.seeds = Seeds(args.seed)
        self.baselines: dict = {}           # source -> callable
        self.baseline_info: dict = {}
        self.cells: list[Cell] = []
        self.first_request = None

    # --- one request --------------------------------------------------------------------------
    async def _triton_once(self, client, cell: Cell | None, steps: int) -> bool:
        seeds = self.seeds.take(self.plan.batch)
        labels = labels_for(seeds, self.meta.num_classes)
        self.sent_total += 1
        t0 = time.perf_counter()
        try:
            await client.infer(self.model, seeds, steps, outputs=(self.output,),
                               retried=None if cell is None else cell.retried, class_labels=labels, gamma=self.args.gamma)
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

    def _deadline(self) -> float | None:
        return time.perf_counter() + self.plan.duration if self.plan.duration else None

    async def _concurrently(self, client, conc: int, count: int | None, draw, cells: dict | None) -> None:
        """`conc` workers send requests until `count` are sent (None: the plan's amount); each
        draws its step count (draw()) and is recorded in cells[steps] (cells None: warm-up)."""
        deadline = self._deadline() if cells is not None else None
        issued = 0

        def more() -> bool:
            return issued < count if count is not None else self._more(issued, deadline)

        async def worker():
            nonlocal issued
            while more():
                issued += 1
                k = draw()
                await self._triton_once(client, None if cells is None else cells[k], k)
                if cells is not None:
                    self.progress.update()

        await asyncio.gather(*(worker() for _ in range(min(conc, count) if count is not None else conc)))

    # --- the server around a cell ------------------------------------------------------------------
    async def _settled_stats(self, client, wait_s: float = 5.0) -> dict:
        """Statistics once Triton has counted every request this run sent (warm-up ones too)
        and they stopped moving. Triton counts a request when it is released, which can be
        after its response reached us (the sampler answers from its own thread), so a
        snapshot taken at once can miss the last requests."""
        before = self.stats_origin
        sent = self.sent_total
        deadline = time.perf_counter() + wait_s
        last = None
        while True:
            after = parse_stats(await client.statistics())
            # the sampler's counters (flushed when its scheduler goes idle) must stop moving too
            after["__counters__"] = await asyncio.to_thread(read_jump_counters, self.metrics_url, self.model)
            a, b = after.get(self.model, {}), before.get(self.model, {})
            counted = sum(a.get(k, 0) - b.get(k, 0) for k in ("success_count", "fail_count"))
            # every request counted by the ensemble, and nothing moved since the last look
            if (counted >= sent and after == last) or time.perf_counter() > deadline:
                return after
            last = after
            await asyncio.sleep(0.1)  # longer than a sampler waits idle before it flushes (50 ms)

    def _server_cpu(self) -> float | None:
        return cpu_seconds(self.server.pids()) if self.server is not None else None

    async def _measured(self, client, run) -> tuple:
        """await run() between two snapshots of the server: (the server's statistics delta,
        jump calls, the CPU seconds of the client and the server or None, run()'s wall time)."""
        before = await self._settled_stats(client)
        server_cpu0 = self._server_cpu()
        c0, t0 = time.process_time(), time.perf_counter()
        await run()
        client_cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        after = await self._settled_stats(client)
        server_cpu1 = self._server_cpu()
        server = stats_delta(before, after, self.composing)
        calls = jump_calls(before.get("__counters__"), after.get("__counters__"), server, self.model)
        cpu = None if server_cpu0 is None else client_cpu + server_cpu1 - server_cpu0
        return server, calls, cpu, wall

    # --- cells ----------------------------------------------------------------------------------
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
        await self._concurrently(client, conc, plan.warmup, lambda: steps, None)

        async def alternate():
            # one request of each baseline, then one to Triton: the same background load for all
            deadline, issued = self._deadline(), 0
            while self._more(issued, deadline):
                issued += 1
                for s in paired:
                    self._baseline_once(s, base[s], steps)
                t0 = time.perf_counter()
                await self._triton_once(client, cell, steps)
                cell.wall_s += time.perf_counter() - t0
                self.progress.update()

        cell.server, cell.jump_calls, cpu, wall = await self._measured(
            client, alternate if paired else lambda: self._concurrently(client, conc, None, lambda: steps, {steps: cell}))
        if not paired:
            cell.wall_s = wall
        if paired:  # the baselines' CPU was counted in the client's: take it out
            cpu = None if cpu is None else cpu - sum(base[s].cpu_s for s in paired)
        for s in paired:
            base[s].wall_s = sum(base[s].latencies_ms) / 1e3
        if cpu is not None:
            cell.cpu_s, cell.cpu_counted = cpu, True
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

        await self._concurrently(client, conc, plan.warmup, draw, None)
        server, calls, cpu, wall = await self._measured(
            client, lambda: self._concurrently(client, conc, None, draw, cells))
        image_steps = max(1, sum(len(c.latencies_ms) * j for j, c in cells.items()))
        for k, cell in cells.items():
            cell.wall_s, cell.server, cell.jump_calls = wall, server, calls
            if cpu is not None and len(cell.latencies_ms):
                cell.cpu_s = cpu * len(cell.latencies_ms) * k / image_steps  # shared out by image-steps
                cell.cpu_counted = True
        return list(cells.values())

    def baseline_cell(self, source: str, steps: int) -> Cell:
        """A baseline alone, one request at a time (when concurrency 1 is not measured)."""
        cell = Cell(source, steps, 1, self.plan.batch)
        self.progress.describe(f"steps {steps} {source}")
        for _ in range(self.plan.warmup):
            self._baseline_once(source, None, steps)
        deadline = self._deadline()
        done = 0
        while self._more(done, deadline):
            self._baseline_once(source, cell, steps)
            done += 1
        cell.wall_s = sum(cell.latencies_ms) / 1e3
        return cell

    # --- setup and the whole run --------------------------------------------------------------------
    async def connect(self, url: str) -> AsyncClient:
        """The client; clear errors for an unreachable server and an unknown model."""
        client = AsyncClient(url, timeout=self.args.timeout)
        try:
            try:
                self.server_version = await client.server_version()
            except ServingError as e:
                raise UserError(f"cannot reach a Triton server at {url} ({(e.message.splitlines() or [e.code])[0]})") from None
            if not await client.ready():
                raise UserError(f"the server at {url} is not ready")
            try:
                self.meta = await client.meta(self.model)
            except ServingError as e:
                raise UserError(f"--model {self.model}: {e.message}") from None
            self.metrics_url = self.metrics_url or self.args.metrics_url or \
                f"http://{url.rsplit(':', 1)[0]}:8002/metrics"
            # requests this run sent, and the statistics before the first: see _settled_stats
            self.sent_total = 0
            self.stats_origin = parse_stats(await client.statistics())
            self.jump_params, self.jump_instances, self.jump_kind = await self._model_config(client, "_jump")
            self.sampler_params, instances, _ = await self._model_config(client, "_sampler")
            self.sampler_params["instances"] = instances
        except BaseException:
            await client.close()
            raise
        return client

    async def _model_config(self, client, suffix: str) -> tuple:
        """(parameters, instances, instance kinds) of a composing model; ({}, None, None) without it."""
        try:
            cfg = await client.config(self.model + suffix)
        except ServingError:
            return {}, None, None
        groups = cfg.get("instance_group", [])
        return ({k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()},
                sum(int(g.get("count", 1)) for g in groups), ",".join(sorted({g.get("kind", "") for g in groups})))

    def baseline_threads(self) -> int | None:
        if self.args.threads is not None:
            return self.args.threads or None
        t = int(self.jump_params.get("threads", "0") or 0)
        return t or None

    def _add_baselines(self) -> None:
        args, threads = self.args, self.baseline_threads()
        if args.export:
            self.baselines["onnxruntime"], self.baseline_info["onnxruntime"] = \
                onnxruntime_baseline(args.export, threads, self.meta, getattr(args, "device", "cpu"))
        if args.ckpt:
            self.baselines["pytorch"], self.baseline_info["pytorch"] = pytorch_baseline(args.ckpt, threads, self.meta)

    async def _first_request(self, client) -> None:
        """The first request a fresh server gets (the models warmed themselves before ready);
        the client's own first call (gRPC, protobuf) is paid first by a request that Triton
        refuses before any model runs (an output the model does not have)."""
        try:
            await client.infer(self.model, [0], 1, outputs=("no_such_output",))
        except ServingError:
            pass
        k = min(self.plan.steps or [k for k, _ in self.plan.mix])
        first = Cell("triton", k, 1, self.plan.batch)
        await self._triton_once(client, first, k)
        self.first_request = {"steps": k, "ms": first.latencies_ms[0] if first.latencies_ms else None}

    async def run(self, url: str) -> tuple[float, tuple, tuple]:
        """Every cell of the plan; (seconds, load average before, after)."""
        plan = self.plan
        client = await self.connect(url)
        try:
            check_against_model(plan, self.meta)
            self.output = "image" if self.meta.is_image else "sample"
            self.composing = [self.model, self.model + "_sampler", self.model + "_jump"]
            self._add_baselines()
            paired = list(self.baselines) if 1 in plan.concurrency else []
            per_cell = plan.requests
            total = None if per_cell is None else per_cell * (len(plan.steps) + bool(plan.mix)) * len(plan.concurrency)
            if total is not None and not paired:
                total += per_cell * len(plan.steps) * len(self.baselines)
            self.progress = Progress(total, enabled=not self.args.no_progress)
            if self.server is not None:
                await self._first_request(client)
            load0, t0 = os.getloadavg(), time.time()
            try:
                for steps in plan.steps:
                    if not paired:
                        for source in self.baselines:
                            self.cells.append(self.baseline_cell(source, steps))
                            self.progress.update(len(self.cells[-1].latencies_ms))
                    for conc in plan.concurrency:
                        self.cells.extend(await self.triton_cell(client, steps, conc, paired if conc == 1 else []))
                for conc in plan.concurrency if plan.mix else []:
                    self.cells.extend(await self.mix_cell(client, conc))
            finally:
                self.progress.close()
            return time.time() - t0, load0, os.getloadavg()
        finally:
            await client.close()
