"""Continual post-training by supervised fine-tuning (SFT).

The model learns the tasks one after another, with no replay. At each stage it is trained with next-token
cross-entropy on the ground-truth answer of each task item:

    loss = - sum_{answer tokens t} log pi(y_t | image, question, y_<t)  /  (number of answer tokens in the batch)

The answer tokens are the answer and the end-of-turn token; system, user, image and padding tokens carry no loss
(P1: "cross-entropy on the ground-truth answer only"). The normaliser is the answer-token count of the whole global
batch, so gradient accumulation and several ranks give the same gradient as one big batch.
After each stage the model is evaluated on every task and on the held-out general tasks (loop.Run.finish_stage).

--sft_data picks the targets, on the same items, steps and batch for every choice:
  gold    the item's answer: on a task with several valid answers, the canonical one (the first by a fixed rule),
          as real SFT data are one annotator's answer
  self    P2's "SFT on RFT-simulated rollouts": the model's own correct samples (K per item, drawn at each step
          from the current model)
  oracle  the base's own distribution restricted to the valid answers: the correct ones of K samples per item
          from the frozen starting model (--model); RL's Razor's oracle SFT, which should move the model least
  voice   the canonical answer in the model's own words: its greedy reply (drawn at each step from the current
          model) with the answer it gives replaced by the canonical one, "It is cyan." -> "It is blue."
          (rewards.restate): it removes how the answer is said from SFT's distance, and keeps which answer
With self, oracle and voice ranks then hold different
numbers of targets; every rank still runs the same number of forwards (runtime.equal_chunks), as FSDP requires.
A non-finite loss or gradient norm stops the run before the optimizer steps on it (runtime.Diverged).
With --lora_rank R only low-rank adapters on the decoder's linear layers train (lora.py; the vision tower and
everything else frozen); each stage's checkpoint has them merged into plain weights.

    python3 cpt_sft.py                                # the tiny default, a few minutes on 2 CPU cores
    python3 cpt_sft.py --multitask                    # all tasks at once: the upper bound
    python3 cpt_sft.py --sft_data self                # SFT on the model's own correct rollouts (P2)
    python3 cpt_sft.py --sft_data oracle              # SFT on the base's own correct samples (RL's Razor)
    python3 cpt_sft.py --sft_data voice               # the canonical answers, said in the model's own words
    python3 cpt_sft.py --lora_rank 8                  # LoRA-SFT: rank-8 adapters only, merged into each checkpoint
    python3 cpt_sft.py --model /ckpt/Qwen2.5-VL-7B-Instruct --tasks a.jsonl b.jsonl --lr 1e-5 --format boxed
    torchrun --standalone --nproc_per_node=8 cpt_sft.py --model /ckpt/Qwen2.5-VL-7B-Instruct \\
        --tasks a.jsonl b.jsonl --lr 1e-5 --format boxed
"""
import argparse
import time

from tqdm import tqdm

import runtime
from data.tasks import Stream
from flags import HelpFormatter, add_common_args, input_errors, refuse, settle_defaults
from loop import Run
from rollouts import restated_replies, rollout


def sft_loss(logp, mask, n_tokens):
    """Masked next-token cross-entropy: -sum(log p over answer tokens) / n_tokens (the global batch's count)."""
    return -(logp * mask).sum() / n_tokens


def sft_step(lm, opt, pairs, fmt, micro_batch, device, filler, grad_clip=1.0):
    """One optimizer step on this rank's (item, target ids) pairs. Returns (loss, grad norm, answer tokens).
    `filler` is an item for the stand-in passes of a rank with fewer (or no) pairs: they keep FSDP's collectives
    in step and add nothing."""
    n_tokens = runtime.all_sum([sum(len(t) for _, t in pairs)], device)[0]
    total = 0.0
    for chunk, real in runtime.equal_chunks(pairs, micro_batch, device, (filler, [lm.eos_id])):
        logp, mask = runtime.token_logprobs(lm, [it for it, _ in chunk], fmt, [t for _, t in chunk], device)
        # FSDP averages gradients over ranks; the loss already divides by the global count, so undo the average
        loss = sft_loss(logp, mask, n_tokens) * runtime.world() * real
        loss.backward()
        total += loss.item() / runtime.world()
    total = runtime.all_sum([total], device)[0]
    norm = runtime.optimizer_step(lm.model, opt, grad_clip, total)
    return total, norm, n_tokens


def self_targets(lm, items, fmt, group, temperature, max_new_tokens, device):
    """K samples per item from `lm`, the correct ones as (item, completion ids) pairs: P2's RFT-simulated data when
    `lm` is the model being trained, the oracle's data when it is the frozen base."""
    table = rollout(lm, items, fmt, group, temperature, max_new_tokens, device)
    return [(row["item"], comp) for row in table for comp, s in zip(row["completions"], row["scores"]) if s.correct]


# the learning rates `bash compare.sh --sweep` chose on the validation split: far-off labels (gold) break the tiny base
# above 1e-5, the model's own samples (self, oracle) stand 1e-4
LR_BY_DATA = {"gold": 1e-5, "voice": 3e-5, "self": 1e-4, "oracle": 1e-4}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_common_args(p, steps=40, micro_batch=16, lr=None,
                    lr_note="None: by --sft_data, chosen on val: " +
                    ", ".join(f"{k} {v:g}" for k, v in LR_BY_DATA.items()) + "; P1: 1e-5 on 7B")
    g = p.add_argument_group("SFT targets (P2's self-generated data, RL's Razor's oracle)")
    g.add_argument("--sft_data", default="gold", choices=["gold", "self", "oracle", "voice"],
                   help="canonical answer, own correct rollouts, the base's correct samples, or the canonical "
                        "answer in the model's words")
    g.add_argument("--k", type=int, default=8, help="samples per item for --sft_data self / oracle")
    args = p.parse_args(argv)
    args.lr = LR_BY_DATA[args.sft_data] if args.lr is None else args.lr
    args = settle_defaults(args)
    refuse(input_errors(args, positive=("k",)))

    with Run("sft", args) as run:
        lm, device = run.lm, run.device
        oracle = None  # the frozen starting model, for --sft_data oracle
        for stage in run.pending_stages():
            if args.sft_data == "oracle" and oracle is None:
                oracle = runtime.load_model(args.model, device)
                oracle.model.requires_grad_(False).eval()
            opt = runtime.adamw(lm.model, args.lr, args.weight_decay, device)
            stream = Stream(stage.specs, (args.seed, stage.k))
            lm.model.train()
            # a multi-task stage trains on all tasks: it gets the whole sequence's budget, steps x tasks
            for step in tqdm(range(args.steps * len(stage.specs)), desc=f"sft stage {stage.k}",
                             disable=runtime.rank() != 0):
                t0 = time.time()
                items = runtime.share(stream.next(args.batch_size))  # the global batch: this rank's part
                if args.sft_data == "voice":
                    pairs = restated_replies(lm, items, args.format, args.max_new_tokens, device)
                elif args.sft_data != "gold":
                    sampler = lm if args.sft_data == "self" else oracle
                    pairs = self_targets(sampler, items, args.format, args.k, args.temperature, args.max_new_tokens,
                                         device)
                else:
                    pairs = [(it, runtime.target_ids(lm, it["answer"], args.format)) for it in items]
                if runtime.all_sum([len(pairs)], device)[0] == 0:
                    run.log(stage=stage.k, step=step, kept=0, skipped_step=True)
                    continue
                loss, norm, n_tokens = sft_step(lm, opt, pairs, args.format, args.micro_batch, device, items[0],
                                                args.grad_clip)
                run.log(stage=stage.k, step=step, loss=round(loss, 5), grad_norm=round(norm, 4), tokens=int(n_tokens),
                        items=int(runtime.all_sum([len(pairs)], device)[0]), seconds=round(time.time() - t0, 3))
            run.finish_stage(stage)
    return run.res


if __name__ == "__main__":
    runtime.run_script(main)
