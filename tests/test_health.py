"""A dead Python backend stub is noticed and recovered; `<name>_jump` validates its inputs.

On the real tritonserver. The stub tests start their own server (they kill its stubs);
the jump tests use the session server of tests/conftest.py.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter

import numpy as np
import pytest
from conftest import require_triton, running_server

tritonclient_grpc = pytest.importorskip("tritonclient.grpc", reason="serving tests need tritonclient[grpc]")


def _ready(client) -> bool:
    try:
        return bool(client.is_server_ready(client_timeout=1.0))
    except Exception:  # noqa: BLE001 - a server that is down is not ready
        return False


@pytest.fixture
def own_server(served_model_dirs, tmp_path):
    from fewstep.serving.repository import Options, write_repository

    require_triton()
    repo = tmp_path / "repo"
    written = write_repository(repo, [str(served_model_dirs["tiny"])], Options(device="cpu", threads=1, instances=1))
    with running_server(repo, written) as server:
        yield server


def test_find_stubs_names_every_python_model(own_server):
    from fewstep.serving.health import find_stubs

    stubs = find_stubs(own_server.proc.pid)
    assert sorted(s.model for s in stubs) == ["tiny_jump", "tiny_sampler", "tiny_stream"]
    assert {s.instance for s in stubs} == {"tiny_jump_0_0", "tiny_sampler_0_0", "tiny_stream_0_0"}


def test_dead_stub_is_noticed_and_recovered(own_server):
    """kill -9 of the sampler's stub, then the stream's, under load: requests in flight fail
    fast (no hang until the deadline), readiness says not ready at once, the server comes
    back by itself with a log line, and then answers with the same images. (The client does
    not retry here: what is tested is the server's side; tests/test_faults.py has the retries.)"""
    from fewstep.serving.client import NO_RETRY, Client, ServingError
    from fewstep.serving.health import Watchdog, find_stubs

    server = own_server
    lines: list[str] = []
    watchdog = Watchdog(server, log=lines.append)
    done = threading.Event()
    watcher = threading.Thread(target=watchdog.run, args=(done.is_set,), daemon=True)
    watcher.start()
    probe = tritonclient_grpc.InferenceServerClient(server.grpc_url)
    seeds = [3, 1, 4, 1]
    try:
        with Client(server.grpc_url, timeout=60, retry=NO_RETRY) as client:
            ref = client.generate("tiny", seeds, 4)
            for k, model in enumerate(("tiny_sampler", "tiny_stream"), start=1):
                calls = []  # (start, end, outcome) of every request of the load
                sending = threading.Event()
                sending.set()

                def load():
                    while sending.is_set():
                        t0 = time.monotonic()
                        try:
                            client.generate("tiny", list(range(16)), 8)
                            outcome = "OK"
                        except ServingError as e:
                            outcome = e.code
                        calls.append((t0, time.monotonic(), outcome))

                workers = [threading.Thread(target=load, daemon=True) for _ in range(6)]
                for w in workers:
                    w.start()
                time.sleep(1.0)
                stub = next(s for s in find_stubs(server.proc.pid) if s.model == model)
                sending.clear()
                killed = time.monotonic()
                os.kill(stub.pid, signal.SIGKILL)
                # readiness tells the truth within a few seconds
                while _ready(probe):
                    assert time.monotonic() - killed < 5, f"{model}: still ready 5 s after its stub died"
                    time.sleep(0.05)
                not_ready_s = time.monotonic() - killed
                # every request in flight at the kill ends fast, with an error status (not the deadline)
                for w in workers:
                    w.join(30)
                    assert not w.is_alive()
                inflight = [c for c in calls if c[0] < killed < c[1]]
                assert inflight, "no request was in flight at the kill"
                for t0, t1, outcome in inflight:
                    assert t1 - killed < 10, f"a request in flight hung {t1 - killed:.1f} s after the kill"
                    assert outcome in ("OK", "UNAVAILABLE", "INTERNAL"), outcome
                assert any(c[2] != "OK" for c in inflight)
                # back by itself, with the same images
                while not (_ready(probe) and len(watchdog.recoveries) == k and watchdog.recoveries[-1].seconds):
                    assert time.monotonic() - killed < 90, f"not recovered 90 s after the {model} stub died: {lines}"
                    time.sleep(0.1)
                back_s = time.monotonic() - killed
                np.testing.assert_array_equal(client.generate("tiny", seeds, 4), ref)
                print(f"{model}: not ready {not_ready_s:.2f} s after the kill; {len(inflight)} requests in flight, "
                      f"ended within {max(c[1] for c in inflight) - killed:.2f} s "
                      f"({Counter(c[2] for c in inflight)}); ready again after {back_s:.1f} s "
                      f"(restart {watchdog.recoveries[-1].seconds:.1f} s)")
                assert any(f"stub of {model}" in line and "died" in line for line in lines), lines
                assert sum("restarted" in line for line in lines) == k, lines
                assert stub.pid not in {s.pid for s in find_stubs(server.proc.pid)}
    finally:
        done.set()
        watcher.join(60)
        probe.close()


def test_dead_standalone_jump_is_reloaded_alone(own_server):
    """With the jump inline, `tiny_jump` serves only its direct callers: its stub's death reloads
    that model alone (model control); the ensemble's requests all succeed meanwhile, the server
    is not restarted, and the jump answers the same values again."""
    from fewstep.serving.client import NO_RETRY, Client, ServingError
    from fewstep.serving.health import Watchdog, find_stubs, standalone_jumps
    from fewstep.serving.prober import Prober

    server = own_server
    assert standalone_jumps(server) == {"tiny_jump"}
    lines: list[str] = []
    watchdog = Watchdog(server, log=lines.append)
    done = threading.Event()
    watcher = threading.Thread(target=watchdog.run, args=(done.is_set,), daemon=True)
    watcher.start()
    jump_inputs = Prober(server.new_grpc_client, server.repo, ["tiny"])._jump_inputs
    direct = server.new_grpc_client()
    server_pid = server.proc.pid
    try:
        before = direct.infer("tiny_jump", jump_inputs("tiny_jump"), client_timeout=30).as_numpy("x_s")
        with Client(server.grpc_url, timeout=60, retry=NO_RETRY) as client:
            outcomes = []
            sending = threading.Event()
            sending.set()

            def load():
                while sending.is_set():
                    try:
                        client.generate("tiny", list(range(8)), 4)
                        outcomes.append("OK")
                    except ServingError as e:
                        outcomes.append(e.code)

            workers = [threading.Thread(target=load, daemon=True) for _ in range(3)]
            for w in workers:
                w.start()
            time.sleep(1.0)
            stub = next(s for s in find_stubs(server_pid) if s.model == "tiny_jump")
            killed = time.monotonic()
            os.kill(stub.pid, signal.SIGKILL)
            while not (watchdog.recoveries and watchdog.recoveries[-1].seconds):
                assert time.monotonic() - killed < 60, lines
                time.sleep(0.1)
            time.sleep(1.0)
            sending.clear()
            for w in workers:
                w.join(60)
        rec = watchdog.recoveries[-1]
        assert rec.kind == "stub died, reloaded", (rec, lines)
        assert any("reloading tiny_jump only" in line for line in lines), lines
        assert not any("restarting tritonserver" in line for line in lines), lines
        assert server.proc.pid == server_pid  # no restart
        assert outcomes and set(outcomes) == {"OK"}, outcomes  # the ensemble never noticed
        after = direct.infer("tiny_jump", jump_inputs("tiny_jump"), client_timeout=30).as_numpy("x_s")
        np.testing.assert_array_equal(after, before)
        print(f"tiny_jump reloaded alone {rec.seconds:.1f} s after its stub's death was noticed; "
              f"{len(outcomes)} ensemble requests meanwhile, all OK")
    finally:
        done.set()
        watcher.join(60)
        direct.close()


def test_crash_loop_gives_up(own_server):
    """More restarts than allowed within the window: check() says so (serve exits 1), whatever
    the fault: a dead stub, or tritonserver itself dead (the same policy for both)."""
    from fewstep.serving.health import Recovery, Watchdog, find_stubs

    lines: list[str] = []
    watchdog = Watchdog(own_server, log=lines.append, max_restarts=1, window_s=600, probe_interval_s=0)
    watchdog.recoveries.append(Recovery(dead=[], detected_at=time.time(), seconds=1.0))
    assert watchdog.check()  # all alive
    stub = find_stubs(own_server.proc.pid)[0]
    os.kill(stub.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while not watchdog.dead():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not watchdog.check()
    assert "giving up" in lines[-1]
    own_server.proc.kill()
    own_server.proc.wait(10)
    assert watchdog.dead() == []  # no stub to blame: the server itself is the fault
    assert not watchdog.check()
    assert "was killed by SIGKILL" in lines[-1] and "giving up" in lines[-1], lines[-1]


# --- <name>_jump validates like the ensemble -------------------------------------------------

def _jump(url, model, x, t, s, labels=None):
    from fewstep.serving.client import _wrap
    from tritonclient.utils import InferenceServerException

    inputs = []
    for name, arr, dtype in (("x", x, "FP32"), ("t", t, "FP32"), ("s", s, "FP32"), ("class_label", labels, "INT64")):
        if arr is None:
            continue
        inp = tritonclient_grpc.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    client = tritonclient_grpc.InferenceServerClient(url)
    try:
        return client.infer(model, inputs, client_timeout=60).as_numpy("x_s")
    except InferenceServerException as e:
        raise _wrap(e) from None
    finally:
        client.close()


def test_jump_refuses_bad_inputs(triton_stack):
    from fewstep.serving.client import ServingError

    url = triton_stack.url
    x = np.zeros((2, 1, 28, 28), np.float32)
    t = np.full((2, 1), 1.0, np.float32)
    s = np.full((2, 1), 0.5, np.float32)
    good = _jump(url, "tiny_jump", x, t, s)
    assert good.shape == x.shape and np.isfinite(good).all()
    bad_x = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "huge": 1e38}
    for what, v in bad_x.items():
        xb = x.copy()
        xb[1, 0, 5, 7] = v
        with pytest.raises(ServingError) as e:
            _jump(url, "tiny_jump", xb, t, s)
        assert e.value.code == "INVALID_ARGUMENT", what
        assert e.value.message.startswith("x: every value must be finite"), e.value.message
    # a flow's times are in [0, 1]
    for name, tt, ss in (("t", 1.5, 0.5), ("t", np.nan, 0.5), ("s", 1.0, -0.25), ("s", 1.0, np.inf),
                         ("t", 1e30, 0.0), ("s", 0.25, 0.5)):
        with pytest.raises(ServingError) as e:
            _jump(url, "tiny_jump", x, np.full((2, 1), tt, np.float32), np.full((2, 1), ss, np.float32))
        assert e.value.code == "INVALID_ARGUMENT", (name, tt, ss)
        assert e.value.message.startswith(f"{name}: "), e.value.message
    # the class label of a conditional model
    spec = json.loads((triton_stack.dirs["toyc"] / "manifest.json").read_text())["sampler"]
    x2 = np.zeros((1, 2), np.float32)
    t2 = np.full((1, 1), spec["t_max"], np.float32)  # toyc: a consistency model, s down to its t_end > 0
    for s2, label, field in ((spec["t_end"], 9, "class_label: must be in [0, 3]"), (0.0, 0, "s: must be a time in")):
        with pytest.raises(ServingError) as e:
            _jump(url, "toyc_jump", x2, t2, np.full((1, 1), s2, np.float32), np.full((1, 1), label, np.int64))
        assert e.value.code == "INVALID_ARGUMENT" and e.value.message.startswith(field), e.value.message
    t_end = np.full((1, 1), spec["t_end"], np.float32)
    assert _jump(url, "toyc_jump", x2, t2, t_end, np.zeros((1, 1), np.int64)).shape == (1, 2)
    # a good request still goes through, and is the same as before
    np.testing.assert_array_equal(_jump(url, "tiny_jump", x, t, s), good)


def test_parse_jump_limits():
    from fewstep.serving.protocol import InvalidInput, ModelInfo, jump_x_limit, parse_jump
    from fewstep import sampling

    flow = ModelInfo("f", (2,), 0, sampling.flow_spec(), max_batch=4)
    ve = ModelInfo("v", (2,), 3, sampling.ve_spec(), max_batch=4)
    assert jump_x_limit(flow) == 200.0 and jump_x_limit(ve) == 8100.0
    one = np.ones((1, 1), np.float32)
    x, t, s, labels = parse_jump(ve, np.full((1, 2), 500.0, np.float32), 80 * one, 0 * one, np.zeros((1, 1), np.int64))
    assert t.shape == (1,) and labels.tolist() == [0]
    with pytest.raises(InvalidInput, match=r"t: must be a time in \[0, 80\]"):
        parse_jump(ve, np.zeros((1, 2), np.float32), 81 * one, 0 * one, np.zeros((1, 1), np.int64))
    with pytest.raises(InvalidInput, match="class_label: required"):
        parse_jump(ve, np.zeros((1, 2), np.float32), one, 0 * one)
    with pytest.raises(InvalidInput, match="x: expected shape"):
        parse_jump(flow, np.zeros((1, 3), np.float32), one, 0 * one)
    with pytest.raises(InvalidInput, match="t: has 1 values for a batch of 2"):
        parse_jump(flow, np.zeros((2, 2), np.float32), one, 0 * one)
