"""Throughput benchmark: a random-init Qwen2.5-VL of a real shape (built from a config, no download), N SFT steps
and N GRPO steps through the project's own code, then tokens/s, MFU, rollout tokens/s and its share, peak memory.

    python tests/bench.py --shape tiny                                   # CPU smoke
    torchrun --standalone --nproc_per_node=1 tests/bench.py --shape 3b --batch 8 --grad_ckpt   # FSDP2, bf16
MFU = model FLOPs of the step / (step time x the GPU's dense bf16 peak x GPUs); model FLOPs per text token are
6 N (N = matmul parameters of the language model incl. the LM head) + 12 L d S (attention scores, PaLM's count),
plus 6 N_vision per image patch for the vision tower.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import runtime  # noqa: E402

SHAPES = {  # Qwen2.5-VL-3B / 7B-Instruct shapes (config.json of the released checkpoints)
    "3b": dict(text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
               vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31])),
    "7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
               vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31])),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, no sparsity
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L40S": 0.864e12}  # SXM memory bandwidth


def train_flops(n_text, n_vision, n_layers, hidden, tokens, seq_len, patches):
    """Training FLOPs (forward + backward) of a batch: 6 N per token + 12 L d S per token + 6 N_vision per patch."""
    return 6 * n_text * tokens + 12 * n_layers * hidden * seq_len * tokens + 6 * n_vision * patches


def mfu(flops, seconds, peak, gpus=1):
    return flops / (seconds * peak * gpus)


def decode_bound_steps_per_s(weight_bytes, kv_bytes, bandwidth):
    """Decoding steps per second if a step did nothing but read every weight and the KV cache once from memory:
    the memory-bandwidth bound of a rollout's decode (one step makes one token for every sequence)."""
    return bandwidth / (weight_bytes + kv_bytes)


def mbu(steps_per_s, weight_bytes, kv_bytes, bandwidth):
    """Memory-bandwidth utilisation of a decode: the bytes a step must read, times steps per second, over the
    memory bandwidth (1.0: at the bound)."""
    return steps_per_s / decode_bound_steps_per_s(weight_bytes, kv_bytes, bandwidth)


def kv_bytes(layers, kv_heads, head_dim, context, seqs, bytes_per=2):
    """The KV cache a decoding step reads: K and V of every layer, KV head and position, for every sequence."""
    return 2 * layers * kv_heads * head_dim * context * seqs * bytes_per


def update_work(prompts, group, prompt_len, completion_tokens, patches_per_prompt, shared):
    """(tokens, image patches) a GRPO update forwards and backpropagates: with the shared prompt (one forward per
    group, runtime.shared_prompt_logprobs) each prompt once; else each of the group's G sequences repeats it."""
    copies = prompts if shared else prompts * group
    return copies * prompt_len + completion_tokens, copies * patches_per_prompt


def gpu_peak(device):
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def shape_config(shape):
    """The config of a real shape, built fresh from the tiny base's (its token ids) with the shape's sizes. Fresh, not
    edited: a config derives lists from its sizes when built (transformers 5.17+ keeps one `layer_types` entry per
    decoder layer), and an edited num_hidden_layers would leave the tiny base's 4-entry list behind."""
    from transformers import Qwen2_5_VLConfig
    base = Qwen2_5_VLConfig.from_pretrained(runtime.DEFAULT_MODEL).to_dict()
    s = SHAPES[shape]
    text = {k: v for k, v in base["text_config"].items() if k != "layer_types"}
    text.update(s["text"], rope_parameters={**text["rope_parameters"], "mrope_section": [16, 24, 24]})  # head_dim 128
    vision = {**base["vision_config"], **s["vision"]}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                            tie_word_embeddings=s["text"]["tie_word_embeddings"],
                            **{k: base[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                    "vision_end_token_id")})


def build(shape, device, grad_ckpt=False):
    """The tiny base (shape 'tiny') or a random-init model of a real shape with the tiny tokenizer and image
    processor (no tiny model is loaded for them: under a GPU torchrun it would be sharded on the CPU)."""
    if shape == "tiny":
        return runtime.load_model(runtime.DEFAULT_MODEL, device, grad_ckpt=grad_ckpt)
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(shape_config(shape))
    return runtime.Bundle(model, *runtime.load_processors(runtime.DEFAULT_MODEL))


def hbm_bandwidth(device):
    if torch.device(device).type != "cuda":
        return None
    return next((v for k, v in HBM_BYTES_PER_S.items() if k in torch.cuda.get_device_name(device)), None)


def rollout_shapes(a):
    """--rollout PROMPTSxGxNEW as [(prompts, G, new tokens)], or none."""
    return [tuple(int(x) for x in a.rollout.split("x"))] if a.rollout else []


def decode_rate(b, items, n_prompts, group, new, device, sync, bandwidth, n_text, cfg, prompt_len):
    """Decoding steps per second of a rollout of n_prompts x group sequences, the prefill taken out (a rollout of
    one token timed as well), and its memory-bandwidth utilisation where the GPU's bandwidth is known."""
    prompts = (items * n_prompts)[:n_prompts]

    def timed(tokens):
        runtime.sample(b, prompts, "plain", tokens, device=device, group=group)  # warm-up (and a compiled step's compile)
        sync()
        t0 = time.time()
        comps, _ = runtime.sample(b, prompts, "plain", tokens, device=device, group=group)
        sync()
        return time.time() - t0, max(map(len, comps))

    t_prefill, _ = timed(1)
    t_all, steps = timed(new)
    rate = (steps - 1) / max(t_all - t_prefill, 1e-9)
    line = (f"decode {n_prompts} prompts x G={group} x {new} new tokens: {rate:.1f} steps/s, "
            f"{rate * n_prompts * group:,.0f} tokens/s (prefill {t_prefill:.3f} s)")
    if bandwidth:
        kv = kv_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                      prompt_len + new // 2, n_prompts * group)  # bf16, at the decode's mean context
        line += f"; MBU {100 * mbu(rate, n_text * 2, kv, bandwidth):.1f}% of the memory-bandwidth bound"
    runtime.print0(line + f" [{'compiled' if runtime.decode_plan(device)[2] else 'eager'} step]")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny", choices=["tiny", "3b", "7b"])
    p.add_argument("--steps", type=int, default=5, help="timed steps of each kind (after one warm-up)")
    p.add_argument("--batch", type=int, default=16, help="SFT items / GRPO prompts per rank per step")
    p.add_argument("--group", type=int, default=8, help="GRPO completions per prompt")
    p.add_argument("--answer_len", type=int, default=64, help="SFT answer tokens")
    p.add_argument("--max_new_tokens", type=int, default=64, help="GRPO rollout length")
    p.add_argument("--image", type=int, default=448, help="image side in pixels (448: 256 patches, 64 tokens)")
    p.add_argument("--grad_ckpt", action="store_true")
    p.add_argument("--rollout", default="8x8x256",
                   help="a realistic rollout measured too, PROMPTSxGxNEW_TOKENS ('' for none)")
    p.add_argument("--decode_only", action="store_true",
                   help="only the decode of --rollout (else of the bench's), weights in bf16 "
                        "(with CPT_COMPILE_DECODE=1: the compiled step)")
    a = p.parse_args()
    _, world, device = runtime.init_dist()
    b = build(a.shape, device, a.grad_ckpt)
    if a.shape != "tiny":  # the tiny base came through load_model, already sharded and checkpointed as asked
        if a.grad_ckpt:
            runtime.enable_activation_checkpointing(b.model)
        if runtime.is_dist():
            runtime.shard_model(b.model, device)
    runtime.configure(b, a.image ** 2, a.image ** 2)
    from PIL import Image
    items = [{"problem": "<image>Describe the picture in detail.", "answer": "x", "kind": "exact",
              "images": [Image.new("RGB", (a.image, a.image), (i * 7 % 255, 90, 160))]} for i in range(a.batch)]
    lm = b.model.model.language_model if hasattr(b.model.model, "language_model") else b.model.model
    n_vis = sum(q.numel() for q in b.model.model.visual.parameters())
    n_text = sum(q.numel() for q in lm.parameters()) - lm.embed_tokens.weight.numel() + b.model.lm_head.weight.numel()
    cfg = b.model.config.text_config
    opt = runtime.adamw(b.model, 1e-6, 0.01, device)
    answer = [list(range(10, 10 + a.answer_len))] * a.batch
    peak = gpu_peak(device)
    sync = (lambda: torch.cuda.synchronize(device)) if torch.device(device).type == "cuda" else (lambda: None)

    if a.decode_only:  # inference only: bf16 weights, as FSDP2 gathers them for a rollout
        b.model.to(torch.bfloat16)
        prompt_len = runtime.encode(b, items[:1], "plain")[0]["input_ids"].shape[1]
        for n_prompts, group, new in rollout_shapes(a) or [(max(1, a.batch // a.group), a.group, a.max_new_tokens)]:
            decode_rate(b, items, n_prompts, group, new, device, sync, hbm_bandwidth(device), n_text, cfg, prompt_len)
        runtime.print0(runtime.peak_memory(device))
        return runtime.cleanup()

    def sft():
        logp, mask = runtime.token_logprobs(b, items, "plain", answer, device)
        (-(logp * mask).sum() / mask.sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    batch, lp, _ = runtime.encode(b, items, "plain", answer)
    tokens, patches = batch["attention_mask"].sum().item(), batch["pixel_values"].shape[0]
    flops = train_flops(n_text, n_vis, cfg.num_hidden_layers, cfg.hidden_size, tokens, batch["input_ids"].shape[1],
                        patches) * world
    sft()
    sync()
    t0 = time.time()
    for _ in range(a.steps):
        sft()
    sync()
    dt = (time.time() - t0) / a.steps
    runtime.print0(f"{a.shape}: text {n_text / 1e9:.3f}B + vision {n_vis / 1e9:.3f}B matmul params; world {world}; "
                  f"image tokens per sample {lp and int(batch['mm_token_type_ids'][0].sum())}")
    runtime.print0(f"SFT  batch {a.batch}x{batch['input_ids'].shape[1]} tokens/rank: {dt:.3f} s/step, "
                  f"{tokens * world / dt:,.0f} tokens/s" + (f", MFU {100 * mfu(flops, dt, peak, world):.1f}%"
                                                             if peak else ", MFU n/a (no known GPU peak)"))
    # GRPO: rollout (generate G per prompt) + one update on all G x batch sequences
    from cpt_rft import GRPOConfig, grpo_update, shares_prompt
    grpo_cfg = GRPOConfig(micro_batch=a.batch, max_new_tokens=a.max_new_tokens)
    prompts = items[:max(1, a.batch // a.group)]
    t_roll = t_upd = comp_tokens = 0
    for step in range(a.steps + 1):
        sync()
        t0 = time.time()
        comps, _ = runtime.sample(b, prompts, "plain", a.max_new_tokens, device=device, group=a.group)
        sync()
        t1 = time.time()
        seqs = [(it, c, 1.0 if i % 2 else -1.0) for i, (it, c) in
                enumerate(zip([it for it in prompts for _ in range(a.group)], comps))]
        grpo_update(b, None, opt, seqs, grpo_cfg, device)
        sync()
        if step:  # the first is warm-up
            t_roll += t1 - t0
            t_upd += time.time() - t1
            comp_tokens += sum(len(c) for c in comps)
    n = a.steps
    prompt_batch = runtime.encode(b, prompts[:1], "plain")[0]
    shared = shares_prompt(b.model)
    upd_tokens, upd_patches = update_work(len(prompts), a.group, prompt_batch["input_ids"].shape[1], comp_tokens / n,
                                          prompt_batch["pixel_values"].shape[0], shared)
    upd_flops = train_flops(n_text, n_vis, cfg.num_hidden_layers, cfg.hidden_size, upd_tokens,
                            prompt_batch["input_ids"].shape[1] + a.max_new_tokens, upd_patches) * world
    runtime.print0(f"GRPO {len(prompts)} prompts x G={a.group}, {a.max_new_tokens} new tokens: rollout "
                  f"{t_roll / n:.3f} s ({comp_tokens * world / t_roll:,.0f} tokens/s), update {t_upd / n:.3f} s"
                  + (f" (MFU {100 * mfu(upd_flops, t_upd / n, peak, world):.1f}%)" if peak else "")
                  + f"; rollout share {100 * t_roll / (t_roll + t_upd):.0f}% of the step")
    for n_prompts, group, new in [(len(prompts), a.group, a.max_new_tokens), *rollout_shapes(a)]:
        decode_rate(b, items, n_prompts, group, new, device, sync, hbm_bandwidth(device), n_text, cfg,
                    prompt_batch["input_ids"].shape[1])
    runtime.print0(runtime.peak_memory(device))
    runtime.cleanup()


if __name__ == "__main__":
    main()
