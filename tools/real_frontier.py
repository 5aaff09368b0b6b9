"""The real model's stability-plasticity frontier with every arm: general retention against new-task gain, one point
per run (validation sweep) or per arm (test, mean +- std over seeds).

Runs given as folders are read from their results.json (evaluate.metrics), each put in its arm by its config (GRPO,
SFT, self-SFT, LoRA-SFT, LoRA-GRPO) and its learning rate; the runs whose folders are not kept come from the research
record's tables (docs/findings.md: "On a real pretrained chat model", "P2's control on the real model", the LoRA-SFT
and LoRA-GRPO sections), copied below as they were recorded. A folder's arm and rate replace a recorded row of the
same. With no folders at all it draws the recorded rows alone (docs/real-lora-frontier.png):

    python3 tools/real_frontier.py --out docs/real-lora-frontier.png
    python3 tools/real_frontier.py --val runs/real-sweep/*-lr*/ --test runs/real/*-[0-9]/ --out frontier.png
"""
import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evaluate import _figure, load_run, mean_std, metrics  # noqa: E402

# (arm, learning rate, gain, retention[, gain std, retention std]) as docs/findings.md records them
RECORDED_VAL = [("SFT", "3e-06", -5.0, -35.0), ("SFT", "1e-05", -5.5, -56.5), ("SFT", "3e-05", 10.5, -58.5),
                ("GRPO", "3e-06", 21.0, -7.5), ("GRPO", "1e-05", 17.0, -25.0), ("GRPO", "3e-05", 17.0, -33.0),
                ("LoRA-SFT", "3e-05", -5.5, -3.0), ("LoRA-SFT", "0.0001", -17.5, -24.5),
                ("LoRA-SFT", "0.0003", -7.0, -55.0), ("LoRA-SFT", "0.001", 4.5, -64.5),
                ("LoRA-GRPO", "1e-05", 4.5, -1.75), ("LoRA-GRPO", "3e-05", 11.0, -5.25),
                ("LoRA-GRPO", "0.0001", 11.0, -9.25), ("LoRA-GRPO", "0.0003", 11.0, -27.0),
                ("LoRA-GRPO", "0.001", 9.0, -29.7)]
RECORDED_TEST = [("SFT", "3e-05", 3.7, -54.2, 0.8, 1.3), ("self-SFT", "3e-05", 14.7, -29.2, 7.2, 5.3),
                 ("GRPO", "3e-06", 13.2, -9.5, 0.8, 0.7), ("LoRA-SFT", "0.0001", -10.2, -26.1, 1.6, 3.0),
                 ("LoRA-SFT", "3e-05", -1.0, -1.5, 0.9, 0.7), ("LoRA-GRPO", "0.0003", 13.7, -23.5, 3.8, 5.2),
                 ("LoRA-GRPO", "3e-05", 5.0, -2.9, 2.3, 0.8)]
COLOUR = {"SFT": "#1f77b4", "GRPO": "#d62728", "self-SFT": "#2ca02c", "LoRA-SFT": "#9467bd", "LoRA-GRPO": "#ff7f0e"}


def arm(config):
    """A run's arm, from its recorded settings."""
    if config["script"] == "rft":
        return "GRPO" if not config.get("lora_rank") else "LoRA-GRPO"
    if config.get("lora_rank"):
        return "LoRA-SFT"
    return "self-SFT" if config.get("sft_data") == "self" else "SFT"


def measured(folders, over_seeds):
    """(arm, lr, gain, retention, gain std, retention std) of run folders: one row a run, or one an arm and rate
    (mean +- std over its seeds)."""
    groups = defaultdict(list)
    for f in folders:
        res = load_run(f)
        m = metrics(res["acc"], res["n_tasks"])
        groups[(arm(res["config"]), f"{res['config']['lr']:g}")].append((m["Gain"], m["Retention"]))
    rows = []
    for (a, lr), pts in sorted(groups.items()):
        if over_seeds:
            (g, sg), (r, sr) = mean_std([p[0] for p in pts]), mean_std([p[1] for p in pts])
            rows.append((a, lr, g, r, sg, sr))
        else:
            rows += [(a, lr, g, r, 0.0, 0.0) for g, r in pts]
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--val", nargs="*", default=[], help="validation run folders (one point each)")
    p.add_argument("--test", nargs="*", default=[], help="test run folders (the seeds of each arm and rate)")
    p.add_argument("--out", default="real-lora-frontier.png")
    a = p.parse_args()
    fig = _figure(12, 5.2)
    for ax, title, recorded, runs in zip(fig.subplots(1, 2), ("validation sweep, 1 seed a rate",
                                                              "test, mean ± std over 3 seeds"),
                                         (RECORDED_VAL, RECORDED_TEST), (a.val, a.test)):
        new = measured(runs, over_seeds=title.startswith("test"))
        given = {(r[0], r[1]) for r in new}
        rows = [r + (0.0, 0.0) if len(r) == 4 else r for r in recorded if (r[0], r[1]) not in given] + new
        for arm_, lr, g, r, sg, sr in rows:
            ax.errorbar(g, r, xerr=sg or None, yerr=sr or None, marker="o", ms=8, ls="", capsize=2,
                        color=COLOUR.get(arm_, "0.4"), label=arm_)
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
