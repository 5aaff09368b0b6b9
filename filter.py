"""Rollout-based instance filtering (RIF-RFT, P1) and SFT data from the model's own correct rollouts (P2).

Roll out every training instance K times with the current model, score each rollout with the task's verifier,
then keep the instances that can teach the model:

  incompetent      drop instances whose K rollouts are all wrong (pass rate 0)
  zero_variance    drop all-wrong and all-right instances: no reward variance, so no GRPO gradient (P1's reading)
  pass_rate LO HI  keep LO < pass rate < HI (open-r1's offline filter)

Rewards are compared with a tolerance, never with ==. The filter is written out in rollouts.py (`keep`,
`filter_items`), which cpt_rft.py --rif runs at the start of every stage; this script is its stand-alone front end,
with the data view.
--emit correct writes the correct rollouts themselves as an SFT data set (P2's "RFT-simulated rollouts").
The stats also give P2's data view: the NLL under the model (per token and per answer) of the gold answers (what
SFT would teach: on a multi-answer task the canonical one), of its own rollouts, of its own correct rollouts
(P2: SFT forgets more when the first is much higher) and of the gold answers in its own words (SFT's voice-only
labels: their distance is the *which answer* part alone).
cpt_rft.py --rif MODE runs the same filter at the start of every stage with the model that is about to learn.

    python3 filter.py --task left_color --n 256 --mode zero_variance --out runs/filter
    python3 filter.py --task data.jsonl --model /ckpt/Qwen2.5-VL-7B-Instruct --format boxed --k 8 --mode incompetent
    python3 filter.py --task jigsaw --emit correct --out runs/self-sft      # SFT data from own correct rollouts
    torchrun --standalone --nproc_per_node=8 filter.py --task data.jsonl --model /ckpt/Qwen2.5-VL-7B-Instruct --mode zero_variance
"""
import argparse
import json
import os

import torch

import runtime
from rollouts import filter_items, restated_replies
from flags import (NEW_TOKENS, HelpFormatter, add_format_flag, add_model_flag, add_sampling_flags, budget_errors,
                   model_errors, out_errors, refuse)
from data.tasks import BUILTIN, DataError, load_split, task_name, text_model_errors


# ----------------------------------------------------------------------------- the formula

def token_nll(logp, mask):
    """(summed negative log-likelihood in nats, token count) of completions under the model. Their ratio is P2's
    measure of how far a data set lies from the model's own distribution: exp(ratio) is its perplexity."""
    return -float((logp * mask).sum()), float(mask.sum())


# ----------------------------------------------------------------------------- the data view

@torch.no_grad()
def data_nll(lm, table, fmt, device, max_new_tokens, batch_size=64):
    """Per-token NLL under the model (temperature 1) of four data sets built from this rank's rollout table:
    the gold answers as SFT would teach them, the model's own rollouts, its own correct rollouts (P2's
    "RFT-simulated" SFT data), and the gold answers said in its own words (cpt_sft.py --sft_data voice: its greedy
    reply, restated). Sums over all ranks; every rank runs the same number of forwards (FSDP)."""
    sets = {"gold": [(row["item"], runtime.target_ids(lm, row["item"]["answer"], fmt)) for row in table],
            "own": [(row["item"], c) for row in table for c in row["completions"]],
            "own_correct": [(row["item"], c) for row in table for c, s in zip(row["completions"], row["scores"])
                            if s.correct],
            "voice": restated_replies(lm, [row["item"] for row in table], fmt, max_new_tokens, device)}
    out = {}
    for name, pairs in sets.items():
        nll = tokens = 0.0
        for chunk, real in runtime.equal_chunks(pairs, batch_size, device, (table[0]["item"], [lm.eos_id])):
            logp, mask = runtime.token_logprobs(lm, [x for x, _ in chunk], fmt, [y for _, y in chunk], device)
            s, n = token_nll(logp, mask)
            nll, tokens = nll + real * s, tokens + real * n
        nll, tokens, answers = runtime.all_sum([nll, tokens, len(pairs)], device)
        out[f"{name}_nll_per_token"] = round(nll / tokens, 4) if tokens else None
        # per answer too: a one-word answer is two tokens (the word and the end of turn), and the second is
        # almost free, so the per-token figure halves a one-word answer's distance
        out[f"{name}_nll_per_answer"] = round(nll / answers, 4) if answers else None
    return out


def filter_errors(args):
    """Every problem with filter.py's input, found before the model loads: a run of K rollouts per instance is long,
    and nothing of it may be lost to a flag that could have been read first."""
    errors = [f"--{k} {getattr(args, k)}: must be at least 1" for k in ("n", "k", "max_new_tokens", "gen_batch")
              if getattr(args, k) is not None and getattr(args, k) < 1]
    if args.mode in ("zero_variance", "pass_rate") and args.k == 1:
        errors.append(f"--k 1 with --mode {args.mode}: one rollout has no variance and a pass rate of 0 or 1, so "
                      f"nothing would be kept; use --k 2 or more (P1: 8)")
    if args.mode == "pass_rate" and not 0 <= args.low < args.high <= 1:
        errors.append(f"--low {args.low} --high {args.high}: pass_rate keeps low < pass rate < high, so it needs "
                      f"0 <= low < high <= 1")
    if not (args.temperature > 0 and args.temperature < float("inf")):
        errors.append(f"--temperature {args.temperature}: must be a positive number")
    errors += out_errors(args.out)
    model_errs, cfg, _ = model_errors(args.model)
    errors += model_errs
    if cfg is None:
        return errors
    errors += budget_errors(cfg, args.model, max_new_tokens=args.max_new_tokens)
    try:
        items = load_split(args.task, args.split, args.n)
    except DataError as e:
        return errors + [str(e)]
    return errors + text_model_errors(args.task, items, runtime.is_vlm_config(cfg), args.model)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    g = p.add_argument_group("model and data")
    add_model_flag(g)
    g.add_argument("--task", required=True, help="built-in task name or JSONL file")
    g.add_argument("--split", default="train", choices=["train", "val", "test"], help="split to filter")
    g.add_argument("--n", type=int, default=None,
                   help="instances (default: 256 of a built-in task, every line of the split of a JSONL file)")
    add_format_flag(g)
    g = p.add_argument_group("rollouts")
    g.add_argument("--k", type=int, default=8, help="rollouts per instance: the group size G (P1's K)")
    add_sampling_flags(g, "a rollout")
    g.add_argument("--gen_batch", type=int, default=256, help="sequences per generate call")
    g = p.add_argument_group("filter and output")
    g.add_argument("--mode", default="zero_variance", choices=["none", "incompetent", "zero_variance", "pass_rate"],
                   help="which instances to keep (see above)")
    g.add_argument("--low", type=float, default=0.1, help="pass_rate mode: keep pass rate above this")
    g.add_argument("--high", type=float, default=0.9, help="pass_rate mode: keep pass rate below this")
    g.add_argument("--emit", default="kept", choices=["kept", "correct"], help="write kept instances or correct rollouts")
    g.add_argument("--out", default="runs/filter", help="output folder (kept.jsonl or correct.jsonl, stats.json)")
    g.add_argument("--seed", type=int, default=0, help="seed of the rollouts' sampling")
    args = p.parse_args(argv)
    args.max_new_tokens = args.max_new_tokens or NEW_TOKENS[args.format]
    if args.n is None and args.task in BUILTIN:
        args.n = 256
    refuse(filter_errors(args))
    items = load_split(args.task, args.split, args.n)

    _, _, device = runtime.init_dist()
    runtime.seed_all(args.seed, "filter")
    lm = runtime.load_model(args.model, device)
    mine = runtime.share(items)
    flags, stats, table = filter_items(lm, mine, args.mode, args.format, args.k, args.temperature,
                                              args.max_new_tokens, device, args.gen_batch, args.low, args.high)
    stats.update(data_nll(lm, table, args.format, device, args.max_new_tokens))
    os.makedirs(args.out, exist_ok=True)
    name = "kept.jsonl" if args.emit == "kept" else "correct.jsonl"
    rows = []
    for row, kept in zip(table, flags):
        it = row["item"]
        if args.emit == "kept" and kept:
            rows.append(it)
        elif args.emit == "correct":
            rows += [{**it, "answer": t, "gold": it["answer"]} for t, s in zip(row["texts"], row["scores"])
                     if s.correct]
    # every rank writes its part; rank 0 then joins them, so the output does not depend on the world size's order
    part = os.path.join(args.out, f".{name}.rank{runtime.rank()}")
    img_dir = os.path.join(args.out, "images")
    with open(part, "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps(_jsonable(r, img_dir, f"{runtime.rank()}-{i}", args.out)) + "\n")
    if runtime.is_dist():
        torch.distributed.barrier()
    if runtime.rank() == 0:
        with open(os.path.join(args.out, name + ".tmp"), "w") as f:
            for r in range(runtime.world()):
                pth = os.path.join(args.out, f".{name}.rank{r}")
                f.write(open(pth).read())
                os.remove(pth)
        os.replace(os.path.join(args.out, name + ".tmp"), os.path.join(args.out, name))
        stats.update(task=task_name(args.task), model=args.model, format=args.format, emitted=name)
        runtime.write_json(os.path.join(args.out, "stats.json"), stats)
        runtime.print0(json.dumps(stats, indent=1))
    runtime.cleanup()


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
            **{k: item[k] for k in ("valid", "gold") if k in item}}


if __name__ == "__main__":
    runtime.run_script(main)
