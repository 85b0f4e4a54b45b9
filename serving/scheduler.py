"""Step-level batching: one thread advances every sample in flight with one jump call per tick.

`<name>_sampler` runs one `Scheduler` per model instance. A request's images join as
samples; on each tick the scheduler takes the samples in flight, whatever their step
count, step index, gamma or label (oldest first, at most `max_batch`), and advances all
of them with ONE call of jump(x, t, s, labels), t and s per sample. After the jump each
sample settles on its own: `fewstep.sampling.settle` re-noises it from its own seed, so
an image never depends on what shared its batch. A request is answered as soon as its
last image is done; requests that arrive meanwhile join at the next tick.

The step math is `fewstep.sampling`'s (`step_plan`, `start_noise`, `settle`), the same
as the PyTorch evaluation loop; this module only keeps per-sample progress through it.
Free of Triton, so tests drive it with any jump.
"""
from __future__ import annotations

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
    scheduler's thread, with float32 samples [len(items), *shape] or an exception.

    jump(x, t, s, labels) -> x_s: numpy float32 [B, *shape], t and s float32 [B], labels int64
    [B] or None. on_idle() is called once the scheduler has had no work for `idle_after`
    seconds, and at most every `idle_every` seconds while busy (the sampler flushes its
    counters there: two round trips to the server, kept off the path of back-to-back requests).
    """

    def __init__(self, jump, info, max_batch: int, on_idle=None, idle_every: float = 1.0, idle_after: float = 0.01,
                 name: str = "scheduler"):
        self.jump = jump
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
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # --- callers ----------------------------------------------------------------------------
    def submit(self, items, done) -> None:
        """Queue one request's items (serving.protocol.Item, already validated)."""
        req = _Request(done, np.empty((len(items),) + tuple(self.info.shape), np.float32), len(items))
        samples = [_Sample(req, k, it.seed, it.label, self._plan(it.steps, it.gamma)) for k, it in enumerate(items)]
        with self._cond:
            if self._stopping:
                stopped = True
            else:
                stopped = False
                self._pending.extend(samples)
                self._cond.notify()
        if stopped:
            req.answer(ShuttingDown("the sampler is shutting down"))

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is in flight and queued (up to `timeout` s), then stop; whatever is
        left is answered with ShuttingDown."""
        with self._cond:
            self._stopping = True
            self._deadline = time.monotonic() + timeout
            self._cond.notify()
        self._thread.join(timeout + 5.0)

    # --- the thread ------------------------------------------------------------------------------
    def _plan(self, steps: int, gamma: float) -> tuple:
        key = (steps, gamma)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = sampling.step_plan(self.info.spec, steps, gamma)
        return plan

    def _loop(self) -> None:
        last_idle = time.monotonic()
        while True:
            with self._cond:
                if not self._ready() and not self._cond.wait_for(self._ready, self.idle_after):
                    self._cond.release()
                    try:  # outside the lock: submit() never waits for it
                        self._idle()
                    finally:
                        self._cond.acquire()
                    last_idle = time.monotonic()
                    self._cond.wait_for(self._ready)
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
            try:
                self._tick()
            except Exception as e:  # noqa: BLE001 - a bug must not leave requests waiting forever
                for smp in self._active:
                    smp.request.answer(e)
                self._active = []
            if self.on_idle is not None and time.monotonic() - last_idle > self.idle_every:
                self._idle()
                last_idle = time.monotonic()
        err = ShuttingDown("the sampler shut down before this request was finished")
        for smp in left:
            smp.request.answer(err)
        self._idle()

    def _ready(self) -> bool:
        """Something to do (called with the lock held)."""
        return bool(self._pending or self._active or self._stopping)

    def has_work(self) -> bool:
        """Whether samples are queued or in flight (a racy hint for callers: the sampler
        answers a request in the scheduler's thread when nothing else waits for it)."""
        return bool(self._pending or self._active)

    def _idle(self) -> None:
        if self.on_idle is not None:
            try:
                self.on_idle()
            except Exception:  # noqa: BLE001 - counters must never stop the sampler
                pass

    def _tick(self) -> None:
        spec, shape = self.info.spec, self.info.shape
        batch = [smp for smp in self._active if not smp.request.answered]
        for smp in batch:
            if smp.x is None:  # joins now: its start noise
                smp.x = sampling.start_noise(spec, smp.plan, [smp.seed], shape)[0]
        if not batch:
            self._active = []
            return
        x = np.stack([smp.x for smp in batch])
        t = np.array([smp.plan[smp.i].t for smp in batch], np.float32)
        s = np.array([smp.plan[smp.i].s for smp in batch], np.float32)
        labels = None if batch[0].label is None else np.array([smp.label for smp in batch], np.int64)
        try:
            out = np.asarray(self.jump(x, t, s, labels), dtype=np.float32)
        except Exception as e:  # noqa: BLE001 - every request in this batch hears of it
            for smp in batch:
                smp.request.answer(e)
            self._active = []
            return
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
        # answered after the samples in flight are updated, so has_work() is true to them
        self._active = still
        for req in finished:
            req.answer(req.results)

