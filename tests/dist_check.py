"""Run under plain python and under `torchrun --nproc_per_node=2` (gloo, CPU): a few SFT steps and GRPO updates
on fixed data with the same global batch, FSDP2-sharded when distributed; rank 0 writes losses and a full state
dict to OUT. tests/test_dist.py compares the two runs. The later steps give the ranks uneven work, as self-SFT
(different numbers of correct rollouts, one rank none), silent GRPO groups and RIF do: 3 + 1 and 4 + 0 items,
a KL term to a reference model; the model is then saved by save_checkpoint and loaded back. `--lora_rank R`: the
same with LoRA adapters (applied before sharding; only they train; the checkpoint is merged). `--lengths` instead checks that ranks generating different
lengths (rank 0 stops at once, rank 1 never) do not hang under synced_gpus."""
import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora  # noqa: E402
import runtime  # noqa: E402
from cpt_rft import GRPOConfig, grpo_update  # noqa: E402
from cpt_sft import sft_step  # noqa: E402
from data.tasks import builtin_items  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--lengths", action="store_true")
    p.add_argument("--loss_agg", default="token_mean")
    p.add_argument("--lora_rank", type=int, default=0)
    a = p.parse_args()
    torch.use_deterministic_algorithms(True)
    rank, world, device = runtime.init_dist()
    # count checkpoint reads per rank: under torchrun only rank 0 may read (and hold) the whole model
    import transformers
    reads, read = [0], transformers.AutoModelForImageTextToText.from_pretrained.__func__

    def counting(cls, *args, **kw):
        reads[0] += 1
        return read(cls, *args, **kw)
    transformers.AutoModelForImageTextToText.from_pretrained = classmethod(counting)
    torch.manual_seed(0)
    # sharded under torchrun: rank 0 reads, all get a shard
    b = runtime.load_model(runtime.DEFAULT_MODEL, device, lora_rank=a.lora_rank, lora_alpha=2.0 * a.lora_rank)
    if a.lengths:
        eos_bias = torch.zeros(b.model.config.text_config.vocab_size)
        eos_bias[b.eos_id] = 50.0 if rank == 0 else -1e9  # rank 0: one token; rank 1: the whole budget
        b.model.lm_head.register_forward_hook(lambda m, i, o: o + eos_bias)
        comps, trunc = runtime.sample(b, builtin_items("color", "test", 3), "plain", 12, device=device)
        lens = runtime.all_sum([max(map(len, comps)) if r == rank else 0 for r in range(world)], device)
        if rank == 0:
            with open(os.path.join(a.out, "lengths.txt"), "w") as f:
                f.write(" ".join(str(int(x)) for x in lens))
        runtime.cleanup()
        return
    # SFT: 3 steps, global batch 8 items split 4 + 4 over two ranks
    items = builtin_items("left_color", "train", 24) + builtin_items("add", "train", 24)
    # SGD, not AdamW: Adam divides by sqrt(v), turning 1e-7 rounding in near-zero gradients into lr-sized steps;
    # the check is about gradients and normalisers across ranks, which SGD passes through unamplified
    # the labels are said in the base's voice ("It is red."): the bare answers cost ~15 nats a token under it, and
    # SGD at this rate on such losses throws the model far enough that the GRPO steps' gradient norms reach 1e5
    voice = lambda answer: runtime.target_ids(b, f"It is {answer}.", "plain")
    opt = torch.optim.SGD(lora.trainable_parameters(b.model), lr=0.05)
    losses = []
    per = 8 // world
    for step in range(3):
        batch = items[step * 8:(step + 1) * 8][rank * per:(rank + 1) * per]
        pairs = [(it, voice(it["answer"])) for it in batch]
        loss, _, _ = sft_step(b, opt, pairs, "plain", 2, device, batch[0])   # micro-batch 2: accumulation too
        losses.append(loss)
    # uneven SFT, as --sft_data self gives: the global pairs split 3 + 1, then 4 + 0 (micro-batch 1); image items
    # on every rank, since a VLM's vision tower is an FSDP unit that every rank must run alike
    uneven = builtin_items("top_color", "train", 8)
    for step, split in ((0, 3), (1, 4)):
        pairs = [(it, voice(it["answer"])) for it in uneven[step * 4:step * 4 + 4]]
        mine = pairs if world == 1 else (pairs[:split] if rank == 0 else pairs[split:])
        loss, _, _ = sft_step(b, opt, mine, "plain", 1, device, uneven[0])
        losses.append(loss)
    # GRPO: fixed "rollouts" (varied lengths) and advantages, 2 updates, with a KL term to a reference
    cfg = GRPOConfig(micro_batch=3, ppo_epochs=2, kl_coef=0.05, loss_agg=a.loss_agg, max_new_tokens=8)
    ref = runtime.load_model(runtime.DEFAULT_MODEL, device)
    pool = builtin_items("right_shape", "train", 8)
    seqs = [(it, b.tok("It is " + " ".join(["circle"] * (1 + i % 4)) + ".")["input_ids"] + [b.eos_id],
             (-1) ** i * (0.5 + i / 10)) for i, it in enumerate(pool)]
    per = len(seqs) // world
    m = grpo_update(b, ref, opt, seqs[rank * per:(rank + 1) * per], cfg, device)
    losses.append(m["grad_norm"])
    # uneven GRPO: 5 + 1 sequences with silent sequences counted in the normaliser (2 + 0), then 6 + 0
    for split in (5, 6):
        mine = seqs[:6] if world == 1 else (seqs[:split] if rank == 0 else seqs[split:6])
        extra = (7, 2) if world == 1 else ((7, 2) if rank == 0 else (0, 0))
        m = grpo_update(b, ref, opt, mine, cfg, device, filler=pool[0], normaliser_extra=extra)
        losses.append(m["grad_norm"])
    sd = lora.merged(runtime.full_state_dict(b.model), lora.scale_of(b.model))  # what save_checkpoint writes
    runtime.save_checkpoint(b, os.path.join(a.out, f"ckpt-world{world}"))
    reads = runtime.all_sum([reads[0] if r == rank else 0 for r in range(world)], device)
    if rank == 0:
        torch.save({"losses": losses, "state": sd, "reads": reads}, os.path.join(a.out, f"world{world}.pt"))
    # free the sharded models while the process group exists (as loop.Run does): left to interpreter teardown, a gloo
    # rank sometimes aborted at exit ("terminate called without an active exception")
    b.model = ref.model = opt = None
    gc.collect()
    runtime.cleanup()


if __name__ == "__main__":
    main()
