"""Build the embedded default model, data/tiny-base/, from nothing.

  1. a byte-level BPE tokenizer of the project's own (the `tokenizers` library), with Qwen2.5-VL's special tokens
     and a Qwen-style chat template;
  2. Qwen2VLImageProcessor for 84x84 images (9 image tokens each);
  3. a small Qwen2_5_VLConfig: the real Qwen2.5-VL architecture (M-RoPE, windowed vision blocks, 2x2 merger)
     at toy width, about 1.66M parameters;
  4. pre-training with the project's SFT loss on the general tasks until they are mastered, plus "weak exposure"
     to the CPT tasks: the one-answer tasks' questions with a plausible answer that ignores the task's rule (a colour
     or shape that is in the picture, a random permutation), so the base knows the answer's form but not the skill
     (about chance accuracy, a non-zero RFT reward); the multi-answer tasks' questions with the base's sharp habit,
     80 % of the time: the biggest object's answer where one object is big, a favourite guess where all are tiny
     (data/tasks.py `_habit`); every label is said in the base's own voice, a short sentence from templates it
     prefers unevenly ("It is red." 60 %, "The answer is red." 30 %, "I see red." 10 %: data/tasks.py VOICE), and
     the prompts carry --format free's instruction, so the base is read as any chat model is (--format free);
  5. evaluation on 500 held-out test items per task (greedy), printed, and the folder saved.

    python tools/make_base.py                       # ~20 minutes on 2 CPU cores
    python tools/make_base.py --steps 300 --out /tmp/tiny-test   # a quick smoke build
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import measure  # noqa: E402
from flags import NEW_TOKENS  # noqa: E402
import runtime  # noqa: E402
from data.tasks import BUILTIN, CPT, GENERAL, VOICE, builtin_items, in_voice  # noqa: E402

FORMAT = "free"  # the base speaks in sentences: its answer is read from its words, as a chat model's is
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(vocab_size=512):
    """Byte-level BPE (like Qwen's) trained on the task texts: any text encodes, the task words are single tokens,
    and so is an answer word as the assistant writes it, in its sentences (" red") and bare at the start of a turn
    ("red", the canonical SFT label), which makes the multi-answer tasks' answers one token each."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    corpus = []
    for name in BUILTIN:
        for it in builtin_items(name, "train", 300):
            corpus += [it["problem"].replace("<image>", "") + " Answer briefly.", it["answer"]]
            corpus += [t.format(it["answer"]) for t in VOICE]
    corpus += ["user assistant system You are a helpful assistant. <think> </think> <answer> </answer> \\boxed{}"] * 50
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                padding_side="left")
    t.chat_template = CHAT_TEMPLATE
    return t


def build_config(tok):
    from transformers import Qwen2_5_VLConfig
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("eos_token_id", "<|im_end|>"), ("pad_token_id", "<|endoftext|>")]}
    special = dict(eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"], bos_token_id=None)
    text = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                tie_word_embeddings=True, **special)
    vision = dict(depth=2, hidden_size=96, intermediate_size=384, num_heads=3, out_hidden_size=128, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)


def build():
    """Tokenizer, image processor and a randomly initialised model, as a Bundle."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor
    tok = build_tokenizer()
    improc = Qwen2VLImageProcessor(min_pixels=84 * 84, max_pixels=84 * 84, patch_size=14, merge_size=2,
                                   temporal_patch_size=2)
    model = Qwen2_5_VLForConditionalGeneration(build_config(tok))
    return runtime.Bundle(model, tok, improc)


def mix(rng, n, weak_weight, vision=None):
    """n pre-training items: general tasks with true answers, CPT tasks with weak (rule-free) answers.
    vision: a list of image general tasks to draw from alone (the first phases). With text-only `add` or the weak
    items in the mix from the start, a tiny model lowers its loss on text first and its vision path stays at chance
    for thousands of steps; with `color` in the mix from the start (8 colours), shape and side stayed at chance for
    2,500 steps (two seeds): the model settles on colour features. Alone, shape and side are learned in 400 steps."""
    if vision:
        return [it for name in rng.choices(vision, k=n)
                for it in builtin_items(name, "train", 1, start=rng.randrange(10_000_000))]
    names = list(GENERAL) + list(CPT)
    weights = [1.0] * len(GENERAL) + [weak_weight] * len(CPT)
    out = []
    for name in rng.choices(names, weights, k=n):
        out += builtin_items(name, "train", 1, start=rng.randrange(10_000_000), weak=name in CPT)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(runtime.ROOT, "data", "tiny-base"), help="output folder")
    p.add_argument("--steps", type=int, default=4000, help="pre-training steps")
    p.add_argument("--vision_steps", type=int, default=2000, help="first steps on the image general tasks alone (the "
                                                                 "first half without colour)")
    p.add_argument("--batch_size", type=int, default=64, help="items per step")
    p.add_argument("--lr", type=float, default=7e-4, help="peak AdamW learning rate (cosine to 5%%); 2e-3 is unstable")
    p.add_argument("--weak_weight", type=float, default=0.35, help="sampling weight of each CPT task (weak answers)")
    p.add_argument("--eval_n", type=int, default=500, help="test items per task for the final report")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import random
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rng = random.Random(args.seed)
    lm = build()
    device = torch.device("cpu")
    n_params = sum(q.numel() for q in lm.model.parameters())
    print(f"tiny Qwen2.5-VL: {n_params / 1e6:.2f}M parameters, vocabulary {len(lm.tok)}")
    opt = torch.optim.AdamW(lm.model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warmup) * (
        0.05 + 0.95 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * min(s, args.steps) / args.steps)).item())))
    suite = list(GENERAL) + list(CPT)  # the text tasks are for real chat models; the tiny base never sees them
    t0, val = time.time(), {n: builtin_items(n, "val", 100) for n in suite}
    lm.model.train()
    for step in range(1, args.steps + 1):
        vision = (["shape", "side"] if step <= args.vision_steps // 2 else ["color", "shape", "side"]
                  if step <= args.vision_steps else None)
        items = mix(rng, args.batch_size, args.weak_weight, vision)
        targets = [runtime.target_ids(lm, in_voice(it["answer"], rng), FORMAT) for it in items]
        logp, mask = runtime.token_logprobs(lm, items, FORMAT, targets, device)
        loss = -(logp * mask).sum() / mask.sum()  # mean negative log-likelihood of the answer tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 500 == 0 or step == args.steps:
            accs = {n: measure.evaluate_task(lm, val[n], FORMAT, device, NEW_TOKENS[FORMAT])[0] for n in suite}
            lm.model.train()
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - t0:6.0f} s  val acc " +
                  " ".join(f"{n} {100 * a:.0f}%" for n, a in accs.items()), flush=True)
    lm.model.eval()
    lm.model.generation_config.pad_token_id = lm.pad_id
    lm.model.generation_config.eos_token_id = lm.eos_id
    runtime.save_checkpoint(lm, args.out)
    print(f"saved {args.out} ({sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out)) / 1e6:.1f}"
          f" MB) after {time.time() - t0:.0f} s")
    lm = runtime.load_model(args.out, device)  # report on what was saved, through the normal loading path
    print(f"test accuracy, {args.eval_n} items per task, greedy, --format {FORMAT}:")
    for n in suite:
        acc, rew, _ = measure.evaluate_task(lm, builtin_items(n, "test", args.eval_n), FORMAT, device,
                                             NEW_TOKENS[FORMAT])
        print(f"  {n:11s} {'general' if n in GENERAL else 'CPT':8s} accuracy {100 * acc:5.1f}%   mean reward {rew:.3f}")


if __name__ == "__main__":
    main()
