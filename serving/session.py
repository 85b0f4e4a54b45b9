"""A run of Triton on exported models: write the repository, start the server, wait for a signal.

`fewstep serve`, `fewstep demo` and `fewstep bench --serve` get their server from `served`
and wait on it with `StopSignals` and `watch`:

    server, written = served(["fmnist=models/fmnist"], Options(), grpc_port=0)
    with StopSignals() as stop:
        server.abort = stop.requested     # a signal during start() gives up waiting
        with server:
            rc = watch(server, stop)      # until SIGINT/SIGTERM (0) or it cannot be brought back (1)
"""
from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from fewstep.serving.launcher import Server
from fewstep.serving.repository import Options, write_repository
from fewstep.serving.health import Watchdog


def served(model_args: list[str], opts: Options, repo: Path | None = None, **server_kw) -> tuple[Server, list[dict]]:
    """The repository of `model_args` written into `repo` (default: a temporary dir that is the
    server's: removed by its close(), or by its watchdog when the launcher dies) and a Server on
    it (not started) that waits for every model written; also write_repository's list."""
    temp = None if repo is not None else Path(tempfile.mkdtemp(prefix="fewstep-repo-"))
    try:
        written = write_repository(repo or temp, model_args, opts)
        server = Server(repo or temp, models=[n for w in written for n in w["models"]],
                        cleanup=[temp] if temp is not None else [], **server_kw)
    except BaseException:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
        raise
    return server, written


class StopSignals:
    """While entered, SIGINT and SIGTERM ask for a stop (`requested()`) instead of raising."""

    def __init__(self):
        self.signal = None
        self._old: dict = {}

    def _handler(self, signum, frame):
        self.signal = signum

    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> "StopSignals":
        self._old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def watch(server: Server | None, stop: StopSignals, who: str = "", **watchdog_kw) -> int:
    """Wait until a stop is asked for (0), restarting the server after any fault (serving/health.py:
    a dead or stopped stub, a dead tritonserver, a model that misses its probes); 1 when it cannot
    be brought back or restarts too often (its log's tail printed). server None: only the signal."""
    watchdog = Watchdog(server, **watchdog_kw) if server is not None else None
    try:
        while not stop.requested():
            if watchdog is not None and not watchdog.check():
                print(f"{who}last lines of the tritonserver log:\n{server.log_tail()}", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        if watchdog is not None:
            watchdog.close()


def serve_forever(server: Server, on_ready=None, **watchdog_kw) -> int:
    """Start the server and run until SIGINT/SIGTERM (or until it cannot be brought back); always
    stops it, letting the requests in flight finish (`server.grace_s`)."""
    with StopSignals() as stop:
        server.abort = stop.requested
        try:
            try:
                server.start()
            except KeyboardInterrupt:
                return 130
            if on_ready:
                on_ready(server)
            return watch(server, stop, **watchdog_kw)
        finally:
            server.close()
