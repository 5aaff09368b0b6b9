"""What two of the GRPO step's speed features buy on this machine: one `cpt_rft.grpo_step` on the tiny base with
everything on, without the pixel cache (runtime.PIXEL_CACHE_BYTES = 0) and without the shared-prompt forward (every
completion forwards its prompt again), interleaved, best of N. `--kl_coef 0.01` so that every group reaches the
update; lr 0 so that every step sees the same model. The numbers in docs/findings.md (issue 30, session 11):

    python3 tools/step_features.py --task left_color --reps 4
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cpt_rft  # noqa: E402
import runtime  # noqa: E402
from data.tasks import builtin_items  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="left_color")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--reps", type=int, default=4)
    a = p.parse_args()
    torch.set_num_threads(1)
    lm = runtime.load_model(runtime.DEFAULT_MODEL, "cpu")
    items = builtin_items(a.task, "train", a.prompts)
    cfg = cpt_rft.GRPOConfig(group=8, max_new_tokens=16, kl_coef=0.01)
    opt = torch.optim.AdamW(lm.model.parameters(), lr=0.0)
    cache_bytes, shares = runtime.PIXEL_CACHE_BYTES, cpt_rft.shares_prompt
    variants = {"all on": {}, "no pixel cache": {"cache": 0}, "no shared prompt": {"shares": lambda model: False}}
    times = {name: [] for name in variants}
    for rep in range(a.reps):
        for name, off in variants.items():
            runtime.PIXEL_CACHE_BYTES = off.get("cache", cache_bytes)
            cpt_rft.shares_prompt = off.get("shares", shares)
            lm.pixels.clear()
            torch.manual_seed(rep)
            t = time.time()
            _, _, _, update = cpt_rft.grpo_step(lm, lm, opt, items, cfg, "cpu")
            times[name].append((time.time() - t, update["rollout_s"], update["update_s"]))
    for name, runs in times.items():
        step, roll, upd = min(runs)
        print(f"{a.task} {name:17s} step {step:.2f} s (rollout {roll:.2f} s, update {upd:.2f} s), best of {a.reps}")


if __name__ == "__main__":
    main()
