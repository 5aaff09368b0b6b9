#!/usr/bin/env bash
# The GPU path checked and measured in two calls of at most 8 minutes each (every step has its own time limit):
#   bash tests/gpu_check.sh suite    # the test suite (pytest-xdist, one worker a core, if installed), then the
#                                    # decode at 8x8x256 with the compiled step (CPT_COMPILE_DECODE=1, one process)
#   bash tests/gpu_check.sh bench    # a Qwen2.5-VL-3B-shape model (random init, from a config) under torchrun FSDP2
#                                    # in bf16, without and with activation checkpointing: SFT tokens/s and MFU, the
#                                    # GRPO update's MFU, decode steps/s and MBU at 1x8x64 and 8x8x256; then the main
#                                    # job's wall time, and a torchrun run of cpt_rft.py on every GPU, stopped after
#                                    # its first stage and resumed by the same command
#   bash tests/gpu_check.sh --dry-run   # on a CPU: both, on the tiny shape with small budgets (the suite only
#                                       # collected), to check the script itself
# Its printed lines are what the README's GPU section quotes; logs go to runs/gpu-check/ (or $OUT). Exit status 1
# when a step failed or ran out of time (each is named at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-}
DRY=0
if [ "$MODE" = --dry-run ]; then DRY=1; fi
LOGS=${OUT:-runs/gpu-check}  # OUT=DIR: elsewhere
mkdir -p "$LOGS"
if [ $DRY = 1 ]; then
  SHAPE=tiny; STEPS=1; ROLLOUT=2x8x16; NPROC=2
  MAIN=(--tasks left_color top_color --general color --steps 2 --eval_n 16 --kl_n 0)   # the main job, cut down
  RUN=(--tasks left_color top_color --general color --steps 4 --eval_n 8 --kl_n 0)  # stage 2 outlasts a poll
  export CUDA_VISIBLE_DEVICES=""
else
  SHAPE=3b; STEPS=3; ROLLOUT=8x8x256; NPROC=$(nvidia-smi -L 2>/dev/null | wc -l); NPROC=$(( NPROC > 0 ? NPROC : 1 ))
  MAIN=()
  RUN=(--steps 3 --eval_n 100)
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null ||
  echo "no GPU: dry run on $(nproc) CPU cores"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

FAILED=()
step() {  # step SECONDS TITLE CMD...: run CMD with a time limit; its output without warnings, or why it stopped
  local limit=$1 title=$2; shift 2
  echo "== $title"
  local start; start=$(date +%s)
  if ! timeout "$limit" "$@" > "$LOGS/last.log" 2>&1; then
    echo "(failed or timed out after ${limit} s)"
    FAILED+=("$title")
  fi
  grep -v -i "warn\|it/s\]\|s/it\]\|Loading weights" "$LOGS/last.log" | tail -"${TAIL:-12}" || true
  echo "($(( $(date +%s) - start )) s)"
}

BENCH=(python3 -m torch.distributed.run --standalone --nproc_per_node=1 tests/bench.py --shape "$SHAPE" --steps "$STEPS"
       --batch 8 --group 8 --max_new_tokens 64)

suite() {
  if [ $DRY = 1 ]; then
    TAIL=1 step 120 "pytest (collected only)" python3 -m pytest --collect-only -q tests
  elif python3 -c "import xdist" 2>/dev/null; then
    step 330 "pytest -n auto tests" python3 -m pytest -q -n auto tests
  else
    echo "(pytest-xdist not installed: the suite in one process, which may not finish in time)"
    step 330 "pytest tests" python3 -m pytest -q tests
  fi
  step 140 "decode at $ROLLOUT, compiled step" env CPT_COMPILE_DECODE=1 python3 tests/bench.py --shape "$SHAPE" \
    --decode_only --batch 8 --group 8 --max_new_tokens 64 --rollout "$ROLLOUT"
}

main_job() {  # from scratch: no run folder, no cached base row
  rm -rf "$LOGS/rft" "$LOGS/cache"
  local start; start=$(date +%s)
  TAIL=3 step "$1" "python3 cpt_rft.py ${MAIN[*]:-} (the main job)" env CPT_CACHE="$LOGS/cache" python3 cpt_rft.py \
    "${MAIN[@]}" --out "$LOGS/rft"
  echo "main job wall time $(( $(date +%s) - start )) s"
}

resumed_run() {  # a torchrun run of cpt_rft.py stopped once its first stage is written, then the same command
  local out=$LOGS/torchrun
  rm -rf "$out" "$LOGS/cache-torchrun"
  export CPT_CACHE=$LOGS/cache-torchrun
  local cmd=(python3 -m torch.distributed.run --standalone --nproc_per_node="$NPROC" cpt_rft.py "${RUN[@]}"
             --out "$out")
  echo "== ${cmd[*]}: stopped after stage 1, then again"
  "${cmd[@]}" > "$LOGS/torchrun-1.log" 2>&1 &
  local pid=$! rows=0
  for _ in $(seq 1 $(( $1 * 5 ))); do
    sleep 0.2
    rows=$(python3 -c "import json; print(len(json.load(open('$out/results.json'))['rows']))" 2>/dev/null || echo 0)
    if [ "$rows" -ge 2 ] || ! kill -0 $pid 2>/dev/null; then break; fi
  done
  kill -TERM $pid 2>/dev/null || true
  wait $pid || true
  echo "first run stopped with $rows rows (base and stage 1)"
  TAIL=8 step "$2" "the same command again" "${cmd[@]}"
}

case "$MODE" in
  suite) suite ;;
  bench)
    step 160 "bench --shape $SHAPE" "${BENCH[@]}" --rollout "$ROLLOUT"
    step 100 "bench --shape $SHAPE --grad_ckpt" "${BENCH[@]}" --grad_ckpt --rollout ""
    main_job 120
    resumed_run 60 40 ;;
  --dry-run)
    suite
    step 160 "bench --shape $SHAPE" "${BENCH[@]}" --rollout "$ROLLOUT"
    step 100 "bench --shape $SHAPE --grad_ckpt" "${BENCH[@]}" --grad_ckpt --rollout ""
    main_job 240
    resumed_run 150 150 ;;
  *) echo "usage: bash tests/gpu_check.sh suite | bench | --dry-run"; exit 2 ;;
esac
if [ ${#FAILED[@]} -gt 0 ]; then printf 'failed: %s\n' "${FAILED[@]}"; exit 1; fi
echo "gpu_check $MODE: every step ran"
