"""The flags both training scripts share, and every input checked before any work.

A run refuses bad input before a model's weights are loaded or anything is written, with every problem listed at
once: a flag out of range, a task file's bad line (file:line), a prompt longer than the model's context, an --out
that cannot be written. Defaults that depend on another flag (the completion budgets, by --format) are settled
here, once.
"""
import argparse
import math
import os

from data.rewards import FORMATS
from data.tasks import BUILTIN, DEFAULT_GENERAL, DEFAULT_SEQUENCE, DataError, load_split, task_name
from lora import default_alpha
from runtime import DEFAULT_MODEL, is_vlm_config, messages, model_config, planned_world, split_model_path, text_config


# completion budgets by answer format, in tokens: a bare answer is short; a chat model's sentence is not (chosen by
# tools/budget.py on SmolLM2-135M-Instruct: the share of its replies each budget cuts); reasoning is long
NEW_TOKENS = {"plain": 16, "free": 64, "boxed": 512, "tags": 512}


class HelpFormatter(argparse.RawTextHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's line breaks and shows every flag's default."""


def add_common_args(p, steps, micro_batch, lr, lr_note, batch_size=16):
    """Flags both training scripts share, grouped by topic; the defaults that differ are the script's."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL, help="HF checkpoint folder or .gguf file (default: the tiny base)")
    g.add_argument("--tasks", nargs="+", default=DEFAULT_SEQUENCE, help="CPT sequence: built-in names or JSONL files")
    g.add_argument("--general", nargs="*", default=DEFAULT_GENERAL, help="held-out tasks evaluated after every stage")
    g.add_argument("--multitask", action="store_true", help="train once on the union of --tasks (the upper bound)")
    g.add_argument("--format", default="free", choices=FORMATS,
                   help="answer format (free: read from the reply's words, as the tiny base and chat models speak)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run directory (None: runs/<script>)")
    g.add_argument("--seed", type=int, default=0, help="seed of data order and sampling")
    g.add_argument("--eval_n", type=int, default=500, help="test items per CPT task")
    g.add_argument("--general_n", type=int, default=None, help="test items per general task (None: --eval_n)")
    g.add_argument("--eval_split", default="test", choices=["test", "val"], help="val: for tuning settings")
    g.add_argument("--eval_batch", type=int, default=128, help="evaluation batch size (128: fastest per item on a CPU core)")
    g.add_argument("--eval_max_new_tokens", type=int, default=None,
                   help=f"greedy evaluation's completion budget (None: by --format, {NEW_TOKENS})")
    g.add_argument("--keep_stages", action="store_true", help="keep every stage's checkpoint, not only the last")
    g.add_argument("--kl_n", type=int, default=100, help="items per task for the continuous readings: KL to the base "
                                                          "(CPT tasks), gold log-likelihood (general tasks); 0: off")
    g.add_argument("--kl_samples", type=int, default=4, help="base samples per prompt for the KL estimate")
    g = p.add_argument_group("sampling (GRPO rollouts; SFT's self / oracle targets)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, > 0")
    g.add_argument("--max_new_tokens", type=int, default=None,
                   help=f"completion budget of a sample (None: by --format, {NEW_TOKENS})")
    g = p.add_argument_group("optimisation (per stage)")
    g.add_argument("--steps", type=int, default=steps, help="optimizer steps per stage (x tasks with --multitask)")
    g.add_argument("--batch_size", type=int, default=batch_size, help="items (SFT) or prompts (GRPO) per step, global")
    g.add_argument("--micro_batch", type=int, default=micro_batch, help="sequences per forward pass on one rank")
    g.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate ({lr_note})")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--grad_clip", type=float, default=1.0, help="gradient norm clip")
    g.add_argument("--lora_rank", type=int, default=0,
                   help="R > 0: LoRA instead of full fine-tuning, y = W x + (alpha / R) B A x on every linear layer of\n"
                        "the language model's decoder blocks; only A and B train, everything else (embeddings, LM\n"
                        "head, the vision tower) stays frozen. A fresh adapter each stage, merged into the stage's\n"
                        "checkpoint (plain weights). 0: full fine-tuning")
    g.add_argument("--lora_alpha", type=float, default=None,
                   help="LoRA's alpha (None: 2R, so that alpha / R is 2 at every rank and a rate carries across ranks)")
    g = p.add_argument_group("memory (real models)")
    g.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing in the decoder and vision blocks")
    g.add_argument("--min_pixels", type=int, default=None, help="image processor's min pixels (image tokens grow "
                                                                "with pixels / 784)")
    g.add_argument("--max_pixels", type=int, default=None, help="image processor's max pixels")
    return p


def settle_defaults(args):
    """The defaults that depend on another flag, filled in once (results.json records the values used)."""
    args.max_new_tokens = args.max_new_tokens or NEW_TOKENS[args.format]
    args.eval_max_new_tokens = args.eval_max_new_tokens or NEW_TOKENS[args.format]
    if args.lora_rank > 0 and args.lora_alpha is None:
        args.lora_alpha = float(default_alpha(args.lora_rank))
    return args


def eval_counts(args):
    """{spec: evaluation items}: --eval_n for the CPT tasks, --general_n (default: the same) for the general ones."""
    return {**{t: args.eval_n for t in args.tasks}, **{g: args.general_n or args.eval_n for g in args.general}}


def input_errors(args, positive=(), at_least_two=()):
    """Every problem with the flags and the task files, as messages, found before a model is loaded or anything is
    written: numbers out of range, a task named twice, a task file with a bad line (file:line) or too few lines to
    hold out items, an image task for a text-only model. `positive` / `at_least_two`: the script's own flags."""
    errors = []
    if args.kl_n < 0:
        errors.append(f"--kl_n {args.kl_n}: must be 0 (off) or more")
    if args.general_n is not None and args.general_n < 1:
        errors.append(f"--general_n {args.general_n}: must be at least 1")
    for name in ("steps", "batch_size", "micro_batch", "eval_n", "eval_batch", "kl_samples") + tuple(positive):
        if getattr(args, name) < 1:
            errors.append(f"--{name} {getattr(args, name)}: must be at least 1")
    for name in at_least_two:
        if getattr(args, name) < 2:
            errors.append(f"--{name} {getattr(args, name)}: must be at least 2 (a group of one has no baseline to "
                          f"compare with, so its advantage is 0/0)")
    if args.lora_rank < 0:
        errors.append(f"--lora_rank {args.lora_rank}: must be 0 (full fine-tuning) or more")
    if args.lora_alpha is not None and args.lora_rank == 0:
        errors.append(f"--lora_alpha {args.lora_alpha}: LoRA's scale, without --lora_rank it would do nothing")
    elif args.lora_alpha is not None and not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        errors.append(f"--lora_alpha {args.lora_alpha}: must be a positive number")
    if not (math.isfinite(args.lr) and args.lr > 0):
        errors.append(f"--lr {args.lr}: must be a positive number")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        errors.append(f"--temperature {args.temperature}: must be a positive number (the samples are drawn from "
                      f"softmax(logits / temperature); 0 would divide by zero)")
    for name in ("max_new_tokens", "eval_max_new_tokens"):
        if getattr(args, name) < 1:
            errors.append(f"--{name} {getattr(args, name)}: must be at least 1")
    errors += out_errors(args.out)
    w = planned_world()
    if args.batch_size >= 1 and args.batch_size % w:
        errors.append(f"--batch_size {args.batch_size}: must be divisible by the number of processes ({w}); "
                      f"try {max(w, args.batch_size // w * w)}")
    names = [task_name(t) for t in list(args.tasks) + list(args.general)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        errors.append(f"task(s) {', '.join(twice)} given more than once in --tasks / --general: each column is one "
                      f"task, and a general task must not be trained on")
    try:
        cfg = model_config(args.model)
    except (OSError, ValueError) as e:
        return errors + [str(e)]
    vlm = is_vlm_config(cfg)
    with_images, file_items = set(), []
    for spec in list(args.tasks) + list(args.general):
        try:
            splits = {split: load_split(spec, split, 1 if spec in BUILTIN else None) for split in ("train", "val", "test")}
        except DataError as e:
            errors.append(str(e))
            continue
        for split, items in splits.items():
            if not vlm and spec in args.tasks and any(it["images"] for it in items):
                errors.append(f"{items[0].get('where', spec)}: has images but {args.model} is a text-only model")
                break
            with_images |= {(spec, bool(it["images"])) for it in items}
            file_items += items if spec not in BUILTIN else []
        if spec not in BUILTIN and ":" in spec:
            test = {it["problem"] for it in splits["test"]}
            if all(it["problem"] in test for it in splits["train"]):
                print(f"warning: every training item of {spec.split(':')[0]} is also in its test file "
                      f"{spec.split(':')[1]}: its test accuracy measures memory, not learning", flush=True)
    if file_items:
        errors += too_long(args.model, cfg, file_items, args.format, max(args.max_new_tokens, args.eval_max_new_tokens))
    # under FSDP every rank runs the same units: a rank training on text while another trains on images would run
    # the vision tower alone and hang; a training stage must be all-image or all-text (evaluation goes task by task)
    stages = [list(args.tasks)] if args.multitask else [[t] for t in args.tasks]
    for stage in stages:
        kinds = {has for spec, has in with_images if spec in stage}
        if w > 1 and vlm and len(kinds) > 1:
            errors.append(f"under torchrun a training stage cannot mix image and text-only items ({', '.join(stage)})")
    return errors


def out_errors(out):
    """--out must be a folder this process can create and write to (checked without creating anything)."""
    if out is None:
        return []
    if os.path.exists(out) and not os.path.isdir(out):
        return [f"--out {out}: is a file, not a folder; name a folder (it is created if needed)"]
    parent = out
    while not os.path.exists(parent):
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        return [f"--out {out}: {parent} cannot be written to by this user; name a folder you can write"]
    return []


def too_long(model, cfg, items, fmt, new_tokens, limit=20):
    """Prompts that do not leave room for the completion budget in the model's context window
    (max_position_embeddings), with file:line and their token counts. Counted with the model's own tokenizer and
    chat template before any weights are loaded: one long line would otherwise fill the memory at the first
    forward."""
    from transformers import AutoImageProcessor, AutoTokenizer
    context = text_config(cfg).get("max_position_embeddings")
    if not context:
        return []
    folder, gguf = split_model_path(model)
    tok = AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))
    improc = AutoImageProcessor.from_pretrained(folder) if is_vlm_config(cfg) else None
    room = context - new_tokens
    errors = []
    for it in items:
        n = _prompt_tokens(tok, improc, it, fmt)
        if n > room:
            errors.append(f"{it.get('where', '?')}: the prompt is {n} tokens; {model} reads at most {context}, and "
                          f"{new_tokens} are kept for the reply: shorten the problem (or its images)")
            if len(errors) == limit:
                errors.append("... (more lines too long)")
                break
    return errors


def _prompt_tokens(tok, improc, item, fmt):
    msgs = messages(item, fmt)
    if improc is None:
        msgs = [{"role": m["role"], "content": "".join(c.get("text", "") for c in m["content"])} for m in msgs]
    n = len(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    for path in item["images"] if improc is not None else []:
        from PIL import Image
        with Image.open(path) as im:
            n += improc.get_number_of_image_patches(im.height, im.width, {}) // improc.merge_size ** 2
    return n


def refuse(errors):
    """Stop before any work with every problem listed (exit status 2, as argparse's own errors)."""
    if errors:
        raise SystemExit("error: cannot start:\n  " + "\n  ".join(errors))
