#!/usr/bin/env bash
# Rehearse the serving image's Python side without Docker or a GPU: the image's Python (3.10),
# exactly deploy/requirements-image.txt plus the project installed with --no-deps (so no
# torch), serving an export on the bundled Triton 2.51 (the 24.10 container's release) with
# its Python 3.10 stub; then the container's probe sends a real request. What it cannot
# rehearse: CUDA, the native onnxruntime/tensorrt backends, the container's file system.
#
#   deploy/rehearse-image-env.sh EXPORT_DIR [WORK_DIR]      (PY310=python3.10, VENV_PY=.venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
export_dir=$(realpath "$1")
work=${2:-/tmp/fewstep-image-env}
py310=${PY310:-python3.10}
venv_py=${VENV_PY:-.venv/bin/python}

"$py310" -c 'import sys; assert sys.version_info[:2] == (3, 10), sys.version'
rm -rf "$work"
"$py310" -m pip install -q --disable-pip-version-check --target "$work/site" -r deploy/requirements-image.txt
"$py310" -m pip install -q --disable-pip-version-check --no-deps --target "$work/site" .
# the bundled tritonserver (and its Python 3.10 stub) from the project's environment
site=$("$venv_py" -c 'import os, pytriton; print(os.path.dirname(list(pytriton.__path__)[0]))')
mkdir -p "$work/triton"
ln -sfn "$site/pytriton" "$work/triton/pytriton"
ln -sfn "$site/nvidia_pytriton.libs" "$work/triton/nvidia_pytriton.libs"
export PYTHONPATH="$work/site:$work/triton"
if "$py310" -c 'import torch' 2>/dev/null; then
  echo "torch is importable here: not the image's environment" >&2
  exit 1
fi

read -r grpc metrics < <("$py310" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
"$py310" -m fewstep serve --model "$export_dir" --repo "$work/repo" --device cpu --jump bls \
  --grpc-port "$grpc" --metrics-port "$metrics" > "$work/serve.log" 2>&1 &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  if grep -q '^ready:' "$work/serve.log"; then break; fi
  if ! kill -0 "$server" 2>/dev/null; then cat "$work/serve.log" >&2; exit 1; fi
  sleep 1
done
"$py310" deploy/probe.py infer --url "127.0.0.1:$grpc" --repo "$work/repo"
echo "rehearsal passed: Python $("$py310" -c 'import platform; print(platform.python_version())'), no torch," \
     "$(PYTHONPATH="$work/site" "$py310" -c 'import onnxruntime as o; print("onnxruntime-gpu", o.__version__)')," \
     "a real request through every model of $export_dir"
