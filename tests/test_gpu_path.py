"""What of the GPU path can be checked on a CPU: the MFU arithmetic, bf16 autocast, the memory flags."""
import warnings

import pytest
import torch

import loop
import runtime
from data.tasks import builtin_items
from tests.bench import mfu, train_flops


def test_train_flops_and_mfu_by_hand():
    # 6*100*5 + 12*2*4*5*5 + 6*10*3 = 3000 + 2400 + 180
    assert train_flops(100, 10, 2, 4, 5, 5, 3) == 5580
    assert mfu(5580, 2.0, 1000.0) == pytest.approx(2.79)
    assert mfu(1e15, 1.0, 989e12, gpus=2) == pytest.approx(1e15 / 1.978e15)


def test_autocast_policy():
    """On a CPU nothing is autocast (fp32 throughout, what the CPU tests compare); on one GPU the forward runs in
    bf16; under FSDP the MixedPrecisionPolicy casts, so autocast stays off there. Checked by what a matmul gives."""
    a = torch.ones(4, 4)
    with runtime.autocast("cpu"):
        assert (a @ a).dtype == torch.float32
    assert runtime.autocast_dtype("cuda", distributed=False) == torch.bfloat16
    assert runtime.autocast_dtype("cuda", distributed=True) is None
    with torch.autocast("cpu", dtype=runtime.autocast_dtype("cuda", distributed=False)):
        assert (a @ a).dtype == torch.bfloat16                          # the dtype it names is what autocast gives


def test_pixel_flags_change_image_tokens_and_grad_ckpt_runs():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = runtime.load_model(runtime.DEFAULT_MODEL, "cpu", grad_ckpt=True)
    assert not [str(w.message) for w in caught if "checkpointing" in str(w.message)]  # no deprecated name used
    assert loop.image_tokens(b, ["color"]) == {"color": 9}
    runtime.configure(b, min_pixels=168 * 168, max_pixels=168 * 168)
    assert loop.image_tokens(b, ["color"]) == {"color": 36}   # 84 -> 168 pixels a side: 4x the tokens
    assert runtime.is_activation_checkpointing(b.model)
    assert not runtime.is_activation_checkpointing(runtime.load_model(runtime.DEFAULT_MODEL, "cpu").model)
    b.model.train()
    items = builtin_items("color", "test", 2)
    logp, mask = runtime.token_logprobs(b, items, "plain", [[b.eos_id]] * 2, "cpu")
    (-(logp * mask).sum()).backward()
    assert b.model.lm_head.weight.grad is not None
