"""A fault is not the user's problem: clients retry, `fewstep serve` restarts after every death,
and SIGTERM drains. On the real tritonserver, through `fewstep serve` and `fewstep generate`.

The done-when checks of the restart policy (docs/serving.md, "One restart policy"):
`fewstep generate` sent at the moment tritonserver is SIGKILLed, or while the sampler's stub
is stopped, returns the same image within its default deadline; SIGTERM loses no request in
flight. Plus the client's retry rules and the hang probe alone.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import require_triton, running_server

pytest.importorskip("tritonclient.grpc", reason="serving tests need tritonclient[grpc]")

from fewstep.serving import soak  # noqa: E402  (after the skip: it imports the client)

ROOT = Path(__file__).resolve().parents[1]
FEWSTEP = [sys.executable, "-m", "fewstep.cli"]


def _generate(url: str, out: Path, *extra) -> tuple[subprocess.CompletedProcess, float]:
    """`fewstep generate` with its default deadline; (result, seconds)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.monotonic()
    r = subprocess.run(FEWSTEP + ["generate", "--url", url, "--model", "tiny", "--steps", "4", "--seed", "7",
                                  "--num", "3", "--out", str(out), *extra],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    return r, time.monotonic() - t0


@pytest.fixture(scope="module")
def serve(served_model_dirs, tmp_path_factory):
    """`fewstep serve` (fewstep.serving.soak's Serve) on the tiny model, one instance of each model."""
    require_triton()
    s = soak.Serve(str(served_model_dirs["tiny"]), tmp_path_factory.mktemp("faults"), ["--instances", "1"])
    try:
        s.wait_ready(300)
        yield s
    finally:
        s.stop()


def _wait_line(serve, text: str, since: float, timeout: float = 60) -> float:
    """When serve printed a line containing `text` (after `since`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t, line in serve.lines_since(since):
            if text in line:
                return t
        time.sleep(0.1)
    raise AssertionError(f"no '{text}' from serve within {timeout} s:\n" + "\n".join(serve.lines[-20:]))


def _png_pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


def test_generate_rides_through_a_killed_tritonserver(serve, tmp_path):
    """SIGKILL of tritonserver itself (what the OOM killer does): serve restarts it, and a
    `fewstep generate` sent at that moment returns the same image within its default deadline."""
    ref, _ = _generate(serve.url, tmp_path / "ref.png")
    assert ref.returncode == 0, ref.stderr
    t0 = time.monotonic()
    assert serve.inject("server") is not None
    r, seconds = _generate(serve.url, tmp_path / "after.png")
    assert r.returncode == 0, r.stderr
    assert seconds < 120  # generate's default deadline
    np.testing.assert_array_equal(_png_pixels(tmp_path / "after.png"), _png_pixels(tmp_path / "ref.png"))
    assert "retried" in r.stderr, r.stderr  # it did meet the restart
    noticed = _wait_line(serve, "was killed by SIGKILL; restarting tritonserver", t0)
    back = _wait_line(serve, "ready again", t0)
    print(f"tritonserver SIGKILL: noticed {noticed - t0:.2f} s, ready again {back - t0:.1f} s after the kill; "
          f"generate took {seconds:.1f} s ({r.stderr.strip().splitlines()[-1]})")


def test_generate_rides_through_a_stopped_sampler(serve, tmp_path):
    """SIGSTOP of the sampler's stub (a stub that hangs alive): noticed, restarted, and a
    `fewstep generate` sent meanwhile returns the same image within its default deadline."""
    ref, _ = _generate(serve.url, tmp_path / "ref.png")
    assert ref.returncode == 0, ref.stderr
    t0 = time.monotonic()
    assert serve.inject("stop") == "tiny_sampler_0_0"
    r, seconds = _generate(serve.url, tmp_path / "after.png")
    assert r.returncode == 0, r.stderr
    assert seconds < 120
    np.testing.assert_array_equal(_png_pixels(tmp_path / "after.png"), _png_pixels(tmp_path / "ref.png"))
    noticed = _wait_line(serve, "is stopped (SIGSTOP)", t0)
    back = _wait_line(serve, "ready again", t0)
    print(f"sampler SIGSTOP: noticed {noticed - t0:.2f} s, ready again {back - t0:.1f} s after the stop; "
          f"generate took {seconds:.1f} s")


def test_page_says_a_request_was_retried(serve):
    """The page's backend (demo/app.py) rides through a restart with the page's default deadline,
    and what the page shows says that the request was retried."""
    from fewstep.demo.app import Backend, retry_note

    backend = Backend(serve.url)
    try:
        ref, _ = backend.generate("tiny", [11, 12], 2)
        assert retry_note([]) == ""
        assert serve.inject("server") is not None
        retried: list = []
        images, seconds = backend.generate("tiny", [11, 12], 2, retried=retried)
    finally:
        backend.reset()
    np.testing.assert_array_equal(images, ref)
    assert retried and {e.code for e in retried} == {"UNAVAILABLE"}
    note = retry_note(retried)
    assert note.startswith(f"↻ retried {len(retried)} time") and "UNAVAILABLE" in note, note
    assert seconds < backend.timeout
    _wait_line(serve, "ready again", time.monotonic() - seconds - 1)


def test_sigterm_loses_no_request_in_flight(serve):
    """SIGTERM to `fewstep serve` with requests in flight: every one is answered, with the right
    images; a request sent after the signal is refused (UNAVAILABLE); serve exits 0."""
    from fewstep.serving.client import NO_RETRY, Client, ServingError

    requests = [(list(range(16 * k, 16 * k + 16)), 24) for k in range(8)]
    with Client(serve.url, timeout=120) as client:
        refs = [client.generate("tiny", seeds, steps) for seeds, steps in requests[:3]]
        results: dict = {}
        started = threading.Barrier(len(requests) + 1)

        retried: dict = {}

        def send(k, seeds, steps):
            started.wait()
            t0 = time.monotonic()
            retried[k] = []
            try:
                results[k] = (client.generate("tiny", seeds, steps, retried=retried[k]), t0, time.monotonic())
            except ServingError as e:
                results[k] = (e, t0, time.monotonic())

        threads = [threading.Thread(target=send, args=(k, *r)) for k, r in enumerate(requests)]
        for t in threads:
            t.start()
        started.wait()
        time.sleep(0.5)  # every request is sent and in flight (8 x 16 images x 24 steps take seconds)
        signalled = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with Client(serve.url, timeout=10, retry=NO_RETRY) as late:
            with pytest.raises(ServingError) as refused:
                late.generate("tiny", [0], 1)
        for t in threads:
            t.join(120)
    assert serve.proc.wait(60) == 0
    assert refused.value.code == "UNAVAILABLE", refused.value
    in_flight = [k for k, (_, t0, t1) in results.items() if t0 < signalled < t1]
    assert len(in_flight) >= len(requests) // 2, "the requests were not in flight at the signal"
    errors = {k: r[0] for k, r in results.items() if isinstance(r[0], Exception)}
    assert not errors, (errors, {k: r[:2] for k, r in retried.items() if r}, serve.lines[-10:])
    assert not any(retried.values()), retried
    for k, ref in enumerate(refs):
        np.testing.assert_array_equal(results[k][0], ref)
    last = max(t1 for _, _, t1 in results.values())
    assert last - signalled < 30  # within serve's grace period (--grace, default 30 s)
    print(f"SIGTERM: {len(in_flight)} of {len(requests)} requests in flight, all answered, the last "
          f"{last - signalled:.1f} s after the signal")


def test_hang_probe_alone_restarts_a_stopped_stub(served_model_dirs, tmp_path):
    """The probe by itself (the stopped-state check switched off): a sampler stub that does not
    answer misses two probes and the server is restarted; then it answers the same images."""
    from fewstep.serving.client import Client
    from fewstep.serving.health import Watchdog, find_stubs
    from fewstep.serving.repository import Options, write_repository

    require_triton()
    repo = tmp_path / "repo"
    written = write_repository(repo, [str(served_model_dirs["tiny"])], Options(device="cpu", threads=1, instances=1))
    with running_server(repo, written) as server:
        lines: list[str] = []
        watchdog = Watchdog(server, log=lines.append, stopped_s=float("inf"), probe_interval_s=0.5,
                            probe_deadline_s=1.0)
        done = threading.Event()
        watcher = threading.Thread(target=watchdog.run, args=(done.is_set,), daemon=True)
        watcher.start()
        try:
            with Client(server.grpc_url, timeout=60) as client:
                ref = client.generate("tiny", [5, 6], 3)
                time.sleep(2)
                assert not watchdog.recoveries, lines  # healthy: the probe passes
                stub = next(s for s in find_stubs(server.proc.pid) if s.model == "tiny_sampler")
                t0 = time.monotonic()
                os.kill(stub.pid, signal.SIGSTOP)
                while not (watchdog.recoveries and watchdog.recoveries[-1].seconds):
                    assert time.monotonic() - t0 < 60, lines
                    time.sleep(0.1)
                rec = watchdog.recoveries[-1]
                assert rec.kind == "probe" and "tiny" in rec.fault, rec
                retried: list = []
                np.testing.assert_array_equal(client.generate("tiny", [5, 6], 3, retried=retried), ref)
                print(f"probe: restart {time.monotonic() - t0:.1f} s after SIGSTOP; {rec.fault}; "
                      f"{watchdog.prober.sent} probes sent")
        finally:
            done.set()
            watcher.join(60)


# --- the client's retry rules ------------------------------------------------------------------

def _core_call(errors: list, timeout: float, retry=None):
    """Run serving.client's retry loop over a call that raises `errors` in turn, then answers."""
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    from fewstep.serving.client import _Core, _run

    core = _Core(grpc, "127.0.0.1:1", timeout, False, None, None, retry)
    attempts = []

    def fn(client_timeout):
        attempts.append(client_timeout)
        if len(attempts) <= len(errors):
            code, msg = errors[len(attempts) - 1]
            raise InferenceServerException(msg, status=f"StatusCode.{code}")
        return "answer"

    retried: list = []
    try:
        return _run(core.call(fn, retried=retried)), attempts, retried
    finally:
        core.client.close()


def test_retry_rules():
    from fewstep.serving.client import NO_RETRY, RetryPolicy, ServingError

    out, attempts, retried = _core_call([("UNAVAILABLE", "failed to connect"), ("DEADLINE_EXCEEDED", "late"),
                                         ("INTERNAL", "Stub process 'x' is not healthy.")], timeout=30)
    assert out == "answer" and len(attempts) == 4 and [e.code for e in retried] == [
        "UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL"]
    assert attempts[0] <= 30 and all(a < b for b, a in zip(attempts, attempts[1:]))  # what is left of the deadline
    for code in ("INVALID_ARGUMENT", "NOT_FOUND"):  # never retried
        with pytest.raises(ServingError) as e:
            _core_call([(code, "steps: must be")], timeout=30)
        assert e.value.code == code
    with pytest.raises(ServingError):
        _core_call([("INTERNAL", "a bug")], timeout=30)
    # the deadline bounds the retries: a server that stays away is given up on in time
    t0 = time.monotonic()
    with pytest.raises(ServingError) as e:
        _core_call([("UNAVAILABLE", "down")] * 1000, timeout=1.5)
    assert e.value.code == "UNAVAILABLE" and "deadline of 1.5 s spent" in e.value.message
    assert time.monotonic() - t0 < 2.5
    with pytest.raises(ServingError):
        _core_call([("UNAVAILABLE", "down")], timeout=30, retry=NO_RETRY)
    # a per-attempt deadline shorter than the call's
    _, attempts, _ = _core_call([("DEADLINE_EXCEEDED", "late")], timeout=30, retry=RetryPolicy(attempt_s=2.0))
    assert attempts == [2.0, 2.0]
    waits = [RetryPolicy().delay(n, np.random.default_rng(n)) for n in range(8)]
    assert all(0.05 <= w <= 1.0 for w in waits) and waits[-1] >= 0.5


# --- the soak (fewstep.serving.soak), short: what CI runs ---------------------------------------------

def test_small_soak_one_fault_of_each_kind(served_model_dirs):
    """A few hundred mixed requests (5% bad) through `fewstep serve --jump bls` and the project's
    client, with one fault of each kind in turn: the sampler's stub killed, the jump's stub
    killed, tritonserver killed, the sampler's stub stopped. No error reaches the client, no image
    is wrong, every bad request is refused, and each fault is recovered from by itself."""
    require_triton()
    args = soak.parse_args(["--model", str(served_model_dirs["tiny"]), "--requests", "300", "--concurrency", "16",
                            "--seeds", "4", "--max-seconds", "240", "--rng", "1"])
    report = soak.run(args)
    print(soak.markdown_table(report))
    assert report["requests"] == 300 and report["not_sent"] == 0, report
    assert report["images_checked"] > 300 and report["wrong_images"] == 0, report
    assert report["bad_sent"] > 0 and report["bad_not_refused"] == 0, report
    assert report["client_visible_errors"] == 0, (report["codes"], report["messages"])
    assert [f["fault"] for f in report["faults"]] == ["sampler", "jump", "server", "stop"], report["faults"]
    for f in report["faults"]:
        assert f["hit"] is not None and f["recover_s"] is not None and f["recover_s"] < 60, f
    assert report["retries"] > 0  # the faults did reach the client, which rode through them
    assert report["serve_exit_code"] == 0


def test_bench_reports_retries_per_cell():
    """`fewstep bench` counts the client's retries of each cell: bench.json's `retries`, the
    console table's `retry` column."""
    from fewstep.serving.bench_measure import Cell
    from fewstep.serving.bench_report import console_table
    from fewstep.serving.client import ServingError

    cell = Cell("triton", 2, 4, 1, latencies_ms=[1.0, 2.0, 30.0])
    cell.retried.extend([ServingError("UNAVAILABLE", "failed to connect")] * 3)
    row = cell.row()
    assert row["retries"] == 3 and row["errors"] == 0
    report = {"results": [row], "model": "tiny", "summary": {},
              "machine": {"load_avg_start": [1.0], "load_avg_end": [1.0], "cpus": 2}}
    text = console_table(report)
    head, line = text.splitlines()[:2]
    assert head.split()[5] == "retry" and line.split()[5] == "3"
    assert "RETRIES: 3 retries" in text
