"""How long a model's replies are: the share that a completion budget would cut, per task, greedy and sampled.

A reply is cut at budget B when it has not reached its end of turn within B tokens; a cut reply usually has no
answer yet and scores as wrong. One generation at a large budget gives the share for every smaller one, which is
how the defaults of --max_new_tokens and --eval_max_new_tokens for --format free were chosen.

    python3 tools/budget.py --model SmolLM2-135M-Instruct.Q4_1.gguf --tasks add parity capital successor
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import runtime  # noqa: E402
from data.rewards import FORMATS  # noqa: E402
from data.tasks import load_split, task_name  # noqa: E402


def cut_share(lengths, ended, budget):
    """Share of replies a budget cuts: those longer than it, and those that never ended (the measured budget cut
    them too). lengths count the end-of-turn token."""
    return sum(1 for n, e in zip(lengths, ended) if n > budget or not e) / len(lengths)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=runtime.DEFAULT_MODEL, help="HF checkpoint folder or .gguf file")
    p.add_argument("--tasks", nargs="+", default=["add", "parity", "capital", "successor"], help="task specs")
    p.add_argument("--format", default="free", choices=FORMATS, help="answer format")
    p.add_argument("--n", type=int, default=50, help="items per task")
    p.add_argument("--samples", type=int, default=2, help="sampled replies per item at --temperature (0: greedy only)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--max_budget", type=int, default=128, help="the budget generated at")
    p.add_argument("--budgets", type=int, nargs="+", default=[16, 24, 32, 48, 64, 96], help="budgets reported")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    lm = runtime.load_model(args.model, "cpu")
    print(f"share of replies cut at each budget (tokens), {args.n} items per task, {args.model}")
    print("task        kind     " + " ".join(f"{b:>6}" for b in args.budgets))
    for spec in args.tasks:
        items = load_split(spec, "val", args.n)
        for kind in ["greedy"] + (["sampled"] if args.samples else []):
            t0 = time.time()
            comps, cut = runtime.sample(lm, items, args.format, args.max_budget, args.temperature,
                                        greedy=kind == "greedy", group=1 if kind == "greedy" else args.samples)
            shares = [cut_share([len(c) for c in comps], [not t for t in cut], b) for b in args.budgets]
            print(f"{task_name(spec):<11} {kind:<8} " + " ".join(f"{100 * s:5.0f}%" for s in shares) +
                  f"   ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
