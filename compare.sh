#!/usr/bin/env bash
# The papers' comparison on the default setup: sequential SFT and sequential RFT (GRPO), multi-task SFT and RFT
# (the upper bound), SEEDS seeds each, two runs at a time (one CPU thread each), then evaluate.py's report.
#   bash compare.sh                 # the full comparison: 3 seeds, 500 test items per task
#   bash compare.sh --quick         # a smoke version for the tests (1 seed, tiny budgets)
#   OUT=runs/x SEEDS="0 1 2 3 4" bash compare.sh -- --lr 3e-4      # extra flags after -- go to every run
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-runs/compare}
SEEDS=${SEEDS:-"0 1 2"}
EXTRA=()
if [ "${1:-}" = "--quick" ]; then
  shift; SEEDS=${QUICK_SEEDS:-"0"}
  EXTRA=(--tasks left_color top_color --general color add --eval_n 16 --steps 2 --batch_size 4)
fi
[ "${1:-}" = "--" ] && shift
EXTRA+=("$@")
mkdir -p "$OUT"
start=$(date +%s)
jobs=()
for s in $SEEDS; do
  jobs+=("cpt_sft.py --seed $s --out $OUT/sft-$s")
  jobs+=("cpt_rft.py --seed $s --out $OUT/rft-$s")
  jobs+=("cpt_sft.py --multitask --seed $s --out $OUT/sft-multitask-$s")
  jobs+=("cpt_rft.py --multitask --seed $s --out $OUT/rft-multitask-$s")
done
printf '%s\n' "${jobs[@]}" | OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore xargs -P 2 -I{} sh -c \
  'python3 {} '"${EXTRA[*]:-}"' > "$(echo {} | sed "s/.*--out //").log" 2>&1 || { echo "failed: {}"; exit 255; }'
echo "runs done in $(( $(date +%s) - start )) s; logs: $OUT/*.log"
python3 evaluate.py "$OUT"/sft-[0-9]*/ "$OUT"/rft-[0-9]*/ "$OUT"/sft-multitask-*/ "$OUT"/rft-multitask-*/ --report "$OUT/report"
echo "total wall time $(( $(date +%s) - start )) s"
