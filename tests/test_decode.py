"""The decoding loop (runtime.sample) against the one it replaced, kept here as `old_sample`: the same greedy
completions on 200 image and 200 text prompts, with the growing KV cache (the CPU's) and the preallocated one (the
GPU's), on the tiny base and on a text-only Llama; the same random draws on CPU; no more aten ops per step."""
import pytest
import torch

import runtime
from data.tasks import builtin_items
from runtime import _cache_arg, _kv_cache, all_max, autocast, encode, gathered, is_dist, prompt_positions, to_device
from tests.decode_speed import ops_per_step

B = runtime.load_model(runtime.DEFAULT_MODEL, "cpu")
IMAGE = ["any_color", "circle_cell", "left_color", "jigsaw"]   # 50 prompts each
TEXT = ["add", "successor", "parity", "capital"]


def old_next_token(logits, forbidden, temperature=1.0, greedy=False):
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise runtime.Diverged("NaN")
    logits = logits.index_fill(-1, torch.tensor(forbidden, dtype=torch.long), float("-inf"))
    if greedy:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits / temperature, -1), 1).squeeze(-1)


@torch.no_grad()
def old_sample(lm, items, fmt, max_new_tokens, temperature=1.0, greedy=False, device="cpu", group=1):
    """runtime.sample as it was (commit 4aa5710): a growing cache, a torch.cat of the mask and two host syncs
    (the NaN check and the stop check) every step."""
    model = lm.model
    batch = to_device(encode(lm, items, fmt)[0], device)
    mask = batch["attention_mask"]
    pos = prompt_positions(lm, batch)
    was_training = model.training
    model.eval()
    with gathered(model), autocast(device):
        out = model(**batch, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache, logits = _kv_cache(out), out.logits[:, -1].float()
        if group > 1:
            cache.batch_repeat_interleave(group)
            logits, mask, pos = logits.repeat_interleave(group, 0), mask.repeat_interleave(group, 0), \
                pos.repeat_interleave(group, -2)
        next_pos = pos.amax(-1, keepdim=True) + 1
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        steps = []
        for t in range(max_new_tokens):
            token = old_next_token(logits, lm.forbidden, temperature, greedy).masked_fill(done, lm.pad_id)
            steps.append(token)
            done |= token == lm.eos_id
            busy = float(not done.all())
            if t + 1 == max_new_tokens or (all_max(busy, device) if is_dist() else busy) == 0:
                break
            mask = torch.cat([mask, (~done).long().unsqueeze(1)], 1)
            out = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=next_pos, use_cache=True,
                        **{_cache_arg(model): cache})
            logits, next_pos = out.logits[:, -1].float(), next_pos + 1
    model.train(was_training)
    comps, truncated = [], []
    for row in torch.stack(steps, 1).tolist():
        ended = lm.eos_id in row
        comps.append(row[:row.index(lm.eos_id) + 1] if ended else row)
        truncated.append(not ended)
    return comps, truncated


def _items(tasks):
    return sum((builtin_items(t, "test", 50) for t in tasks), [])


@pytest.mark.parametrize("static", [False, True], ids=["growing-cache", "static-cache"])
@pytest.mark.parametrize("kind", ["image", "text"])
def test_greedy_completions_equal_the_old_samplers_on_200_prompts(kind, static):
    items = _items(IMAGE if kind == "image" else TEXT)
    assert len(items) == 200
    for budget in (48, 5):   # replies end well within 48 tokens; at 5 those of 6 and more are cut
        ours, cut = runtime.sample(B, items, "free", budget, greedy=True, static=static)
        old, old_cut = old_sample(B, items, "free", budget, greedy=True)
        same = sum(a == b for a, b in zip(ours, old))
        assert same == 200 and cut == old_cut, f"{same} of 200 equal at {budget} tokens"
        assert len({tuple(c) for c in ours}) > 10                      # varied replies, not one repeated


def test_sampled_rollouts_draw_the_same_tokens_as_the_old_sampler_on_cpu():
    """On CPU the loop makes the same draws from the same random state: a run's samples, and so its rows, stay."""
    items = builtin_items("any_color", "train", 4) + builtin_items("add", "train", 4)
    torch.manual_seed(1)
    ours, _ = runtime.sample(B, items, "free", 32, 1.0, group=8)
    torch.manual_seed(1)
    old, _ = old_sample(B, items, "free", 32, 1.0, group=8)
    assert ours == old and len({tuple(c) for c in ours}) > 10


def test_the_static_cache_decodes_a_text_only_llama_as_the_old_sampler():
    """A text-only Llama (SmolLM2's architecture), random and small, with the tiny base's tokenizer: left-padded
    prompts of different lengths, greedy, 1-D positions."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(B.tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=512)
    llama = runtime.Bundle(LlamaForCausalLM(cfg).eval(), B.tok, None)
    items = _items(TEXT)[::4]
    ours, _ = runtime.sample(llama, items, "free", 24, greedy=True, static=True)
    old, _ = old_sample(llama, items, "free", 24, greedy=True)
    assert ours == old and len({tuple(c) for c in ours}) > 10


def test_a_decoding_step_runs_no_more_aten_ops_than_before(monkeypatch):
    """Counted with the profiler (tests/decode_speed.py): the step of 8 prompts x 8 samples, every sequence running
    the whole budget, against the old loop's."""
    lm = runtime.load_model(runtime.DEFAULT_MODEL, "cpu")
    lm.eos_id = -1
    items = builtin_items("any_color", "test", 8)
    new = ops_per_step(lm, items, "free", "cpu", 8)
    monkeypatch.setattr(runtime, "sample", old_sample)
    old = ops_per_step(lm, items, "free", "cpu", 8)
    assert new < old, (new, old)


def test_the_decode_plan_by_device(monkeypatch):
    """(static cache, steps between stop checks, compiled step): the GPU's plan only on CUDA, the compiled step only
    when asked for; a test can ask for the static cache on CPU."""
    monkeypatch.delenv("CPT_COMPILE_DECODE", raising=False)
    assert runtime.decode_plan("cpu") == (False, 1, False)
    assert runtime.decode_plan("cpu", static=True) == (True, 1, False)
    assert runtime.decode_plan("cuda") == (True, 8, False)
    assert runtime.decode_plan(torch.device("cuda", 1), static=False) == (False, 8, False)
    monkeypatch.setenv("CPT_COMPILE_DECODE", "1")
    assert runtime.decode_plan("cuda") == (True, 8, True)
    assert runtime.decode_plan("cpu") == (False, 1, False)
