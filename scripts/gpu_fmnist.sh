#!/usr/bin/env bash
# The `fmnist`-preset runs on a GPU machine, all in parallel on one GPU, in the background.
# Usage (repo root, Fashion-MNIST IDX files in $FMNIST_DIR):
#   FMNIST_DIR=.gpu/fashion-mnist ITERS=12000 setsid bash scripts/gpu_fmnist.sh &
# Then watch runs/gpu/*.log. Chains: edm -> cd, ctm (ctm and analytic preconditioning);
# cud -> cud-distill; rf alone. Each run ends with `fewstep eval` at 1,2,4,8,16 steps.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FEWSTEP_CACHE=${FEWSTEP_CACHE:-$PWD/runs/gpu/cache}
OUT=${OUT_DIR:-runs/gpu}
ITERS=${ITERS:-12000}          # rf, edm, cud
DITERS=${DITERS:-4000}         # cd, ctm, cud-distill
NUM=${EVAL_NUM:-10000}
DATA="--data fmnist --data-dir ${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}"
mkdir -p "$OUT"

run() {  # run NAME ARGS...: train, then evaluate
  local name=$1; shift
  python3 -m fewstep train "$@" $DATA --preset fmnist --out "$OUT/$name" --no-progress \
      train.ckpt_every=2000 train.sample_every=2000 train.warmup=1000 "train.ema=[0.999,0.9999]" > "$OUT/$name.log" 2>&1 || { echo "FAILED train $name" >> "$OUT/$name.log"; return 1; }
  python3 -m fewstep eval --ckpt "$OUT/$name" --steps 1,2,4,8,16 --num "$NUM" \
      --no-progress >> "$OUT/$name.log" 2>&1 || echo "FAILED eval $name" >> "$OUT/$name.log"
  echo "DONE $name" >> "$OUT/$name.log"
}

run rf --method rf --iters "$ITERS" &
run cud-rk12 --method cud --iters "$ITERS" && run cud-1step --method cud-distill --teacher "$OUT/cud-rk12" \
    --iters "$DITERS" method.num_trajs=20000 &
run edm --method edm --iters "$ITERS" && {
  run cd --method cd --teacher "$OUT/edm" --iters "$DITERS" &
  run ctm --method ctm --precond ctm --teacher "$OUT/edm" --iters "$DITERS" &
  run ctm-analytic --method ctm --precond analytic --teacher "$OUT/edm" --iters "$DITERS" &
  wait
} &
wait
echo ALL DONE > "$OUT/ALL_DONE"
