"""The flags both training scripts share, and every input checked before any work.

A run refuses bad input before a model's weights are loaded or anything is written, with every problem listed at
once: a flag out of range, a task file's bad line (file:line), a prompt longer than the model's context, an --out
that cannot be written. Defaults that depend on another flag (the completion budgets, by --format) are settled
here, once.
"""
import argparse
import math
import os
import tempfile

from data.rewards import FORMATS
from data.tasks import (BUILTIN, DEFAULT_GENERAL, DEFAULT_SEQUENCE, DataError, answer_text, distinct_items,
                        load_split, task_name, text_model_errors)
from lora import default_alpha
from measure import eval_counts
from runtime import (DEFAULT_MODEL, is_vlm_config, messages, model_config, planned_world, set_pixel_bounds,
                     split_model_path, text_config)


# completion budgets by answer format, in tokens: a bare answer is short; a chat model's sentence is not (chosen by
# tools/budget.py on SmolLM2-135M-Instruct: the share of its replies each budget cuts); reasoning is long
NEW_TOKENS = {"plain": 16, "free": 64, "boxed": 512, "tags": 512}


class HelpFormatter(argparse.RawTextHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's line breaks and shows every flag's default."""


# the flags every script has, declared once: the model, the answer format, sampling, the evaluation's size

def add_model_flag(g):
    g.add_argument("--model", default=DEFAULT_MODEL, help="HF checkpoint folder or .gguf file (default: the tiny base)")


def add_format_flag(g):
    g.add_argument("--format", default="free", choices=FORMATS,
                   help="answer format (free: read from the reply's words, as the tiny base and chat models speak)")


def add_sampling_flags(g, what="a sample"):
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, > 0")
    g.add_argument("--max_new_tokens", type=int, default=None,
                   help=f"completion budget of {what} (None: by --format, {NEW_TOKENS})")


def add_eval_size_flags(g, what="CPT task"):
    g.add_argument("--eval_n", type=int, default=500, help=f"test items per {what}")
    g.add_argument("--eval_batch", type=int, default=128, help="evaluation batch size (128: fastest per item on a CPU core)")


def add_common_args(p, steps, micro_batch, lr, lr_note, batch_size=16):
    """Flags both training scripts share, grouped by topic; the defaults that differ are the script's."""
    g = p.add_argument_group("model and data")
    add_model_flag(g)
    g.add_argument("--tasks", nargs="+", default=DEFAULT_SEQUENCE, help="CPT sequence: built-in names or JSONL files")
    g.add_argument("--general", nargs="*", default=DEFAULT_GENERAL, help="held-out tasks evaluated after every stage")
    g.add_argument("--multitask", action="store_true", help="train once on the union of --tasks (the upper bound)")
    add_format_flag(g)
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run directory (None: runs/<script>)")
    g.add_argument("--seed", type=int, default=0, help="seed of data order and sampling")
    add_eval_size_flags(g)
    g.add_argument("--general_n", type=int, default=None, help="test items per general task (None: --eval_n)")
    g.add_argument("--eval_split", default="test", choices=["test", "val"], help="val: for tuning settings")
    g.add_argument("--eval_max_new_tokens", type=int, default=None,
                   help=f"greedy evaluation's completion budget (None: by --format, {NEW_TOKENS})")
    g.add_argument("--keep_stages", action="store_true", help="keep every stage's checkpoint, not only the last")
    g.add_argument("--kl_n", type=int, default=100, help="items per task for the continuous readings: KL to the base "
                                                          "(CPT tasks), gold log-likelihood (general tasks); 0: off")
    g.add_argument("--kl_samples", type=int, default=4, help="base samples per prompt for the KL estimate")
    add_sampling_flags(p.add_argument_group("sampling (GRPO rollouts; SFT's self / oracle targets)"))
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


MAX_EVAL_ITEMS = 20_000  # per task: every evaluation item (and its image) is built in memory before the base row


def input_errors(args, positive=(), at_least_two=()):
    """Every problem with the flags, the model and the task files, as messages, found before a model's weights are
    loaded or anything is written: numbers out of range (with why), a task named twice, a task file with a bad
    line (file:line) or too few lines to hold out items, an image task for a text-only model, a prompt or answer
    that does not fit the model's context. `positive` / `at_least_two`: the script's own flags. Prints the notes
    that are not errors (fewer evaluation items than asked, training items that are also test items)."""
    errors = number_errors(args, positive, at_least_two) + out_errors(args.out)
    w = planned_world()
    if args.batch_size >= 1 and args.batch_size % w:
        errors.append(f"--batch_size {args.batch_size}: must be divisible by the number of processes ({w}); "
                      f"try {max(w, args.batch_size // w * w)}")
    names = [task_name(t) for t in list(args.tasks) + list(args.general)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        errors.append(f"task(s) {', '.join(twice)} given more than once in --tasks / --general: each column is one "
                      f"task, and a general task must not be trained on")
    model_errs, cfg, tok = model_errors(args.model)
    errors += model_errs
    if cfg is None:
        return errors
    vlm = is_vlm_config(cfg)
    budget = max(args.max_new_tokens, args.eval_max_new_tokens)
    budget_errs = budget_errors(cfg, args.model, max_new_tokens=args.max_new_tokens,
                                eval_max_new_tokens=args.eval_max_new_tokens)
    errors += budget_errs
    with_images, file_items = set(), []
    for spec in list(args.tasks) + list(args.general):
        try:
            splits = {split: load_split(spec, split, 1 if spec in BUILTIN else None)
                      for split in ("train", "val", "test")}
        except DataError as e:
            errors.append(str(e))
            continue
        for split, items in splits.items():
            refused = text_model_errors(spec, items, vlm, args.model) if spec in args.tasks else []
            if refused:
                errors += refused
                break
            with_images |= {(spec, bool(it["images"])) for it in items}
            file_items += items if spec not in BUILTIN else []
        asked = eval_counts(args.tasks, args.general, args.eval_n, args.general_n)[spec]
        held = distinct_items(spec, args.eval_split) if spec in BUILTIN else len(splits[args.eval_split])
        if held is not None and asked > held:
            print(f"note: {task_name(spec)}'s {args.eval_split} split holds {held} distinct item(s); evaluating "
                  f"those {held}, not {asked}", flush=True)
        if spec in args.tasks and spec not in BUILTIN:
            overlap_note(spec, splits)
    if file_items and not budget_errs and tok is not None:
        errors += too_long(args.model, cfg, tok, file_items, args.format, budget, args.min_pixels, args.max_pixels)
    # under FSDP every rank runs the same units: a rank training on text while another trains on images would run
    # the vision tower alone and hang; a training stage must be all-image or all-text (evaluation goes task by task)
    stages = [list(args.tasks)] if args.multitask else [[t] for t in args.tasks]
    for stage in stages:
        kinds = {has for spec, has in with_images if spec in stage}
        if w > 1 and vlm and len(kinds) > 1:
            errors.append(f"under torchrun a training stage cannot mix image and text-only items ({', '.join(stage)})")
    return errors


def number_errors(args, positive=(), at_least_two=()):
    """Every numeric flag in its meaningful range, each with a one-line reason."""
    errors = []
    if args.kl_n < 0:
        errors.append(f"--kl_n {args.kl_n}: must be 0 (off) or more")
    if args.general_n is not None and args.general_n < 1:
        errors.append(f"--general_n {args.general_n}: must be at least 1")
    for name in ("steps", "batch_size", "micro_batch", "eval_n", "eval_batch", "kl_samples") + tuple(positive):
        if getattr(args, name) < 1:
            errors.append(f"--{name} {getattr(args, name)}: must be at least 1")
    for name in ("eval_n", "general_n"):
        if (getattr(args, name) or 0) > MAX_EVAL_ITEMS:
            errors.append(f"--{name} {getattr(args, name)}: at most {MAX_EVAL_ITEMS} (every item is built in memory "
                          f"before the first evaluation)")
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
    if not args.grad_clip > 0:  # inf is allowed: no clipping
        errors.append(f"--grad_clip {args.grad_clip}: must be positive (inf: no clip); the gradient is scaled by "
                      f"grad_clip / norm, so a negative value turns every step uphill and 0 erases it")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        errors.append(f"--weight_decay {args.weight_decay}: must be 0 or more; AdamW multiplies the weights by "
                      f"1 - lr x weight_decay, so a negative value inflates them every step")
    if args.seed < 0:
        errors.append(f"--seed {args.seed}: must be 0 or more")
    for name in ("max_new_tokens", "eval_max_new_tokens"):
        if getattr(args, name) < 1:
            errors.append(f"--{name} {getattr(args, name)}: must be at least 1")
    errors += pixel_errors(args.min_pixels, args.max_pixels)
    return errors


PIXELS_PER_TOKEN = 28 * 28  # Qwen2.5-VL: a 14-pixel patch, 2 x 2 patches merged into one image token


def pixel_errors(min_pixels, max_pixels):
    errors = [f"--{name} {v}: must be at least {PIXELS_PER_TOKEN} (one image token covers 28 x 28 pixels)"
              for name, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
              if v is not None and v < PIXELS_PER_TOKEN]
    if not errors and min_pixels and max_pixels and min_pixels > max_pixels:
        errors.append(f"--min_pixels {min_pixels} is above --max_pixels {max_pixels}")
    return errors


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def model_errors(model):
    """([problems], config, tokenizer) of --model, read without its weights: a folder or .gguf that cannot be read,
    a tokenizer that is missing or has no chat template. Each problem names the path and what to do; config and
    tokenizer are None where they cannot be used."""
    from transformers import AutoTokenizer
    try:
        cfg = model_config(model)
    except OSError as e:
        return [str(e)], None, None
    except Exception as e:  # a truncated .gguf raises struct / value errors from inside the reader
        return [f"--model {model}: its config cannot be read ({type(e).__name__}: {str(e)[:200]}); a truncated or "
                f"corrupt file is the usual cause: copy it again"], None, None
    folder, gguf = split_model_path(model)
    if not gguf and not any(os.path.exists(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        return [f"--model {model}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy them from the checkpoint "
                f"this folder came from"], cfg, None
    try:
        tok = AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))
    except Exception as e:
        return [f"--model {model}: no tokenizer can be read from it ({type(e).__name__}); a checkpoint folder needs "
                f"its tokenizer files (tokenizer.json, tokenizer_config.json) beside config.json"], cfg, None
    if tok.chat_template is None:
        return [f"--model {model}: the tokenizer has no chat template; use a chat/instruct checkpoint (or add "
                f"chat_template.jinja to the folder)"], cfg, None
    return [], cfg, tok


def budget_errors(cfg, model, **budgets):
    """A completion budget must leave room for a prompt in the model's context window."""
    context = text_config(cfg).get("max_position_embeddings")
    return [f"--{name} {v}: {model} reads at most {context} tokens, prompt and reply together; give a budget well "
            f"below that" for name, v in budgets.items() if context and v is not None and v >= context]


def overlap_note(spec, splits):
    """Training items that are also test items (the same problem over the same images): their test accuracy
    measures memory, not learning. Said, not refused: a user may mean it."""
    key = lambda it: (it["problem"], tuple(map(os.path.abspath, it["images"])))  # noqa: E731
    train = {key(it) for it in splits["train"]}
    both = sum(key(it) in train for it in splits["test"])
    if both:
        print(f"warning: {both} of the {len(splits['test'])} test items of {task_name(spec)} are also training items "
              f"({spec}): their test accuracy measures memory, not learning", flush=True)


def out_errors(out, flag="--out"):
    """A folder this process can create and write to: checked by making (and removing) a temporary folder in the
    nearest existing parent, since os.access says yes where the file system says no (/sys, a read-only mount)."""
    if out is None:
        return []
    if os.path.exists(out) and not os.path.isdir(out):
        return [f"{flag} {out}: is a file, not a folder; name a folder (it is created if needed)"]
    parent = out
    while not os.path.exists(parent):
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.path.isdir(parent):
        return [f"{flag} {out}: {parent} is a file, not a folder; name a folder (it is created if needed)"]
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".write-check-"))
    except OSError as e:
        return [f"{flag} {out}: {parent} cannot be written to ({e.strerror}); name a folder you can write"]
    return []


def too_long(model, cfg, tok, items, fmt, new_tokens, min_pixels=None, max_pixels=None, limit=20):
    """Items that do not fit the model's context window (max_position_embeddings), with file:line and their token
    counts: the prompt (its image tokens counted with the run's pixel bounds) plus the longer of the completion
    budget and the answer SFT teaches. Counted with the model's own tokenizer and chat template before any
    weights are loaded: one long line would otherwise fill the memory at its first forward."""
    from transformers import AutoImageProcessor
    context = text_config(cfg).get("max_position_embeddings")
    if not context:
        return []
    improc = AutoImageProcessor.from_pretrained(split_model_path(model)[0]) if is_vlm_config(cfg) else None
    if improc is not None:
        set_pixel_bounds(improc, min_pixels, max_pixels)
    errors = []
    for it in items:
        prompt = _prompt_tokens(tok, improc, it, fmt)
        answer = len(tok(answer_text(it["answer"], fmt), add_special_tokens=False)["input_ids"]) + 1
        if prompt + max(new_tokens, answer) > context:
            longer = f"answer is {answer}" if answer > new_tokens else f"reply budget is {new_tokens}"
            fix = "answer" if answer > new_tokens else "problem (or its images: --max_pixels)"
            errors.append(f"{it.get('where', '?')}: the prompt is {prompt} tokens"
                          f"{' with its images' if it['images'] else ''} and the {longer}; {model} reads at most "
                          f"{context}: shorten the {fix}")
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
    """Stop before any work with every problem listed (exit status 1)."""
    if errors:
        raise SystemExit("error: cannot start:\n  " + "\n  ".join(errors))
