"""Notice a dead Python backend stub and bring the server back (`fewstep serve`'s watchdog).

Triton 2.51 runs each instance of a Python model in its own process,
`triton_python_backend_stub <repo>/<model>/<version>/model.py <shm region> ... <instance name> ...`,
a child of `tritonserver`. When one dies (OOM killer, a crash in a native library, kill -9),
Triton does not restart it: every later request to that model fails with INTERNAL "Stub process
'<instance>' is not healthy", readiness stays 200, and requests that were inside the dead stub
never get an answer (the sampler answers through response senders that died with the stub).
Reloading the model through model control brings the model back, but measured here it leaves
those in-flight requests hanging until each client's deadline, even after the old model is
unloaded. So the watchdog restarts the whole server instead:

- detection: the stub processes are found once the server is ready (children of tritonserver
  whose first argument is the stub binary) and checked every poll (0.2 s in `serve_forever`):
  a pid that is gone, a zombie, or no longer tritonserver's child is a dead stub;
- fail fast: the server's process group is killed at once (SIGKILL), so every request in flight
  ends with UNAVAILABLE instead of hanging, and readiness (gRPC ServerReady) fails until the
  server is back: a server that cannot answer does not say it is ready;
- recovery: the server is started again on the same ports with the same repository, and
  `fewstep serve` prints one line when the stub died and one when every model is ready again;
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
    """One restart: which stubs had died, when, and how long until every model was ready."""
    dead: list
    detected_at: float          # time.time() when the watchdog saw it
    seconds: float | None = None  # detection -> every model ready again (None: it failed)


@dataclass
class Watchdog:
    """Watches the stubs of a running `serving.launcher.Server`; `check()` once per poll.

    check() returns False when the server could not be brought back (then the launcher
    exits 1); True otherwise. `recoveries` records every restart.
    """
    server: object
    log: object = None            # a callable taking one line; default: stderr
    max_restarts: int = 5
    window_s: float = 600.0
    recoveries: list = field(default_factory=list)

    def __post_init__(self):
        self.log = self.log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.stubs: list[Stub] = []
        self._server_pid: int | None = None
        self.arm()

    def arm(self) -> None:
        """Record the stubs of the server as it runs now (after it is ready)."""
        proc = getattr(self.server, "proc", None)
        self._server_pid = None if proc is None else proc.pid
        self.stubs = [] if proc is None else find_stubs(proc.pid)

    def dead(self) -> list[Stub]:
        proc = getattr(self.server, "proc", None)
        if self._server_pid is None or proc is None or proc.poll() is not None:
            return []  # the server itself is gone: the launcher's own check reports that
        return [s for s in self.stubs if not stub_alive(s, self._server_pid)]

    def check(self) -> bool:
        dead = self.dead()
        if not dead:
            return True
        names = ", ".join(f"{s.model} (instance {s.instance}, pid {s.pid})" for s in dead)
        now = time.time()
        recent = [r for r in self.recoveries if now - r.detected_at < self.window_s]
        if len(recent) >= self.max_restarts:
            self.log(f"watchdog: the Python backend stub of {names} died; {len(recent)} restarts in the last "
                     f"{self.window_s:.0f} s already, giving up")
            return False
        self.log(f"watchdog: the Python backend stub of {names} died; restarting tritonserver "
                 f"(requests in flight fail with UNAVAILABLE)")
        rec = Recovery(dead=dead, detected_at=now)
        self.recoveries.append(rec)
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
                 f"stub died was noticed (restart {len(self.recoveries)}; log {self.server.log_file})")
        return True

    def _kill_group(self) -> None:
        """SIGKILL tritonserver and every stub at once: in-flight requests end now, not at
        Triton's exit timeout (it waits for requests that a dead stub will never answer)."""
        proc = getattr(self.server, "proc", None)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        try:
            proc.wait(5)
        except Exception:  # noqa: BLE001 - stop() kills whatever is left
            pass

    def run(self, stop, interval: float = 0.2) -> bool:
        """check() every `interval` s until `stop()` is true or recovery fails (for use in a
        thread, e.g. tests; `serve_forever` calls check() in its own loop)."""
        while not stop():
            if not self.check():
                return False
            time.sleep(interval)
        return True
