"""The real model's stability-plasticity frontier with every arm: general retention against new-task gain, one point
per run (validation sweep) or per arm (test, mean +- std over seeds).

Runs given as folders are read from their results.json (evaluate.metrics); the runs of the earlier sweep and test
comparison, whose folders are not kept, come from the research record's tables (docs/findings.md, "On a real
pretrained chat model" and "P2's control on the real model"), copied below as they were recorded.

    python3 tools/real_frontier.py --val runs/real-sweep/sft-lora-lr*/ --test runs/real/sft-lora-[0-9]*/ \\
        --out docs/real-lora-frontier.png
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evaluate import _figure, load_run, mean_std, metrics  # noqa: E402

# (arm, label, gain, retention[, gain std, retention std]) as docs/findings.md records them
RECORDED_VAL = [("SFT", "3e-6", -5.0, -35.0), ("SFT", "1e-5", -5.5, -56.5), ("SFT", "3e-5", 10.5, -58.5),
                ("GRPO", "3e-6", 21.0, -7.5), ("GRPO", "1e-5", 17.0, -25.0), ("GRPO", "3e-5", 17.0, -33.0)]
RECORDED_TEST = [("SFT", "3e-5", 3.7, -54.2, 0.8, 1.3), ("self-SFT", "3e-5", 14.7, -29.2, 7.2, 5.3),
                 ("GRPO", "3e-6", 13.2, -9.5, 0.8, 0.7)]
COLOUR = {"SFT": "#1f77b4", "GRPO": "#d62728", "self-SFT": "#2ca02c", "LoRA-SFT": "#9467bd"}


def points(folders):
    """(gain, retention) of each run folder."""
    out = []
    for f in folders:
        res = load_run(f)
        m = metrics(res["acc"], res["n_tasks"])
        out.append((m["Gain"], m["Retention"], res["config"]["lr"]))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--val", nargs="*", default=[], help="LoRA-SFT validation run folders (one point each)")
    p.add_argument("--test", nargs="*", default=[], help="LoRA-SFT test run folders (seeds of one setting)")
    p.add_argument("--out", default="real-lora-frontier.png")
    a = p.parse_args()
    fig = _figure(12, 5.2)
    for ax, title, recorded, runs in zip(fig.subplots(1, 2), ("validation sweep, 1 seed a rate",
                                                              "test, mean ± std over 3 seeds"),
                                         (RECORDED_VAL, RECORDED_TEST), (a.val, a.test)):
        rows = [r + (0.0, 0.0) if len(r) == 4 else r for r in recorded]
        pts = points(runs)
        if runs and title.startswith("test"):
            (g, sg), (r, sr) = mean_std([x[0] for x in pts]), mean_std([x[1] for x in pts])
            rows.append(("LoRA-SFT", f"{pts[0][2]:g}", g, r, sg, sr))
        else:
            rows += [("LoRA-SFT", f"{lr:g}", g, r, 0.0, 0.0) for g, r, lr in pts]
        for arm, lr, g, r, sg, sr in rows:
            ax.errorbar(g, r, xerr=sg or None, yerr=sr or None, marker="o", ms=8, ls="", capsize=2,
                        color=COLOUR[arm], label=arm)
            ax.annotate(lr, (g, r), textcoords="offset points", xytext=(6, 4), fontsize=8)
        handles = {h.get_label(): h for h in ax.get_legend_handles_labels()[0]}
        ax.legend(handles.values(), handles.keys(), fontsize=9, loc="lower left")
        ax.axhline(0, color="0.75", lw=1, zorder=0)
        ax.axvline(0, color="0.75", lw=1, zorder=0)
        ax.set(xlabel="new-task gain (points)", ylabel="general retention (points)", title=title)
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M-Instruct, add then parity: retention against gain, every arm (labels: learning rate)")
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
