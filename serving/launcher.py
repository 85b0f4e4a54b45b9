"""Launch the `tritonserver` binary that the `nvidia-pytriton` wheel bundles.

The wheel ships Triton Inference Server (2.51) with only the Python backend, laid out as

    pytriton/tritonserver/bin/tritonserver
    pytriton/tritonserver/backends/python/{libtriton_python.so, triton_python_backend_utils.py}
    pytriton/tritonserver/python_backend_stubs/<X.Y>/triton_python_backend_stub
    nvidia_pytriton.libs/            (the shared libraries the binary links against)

We do not use PyTriton's Python API: `Server` assembles a backend directory (the Python
backend plus the stub built for this interpreter), builds the environment the stub needs
to import numpy, `fewstep.sampling` and `export.runner`, starts the binary in its own
process group on a model repository, waits until every model is ready, and stops it
cleanly (SIGTERM, then SIGKILL to the whole group), so no stub process outlives it.

Safe by default (docs/serving.md, "Hardening"): HTTP is off unless asked for (readiness is
checked over gRPC); the admin protocols (shared memory, model repository, logging, trace)
need a per-server key only the launcher holds (`admin_headers`); gRPC can use TLS; a
watchdog process (serving/reaper.py) kills the server when the launcher dies.
"""
from __future__ import annotations

import importlib.util
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import fewstep
from fewstep.errors import UserError
from fewstep.serving.admin_key import (ADMIN_HEADER, GRPC_ADMIN_HEADER, admin_key_file,  # noqa: F401  (tests read them here)
                                       read_admin_key, write_admin_key)
from fewstep.serving.client import RECONNECT_ARGS
from fewstep.serving.reaper import process_group_members  # noqa: F401  (part of this API)
from fewstep.serving.http_guard import HttpGuard

# the `fewstep` package: in a checkout its folder, which finds the layers beside it; installed,
# the folder that holds them
PACKAGE_DIR = Path(fewstep.__file__).resolve().parent
# the protocols only our own tools may use; the key travels as this gRPC metadata / HTTP header
RESTRICTED = ("shared-memory", "model-repository", "logging", "trace")
# SIGTERM drains: requests in flight get this long to finish (tritonserver's --exit-timeout-secs);
# deploy/k8s/deployment.yaml's terminationGracePeriodSeconds covers it plus the preStop sleep
GRACE_S = 30


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


def link_packages(workdir: Path) -> None:
    """A link to this project's package in the server's working directory.

    The Python stubs run an isolated interpreter (-I: PYTHONPATH is ignored) whose sys.path
    starts with its working directory; an editable install's finder would otherwise give
    them another checkout's `fewstep` than the launcher's. The link makes the stubs import
    the same code as the process that wrote the repository.
    """
    (Path(workdir) / "fewstep").symlink_to(PACKAGE_DIR, target_is_directory=True)


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
    pp = [str(PACKAGE_DIR.parent), site] + [p for p in env.get("PYTHONPATH", "").split(":") if p]
    env["PYTHONPATH"] = ":".join(dict.fromkeys(pp))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def check_port_free(host: str, port: int, flag: str = "") -> None:
    """UserError when host:port cannot be bound, naming the flag (of `fewstep serve` and
    `fewstep demo`) that sets it. SO_REUSEADDR, as the servers themselves use it: a port
    whose last connections sit in TIME_WAIT is free to listen on again."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if not flag:
                raise UserError(f"cannot bind {host}:{port} ({e.strerror}); choose another port") from None
            raise UserError(f"cannot bind {host}:{port} for Triton's {flag[2:-5]} endpoint ({e.strerror}): "
                            f"choose another port with {flag} (0 = any free port)") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, grpc_port: int, tls) -> str | None:
    """The warning printed when the server binds beyond loopback without TLS."""
    if is_loopback(host) or tls is not None:
        return None
    return (f"warning: serving on {host} beyond loopback without TLS: anyone who can reach port {grpc_port} "
            f"talks to the models unencrypted (give --grpc-tls-cert and --grpc-tls-key; docs/serving.md, TLS)")


def _cert_name(cert: Path) -> str | None:
    """A DNS name (or IP) the certificate is valid for, so the launcher's own readiness
    checks can verify it whatever address it connects to; None when it cannot be read."""
    try:
        decoded = ssl._ssl._test_decode_cert(str(cert))  # CPython's PEM decoder (no extra package)
    except (AttributeError, OSError, ValueError, ssl.SSLError):
        return None
    for kind, value in decoded.get("subjectAltName", ()):
        if kind in ("DNS", "IP Address"):
            return value
    for rdn in decoded.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


@dataclass(frozen=True)
class TLS:
    """gRPC TLS through Triton's own options: the server's PEM certificate and key."""
    cert: Path
    key: Path

    def __post_init__(self):
        for what, path in (("certificate", self.cert), ("key", self.key)):
            if not Path(path).is_file():
                raise UserError(f"TLS {what} {path}: no such file")

    def server_args(self) -> list[str]:
        return ["--grpc-use-ssl=true", f"--grpc-server-cert={Path(self.cert).resolve()}",
                f"--grpc-server-key={Path(self.key).resolve()}"]


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
    http: bool = False  # HTTP/REST endpoint; off by default (gRPC is the product's protocol)
    tls: TLS | None = None  # gRPC TLS
    cleanup: list = field(default_factory=list)  # the server's own paths: removed by close() (or the watchdog)
    http_max_body: int = 1 << 20  # the HTTP guard's request-size limit (serving/http_guard.py)
    grace_s: float = GRACE_S  # stop(): how long requests in flight may take to finish

    def __post_init__(self):
        self.repo = Path(self.repo)
        self.grpc_port = self.grpc_port or free_port(self.host)
        self.http_port = (self.http_port or free_port(self.host)) if self.http else None
        self.metrics_port = self.metrics_port or free_port(self.host)
        self._workdir: Path | None = None
        self._log_handle = None
        self.shm_prefix = f"fewstep_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self.admin_key = secrets.token_urlsafe(24)  # new per server; never written to disk
        self._grpc = None
        self._reaper: subprocess.Popen | None = None
        self._http_guard = None
        self._key_file: Path | None = None
        # with HTTP on, Triton's own HTTP server listens here, behind the guard on http_port
        self._http_upstream = free_port("127.0.0.1") if self.http else None

    @property
    def admin_headers(self) -> dict:
        """gRPC metadata that unlocks the restricted admin protocols."""
        return {GRPC_ADMIN_HEADER: self.admin_key}

    @property
    def admin_http_headers(self) -> dict:
        """The same over HTTP (with --http)."""
        return {ADMIN_HEADER: self.admin_key}

    # --- endpoints ---------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str | None:
        return f"http://{self.host}:{self.http_port}" if self.http else None

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
            *self.protocol_args(),
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true", "--exit-on-error=true", f"--exit-timeout-secs={int(self.grace_s)}",
            # every model loaded at start, as without model control; explicit control lets the
            # watchdog reload one model (behind the admin key, like every model-repository call)
            "--model-control-mode=explicit", "--load-model=*",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]

    def protocol_args(self) -> list[str]:
        """Endpoints, the admin key and TLS (docs/serving.md, "Hardening")."""
        restricted = f"{','.join(RESTRICTED)}:{ADMIN_HEADER}={self.admin_key}"
        args = [f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--grpc-restricted-protocol={restricted}"]
        if self.tls is not None:
            args += self.tls.server_args()
        if self.http:
            args += ["--http-address=127.0.0.1", f"--http-port={self._http_upstream}",
                     f"--http-restricted-api={restricted}"]
        else:
            args += ["--allow-http=false"]
        return args

    def ports(self) -> list[int]:
        return [p for p in (self.grpc_port, self.http_port, self.metrics_port) if p]

    def start(self, timeout: float | None = None) -> "Server":
        if self.proc is not None:
            raise RuntimeError("server already started")
        for flag, port in (("--grpc-port", self.grpc_port), ("--http-port", self.http_port),
                           ("--metrics-port", self.metrics_port)):
            if port:
                check_port_free(self.host, port, flag)
        warning = exposure_warning(self.host, self.grpc_port, self.tls)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        self._workdir = Path(tempfile.mkdtemp(prefix="fewstep-triton-"))
        self._key_file = admin_key_file(self.grpc_port)
        write_admin_key(self._key_file, self.admin_key)
        backend_dir = make_backend_dir(self._workdir / "backends")
        link_packages(self._workdir)
        if self.log_file is None:
            self.log_file = self._workdir / "tritonserver.log"
        self._log_handle = open(self.log_file, "ab")
        self.proc = subprocess.Popen(self.command(backend_dir), env=server_env(), cwd=self._workdir,
                                     stdin=subprocess.DEVNULL, stdout=self._log_handle,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._start_reaper()
        try:
            if self.http:
                self._http_guard = HttpGuard(self.host, self.http_port, ("127.0.0.1", self._http_upstream),
                                             self.http_max_body).start()
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

    def _start_reaper(self) -> None:
        """The watchdog that kills the server (and removes its temporary files) if this
        process dies without stopping it: serving/reaper.py."""
        paths = [str(self._workdir), str(self._key_file)] + [str(p) for p in self.cleanup]
        self._reaper = subprocess.Popen(
            [sys.executable, "-S", str(Path(__file__).with_name("reaper.py")), str(os.getpid()), str(self.proc.pid),
             self.shm_prefix, *paths],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)

    def grpc_client(self):
        """One tritonclient gRPC client (one channel, so readiness polls open no new
        connections), with the server's TLS settings."""
        if self._grpc is None:
            self._grpc = self.new_grpc_client()
        return self._grpc

    def new_grpc_client(self):
        """A new tritonclient gRPC client of this server (loopback when bound to every address),
        with its TLS settings and a short reconnect backoff (it outlives restarts)."""
        import tritonclient.grpc as grpc

        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("::1" if self.host == "::" else self.host)
        url = f"[{host}]:{self.grpc_port}" if ":" in host else f"{host}:{self.grpc_port}"
        if self.tls is None:
            return grpc.InferenceServerClient(url, channel_args=list(RECONNECT_ARGS.items()))
        name = _cert_name(self.tls.cert)
        args = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
                *RECONNECT_ARGS.items()]
        if name:
            args.append(("grpc.ssl_target_name_override", name))
        return grpc.InferenceServerClient(url, ssl=True, root_certificates=str(self.tls.cert), channel_args=args)

    def server_ready(self) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            return bool(self.grpc_client().is_server_ready(client_timeout=2.0))
        except InferenceServerException:
            return False

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until the server and every model in `models` (or the repository) are ready."""
        deadline = time.monotonic() + timeout
        while True:
            if self.abort is not None and self.abort():
                raise KeyboardInterrupt
            if self.proc.poll() is not None:
                raise UserError(f"tritonserver exited with code {self.proc.returncode} before it was ready; "
                                f"last lines of {self.log_file}:\n{self.log_tail()}")
            if self.server_ready() and all(self.model_ready(m) for m in self.models):
                return
            if time.monotonic() > deadline:
                raise UserError(f"tritonserver was not ready after {timeout:.0f} s; last lines of "
                                f"{self.log_file}:\n{self.log_tail()}")
            time.sleep(0.2)

    def model_ready(self, name: str) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            return bool(self.grpc_client().is_model_ready(name, client_timeout=2.0))
        except InferenceServerException:
            return False

    def repository_index(self) -> list[dict]:
        """The repository index (a restricted protocol: sent with the admin key)."""
        index = self.grpc_client().get_model_repository_index(headers=self.admin_headers, as_json=True,
                                                              client_timeout=5.0)
        return index.get("models", [])

    def reload_model(self, name: str, timeout: float = 120.0) -> None:
        """Load `name` again (model control, with the admin key): new instances, then the old
        ones are unloaded; the other models keep serving."""
        self.grpc_client().load_model(name, headers=self.admin_headers, client_timeout=timeout)

    def pids(self) -> list[int]:
        """The server's process and every process in its group (the Python stubs)."""
        if self.proc is None:
            return []
        return process_group_members(self.proc.pid)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM: Triton refuses new requests, lets those in flight finish (up to `grace_s`),
        unloads the models (the stubs exit); then SIGKILL to whatever is left of the group."""
        timeout = self.grace_s + 10.0 if timeout is None else timeout
        proc, self.proc = self.proc, None
        rc = None
        if self._http_guard is not None:
            self._http_guard.stop()
            self._http_guard = None
        if self._grpc is not None:
            try:
                self._grpc.close()
            except Exception:  # noqa: BLE001  (a channel that is already broken)
                pass
            self._grpc = None
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
        if self._key_file is not None and read_admin_key(self.grpc_port) == self.admin_key:
            self._key_file.unlink(missing_ok=True)
        self._key_file = None
        self._stop_reaper()
        return rc

    def close(self) -> int | None:
        """stop(), then remove the server's own paths (`cleanup`; a restart only stops it)."""
        rc = self.stop()
        for p in self.cleanup:
            shutil.rmtree(p, ignore_errors=True)
        return rc

    def _stop_reaper(self) -> None:
        """The server is stopped (its group is gone): the watchdog has nothing left to do."""
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            try:
                reaper.wait(5)  # it exits by itself when the server's process ends
            except subprocess.TimeoutExpired:
                reaper.kill()
                reaper.wait()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
