"""evaluate.py's pictures from small fake run folders: every PNG is written and opens at a sensible size, the heat
map has a colour bar, the KL fit lines stay within their points' KL range, and sequential and multi-task runs get
different markers. No model, no training."""
import json
import os
import random

from PIL import Image

import evaluate

TASKS, GENERAL = ["any_color", "circle_cell", "jigsaw"], ["color", "add"]


def fake_run(folder, script, seed, multitask=False, sft_data="gold", lr=3e-05, kl_scale=1.0):
    """A finished run's results.json as loop.Run writes it (accuracies in [0, 1], KL in nats)."""
    rnd = random.Random(f"{script}{seed}{multitask}{sft_data}{lr}")
    stages = ["multitask"] if multitask else TASKS
    acc = [[0.3, 0.2, 0.0, 0.95, 0.9]]
    kl, ll = [[0.0] * len(TASKS)], [[-1.0, -2.0]]
    for k in range(1, len(stages) + 1):
        acc.append([min(1.0, max(0.0, a + rnd.uniform(-0.1, 0.3))) for a in acc[-1][:3]] +
                   [max(0.0, a - rnd.uniform(0.0, 0.3)) for a in acc[-1][3:]])
        kl.append([round(x + kl_scale * rnd.uniform(0.2, 1.5), 6) for x in kl[-1]])
        ll.append([x - rnd.uniform(0.0, 0.5) for x in ll[-1]])
    acc[1][4] = None  # a general cell that was not evaluated: "n/a" in the heat map
    config = {"script": script, "seed": seed, "lr": lr, "multitask": multitask, "tasks": TASKS, "general": GENERAL,
              "world": 1}
    if script == "sft":
        config["sft_data"] = sft_data
    res = {"columns": TASKS + GENERAL, "rows": ["base"] + stages, "acc": acc, "config": config,
           "stage_seconds": [1.0] * len(stages), "kl_to_base": kl, "general_ll": ll}
    os.makedirs(folder)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(res, f)
    return str(folder)


def fake_runs(tmp_path):
    return [fake_run(tmp_path / "sft0", "sft", 0), fake_run(tmp_path / "sft1", "sft", 1),
            fake_run(tmp_path / "self0", "sft", 0, sft_data="self"),
            fake_run(tmp_path / "rft0", "rft", 0, lr=1e-4, kl_scale=3.0),
            fake_run(tmp_path / "rft1", "rft", 1, lr=1e-4, kl_scale=3.0),
            fake_run(tmp_path / "sft-mt", "sft", 0, multitask=True),
            fake_run(tmp_path / "rft-mt", "rft", 0, multitask=True, lr=1e-4)]


def assert_png(path, min_w=500, min_h=250):
    assert os.path.exists(path), path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert im.format == "PNG" and min_w <= w <= 4000 and min_h <= h <= 4000, (path, im.size)


def test_report_writes_every_picture(tmp_path):
    out = tmp_path / "report"
    groups = evaluate.report(fake_runs(tmp_path), str(out), do_frontier=True)
    assert len(groups) == 5  # sft seeds 0 and 1 are one group
    heatmaps = sorted(f for f in os.listdir(out) if f.startswith("heatmap-"))
    assert len(heatmaps) == 5
    for fn in heatmaps + ["curves.png", "frontier.png", "kl.png"]:
        assert_png(str(out / fn))
    md = (out / "report.md").read_text()
    for fn in heatmaps + ["curves.png", "frontier.png", "kl.png"]:
        assert f"![{fn}]({fn})" in md
    assert "Retention against KL over 7 runs" in md


def test_heatmap_has_colour_bar_and_numbers(tmp_path):
    runs = [evaluate.load_run(p) for p in fake_runs(tmp_path)[:2]]  # sft seeds 0 and 1
    fig = evaluate.heatmap(runs, str(tmp_path / "h.png"), "sft lr=3e-05")
    assert_png(str(tmp_path / "h.png"), min_w=400, min_h=200)
    main, *rest = fig.axes
    assert len(rest) == 1 and rest[0].get_label() == "<colorbar>"
    assert rest[0].get_ylabel() == "accuracy (%)"
    texts = [t.get_text() for t in main.texts]
    assert len(texts) == 4 * 5 and "n/a" in texts  # every cell has its number; the missing one reads n/a
    mean = evaluate.mean_matrix(runs)
    assert f"{100 * mean[0][3]:.1f}" in texts


def test_kl_fit_lines_stay_within_the_points(tmp_path):
    runs = [evaluate.load_run(p) for p in fake_runs(tmp_path)]
    fig, fits = evaluate.kl_figure(runs)
    assert set(fits) == {"Retention", "FM"} and all(fits.values())
    for ax, key in zip(fig.axes, ("Retention", "FM")):
        fit_lines = [ln for ln in ax.lines if ln.get_gid() == "fit"]
        points = [ln for ln in ax.lines if ln.get_gid() != "fit" and ln.get_linestyle() == "None"]
        assert len(fit_lines) == 1 and points
        xs = [x for ln in points for x in ln.get_xdata()]
        fx = list(fit_lines[0].get_xdata())
        assert min(xs) <= min(fx) and max(fx) <= max(xs), (key, fx, min(xs), max(xs))
        assert (min(fx), max(fx)) == (min(xs), max(xs))
        a, b, _ = fits[key]
        assert list(fit_lines[0].get_ydata()) == [a + b * min(xs), a + b * max(xs)]
    # FM exists for sequential runs only: 5 of the 7 runs
    assert len([ln for ln in fig.axes[1].lines if ln.get_linestyle() == "None"]) == 5
    assert evaluate.kl_picture(runs, str(tmp_path / "kl.png")) == fits
    assert_png(str(tmp_path / "kl.png"))
    assert evaluate.kl_figure(runs[:2]) == (None, None)  # fewer than 3 runs: no picture
    assert evaluate.kl_picture(runs[:2], str(tmp_path / "no.png")) is None
    assert not os.path.exists(tmp_path / "no.png")


def test_sequential_and_multitask_markers_differ_and_arms_keep_colours(tmp_path):
    groups = evaluate.group_runs([evaluate.load_run(p) for p in fake_runs(tmp_path)])
    fig = evaluate.frontier(groups, str(tmp_path / "f.png"))
    assert_png(str(tmp_path / "f.png"))
    left = fig.axes[0]  # retention: every group, numbered 1..5
    assert sorted(t.get_text() for t in left.texts) == ["1", "2", "3", "4", "5"]
    style = {}
    for name, rs in groups.items():
        c = rs[0]["config"]
        style[name] = evaluate._marker(c)
        assert style[name]["marker"] == ("s" if c["multitask"] else "o")
    assert style["sft lr=3e-05 sft_data=gold"]["color"] != style["sft sft_data=self lr=3e-05"]["color"]
    assert style["rft lr=0.0001"]["color"] == style["rft-multitask lr=0.0001"]["color"]
    legend_labels = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert "RFT, multi-task" in legend_labels and "SFT on labels, sequential" in legend_labels
    assert any(lab.startswith("1: ") for lab in legend_labels)


def test_curves_only_for_sequential_groups(tmp_path):
    runs = [evaluate.load_run(p) for p in fake_runs(tmp_path)]
    groups = evaluate.group_runs(runs)
    fig = evaluate.curves(groups, str(tmp_path / "c.png"))
    assert_png(str(tmp_path / "c.png"))
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == len(TASKS + GENERAL)
    assert len(visible[0].lines) == 3  # sft gold, sft self, rft; not the multi-task groups
    mt = evaluate.group_runs([r for r in runs if r["config"]["multitask"]])
    assert evaluate.curves(mt, str(tmp_path / "none.png")) is None
