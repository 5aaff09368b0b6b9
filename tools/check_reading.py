"""Check the project's reading of free-text answers against an independent one, on a model's own replies.

For each task: greedy replies to N test items, scored (a) by the project (data/rewards.py, --format free: the last
number; the one candidate named, none other) and (b) by a reading written here apart from it, as a person would
skim: the gold answer occurs in the reply as whole words (case-insensitive), other candidates allowed. (b) is more
lenient, so (a) <= (b); a gap of more than a few points means the project misreads what the model said. A few
replies where they disagree are printed, to be read.

    python tools/check_reading.py --model SmolLM2-135M-Instruct.Q4_1.gguf --tasks capital successor add parity
"""
import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flags import NEW_TOKENS  # noqa: E402
import runtime  # noqa: E402
from data.rewards import score  # noqa: E402
from data.tasks import load_split, task_name  # noqa: E402


def gold_as_whole_words(reply, gold):
    """The independent reading: the gold answer, case-folded, between non-word characters of the reply."""
    return re.search(r"(?<!\w)" + re.escape(gold.casefold()) + r"(?!\w)", reply.casefold()) is not None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF folder or .gguf file")
    p.add_argument("--tasks", nargs="+", default=["capital", "successor", "add", "parity"])
    p.add_argument("--n", type=int, default=200, help="test items per task")
    p.add_argument("--show", type=int, default=3, help="disagreeing replies printed per task")
    args = p.parse_args()
    lm = runtime.load_model(args.model, "cpu")
    for spec in args.tasks:
        items = load_split(spec, "test", args.n)
        t0 = time.time()
        comps, _ = runtime.sample(lm, items, "free", NEW_TOKENS["free"], greedy=True)
        replies = [runtime.decode(lm, c) for c in comps]
        ours = [score(r, it["answer"], it["kind"], "free", it.get("candidates", ())).correct
                for r, it in zip(replies, items)]
        theirs = [gold_as_whole_words(r, it["answer"]) for r, it in zip(replies, items)]
        print(f"{task_name(spec):10s} project {100 * sum(ours) / len(items):5.1f}%   whole-word reading "
              f"{100 * sum(theirs) / len(items):5.1f}%   of {len(items)} items ({time.time() - t0:.0f} s)", flush=True)
        for r, it, a, b in [x for x in zip(replies, items, ours, theirs) if x[2] != x[3]][:args.show]:
            print(f"    gold {it['answer']!r} project {a} whole-word {b}: {r[:150]!r}")


if __name__ == "__main__":
    main()
