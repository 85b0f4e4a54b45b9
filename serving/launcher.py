"""Launch the `tritonserver` binary that the `nvidia-pytriton` wheel bundles.

The wheel ships Triton Inference Server (2.51) with only the Python backend, laid out as

    pytriton/tritonserver/bin/tritonserver
    pytriton/tritonserver/backends/python/{libtriton_python.so, triton_python_backend_utils.py}
    pytriton/tritonserver/python_backend_stubs/<X.Y>/triton_python_backend_stub
    nvidia_pytriton.libs/            (the shared libraries the binary links against)

We do not use PyTriton's Python API: `Server` assembles a backend directory (the Python
backend plus the stub built for this interpreter), builds the environment the stub needs
to import numpy, `training.sampling` and `export.runner`, starts the binary in its own
process group on a model repository, waits until every model is ready, and stops it
cleanly (SIGTERM, then SIGKILL to the whole group), so no stub process outlives it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fewstep.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("Triton is not installed: pip install 'fewstep[serve]' (the nvidia-pytriton wheel "
                        "bundles the tritonserver binary)")
    return Path(list(spec.submodule_search_locations)[0])


def find_triton() -> dict:
    """Paths of the bundled server: binary, python backend dir, stub, shared libraries."""
    root = _pytriton_root()
    ts = root / "tritonserver"
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    paths = {
        "binary": ts / "bin" / "tritonserver",
        "python_backend": ts / "backends" / "python",
        "stub": ts / "python_backend_stubs" / ver / "triton_python_backend_stub",
        "libs": root.parent / "nvidia_pytriton.libs",
    }
    for key in ("binary", "python_backend", "stub"):
        if not paths[key].exists():
            raise UserError(f"the nvidia-pytriton install has no {key} at {paths[key]} "
                            f"(is there a stub for Python {ver}?)")
    return paths


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def gpu_present() -> bool:
    """True when an NVIDIA GPU is visible (driver loaded and a device listed)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
            return out.returncode == 0 and "GPU" in out.stdout
        except (OSError, subprocess.SubprocessError):
            return False
    return False


def make_backend_dir(dest: Path) -> Path:
    """A --backend-directory holding the Python backend and the stub for this interpreter.

    Files are copied (not linked): the backend looks for the stub next to its own
    resolved location.
    """
    t = find_triton()
    py = Path(dest) / "python"
    py.mkdir(parents=True, exist_ok=True)
    for f in t["python_backend"].iterdir():
        if f.is_file():
            shutil.copy2(f, py / f.name)
    shutil.copy2(t["stub"], py / "triton_python_backend_stub")
    os.chmod(py / "triton_python_backend_stub", 0o755)
    return Path(dest)


def server_env(base: dict | None = None) -> dict:
    """The environment of tritonserver and its Python stubs."""
    env = dict(os.environ if base is None else base)
    t = find_triton()
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ld = [str(t["libs"]), libdir] + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    env["LD_LIBRARY_PATH"] = ":".join(dict.fromkeys(p for p in ld if p))
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = ":".join([bindir] + [p for p in env.get("PATH", "").split(":") if p and p != bindir])
    site = sysconfig.get_paths()["purelib"]
    pp = [str(PROJECT_ROOT), site] + [p for p in env.get("PYTHONPATH", "").split(":") if p]
    env["PYTHONPATH"] = ":".join(dict.fromkeys(pp))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


@dataclass
class Server:
    """One tritonserver process on a model repository.

    Use as a context manager, or call start() / stop(). Ports of 0 are replaced by free
    ones. `models` are the names to wait for (all models in the repository by default).
    """
    repo: Path
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    models: list[str] = field(default_factory=list)
    log_file: Path | None = None
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    ready_timeout: float = 300.0
    keep_log: bool | None = None  # None: keep a temporary log only after an unclean exit
    abort: object = None  # a callable: when it returns True, start() gives up waiting

    def __post_init__(self):
        self.repo = Path(self.repo)
        self.grpc_port = self.grpc_port or free_port(self.host)
        self.http_port = self.http_port or free_port(self.host)
        self.metrics_port = self.metrics_port or free_port(self.host)
        self._workdir: Path | None = None
        self._log_handle = None
        self.shm_prefix = f"fewstep_{os.getpid()}_{uuid.uuid4().hex[:8]}_"

    # --- endpoints ---------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    # --- lifecycle ----------------------------------------------------------------------------
    def command(self, backend_dir: Path) -> list[str]:
        return [
            str(find_triton()["binary"]),
            f"--model-repository={self.repo.resolve()}",
            f"--backend-directory={backend_dir}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true", "--exit-on-error=true", "--exit-timeout-secs=10",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]

    def start(self, timeout: float | None = None) -> "Server":
        if self.proc is not None:
            raise RuntimeError("server already started")
        for port in (self.grpc_port, self.http_port, self.metrics_port):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((self.host, port))
                except OSError as e:
                    raise UserError(f"cannot bind {self.host}:{port} ({e.strerror}); choose another port") from None
        self._workdir = Path(tempfile.mkdtemp(prefix="fewstep-triton-"))
        backend_dir = make_backend_dir(self._workdir / "backends")
        if self.log_file is None:
            self.log_file = self._workdir / "tritonserver.log"
        self._log_handle = open(self.log_file, "ab")
        self.proc = subprocess.Popen(self.command(backend_dir), env=server_env(), cwd=self._workdir,
                                     stdin=subprocess.DEVNULL, stdout=self._log_handle,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_ready(self.ready_timeout if timeout is None else timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = Path(self.log_file).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until the server and every model in `models` (or the repository) are ready."""
        deadline = time.monotonic() + timeout
        while True:
            if self.abort is not None and self.abort():
                raise KeyboardInterrupt
            if self.proc.poll() is not None:
                raise UserError(f"tritonserver exited with code {self.proc.returncode} before it was ready; "
                                f"last lines of {self.log_file}:\n{self.log_tail()}")
            code, _ = _http_get(f"{self.http_url}/v2/health/ready")
            if code == 200 and all(self.model_ready(m) for m in self.models):
                return
            if time.monotonic() > deadline:
                raise UserError(f"tritonserver was not ready after {timeout:.0f} s; last lines of "
                                f"{self.log_file}:\n{self.log_tail()}")
            time.sleep(0.2)

    def model_ready(self, name: str) -> bool:
        return _http_get(f"{self.http_url}/v2/models/{name}/ready")[0] == 200

    def repository_index(self) -> list[dict]:
        req = urllib.request.Request(f"{self.http_url}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def pids(self) -> list[int]:
        """The server's process and every process in its group (the Python stubs)."""
        if self.proc is None:
            return []
        return process_group_members(self.proc.pid)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (Triton unloads models, the stubs exit), then SIGKILL the group."""
        proc, self.proc = self.proc, None
        rc = None
        if proc is not None:
            pgid = proc.pid
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            # whatever is left in the group (a stuck stub, or the server itself) gets SIGKILL
            deadline = time.monotonic() + 5.0
            while process_group_members(pgid):
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            try:
                rc = proc.wait(5)
            except subprocess.TimeoutExpired:
                rc = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        for f in Path("/dev/shm").glob(self.shm_prefix + "*"):
            try:
                f.unlink()
            except OSError:
                pass
        if self._workdir is not None:
            # the temporary dir holds the backends and (by default) the log: the log is
            # kept only when the server did not exit cleanly, for a post-mortem
            shutil.rmtree(self._workdir / "backends", ignore_errors=True)
            log_inside = self.log_file is not None and Path(self.log_file).parent == self._workdir
            if rc == 0 or not log_inside or self.keep_log is False:
                shutil.rmtree(self._workdir, ignore_errors=True)
                if log_inside:
                    self.log_file = None
            self._workdir = None
        return rc

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is pgid (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # fields after the parenthesised command: state ppid pgrp ...
        rest = stat[stat.rindex(")") + 2:].split()
        if int(rest[2]) == pgid and rest[0] != "Z":
            out.append(int(d.name))
    return out


def serve_forever(server: Server, on_ready=None) -> int:
    """Run until SIGINT/SIGTERM (or until the server dies); always stops the server. A dead
    Python backend stub restarts the server (serving/health.py)."""
    stop = {"signal": None}

    def handler(signum, frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    server.abort = lambda: stop["signal"] is not None
    try:
        try:
            server.start()
        except KeyboardInterrupt:
            return 130
        if on_ready:
            on_ready(server)
        from serving.health import Watchdog

        watchdog = Watchdog(server)  # a dead Python stub: restart the server (serving/health.py)
        while stop["signal"] is None:
            if server.proc.poll() is not None:
                print(f"tritonserver exited with code {server.proc.returncode}; last lines of its log:\n"
                      f"{server.log_tail()}", file=sys.stderr)
                return 1
            if not watchdog.check():
                return 1
            time.sleep(0.2)
        return 0
    finally:
        server.stop()
        for s, h in old.items():
            signal.signal(s, h)
