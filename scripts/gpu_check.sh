#!/usr/bin/env bash
# The GPU check, sized for a GPU host lent to this project: PyTorch with CUDA, no onnxruntime-gpu,
# TensorRT or tritonserver, nothing fetchable, at most 64 MiB of files per call (repository
# included). One command, each step under a time limit (docs/PERFORMANCE.md, "GPU"):
#
#   bash scripts/gpu_check.sh                  # on the GPU host, from the repository root (< 6 min)
#   DEVICE=cpu bash scripts/gpu_check.sh       # the dry run of the same steps without a GPU
#
# 1. jump: the jump of each shipped demo model (demo/models/*) in PyTorch, per batch, eager and
#    replayed from CUDA graphs: a Markdown table (OUT/jump.md, OUT/jump.json);
# 2. triton, when a slimmed tritonserver was carried along as $TRITON_SLIM (default
#    runs/triton-slim.tar.xz; made here by `python scripts/slim_triton.py --out runs/triton-slim.tar.xz`,
#    33.7 MiB): the sampler's BLS request to a jump that answers in GPU memory, against the
#    in-process PyTorch sampler (OUT/triton.json). Without it, said and skipped.
# OUT defaults to $OUT (the device runner's folder that comes back) or runs/gpu_check; every
# command and its output go to OUT/gpu_check.log. The exit code is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-runs/gpu_check}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
LIMIT_S=${LIMIT_S:-240}
TRITON_SLIM=${TRITON_SLIM:-runs/triton-slim.tar.xz}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
: > "$LOG"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
FAILED=0
SECONDS=0
log() { echo "[$(date -u +%T) +${SECONDS}s] $*" | tee -a "$LOG"; }
step() {  # step CMD...: run under LIMIT_S, log everything, count a failure
  log "\$ $*"
  timeout "$LIMIT_S" "$@" 2>>"$LOG"  # stdout stays the caller's
  local rc=$?
  log "rc=$rc"
  [ $rc -eq 0 ] || FAILED=$((FAILED + 1))
  return $rc
}

{ if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  else echo "no nvidia-smi"; fi
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  git log -1 --oneline 2>/dev/null; } | tee -a "$LOG"

# the slimmed server, and what loading a checkpoint needs beyond torch and numpy, from its wheels (no index)
TS=""
if [ -f "$TRITON_SLIM" ]; then
  TS=$(mktemp -d /tmp/fewstep-triton.XXXXXX)
  trap 'rm -rf "$TS"' EXIT
  tar -xJf "$TRITON_SLIM" -C "$TS"
  if ! "$PY" -c "import safetensors, tqdm" 2>/dev/null; then  # unpacked beside it: no pip, no index
    for wheel in "$TS"/wheels/*.whl; do step "$PY" -m zipfile -e "$wheel" "$TS/site"; done
    export PYTHONPATH=$TS/site:$PYTHONPATH  # the Triton stubs inherit it (serving.launcher.server_env)
  fi
fi

# 1. the jump in PyTorch ----------------------------------------------------------------------------
if [ "$DEVICE" = cpu ]; then JUMP_ARGS=${JUMP_ARGS:---batches 1,4 --repeats 5 --warmup 1}; fi
# shellcheck disable=SC2086  # JUMP_ARGS is a list of options
step "$PY" scripts/gpu_check.py jump --device "$DEVICE" --json "$OUT/jump.json" ${JUMP_ARGS:-} > "$OUT/jump.md"
tee -a "$LOG" < "$OUT/jump.md"

# 2. Triton from the slimmed wheel ------------------------------------------------------------------
if [ -n "$TS" ]; then
  PYTHONPATH=$TS:$PYTHONPATH step "$PY" scripts/gpu_check.py triton --device "$DEVICE" --json "$OUT/triton.json"
else
  log "triton: skipped, no $TRITON_SLIM (python scripts/slim_triton.py --out $TRITON_SLIM, then carry it along)"
fi

log "done in ${SECONDS}s, $FAILED step(s) failed; results in $OUT"
exit $FAILED
