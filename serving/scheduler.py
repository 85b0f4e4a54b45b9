"""Step-level batching: one thread advances every sample in flight with one jump call per tick.

`<name>_sampler` runs one `Scheduler` per model instance. A request's images join as
samples; on each tick the scheduler takes the samples in flight, whatever their step
count, step index, gamma or label (oldest first, at most `max_batch`), and advances all
of them with ONE call of jump(x, t, s, labels), t and s per sample. After the jump each
sample settles on its own: `fewstep.sampling.settle` re-noises it from its own seed, so
an image never depends on what shared its batch. A request is answered as soon as its
last image is done; requests that arrive meanwhile join at the next tick. When the
scheduler is idle and every new sample finishes in one step, `run_here` runs that one tick
in the caller's thread (the sampler's execute()), so a lone 1-step request pays no hand-off
to the scheduler's thread.

The step math is `fewstep.sampling`'s (`step_plan`, `start_noise`, `settle`), the same
as the PyTorch evaluation loop; this module only keeps per-sample progress through it.
Free of Triton, so tests drive it with any jump.
"""
from __future__ import annotations

import functools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from fewstep import sampling


class ShuttingDown(RuntimeError):
    """The scheduler stopped before a request was finished."""


@dataclass
class _Request:
    """One request: its images so far and the callback that answers it."""
    done: object                       # done(result): float32 [B, *shape], or an exception
    results: np.ndarray
    remaining: int
    answered: bool = False
    trace: dict | None = None          # with tracing: when its ticks ran (see Scheduler._stamp)

    def answer(self, result) -> None:
        if not self.answered:
            self.answered = True
            self.done(result)


@dataclass
class _Sample:
    request: _Request
    k: int                              # index in its request
    seed: int
    label: int | None
    plan: tuple                         # fewstep.sampling.step_plan
    i: int = 0                          # steps done
    x: np.ndarray | None = field(default=None, repr=False)


class Scheduler:
    """scheduler.submit(items, done) from any thread; done(result) is called once, from the
    scheduler's thread, with float32 samples [len(items), *shape] or an exception
    (run_here() returns them instead).

    jump(x, t, s, labels) -> x_s: numpy float32 [B, *shape], t and s float32 [B], labels int64
    [B] or None. on_idle() is called once the scheduler has had no work for `idle_after`
    seconds, and at most every `idle_every` seconds while busy (the sampler flushes its
    counters there: two round trips to the server, kept off the path of back-to-back requests).
    """

    def __init__(self, jump, info, max_batch: int, on_idle=None, idle_every: float = 1.0, idle_after: float = 0.05,
                 name: str = "scheduler", trace: bool = False):
        self.jump = jump
        self.trace = trace              # stamp each traced request's ticks (serving.trace)
        self.info = info
        self.max_batch = max(1, int(max_batch))
        self.on_idle = on_idle
        self.idle_every = idle_every
        self.idle_after = idle_after
        self.calls = 0                  # jump calls made
        self.image_steps = 0            # samples advanced by them (their batch sizes, summed)
        self._plans: dict = {}
        self._pending: deque = deque()  # samples not started, oldest first
        self._active: list = []         # samples in flight, oldest first (only the thread touches it)
        self._cond = threading.Condition()
        self._stopping = False
        self._here = False              # a caller is advancing samples in its own thread (run_here)
        self._dirty = False             # ticks ran since the idle hook last did
        self._last_work = 0.0           # time.monotonic() of the last tick's end
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # --- callers ----------------------------------------------------------------------------
    def submit(self, items, done, trace: dict | None = None) -> None:
        """Queue one request's items (serving.protocol.Item, already validated); `trace`, a
        dict the scheduler adds its timings to (when it was made with trace=True)."""
        self.submit_all([(items, done, trace)])

    def submit_all(self, requests) -> None:
        """Queue requests [(items, done, trace)] (one lock, one wake-up)."""
        reqs = [self._request(items, done, trace) for items, done, trace in requests]
        with self._cond:
            stopped = self._stopping
            if not stopped:
                for _, samples in reqs:
                    self._pending.extend(samples)
                self._cond.notify()
        if stopped:
            for req, _ in reqs:
                req.answer(ShuttingDown("the sampler is shutting down"))

    def run_here(self, requests, traces=None) -> list | None:
        """requests: [items] (serving.protocol.Item, validated). When nothing is queued or in
        flight and every sample finishes in one step (at most max_batch of them), advance
        them in this thread with one jump call and return each request's result (float32
        [n, *shape], or the exception that failed it); otherwise None, with nothing queued
        (submit them). The sampler's execute() calls it first: a lone 1-step request then
        pays no hand-off to the scheduler's thread, and its response goes back with
        execute()'s return. Later requests would have waited for that jump anyway."""
        results = [None] * len(requests)
        samples = []
        for i, items in enumerate(requests):
            req, smps = self._request(items, functools.partial(results.__setitem__, i),
                                      traces[i] if traces else None)
            if any(len(smp.plan) != 1 for smp in smps):
                return None
            samples += smps
        if not samples or len(samples) > self.max_batch:
            return None
        with self._cond:
            if self._stopping or self._here or self._active or self._pending:
                return None
            self._here = True
        try:
            finished = self._advance(samples)[1]
        finally:
            with self._cond:
                self._here, self._last_work = False, time.monotonic()
                # wake the thread only when it sleeps without a deadline: for the idle hook
                # (it is timing one already when dirty), a stop, or work queued meanwhile
                if not self._dirty or self._pending or self._stopping:
                    self._dirty = True
                    self._cond.notify()
        self._answer_all(finished)
        return results

    def _request(self, items, done, trace) -> tuple:
        req = _Request(done, np.empty((len(items),) + tuple(self.info.shape), np.float32), len(items), trace=trace)
        return req, [_Sample(req, k, it.seed, it.label, self._plan(it.steps, it.gamma)) for k, it in enumerate(items)]

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is in flight and queued (up to `timeout` s), then stop; whatever is
        left is answered with ShuttingDown."""
        with self._cond:
            self._stopping = True
            self._deadline = time.monotonic() + timeout
            self._cond.notify()
        self._thread.join(timeout + 5.0)

    def has_work(self) -> bool:
        """Whether samples are queued or in flight (a racy hint for callers: the sampler
        answers a request in the thread that finished it when nothing else waits)."""
        return bool(self._pending or self._active)

    # --- the thread ------------------------------------------------------------------------------
    def _plan(self, steps: int, gamma: float) -> tuple:
        key = (steps, gamma)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = sampling.step_plan(self.info.spec, steps, gamma)
        return plan

    def _ready(self) -> bool:
        """Something for the thread to do (called with the lock held)."""
        return bool(self._pending or self._active or self._stopping) and not self._here

    def _loop(self) -> None:
        last_idle = time.monotonic()
        while True:
            with self._cond:
                while not self._ready():
                    # out of work: the idle hook runs once no tick ran for idle_after s (ticks
                    # in run_here count too), or idle_every s after it last ran
                    if not self._dirty:
                        self._cond.wait()
                        continue
                    wait = min(self._last_work + self.idle_after, last_idle + self.idle_every) - time.monotonic()
                    if wait > 0:
                        self._cond.wait(wait)
                        continue
                    self._dirty = False
                    self._cond.release()
                    try:  # outside the lock: submit() never waits for it
                        self._idle()
                    finally:
                        self._cond.acquire()
                    last_idle = time.monotonic()
                if self._stopping and (time.monotonic() > self._deadline
                                       or not (self._pending or self._active)):
                    left = list(self._active) + list(self._pending)
                    self._active, self._pending = [], deque()
                    break
                # new samples join oldest first, up to the max batch
                while self._pending and len(self._active) < self.max_batch:
                    smp = self._pending.popleft()
                    if not smp.request.answered:  # (a request that failed meanwhile)
                        self._active.append(smp)
                self._dirty = True
            self._active, finished = self._advance(self._active)
            self._last_work = time.monotonic()
            # answered after the samples in flight are updated, so has_work() is true to them
            self._answer_all(finished)
            if self.on_idle is not None and time.monotonic() - last_idle > self.idle_every:
                self._idle()
                last_idle = time.monotonic()
        err = ShuttingDown("the sampler shut down before this request was finished")
        for smp in left:
            smp.request.answer(err)
        self._idle()

    def _idle(self) -> None:
        if self.on_idle is not None:
            try:
                self.on_idle()
            except Exception:  # noqa: BLE001 - counters must never stop the sampler
                pass

    @staticmethod
    def _answer_all(finished) -> None:
        for req in finished:
            req.answer(req.results)

    def _advance(self, samples) -> tuple:
        """One tick over `samples`: (the samples still in flight, the requests now finished,
        to be answered). A failing jump, or a bug, answers every request of the tick with
        its exception (the scheduler goes on)."""
        try:
            return self._tick(samples)
        except Exception as e:  # noqa: BLE001 - a bug must not leave requests waiting forever
            for smp in samples:
                smp.request.answer(e)
            return [], []

    def _tick(self, samples) -> tuple:
        t0 = time.perf_counter() if self.trace else 0.0
        spec, shape = self.info.spec, self.info.shape
        batch = [smp for smp in samples if not smp.request.answered]
        for smp in batch:
            if smp.x is None:  # joins now: its start noise
                smp.x = sampling.start_noise(spec, smp.plan, [smp.seed], shape)[0]
        if not batch:
            return [], []
        x = np.stack([smp.x for smp in batch])
        t = np.array([smp.plan[smp.i].t for smp in batch], np.float32)
        s = np.array([smp.plan[smp.i].s for smp in batch], np.float32)
        labels = None if batch[0].label is None else np.array([smp.label for smp in batch], np.int64)
        t1 = time.perf_counter() if self.trace else 0.0
        out = np.asarray(self.jump(x, t, s, labels), dtype=np.float32)
        t2 = time.perf_counter() if self.trace else 0.0
        self.calls += 1
        self.image_steps += len(batch)
        still, finished = [], []
        for b, smp in enumerate(batch):
            x_b = sampling.settle(spec["process"], out[b:b + 1], smp.plan[smp.i], smp.i, [smp.seed], shape)
            smp.i += 1
            if smp.i < len(smp.plan):
                smp.x = x_b[0]
                still.append(smp)
                continue
            req = smp.request
            req.results[smp.k] = x_b[0]
            req.remaining -= 1
            if req.remaining == 0:
                finished.append(req)
        if self.trace:
            self._stamp(batch, t0, t1, t2, time.perf_counter())
        return still, finished

    @staticmethod
    def _stamp(batch, t0: float, t1: float, t2: float, t3: float) -> None:
        """Add one tick to the trace of each request in it: when its first tick began, and
        the seconds of its ticks spent preparing the batch (start noise, stacking), in the
        jump, and settling (re-noise, results)."""
        for req in {id(smp.request): smp.request for smp in batch}.values():
            tr = req.trace
            if tr is None:
                continue
            tr.setdefault("tick", t0)
            tr["ticks"] = tr.get("ticks", 0) + 1
            tr["batch_s"] = tr.get("batch_s", 0.0) + t1 - t0
            tr["jump_s"] = tr.get("jump_s", 0.0) + t2 - t1
            tr["settle_s"] = tr.get("settle_s", 0.0) + t3 - t2
