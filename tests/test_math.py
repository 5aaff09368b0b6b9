"""Every formula against numbers worked out by hand: advantages, clipped objective, KL, aggregation, SFT loss,
filter modes, continual-learning metrics."""
import math

import pytest
import torch

import measure
import runtime
from rollouts import keep, pass_count_histogram, pass_rate, zero_variance
from cpt_rft import ADV_EPS, aggregate, clipped_token_loss, group_advantages, k3_kl, silent_groups
from cpt_sft import sft_loss
from evaluate import mean_std, metrics, pearson, variance_diagnostic
from filter import token_nll


# ----------------------------------------------------------------------------- advantages

def test_grpo_advantage_by_hand():
    # rewards 1, 0, 0, 1: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 0.57735
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), "grpo")
    expected = 0.5 / (math.sqrt(1 / 3) + ADV_EPS)
    assert adv.tolist()[0] == pytest.approx([expected, -expected, -expected, expected], rel=1e-6)
    # rewards 1, 0.1, 0.1: mean 0.4, deviations .6 -.3 -.3, unbiased var (.36+.09+.09)/2 = .27
    adv = group_advantages(torch.tensor([[1.0, 0.1, 0.1]]), "grpo")
    s = math.sqrt(0.27) + ADV_EPS
    assert adv.tolist()[0] == pytest.approx([0.6 / s, -0.3 / s, -0.3 / s], rel=1e-5)


def test_rloo_advantage_by_hand():
    # r_i minus the mean of the other three: 1 - 1/3, 0 - 2/3, 0 - 2/3, 1 - 1/3
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), "rloo")
    assert adv.tolist()[0] == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3], rel=1e-6)


def test_remax_advantage_by_hand():
    adv = group_advantages(torch.tensor([[1.0, 0.1], [0.1, 0.1]]), "remax", baseline=torch.tensor([0.1, 1.0]))
    assert adv.tolist() == [pytest.approx([0.9, 0.0]), pytest.approx([-0.9, -0.9])]


@pytest.mark.parametrize("est", ["grpo", "rloo"])
def test_all_equal_group_has_zero_advantage(est):
    r = torch.tensor([[0.1, 0.1, 0.1, 0.1], [1.0, 1.0, 1.0, 1.0]])
    adv = group_advantages(r, est)
    assert torch.equal(adv, torch.zeros_like(adv))
    assert silent_groups(r, est).tolist() == [True, True]


def test_remax_all_correct_group_with_a_wrong_greedy_answer_still_teaches():
    # every sample right (reward 1.0) but the greedy answer wrong (0.1): A = 0.9 for each sample, not silent;
    # the second group's rewards equal its greedy baseline: silent
    r = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.1, 0.1, 0.1, 0.1]])
    baseline = torch.tensor([0.1, 0.1])
    assert group_advantages(r, "remax", baseline).tolist() == [pytest.approx([0.9] * 4), [0.0] * 4]
    assert silent_groups(r, "remax", baseline).tolist() == [False, True]
    assert silent_groups(r, "grpo").tolist() == [True, True]    # by rewards alone both would have been skipped


def test_silent_groups_use_a_tolerance():
    r = torch.tensor([[0.9 * 1 + 0.1 * 1, 1.0], [0.1, 0.1 + 1e-3]])
    assert silent_groups(r, "grpo").tolist() == [True, False]
    assert silent_groups(r, "remax", torch.tensor([1.0, 0.1])).tolist() == [True, False]


# ----------------------------------------------------------------------------- clipped objective and KL

def test_clipped_loss_inside_and_outside_the_clip():
    old = torch.zeros(1, 4)
    ratios = torch.tensor([[1.1, 1.5, 0.5, 0.9]])
    logp = torch.log(ratios)
    # positive advantage 2: min(rho A, clip(rho, 0.8, 1.3) A) -> 2.2, 2.6 (clipped at 1.3), 1.0 (0.5 < 0.8: min), 1.8
    loss = clipped_token_loss(logp, old, torch.tensor([2.0]), 0.2, 0.3)
    assert loss.tolist()[0] == pytest.approx([-2.2, -2.6, -1.0, -1.8], rel=1e-6)
    # negative advantage -1: min(-rho, -clip(rho)) -> -1.1, -1.5 (unclipped is smaller), -0.8 (clipped), -0.9
    loss = clipped_token_loss(logp, old, torch.tensor([-1.0]), 0.2, 0.3)
    assert loss.tolist()[0] == pytest.approx([1.1, 1.5, 0.8, 0.9], rel=1e-6)


def test_clipped_gradient_vanishes_outside_the_clip():
    logp = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_(True)
    clipped_token_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), 0.2, 0.3).sum().backward()
    assert logp.grad.tolist()[0] == pytest.approx([0.0, -1.1])  # d(-rho)/dlogp = -rho inside the clip


def test_k3_kl_by_hand():
    logp = torch.tensor([math.log(0.5), math.log(0.2)])
    ref = torch.tensor([math.log(0.25), math.log(0.2)])
    # d = ref - logp = log(0.5): exp(d) - d - 1 = 0.5 - log 0.5 - 1 = 0.193147; equal -> 0
    assert k3_kl(logp, ref).tolist() == pytest.approx([0.5 + math.log(2) - 1, 0.0], abs=1e-7)
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


# ----------------------------------------------------------------------------- aggregation

TOK = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def test_aggregation_by_hand():
    assert aggregate(TOK, MASK, "token_mean", 4, 2, 10).item() == pytest.approx(10 / 4)
    assert aggregate(TOK, MASK, "seq_mean", 4, 2, 10).item() == pytest.approx((2 + 4) / 2)
    assert aggregate(TOK, MASK, "dr_grpo", 4, 2, 10).item() == pytest.approx(10 / (2 * 10))


@pytest.mark.parametrize("mode,first,second", [
    ("token_mean", 6 / 4, 4 / 4),          # row 1 sums 6, row 2 sums 4; 4 tokens in the global batch
    ("seq_mean", 2 / 2, 4 / 2),            # row means 2 and 4; 2 sequences in the global batch
    ("dr_grpo", 6 / 20, 4 / 20),           # constant normaliser 2 sequences x 10 tokens
])
def test_aggregation_split_into_micro_batches_by_hand(mode, first, second):
    # each micro-batch's share, with the global counts, is its hand-worked part of the batch loss
    assert aggregate(TOK[:1], MASK[:1], mode, 4, 2, 10).item() == pytest.approx(first)
    assert aggregate(TOK[1:], MASK[1:], mode, 4, 2, 10).item() == pytest.approx(second)


def test_sft_loss_by_hand():
    logp = torch.tensor([[math.log(0.5), math.log(0.25)], [math.log(0.1), 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert sft_loss(logp, mask, 3).item() == pytest.approx((math.log(2) + math.log(4) + math.log(10)) / 3)


# ----------------------------------------------------------------------------- filter

def test_zero_variance_uses_a_tolerance():
    assert zero_variance([0.9 * 1 + 0.1 * 1, 1.0, 1.0])       # 0.9 + 0.1 is 0.9999999999999999 in floats
    assert zero_variance([0.1, 0.1 + 1e-9])
    assert not zero_variance([0.1, 0.1 + 1e-3])
    assert not zero_variance([0.1, 1.0])


# table: K = 4 rollouts; rewards and correctness
ALL_WRONG = ([0.1, 0.1, 0.0, 0.1], [0, 0, 0, 0])       # different rewards (format) but never correct
ALL_WRONG_EQ = ([0.1, 0.1, 0.1, 0.1], [0, 0, 0, 0])
ALL_RIGHT = ([1.0, 1.0, 0.9 + 0.1, 1.0], [1, 1, 1, 1])
HALF = ([1.0, 0.1, 1.0, 0.1], [1, 0, 1, 0])
ONE = ([1.0, 0.1, 0.1, 0.1], [1, 0, 0, 0])


@pytest.mark.parametrize("row,incompetent,zero_var,pr", [
    (ALL_WRONG, False, True, False),   # zero_variance keeps it: format rewards differ, GRPO still has a gradient
    (ALL_WRONG_EQ, False, False, False),
    (ALL_RIGHT, True, False, False),
    (HALF, True, True, True),
    (ONE, True, True, True),           # pass rate 0.25 is inside (0.1, 0.9)
])
def test_filter_modes_on_a_hand_table(row, incompetent, zero_var, pr):
    rewards, correct = row
    assert keep("incompetent", rewards, correct) is incompetent
    assert keep("zero_variance", rewards, correct) is zero_var
    assert keep("pass_rate", rewards, correct, 0.1, 0.9) is pr
    assert keep("none", rewards, correct)


def test_pass_rate_bounds_are_open_with_tolerance():
    assert pass_rate([1, 0, 0, 0]) == 0.25
    assert not keep("pass_rate", [1, .1, .1, .1], [1, 0, 0, 0], 0.25, 0.9)   # 0.25 is not above 0.25
    assert keep("pass_rate", [1, .1, .1, .1], [1, 0, 0, 0], 0.2, 0.9)


def test_correct_rollouts_histogram_has_a_bin_per_count():
    # K = 8: 7/8 and 8/8 are different instances (zero_variance keeps the first, drops the second)
    assert pass_count_histogram([0, 7, 8, 8, 3], 8) == [1, 0, 0, 1, 0, 0, 0, 1, 2]


def test_token_nll_by_hand():
    # two completions: p = 1/2, 1/4 (then padding whose log p is already zeroed), and p = 1 (log p = 0)
    logp = torch.tensor([[math.log(0.5), math.log(0.25), 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    nll, n = token_nll(logp, mask)
    assert n == 3 and nll == pytest.approx(math.log(2) + math.log(4))   # 3 ln 2 = 2.079 nats over 3 tokens
    assert math.exp(nll / n) == pytest.approx(2.0)                      # perplexity 2


# ----------------------------------------------------------------------------- continual-learning metrics

# 3 CPT tasks + 1 general; rows: base, after stage 1, 2, 3 (fractions)
A = [[0.2, 0.3, 0.5, 0.9],
     [0.8, 0.3, 0.5, 0.8],
     [0.6, 0.9, 0.5, 0.85],
     [0.5, 0.7, 0.5, 0.7]]   # task 3 is never learned (0.5 throughout)


def test_metrics_by_hand():
    m = metrics(A, 3)
    assert m["AvgAcc"] == pytest.approx((50 + 70 + 50) / 3)
    # FM: task 1: 50 - max(80, 60) = -30; task 2: 70 - max(30, 90) = -20 -> -25
    assert m["FM"] == pytest.approx(-25)
    # BWT: task 1: 50 - 80 = -30; task 2: 70 - 90 = -20 -> -25
    assert m["BWT"] == pytest.approx(-25)
    # FWT: task 2 before learning (row 1) 30 - base 30 = 0; task 3 (row 2) 50 - 50 = 0
    assert m["FWT"] == pytest.approx(0)
    # Gain: (80-20) + (90-30) + (50-50) over 3 = 40
    assert m["Gain"] == pytest.approx(40)
    assert m["Retention"] == pytest.approx(70 - 90)


def test_metrics_with_ties_and_a_task_better_before_learning():
    B = [[0.5, 0.5, 1.0], [0.7, 0.6, 1.0], [0.7, 0.6, 1.0]]  # no forgetting at all; task 2 improves at stage 1
    m = metrics(B, 2)
    assert m["FM"] == 0 and m["BWT"] == 0
    assert m["FWT"] == pytest.approx(10)     # task 2: 60 - 50 before it was trained
    assert m["Gain"] == pytest.approx((20 + 10) / 2)
    assert m["Retention"] == 0


def test_multitask_metrics():
    m = metrics([[0.2, 0.4, 0.9], [0.8, 0.6, 0.8]], 2)
    assert m["AvgAcc"] == pytest.approx(70) and m["Gain"] == pytest.approx(40)
    assert m["FM"] is None and m["BWT"] is None and m["FWT"] is None
    assert m["Retention"] == pytest.approx(-10)


def test_mean_std_over_seeds():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([5.0]) == (5.0, 0.0)
    assert mean_std([None, 2.0, 4.0]) == (3.0, pytest.approx(math.sqrt(2)))


def test_pearson_by_hand():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x = 1,2,3,4; y = 1,3,2,4: sxy = 4, sxx = syy = 5 -> 0.8
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert pearson([1, 1, 1], [1, 2, 3]) is None and pearson([1, 2], [1, 2]) is None


def test_variance_diagnostic_reads_grpo_logs():
    log = [{"reward_var": v, "grad_norm": 2 * v, "general_ll_delta": -v} for v in (0.1, 0.2, 0.05, 0.15)]
    log.append({"loss": 1.0})  # an SFT-style line is ignored
    d = variance_diagnostic(log)
    assert d["steps"] == 4 and d["reward_var_vs_grad_norm"] == pytest.approx(1.0)
    assert d["reward_var_vs_abs_general_ll_change"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- equal forwards on every rank

def test_equal_chunks_pad_a_short_rank_with_stand_ins(monkeypatch):
    assert list(runtime.equal_chunks([1, 2, 3, 4, 5], 2, "cpu", 0)) == [([1, 2], True), ([3, 4], True), ([5], True)]
    # another rank has 4 chunks: this one follows with a stand-in pass whose output is thrown away
    monkeypatch.setattr(runtime, "all_max", lambda value, device: max(value, 4))
    assert list(runtime.equal_chunks([1, 2, 3, 4, 5], 2, "cpu", 0))[3:] == [([0], False)]
    assert list(runtime.equal_chunks([], 2, "cpu", 9)) == [([9], False)] * 4


# ----------------------------------------------------------------------------- pooling runs as seeds

def _run(seed=0, rows=3, **cfg):
    config = {"script": "sft", "multitask": False, "tasks": ["a", "b"], "lr": 3e-5, "steps": 60, "seed": seed,
              "world": 1, **cfg}
    return {"config": config, "rows": ["base", "a", "b"][:rows], "acc": [[0.5, 0.5, 1.0]] * rows,
            "columns": ["a", "b", "g"], "n_tasks": 2, "stages": 2, "complete": rows == 3, "path": f"r{seed}"}


def test_runs_pool_as_seeds_only_when_their_commands_are_equal():
    from evaluate import group_runs
    groups = group_runs([_run(0), _run(1), _run(2, steps=30), _run(3, eval_n=100), _run(4, world=2)])
    sizes = {name: [r["config"]["seed"] for r in rs] for name, rs in groups.items()}
    # seeds 0, 1 and the 2-process seed 4 are one setting; other steps or eval_n are other settings, named as such
    assert sorted(sizes.values()) == [[0, 1, 4], [2], [3]]
    assert any("steps=30" in n for n in sizes) and any("eval_n=100" in n for n in sizes)


def test_a_run_that_stopped_early_is_left_out_of_the_report(tmp_path, capsys):
    import json
    import os
    from evaluate import report
    for name, rows in (("done", 3), ("stopped", 2)):
        os.makedirs(tmp_path / name)
        r = _run(rows=rows)
        with open(tmp_path / name / "results.json", "w") as f:
            json.dump({k: r[k] for k in ("config", "rows", "acc", "columns")}, f)
    groups = report([str(tmp_path / "done"), str(tmp_path / "stopped")], None)
    assert [len(rs) for rs in groups.values()] == [1]
    assert "stopped after 1 of its 2 stage(s)" in capsys.readouterr().out


def test_linear_fit_by_hand():
    from evaluate import linear_fit
    a, b, r2 = linear_fit([0, 1, 2], [1, 3, 5])          # exactly y = 1 + 2x
    assert (a, b, r2) == (pytest.approx(1), pytest.approx(2), pytest.approx(1))
    # x = 0,1,2,3; y = 0,2,1,3: mean x 1.5, mean y 1.5; sxy = 4, sxx = 5 -> b = 0.8, a = 0.3;
    # residuals -0.3, 0.9, -0.9, 0.3 -> SS_res 1.8; SS_tot 5 -> R^2 = 0.64
    a, b, r2 = linear_fit([0, 1, 2, 3], [0, 2, 1, 3])
    assert (a, b, r2) == (pytest.approx(0.3), pytest.approx(0.8), pytest.approx(0.64))
    assert linear_fit([1, 1, 1], [1, 2, 3]) is None and linear_fit([1, 2], [1, 2]) is None


def test_kl_estimate_against_a_three_token_distribution_by_hand():
    # base p = (1/2, 1/4, 1/4), model q = (1/4, 1/2, 1/4): KL(p||q) = 1/2 ln 2 + 1/4 ln(1/2) + 1/4 ln 1 = 1/4 ln 2
    # = 0.1732868 nats. Four draws from the base in exact proportion (token 0 twice, 1 once, 2 once): the log-ratios
    # are ln 2, ln 2, -ln 2, 0, whose mean is again 1/4 ln 2.
    logp = {0: math.log(0.5), 1: math.log(0.25), 2: math.log(0.25)}
    logq = {0: math.log(0.25), 1: math.log(0.5), 2: math.log(0.25)}
    draws = [0, 0, 1, 2]
    est = measure.kl_sum([logp[t] for t in draws], [logq[t] for t in draws]) / len(draws)
    assert est == pytest.approx(0.1732868, abs=1e-7)
    assert measure.kl_sum([-1.0, -2.0], [-1.0, -2.0]) == 0.0            # the base against itself
    assert measure.kl_sum([-1.0, -3.0], [-2.0, -2.0]) == 0.0            # +1 and -1 nat: they cancel


def test_distance_metrics_read_results_rows():
    from evaluate import distance_metrics
    res = {"kl_to_base": [[0.0, 0.0], [0.2, None], [0.4, 0.2]], "general_ll": [[-1.0, -2.0], [-1.5, -2.0], [-2.0, -2.5]]}
    d = distance_metrics(res)
    assert d["KL"] == pytest.approx(0.3) and d["GenLL"] == pytest.approx((-1.0 - 0.5) / 2)
    assert d["KLgen"] is None                       # a run recorded before the general tasks' KL
    res["kl_to_base_general"] = [[0.0, 0.0, None], [0.1, 0.3, None], [0.5, 1.5, None]]
    assert distance_metrics(res)["KLgen"] == pytest.approx((0.5 + 1.5) / 2)   # the last row; None: not measured
    assert distance_metrics({}) == {"KL": None, "KLgen": None, "GenLL": None}


def test_skill_retention_by_hand():
    from evaluate import skill_retention
    # 1 CPT task, general g1, g2: base [0.5, 0.9, 0.6], last [0.8, 0.7, None] -> g1 70 - 90 = -20; g2 not measured
    assert skill_retention([[0.5, 0.9, 0.6], [0.7, 0.8, 0.5], [0.8, 0.7, None]], 1) == pytest.approx([-20.0, None])


def test_stage_changes_by_hand():
    from evaluate import stage_changes
    # 2 CPT tasks (a, b) + 2 general (g1, g2); rows base, after a, after b
    res = {"n_tasks": 2, "columns": ["a", "b", "g1", "g2"],
           "acc": [[0.2, 0.3, 0.9, 0.8], [0.6, 0.3, 0.7, 0.8], [0.5, 0.7, 0.7, 0.4]],
           "kl_to_base": [[0.0, 0.0], [1.5, 0.25], [2.0, 0.75]]}
    # stage 1: general (0.7-0.9, 0.8-0.8) -> mean -10 points; KL on a 1.5 - 0 = +1.5
    # stage 2: general (0, 0.4-0.8) -> mean -20 points; KL on b 0.75 - 0.25 = +0.5
    # gains: a 0.2 -> 0.6 in stage 1 = +40 points; b 0.3 -> 0.7 in stage 2 = +40 points
    (t1, g1, k1, n1), (t2, g2, k2, n2) = stage_changes(res)
    assert (t1, t2) == ("a", "b") and n1 == pytest.approx(40) and n2 == pytest.approx(40)
    assert g1 == pytest.approx(-10) and k1 == pytest.approx(1.5)
    assert g2 == pytest.approx(-20) and k2 == pytest.approx(0.5)
    assert stage_changes({**res, "kl_to_base": None})[0][2] is None


def test_pictures_colour_the_on_policy_data_controls_apart():
    from evaluate import arm
    assert arm({"script": "rft"}) == 1
    assert arm({"script": "sft", "sft_data": "gold"}) == 0 and arm({"script": "sft"}) == 0
    assert arm({"script": "sft", "sft_data": "voice"}) == 3 and arm({"script": "sft", "sft_data": "oracle"}) == 2
    assert arm({"script": "sft", "sft_data": "self"}) == 2 and arm({"script": "sft", "sft_data": "oracle"}) == 2
    assert arm({"script": "sft", "lora_rank": 8}) == 4 and arm({"script": "rft", "lora_rank": 8}) == 5  # LoRA arms
    assert arm({"script": "sft", "lora_rank": 0}) == 0                                                 # full SFT


def test_a_lora_runs_label_names_its_rank_and_an_old_run_groups_with_a_new_full_one():
    from evaluate import group_runs, label
    from loop import with_later_settings
    assert label({"config": {"script": "sft", "lora_rank": 8, "lora_alpha": 16.0, "lr": 1e-3}}) == \
        "sft lora_rank=8 lr=0.001"                                             # alpha 2R, the default: not shown
    assert label({"config": {"script": "sft", "lora_rank": 8, "lora_alpha": 8.0, "lr": 1e-3}}) == \
        "sft lora_rank=8 lora_alpha=8.0 lr=0.001"
    old = {"config": with_later_settings({"script": "sft", "lr": 1e-5, "seed": 0})}   # recorded before LoRA
    new = {"config": {"script": "sft", "lr": 1e-5, "seed": 1, "lora_rank": 0, "lora_alpha": None}}
    assert list(group_runs([old, new]).values()) == [[old, new]]              # two seeds of one setting


def test_first_token_entropy_kl_and_mass_by_hand():
    """p = (1/2, 1/4, 1/4, 0), q = (1/4, 1/2, 1/4, 0): H(p) = 1.5 ln 2; KL(p||q) = 1/2 ln 2 - 1/4 ln 2 = 1/4 ln 2,
    KL(q||p) = 1/4 ln(1/2) + 1/2 ln 2 = 1/4 ln 2; a token neither gives mass adds nothing (no 0 * inf)."""
    from tools.first_token import entropy, kl, mass
    lp = torch.tensor([0.5, 0.25, 0.25, 0.0]).log()
    lq = torch.tensor([0.25, 0.5, 0.25, 0.0]).log()
    assert float(entropy(lp)) == pytest.approx(1.5 * math.log(2))
    assert float(kl(lp, lq)) == pytest.approx(0.25 * math.log(2))
    assert float(kl(lq, lp)) == pytest.approx(0.25 * math.log(2))
    assert float(kl(lp, lp)) == 0.0
    assert float(mass(lp, [0, 2, 2])) == pytest.approx(0.75)      # each id once
    # the model gives the base's most likely answer almost nothing: the forward KL grows as log(1 / q)
    lr = torch.tensor([1e-6, 0.5, 0.5 - 1e-6, 0.0]).log()
    assert float(kl(lp, lr)) == pytest.approx(0.5 * math.log(0.5 / 1e-6) + 0.25 * math.log(0.5) + 0.25 * math.log(0.25 / (0.5 - 1e-6)), rel=1e-4)
