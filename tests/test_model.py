"""The shipped tiny base through the normal loading path: M-RoPE is on, sampling never emits vision/pad tokens,
exactly the answer tokens carry the SFT loss, and checkpoints load back with from_pretrained."""
import pytest
import torch
import torch.nn.functional as F

import measure
import rollouts
import runtime
from cpt_sft import sft_loss
from data.tasks import builtin_items

B = runtime.load_model(runtime.DEFAULT_MODEL, "cpu")
B.model.eval()


def test_shipped_checkpoint_is_a_small_qwen2_5_vl():
    assert type(B.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(B.improc).__name__.startswith("Qwen2VLImageProcessor")
    assert B.model.config.text_config.rope_parameters["mrope_section"] == [4, 6, 6]
    import os
    size = sum(os.path.getsize(os.path.join(runtime.DEFAULT_MODEL, f)) for f in os.listdir(runtime.DEFAULT_MODEL))
    assert size <= 20e6


def test_mrope_is_on():
    items = builtin_items("left_color", "test", 4)
    batch, lp, _ = runtime.encode(B, items, "plain")
    tt = batch["mm_token_type_ids"]
    image = batch["input_ids"] == B.model.config.image_token_id
    assert torch.equal(tt.bool(), image) and image.sum(1).tolist() == [9, 9, 9, 9]  # 84x84 -> 36 patches -> 9
    pos, deltas = B.model.model.get_rope_index(batch["input_ids"], image_grid_thw=batch["image_grid_thw"],
                                               attention_mask=batch["attention_mask"], mm_token_type_ids=tt)
    # on the 3x3 grid of image tokens, height and width positions differ: 3-D positions, not 1-D
    h, w = pos[1][image].view(4, 9), pos[2][image].view(4, 9)
    assert not torch.equal(h, w)
    assert (h[:, :3] == h[:, :1]).all() and (w[:, 0::3] == w[:, :1]).all()
    assert (deltas != 0).all()  # text after the image is shifted: 9 tokens used only 3 positions
    with torch.no_grad():
        on = B.model(**batch).logits[:, -1]
        off = B.model(**{k: v for k, v in batch.items() if k != "mm_token_type_ids"}).logits[:, -1]
        # generate gets the same inputs, so its first step sees M-RoPE as well
        g = B.model.generate(**batch, max_new_tokens=1, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=B.pad_id)
    assert (on - off).abs().max() > 1e-3, "without mm_token_type_ids the positions silently fall back to 1-D"
    assert torch.allclose(g.scores[0], on, atol=1e-4)


def test_repeated_images_are_processed_once_with_the_same_pixels():
    items = builtin_items("left_color", "test", 3) + builtin_items("jigsaw", "test", 1)
    group = [items[i] for i in (0, 0, 1, 2, 1, 3, 0)]  # a GRPO-like batch: the same item object repeated
    batch, _, _ = runtime.encode(B, group, "plain")
    vis = B.improc(images=[it["images"][0].copy() for it in group], return_tensors="pt")  # every copy processed
    assert torch.equal(batch["pixel_values"], vis["pixel_values"])
    assert torch.equal(batch["image_grid_thw"], vis["image_grid_thw"])
    calls = []

    class Counting:  # the real processor, counting the images it is given
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, images, **kw):
            calls.append(len(images))
            return real(images=images, **kw)

    fresh = builtin_items("left_color", "test", 3) + builtin_items("jigsaw", "test", 1)  # new image objects
    fresh_group = [fresh[i] for i in (0, 0, 1, 2, 1, 3, 0)]
    real, B.improc = B.improc, Counting()
    try:
        again, _, _ = runtime.encode(B, fresh_group, "plain")
        assert calls == [4]                              # each distinct image once
    finally:
        B.improc = real
    assert torch.equal(again["pixel_values"], vis["pixel_values"]) and torch.equal(again["input_ids"], batch["input_ids"])


def test_sampling_never_emits_forbidden_tokens():
    forbidden = set(B.forbidden)
    assert {B.model.config.image_token_id, B.model.config.vision_start_token_id,
            B.model.config.vision_end_token_id, B.pad_id} <= forbidden and B.eos_id not in forbidden
    # make the forbidden tokens the model's favourites, then sample
    boost = torch.zeros(B.model.config.text_config.vocab_size)
    boost[list(forbidden)] = 20.0
    h = B.model.lm_head.register_forward_hook(lambda m, i, o: o + boost)
    try:
        items = builtin_items("color", "test", 8)
        torch.manual_seed(0)
        comps, _ = runtime.sample(B, items, "plain", 8, temperature=1.0)
        assert not forbidden & {t for c in comps for t in c}
        # control: the same sampling without the mask does emit them (the test can fail)
        batch, lp, _ = runtime.encode(B, items, "plain")
        # (one new token: no further forward that a sampled image token would break)
        raw = B.model.generate(**batch, max_new_tokens=1, do_sample=True, top_k=0, pad_token_id=B.pad_id)
        assert forbidden & set(raw[:, lp:].flatten().tolist())
        # the loss uses the same mask: a forbidden token has log-prob -inf, never sampled, never trained on
        logp, mask = runtime.token_logprobs(B, items[:1], "plain", [[B.pad_id, B.eos_id]], "cpu")
        assert logp[0, 0] == float("-inf")
    finally:
        h.remove()


def test_exactly_the_answer_tokens_carry_sft_loss():
    items = builtin_items("shape", "test", 3) + builtin_items("add", "test", 1)
    targets = [runtime.target_ids(B, it["answer"], "plain") for it in items]
    assert [B.tok.decode(t) for t in targets] == [it["answer"] + "<|im_end|>" for it in items]
    logp, mask = runtime.token_logprobs(B, items, "plain", targets, "cpu")
    n = sum(len(t) for t in targets)
    ours = sft_loss(logp, mask, n)
    # reference: transformers' own loss with labels = -100 everywhere except the answer and end-of-turn tokens
    batch, lp, cmask = runtime.encode(B, items, "plain", targets)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, lp:][cmask.bool()] = batch["input_ids"][:, lp:][cmask.bool()]
    assert int((labels != -100).sum()) == n
    with torch.no_grad():  # the same renormalisation over samplable tokens as the sampler (see forbidden_bias)
        logits = B.model(**batch).logits.index_fill(-1, torch.tensor(B.forbidden), float("-inf"))
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                          ignore_index=-100, reduction="sum") / n
    assert torch.allclose(ours, ref, atol=1e-5)
    # every labelled position is in the completion; no prompt, image or padding position is labelled
    rows, cols = (labels != -100).nonzero(as_tuple=True)
    assert (cols >= lp).all()
    assert not (labels != -100)[batch["mm_token_type_ids"].bool()].any()
    assert not (labels != -100)[batch["attention_mask"] == 0].any()


def test_checkpoint_round_trip(tmp_path):
    runtime.save_checkpoint(B, str(tmp_path / "ck"))
    b2 = runtime.load_model(str(tmp_path / "ck"), "cpu")
    for (k, v), (k2, v2) in zip(B.model.state_dict().items(), b2.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    from transformers import AutoModelForImageTextToText
    assert type(AutoModelForImageTextToText.from_pretrained(str(tmp_path / "ck"))).__name__ == \
        "Qwen2_5_VLForConditionalGeneration"


def test_data_nll_of_gold_and_own_rollouts():
    from types import SimpleNamespace
    from filter import data_nll
    items = builtin_items("left_color", "test", 3)
    gold = [runtime.target_ids(B, it["answer"], "plain") for it in items]
    right, wrong = SimpleNamespace(correct=True), SimpleNamespace(correct=False)
    # "rollouts" that repeat the gold answer, one of them marked wrong: all three sets hold the same sequences
    table = [{"item": it, "completions": [g, g], "scores": [right, wrong]} for it, g in zip(items, gold)]
    out = data_nll(B, table, "plain", "cpu", 16, batch_size=2)   # 2 per forward: chunking and a partial last chunk
    # expected, one item at a time from the model's full logits (no padding, no logits_to_keep, no masking code)
    nll = n = 0.0
    for it, g in zip(items, gold):
        batch, prompt_len, _ = runtime.encode(B, [it], "plain", [g])
        with torch.no_grad():
            logits = B.model(**batch).logits[0].float().index_fill(-1, torch.tensor(B.forbidden), float("-inf"))
        logprobs = F.log_softmax(logits, -1)
        for pos, tok in enumerate(g):
            nll -= logprobs[prompt_len + pos - 1, tok].item()
            n += 1
    expect = nll / n
    assert expect > 0.05   # the base does not know the rule: its gold answers are far from certain
    for k in ("gold_nll_per_token", "own_nll_per_token", "own_correct_nll_per_token"):
        assert abs(out[k] - expect) < 1e-4, (k, out[k], expect)


class Capture:  # an optimizer that keeps the gradient instead of stepping
    def __init__(self):
        self.grads, self.steps = None, 0

    def step(self):
        self.steps += 1
        self.grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in B.model.parameters()]

    def zero_grad(self, set_to_none=True):
        B.model.zero_grad(set_to_none=set_to_none)


def _grpo_args(agg="token_mean", **kw):
    from cpt_rft import GRPOConfig
    return GRPOConfig(loss_agg=agg, grad_clip=1e9, **kw)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean", "dr_grpo"])
def test_zero_advantage_groups_are_skipped_without_changing_the_gradient(agg):
    from cpt_rft import grpo_update
    items = builtin_items("left_color", "test", 2)
    comp = [runtime.target_ids(B, f"It is {w}.", "plain") for w in ("red", "blue", "green", "yellow")]  # its voice
    live = [(items[0], comp[0], 1.0), (items[0], comp[1], -1.0)]
    dead = [(items[1], comp[2], 0.0), (items[1], comp[3], 0.0)]   # a zero-variance group: A = 0
    args = _grpo_args(agg)
    full, skipped, only_dead = Capture(), Capture(), Capture()
    grpo_update(B, None, full, live + dead, args, "cpu")
    silent = (sum(len(c) for _, c, _ in dead), len(dead))
    grpo_update(B, None, skipped, live, args, "cpu", normaliser_extra=silent)
    for a, b in zip(full.grads, skipped.grads):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)
    assert max(g.abs().max() for g in full.grads) > 1e-4           # the live group does move the model
    # a batch of only silent groups takes no optimizer step at all (AdamW would still move the weights)
    m = grpo_update(B, None, only_dead, [], args, "cpu", filler=items[1], normaliser_extra=silent)
    assert only_dead.steps == 0 and m["skipped_step"] and m["trained_seqs"] == 0
    assert full.steps == 1 and skipped.steps == 1


def test_all_silent_step_leaves_adamw_weights_alone():
    """The bug this guards: a step with no signal still took an AdamW step, and weight decay moved every weight."""
    from cpt_rft import grpo_update
    items = builtin_items("left_color", "test", 1)
    before = [p.detach().clone() for p in B.model.parameters()]
    opt = torch.optim.AdamW(B.model.parameters(), lr=1e-2, weight_decay=0.1)
    grpo_update(B, None, opt, [], _grpo_args(), "cpu", filler=items[0], normaliser_extra=(6, 2))
    assert all(torch.equal(a, p) for a, p in zip(before, B.model.parameters()))


def test_self_targets_are_exactly_the_correct_rollouts():
    """Read independently of the verifier: on left_color (one right answer) a sample of the base is correct when its
    sentence names the gold colour and no other, and the pair is the sample's tokens then end-of-turn."""
    from cpt_sft import self_targets
    from data.tasks import COLORS
    items = builtin_items("left_color", "test", 6)
    torch.manual_seed(3)
    table = rollouts.rollout(B, items, "free", 4, 1.0, 16, "cpu")
    named = lambda text: {w.strip(".,!?").lower() for w in text.split()} & set(COLORS)
    right = [(row["item"]["answer"], c) for row in table for c in row["completions"]
             if named(runtime.decode(B, c)) == {row["item"]["answer"]}]
    torch.manual_seed(3)
    pairs = self_targets(B, items, "free", 4, 1.0, 16, "cpu")
    assert 0 < len(pairs) < 24                                     # some right, some wrong: a real selection
    assert [(it["answer"], c) for it, c in pairs] == right
    assert all(c[-1] == B.eos_id for _, c in pairs)


def test_checkpoint_generation_config_does_not_leak_into_sampling(tmp_path):
    """A checkpoint whose generation_config carries sampling settings (here an extreme repetition penalty and
    no-repeat n-grams) must not shape the samples: the loss computes plain softmax log-probs, and the sampler never
    reads the config. It is kept, and written back into the next checkpoint."""
    items = builtin_items("add", "test", 16)
    clean, _ = runtime.sample(B, items, "plain", 8, greedy=True)
    path = str(tmp_path / "poisoned")
    runtime.save_checkpoint(B, path)
    from transformers import GenerationConfig
    cfg = GenerationConfig.from_pretrained(path)
    cfg.repetition_penalty, cfg.no_repeat_ngram_size = 1e4, 1
    cfg.save_pretrained(path)
    lm = runtime.load_model(path, "cpu")
    assert lm.model.generation_config.repetition_penalty == 1e4
    ours, _ = runtime.sample(lm, items, "plain", 8, greedy=True)
    assert ours == clean
    # control: transformers' generate, which reads the config, does change the same greedy decoding
    batch, prompt_len, _ = runtime.encode(lm, items, "plain")
    with torch.no_grad():
        out = lm.model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert [r[:len(c)] for r, c in zip(out[:, prompt_len:].tolist(), clean)] != clean
    runtime.save_checkpoint(lm, str(tmp_path / "again"))
    assert GenerationConfig.from_pretrained(str(tmp_path / "again")).repetition_penalty == 1e4


def test_kl_to_base_is_zero_for_the_base_and_grows_when_the_model_moves():
    items = builtin_items("left_color", "test", 6)
    torch.manual_seed(0)
    samples = measure.sample_base(B, items, "plain", 3, 8, "cpu")
    assert len(samples) == 18 and all(lp < 0 for _, _, lp in samples)
    assert measure.kl_to_base(B, items, samples, "plain", "cpu") == pytest.approx(0.0, abs=1e-6)
    moved = runtime.load_model(runtime.DEFAULT_MODEL, "cpu")
    with torch.no_grad():
        moved.model.lm_head.weight.add_(0.5 * torch.randn_like(moved.model.lm_head.weight))
    assert measure.kl_to_base(moved, items, samples, "plain", "cpu") > 0.05
    # the gold log-likelihood is the mean over items of the summed log-probs of the SFT target
    ll = measure.gold_loglik(B, items, "plain", "cpu")
    logp, mask = runtime.token_logprobs(B, items, "plain", [runtime.target_ids(B, it["answer"], "plain")
                                                            for it in items], "cpu")
    assert ll == pytest.approx(float((logp * mask).sum().detach() / len(items)), rel=1e-5) and ll < 0


def test_voice_targets_are_the_greedy_replies_with_the_canonical_answer():
    """Read independently of rewards.restate: the base's greedy reply ends with its answer word and a full stop
    (its templates, data/tasks.py VOICE); the voice-only label is that reply with the last word swapped for the
    canonical answer, then end of turn."""
    items = builtin_items("any_color", "test", 12)
    comps, _ = runtime.sample(B, items, "free", 16, greedy=True)
    expect, changed = [], 0
    for it, c in zip(items, comps):
        words = runtime.decode(B, c).split()
        if words and words[-1].rstrip(".").lower() in it["candidates"]:   # a reply that names a colour
            expect.append((it["answer"], " ".join(words[:-1] + [it["answer"] + "."])))
            changed += words[-1].rstrip(".").lower() != it["answer"]
    pairs = rollouts.restated_replies(B, items, "free", 16, "cpu")
    assert len(pairs) >= 8 and changed >= 2   # most replies name a colour, and some not the canonical one
    assert [(it["answer"], runtime.decode(B, t)) for it, t in pairs] == expect
    assert all(t[-1] == B.eos_id for _, t in pairs)
