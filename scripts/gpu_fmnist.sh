#!/usr/bin/env bash
# The `fmnist`-preset runs on one GPU, all side by side, in the background, on a wall-clock
# budget (train.time_limit) rather than an iteration count, so that the whole chain fits a
# fixed lease of GPU time. Usage (repo root; Fashion-MNIST at the default path):
#   TA=10 TB=8 setsid bash scripts/gpu_fmnist.sh > runs/gpu/driver.log 2>&1 &
# Then watch runs/gpu/*.log; runs/gpu/ALL_DONE appears at the end.
#   phase A (TA minutes): rf, edm, cud RK12 / RK23 / RK34 (checkpoints every 1000 iterations)
#   phase B (TB minutes): cud-distill from cud-rk12; cd, ctm (ctm and analytic preconditioning,
#            a checkpoint every 500 iterations for the curve) from edm
# Evaluation: every run at 1,2,4,8,16 steps (Euler; rf and edm also Heun) on EVAL_NUM samples;
# the CUD ablation also at the largest step all phase-A runs reached (equal iterations).
# PRESET=tiny TA=0.3 TB=0.3 EVAL_NUM=200 PRECOND_SAMPLES=64 PRECOND_POINTS=16 EXTRA="data.limit=512"
# runs the whole chain as a smoke test.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=${OUT_DIR:-runs/gpu}
PRESET=${PRESET:-fmnist}
TA=${TA:-10}
TB=${TB:-8}
NUM=${EVAL_NUM:-10000}
EXTRA=${EXTRA:-}
# Analytic-Precond fit for the edm teacher: 1024 samples (not 4096) keeps it under a minute on a GPU
PRECOND="method.precond_samples=${PRECOND_SAMPLES:-1024} method.precond_points=${PRECOND_POINTS:-120}"
BIG=1000000   # iterations: the time limit ends each run
mkdir -p "$OUT"

train() {  # train NAME ARGS...
  local name=$1; shift
  python3 -m fewstep train "$@" --data fmnist --preset "$PRESET" --out "$OUT/$name" --no-progress \
      --iters $BIG train.ckpt_every=1000 train.keep=0 train.sample_every=2000 train.warmup=1000 \
      "train.ema=[0.999,0.9999]" $EXTRA > "$OUT/$name.log" 2>&1 \
    || { echo "FAILED train $name" >> "$OUT/$name.log"; return 1; }
  echo "TRAINED $name" >> "$OUT/$name.log"
}

evaluate() {  # evaluate CKPT JSON [eval args...]
  local ckpt=$1 json=$2; shift 2
  python3 -m fewstep eval --ckpt "$ckpt" --steps 1,2,4,8,16 --num "$NUM" --no-progress --out "$json" "$@" \
      >> "$OUT/eval.log" 2>&1 || echo "FAILED eval $ckpt $*" >> "$OUT/eval.log"
}

last_step() {  # the latest checkpoint's step of a run dir
  ls "$OUT/$1/checkpoints" 2>/dev/null | sed -n 's/^step-0*//p' | sort -n | tail -1
}

# ---- SPEED=1: only the training speed of each method alone on the GPU (images/s in
# $OUT/speed-*/metrics.jsonl), then stop
if [ "${SPEED:-0}" = 1 ]; then
  for m in rf edm cud; do train speed-$m --method $m train.time_limit=0.3 train.log_every=20; done
  exit 0
fi

# ---- phase A
echo "phase A start $(date +%T)"
train rf --method rf train.time_limit=$TA &
train edm --method edm train.time_limit=$TA &
train cud-rk12 --method cud method.pred_step=1 train.time_limit=$TA &
train cud-rk23 --method cud method.pred_step=2 train.time_limit=$TA &
train cud-rk34 --method cud method.pred_step=3 train.time_limit=$TA &
wait
echo "phase A done $(date +%T)"

# ---- phase B, with phase A's evaluations beside it
echo "phase B start $(date +%T)"
train cud-1step --method cud-distill --teacher "$OUT/cud-rk12" method.num_trajs=20000 train.time_limit=$TB &
train cd --method cd --teacher "$OUT/edm" train.time_limit=$TB &
for pc in ctm analytic; do
  python3 scripts/compare_precond.py fmnist --teacher "$OUT/edm" --preset "$PRESET" --seeds 0 --iters $BIG \
      --every 500 --samples 5000 --ema 0.999 --only $pc --out "$OUT/precond" train.time_limit=$TB $PRECOND $EXTRA \
      > "$OUT/precond-$pc.log" 2>&1 || echo "FAILED precond $pc" >> "$OUT/precond-$pc.log" &
done
(
  common=$(for r in rf cud-rk12 cud-rk23 cud-rk34; do last_step $r; done | sort -n | head -1)
  common=$(( common / 1000 * 1000 ))
  echo "equal-iterations step: $common" >> "$OUT/eval.log"
  for r in rf edm; do
    evaluate "$OUT/$r" "$OUT/eval-$r-euler.json" --set solver=euler
    evaluate "$OUT/$r" "$OUT/eval-$r-heun.json" --set solver=heun
  done
  for r in rf cud-rk12 cud-rk23 cud-rk34; do
    evaluate "$OUT/$r/checkpoints/$(printf step-%07d "$common")" "$OUT/eval-$r-equal.json"
  done
  for r in cud-rk12 cud-rk23 cud-rk34; do evaluate "$OUT/$r" "$OUT/eval-$r.json"; done
  echo "phase A evals done $(date +%T)" >> "$OUT/eval.log"
) &
wait
echo "phase B done $(date +%T)"

# ---- phase B evaluations
evaluate "$OUT/cud-1step" "$OUT/eval-cud-1step.json" &
evaluate "$OUT/cd" "$OUT/eval-cd.json" &
python3 scripts/compare_precond.py fmnist --teacher "$OUT/edm" --preset "$PRESET" --seeds 0 --iters $BIG \
    --every 500 --samples 5000 --ema 0.999 --no-train --out "$OUT/precond" > "$OUT/precond.log" 2>&1 \
  || echo "FAILED precond eval" >> "$OUT/precond.log" &
wait
evaluate "$OUT/precond/analytic-seed0" "$OUT/eval-ctm-analytic.json"
evaluate "$OUT/precond/ctm-seed0" "$OUT/eval-ctm.json"
echo "ALL DONE $(date +%T)" | tee "$OUT/ALL_DONE"
