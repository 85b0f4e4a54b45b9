#!/usr/bin/env bash
# The GPU serving check, one prepared run (under 8 minutes on one GPU; docs/PERFORMANCE.md "GPU").
#
#   OUT=/some/dir bash scripts/gpu_check.sh          (from anywhere; default OUT=runs/gpu_check)
#
# 1. a venv over the system Python (its torch stays): onnxruntime-gpu with the CUDA runtime
#    wheels it needs (the `cuda` and `cudnn` extras), the Triton server wheel, tritonclient,
#    onnx; from PyPI, or from a folder of wheels with WHEELS=DIR (no index);
# 2. exports a random-weight `fmnist` net (timings do not depend on the weights);
# 3. checks ONNX Runtime CUDA against CPU (one jump per batch size, a 4-step sampler);
# 4. times one jump per batch with run(), IO binding and CUDA graphs;
# 5. serves on the GPU (KIND_GPU) with --jump inline and --jump bls and benches 1-16 steps at
#    concurrency 1 and 16, plus a 1:0.5,8:0.5 mix, with the in-process CUDA sampler beside;
# 6. writes OUT/summary.md. OUT holds 7 files: gpu_check.log (every command and its output),
#    env.txt, parity.json, ort_modes.json, bench_inline.json, bench_bls.json, summary.md.
# A step that fails is logged and the others still run; the exit code is the number of failures.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
WORK=${WORK:-$(mktemp -d /tmp/fewstep-gpu-check.XXXXXX)}
PY=${PYTHON:-python3}
REQUESTS=${REQUESTS:-60}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
: > "$LOG"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
FAILED=0
SECONDS=0
log() { echo "[$(date -u +%T) +${SECONDS}s] $*" | tee -a "$LOG"; }
step() {  # step LIMIT_S CMD...: run with a time limit, log everything, count a failure
  local limit=$1; shift
  log "\$ $*"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  log "rc=$rc"
  [ $rc -eq 0 ] || FAILED=$((FAILED + 1))
  return $rc
}

# 1. environment --------------------------------------------------------------------------------
step 60 "$PY" -m venv --system-site-packages "$WORK/venv" || exit 1
VPY=$WORK/venv/bin/python
PIP=("$VPY" -m pip install -q --disable-pip-version-check --no-cache-dir)
[ -n "${WHEELS:-}" ] && PIP+=(--no-index --find-links "$WHEELS")
step 300 "${PIP[@]}" "onnxruntime-gpu[cuda,cudnn]" "nvidia-pytriton==0.7.0" "tritonclient[grpc]==2.73.0" \
    onnx onnxscript jsonschema safetensors pillow matplotlib tqdm || { log "install failed"; exit 1; }
# ONNX Runtime finds the CUDA runtime wheels' libraries here (the Triton stubs inherit it)
SITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
export LD_LIBRARY_PATH=$(ls -d "$SITE"/nvidia/*/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}
export PATH=$WORK/venv/bin:$PATH
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc
  "$VPY" -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers()); print('torch', torch.__version__, torch.cuda.is_available())"
  git log -1 --oneline 2>/dev/null; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >> "$LOG"

# 2-4. model, parity, ONNX Runtime modes -----------------------------------------------------------
MODEL=$WORK/fmnist
step 300 "$VPY" scripts/gpu_check.py model "$MODEL" || { log "no model, nothing to serve"; exit 1; }
step 120 "$VPY" scripts/gpu_check.py parity "$MODEL" "$OUT/parity.json"
step 120 "$VPY" scripts/gpu_check.py ort-modes "$MODEL" "$OUT/ort_modes.json"

# 5. serve on the GPU in both jump modes, bench ------------------------------------------------------
for mode in inline bls; do
  step 180 "$VPY" -m fewstep.cli bench --serve --export "$MODEL" --device gpu --jump "$mode" \
      --steps 1,2,4,8,16 --concurrency 1,16 --mix 1:0.5,8:0.5 --requests "$REQUESTS" --warmup 10 \
      --no-progress --out "$WORK/bench-$mode" \
    && cp "$WORK/bench-$mode/bench.json" "$OUT/bench_$mode.json"
done

# 6. summary ---------------------------------------------------------------------------------------
step 30 "$VPY" scripts/gpu_check.py summary "$OUT"
log "done in ${SECONDS}s, $FAILED step(s) failed; results in $OUT"
exit $FAILED
