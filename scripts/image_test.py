#!/usr/bin/env python3
"""Build the serving image from deploy/Dockerfile and start it here: `make image-test`.

On a stand-in for NVIDIA's base (deploy/standin-base: Debian bookworm from debootstrap, plus
the nvidia-pytriton wheel's tritonserver laid out as NVIDIA's image lays it out), with the
shipped `cud_fmnist` exported and baked in, and the lock's wheels given as an air-gapped build
would give them (--build-arg WHEELS). `podman run` is refused on this machine, so the built
image's file system is mounted (`podman image mount`) and the image's own entrypoint, user,
working directory and environment (from `podman image inspect`) run under chroot, with the
root file system read-only and /srv/repo and /tmp writable, as in the Kubernetes Deployment.
Then: the probes (startup, readiness, liveness) pass inside the image, `fewstep generate`
over gRPC returns the image PyTorch makes for the same seed, and SIGTERM stops the server.
Ends with `image ok`.

Cached in $FEWSTEP_IMAGE_CACHE (default /var/cache/fewstep-image): the Debian rootfs, the
wheels (keyed by the lock's sha256); podman caches the layers.
Needs root, podman and debootstrap (the Makefile installs them with apt, or skips).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import grpc
import numpy as np
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
LOCK = DEPLOY / "requirements-image.lock"
DEBIAN_IMAGE = "localhost/fewstep-debian:bookworm"
STANDIN_IMAGE = "localhost/fewstep-standin-base:24.10"
IMAGE = "localhost/fewstep-serve:image-test"
DEPLOYMENT = DEPLOY / "k8s" / "base" / "deployment.yaml"  # whose probes the image must pass
MODEL = "cud_fmnist"  # the shipped model baked into the test image
# what NVIDIA's image has that a minbase Debian lacks: Python with pip, the stub's libpython,
# useradd for the triton-server user
DEBIAN_PACKAGES = "python3,python3-pip,libpython3.11,ca-certificates,passwd"
STUB_PYTHON = "3.11"  # bookworm's Python; the stub of the same version runs the Python models


def log(msg: str) -> None:
    print(f"image-test: {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def podman(*args: str, capture: bool = False) -> str:
    out = run(["podman", *args], stdout=subprocess.PIPE if capture else None, text=True)
    return out.stdout.strip() if capture else ""


def image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name]).returncode == 0


def debian_base(cache: Path) -> None:
    """Debian bookworm (minbase plus DEBIAN_PACKAGES) as a podman image, from a cached rootfs."""
    if image_exists(DEBIAN_IMAGE):
        return
    tarball = cache / "debian-bookworm.tar"
    if not tarball.exists():
        rootfs = cache / "rootfs.tmp"
        shutil.rmtree(rootfs, ignore_errors=True)
        log("debootstrap bookworm (about a minute)")
        run(["debootstrap", "--variant=minbase", f"--include={DEBIAN_PACKAGES}", "bookworm", str(rootfs)],
            stdout=subprocess.DEVNULL)
        run(["chroot", str(rootfs), "apt-get", "clean"])
        with tarfile.open(f"{tarball}.tmp", "w") as tar:
            tar.add(rootfs, arcname=".")
        os.replace(f"{tarball}.tmp", tarball)
        shutil.rmtree(rootfs)
    podman("import", "-q", "--change", "CMD=/bin/bash", str(tarball), DEBIAN_IMAGE)


def triton_tree(dest: Path) -> None:
    """The nvidia-pytriton wheel's tritonserver laid out as in NVIDIA's image."""
    import pytriton  # the serve extra's wheel, installed in this environment

    site = Path(list(pytriton.__path__)[0]).parent
    src, libs = site / "pytriton" / "tritonserver", site / "nvidia_pytriton.libs"
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "bin").mkdir(parents=True)
    shutil.copy2(src / "bin" / "tritonserver", dest / "bin")
    shutil.copytree(libs, dest / "lib")
    shutil.copytree(src / "caches", dest / "caches")
    python = dest / "backends" / "python"
    shutil.copytree(src / "backends" / "python", python, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(src / "python_backend_stubs" / STUB_PYTHON / "triton_python_backend_stub", python)


def standin_base(cache: Path) -> None:
    context = cache / "standin-context"
    triton_tree(context / "tritonserver")
    shutil.copy2(DEPLOY / "standin-base" / "nvidia_entrypoint.sh", context)
    log("building the stand-in base")
    podman("build", "--isolation=chroot", "-q", "-f", str(DEPLOY / "standin-base" / "Dockerfile"),
           "--build-arg", f"DEBIAN_IMAGE={DEBIAN_IMAGE}", "-t", STANDIN_IMAGE, str(context))


def lock_wheels(cache: Path) -> Path:
    """The lock's wheels for the stand-in's Python (this interpreter's: both are bookworm's
    3.11), fetched once per lock."""
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]
    wheels = cache / f"wheels-{digest}"
    if not (wheels / ".complete").exists():
        log("downloading the lock's wheels (once per lock)")
        run([sys.executable, "-m", "pip", "download", "-qq", "--require-hashes", "--only-binary=:all:",
             "-r", str(LOCK), "-d", str(wheels)])
        (wheels / ".complete").touch()
    return wheels


def link_tree(src: Path, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for f in src.glob("*.whl"):
        try:
            os.link(f, dest / f.name)
        except OSError:
            shutil.copy2(f, dest / f.name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Chroot:
    """The mounted image with /proc, /dev, a writable /srv/repo and /tmp bound in."""

    def __init__(self, stack: ExitStack, image: str, work: Path):
        self.root = Path(podman("image", "mount", image, capture=True))
        stack.callback(subprocess.run, ["podman", "image", "unmount", image], stdout=subprocess.DEVNULL)
        for target, source, opts in (("proc", "proc", ["-t", "proc"]), ("dev", "/dev", ["--rbind"]),
                                     ("srv/repo", str(work / "repo"), ["--bind"]),
                                     ("tmp", str(work / "tmp"), ["--bind"])):
            run(["mount", *opts, source, str(self.root / target)])
            stack.callback(subprocess.run, ["umount", "-R", "-l", str(self.root / target)])
        config = json.loads(podman("image", "inspect", image, capture=True))[0]["Config"]
        self.entrypoint, self.env = config["Entrypoint"], dict(e.split("=", 1) for e in config["Env"])
        self.workdir = config.get("WorkingDir") or "/"
        uid, _, gid = config.get("User", "0").partition(":")
        self.uid, self.gid = int(uid), int(gid or uid)

    def popen(self, argv: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        def enter():
            os.chroot(self.root)
            os.chdir(self.workdir)
            os.setgroups([])
            os.setgid(self.gid)
            os.setuid(self.uid)
        return subprocess.Popen(argv, env={**self.env, **(env or {})}, preexec_fn=enter, **kw)

    def run(self, argv: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
        proc = self.popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(argv, proc.returncode, out)


def wait_for(check, what: str, server: subprocess.Popen, server_log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result.returncode == 0:
            return
        if server.poll() is not None:
            raise SystemExit(f"image-test: the server exited ({server.returncode}) before {what}:\n"
                             + server_log.read_text()[-3000:])
        if time.monotonic() > deadline:
            raise SystemExit(f"image-test: {what} did not pass in {timeout:.0f} s: {result.stdout[-2000:]}")
        time.sleep(2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path,
                   default=Path(os.environ.get("FEWSTEP_IMAGE_CACHE", "/var/cache/fewstep-image")))
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, repository)")
    args = p.parse_args()
    if os.geteuid() != 0 or not shutil.which("podman") or not shutil.which("debootstrap"):
        print("image-test skipped: needs root, podman and debootstrap")
        return 0
    t0 = time.monotonic()
    args.cache.mkdir(parents=True, exist_ok=True)
    debian_base(args.cache)
    standin_base(args.cache)

    # the build context's MODELS and WHEELS folders (build/ is ignored by git, not by the image)
    context = ROOT / "build" / "image-test"
    shutil.rmtree(context / "models", ignore_errors=True)
    log(f"exporting the shipped {MODEL}")
    run([sys.executable, "-m", "fewstep", "export", "--ckpt", str(ROOT / "demo" / "models" / MODEL),
         "--out", str(context / "models" / MODEL)], stdout=subprocess.DEVNULL)
    link_tree(lock_wheels(args.cache), context / "wheels")
    log(f"building {IMAGE} from deploy/Dockerfile on the stand-in base")
    podman("build", "--isolation=chroot", "-q", "-f", str(DEPLOY / "Dockerfile"),
           "--ignorefile", str(DEPLOY / "Dockerfile.dockerignore"),
           "--build-arg", f"BASE_IMAGE={STANDIN_IMAGE}",
           "--build-arg", f"MODELS={(context / 'models').relative_to(ROOT)}",
           "--build-arg", f"WHEELS={(context / 'wheels').relative_to(ROOT)}", "-t", IMAGE, str(ROOT))
    podman("image", "prune", "-f", capture=True)  # the layers this build replaced
    log(f"built in {time.monotonic() - t0:.0f} s")

    work = Path(tempfile.mkdtemp(prefix="fewstep-image-"))
    grpc_port, metrics_port = free_port(), free_port()
    url = f"127.0.0.1:{grpc_port}"
    with ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
        for d in ("repo", "tmp"):
            (work / d).mkdir()
            os.chown(work / d, 1000, 1000)
        (work / "tmp").chmod(0o1777)
        box = Chroot(stack, IMAGE, work)
        # the stand-in has only the Python backend and no GPU: the jump runs there, on the CPU
        env = {"FEWSTEP_JUMP_BACKEND": "python", "FEWSTEP_DEVICE": "cpu"}
        server_log = work / "server.log"
        with open(server_log, "w") as out:
            server = box.popen([*box.entrypoint, "--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}",
                                "--metrics-address=127.0.0.1", f"--metrics-port={metrics_port}"],
                               env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

        def stop():
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        stack.callback(stop)
        probes = deployment_probes()
        # the exec probes run inside the image as the kubelet runs them, pointed at the test's port
        probe_env = {**env, "FEWSTEP_PROBE_URL": url}
        wait_for(lambda: box.run(probes["startupProbe"]["exec"]["command"], timeout=120, env=probe_env),
                 "the startup probe", server, server_log, timeout=300)
        log(f"startup probe passed {time.monotonic() - t0:.0f} s in")
        status = grpc_health(url)  # the readiness probe is the kubelet's gRPC health check
        if status != "SERVING":
            raise SystemExit(f"image-test: readiness: the gRPC health check answers {status}")
        live = box.run(probes["livenessProbe"]["exec"]["command"], timeout=60, env=probe_env)
        if live.returncode != 0:
            raise SystemExit(f"image-test: the liveness probe failed: {live.stdout}")
        log("readiness (gRPC health: SERVING) and liveness probes passed")
        # the image's default (GPU) repository is written too: the native onnxruntime jump on
        # KIND_GPU, the export checked against the base's Triton release
        native = box.run(["fewstep", "serve", "--dry-run", "--repo", "/tmp/native", "--model", f"/models/{MODEL}",
                          "--jump-backend", "onnxruntime", "--device", "gpu", "--jump", "bls"], timeout=120)
        config = work / "tmp" / "native" / f"{MODEL}_jump" / "config.pbtxt"
        if native.returncode != 0 or not config.exists() or "KIND_GPU" not in config.read_text():
            raise SystemExit(f"image-test: the image's default repository was not written: {native.stdout}")
        log("the default repository (onnxruntime jump, KIND_GPU) is written in the image")
        # two seeds, so both commands write the same grid
        image = work / "generated.png"
        run([sys.executable, "-m", "fewstep", "generate", "--url", url, "--model", MODEL, "--steps", "1",
             "--seed", "7", "--num", "2", "--out", str(image)], stdout=subprocess.DEVNULL)
        reference = work / "pytorch.png"
        run([sys.executable, "-m", "fewstep", "sample", "--ckpt", str(ROOT / "demo" / "models" / MODEL),
             "--steps", "1", "--seed", "7", "--num", "2", "--out", str(reference)], stdout=subprocess.DEVNULL)
        served = np.asarray(Image.open(image), dtype=np.int16)
        local = np.asarray(Image.open(reference), dtype=np.int16)
        diff = int(np.abs(served - local).max()) if served.shape == local.shape else None
        if diff is None or diff > 2:
            raise SystemExit(f"image-test: the served image differs from PyTorch's for the same seed "
                             f"(shapes {served.shape} / {local.shape}, max diff {diff})")
        log(f"fewstep generate over gRPC: the same image as PyTorch's (max pixel diff {diff})")
        os.kill(server.pid, signal.SIGTERM)  # to tini, PID 1 in a pod
        code = server.wait(timeout=60)
        if code != 0:
            raise SystemExit(f"image-test: SIGTERM ended the server with {code}:\n{server_log.read_text()[-2000:]}")
    log(f"done in {time.monotonic() - t0:.0f} s")
    print("image ok")
    return 0


def deployment_probes() -> dict:
    """The startup, readiness and liveness probes of the Deployment's container."""
    (container,) = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]["containers"]
    return {k: container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}


def grpc_health(url: str) -> str:
    """What the kubelet's gRPC probe asks: grpc.health.v1.Health/Check with no service name."""
    with grpc.insecure_channel(url) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


if __name__ == "__main__":
    sys.exit(main())
