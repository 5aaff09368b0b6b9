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
  GenLL      = mean_g ( LL_T[g] - LL_0[g] )   change of the general tasks' gold-answer log-likelihood, nats per item
A multi-task run has one stage ("multitask"): AvgAcc, Gain (A[1][j] - A[0][j]) and Retention apply; FM, BWT and
FWT do not. All numbers are in accuracy points (percent). Runs that differ only by --seed are shown as mean +- std
(sample std over seeds).

    python evaluate.py runs/sft runs/rft runs/sft-mt runs/rft-mt --report runs/report
    python evaluate.py data/tiny-base --tasks left_color jigsaw color        # evaluate one checkpoint
    python evaluate.py runs/sweep/* --frontier --report runs/frontier        # stability-plasticity frontier
    torchrun --standalone --nproc_per_node=8 evaluate.py /ckpt/model --tasks a.jsonl b.jsonl --format boxed
"""
import argparse
import json
import math
import os
import statistics

from PIL import Image, ImageDraw, ImageFont

import common
from data.rewards import FORMATS
from data.tasks import DEFAULT_GENERAL, DEFAULT_SEQUENCE


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
    """KL to the base after the last stage (mean over the CPT tasks) and the change of the general tasks' gold
    log-likelihood, from results.json's "kl_to_base" and "general_ll" rows (None when the run has none)."""
    kl = res.get("kl_to_base") or [[]]
    ll = res.get("general_ll") or [[]]
    d = [b - a for a, b in zip(ll[0], ll[-1]) if a is not None and b is not None] if len(ll) > 1 else []
    return {"KL": _mean([x for x in kl[-1] if x is not None]) if len(kl) > 1 else None, "GenLL": _mean(d)}


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
    with open(os.path.join(path, "results.json")) as f:
        res = json.load(f)
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
    for k in ("lr", "rif", "sft_data", "adv", "kl_coef", "format", "skip_zero_var", "loss_agg"):
        default = {"rif": "none", "sft_data": "gold", "adv": "grpo", "kl_coef": 0.0, "format": "plain",
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
        varying = sorted(k for k in c if k not in ("seed", "world", "lr") and
                         len({json.dumps(f.get(k)) for f in family}) > 1)
        name = label(rs[0])
        out[name + "".join(f" {k}={c.get(k)}" for k in varying if f" {k}=" not in name)] = rs
    return out


# ----------------------------------------------------------------------------- report

KEYS = ("AvgAcc", "FM", "BWT", "FWT", "Gain", "Retention", "KL", "GenLL")


def summary(groups):
    """Per group: {metric: (mean, std)}, plus the mean last row per column."""
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


def markdown(groups):
    summ = summary(groups)
    lines = ["| run | seeds | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS)]
    for name, s in summ.items():
        cells = [fmt_ms(s[k]).lstrip("+") if k == "AvgAcc" else fmt_ms(s[k], 3 if k in ("KL", "GenLL") else 1)
                 for k in KEYS]
        lines.append(f"| {name} | {s['seeds']} | " + " | ".join(cells) + " |")
    lines += ["", "Points of accuracy (%). AvgAcc: final accuracy on the CPT tasks; FM: P1's forgetting (<= 0); "
              "BWT/FWT: backward/forward transfer; Gain: new-task gain right after learning; Retention: general "
              "tasks, last minus base. KL: forward KL(base || final model) on the CPT tasks' prompts, nats per "
              "prompt, estimated on the base's own samples; GenLL: change of the general tasks' gold-answer "
              "log-likelihood, nats per item.", ""]
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
    for name, runs in groups.items():  # the last row of each group, per task
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


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def mean_matrix(runs):
    """The accuracy matrix averaged over seeds, cell by cell (None where every seed has None)."""
    return [[mean_std([r["acc"][i][j] for r in runs])[0] for j in range(len(runs[0]["columns"]))]
            for i in range(len(runs[0]["rows"]))]


def heatmap(runs, path, title):
    """The accuracy matrix, mean over the seeds given, with the numbers in the cells (rows: stages; columns: tasks);
    the same numbers as the report's table."""
    res = runs[0]
    rows, cols, acc = res["rows"], res["columns"], mean_matrix(runs)
    f, fb = _font(13), _font(15)
    cw, ch, left, top = 86, 30, 110, 64
    img = Image.new("RGB", (max(left + cw * len(cols) + 10, 760), top + ch * len(rows) + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title, fill="black", font=fb)
    d.text((10, 28), f"accuracy (%) after each stage, mean over {len(runs)} seed(s); columns right of the bar are "
                     f"general tasks", fill="#444", font=f)
    for j, c in enumerate(cols):
        d.text((left + j * cw + cw / 2, top - 8), c, fill="black", font=f, anchor="ms")
    for i, r in enumerate(rows):
        d.text((left - 8, top + i * ch + ch / 2), r, fill="black", font=f, anchor="rm")
        for j in range(len(cols)):
            a = acc[i][j]
            x0, y0 = left + j * cw, top + i * ch
            color = (230, 230, 230) if a is None else (int(255 - 180 * a), int(120 + 120 * a), int(255 - 120 * a))
            d.rectangle([x0, y0, x0 + cw - 2, y0 + ch - 2], fill=color)
            d.text((x0 + cw / 2, y0 + ch / 2), "n/a" if a is None else f"{100 * a:.1f}", fill="black", font=f,
                   anchor="mm")
    xb = left + res["n_tasks"] * cw - 1
    d.line([xb, top - 4, xb, top + ch * len(rows)], fill="black", width=2)
    img.save(path)


PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def _axes(d, box, xlabels, ylabel, f, ymin=0.0, ymax=100.0):
    x0, y0, x1, y1 = box
    for v in range(int(ymin), int(ymax) + 1, 20 if ymax - ymin > 60 else 10):
        y = y1 - (v - ymin) / (ymax - ymin) * (y1 - y0)
        d.line([x0 - 4, y, x0, y], fill="black")
        d.line([x0 + 1, y, x1 - 1, y], fill=(235, 235, 235))
        d.text((x0 - 6, y), str(v), fill="black", font=f, anchor="rm")
    d.rectangle(box, outline="black")  # last, so the grid does not paint over the frame
    for i, lab in enumerate(xlabels):
        x = x0 + (i + 0.5) / len(xlabels) * (x1 - x0)
        d.text((x, y1 + 6), lab, fill="black", font=f, anchor="ma")
    d.text((x0, y0 - 6), ylabel, fill="black", font=f, anchor="ls")


def curves(groups, path):
    """Per task, the accuracy across stages of every sequential run group (mean over seeds), one panel a task."""
    seq = {n: rs for n, rs in groups.items() if len(rs[0]["rows"]) > 2}
    if not seq:
        return False
    ref = next(iter(seq.values()))[0]
    cols, rows = ref["columns"], ref["rows"]
    # the other pictures' colours (SFT on labels, on samples, RFT) when each group is one arm; else one per group
    kinds = [arm(rs[0]["config"]) for rs in seq.values()]
    colour = [PALETTE[a] for a in kinds] if len(set(kinds)) == len(kinds) else PALETTE * len(seq)
    f, fb = _font(12), _font(14)
    pw, ph, ncol = 300, 210, 4
    nrow = math.ceil(len(cols) / ncol)
    legend_h = 22 * len(seq) + 10
    img = Image.new("RGB", (max(ncol * pw + 20, 900), nrow * ph + 50 + legend_h), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), "accuracy (%) of each task across the stages, mean over seeds; x: the base (0), then the model "
                     "after stage " + ", ".join(f"{i} ({r})" for i, r in enumerate(rows) if i), fill="black", font=fb)
    for j, c in enumerate(cols):
        ox, oy = 10 + (j % ncol) * pw, 40 + (j // ncol) * ph
        box = (ox + 40, oy + 24, ox + pw - 12, oy + ph - 44)
        _axes(d, box, [str(i) for i in range(len(rows))], f"{c}{' (general)' if j >= ref['n_tasks'] else ''}", f)
        for k, runs in enumerate(seq.values()):
            pts = []
            for i in range(len(rows)):
                v = mean_std([r["acc"][i][j] * 100 for r in runs if r["acc"][i][j] is not None])[0]
                if v is not None:
                    pts.append((box[0] + (i + 0.5) / len(rows) * (box[2] - box[0]),
                                box[3] - v / 100 * (box[3] - box[1])))
            if len(pts) > 1:
                d.line(pts, fill=colour[k], width=2)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour[k])
    ly = 40 + nrow * ph
    for k, name in enumerate(seq):
        d.rectangle([20, ly + 22 * k + 4, 34, ly + 22 * k + 16], fill=colour[k])
        d.text((42, ly + 22 * k + 10), f"{name} ({len(seq[name])} seed(s))", fill="black", font=f, anchor="lm")
    img.save(path)
    return True


def frontier(groups, path):
    """Stability-plasticity frontier: retention (general tasks, and FM) against new-task gain, one point per group."""
    summ = summary(groups)
    f, fb = _font(12), _font(14)
    img = Image.new("RGB", (1000, 520), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), "stability vs plasticity: each point is a run group (mean over seeds); x = new-task gain (points)",
           fill="black", font=fb)
    gains = [s["Gain"][0] for s in summ.values() if s["Gain"][0] is not None] or [0.0]
    xmin, xmax = min(0.0, min(gains)) - 2, max(gains) + 2
    panels = [("Retention", "general-task retention (points)"), ("FM", "forgetting FM (points)")]
    for p, (key, ylab) in enumerate(panels):
        vals = [s[key][0] for s in summ.values() if s[key][0] is not None] or [0.0]
        ymin, ymax = min(min(vals), 0.0) - 2, max(max(vals), 0.0) + 2
        box = (70 + p * 490, 60, 460 + p * 490, 420)
        d.rectangle(box, outline="black")
        d.text((box[0], box[1] - 8), ylab, fill="black", font=f, anchor="ls")
        for t in range(5):  # ticks
            yv = ymin + t * (ymax - ymin) / 4
            y = box[3] - (yv - ymin) / (ymax - ymin) * (box[3] - box[1])
            d.text((box[0] - 6, y), f"{yv:.0f}", fill="black", font=f, anchor="rm")
            xv = xmin + t * (xmax - xmin) / 4
            x = box[0] + (xv - xmin) / (xmax - xmin) * (box[2] - box[0])
            d.text((x, box[3] + 6), f"{xv:.0f}", fill="black", font=f, anchor="ma")
        y0 = box[3] - (0 - ymin) / (ymax - ymin) * (box[3] - box[1])
        d.line([box[0], y0, box[2], y0], fill=(200, 200, 200))
        for k, (name, s) in enumerate(summ.items()):
            if s["Gain"][0] is None or s[key][0] is None:
                continue
            x = box[0] + (s["Gain"][0] - xmin) / (xmax - xmin) * (box[2] - box[0])
            y = box[3] - (s[key][0] - ymin) / (ymax - ymin) * (box[3] - box[1])
            col = PALETTE[arm(groups[name][0]["config"])]
            d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=col)
            d.text((x + 7, y), name.split(" ", 1)[-1].replace("sft_data=", ""), fill=col, font=f, anchor="lm")
        d.text(((box[0] + box[2]) / 2, box[3] + 24), "new-task gain (points)", fill="black", font=f, anchor="ma")
    d.text((70, 480), f"{ARM_LEGEND}   (labels: the run's settings)", fill="black", font=f)
    img.save(path)


def arm(config):
    """The picture's colour class of a run: SFT on labels (gold), SFT on the model's own or the base's own samples
    (self, oracle: the on-policy data controls), or RFT. Index into PALETTE and ARM_LEGEND."""
    if config["script"] != "sft":
        return 1
    return 2 if config.get("sft_data", "gold") != "gold" else 0


ARM_LEGEND = "blue: SFT on labels   green: SFT on own / base samples   red: RFT"


def kl_points(runs):
    """(KL, Retention, FM, script) per run that recorded a KL: the mechanism's data, one point per run."""
    pts = []
    for r in runs:
        d, m = distance_metrics(r), metrics(r["acc"], r["n_tasks"])
        if d["KL"] is not None:
            pts.append((d["KL"], m["Retention"], m["FM"], arm(r["config"])))
    return pts


def kl_picture(runs, path):
    """Forgetting (general retention, and FM) against the forward KL to the base, one point per run, with the
    least-squares line and its R^2."""
    pts = kl_points(runs)
    if len(pts) < 3:
        return None
    f, fb = _font(12), _font(14)
    img = Image.new("RGB", (1000, 520), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), "forgetting against the forward KL(base || model) on the CPT tasks' prompts; one point per run",
           fill="black", font=fb)
    xs = [p[0] for p in pts]
    xmin, xmax = min(0.0, min(xs)), max(xs) * 1.05 + 1e-9
    fits = {}
    for panel, (col, key, ylab) in enumerate([(1, "Retention", "general-task retention (points)"),
                                              (2, "FM", "forgetting FM (points)")]):
        sub = [(p[0], p[col], p[3]) for p in pts if p[col] is not None]
        if not sub:
            continue
        ys = [y for _, y, _ in sub]
        ymin, ymax = min(min(ys), 0.0) - 2, max(max(ys), 0.0) + 2
        box = (70 + panel * 490, 60, 460 + panel * 490, 420)
        sx = lambda x: box[0] + (x - xmin) / (xmax - xmin) * (box[2] - box[0])  # noqa: E731
        sy = lambda y: box[3] - (y - ymin) / (ymax - ymin) * (box[3] - box[1])  # noqa: E731
        d.rectangle(box, outline="black")
        d.line([box[0], sy(0), box[2], sy(0)], fill=(210, 210, 210))
        for t in range(5):
            yv, xv = ymin + t * (ymax - ymin) / 4, xmin + t * (xmax - xmin) / 4
            d.text((box[0] - 6, sy(yv)), f"{yv:.0f}", fill="black", font=f, anchor="rm")
            d.text((sx(xv), box[3] + 6), f"{xv:.2f}", fill="black", font=f, anchor="ma")
        fit = linear_fit([x for x, _, _ in sub], ys)
        fits[key] = fit
        if fit:
            a, b, r2 = fit
            d.line([sx(xmin), sy(a + b * xmin), sx(xmax), sy(a + b * xmax)], fill=(120, 120, 120), width=2)
        title = f"{ylab}" + (f"   fit: {fit[0]:+.1f} {fit[1]:+.1f} x KL, R^2 = {fit[2]:.2f}" if fit else "")
        d.text((box[0], box[1] - 8), title, fill="black", font=f, anchor="ls")
        for x, y, kind in sub:
            col_ = PALETTE[kind]
            d.ellipse([sx(x) - 5, sy(y) - 5, sx(x) + 5, sy(y) + 5], fill=col_)
        d.text(((box[0] + box[2]) / 2, box[3] + 24), "KL to the base (nats per prompt)", fill="black", font=f,
               anchor="ma")
    d.text((70, 480), f"{ARM_LEGEND}   ({len(pts)} runs)", fill="black", font=f)
    img.save(path)
    return fits


def report(paths, out, do_frontier=False):
    runs = [load_run(p) for p in paths]
    for r in runs:
        if not r["complete"]:
            print(f"left out: {r['path']} stopped after {len(r['rows']) - 1} of its {r['stages']} stage(s)")
    runs = [r for r in runs if r["complete"]]
    if not runs:
        raise SystemExit("no finished run to report")
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
        common.write_json(os.path.join(out, "summary.json"), summary(groups))
        print(f"report: {os.path.join(out, 'report.md')} and {len(pictures)} picture(s)")
    return groups


def evaluate_checkpoint(args):
    _, _, device = common.init_dist()
    common.seed_all(0, "eval")
    lm = common.load_model(args.paths[0], device)
    for spec in args.tasks:
        items = common.eval_items(spec, args.eval_n)
        if not lm.is_vlm and any(it["images"] for it in items):
            raise SystemExit(f"task {spec} has images but {args.paths[0]} is a text-only model")
        acc, rew = common.evaluate_task(lm, items, args.format, device, args.eval_batch, desc=spec)
        common.print0(f"{common.task_name(spec):14s} accuracy {100 * acc:5.1f}% of {len(items)} items   "
                      f"mean reward {rew:.3f}")
    common.cleanup()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("paths", nargs="+", help="run folders (with results.json), or one model folder")
    g = p.add_argument_group("evaluating a model")
    g.add_argument("--tasks", nargs="+", default=DEFAULT_SEQUENCE + DEFAULT_GENERAL, help="built-in names or JSONL")
    g.add_argument("--format", default="plain", choices=FORMATS, help="answer format")
    g.add_argument("--eval_n", type=int, default=500, help="test items per task")
    g.add_argument("--eval_batch", type=int, default=128, help="evaluation batch size")
    g = p.add_argument_group("comparing runs")
    g.add_argument("--report", default=None, help="folder for report.md, summary.json and the PNG pictures")
    g.add_argument("--frontier", action="store_true", help="also plot retention against new-task gain")
    args = p.parse_args(argv)
    if all(os.path.exists(os.path.join(x, "results.json")) for x in args.paths):
        return report(args.paths, args.report, args.frontier)
    if len(args.paths) == 1 and (os.path.exists(os.path.join(args.paths[0], "config.json"))
                                 or args.paths[0].endswith(".gguf")):
        return evaluate_checkpoint(args)
    raise SystemExit("give run folders (each with results.json) or one model folder (with config.json)")


if __name__ == "__main__":
    main()
