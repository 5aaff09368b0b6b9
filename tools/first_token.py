"""The first answer token's whole distribution, under the base and under trained models, on a task's test prompts.

Every answer of the tiny default's multi-answer tasks is one token followed by the end of turn, so the first token's
distribution is the model's answer distribution, and the KL over it is exact (the script also prints the
probability of ending the turn right after that token, which makes the first-token KL the whole answer's KL when it
is about 1). Per model, the mean over prompts of:

  entropy               H(model) in nats
  valid / canonical     mass on the item's valid answers / on its canonical (SFT) answer
  base's top            mass on the answer the base ranks first on that prompt (its habit), over the prompts where
                        that answer is right ("top, right": RL's Razor says RFT keeps it there) and where it is wrong
  KL(base||model)       exact forward KL, the distance RL's Razor ties to forgetting
  KL(model||base)       exact reverse KL

    python tools/first_token.py --models runs/compare/rft-0/stage-4 runs/compare/sft-0/stage-4 --task any_color

Written for the bare-answer tiny base (before its rebuild with a voice, `--format plain`, the record's earlier
sections): on today's base an answer is a sentence, so the first token is its template's, not its answer, and this
reading does not apply; use filter.py's data view (nats per whole answer) instead.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import runtime  # noqa: E402
from data.tasks import builtin_items  # noqa: E402


# ----------------------------------------------------------------------------- the formulas (log-probs over a vocabulary)

def entropy(logp):
    """H(p) = -sum p log p, in nats; a zero-probability token adds 0."""
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def kl(logp, logq):
    """KL(p || q) = sum p (log p - log q); tokens p gives no mass add 0, even where q gives none."""
    p = logp.exp()
    return (p * torch.where(p > 0, logp - logq, torch.zeros_like(logp))).sum(-1)


def mass(logp, ids):
    """Probability of a set of token ids (each counted once)."""
    return logp[..., sorted(set(ids))].exp().sum(-1)


# ----------------------------------------------------------------------------- the model side

@torch.no_grad()
def first_token_logprobs(lm, items, fmt, device, batch_size=128):
    """[N, vocab] log-probabilities of the first answer token (the sampler's masked softmax at temperature 1)."""
    out = []
    for i in range(0, len(items), batch_size):
        batch, _, _ = runtime.encode(lm, items[i:i + batch_size], fmt)
        logits = lm.model(**runtime.to_device(batch, device), logits_to_keep=1, use_cache=False).logits[:, -1].float()
        out.append(F.log_softmax(logits + runtime.forbidden_bias(lm.forbidden, logits.shape[-1], logits.device), -1))
    return torch.cat(out)


def answer_token(lm, answer, fmt):
    ids = runtime.target_ids(lm, answer, fmt)
    if len(ids) != 2:
        raise SystemExit(f"answer {answer!r} is {len(ids) - 1} tokens; this probe needs one-token answers")
    return ids[0]


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True, help="trained model folders to compare with the base")
    p.add_argument("--base", default=runtime.DEFAULT_MODEL, help="the starting model")
    p.add_argument("--task", default="any_color", help="a built-in task whose answers are one token")
    p.add_argument("--n", type=int, default=200, help="test prompts")
    args = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = torch.device("cpu")
    items = builtin_items(args.task, "test", args.n)
    base = runtime.load_model(args.base, device)
    valid = [[answer_token(base, a, "plain") for a in it.get("valid", [it["answer"]])] for it in items]
    canonical = [answer_token(base, it["answer"], "plain") for it in items]
    lp_base = first_token_logprobs(base, items, "plain", device)
    top = lp_base.argmax(-1).tolist()
    right = torch.tensor([t in v for t, v in zip(top, valid)])
    print(f"{args.task}, {args.n} test prompts; first answer token; means over prompts; the base's top answer is "
          f"right on {int(right.sum())} of them")
    print(f"{'model':40s} {'entropy':>8s} {'valid':>6s} {'canon.':>6s} {'top,right':>9s} {'top,wrong':>9s} "
          f"{'KL(b||m)':>9s} {'KL(m||b)':>9s} {'end after':>9s}")
    for path in [args.base] + args.models:
        lm = base if path == args.base else runtime.load_model(path, device)
        lp = lp_base if path == args.base else first_token_logprobs(lm, items, "plain", device)
        # P(end of turn | the model's most likely first token): ~1 means the first-token KL is the answer's KL
        ends = runtime.token_logprobs(lm, items, "plain", [[t, lm.eos_id] for t in lp.argmax(-1).tolist()],
                                     device)[0][:, 1].exp()
        on_top = lp[range(len(items)), top].exp()
        row = [entropy(lp).mean(), torch.stack([mass(lp[i], v) for i, v in enumerate(valid)]).mean(),
               lp[range(len(items)), canonical].exp().mean(), on_top[right].mean(), on_top[~right].mean(),
               kl(lp_base, lp).mean(), kl(lp, lp_base).mean(), ends.mean()]
        name = path if len(path) <= 40 else "..." + path[-37:]
        print(f"{name:40s} " + " ".join(f"{float(v):{w}.3f}" for v, w in zip(row, (8, 6, 6, 9, 9, 9, 9, 9))))


if __name__ == "__main__":
    main()
