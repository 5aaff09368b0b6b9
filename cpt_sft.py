"""Continual post-training by supervised fine-tuning (SFT).

The model learns the tasks one after another, with no replay. At each stage it is trained with next-token
cross-entropy on the ground-truth answer of each task item:

    loss = - sum_{answer tokens t} log pi(y_t | image, question, y_<t)  /  (number of answer tokens in the batch)

The answer tokens are the answer and the end-of-turn token; system, user, image and padding tokens carry no loss
(P1: "cross-entropy on the ground-truth answer only"). The normaliser is the answer-token count of the whole global
batch, so gradient accumulation and several ranks give the same gradient as one big batch.
After each stage the model is evaluated on every task and on the held-out general tasks (common.run_cpt).

--sft_data self is P2's "SFT on RFT-simulated rollouts": the targets are the model's own correct samples
(K per item, drawn at the start of each stage from the current model) instead of the ground truth.

    python cpt_sft.py                                 # the tiny default, a few minutes on 2 CPU cores
    python cpt_sft.py --multitask                     # all tasks at once: the upper bound
    python cpt_sft.py --sft_data self                 # SFT on the model's own correct rollouts (P2)
    python cpt_sft.py --model /ckpt/Qwen2.5-VL-7B-Instruct --tasks a.jsonl b.jsonl --lr 1e-5 --format boxed
    torchrun --standalone --nproc_per_node=8 cpt_sft.py --model /ckpt/Qwen2.5-VL-7B-Instruct ...
"""
import argparse
import time

import torch
from tqdm import tqdm

import common
from common import Stream


def sft_loss(logp, mask, n_tokens):
    """Masked next-token cross-entropy: -sum(log p over answer tokens) / n_tokens (the global batch's count)."""
    return -(logp * mask).sum() / n_tokens


def sft_target(b, answer, fmt):
    """Token ids the model is taught to emit: the answer in the run's format, then end-of-turn."""
    text = {"plain": answer, "boxed": f"\\boxed{{{answer}}}", "tags": f"<answer>{answer}</answer>"}[fmt]
    return b.tok(text, add_special_tokens=False)["input_ids"] + [b.eos_id]


def sft_step(b, opt, items, targets, fmt, micro_batch, device, grad_clip=1.0, weight=1.0):
    """One optimizer step on (items, target ids) of this rank. Returns (loss, grad norm, answer tokens).
    weight=0 makes this rank's pass a stand-in that keeps FSDP's collectives in step but adds nothing."""
    n_local = sum(len(t) for t in targets) * weight
    n_tokens = common.all_sum([n_local], device)[0]
    total = 0.0
    for i in range(0, len(items), micro_batch):
        logp, mask = common.token_logprobs(b, items[i:i + micro_batch], fmt, targets[i:i + micro_batch], device)
        # FSDP averages gradients over ranks; the loss already divides by the global count, so undo the average
        loss = sft_loss(logp, mask, n_tokens) * common.world() * weight
        loss.backward()
        total += loss.item() / common.world()
    norm = torch.nn.utils.clip_grad_norm_(b.model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return common.all_sum([total], device)[0], float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm), \
        n_tokens


def self_targets(b, items, args, device):
    """P2's RFT-simulated data: K samples per item from the current model, keep the correct ones."""
    table = common.rollout(b, items, args.format, args.k, args.temperature, args.max_new_tokens, device)
    kept_items, kept_targets = [], []
    for it, row in zip(items, table):
        for comp, s in zip(row["completions"], row["scores"]):
            if s.correct:
                kept_items.append(it)
                kept_targets.append(comp)
    return kept_items, kept_targets


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    common.add_common_args(p, steps=60, micro_batch=16, lr=3e-5, lr_note="tuned on val; P1: 1e-5 on 7B")
    g = p.add_argument_group("self-generated data (P2)")
    g.add_argument("--sft_data", default="gold", choices=["gold", "self"], help="ground truth, or own correct rollouts")
    g.add_argument("--k", type=int, default=8, help="rollouts per item for --sft_data self")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for --sft_data self")
    g.add_argument("--max_new_tokens", type=int, default=16, help="rollout length for --sft_data self")
    args = p.parse_args(argv)

    def train_stage(b, specs, stage, log):
        device = next(b.model.parameters()).device
        opt = torch.optim.AdamW(b.model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        stream = Stream(specs, (args.seed, stage))
        b.model.train()
        per_rank = args.batch_size // common.world()
        # a multi-task stage trains on all tasks: it gets the whole sequence's budget, steps x tasks
        for step in tqdm(range(args.steps * len(specs)), desc=f"sft stage {stage}", disable=common.rank() != 0):
            t0, weight = time.time(), 1.0
            items = stream.next(args.batch_size)[common.rank() * per_rank:(common.rank() + 1) * per_rank]
            if args.sft_data == "self":
                items, targets = self_targets(b, items, args, device)
                if common.all_sum([len(items)], device)[0] == 0:
                    log(stage=stage, step=step, kept=0)
                    continue
                if not items:  # this rank has none correct: a zero-weight pass keeps FSDP's collectives in step
                    items, targets, weight = stream.next(1), [[b.eos_id]], 0.0
            else:
                targets = [sft_target(b, it["answer"], args.format) for it in items]
            loss, norm, ntok = sft_step(b, opt, items, targets, args.format, args.micro_batch, device, args.grad_clip,
                                        weight)
            log(stage=stage, step=step, loss=round(loss, 5), grad_norm=round(norm, 4), tokens=ntok,
                items=len(items), seconds=round(time.time() - t0, 3))

    return common.run_cpt(args, "sft", train_stage)


if __name__ == "__main__":
    main()
