"""Evaluate checkpoints, and compute the continual-learning metrics of runs, side by side, with pictures.

A run's results.json holds the accuracy matrix A: row 0 is the base model, row t (t = 1..T) the model after
training stage t; column j < T is CPT task j (learned at stage j+1 in 0-based columns), then the general tasks.
With T CPT tasks and A[t][j] written 1-based (task j is learned at stage j):

  AvgAcc     = mean_j A[T][j]                                     accuracy on the CPT tasks after the last stage
  FM         = mean_{j<T} ( A[T][j] - max_{1<=t<T} A[t][j] )      P1's forgetting measure, <= 0, 0 is best
  BWT        = mean_{j<T} ( A[T][j] - A[j][j] )                   backward transfer: final minus right-after-learning
  FWT        = mean_{j>1} ( A[j-1][j] - A[0][j] )                 forward transfer: before learning minus base
  Gain       = mean_j ( A[j][j] - A[0][j] )                       plasticity: right-after-learning minus base
  Retention  = mean_g ( A[T][g] - A[0][g] )                       general tasks g: last row minus base row
  KL         = mean_j KL_T[j]        the forward KL(base || final model) on CPT task j's prompts, nats (RL's Razor)
  KLgen      = mean_g KLgen_T[g]     the same on the general tasks' prompts (where damage the first misses shows)
  GenLL      = mean_g ( LL_T[g] - LL_0[g] )   change of the general tasks' gold-answer log-likelihood, nats per item
A multi-task run has one stage ("multitask"): AvgAcc, Gain (A[1][j] - A[0][j]) and Retention apply; FM, BWT and
FWT do not. All numbers are in accuracy points (percent). Runs that differ only by --seed are shown as mean +- std
(sample std over seeds).

    python3 evaluate.py runs/sft runs/rft runs/sft-mt runs/rft-mt --report runs/report
    python3 evaluate.py data/tiny-base --tasks left_color jigsaw color        # evaluate one checkpoint
    python3 evaluate.py runs/sweep/* --frontier --report runs/frontier        # stability-plasticity frontier
    torchrun --standalone --nproc_per_node=8 evaluate.py /ckpt/model --tasks a.jsonl b.jsonl --format boxed
"""
import argparse
import json
import math
import os
import statistics

import runtime
from flags import (MAX_EVAL_ITEMS, NEW_TOKENS, HelpFormatter, add_eval_size_flags, add_format_flag, budget_errors,
                   model_errors, out_errors, refuse)
from lora import default_alpha
from loop import with_later_settings
from measure import eval_items, evaluate_task
from data.tasks import BUILTIN, DEFAULT_GENERAL, DEFAULT_SEQUENCE, DataError, load_split, task_name, text_model_errors
from runtime import is_vlm_config


# ----------------------------------------------------------------------------- the metrics (pure)

def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def metrics(acc, n_tasks):
    """All metrics of one accuracy matrix (rows: base, stage 1..; first n_tasks columns are the CPT tasks), in points."""
    A = [[None if a is None else 100.0 * a for a in row] for row in acc]
    last, T = A[-1], len(A) - 1
    seq = T == n_tasks and T > 1  # a sequential run: stage j learned task j
    m = {"AvgAcc": _mean(last[:n_tasks]),
         "Retention": _mean([last[g] - A[0][g] for g in range(n_tasks, len(last))
                             if last[g] is not None and A[0][g] is not None])}
    if seq:
        m["FM"] = _mean([last[j] - max(A[t][j] for t in range(1, T)) for j in range(T - 1)])
        m["BWT"] = _mean([last[j] - A[j + 1][j] for j in range(T - 1)])
        m["FWT"] = _mean([A[j][j] - A[0][j] for j in range(1, T)])
        m["Gain"] = _mean([A[j + 1][j] - A[0][j] for j in range(T)])
    else:
        m.update(FM=None, BWT=None, FWT=None, Gain=_mean([A[1][j] - A[0][j] for j in range(n_tasks)]))
    return m


def distance_metrics(res):
    """KL to the base after the last stage (mean over the CPT tasks, and over the general tasks) and the change of the
    general tasks' gold log-likelihood, from results.json's "kl_to_base", "kl_to_base_general" and "general_ll" rows
    (None when the run has none: runs recorded before kl_to_base_general have no KLgen)."""
    ll = res.get("general_ll") or [[]]
    d = [b - a for a, b in zip(ll[0], ll[-1]) if a is not None and b is not None] if len(ll) > 1 else []
    return {"KL": last_mean(res.get("kl_to_base")), "KLgen": last_mean(res.get("kl_to_base_general")),
            "GenLL": _mean(d)}


def last_mean(rows):
    """The mean of the last row of a per-stage reading (None where there is no stage after the base's row)."""
    return _mean(rows[-1]) if rows and len(rows) > 1 else None


def stage_changes(res):
    """Per stage of a sequential run: (task, change of mean general accuracy during the stage in points, KL to the
    base added on the stage's own task's prompts in nats, gain on the stage's own task in points). Where the CPT
    tasks differ in kind (several valid answers or one), this separates what each kind of stage did: the control of
    the mechanism; and the general loss per point gained compares arms at what they learned."""
    n, A = res["n_tasks"], res["acc"]
    kl = res.get("kl_to_base") or []
    out = []
    for k in range(1, len(A)):
        gen = _mean([100 * (A[k][g] - A[k - 1][g]) for g in range(n, len(A[k]))
                     if A[k][g] is not None and A[k - 1][g] is not None])
        j = k - 1  # the stage's own task
        dkl = kl[k][j] - kl[k - 1][j] if len(kl) > k and None not in (kl[k][j], kl[k - 1][j]) else None
        gain = 100 * (A[k][j] - A[k - 1][j]) if None not in (A[k][j], A[k - 1][j]) else None
        out.append((res["columns"][j], gen, dkl, gain))
    return out


def linear_fit(xs, ys):
    """Least-squares line y = a + b x and its R^2 = 1 - SS_res / SS_tot; None when x or y is constant or there are
    fewer than 3 points."""
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return a, b, 1 - ss_res / syy


def mean_std(values):
    """(mean, sample std) of a list; std is 0 for one value, None entries are ignored."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None
    return sum(xs) / len(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def pearson(xs, ys):
    """Pearson correlation of two equally long lists; None when either is constant or shorter than 3."""
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def variance_diagnostic(log_rows):
    """P1's theory per GRPO step: does the update size track the batch's mean group reward variance?
    Returns correlations of reward_var with grad_norm and with |change of general-task log-likelihood|."""
    rows = [r for r in log_rows if "reward_var" in r and "grad_norm" in r]
    out = {"steps": len(rows), "reward_var_vs_grad_norm": pearson([r["reward_var"] for r in rows],
                                                                  [r["grad_norm"] for r in rows])}
    probed = [r for r in rows if "general_ll_delta" in r]
    if probed:
        out["reward_var_vs_abs_general_ll_change"] = pearson([r["reward_var"] for r in probed],
                                                             [abs(r["general_ll_delta"]) for r in probed])
    return out


# ----------------------------------------------------------------------------- reading runs

def load_run(path):
    """A run folder's results.json (and log), or one line that names the file and why it cannot be read."""
    res_path = os.path.join(path, "results.json")
    try:
        with open(res_path) as f:
            res = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {res_path} cannot be read ({e}); a run killed while writing it leaves the previous "
                         f"version, so this file was cut or edited by hand: leave its run out") from None
    if not (isinstance(res, dict) and isinstance(res.get("config"), dict) and
            all(k in res for k in ("rows", "acc", "columns")) and "tasks" in res["config"]):
        raise SystemExit(f"error: {res_path} is not the results file of a run of this project (it lacks 'config', "
                         f"'rows', 'acc' or 'columns'): leave it out")
    res["config"] = with_later_settings(res["config"])  # a run recorded before --lora_rank was full fine-tuning
    res["path"] = path
    res["n_tasks"] = len(res["config"]["tasks"])
    res["stages"] = 1 if res["config"].get("multitask") else res["n_tasks"]
    res["complete"] = len(res["rows"]) == res["stages"] + 1  # a run that stopped early is not a finished one
    log = os.path.join(path, "log.jsonl")
    res["log"] = [json.loads(x) for x in open(log)] if os.path.exists(log) else []
    return res


def label(res):
    """A run's name without its seed: script, multitask, and the flags that differ from the defaults."""
    c = res["config"]
    name = c["script"] + ("-multitask" if c.get("multitask") else "")
    if c.get("lora_rank"):
        name += f" lora_rank={c['lora_rank']}" + ("" if c.get("lora_alpha") == default_alpha(c["lora_rank"]) else
                                                 f" lora_alpha={c.get('lora_alpha')}")
    for k in ("lr", "rif", "sft_data", "adv", "kl_coef", "format", "skip_zero_var", "loss_agg"):
        default = {"rif": "none", "sft_data": "gold", "adv": "grpo", "kl_coef": 0.0, "format": "free",
                   "skip_zero_var": False, "loss_agg": "token_mean"}.get(k)
        if k in c and c[k] != default and k != "lr":
            name += f" {k}={c[k]}"
    return name + f" lr={c.get('lr')}"


def seedless(res):
    """A run's whole command without its seed (and world size): runs are seeds of one setting only when equal."""
    return json.dumps({k: v for k, v in res["config"].items() if k not in ("seed", "world")}, sort_keys=True)


def group_runs(runs):
    """Runs grouped by their command up to --seed, in the order first seen. The label shows the flags that differ
    from the defaults, and any other setting that differs between the groups given."""
    groups = {}
    for r in runs:
        groups.setdefault(seedless(r), []).append(r)
    out = {}
    for rs in groups.values():
        c = rs[0]["config"]
        # settings that differ from another group of the same script (SFT's flags are not RFT's)
        family = [g[0]["config"] for g in groups.values()
                  if (g[0]["config"]["script"], g[0]["config"].get("multitask")) == (c["script"], c.get("multitask"))]
        varying = sorted(k for k in c if k not in ("seed", "world", "lr", "lora_rank", "lora_alpha") and
                         len({json.dumps(f.get(k)) for f in family}) > 1)
        name = label(rs[0])
        out[name + "".join(f" {k}={c.get(k)}" for k in varying if f" {k}=" not in name)] = rs
    return out


# ----------------------------------------------------------------------------- report

KEYS = ("AvgAcc", "FM", "BWT", "FWT", "Gain", "Retention", "KL", "KLgen", "GenLL")


def summary(groups):
    """Per group: {metric: (mean, std)} and its number of seeds."""
    out = {}
    for name, runs in groups.items():
        ms = [{**metrics(r["acc"], r["n_tasks"]), **distance_metrics(r)} for r in runs]
        out[name] = {k: mean_std([m[k] for m in ms]) for k in KEYS}
        out[name]["seeds"] = len(runs)
    return out


def fmt_ms(ms, digits=1):
    m, s = ms
    if m is None:
        return "—"
    return f"{m:+.{digits}f} ± {s:.{digits}f}" if s else f"{m:+.{digits}f}"


def skill_retention(acc, n_tasks):
    """Per general task g: A[T][g] - A[0][g] in points (None where either is None): Retention before the mean."""
    return [None if a is None or b is None else 100.0 * (a - b) for a, b in zip(acc[-1][n_tasks:], acc[0][n_tasks:])]


def skill_table(groups):
    """Markdown lines: each group's retention per general task, mean +- std over seeds."""
    first = next(iter(groups.values()))[0]
    skills = first["columns"][first["n_tasks"]:]
    if not skills:
        return []
    lines = ["Retention per general task (points, last row minus base):", "",
             "| run | " + " | ".join(skills) + " |", "|---|" + "---|" * len(skills)]
    for name, runs in groups.items():
        per = [skill_retention(r["acc"], r["n_tasks"]) for r in runs]
        lines.append(f"| {name} | " + " | ".join(fmt_ms(mean_std([p[g] for p in per if g < len(p)]))
                                                for g in range(len(skills))) + " |")
    return lines + [""]


def markdown(groups):
    summ = summary(groups)
    lines = ["| run | seeds | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS)]
    for name, s in summ.items():
        cells = [fmt_ms(s[k]).lstrip("+") if k == "AvgAcc" else
                 fmt_ms(s[k], 3 if k in ("KL", "KLgen", "GenLL") else 1) for k in KEYS]
        lines.append(f"| {name} | {s['seeds']} | " + " | ".join(cells) + " |")
    lines += ["", "Points of accuracy (%). AvgAcc: final accuracy on the CPT tasks; FM: P1's forgetting (<= 0); "
              "BWT/FWT: backward/forward transfer; Gain: new-task gain right after learning; Retention: general "
              "tasks, last minus base. KL: forward KL(base || final model) on the CPT tasks' prompts, nats per "
              "prompt, estimated on the base's own samples; KLgen: the same on the general tasks' prompts; GenLL: "
              "change of the general tasks' gold-answer log-likelihood, nats per item.", ""]
    lines += skill_table(groups)
    diag = [(name, variance_diagnostic([row for r in runs for row in r["log"]])) for name, runs in groups.items()]
    diag = [(n, d) for n, d in diag if d["steps"]]
    if diag:
        lines.append("Reward variance and update size per GRPO step (P1's theory: the update scales with Var(reward)); "
                     "Pearson r over all steps of all seeds:")
        lines.append("")
        for name, d in diag:
            r1 = d["reward_var_vs_grad_norm"]
            r2 = d.get("reward_var_vs_abs_general_ll_change")
            lines.append(f"- {name}: {d['steps']} steps; reward variance vs gradient norm r = "
                         f"{'n/a' if r1 is None else f'{r1:+.2f}'}" +
                         ("" if r2 is None else f"; vs |change of general-task log-likelihood| r = {r2:+.2f}"))
        lines.append("")
    seq = {name: runs for name, runs in groups.items() if runs[0]["stages"] > 1}
    if seq:
        tasks = [p[0] for p in stage_changes(next(iter(seq.values()))[0])]
        lines += ["Per stage, mean over seeds: gain on the stage's own task (points) / change of the general tasks' "
                  "mean accuracy during the stage (points) / KL to the base added on the stage's own task (nats per "
                  "prompt):", "",
                  "| run | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for name, runs in seq.items():
            per = [stage_changes(r) for r in runs]
            cells = []
            for k in range(len(tasks)):
                g, d, gain = (_mean([p[k][i] for p in per]) for i in (1, 2, 3))
                cells.append(" / ".join("—" if v is None else f"{v:+.{digits}f}"
                                        for v, digits in ((gain, 1), (g, 1), (d, 3))))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    for name, runs in groups.items():  # each group's whole accuracy matrix, mean over seeds
        cols = runs[0]["columns"]
        lines.append(f"**{name}**: accuracy matrix, % (mean over {len(runs)} seed(s))")
        lines.append("| row | " + " | ".join(cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for ri, row in enumerate(runs[0]["rows"]):
            vals = [mean_std([r["acc"][ri][c] * 100 if r["acc"][ri][c] is not None else None for r in runs])[0]
                    for c in range(len(cols))]
            lines.append(f"| {row} | " + " | ".join("—" if v is None else f"{v:.1f}" for v in vals) + " |")
        lines.append("")
    return "\n".join(lines)


# The pictures: matplotlib Figures drawn off-screen (a Figure made without pyplot renders with Agg and needs no
# display); matplotlib is imported only here, so the metrics and the training scripts do not need it.

def _figure(width, height):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path):
    fig.savefig(path, dpi=110)
    return fig


def mean_matrix(runs):
    """The accuracy matrix averaged over seeds, cell by cell (None where every seed has None)."""
    return [[mean_std([r["acc"][i][j] for r in runs])[0] for j in range(len(runs[0]["columns"]))]
            for i in range(len(runs[0]["rows"]))]


def heatmap(runs, path, title):
    """The accuracy matrix, mean over the seeds given, with the numbers in the cells (rows: stages; columns: tasks);
    the same numbers as the report's table. Returns the figure."""
    import numpy as np
    from matplotlib import colormaps
    res = runs[0]
    rows, cols = res["rows"], res["columns"]
    acc = np.array([[np.nan if a is None else 100 * a for a in row] for row in mean_matrix(runs)], dtype=float)
    fig = _figure(max(6.0, 0.95 * len(cols) + 2.5), 0.42 * len(rows) + 2.4)
    ax = fig.add_subplot()
    im = ax.imshow(acc, cmap=colormaps["viridis"].with_extremes(bad="#e0e0e0"), vmin=0, vmax=100, aspect="auto")
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    for (i, j), a in np.ndenumerate(acc):
        ax.text(j, i, "n/a" if np.isnan(a) else f"{a:.1f}", ha="center", va="center", fontsize=9,
                color="white" if a < 55 else "black")  # NaN compares False: black on the grey cell
    if res["n_tasks"] < len(cols):
        ax.axvline(res["n_tasks"] - 0.5, color="black", lw=2.5)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(len(rows)), rows)
    ax.set(xlabel="task (right of the black line: general tasks)", ylabel="model after stage")
    ax.set_title(f"{title}\naccuracy (%) after each stage, mean over {len(runs)} seed(s)", fontsize=10)
    return _save(fig, path)


def _style(a, multitask):
    """The colour of arm a and the marker of the run kind: circles for sequential runs, squares for multi-task."""
    return {"color": PALETTE[a], "marker": "s" if multitask else "o"}


def _marker(config):
    """A run's colour and marker, from its config."""
    return _style(arm(config), config.get("multitask"))


def _key(configs):
    """Legend handles for the (arm, sequential / multi-task) kinds among the configs."""
    from matplotlib.lines import Line2D
    kinds = sorted({(arm(c), bool(c.get("multitask"))) for c in configs})
    return [Line2D([], [], ls="", ms=8, label=f"{ARM_LEGEND[a]}, {'multi-task' if mt else 'sequential'}",
                   **_style(a, mt)) for a, mt in kinds]


def curves(groups, path):
    """Per task, the accuracy across stages of every sequential run group (mean over seeds), one panel a task.
    Returns the figure, or None when no group is sequential."""
    seq = {n: rs for n, rs in groups.items() if len(rs[0]["rows"]) > 2}
    if not seq:
        return None
    ref = next(iter(seq.values()))[0]
    cols, rows = ref["columns"], ref["rows"]
    # the other pictures' colours (SFT on labels, on samples, RFT) when each group is one arm; else one per group
    kinds = [arm(rs[0]["config"]) for rs in seq.values()]
    colour = [PALETTE[a] for a in kinds] if len(set(kinds)) == len(kinds) else PALETTE * len(seq)
    ncol = min(4, len(cols))
    nrow = math.ceil(len(cols) / ncol)
    fig = _figure(3.1 * ncol + 0.6, 2.4 * nrow + 1.0 + 0.22 * len(seq))
    axes = fig.subplots(nrow, ncol, sharey=True, squeeze=False).flatten()
    x = list(range(len(rows)))
    for j, (ax, c) in enumerate(zip(axes, cols)):
        for k, (name, runs) in enumerate(seq.items()):
            ys = [mean_std([r["acc"][i][j] for r in runs])[0] for i in x]
            ax.plot(x, [math.nan if y is None else 100 * y for y in ys], marker="o", ms=4, color=colour[k],
                    label=f"{name} ({len(runs)} seed(s))" if j == 0 else None)
        ax.set_title(c + (" (general)" if j >= ref["n_tasks"] else ""), fontsize=10)
        ax.set(xticks=x, ylim=(-3, 103), xlabel="stage")
        ax.grid(alpha=0.3)
    for ax in axes[len(cols):]:
        ax.set_visible(False)
    fig.supylabel("accuracy (%)")
    fig.suptitle("accuracy of each task across the stages, mean over seeds\nstage 0: the base; then the model after "
                 "stage " + ", ".join(f"{i} ({r})" for i, r in enumerate(rows) if i), fontsize=11)
    fig.legend(loc="outside lower center", ncol=min(3, len(seq)), fontsize=9)
    return _save(fig, path)


def frontier(groups, path):
    """Stability-plasticity frontier: retention (general tasks, and FM) against new-task gain, one numbered point per
    group (mean and sample std over seeds as error bars), numbered in the legend. Returns the figure."""
    from matplotlib.lines import Line2D
    summ = summary(groups)
    cfg = {name: rs[0]["config"] for name, rs in groups.items()}
    fig = _figure(12, 5.6 + 0.2 * math.ceil(len(summ) / 2))
    for ax, (key, ylab) in zip(fig.subplots(1, 2), [("Retention", "general-task retention"), ("FM", "forgetting FM")]):
        ax.axhline(0, color="0.75", lw=1, zorder=0)
        shown = 0
        for k, (name, s) in enumerate(summ.items(), 1):
            (x, sx), (y, sy) = s["Gain"], s[key]
            if x is None or y is None:
                continue
            ax.errorbar(x, y, xerr=sx or None, yerr=sy or None, ls="", ms=14, elinewidth=1, capsize=2, alpha=0.9,
                        **_marker(cfg[name]))
            ax.annotate(str(k), (x, y), ha="center", va="center", fontsize=7, color="white", weight="bold")
            shown += 1
        if not shown:
            ax.text(0.5, 0.5, f"no group has {key}", transform=ax.transAxes, ha="center", color="0.4")
        ax.set(xlabel="new-task gain (accuracy points, %)", ylabel=f"{ylab} (accuracy points, %)",
               title=f"{ylab} against new-task gain")
        ax.grid(alpha=0.3)
    fig.suptitle("stability vs plasticity: one point per run group (mean ± std over seeds)")
    fig.legend(handles=[Line2D([], [], ls="", ms=8, label=f"{k}: {name} ({s['seeds']} seed(s))", **_marker(cfg[name]))
                        for k, (name, s) in enumerate(summ.items(), 1)],
               loc="outside lower left", ncol=2 if len(summ) > 4 else 1, fontsize=9, title="run groups")
    fig.legend(handles=_key(cfg.values()), loc="outside lower right", fontsize=9, title="colour and marker")
    return _save(fig, path)


def arm(config):
    """The picture's colour class of a run: SFT on labels (gold), RFT, SFT on the model's own or the base's own
    samples (self, oracle: the on-policy data controls), SFT on labels in the model's words (voice), or a LoRA run
    (LoRA-SFT of any data, LoRA-RFT). Index into PALETTE and ARM_LEGEND."""
    if config.get("lora_rank"):
        return 4 if config["script"] == "sft" else 5
    if config["script"] != "sft":
        return 1
    return {"gold": 0, "voice": 3}.get(config.get("sft_data", "gold"), 2)


PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
ARM_LEGEND = ("SFT on labels", "RFT", "SFT on own / base samples", "SFT on labels in own words", "LoRA-SFT",
              "LoRA-RFT")  # blue, red, green, orange, purple, brown


def kl_points(runs):
    """(KL, Retention, FM, script) per run that recorded a KL: the mechanism's data, one point per run."""
    pts = []
    for r in runs:
        d, m = distance_metrics(r), metrics(r["acc"], r["n_tasks"])
        if d["KL"] is not None:
            pts.append((d["KL"], m["Retention"], m["FM"], arm(r["config"])))
    return pts


def kl_figure(runs):
    """kl_picture's figure and fits: (None, None) with fewer than 3 runs that recorded a KL. Each fit line is drawn
    only between the smallest and the largest KL of its points (the Line2D with gid "fit")."""
    from matplotlib.lines import Line2D
    pts = kl_points(runs)
    if len(pts) < 3:
        return None, None
    cfgs = [r["config"] for r in runs if distance_metrics(r)["KL"] is not None]  # kl_points' runs, in its order
    fig = _figure(12, 5.6)
    fits = {}
    for ax, (col, key, ylab) in zip(fig.subplots(1, 2), [(1, "Retention", "general-task retention"),
                                                         (2, "FM", "forgetting FM")]):
        sub = [(p[0], p[col], c) for p, c in zip(pts, cfgs) if p[col] is not None]
        ax.axhline(0, color="0.75", lw=1, zorder=0)
        ax.set(xlabel="KL(base ‖ model) on the CPT tasks' prompts (nats per prompt)",
               ylabel=f"{ylab} (accuracy points, %)")
        ax.grid(alpha=0.3)
        if not sub:
            ax.text(0.5, 0.5, f"no run has {key}", transform=ax.transAxes, ha="center", color="0.4")
            continue
        for x, y, c in sub:
            ax.plot(x, y, ls="", ms=7, alpha=0.85, **_marker(c))
        xs, ys = [x for x, _, _ in sub], [y for _, y, _ in sub]
        fit = fits[key] = linear_fit(xs, ys)
        if fit:
            a, b, r2 = fit
            ax.plot([min(xs), max(xs)], [a + b * min(xs), a + b * max(xs)], color="0.4", lw=1.5, zorder=1, gid="fit")
        ax.set_title(f"{ylab}: " + (f"fit {a:.1f} {'−' if b < 0 else '+'} {abs(b):.1f} × KL, R² = {r2:.2f}"
                                    if fit else "no fit"), fontsize=10)
    fig.suptitle(f"forgetting against the forward KL to the base; one point per run ({len(pts)} runs)")
    fit_key = Line2D([], [], color="0.4", lw=1.5, label="least-squares fit, over its points' KL range")
    fig.legend(handles=_key(cfgs) + [fit_key], loc="outside lower center", ncol=4, fontsize=9)
    return fig, fits


def kl_picture(runs, path):
    """Forgetting (general retention, and FM) against the forward KL to the base, one point per run, with the
    least-squares line and its R^2. Returns the fits {"Retention": (a, b, R^2) or None, "FM": ...}, or None."""
    fig, fits = kl_figure(runs)
    if fig is not None:
        _save(fig, path)
    return fits


def report(paths, out, do_frontier=False):
    runs = [load_run(p) for p in paths]
    for r in runs:
        if not r["complete"]:
            print(f"left out: {r['path']} stopped after {len(r['rows']) - 1} of its {r['stages']} stage(s)")
    runs = [r for r in runs if r["complete"]]
    if not runs:
        raise SystemExit("no finished run to report")
    by_columns = {}
    for r in runs:
        by_columns.setdefault(tuple(r["columns"]), []).append(r["path"])
    if len(by_columns) > 1:  # one table has one set of columns: stage t of one run is not stage t of another
        raise SystemExit("error: these runs were evaluated on different tasks, so their stages and columns do not "
                         "line up; compare the runs of one task list at a time:\n  " + "\n  ".join(
                             f"{' '.join(cols)}: {' '.join(paths)}" for cols, paths in by_columns.items()))
    groups = group_runs(runs)
    md = markdown(groups)
    print(md)
    if out:
        os.makedirs(out, exist_ok=True)
        pictures = []
        for name, rs in groups.items():
            fn = "heatmap-" + "".join(ch if ch.isalnum() else "_" for ch in name) + ".png"
            seeds = ", ".join(str(r["config"]["seed"]) for r in rs)
            heatmap(rs, os.path.join(out, fn), f"{name}  (seeds {seeds})")
            pictures.append(fn)
        if curves(groups, os.path.join(out, "curves.png")):
            pictures.append("curves.png")
        if do_frontier:
            frontier(groups, os.path.join(out, "frontier.png"))
            pictures.append("frontier.png")
        fits = kl_picture(runs, os.path.join(out, "kl.png"))
        if fits is not None:
            pictures.append("kl.png")
            for key, fit in fits.items():
                line = f"{key} against KL over {len(kl_points(runs))} runs: " + (
                    f"{fit[0]:+.2f} {fit[1]:+.2f} x KL, R^2 = {fit[2]:.2f}" if fit else "no fit (constant)")
                print(line)
                md += "\n" + line + "\n"
        text = md + "\n" + "\n".join(f"![{p}]({p})" for p in pictures) + "\n"
        tmp = os.path.join(out, "report.md.tmp")
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, os.path.join(out, "report.md"))
        runtime.write_json(os.path.join(out, "summary.json"), summary(groups))
        print(f"report: {os.path.join(out, 'report.md')} and {len(pictures)} picture(s)")
    return groups


def checkpoint_errors(args):
    """evaluate.py MODEL's input, checked before the model loads (flags.py's checks, on this script's flags)."""
    errors = [f"--{k} {getattr(args, k)}: must be at least 1" for k in ("eval_n", "eval_batch", "max_new_tokens")
              if getattr(args, k) is not None and getattr(args, k) < 1]
    if args.eval_n > MAX_EVAL_ITEMS:
        errors.append(f"--eval_n {args.eval_n}: at most {MAX_EVAL_ITEMS} (every item is built in memory first)")
    model_errs, cfg, _ = model_errors(args.paths[0])
    errors += model_errs
    if cfg is None:
        return errors
    errors += budget_errors(cfg, args.paths[0], max_new_tokens=args.max_new_tokens or NEW_TOKENS[args.format])
    for spec in args.tasks:
        try:
            items = load_split(spec, "test", 1 if spec in BUILTIN else None)
        except DataError as e:
            errors.append(str(e))
            continue
        errors += text_model_errors(spec, items, is_vlm_config(cfg), args.paths[0])
    return errors


def evaluate_checkpoint(args):
    refuse(checkpoint_errors(args))
    _, _, device = runtime.init_dist()
    runtime.seed_all(0, "eval")
    lm = runtime.load_model(args.paths[0], device)
    for spec in args.tasks:
        items = eval_items(spec, args.eval_n)
        budget = args.max_new_tokens or NEW_TOKENS[args.format]
        acc, rew, cut = evaluate_task(lm, items, args.format, device, budget, args.eval_batch, desc=spec)
        runtime.print0(f"{task_name(spec):14s} accuracy {100 * acc:5.1f}% of {len(items)} items   "
                       f"mean reward {rew:.3f}   replies cut at {budget} tokens {100 * cut:.0f}%")
    runtime.cleanup()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("paths", nargs="+", help="run folders (with results.json) to compare, or one model to evaluate "
                                            "(an HF checkpoint folder or a .gguf file)")
    g = p.add_argument_group("evaluating a model")
    g.add_argument("--tasks", nargs="+", default=DEFAULT_SEQUENCE + DEFAULT_GENERAL, help="built-in names or JSONL")
    add_format_flag(g)
    add_eval_size_flags(g, "task")
    g.add_argument("--max_new_tokens", type=int, default=None, help=f"greedy completion budget (None: by --format, "
                                                                     f"{NEW_TOKENS})")
    g = p.add_argument_group("comparing runs")
    g.add_argument("--report", default=None, help="folder for report.md, summary.json and the PNG pictures")
    g.add_argument("--frontier", action="store_true", help="also plot retention against new-task gain")
    args = p.parse_args(argv)
    if all(os.path.exists(os.path.join(x, "results.json")) for x in args.paths):
        refuse(out_errors(args.report, "--report"))
        return report(args.paths, args.report, args.frontier)
    if len(args.paths) == 1 and (os.path.exists(os.path.join(args.paths[0], "config.json"))
                                 or args.paths[0].endswith(".gguf")):
        return evaluate_checkpoint(args)
    raise SystemExit("give run folders (each with results.json), or one model: a folder with config.json or a .gguf "
                     "file")


if __name__ == "__main__":
    runtime.run_script(main)
