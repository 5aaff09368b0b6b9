"""Rollout-based instance filtering (RIF-RFT, P1) and SFT data from the model's own correct rollouts (P2).

Roll out every training instance K times with the current model, score each rollout with the task's verifier,
and keep per instance the mean and variance of the reward. Then keep the instances that can teach the model:

  incompetent      drop instances whose K rollouts are all wrong (pass rate 0)
  zero_variance    drop all-wrong and all-right instances: no reward variance, so no GRPO gradient (P1's reading)
  pass_rate LO HI  keep LO < pass rate < HI (open-r1's offline filter)

Rewards are compared with a tolerance (REWARD_TOL), never with ==: 0.9*1 + 0.1*1 is not exactly 1.0 in floats.
--emit correct writes the correct rollouts themselves as an SFT data set (P2's "RFT-simulated rollouts").
The stats also give P2's data view: the per-token NLL under the model of the gold answers (what SFT would teach),
of its own rollouts and of its own correct rollouts (P2: SFT forgets more when the first is much higher).
cpt_rft.py --rif MODE runs the same filter at the start of every stage with the model that is about to learn.

    python filter.py --task left_color --n 256 --mode zero_variance --out runs/filter
    python filter.py --task data.jsonl --model /ckpt/Qwen2.5-VL-7B-Instruct --format boxed --k 8 --mode incompetent
    python filter.py --task jigsaw --emit correct --out runs/self-sft      # SFT data from own correct rollouts
    torchrun --standalone --nproc_per_node=8 filter.py --task data.jsonl --model ... --mode zero_variance
"""
import argparse
import json
import os
import time

import torch

import common
from data.tasks import BUILTIN, load_split, task_name

REWARD_TOL = 1e-6  # rewards closer than this are equal; a group whose rewards span less has zero variance


# ----------------------------------------------------------------------------- the formulas

def reward_stats(rewards):
    """Mean and (population) variance of one instance's K rewards."""
    k = len(rewards)
    mean = sum(rewards) / k
    return mean, sum((r - mean) ** 2 for r in rewards) / k


def zero_variance(rewards, tol=REWARD_TOL):
    """True when all K rewards are equal within tol: GRPO's advantage is then 0 for the whole group."""
    return max(rewards) - min(rewards) <= tol


def pass_rate(correct):
    """Fraction of the K rollouts that are entirely correct."""
    return sum(bool(c) for c in correct) / len(correct)


def keep(mode, rewards, correct, low=0.0, high=1.0, tol=REWARD_TOL):
    """Whether an instance with these K rollouts is kept under a filter mode."""
    if mode == "none":
        return True
    if mode == "incompetent":
        return pass_rate(correct) > 0
    if mode == "zero_variance":
        return not zero_variance(rewards, tol)
    if mode == "pass_rate":
        return low + tol < pass_rate(correct) < high - tol
    raise ValueError(f"unknown filter mode {mode!r}")


def token_nll(logp, mask):
    """(summed negative log-likelihood in nats, token count) of completions under the model. Their ratio is P2's
    measure of how far a data set lies from the model's own distribution: exp(ratio) is its perplexity."""
    return -float((logp * mask).sum()), float(mask.sum())


def histogram(rates, bins=8):
    """Counts of pass rates in `bins` equal bins of [0, 1] (1.0 falls in the last bin)."""
    counts = [0] * bins
    for r in rates:
        counts[min(int(r * bins), bins - 1)] += 1
    return counts


# ----------------------------------------------------------------------------- the act

def filter_items(b, items, mode, args, device, low=0.0, high=1.0):
    """Roll out this rank's items K times; return (kept items, stats summed over ranks, the rollout table)."""
    t0 = time.time()
    table = common.rollout(b, items, args.format, args.k, args.temperature, args.max_new_tokens, device,
                           args.gen_batch)
    kept = [row["item"] for row in table
            if keep(mode, row["rewards"], [s.correct for s in row["scores"]], low, high)]
    rates = [pass_rate([s.correct for s in row["scores"]]) for row in table]
    tokens = sum(len(c) for row in table for c in row["completions"])
    n, n_kept, tokens, *hist = common.all_sum([len(items), len(kept), tokens] + histogram(rates), device)
    stats = {"mode": mode, "k": args.k, "instances": int(n), "kept": int(n_kept), "kept_fraction": n_kept / n,
             "pass_rate_histogram": [int(h) for h in hist], "rollout_tokens": int(tokens),
             "rollout_seconds": round(time.time() - t0, 2)}
    return kept, stats, table


@torch.no_grad()
def data_nll(b, table, fmt, device, batch_size=64):
    """Per-token NLL under the model (temperature 1) of three data sets built from this rank's rollout table:
    the gold answers as SFT would teach them, the model's own rollouts, and its own correct rollouts (P2's
    "RFT-simulated" SFT data). Sums over all ranks; every rank runs the same number of forwards (FSDP)."""
    from cpt_sft import sft_target
    sets = {"gold": [(row["item"], sft_target(b, row["item"]["answer"], fmt)) for row in table],
            "own": [(row["item"], c) for row in table for c in row["completions"]],
            "own_correct": [(row["item"], c) for row in table for c, s in zip(row["completions"], row["scores"])
                            if s.correct]}
    out = {}
    for name, pairs in sets.items():
        nll = tokens = 0.0
        for chunk, real in common.equal_chunks(pairs, batch_size, device, (table[0]["item"], [b.eos_id])):
            logp, mask = common.token_logprobs(b, [x for x, _ in chunk], fmt, [y for _, y in chunk], device)
            s, n = token_nll(logp, mask)
            nll, tokens = nll + real * s, tokens + real * n
        nll, tokens = common.all_sum([nll, tokens], device)
        out[f"{name}_nll_per_token"] = round(nll / tokens, 4) if tokens else None
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=common.DEFAULT_MODEL, help="HF checkpoint folder")
    g.add_argument("--task", required=True, help="built-in task name or JSONL file")
    g.add_argument("--split", default="train", help="split to filter")
    g.add_argument("--n", type=int, default=256, help="instances (built-in tasks; JSONL: all lines if omitted)")
    g.add_argument("--format", default="plain", choices=["plain", "boxed", "tags"], help="answer format")
    g = p.add_argument_group("rollouts")
    g.add_argument("--k", type=int, default=8, help="rollouts per instance")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--max_new_tokens", type=int, default=16, help="rollout length")
    g.add_argument("--gen_batch", type=int, default=256, help="sequences per generate call")
    g = p.add_argument_group("filter and output")
    g.add_argument("--mode", default="zero_variance", choices=["none", "incompetent", "zero_variance", "pass_rate"])
    g.add_argument("--low", type=float, default=0.1, help="pass_rate mode: keep pass rate above this")
    g.add_argument("--high", type=float, default=0.9, help="pass_rate mode: keep pass rate below this")
    g.add_argument("--emit", default="kept", choices=["kept", "correct"], help="write kept instances or correct rollouts")
    g.add_argument("--out", default="runs/filter", help="output folder (kept.jsonl or correct.jsonl, stats.json)")
    g.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    _, _, device = common.init_dist()
    common.seed_all(args.seed, "filter")
    b = common.load_model(args.model, device)
    if common.is_dist():
        common.shard_model(b.model, device)
    items = load_split(args.task, args.split, args.n if args.task in BUILTIN else None)
    mine = items[common.rank()::common.world()]
    kept, stats, table = filter_items(b, mine, args.mode, args, device, args.low, args.high)
    stats.update(data_nll(b, table, args.format, device))
    os.makedirs(args.out, exist_ok=True)
    name = "kept.jsonl" if args.emit == "kept" else "correct.jsonl"
    rows = []
    for it_row in table:
        it = it_row["item"]
        if args.emit == "kept" and it in kept:
            rows.append(it)
        elif args.emit == "correct":
            rows += [{**it, "answer": t, "gold": it["answer"]} for t, s in zip(it_row["texts"], it_row["scores"])
                     if s.correct]
    # every rank writes its part; rank 0 then joins them, so the output does not depend on the world size's order
    part = os.path.join(args.out, f".{name}.rank{common.rank()}")
    img_dir = os.path.join(args.out, "images")
    with open(part, "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps(_jsonable(r, img_dir, f"{common.rank()}-{i}", args.out)) + "\n")
    if common.is_dist():
        torch.distributed.barrier()
    if common.rank() == 0:
        with open(os.path.join(args.out, name + ".tmp"), "w") as f:
            for r in range(common.world()):
                pth = os.path.join(args.out, f".{name}.rank{r}")
                f.write(open(pth).read())
                os.remove(pth)
        os.replace(os.path.join(args.out, name + ".tmp"), os.path.join(args.out, name))
        stats.update(task=task_name(args.task), model=args.model, format=args.format, emitted=name)
        common.write_json(os.path.join(args.out, "stats.json"), stats)
        common.print0(json.dumps(stats, indent=1))
    common.cleanup()


def _jsonable(item, img_dir, tag, root):
    """An item as an EasyR1 JSONL line; in-memory images (built-in tasks) are written as PNGs next to it."""
    paths = []
    for j, im in enumerate(item["images"]):
        if isinstance(im, str):
            paths.append(os.path.relpath(im, root))
        else:
            os.makedirs(img_dir, exist_ok=True)
            pth = os.path.join(img_dir, f"{tag}-{j}.png")
            im.save(pth)
            paths.append(os.path.relpath(pth, root))
    return {"problem": item["problem"], "answer": item["answer"], "images": paths, "kind": item["kind"],
            **({"gold": item["gold"]} if "gold" in item else {})}


if __name__ == "__main__":
    main()
