"""The Kubernetes probes (deploy/k8s/base/deployment.yaml) against a real tritonserver:

- readiness is the kubelet's own gRPC health check: Triton 2.51 answers
  grpc.health.v1.Health/Check with SERVING once it is ready;
- liveness (`probe.py live`) passes while the server is busy with 64 requests in flight, in
  less than the probe's timeout, and fails once a Python stub has died, while the server and
  the model still say ready.

The server runs the image's layout of models: the ensemble, the sampler reaching `tiny_jump`
by BLS, the stream, all Python models (as with `--jump bls` in the container, where the jump
is on a native backend instead).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import require_triton, running_server

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "deploy" / "probe.py"
DEPLOYMENT = ROOT / "deploy" / "k8s" / "base" / "deployment.yaml"
LOAD_CONCURRENCY = 64


@pytest.fixture(scope="module")
def probe_stack(served_model_dirs, tmp_path_factory):
    pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (the serve extra)")
    from fewstep.serving.repository import Options, write_repository

    require_triton()
    repo = tmp_path_factory.mktemp("probes") / "repo"
    written = write_repository(repo, [str(served_model_dirs["tiny"])],
                               Options(device="cpu", jump="bls", instances=1, sampler_instances=1, threads=1))
    with running_server(repo, written, timeout=240) as server:
        yield server


def _container_probe(name: str) -> dict:
    (container,) = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]["containers"]
    return container[name]


def _probe(server, mode: str, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(PROBE), mode, "--url", server.grpc_url, "--repo", str(server.repo),
                          "--timeout", str(timeout)], capture_output=True, text=True, timeout=120)
    return out, time.perf_counter() - t0


def _health_check(url: str) -> str:
    """What the kubelet's gRPC probe asks: grpc.health.v1.Health/Check with no service name."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(url) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_readiness_is_the_grpc_health_check(probe_stack):
    pytest.importorskip("grpc_health.v1.health_pb2", reason="needs grpcio-health-checking (the test extra)")
    assert _container_probe("readinessProbe")["grpc"]["port"] == 8001  # Triton's gRPC port in the pod
    assert _health_check(probe_stack.grpc_url) == "SERVING"


class _Load:
    """LOAD_CONCURRENCY clients, each sending 8-step requests back to back; counts the
    requests in flight."""

    def __init__(self, url: str):
        self.url, self.stop, self.lock = url, threading.Event(), threading.Lock()
        self.in_flight = self.done = 0
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                        for i in range(LOAD_CONCURRENCY)]

    def _client(self, i: int) -> None:
        from fewstep.serving.client import Client
        with Client(self.url, timeout=120) as c:
            seed = i * 1000
            while not self.stop.is_set():
                with self.lock:
                    self.in_flight += 1
                try:
                    c.infer("tiny", [seed], 8, outputs=("sample",))
                except Exception as e:  # noqa: BLE001 - reported by the test
                    self.errors.append(str(e))
                    return
                finally:
                    with self.lock:
                        self.in_flight -= 1
                with self.lock:
                    self.done += 1
                seed += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(150)


def test_liveness_tolerates_load_and_sees_a_dead_stub(probe_stack):
    from fewstep.serving.health import find_stubs, stub_alive

    live = _container_probe("livenessProbe")
    cmd = live["exec"]["command"]
    call_timeout, limit_s = float(cmd[cmd.index("--timeout") + 1]), live["timeoutSeconds"]
    ok, idle_s = _probe(probe_stack, "live", call_timeout)
    assert ok.returncode == 0, ok.stderr
    with _Load(probe_stack.grpc_url) as load:
        deadline = time.monotonic() + 60
        while load.in_flight < LOAD_CONCURRENCY and time.monotonic() < deadline:
            time.sleep(0.05)
        busy = []
        for _ in range(3):
            in_flight = load.in_flight
            out, seconds = _probe(probe_stack, "live", call_timeout)
            assert out.returncode == 0, out.stderr
            busy.append((seconds, in_flight))
        # what a real request costs on the same busy server (the old liveness, now the startup probe)
        infer, infer_s = _probe(probe_stack, "infer", 60)
        done = load.done
    assert not load.errors, load.errors[:3]
    print(f"live probe: idle {idle_s:.2f} s; at concurrency {LOAD_CONCURRENCY}: "
          + ", ".join(f"{s:.2f} s ({n} in flight)" for s, n in busy)
          + f"; the infer probe on the same load: {infer_s:.2f} s (exit {infer.returncode}); {done} requests served")
    assert all(n >= LOAD_CONCURRENCY * 3 // 4 for _, n in busy), busy  # the server was busy during each probe
    assert max(s for s, _ in busy) < limit_s, busy
    # kill -9 the sampler's stub: Triton 2.51 still says ready and serving; `live` fails, naming it
    (stub,) = [s for s in find_stubs(probe_stack.proc.pid) if s.model == "tiny_sampler"]
    os.kill(stub.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10  # a killed process leaves when the kernel gets to it
    while stub_alive(stub, probe_stack.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    # as the kubelet does, a failure of another kind (a deadline on this shared machine) is
    # tried again; a pass is not: the model is dead for good
    tries = []
    for _ in range(3):
        dead, _ = _probe(probe_stack, "live", call_timeout)
        tries.append((dead.returncode, dead.stderr.strip()))
        assert dead.returncode == 1, tries
        if "tiny_sampler" in dead.stderr and "stub" in dead.stderr:
            break
    else:
        raise AssertionError(f"live never named the dead stub: {tries}")
    ready, _ = _probe(probe_stack, "ready", call_timeout)
    health = _health_check(probe_stack.grpc_url) if _has_grpc_health() else "n/a"
    print(f"after the sampler's stub was killed: live ({len(tries)} tries): {tries}; ready probe exit "
          f"{ready.returncode}; gRPC health {health}")


def _has_grpc_health() -> bool:
    try:
        import grpc_health.v1.health_pb2  # noqa: F401
    except ImportError:
        return False
    return True


def test_liveness_fails_without_a_server(probe_stack):
    from fewstep.serving.launcher import free_port

    gone = subprocess.run([sys.executable, str(PROBE), "live", "--url", f"127.0.0.1:{free_port()}",
                           "--repo", str(probe_stack.repo), "--timeout", "2"], capture_output=True, text=True,
                          timeout=60)
    assert gone.returncode == 1 and gone.stderr.startswith("unhealthy:"), gone.stderr
