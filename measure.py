"""What is measured after every stage: greedy accuracy on every task, the forward KL from the base on the CPT
tasks' prompts, and the general tasks' gold-answer log-likelihood (a continuous reading of held knowledge).

Forgetting follows how far training pulls the model's outputs from the base's own on the new task's inputs (the
forward KL, RL's Razor); accuracy flips late, log-likelihood moves first. evaluate.py turns these into AvgAcc,
FM, gain and retention.
"""
import torch
from tqdm import tqdm

from data.tasks import askable, load_split, task_name
from rollouts import rollout, score_item
from runtime import all_sum, decode, equal_chunks, rank, sample, share, target_ids, token_logprobs


# ----------------------------------------------------------------------------- accuracy (greedy)

_EVAL_CACHE = {}


def eval_counts(tasks, general, eval_n, general_n):
    """{spec: evaluation items}: --eval_n for the CPT tasks, --general_n (default: the same) for the general ones."""
    return {**{t: eval_n for t in tasks}, **{g: general_n or eval_n for g in general}}


def eval_items(spec, n, split="test"):
    if (spec, n, split) not in _EVAL_CACHE:
        _EVAL_CACHE[(spec, n, split)] = load_split(spec, split, n)
    return _EVAL_CACHE[(spec, n, split)]


@torch.no_grad()
def evaluate_task(lm, items, fmt, device, max_new_tokens, batch_size=256, desc=None):
    """(greedy accuracy, mean reward, share of replies cut at max_new_tokens) on a list of items; items are split
    over ranks, counts summed. A reply cut at the budget has no end of turn and usually no answer yet."""
    correct = rew = cut = 0.0
    chunks = list(equal_chunks(share(items), batch_size, device, items[0]))  # a list: tqdm shows the total
    for chunk, real in tqdm(chunks, desc=desc, disable=rank() != 0 or desc is None, leave=False):
        comps, truncated = sample(lm, chunk, fmt, max_new_tokens, greedy=True, device=device)
        for it, c, t in zip(chunk if real else [], comps, truncated):
            s = score_item(decode(lm, c), it, fmt)
            correct += s.correct
            rew += s.reward
            cut += t
    correct, rew, cut = all_sum([correct, rew, cut], device)
    return correct / len(items), rew / len(items), cut / len(items)


def evaluate_all(lm, eval_sets, fmt, device, max_new_tokens, batch_size=256):
    """({task name: accuracy}, {task name: share of replies truncated}) over {task spec: its evaluation items}.
    None where a text-only model meets an image."""
    acc, truncated = {}, {}
    for spec, items in eval_sets.items():
        name = task_name(spec)
        if not askable(items, lm.is_vlm):
            acc[name] = truncated[name] = None
            continue
        acc[name], _, truncated[name] = evaluate_task(lm, items, fmt, device, max_new_tokens, batch_size,
                                                      desc=f"eval {name}")
    return acc, truncated


# ----------------------------------------------------------------------------- distance from the base, knowledge held

@torch.no_grad()
def sequence_logprobs(lm, pairs, fmt, device, filler, batch_size=64):
    """log pi(completion | prompt), summed over the completion, of this rank's (item, completion ids) pairs; every
    rank runs the same forwards (`filler`: the stand-in pair of a rank that has run out)."""
    out = []
    for chunk, real in equal_chunks(pairs, batch_size, device, filler):
        logp, mask = token_logprobs(lm, [it for it, _ in chunk], fmt, [c for _, c in chunk], device)
        out += (logp * mask).sum(1).tolist() if real else []
    return out


def kl_sum(base_logp, now_logp):
    """Monte-Carlo forward KL(pi_base || pi), summed: over completions sampled from the base, the sum of
    log pi_base(y|x) - log pi(y|x); divided by their count it is the KL in nats per prompt. Unbiased over whole
    completions (any length); 0 for the base itself."""
    return sum(b - n for b, n in zip(base_logp, now_logp))


def sample_base(lm, items, fmt, group, max_new_tokens, device, batch_size=256):
    """`group` completions per item (this rank's share) from the model as it is (the base), at temperature 1,
    with their summed log-probs: the reference that kl_to_base compares every later model with."""
    mine = share(items)
    table = rollout(lm, mine, fmt, group, 1.0, max_new_tokens, device, batch_size) if mine else []
    pairs = [(i, c) for i, row in zip(share(range(len(items))), table) for c in row["completions"]]
    logps = sequence_logprobs(lm, [(items[i], c) for i, c in pairs], fmt, device, (items[0], [lm.eos_id]))
    return [[i, c, lp] for (i, c), lp in zip(pairs, logps)]


def kl_to_base(lm, items, samples, fmt, device):
    """The forward KL from the base to the current model on `items`, estimated on the base's own samples (summed
    over ranks)."""
    now = sequence_logprobs(lm, [(items[i], c) for i, c, _ in samples], fmt, device, (items[0], [lm.eos_id]))
    total, n = all_sum([kl_sum([lp for _, _, lp in samples], now), len(samples)], device)
    return total / n if n else None


@torch.no_grad()
def gold_loglik(lm, items, fmt, device, batch_size=64):
    """Mean log-likelihood (nats per item) of the gold answers as SFT would write them: a continuous reading of a
    skill, which moves before greedy accuracy flips."""
    pairs = [(it, target_ids(lm, it["answer"], fmt)) for it in share(items)]
    logps = sequence_logprobs(lm, pairs, fmt, device, (items[0], [lm.eos_id]), batch_size)
    total, n = all_sum([sum(logps), len(logps)], device)
    return total / n


def general_loglik(lm, items_by_task, fmt, device):
    """[mean gold log-likelihood of each general task's items] (None for an image task on a text-only model, or
    for a task with no items: --kl_n 0)."""
    out = []
    for items in items_by_task:
        ok = items and askable(items, lm.is_vlm)
        out.append(round(gold_loglik(lm, items, fmt, device), 5) if ok else None)
    return out
