#!/usr/bin/env bash
# Where the background runs of scripts/gpu_fmnist.sh stand: the driver log, each run's latest
# step / loss / images/s, and failures. Usage: bash scripts/gpu_status.sh [runs/gpu]
OUT=${1:-runs/gpu}
date +%T
cat "$OUT/driver.log" 2>/dev/null
for m in "$OUT"/*/metrics.jsonl "$OUT"/precond/*/metrics.jsonl; do
  [ -f "$m" ] || continue
  [ -s "$m" ] || { echo "$(basename "$(dirname "$m")") (no step logged yet)"; continue; }
  tail -n 1 "$m" | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print('$m'.split('/')[-2].ljust(16), 'step', r['step'], 'loss %.4g' % r['loss'], 'img/s', r['images_per_s'])"
done
grep -h "FAILED\|Error\|error:" "$OUT"/*.log 2>/dev/null | tail -n 5
grep -h "^wrote\|equal-iterations" "$OUT"/eval.log 2>/dev/null | tail -n 3
