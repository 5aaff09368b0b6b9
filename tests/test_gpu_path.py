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


# Parameters of the released Qwen2.5-VL checkpoints, worked out by hand from their config.json shapes:
#   decoder layer: q (d*d + d) + k, v (d*kv + kv each, kv = KV heads x 128) + o (d*d) + MLP (3*d*ff) + 2 norms (2*d)
#     3B: d 2048, ff 11008, kv 256:  4,196,352 + 2*524,544 + 4,194,304 + 67,633,152 + 4,096 = 77,076,992; x 36 layers
#     7B: d 3584, ff 18944, kv 512: 12,848,640 + 2*1,835,520 + 12,845,056 + 203,685,888 + 7,168 = 233,057,792; x 28
#   text = layers + embedding (vocab*d; 3B ties the LM head to it, 7B has its own) + final norm (d)
#     3B: 2,774,771,712 + 151,936*2048 + 2048 = 3,085,938,688
#     7B: 6,525,618,176 + 2*152,064*3584 + 3584 = 7,615,616,512
#   vision: patch conv 3*2*14*14*1280 = 1,505,280; 32 blocks of 2 norms (2,560) + qkv (1280*3840 + 3840) + proj
#     (1280*1280 + 1280) + MLP with biases (2*(1280*3420 + 3420) + 3420*1280 + 1280) = 19,702,200 each, 630,470,400;
#     merger: norm 1280 + (5120*5120 + 5120) + (5120*out + out), out = the text width: 36,708,608 (3B), 44,574,464 (7B)
#     3B: 668,684,288; 7B: 676,550,144
REAL_PARAMS = {"3b": (3_085_938_688, 668_684_288), "7b": (7_615_616_512, 676_550_144)}  # 3.75 B and 8.29 B in all


@pytest.mark.parametrize("shape", ["3b", "7b"])
def test_the_bench_builds_the_real_shapes_with_their_parameter_counts(shape):
    """tests/bench.py's 3B and 7B shapes, built on the meta device (no memory): every layer builds (an edited config
    kept the tiny base's 4 layer types and failed at layer 5) and the counts are the released checkpoints'."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from tests.bench import shape_config
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(shape_config(shape))
    vision = sum(p.numel() for p in model.model.visual.parameters())
    text = sum(p.numel() for p in model.parameters()) - vision
    assert (text, vision) == REAL_PARAMS[shape]
    assert len(model.config.text_config.layer_types) == model.config.text_config.num_hidden_layers


def test_a_gpu_process_group_has_a_backend_for_cpu_tensors():
    """Under a GPU torchrun a collective on a CPU tensor (loading a model on the CPU broadcasts its buffers) needs a
    CPU backend: an NCCL-only group fails with "No backend type associated with device type cpu". Read back the
    way torch.distributed parses the string (NCCL itself is not in a CPU build of torch)."""
    from torch.distributed.distributed_c10d import BackendConfig
    assert BackendConfig(runtime.process_group_backend(cuda=True)).get_device_backend_map() == \
        {"cpu": "gloo", "cuda": "nccl"}
    assert runtime.process_group_backend(cuda=False) == "gloo"


def test_an_items_pixel_values_are_computed_once_and_equal(monkeypatch):
    """The image processor runs once per image for repeated encodes (a GRPO step's rollout, then its update), gives
    the values it gave before, and runs again when the pixel bounds change."""
    b = runtime.load_model(runtime.DEFAULT_MODEL, "cpu")
    items = builtin_items("color", "test", 3)
    fresh = runtime.encode(b, items, "plain")[0]["pixel_values"]
    calls = []
    process = b.improc.__class__.__call__
    monkeypatch.setattr(b.improc.__class__, "__call__", lambda self, **kw: calls.append(len(kw["images"])) or
                        process(self, **kw))
    again = runtime.encode(b, [items[0]] * 4 + items, "plain")[0]
    assert calls == [] and torch.equal(again["pixel_values"][-fresh.shape[0]:], fresh)
    runtime.configure(b, min_pixels=168 * 168, max_pixels=168 * 168)
    assert runtime.encode(b, items, "plain")[0]["pixel_values"].shape[0] == 4 * fresh.shape[0] and calls == [3]


def test_adamw_is_fused_on_cuda_and_torchs_default_on_cpu():
    assert runtime.adamw_options("cuda") == {"fused": True} and runtime.adamw_options(torch.device("cuda", 1)) == \
        {"fused": True}
    assert runtime.adamw_options("cpu") == {}
    opt = runtime.adamw(torch.nn.Linear(2, 2), 1e-3, 0.01, "cpu")
    assert not opt.defaults["fused"] and opt.defaults["lr"] == 1e-3 and opt.defaults["weight_decay"] == 0.01


def test_decode_bandwidth_and_update_work_by_hand():
    from tests.bench import kv_bytes, mbu, update_work
    # K and V (2) x 2 layers x 2 KV heads x head_dim 4 x 10 positions x 3 sequences x 2 bytes = 1,920
    assert kv_bytes(2, 2, 4, 10, 3) == 1920
    # 40 steps/s x (1,000 + 960 bytes) over 98,000 bytes/s = 0.8
    assert mbu(40.0, 1000, 960, 98_000.0) == pytest.approx(0.8)
    # 2 prompts of 30 tokens (5 patches each), G = 4, 100 completion tokens: shared 2 x 30 + 100 = 160 tokens,
    # 10 patches; repeated 8 x 30 + 100 = 340 tokens, 40 patches
    assert update_work(2, 4, 30, 100, 5, shared=True) == (160, 10)
    assert update_work(2, 4, 30, 100, 5, shared=False) == (340, 40)
