"""Rollouts: a group of G completions per prompt (P1's K) from the current model, each scored by the task's
verifier, and what is built on them: the reward-variance filter (P1's RIF-RFT), which cpt_rft.py --rif and
filter.py share, and SFT's voice-only labels (the canonical answer said in the model's own words).

    rollout(lm, items, ...)  -> per item: G completions (token ids), their texts, scores, rewards, truncated flags
    keep(mode, rewards, ...) -> whether an instance can teach GRPO anything (zero reward variance cannot)

Rewards are compared with a tolerance (REWARD_TOL), never with ==: 0.9*1 + 0.1*1 is not exactly 1.0 in floats.
"""
import math
import time

from data.rewards import restate, score
from runtime import Diverged, all_sum, decode, equal_chunks, sample, target_ids


# ----------------------------------------------------------------------------- rollouts, scored

def score_item(text, item, fmt):
    """A completion's score against a task item: its gold answer, or any of its valid answers when it has several."""
    return score(text, item["answer"], item["kind"], fmt, item.get("candidates", ()), item.get("valid", ()))


def rollout(lm, items, fmt, group, temperature, max_new_tokens, device, batch_size=256):
    """G sampled completions per item, scored by the item's verifier. One dict per item:
    completions (token ids), texts, scores (rewards.Score), rewards, truncated flags. Generation runs in chunks
    of whole groups; every rank runs the same number of chunks (FSDP), padding with a stand-in chunk if needed."""
    assert items, "every rank needs at least one item to roll out"
    out = []
    for chunk, real in equal_chunks(items, max(1, batch_size // group), device, items[0]):
        comps, trunc = sample(lm, chunk, fmt, max_new_tokens, temperature, device=device, group=group)
        for i, it in enumerate(chunk if real else []):
            cs, ts = comps[i * group:(i + 1) * group], trunc[i * group:(i + 1) * group]
            texts = [decode(lm, x) for x in cs]
            scores = [score_item(t, it, fmt) for t in texts]
            rewards = [s.reward for s in scores]
            if not all(map(math.isfinite, rewards)):
                raise Diverged(f"non-finite reward {rewards}")
            out.append({"item": it, "completions": cs, "texts": texts, "scores": scores, "rewards": rewards,
                        "truncated": ts})
    return out


def restated_replies(lm, items, fmt, max_new_tokens, device, batch_size=256):
    """(item, target ids) pairs for SFT's voice-only arm: each item's greedy reply from `lm` with the answer it gives
    replaced by the item's canonical one (rewards.restate): the answer SFT data hold, in the model's own words. An
    item whose reply states no single answer gives no pair."""
    pairs = []
    for chunk, real in equal_chunks(items, batch_size, device, items[0]):
        comps, _ = sample(lm, chunk, fmt, max_new_tokens, greedy=True, device=device)
        for it, comp in zip(chunk if real else [], comps):
            said = restate(decode(lm, comp), it["answer"], it["kind"], [*it.get("valid", []),
                                                                        *it.get("candidates", [])])
            if said is not None:  # the reply keeps its format's wrapping (a boxed answer, tags): nothing to add
                pairs.append((it, target_ids(lm, said, "plain")))
    return pairs


# ----------------------------------------------------------------------------- the reward-variance filter (RIF-RFT)

REWARD_TOL = 1e-6  # rewards closer than this are equal: 0.9*1 + 0.1*1 is not exactly 1.0 in floats


def zero_variance(rewards, tol=REWARD_TOL):
    """True when all G rewards are equal within tol: the group's rewards cannot rank its samples."""
    return max(rewards) - min(rewards) <= tol


def pass_rate(correct):
    """Fraction of the G rollouts that are entirely correct."""
    return sum(bool(c) for c in correct) / len(correct)


def keep(mode, rewards, correct, low=0.0, high=1.0, tol=REWARD_TOL):
    """Whether an instance with these G rollouts is kept under a filter mode:
      incompetent     drop instances whose G rollouts are all wrong (pass rate 0)
      zero_variance   drop every instance whose G rewards are equal (all wrong or all right): no GRPO gradient
      pass_rate       keep low < pass rate < high (open-r1's offline filter)"""
    if mode == "none":
        return True
    if mode == "incompetent":
        return pass_rate(correct) > 0
    if mode == "zero_variance":
        return not zero_variance(rewards, tol)
    if mode == "pass_rate":
        return low + tol < pass_rate(correct) < high - tol
    raise ValueError(f"unknown filter mode {mode!r}")


def pass_count_histogram(correct_counts, group):
    """How many instances had 0, 1, ..., G correct rollouts (G + 1 bins: 7/8 and 8/8 are different instances)."""
    counts = [0] * (group + 1)
    for c in correct_counts:
        counts[c] += 1
    return counts


def filter_items(lm, items, mode, fmt, group, temperature, max_new_tokens, device, gen_batch=256, low=0.0, high=1.0):
    """Roll out this rank's items G times; return (a keep flag per item, stats summed over ranks, the rollout
    table)."""
    t0 = time.time()
    table = rollout(lm, items, fmt, group, temperature, max_new_tokens, device, gen_batch)
    flags = [keep(mode, row["rewards"], [s.correct for s in row["scores"]], low, high) for row in table]
    n_correct = [sum(s.correct for s in row["scores"]) for row in table]
    tokens = sum(len(c) for row in table for c in row["completions"])
    n, n_kept, tokens, *hist = all_sum([len(items), sum(flags), tokens] + pass_count_histogram(n_correct, group), device)
    stats = {"mode": mode, "k": group, "instances": int(n), "kept": int(n_kept), "kept_fraction": n_kept / n,
             "correct_rollouts_histogram": [int(h) for h in hist], "rollout_tokens": int(tokens),
             "rollout_seconds": round(time.time() - t0, 2)}
    return flags, stats, table
