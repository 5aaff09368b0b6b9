#!/usr/bin/env bash
# The papers' comparison on the default setup: sequential SFT and sequential RFT (GRPO), multi-task SFT and RFT
# (the upper bound), SEEDS seeds each, two runs at a time (one CPU thread each), then evaluate.py's report.
#   bash compare.sh                 # the full comparison: 3 seeds, 500 test items per task
#   bash compare.sh --quick         # a smoke version for the tests (1 seed, tiny budgets)
#   OUT=runs/x SEEDS="0 1 2 3 4" bash compare.sh -- --lr 3e-4      # extra flags after -- go to every run
#   bash compare.sh --sweep         # lr sweep of sequential SFT and RFT on the *validation* split: the settings
#                                   # are chosen there, and evaluate.py --frontier plots retention against gain
set -euo pipefail
cd "$(dirname "$0")"
SEEDS=${SEEDS:-"0 1 2"}
SFT_LR=${SFT_LR:-3e-5}   # each the best validation AvgAcc of `bash compare.sh --sweep` (see README)
RFT_LR=${RFT_LR:-1e-4}
EXTRA=()
MODE=compare
case "${1:-}" in
  --quick) shift; SEEDS=${QUICK_SEEDS:-"0"}; MODE=quick
           EXTRA=(--tasks left_color top_color --general color add --eval_n 16 --steps 2 --batch_size 4) ;;
  --sweep) shift; MODE=sweep; EXTRA=(--eval_split val) ;;
esac
[ "${1:-}" = "--" ] && shift
EXTRA+=("$@")
OUT=${OUT:-runs/$MODE}
mkdir -p "$OUT"
start=$(date +%s)
jobs=()
if [ "$MODE" = sweep ]; then
  for lr in ${SFT_LRS:-1e-5 3e-5 1e-4}; do jobs+=("cpt_sft.py --lr $lr --out $OUT/sft-lr$lr"); done
  for lr in ${RFT_LRS:-3e-5 1e-4 3e-4}; do jobs+=("cpt_rft.py --lr $lr --out $OUT/rft-lr$lr"); done
else
  # longest jobs first (sequential RFT ~2 min, multi-task RFT, sequential SFT, multi-task SFT ~1 min), so that
  # the two workers run out of work at about the same time
  for s in $SEEDS; do jobs+=("cpt_rft.py --lr $RFT_LR --seed $s --out $OUT/rft-$s"); done
  for s in $SEEDS; do jobs+=("cpt_rft.py --lr $RFT_LR --multitask --seed $s --out $OUT/rft-multitask-$s"); done
  for s in $SEEDS; do jobs+=("cpt_sft.py --lr $SFT_LR --seed $s --out $OUT/sft-$s"); done
  for s in $SEEDS; do jobs+=("cpt_sft.py --lr $SFT_LR --multitask --seed $s --out $OUT/sft-multitask-$s"); done
fi
printf '%s\n' "${jobs[@]}" | OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore xargs -P 2 -I{} sh -c \
  'python3 {} '"${EXTRA[*]:-}"' > "$(echo {} | sed "s/.*--out //").log" 2>&1 || { echo "failed: {}"; exit 255; }'
echo "runs done in $(( $(date +%s) - start )) s; logs: $OUT/*.log"
if [ "$MODE" = sweep ]; then
  python3 evaluate.py "$OUT"/sft-lr*/ "$OUT"/rft-lr*/ --report "$OUT/report" --frontier
else
  python3 evaluate.py "$OUT"/sft-[0-9]*/ "$OUT"/rft-[0-9]*/ "$OUT"/sft-multitask-*/ "$OUT"/rft-multitask-*/ \
    --report "$OUT/report"
fi
echo "total wall time $(( $(date +%s) - start )) s"
