#!/usr/bin/env python
"""A slimmed tritonserver from the nvidia-pytriton install, small enough to carry to a GPU host.

    python scripts/slim_triton.py --out runs/triton-slim.tar.xz            # stubs for every Python
    python scripts/slim_triton.py --out runs/triton-slim.tar.xz --python 3.11

A GPU host lent to this project can be sent at most 64 MiB of files per call, repository
included, and fetches nothing; the nvidia-pytriton wheel alone is 55 MB. This keeps what
`fewstep serve` runs (serving.launcher.find_triton): the tritonserver binary, the Python
backend, the backend stubs, and of the bundled shared libraries only those the binary, the
backend and the stubs load (their ldd closure; PyTriton's own libpython is left out).
Laid out as the wheel lays them out, with an empty pytriton/__init__.py, so

    mkdir /tmp/ts && tar -xJf triton-slim.tar.xz -C /tmp/ts && PYTHONPATH=/tmp/ts:$PYTHONPATH ...

makes find_triton() find it. It also carries, under wheels/, the wheels of what loading a
checkpoint needs beyond PyTorch and numpy (safetensors, an abi3 wheel; tqdm, pure Python), at
the versions installed here, for a host that lacks them (scripts/gpu_check.sh installs them
from there, with no index). Prints the sizes and whether it fits beside the repository.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

LIMIT = 64 << 20  # bytes a call to the GPU host may carry, the repository included
ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_DEPS = ("safetensors", "tqdm")  # imported by training.checkpoint / the methods


def pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("nvidia-pytriton is not installed here (pip install -e '.[serve]')")
    return Path(list(spec.submodule_search_locations)[0])


def needed_libs(binaries: list[Path], libdir: Path) -> set[Path]:
    """The libraries of libdir that the binaries load, directly or through each other."""
    todo, seen = list(binaries), set()
    while todo:
        out = subprocess.run(["ldd", str(todo.pop())], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            parts = line.split("=>")
            if len(parts) == 2 and parts[1].strip().startswith("/"):
                lib = Path(parts[1].split("(")[0].strip()).resolve()
                if lib.parent == libdir.resolve() and lib not in seen:
                    seen.add(lib)
                    todo.append(lib)
    return seen


def dependency_wheels(dest: Path) -> list[Path]:
    """pip download (no deps, binary only) of CHECKPOINT_DEPS at the versions installed here."""
    pins = [f"{name}=={version(name)}" for name in CHECKPOINT_DEPS]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d",
                    str(dest), *pins], check=True)
    return sorted(dest.glob("*.whl"))


def repo_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the .tar.xz to write")
    p.add_argument("--python", action="append", metavar="X.Y",
                   help="keep the backend stub of this Python only (repeatable; default: all)")
    p.add_argument("--no-wheels", action="store_true", help=f"leave out the wheels of {', '.join(CHECKPOINT_DEPS)}")
    args = p.parse_args(argv)

    root = pytriton_root()
    ts = root / "tritonserver"
    libdir = root.parent / "nvidia_pytriton.libs"
    stubs = sorted((ts / "python_backend_stubs").iterdir())
    if args.python:
        stubs = [s for s in stubs if s.name in args.python]
        if not stubs:
            sys.exit(f"no stub for Python {', '.join(args.python)} in {ts / 'python_backend_stubs'}")
    binaries = [ts / "bin" / "tritonserver", ts / "backends" / "python" / "libtriton_python.so"]
    binaries += [s / "triton_python_backend_stub" for s in stubs]
    libs = needed_libs(binaries, libdir)
    files = {path: Path("pytriton") / path.relative_to(root) for path in binaries}
    files.update({f: Path("pytriton") / f.relative_to(root) for f in (ts / "backends" / "python").glob("*.py")})
    files.update({lib: Path("nvidia_pytriton.libs") / lib.name for lib in libs})
    tmp = tempfile.TemporaryDirectory(prefix="slim-triton-")
    if not args.no_wheels:
        files.update({w: Path("wheels") / w.name for w in dependency_wheels(Path(tmp.name))})
    raw = sum(f.stat().st_size for f in files)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:xz", preset=9) as tar:
        for src, name in sorted(files.items(), key=lambda kv: str(kv[1])):
            tar.add(src, arcname=str(name))
        init = tarfile.TarInfo("pytriton/__init__.py")  # a package, so importlib finds it
        tar.addfile(init, io.BytesIO(b""))
    tmp.cleanup()
    packed, repo = out.stat().st_size, repo_bytes()
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    wheels = sorted(n.name for n in files.values() if n.parts[0] == "wheels")
    print(f"kept {len(files)} files ({len(libs)} libraries of {len(list(libdir.iterdir()))}, stubs for Python "
          f"{', '.join(s.name for s in stubs)}, wheels: {', '.join(wheels) or 'none'}): {mib(raw)} unpacked, "
          f"{mib(packed)} as {out}")
    total = packed + repo
    verdict = "fits" if total <= LIMIT else "does NOT fit"
    print(f"with the repository's tracked files ({mib(repo)}): {mib(total)}, which {verdict} in {mib(LIMIT)}")
    return 0 if total <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
