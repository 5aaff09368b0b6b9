"""The rollout's decoding speed on the tiny base, on this machine: tokens/s of runtime.sample and aten ops per
decoding step (counted with torch.profiler), at a fixed shape. Every sequence runs the whole budget (the stop token
is switched off), so that two versions of the sampler do the same work.

    OMP_NUM_THREADS=1 python3 tests/decode_speed.py                       # 8 prompts x 8 samples x 64 tokens
    python3 tests/decode_speed.py --prompts 8 --group 8 --new 256 --device cuda
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import runtime  # noqa: E402
from data.tasks import builtin_items  # noqa: E402


def aten_ops(fn):
    """How many aten ops `fn()` runs (every aten::* event the profiler records, nested ones included)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def ops_per_step(lm, items, fmt, device, n, short=8, long=24):
    """Aten ops of one decoding step: the difference of two rollouts `long - short` tokens apart, divided by that
    (the prompt's prefill and the once-per-rollout work cancel)."""
    run = lambda t: runtime.sample(lm, items, fmt, t, device=device, group=n)  # noqa: E731
    run(long)  # warm-up (a compiled step compiles here)
    return (aten_ops(lambda: run(long)) - aten_ops(lambda: run(short))) / (long - short)


def tokens_per_s(lm, items, fmt, new, device, n, repeats=3):
    """Best of `repeats` rollouts: tokens made per second (prefill included)."""
    sync = (lambda: torch.cuda.synchronize(device)) if torch.device(device).type == "cuda" else (lambda: None)
    runtime.sample(lm, items, fmt, new, device=device, group=n)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        comps, _ = runtime.sample(lm, items, fmt, new, device=device, group=n)
        sync()
        best = min(best, time.perf_counter() - t0)
    return sum(map(len, comps)) / best


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="any_color", help="an image task, or a text one (add)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    lm = runtime.load_model(runtime.DEFAULT_MODEL, a.device)
    lm.eos_id = -1  # never sampled: every sequence runs the whole budget
    items = builtin_items(a.task, "test", a.prompts)
    torch.manual_seed(0)
    print(f"{a.task}: {a.prompts} prompts x {a.group} samples x {a.new} new tokens on {a.device}: "
          f"{tokens_per_s(lm, items, 'free', a.new, a.device, a.group):,.0f} tokens/s; "
          f"{ops_per_step(lm, items, 'free', a.device, a.group):,.0f} aten ops per decoding step")


if __name__ == "__main__":
    main()
