#!/usr/bin/env bash
# The GPU path measured once, in at most about 8 minutes on one GPU: a Qwen2.5-VL-3B-shape model (random init,
# from a config) under torchrun FSDP2 in bf16, with and without activation checkpointing (SFT tokens/s and MFU,
# GRPO rollout tokens/s and its share of a step, the decode against the memory-bandwidth bound, peak memory), then
# the default comparison's wall time. Its printed lines are what the README's GPU section quotes.
#   bash tests/gpu_check.sh              # on the GPU machine
#   bash tests/gpu_check.sh --dry-run    # on a CPU: the same steps on the tiny shape, to check the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --dry-run ]; then SHAPE=tiny; STEPS=1; COMPARE=(--quick); else SHAPE=3b; STEPS=3; COMPARE=(); fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU: dry run on $(nproc) CPU cores"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
for ckpt in "" --grad_ckpt; do
  echo "== bench --shape $SHAPE $ckpt"
  timeout 150 python3 -m torch.distributed.run --standalone --nproc_per_node=1 tests/bench.py --shape "$SHAPE" \
    --steps "$STEPS" --batch 8 --group 8 --max_new_tokens 64 $ckpt 2>&1 | grep -v Warning || echo "(bench failed or timed out)"
done
echo "== compare.sh ${COMPARE[*]:-}"
start=$(date +%s)
mkdir -p runs; OUT=runs/gpu-check timeout 300 bash compare.sh "${COMPARE[@]}" > runs/gpu-check.log 2>&1 || echo "(compare.sh failed or timed out; see runs/gpu-check.log)"
echo "compare.sh wall time $(( $(date +%s) - start )) s"
tail -25 runs/gpu-check.log
