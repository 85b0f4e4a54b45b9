"""The step scheduler of `<name>_sampler` (serving/scheduler.py): in-process with the exported
jump, then behind the real tritonserver (one sampler instance, so every request meets the
same scheduler): mixed step counts in one batch, a request joining mid-loop, the max batch,
a bad request among good ones, shutdown with requests in flight.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fewstep.serving.protocol import Item, ModelInfo
from fewstep.serving.scheduler import Scheduler, ShuttingDown
from fewstep import sampling
from conftest import require_triton, running_server


def _runner(model_dir):
    from fewstep.export.runner import load_runner
    return load_runner(model_dir, threads=1)


def _alone(runner, seed, steps, gamma=None, label=None):
    """The whole-batch PyTorch-shared loop on one sample: what the image must be."""
    labels = None if label is None else np.array([label], np.int64)
    return sampling.sample(lambda x, t, s: runner(x, t, s, labels), runner.manifest["sampler"], steps, [seed],
                           runner.manifest["image"]["shape"], gamma=gamma)[0]


class Recorder:
    """A jump that records each call's batch (and can hold a call until released)."""

    def __init__(self, runner, fail_when=None):
        self.runner = runner
        self.batches = []
        self.fail_when = fail_when
        self.gate = None
        self.waiting = threading.Event()

    def __call__(self, x, t, s, labels=None):
        if self.gate is not None:
            self.waiting.set()
            self.gate.wait(30)
        self.batches.append((x.shape[0], t.copy(), s.copy()))
        if self.fail_when is not None and self.fail_when(x, t, s):
            raise RuntimeError("boom")
        return self.runner(x, t, s, labels)


class Collect:
    def __init__(self):
        self.results = {}
        self.order = []
        self.event = threading.Event()
        self.expected = 0

    def cb(self, key):
        def done(result):
            self.results[key] = result
            self.order.append(key)
            if len(self.results) == self.expected:
                self.event.set()
        self.expected += 1
        return done


def _hold(sched, info, rec):
    """Hold the scheduler in its first jump call (a 1-step request of its own) until rec.gate
    opens: whatever is submitted meanwhile joins the next tick together."""
    rec.gate = threading.Event()
    sched.submit(_items(info, [999], [1]), lambda result: None)
    assert rec.waiting.wait(30)


def _items(info, seeds, steps, gammas=None, labels=None):
    out = []
    for i, (seed, n) in enumerate(zip(seeds, steps)):
        g = sampling.check_request(info.spec, n, None if gammas is None else gammas[i])
        out.append(Item(seed, n, g, None if labels is None else labels[i]))
    return out


def test_mixed_steps_gammas_in_one_batch_equal_each_sample_alone(served_model_dirs):
    runner = _runner(served_model_dirs["tiny"])
    info = ModelInfo.from_manifest(runner.manifest)
    rec = Recorder(runner)
    sched = Scheduler(rec, info, max_batch=16)
    got = Collect()
    reqs = {"a": ([1, 2], [1, 8], [0.0, 0.5]), "b": ([3], [4], [0.3]), "c": ([4, 5, 6], [2, 1, 8], None)}
    _hold(sched, info, rec)  # so that all three requests meet in one batch
    for key, (seeds, steps, gammas) in reqs.items():
        sched.submit(_items(info, seeds, steps, gammas), got.cb(key))
    rec.gate.set()
    assert got.event.wait(60)
    sched.stop()
    for key, (seeds, steps, gammas) in reqs.items():
        for b, (seed, n) in enumerate(zip(seeds, steps)):
            ref = _alone(runner, seed, n, None if gammas is None else gammas[b])
            np.testing.assert_allclose(got.results[key][b], ref, atol=1e-5, rtol=0)
    # one call per tick for every sample in flight: 8 ticks for the longest, 6 samples in the
    # first (after the holding request's own tick)
    assert len(rec.batches) == 1 + 8 and rec.batches[1][0] == 6
    assert sched.image_steps == 1 + (1 + 8 + 4 + 2 + 1 + 8) and sched.calls == 1 + 8
    # per-sample s: that tick holds the 1-, 2-, 4- and 8-step grids' first steps together
    assert len(set(rec.batches[1][2].tolist())) > 1


def test_consistency_model_labels_and_renoise_per_sample(served_model_dirs):
    runner = _runner(served_model_dirs["toyc"])
    info = ModelInfo.from_manifest(runner.manifest)
    sched = Scheduler(runner, info, max_batch=8)
    got = Collect()
    items = _items(info, [5, 6, 7, 8], [3, 1, 2, 3], labels=[0, 1, 2, 3])
    sched.submit(items, got.cb("x"))
    assert got.event.wait(60)
    sched.stop()
    for b, it in enumerate(items):
        np.testing.assert_allclose(got.results["x"][b], _alone(runner, it.seed, it.steps, label=it.label), atol=1e-5)


def test_join_mid_loop_max_batch_oldest_first(served_model_dirs):
    runner = _runner(served_model_dirs["tiny"])
    info = ModelInfo.from_manifest(runner.manifest)
    rec = Recorder(runner)
    sched = Scheduler(rec, info, max_batch=4)
    got = Collect()
    _hold(sched, info, rec)
    sched.submit(_items(info, [10, 11, 12], [12, 12, 12]), got.cb("old"))
    sched.submit(_items(info, [13, 14, 15], [1, 1, 1]), got.cb("new"))  # only one fits beside "old"
    rec.gate.set()
    while len(rec.batches) < 3:
        time.sleep(0.001)
    sched.submit(_items(info, [16], [2]), got.cb("late"))  # joins a loop already running
    assert got.event.wait(60)
    sched.stop()
    sizes = [b for b, _, _ in rec.batches]
    assert max(sizes) <= 4 and sizes[1] == 4, sizes
    assert sched.calls == 1 + 12  # nobody waited for a loop of its own: the 12-step samples set the pace
    assert got.order.index("new") < got.order.index("old") and got.order.index("late") < got.order.index("old")
    for key, seeds, steps in (("old", [10, 11, 12], 12), ("new", [13, 14, 15], 1), ("late", [16], 2)):
        for b, seed in enumerate(seeds):
            np.testing.assert_allclose(got.results[key][b], _alone(runner, seed, steps), atol=1e-5)


def test_a_failing_jump_answers_its_batch_and_the_scheduler_goes_on(served_model_dirs):
    runner = _runner(served_model_dirs["tiny"])
    info = ModelInfo.from_manifest(runner.manifest)
    rec = Recorder(runner, fail_when=lambda x, t, s: x.shape[0] == 3)
    sched = Scheduler(rec, info, max_batch=8)
    got = Collect()
    _hold(sched, info, rec)
    sched.submit(_items(info, [1, 2], [2, 2]), got.cb("a"))
    sched.submit(_items(info, [3], [2]), got.cb("b"))
    rec.gate.set()
    assert got.event.wait(60)
    assert isinstance(got.results["a"], RuntimeError) and isinstance(got.results["b"], RuntimeError)
    after = Collect()
    sched.submit(_items(info, [4], [2]), after.cb("c"))
    assert after.event.wait(60)
    np.testing.assert_allclose(after.results["c"][0], _alone(runner, 4, 2), atol=1e-5)
    sched.stop()


def test_stop_finishes_what_is_in_flight_then_refuses(served_model_dirs):
    runner = _runner(served_model_dirs["tiny"])
    info = ModelInfo.from_manifest(runner.manifest)
    sched = Scheduler(runner, info, max_batch=2)
    got = Collect()
    sched.submit(_items(info, [1, 2, 3], [4, 4, 4]), got.cb("a"))
    sched.stop(timeout=30)
    assert got.event.is_set()
    np.testing.assert_allclose(got.results["a"][2], _alone(runner, 3, 4), atol=1e-5)
    late = Collect()
    sched.submit(_items(info, [1], [1]), late.cb("late"))
    assert isinstance(late.results["late"], ShuttingDown)


def test_one_step_requests_on_an_idle_scheduler_run_in_the_callers_thread(served_model_dirs):
    """run_here, as the sampler's execute() calls it first: 1-step requests meeting an idle
    scheduler are advanced with one jump call in the caller's thread and their results
    returned; anything longer, more than the max batch, or a scheduler with work queued or in
    flight gets None (and nothing is queued). The idle hook (the counters' flush) still runs,
    once, idle_after after the last tick, wherever it ran."""
    runner = _runner(served_model_dirs["tiny"])
    info = ModelInfo.from_manifest(runner.manifest)
    rec = Recorder(runner)
    idles = []
    sched = Scheduler(rec, info, max_batch=4, on_idle=lambda: idles.append(time.monotonic()), idle_after=0.2)
    time.sleep(0.1)
    assert idles == []  # nothing ran yet: nothing to flush

    def hook_ran(times):
        for _ in range(200):
            if len(idles) == times:
                return True
            time.sleep(0.01)
        return False

    got = sched.run_here([_items(info, [1, 2], [1, 1]), _items(info, [3], [1])])
    assert [b[0] for b in rec.batches] == [3] and (sched.calls, sched.image_steps) == (1, 3)
    for res, seeds in zip(got, ([1, 2], [3])):
        for b, seed in enumerate(seeds):
            np.testing.assert_allclose(res[b], _alone(runner, seed, 1), atol=1e-5)
    assert hook_ran(1)  # once, idle_after after the tick
    # back-to-back requests run here do not run the hook between them (it is a round trip
    # to the server in the sampler): once, idle_after after the last
    for seed in range(20, 25):
        assert sched.run_here([_items(info, [seed], [1])]) is not None
    assert len(idles) == 1 and sched.calls == 6
    assert hook_ran(2) and idles[1] - idles[0] >= 0.2
    # not here: a 2-step request, more images than the max batch
    assert sched.run_here([_items(info, [4], [2])]) is None
    assert sched.run_here([_items(info, [5, 6, 7, 8, 9], [1] * 5)]) is None
    assert sched.calls == 6 and not sched.has_work()  # nothing was queued
    # nor while the scheduler's thread has work: held in a jump, then queued behind it
    _hold(sched, info, rec)
    late = Collect()
    sched.submit(_items(info, [10], [1]), late.cb("late"))
    assert sched.run_here([_items(info, [11], [1])]) is None
    rec.gate.set()
    assert late.event.wait(30)
    np.testing.assert_allclose(late.results["late"][0], _alone(runner, 10, 1), atol=1e-5)
    # a failing jump: the exception is the request's result
    rec.fail_when = lambda x, t, s: True
    [err] = sched.run_here([_items(info, [12], [1])])
    assert isinstance(err, RuntimeError)
    sched.stop()
    assert sched.run_here([_items(info, [1], [1])]) is None  # stopped: the caller submits (and hears why)


# --- behind the real server -----------------------------------------------------------------------

pytest.importorskip("tritonclient.grpc", reason="serving tests need tritonclient[grpc] (the serve extra)")


@pytest.fixture(scope="module")
def one_scheduler(served_model_dirs, tmp_path_factory):
    """tiny and toyc with ONE sampler instance (the default jump: inline), so every request
    meets one scheduler and its counters tell what it did."""
    from fewstep.serving.repository import Options, write_repository

    require_triton()
    repo = tmp_path_factory.mktemp("sched") / "repo"
    written = write_repository(repo, [str(served_model_dirs["tiny"]), str(served_model_dirs["toyc"])],
                               Options(device="cpu", instances=1, threads=1))
    assert written[0]["plan"].jump == "inline" and written[0]["plan"].instances == 1
    with running_server(repo, written) as server:
        yield server


def _counters(server, model="tiny", settle=True):
    """The scheduler's counters once they stop moving (they are flushed 50 ms after it goes
    idle: two reads further apart than that agree only once it has)."""
    from fewstep.serving.bench import read_jump_counters

    last = None
    for _ in range(50):
        now = read_jump_counters(server.metrics_url, model)
        if now == last or not settle:
            return now
        last = now
        time.sleep(0.15)
    return last


def test_warm_before_ready(one_scheduler):
    from fewstep.serving.client import Client

    # the scheduler already ran a request of its own before Triton said ready
    c = _counters(one_scheduler)
    assert c is not None and c["calls"] >= 2 and c["image_steps"] >= 2
    with Client(one_scheduler.grpc_url, timeout=60) as client:
        client.ready()
        times = []
        for seed in range(11):  # the first request this server gets, then ten more
            t0 = time.perf_counter()
            client.generate("tiny", [seed], 2)
            times.append(time.perf_counter() - t0)
    # loose on a shared host: a cold ONNX Runtime session or PNG import would cost far more
    assert times[0] <= 3 * float(np.median(times[1:])) + 0.05, times


def test_mixed_step_counts_at_once_equal_each_served_alone(one_scheduler):
    from fewstep.serving.client import Client

    reqs = [([100 + i], [steps]) for i, steps in enumerate([1, 8, 2, 8, 4, 1, 3, 8])]
    with Client(one_scheduler.grpc_url, timeout=60) as c:
        alone = [c.generate("tiny", seeds, steps) for seeds, steps in reqs]
        before = _counters(one_scheduler)
        with ThreadPoolExecutor(len(reqs) + 1) as pool:
            # a 64-step request keeps the scheduler ticking while the mixed ones arrive (a few
            # ms apart from this client), so they all meet in its batches
            long = pool.submit(c.generate, "tiny", [99], 64)
            time.sleep(0.05)
            together = list(pool.map(lambda r: c.generate("tiny", *r), reqs))
            long.result()
        after = _counters(one_scheduler)
    for a, b in zip(alone, together):
        assert a.tobytes() == b.tobytes()
    calls = after["calls"] - before["calls"]
    image_steps = after["image_steps"] - before["image_steps"]
    assert image_steps == 64 + sum(s[0] for _, s in reqs)
    # every step count rode in the 64-step request's ticks (at most the longest, 8, beyond
    # them); grouping by step count would add a call per step of each group: >= 64 + 18
    assert calls <= 64 + 8, (calls, image_steps)


def test_a_request_joins_a_loop_in_flight(one_scheduler):
    from fewstep.serving.client import Client

    # 15 samples of 64 steps: ticks of a batch of 15 keep the loop busy well past the short
    # request's start, and the short sample fits beside them (max batch 16)
    long_seeds = list(range(7, 22))
    with Client(one_scheduler.grpc_url, timeout=60) as c:
        ref_long, ref_short = c.generate("tiny", long_seeds, 64), c.generate("tiny", [40], 1)
        before = _counters(one_scheduler)
        done = []
        with ThreadPoolExecutor(2) as pool:
            long = pool.submit(lambda: (c.generate("tiny", long_seeds, 64), done.append("long"))[0])
            time.sleep(0.05)
            short = pool.submit(lambda: (c.generate("tiny", [40], 1), done.append("short"))[0])
            assert long.result().tobytes() == ref_long.tobytes() and short.result().tobytes() == ref_short.tobytes()
        after = _counters(one_scheduler)
    assert done == ["short", "long"]
    # the 1-step sample rode in one of the 64-step samples' ticks: no call of its own
    assert after["calls"] - before["calls"] == 64 and after["image_steps"] - before["image_steps"] == 15 * 64 + 1


def test_max_batch_is_respected(one_scheduler):
    from fewstep.serving.client import Client

    with Client(one_scheduler.grpc_url, timeout=60) as c:
        before = _counters(one_scheduler)
        seeds = [list(range(200 + 16 * k, 216 + 16 * k)) for k in range(3)]
        with ThreadPoolExecutor(3) as pool:
            outs = list(pool.map(lambda s: c.generate("tiny", s, 2), seeds))
        after = _counters(one_scheduler)
        assert all(o.shape == (16, 28, 28, 1) for o in outs)
        assert outs[1][:1].tobytes() == c.generate("tiny", seeds[1][:1], 2).tobytes()
    calls = after["calls"] - before["calls"]
    assert after["image_steps"] - before["image_steps"] == 96
    assert calls >= 96 // 16, calls  # never more than the max batch (16) per call


def test_a_bad_request_among_good_ones(one_scheduler):
    from fewstep.serving.client import Client, ServingError

    good = [([300 + i], [s]) for i, s in enumerate([1, 4, 2, 8])]
    with Client(one_scheduler.grpc_url, timeout=60) as c:
        alone = [c.generate("tiny", *r) for r in good]

        def call(r):
            try:
                return c.generate("tiny", *r)
            except ServingError as e:
                return e

        bad = [([1], [0]), ([2], [65]), ([3], [2], [1])]  # steps out of range, a label for an unconditional model
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(call, good[:2] + bad + good[2:]))
    for o, a in zip(outs[:2] + outs[5:], alone):
        assert not isinstance(o, Exception) and o.tobytes() == a.tobytes()
    for e, field in zip(outs[2:5], ("steps", "steps", "class_label")):
        assert isinstance(e, ServingError) and e.code == "INVALID_ARGUMENT" and field in e.message, e


def test_shutdown_with_requests_in_flight(served_model_dirs, tmp_path):
    from fewstep.serving.client import Client, ServingError
    from fewstep.serving.launcher import Server, process_group_members
    from fewstep.serving.repository import Options, write_repository

    repo = tmp_path / "repo"
    written = write_repository(repo, [str(served_model_dirs["tiny"])], Options(device="cpu", instances=1, threads=1))
    server = Server(repo, grpc_port=0, http_port=0, metrics_port=0, models=written[0]["models"],
                    log_file=tmp_path / "tritonserver.log")
    server.start(timeout=180)
    url, pgid = server.grpc_url, server.proc.pid
    with Client(url, timeout=60) as c:
        ref = c.generate("tiny", [1, 2], 64)

    def call(k):
        with Client(url, timeout=60) as cc:
            try:
                return cc.generate("tiny", [1, 2], 64)
            except ServingError as e:
                return e

    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(call, k) for k in range(4)]
            time.sleep(0.3)  # in flight: 64 steps take longer than this
            t0 = time.monotonic()
            rc = server.stop(timeout=30)
            outs = [f.result(timeout=60) for f in futures]
    finally:
        server.stop()
    assert rc == 0 and time.monotonic() - t0 < 30
    assert process_group_members(pgid) == []
    # every request ended: finished with the right images, or told the server went away
    for o in outs:
        if isinstance(o, ServingError):
            assert o.code in ("UNAVAILABLE", "CANCELLED", "INTERNAL"), o
        else:
            assert o.tobytes() == ref.tobytes()
    assert any(not isinstance(o, ServingError) for o in outs), outs


# --- defaults and the GPU jump's padding (no server) --------------------------------------------------

def test_serving_plan_defaults():
    from fewstep.serving.repository import Options, serving_plan

    cpu2 = serving_plan(Options(), "KIND_CPU", cores=2)
    assert (cpu2.jump, cpu2.instances, cpu2.threads, cpu2.jump_instances, cpu2.sampler_kind) == \
        ("inline", 2, 1, 1, "KIND_CPU")
    big = serving_plan(Options(), "KIND_CPU", cores=16)
    assert (big.instances, big.threads) == (8, 2)  # instances x threads = cores
    assert serving_plan(Options(threads=1), "KIND_CPU", cores=16).instances == 16
    assert (serving_plan(Options(threads=4), "KIND_CPU", cores=16).instances,
            serving_plan(Options(instances=2), "KIND_CPU", cores=16).threads) == (4, 8)
    gpu = serving_plan(Options(), "KIND_GPU", cores=16)
    assert (gpu.jump, gpu.instances, gpu.sampler_kind) == ("inline", 1, "KIND_GPU")
    bls = serving_plan(Options(jump="bls", instances=3), "KIND_GPU", cores=2)
    assert (bls.instances, bls.jump_instances, bls.sampler_kind) == (3, 3, "KIND_CPU")
    assert serving_plan(Options(instances=2, sampler_instances=1), "KIND_CPU", cores=4).instances == 1


def test_gpu_jump_pads_to_power_of_two_buckets(served_model_dirs, monkeypatch):
    import sys
    import types

    # common.py imports the Triton stub's module at the top; LocalJump itself does not use it
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    from fewstep.serving.models.common import LocalJump, batch_buckets

    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64] and batch_buckets(12) == [1, 2, 4, 8, 12]
    jump = LocalJump(served_model_dirs["toyc"], threads=1)  # CPU: no padding
    assert jump.buckets is None
    calls = []
    inner = jump.runner
    jump.runner = lambda x, t, s, labels=None: (calls.append(x.shape[0]), inner(x, t, s, labels))[1]
    jump.buckets = batch_buckets(16)  # as on a GPU
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 2)).astype(np.float32)
    t, s = np.full(5, 0.8, np.float32), np.linspace(0.1, 0.5, 5).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 0], np.int64)
    got = jump(x, t, s, labels)
    assert calls == [8] and got.shape == (5, 2)
    np.testing.assert_allclose(got, inner(x, t, s, labels), atol=1e-6)
    info = ModelInfo.from_manifest(inner.manifest)
    calls.clear()
    assert jump.warm(info) == 5 and calls == [1, 2, 4, 8, 16]


def test_trace_stamps_add_up_to_the_request():
    """serving.trace: the scheduler's tick timings of a traced request and the stage table
    made of them (the stages add up to the request's time in the stub; outliers trimmed)."""
    from fewstep.serving.trace import STAGES, TOTAL, stage_means

    info = ModelInfo("m", (2,), 0, sampling.flow_spec(), max_batch=4)
    sched = Scheduler(lambda x, t, s, labels: x * 0.5, info, max_batch=4, trace=True)
    trace = {"exec": time.perf_counter(), "queued": time.perf_counter()}
    got = Collect()
    sched.submit(_items(info, [1, 2], [3, 3]), got.cb("a"), trace)
    assert got.event.wait(30)
    sched.stop()
    assert trace["ticks"] == 3 and trace["tick"] >= trace["queued"]
    assert all(trace[k] >= 0 for k in ("batch_s", "jump_s", "settle_s"))
    records = []
    for i in range(20):  # made-up stamps: 1 ms in each stage, one request 100x slower
        r = {"exec": 0.0, "queued": 0.001, "tick": 0.002, "batch_s": 0.001, "jump_s": 0.001, "settle_s": 0.001,
             "done": 0.006, "answer": 0.007, "built": 0.008, "sent": 0.009}
        if i == 7:
            r = {k: v * 100 for k, v in r.items()}
        records.append(r)
    means = stage_means(records)
    assert means["requests"] == 19 and means[TOTAL] == pytest.approx(9.0)
    assert sum(means[name] for name, _ in STAGES) == pytest.approx(means[TOTAL])
    assert all(means[name] == pytest.approx(1.0) for name, _ in STAGES)
