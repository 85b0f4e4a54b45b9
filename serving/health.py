"""Notice a dead or hung server process and bring the server back (`fewstep serve`'s watchdog).

Triton 2.51 runs each instance of a Python model in its own process,
`triton_python_backend_stub <repo>/<model>/<version>/model.py <shm region> ... <instance name> ...`,
a child of `tritonserver`. When one dies (OOM killer, a crash in a native library, kill -9),
Triton does not restart it: every later request to that model fails with INTERNAL "Stub process
'<instance>' is not healthy", readiness stays 200, and requests that were inside the dead stub
never get an answer (the sampler answers through response senders that died with the stub).
Reloading the model through model control brings the model back, but measured here it leaves
those in-flight requests hanging until each client's deadline, even after the old model is
unloaded. So the watchdog restarts the whole server, with one policy for every fault:

- detection, every poll (0.2 s in `serve_forever`): tritonserver itself has exited (SIGKILL,
  SIGSEGV, the OOM killer); a stub's pid is gone, a zombie, or no longer tritonserver's child
  (the stubs are found once the server is ready: children of tritonserver whose first argument
  is the stub binary); a stub is stopped (SIGSTOP) for a second; a model missed two 1-step
  probes in a row (serving/prober.py: a stub that hangs alive);
- fail fast: the server's process group is killed at once (SIGKILL), so every request in flight
  ends with UNAVAILABLE instead of hanging, and readiness (gRPC ServerReady) fails until the
  server is back: a server that cannot answer does not say it is ready;
- recovery: the server is started again on the same ports with the same repository, and
  `fewstep serve` prints one line when the fault was noticed and one when every model is ready
  again. Only what broke is restarted where that is safe: a `NAME_jump` that no other model
  calls (the jump inline in the sampler and the stream) is reloaded alone through model control
  (its stubs killed first); its direct callers in flight fail fast with INTERNAL "not healthy",
  and the ensemble never notices. A sampler's or stream's requests in flight would hang until
  their deadline after a reload (their answers were to come from the dead process), so for
  those, and for tritonserver itself, the whole server is restarted;
- a crash loop gives up: more than `max_restarts` restarts within `window_s` seconds stop the
  launcher with exit code 1 (a supervisor such as Kubernetes then decides).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fewstep.serving.reaper import proc_stat

STUB_BINARY = "triton_python_backend_stub"
INSTANCE_ARG = 8  # argv index of the model instance name (python_backend's stub_launcher)


@dataclass(frozen=True)
class Stub:
    """One Python backend stub process: its pid, instance name and model name."""
    pid: int
    instance: str
    model: str


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None when it is gone."""
    rest = proc_stat(pid)
    return None if rest is None else (rest[0], int(rest[1]))


def find_stubs(server_pid: int) -> list[Stub]:
    """The live Python backend stubs that tritonserver `server_pid` started (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        st = _stat(int(d.name))
        if st is None or st[1] != server_pid or st[0] == "Z":
            continue
        try:
            argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not argv or Path(argv[0]).name != STUB_BINARY or len(argv) < 2:
            continue
        model_py = Path(argv[1])  # <repo>/<model>/<version>/model.py
        model = model_py.parent.parent.name
        instance = argv[INSTANCE_ARG] if len(argv) > INSTANCE_ARG and argv[INSTANCE_ARG] else model
        out.append(Stub(int(d.name), instance, model))
    return sorted(out, key=lambda s: s.instance)


def listening_pid(port: int) -> int | None:
    """The process listening on TCP `port` in this network namespace (Linux /proc), None when
    none is: the socket's inode from /proc/net/tcp{,6}, then the process that holds it (the
    oldest holder, should a child have inherited the socket)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:  # sl local_address rem_address st ... inode
            f = row.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{f[9]}]")
    holders = set()
    for d in Path("/proc").iterdir() if inodes else ():
        if not d.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (d / "fd").iterdir()):
                holders.add(int(d.name))
        except OSError:  # gone, or not ours to read
            continue
    roots = [pid for pid in holders if (_stat(pid) or ("", 0))[1] not in holders]
    return min(roots) if roots else None


def stub_alive(stub: Stub, server_pid: int) -> bool:
    st = _stat(stub.pid)
    return st is not None and st[0] != "Z" and st[1] == server_pid


@dataclass
class Recovery:
    """One restart: what had failed, when, and how long until every model was ready."""
    dead: list                    # the dead or hung stubs (empty when tritonserver itself died)
    detected_at: float            # time.time() when the watchdog saw it
    seconds: float | None = None  # detection -> every model ready again (None: it failed)
    fault: str = ""               # the one-line description that was logged
    kind: str = ""                # "stub died", "server died", "stub stopped", "probe"


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


@dataclass
class Watchdog:
    """Watches a running `serving.launcher.Server`; `check()` once per poll.

    One restart policy for every death (docs/serving.md, "One restart policy"): a Python stub
    that died, tritonserver itself dead (SIGKILL, SIGSEGV, the OOM killer), a stub stopped
    (SIGSTOP) for `stopped_s`, or a model that missed `probe_misses` probes in a row
    (serving/prober.py; probe_interval_s 0 turns the probe off). check() returns False when
    the server could not be brought back or restarted too often (then the launcher exits 1);
    True otherwise. `recoveries` records every restart. close() stops the probe's thread.
    """
    server: object
    log: object = None            # a callable taking one line; default: stderr
    max_restarts: int = 5
    window_s: float = 600.0
    recoveries: list = field(default_factory=list)
    stopped_s: float = 1.0
    probe_interval_s: float = 2.0
    probe_deadline_s: float = 2.0
    probe_misses: int = 2

    def __post_init__(self):
        self.log = self.log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.stubs: list[Stub] = []
        self._server_pid: int | None = None
        self._stopped_since: dict[int, float] = {}
        self.prober = self._make_prober()
        self.arm()

    def _make_prober(self):
        names = [m for m in getattr(self.server, "models", []) if m + "_sampler" in self.server.models]
        if self.probe_interval_s <= 0 or not names or not hasattr(self.server, "new_grpc_client"):
            return None
        from fewstep.serving.prober import Prober  # numpy and tritonclient: not needed by the /proc checks

        return Prober(self.server.new_grpc_client, self.server.repo, names, self.probe_interval_s,
                      self.probe_deadline_s, self.probe_misses).start()

    def close(self) -> None:
        if self.prober is not None:
            self.prober.close()

    def arm(self) -> None:
        """Record the stubs of the server as it runs now (after it is ready)."""
        proc = getattr(self.server, "proc", None)
        self._server_pid = None if proc is None else proc.pid
        self.stubs = [] if proc is None else find_stubs(proc.pid)
        self._stopped_since = {}
        if self.prober is not None:
            self.prober.resume()

    def dead(self) -> list[Stub]:
        proc = getattr(self.server, "proc", None)
        if self._server_pid is None or proc is None or proc.poll() is not None:
            return []  # the server itself is gone: fault() says so
        return [s for s in self.stubs if not stub_alive(s, self._server_pid)]

    def stopped(self) -> list[Stub]:
        """Stubs in the stopped state (SIGSTOP) for at least `stopped_s`."""
        now = time.monotonic()
        out = []
        for s in self.stubs:
            st = _stat(s.pid)
            if st is not None and st[0] == "T":
                if now - self._stopped_since.setdefault(s.pid, now) >= self.stopped_s:
                    out.append(s)
            else:
                self._stopped_since.pop(s.pid, None)
        return out

    def fault(self) -> tuple[str, str, list, set] | None:
        """(kind, one-line description, stubs, models) of what failed, or None when all is well."""
        proc = getattr(self.server, "proc", None)
        if proc is None or self._server_pid is None:
            return None
        if proc.poll() is not None:
            return "server died", f"tritonserver (pid {proc.pid}) {_exit_text(proc.returncode)}", [], set()
        dead = self.dead()
        if dead:
            return "stub died", f"the Python backend stub of {_names(dead)} died", dead, {s.model for s in dead}
        stopped = self.stopped()
        if stopped:
            return "stub stopped", (f"the Python backend stub of {_names(stopped)} is stopped (SIGSTOP) "
                                    f"for {self.stopped_s:g} s"), stopped, {s.model for s in stopped}
        hung = self.prober.hung() if self.prober is not None else []
        if hung:
            what = "; ".join(f"{t.model} ({t.last_error})" for t in hung)
            return "probe", (f"{what}: no answer to {self.probe_misses} probes in a row "
                             f"({self.probe_deadline_s:g} s deadline each)"), [], {t.model for t in hung}
        return None

    def check(self) -> bool:
        found = self.fault()
        if found is None:
            return True
        kind, what, stubs, models = found
        now = time.time()
        recent = [r for r in self.recoveries if now - r.detected_at < self.window_s]
        if len(recent) >= self.max_restarts:
            self.log(f"watchdog: {what}; {len(recent)} restarts in the last {self.window_s:.0f} s already, "
                     f"giving up")
            return False
        rec = Recovery(dead=stubs, detected_at=now, fault=what, kind=kind)
        self.recoveries.append(rec)
        if self.prober is not None:
            self.prober.pause()
        if models and models <= standalone_jumps(self.server):
            if self._reload(sorted(models), what, rec):
                return True
        self.log(f"watchdog: {what}; restarting tritonserver (requests in flight fail with UNAVAILABLE)")
        t0 = time.monotonic()
        self._kill_group()
        try:
            self.server.stop()  # the group is gone: this only cleans up (shared memory, temp files)
            self.server.start()
        except KeyboardInterrupt:  # asked to stop while restarting: the launcher's loop exits
            return True
        except Exception as e:  # noqa: BLE001 - reported, and the launcher exits 1
            self.log(f"watchdog: tritonserver could not be restarted: {e}")
            return False
        rec.seconds = time.monotonic() - t0
        self.arm()
        self.log(f"watchdog: tritonserver restarted, every model ready again {rec.seconds:.1f} s after the "
                 f"fault was noticed (restart {len(self.recoveries)}; log {self.server.log_file})")
        return True

    def _reload(self, models: list[str], what: str, rec: Recovery) -> bool:
        """Kill the stubs of `models` (no other model calls them) and load them again; False when
        that did not bring them back (then the whole server is restarted)."""
        names = ", ".join(models)
        self.log(f"watchdog: {what}; reloading {names} only (no other model calls it; its requests in flight "
                 f"fail with INTERNAL)")
        t0 = time.monotonic()
        for stub in find_stubs(self._server_pid):
            if stub.model in models:
                try:
                    os.kill(stub.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            for m in models:
                self.server.reload_model(m)
        except Exception as e:  # noqa: BLE001 - the whole-server restart follows
            self.log(f"watchdog: reloading {names} failed ({e}); restarting tritonserver instead")
            return False
        rec.seconds = time.monotonic() - t0
        rec.kind += ", reloaded"
        self.arm()
        self.log(f"watchdog: {names} reloaded, ready again {rec.seconds:.1f} s after the fault was noticed "
                 f"(restart {len(self.recoveries)}; the other models kept serving)")
        return True

    def _kill_group(self) -> None:
        """SIGKILL tritonserver and every stub at once: in-flight requests end now, not at
        Triton's exit timeout (it waits for requests that a dead stub will never answer)."""
        proc = getattr(self.server, "proc", None)
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # also what is left of a group whose server died
        except (ProcessLookupError, PermissionError):
            if proc.poll() is None:
                proc.kill()
        try:
            proc.wait(5)
        except Exception:  # noqa: BLE001 - stop() kills whatever is left
            pass

    def run(self, stop, interval: float = 0.2) -> bool:
        """check() every `interval` s until `stop()` is true or recovery fails (for use in a
        thread, e.g. tests; `serve_forever` calls check() in its own loop)."""
        try:
            while not stop():
                if not self.check():
                    return False
                time.sleep(interval)
            return True
        finally:
            self.close()


INLINE = 'key: "jump_mode" value { string_value: "inline" }'  # serving/repository.py's parameter


def standalone_jumps(server) -> set[str]:
    """The `NAME_jump` models that neither `NAME_sampler` nor `NAME_stream` calls (both run the
    jump inline): reloading one of them cannot leave another model's request hanging."""
    repo = Path(getattr(server, "repo", "") or "")
    out = set()
    for m in getattr(server, "models", []):
        if not m.endswith("_jump") or not hasattr(server, "reload_model"):
            continue
        name = m[:-len("_jump")]
        users = [repo / f"{name}{sfx}" / "config.pbtxt" for sfx in ("_sampler", "_stream")]
        try:
            if all(INLINE in u.read_text() for u in users):
                out.add(m)
        except OSError:
            continue
    return out


def _names(stubs: list[Stub]) -> str:
    return ", ".join(f"{s.model} (instance {s.instance}, pid {s.pid})" for s in stubs)
