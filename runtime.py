"""The runtime: what any script needs to run a model, and nothing else.

In the order a run uses it:
  1. distributed set-up (torchrun or plain python), seeds, print0, equal work on every rank
  2. results on disk: atomic strict-JSON files, the per-step log, the stop on a non-finite number
  3. model loading: any Hugging Face folder or .gguf file; Qwen2-VL / Qwen2.5-VL through
     AutoModelForImageTextToText, text-only chat models through AutoModelForCausalLM; memory flags
  4. prompt encoding: chat template, image tokens expanded, mm_token_type_ids (M-RoPE is off without them)
  5. sampling and log-probs from one distribution: the tokens that must never be sampled masked out in both,
     and no sampling setting of the checkpoint's own generation_config
  6. FSDP2: fully_shard on every decoder / vision block, then the root (built on the meta device, filled from rank
     0's copy); full-state-dict checkpoints by rank 0
"""
import collections
import contextlib
import datetime
import hashlib
import inspect
import itertools
import json
import math
import os
import random
import shutil
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.tasks import FORMAT_INSTRUCTIONS, answer_text, open_image
from lora import apply_lora, merged, scale_of, trainable_parameters

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(ROOT, "data", "tiny-base")


# ----------------------------------------------------------------------------- 1. distributed set-up

def init_dist():
    """(rank, world, device). Under torchrun: a process group (gloo on CPU; on GPU NCCL for CUDA tensors and gloo
    for CPU ones, so that a collective on a CPU tensor, as loading a model on the CPU does, works there too); else a
    single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if is_dist():
            return dist.get_rank(), dist.get_world_size(), _device()
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(process_group_backend(cuda), timeout=datetime.timedelta(minutes=30))
        return dist.get_rank(), dist.get_world_size(), _device()
    return 0, 1, _device()


def process_group_backend(cuda):
    """torch.distributed's backend string: one backend per device type ("cpu:gloo,cuda:nccl"), or gloo alone."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def _device():
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def is_dist():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_dist() else 0


def world():
    return dist.get_world_size() if is_dist() else 1


def share(seq, rank_=None, world_=None):
    """This rank's share of a list that every rank holds whole: elements rank, rank + world, rank + 2 world, ...
    Every split of work over ranks (a training batch, evaluation items, a filter's pool) is this one; a single
    process gets all of it."""
    return seq[(rank() if rank_ is None else rank_)::(world() if world_ is None else world_)]


def planned_world():
    """The world size before the process group exists (torchrun sets WORLD_SIZE), for checks before any work."""
    return int(os.environ.get("WORLD_SIZE", 1))


def print0(*args, **kwargs):
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def run_script(main):
    """A script's entry point: Ctrl-C ends it with one line, not a traceback (a training run says where it stopped
    and how to resume; elsewhere nothing is written before the work is done)."""
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("\ninterrupted; nothing was written") from None


def cleanup():
    if is_dist():
        dist.barrier()  # no rank tears down while another is still in a collective (gloo aborts at exit otherwise)
        dist.destroy_process_group()


def all_max(value, device):
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def all_sum(values, device):
    """Sum a list of floats over ranks (identity in a single process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_dist():
        dist.all_reduce(t)
    return t.tolist()


def equal_chunks(seq, size, device, filler, at_least=0):
    """(chunk, real) for consecutive chunks of this rank's `seq`, as many on every rank (and at least `at_least`).
    Under FSDP every rank must run the same forwards: a rank that has run out gets ([filler], False), a stand-in
    pass whose output is thrown away (SFT, GRPO, rollouts and evaluation all keep ranks in step this one way)."""
    for i in range(max(at_least, int(all_max(-(-len(seq) // size), device)))):
        chunk = seq[i * size:(i + 1) * size]
        yield (chunk, True) if chunk else ([filler], False)


def seed_all(*parts):
    """Seed python and torch from any tuple (seed, stage, ...): the same parts give the same run."""
    s = int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16)
    random.seed(s)
    torch.manual_seed(s)
    return s


# ----------------------------------------------------------------------------- 2. results on disk

class WriteFailed(Exception):
    """A result could not be written (a full disk, a folder that refuses writes); the old file, if any, is intact."""

    def __init__(self, path, error):
        reason = getattr(error, "strerror", None) or (str(error).splitlines() or [type(error).__name__])[0]
        super().__init__(f"{path} could not be written ({reason})")
        self.path = path


def write_json(path, obj):
    """Atomic strict-JSON write: a reader sees the old file or the new one, never a half-written one or a NaN."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, allow_nan=False)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise WriteFailed(path, e) from None


class Log:
    """Per-step metrics as strict JSON lines (rank 0); keeps this process's rows for the loop's checks."""

    def __init__(self, path):
        self.path, self.last, self.rows = path, {}, []

    def __call__(self, **row):
        self.last = row
        self.rows.append(row)
        if rank() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **row}, allow_nan=False) + "\n")


def optimizer_step(model, opt, grad_clip, loss):
    """Clip the gradient norm, stop on a non-finite loss or norm before the weights move, step, clear the gradient.
    Returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # an FSDP2 DTensor: the global norm
    check_finite(loss=loss, grad_norm=norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


class Diverged(Exception):
    """A loss, gradient norm, reward or logit stopped being a finite number: the run cannot go on."""


def check_finite(**values):
    """Raise Diverged naming every non-finite value (checked before the optimizer steps on it)."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise Diverged("non-finite " + ", ".join(f"{k} = {v}" for k, v in bad.items()))


# ----------------------------------------------------------------------------- 3. model loading

class Bundle:
    """A model with its tokenizer and (for a VLM) image processor, and the token ids the code needs."""

    def __init__(self, model, tok, improc):
        self.model, self.tok, self.improc = model, tok, improc
        cfg = model.config
        self.is_vlm = improc is not None
        self.eos_id = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        # never sampled: image / video placeholders and vision delimiters make the next forward fail, pad is not text
        ids = [getattr(cfg, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                 "vision_end_token_id")]
        self.forbidden = sorted({i for i in ids + [tok.pad_token_id] if i is not None and i != self.eos_id})
        self.image_token = "<|image_pad|>"
        self.path = None  # the folder the current weights were loaded from or last saved to
        self.pixels = collections.OrderedDict()  # image entry's id -> (entry, pixel values, grid): see _pixels


def split_model_path(path):
    """(folder, gguf file name or None): --model takes an HF folder or a single .gguf file."""
    if path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    return path, None


def model_config(path):
    """The model's config without its weights, for checks before any work."""
    from transformers import AutoConfig
    folder, gguf = split_model_path(path)
    if gguf and not os.path.isfile(path):
        raise FileNotFoundError(f"--model {path}: no such .gguf file")
    if not gguf and not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"--model {path}: not a checkpoint folder (config.json, weights, tokenizer) "
                                f"or a .gguf file")
    return AutoConfig.from_pretrained(folder, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(folder)


def text_config(cfg):
    """A config as a dict, a VLM's text settings (context length, sizes) lifted to the top."""
    d = cfg.to_dict()
    return {**d, **d.get("text_config", {}), "model_type": d.get("model_type")}


def is_vlm_config(cfg):
    return getattr(cfg, "vision_config", None) is not None


def load_model(path, device, dtype=torch.float32, grad_ckpt=False, what=None, advice=None, lora_rank=0,
               lora_alpha=None, lora_seed=0):
    """Load any HF checkpoint folder or .gguf file (dequantised). A config with a vision tower is a VLM (tokenizer
    + image processor); anything else is a text-only causal LM. Under torchrun the model comes back FSDP2-sharded,
    and only rank 0 ever reads (or holds) the whole of it (`_load_sharded`). grad_ckpt: activation checkpointing.
    `what` / `advice`: how an unreadable checkpoint is named and what the user can do (default: --model, copy it
    again). lora_rank > 0: fresh LoRA adapters on the decoder's linear layers, everything else frozen (lora.py),
    applied before sharding."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    cfg = model_config(path)
    folder, gguf = split_model_path(path)
    kw = {"gguf_file": gguf} if gguf else {}
    tok, improc = load_processors(path)
    cls = AutoModelForImageTextToText if is_vlm_config(cfg) else AutoModelForCausalLM
    adapt = (lambda m: apply_lora(m, lora_rank, lora_alpha, lora_seed)) if lora_rank else (lambda m: None)
    if is_dist():
        model = _load_sharded(cls, cfg, folder, kw, device, dtype, grad_ckpt, adapt, what, advice)
    else:
        model = _plain(_from_pretrained(cls, path, folder, dtype, kw, what, advice)).to(device)
        adapt(model)
        if grad_ckpt:
            enable_activation_checkpointing(model)
    lm = Bundle(model, tok, improc)
    lm.path = path
    return lm


def load_processors(path):
    """(tokenizer, image processor or None) of a checkpoint, without its weights. The Qwen2.5-VL processor class
    needs torchvision (for video) even for images, so the tokenizer and image processor are composed here exactly
    as the processor does (see `encode`)."""
    from transformers import AutoImageProcessor, AutoTokenizer
    folder, gguf = split_model_path(path)
    tok = AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))
    tok.padding_side = "left"
    if tok.chat_template is None:
        raise ValueError(f"--model {path}: the tokenizer has no chat template; use a chat/instruct checkpoint")
    return tok, AutoImageProcessor.from_pretrained(folder) if is_vlm_config(model_config(path)) else None


def _from_pretrained(cls, path, folder, dtype, kw, what=None, advice=None):
    """cls.from_pretrained, with an unreadable weights file named (a truncated download, a disk error) instead of a
    library traceback that names none."""
    try:
        return cls.from_pretrained(folder, dtype=dtype, **kw)
    except Exception as e:
        weights = [f for f in (os.listdir(folder) if os.path.isdir(folder) else [])
                   if f.endswith((".safetensors", ".bin", ".gguf", ".pt"))]
        if kw.get("gguf_file"):
            weights = [kw["gguf_file"]]
        raise SystemExit(f"error: {what or '--model ' + path}: its weights cannot be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); files: {', '.join(weights) or 'none'}. "
                         f"{advice or 'A truncated or corrupt file is the usual cause: copy it again'}") from None


def _plain(model):
    """A model loaded from a .gguf file is dequantised to float on load, but transformers keeps marking it as
    quantized and then refuses to save it: drop the marks, so that stage checkpoints are plain HF folders."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        model.config.quantization_config = None
        del model.config.quantization_config
    return model


def enable_activation_checkpointing(model):
    """Recompute each block's activations in the backward instead of keeping them. transformers 5.x renamed the
    call (the old name prints a FutureWarning); older 5.x versions have only the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_activation_checkpointing(model):
    """Whether enable_activation_checkpointing is on (the property's name, by the same rename)."""
    on = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if on is None else on)


def _load_sharded(cls, cfg, folder, kw, device, dtype, grad_ckpt, adapt, what=None, advice=None):
    """FSDP2 loading without a whole copy per GPU: every rank builds the model on the meta device (no memory) and
    shards it, then allocates only its own shard on `device`; rank 0 alone reads the checkpoint (into CPU memory)
    and sends each rank its part. Buffers that are not in the state dict (rotary frequencies) are sent as they
    are. `adapt` (LoRA) changes both copies alike before sharding; rank 0's adapters, seeded, are the ones sent."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    full = _plain(_from_pretrained(cls, folder, folder, dtype, kw, what, advice)) if rank() == 0 else None
    if full is not None:
        adapt(full)
    with torch.device("meta"):
        model = cls.from_config(cfg, dtype=dtype)
    adapt(model)
    if grad_ckpt:
        enable_activation_checkpointing(model)
    _fully_shard_blocks(model, device)
    model.to_empty(device=device)
    set_model_state_dict(model, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    source = dict(full.named_buffers()) if full is not None else {}
    for name, buf in model.named_buffers():
        if full is not None:
            buf.copy_(source[name])
        dist.broadcast(buf, src=0)
    if full is not None:
        model.generation_config = full.generation_config
    del full
    _settle_root(model, device)
    return model


def adamw_options(device):
    """AdamW's implementation on a device: fused (one kernel over all parameters, not a loop of launches) on CUDA;
    torch's default on CPU, which keeps CPU runs' numbers."""
    return {"fused": True} if torch.device(device).type == "cuda" else {}


def adamw(model, lr, weight_decay, device):
    """The training scripts' optimizer. Build it after reshard(lm) (see there)."""
    return torch.optim.AdamW(trainable_parameters(model), lr=lr, weight_decay=weight_decay, **adamw_options(device))


def configure(lm, min_pixels=None, max_pixels=None):
    """The image processor's pixel bounds (image tokens grow with pixels / 784)."""
    if lm.improc is not None:
        set_pixel_bounds(lm.improc, min_pixels, max_pixels)


def set_pixel_bounds(improc, min_pixels=None, max_pixels=None):
    """An image processor's min / max pixels (None: keep its own); the input checks count image tokens with it."""
    if min_pixels or max_pixels:
        size = dict(improc.size)
        size["shortest_edge"] = min_pixels or size["shortest_edge"]
        size["longest_edge"] = max_pixels or size["longest_edge"]
        improc.size = type(improc.size)(**size) if not isinstance(improc.size, dict) else size


# ----------------------------------------------------------------------------- 4. prompt encoding

def messages(item, fmt):
    """Chat messages of one item: EasyR1's "<image>" placeholders become image entries in the user turn."""
    content, parts = [], item["problem"].split("<image>")
    for i, text in enumerate(parts):
        if i:
            content.append({"type": "image"})
        if text:
            content.append({"type": "text", "text": text})
    if FORMAT_INSTRUCTIONS[fmt]:
        content.append({"type": "text", "text": FORMAT_INSTRUCTIONS[fmt]})
    return [{"role": "user", "content": content}]


def encode(lm, items, fmt, completions=None):
    """Batch of prompts (left-padded) followed by optional completions (lists of token ids, right-padded).

    Returns model inputs plus `prompt_len` and `comp_mask` (1 on completion tokens). For a VLM each
    <|image_pad|> is repeated once per merged patch (grid_t*grid_h*grid_w / merge^2), and mm_token_type_ids
    marks those tokens with 1: transformers computes 3-D M-RoPE positions only when it is given."""
    images = []
    for it in items:
        if it["images"] and not lm.is_vlm:  # the input checks refuse it first (data.tasks.askable)
            raise ValueError(f"{it.get('where', 'a task item')}: has images but the model is text-only")
        images += [(im, it.get("where", "?")) for im in it["images"]]
    out, counts = {}, []
    if images:
        out = _pixels(lm, images)
        counts = (out["image_grid_thw"].prod(-1) // lm.improc.merge_size ** 2).tolist()
    prompts, at = [], 0
    for it in items:
        msgs = messages(it, fmt)
        if not lm.is_vlm:  # text-only models take plain string content
            msgs = [{"role": m["role"], "content": "".join(c["text"] for c in m["content"])} for m in msgs]
        text = lm.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        text = _expand_images(text, lm.image_token, iter(counts[at:at + len(it["images"])]))
        at += len(it["images"])
        prompts.append(lm.tok(text, add_special_tokens=False)["input_ids"])
    comps = completions if completions is not None else [[] for _ in prompts]
    prompt_len, comp_len = max(map(len, prompts)), max(map(len, comps))
    ids = torch.full((len(prompts), prompt_len + comp_len), lm.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    comp_mask = torch.zeros((len(prompts), comp_len), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        ids[i, prompt_len - len(p):prompt_len] = torch.tensor(p)
        ids[i, prompt_len:prompt_len + len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, prompt_len - len(p):prompt_len + len(c)] = 1
        comp_mask[i, :len(c)] = 1
    out.update(input_ids=ids, attention_mask=mask)
    if lm.is_vlm:
        out["mm_token_type_ids"] = (ids == lm.model.config.image_token_id).long()
    return out, prompt_len, comp_mask


PIXEL_CACHE_BYTES = 32 * 2**20  # pixel values a Bundle keeps: a step's images (a GRPO step encodes each prompt 2-3
# times), not an evaluation's thousands


def _pixels(lm, images):
    """pixel_values and image_grid_thw of a list of (image entry, where) pairs. Each distinct entry is processed
    once: a GRPO batch repeats every prompt's image G times, and a step encodes its prompts for the rollout and
    again for the update, so the values of the images used last are kept, up to PIXEL_CACHE_BYTES (the image
    processor runs on the CPU, in the way of a GPU step). An entry is kept with its values, so that its id names it
    while cached."""
    size = repr(lm.improc.size)  # configure() changes it: other pixels
    todo = {}
    for entry, where in images:
        if (id(entry), size) not in lm.pixels:
            todo.setdefault(id(entry), (entry, where))
    if todo:
        vis = lm.improc(images=[open_image(e, w) for e, w in todo.values()], return_tensors="pt")
        grid = vis["image_grid_thw"]
        for (entry, _), pv, g in zip(todo.values(), vis["pixel_values"].split(grid.prod(-1).tolist()), grid):
            lm.pixels[id(entry), size] = (entry, pv.clone(), g)  # a copy: a view would hold the whole batch
    keys = [(id(entry), size) for entry, _ in images]
    out = {"pixel_values": torch.cat([lm.pixels[k][1] for k in keys]),
           "image_grid_thw": torch.stack([lm.pixels[k][2] for k in keys])}
    for k in keys:
        lm.pixels.move_to_end(k)
    held = sum(v[1].nbytes for v in lm.pixels.values())
    while held > PIXEL_CACHE_BYTES:
        held -= lm.pixels.popitem(last=False)[1][1].nbytes
    return out


def _expand_images(text, token, counts):
    pieces = text.split(token)
    return pieces[0] + "".join(token * next(counts) + p for p in pieces[1:])


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def target_ids(lm, answer, fmt):
    """Token ids SFT teaches: the answer written in the run's format (tasks.answer_text), then end-of-turn."""
    return lm.tok(answer_text(answer, fmt), add_special_tokens=False)["input_ids"] + [lm.eos_id]


# ----------------------------------------------------------------------------- 5. sampling and log-probs

def forbidden_bias(forbidden, vocab, device):
    """[V]: 0, and -inf on the never-sampled tokens (image pads, vision markers, padding). Added to logits it masks
    them (x + 0 is x) in one op, in the sampler and in the loss alike: a forbidden token is never drawn and has
    log-prob -inf."""
    bias = torch.zeros(vocab, device=device)
    bias[list(forbidden)] = float("-inf")
    return bias


def next_token(logits, ban, temperature=1.0, greedy=False):
    """One decoding step, [B, V] logits -> ([B] token ids, [B] broken flags): the never-sampled tokens masked out
    (`ban`, from forbidden_bias; as in the loss), then argmax (greedy) or a draw from softmax(logits / temperature):
    pi(y_t), exactly what token_logprobs scores. No host sync: a row whose logits are NaN or +inf is flagged for the
    caller to raise Diverged on, and drawn from finite stand-ins meanwhile (a NaN would make the draw itself fail)."""
    broken = (logits.isnan() | logits.isposinf()).any(-1)
    logits = logits.nan_to_num(0.0, posinf=0.0, neginf=float("-inf")) + ban
    if greedy:
        return logits.argmax(-1), broken
    return torch.multinomial(F.softmax(logits / temperature, -1), 1).squeeze(-1), broken


def text_positions(mask):
    """Position of every token counted over the tokens a row attends to (a left-padded prompt starts at 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def prompt_positions(lm, batch):
    """Position ids of the prompts: 1-D from the attention mask for a text model; for Qwen2-VL / Qwen2.5-VL the
    3-D M-RoPE ids (time, height, width) that the model's get_rope_index computes for image tokens, the text
    positions on all three axes for a prompt without images."""
    pos = text_positions(batch["attention_mask"])
    if not lm.is_vlm:
        return pos
    if "image_grid_thw" not in batch:
        return pos.unsqueeze(0).expand(3, -1, -1)
    inner = getattr(lm.model, "model", lm.model)  # FSDP2 keeps the module tree
    pos3, _ = inner.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                   image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    return pos3


@contextlib.contextmanager
def gathered(model):
    """Under FSDP2, gather the weights once for a whole rollout instead of at every decoding step (one all-gather
    per unit per rollout, not one per token), and put every shard back after, since no backward follows to do it.
    It needs room for the whole model's weights on each device while sampling: where they would take more than
    half the free GPU memory, each forward gathers and frees them as in training."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    once = bool(units) and not (torch.cuda.is_available() and
                                sum(p.numel() for p in model.parameters()) * 2 > 0.5 * torch.cuda.mem_get_info()[0])
    for m in units if once else []:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            if once:  # FSDP2's defaults: blocks reshard after forward, the root keeps its weights for backward
                m.set_reshard_after_forward(m is not model, recurse=False)
            m.reshard()


def _cache_arg(model):
    """transformers 5.x renames forward's past_key_values to cache: the name this version takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _kv_cache(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


# A GPU decoding step is launch-bound, not compute-bound: it runs at memory speed only without host syncs and, best,
# as one CUDA graph. On CUDA the sampler therefore decodes into a preallocated (static) KV cache and checks for the
# stop every STOP_EVERY steps; CPT_COMPILE_DECODE=1 also compiles the one-token step with
# torch.compile(mode="reduce-overhead") (CUDA graphs; single process only, not under FSDP). On CPU a sync costs
# nothing and attention over a fixed-size cache only adds work, so the CPU keeps the growing cache and checks every
# step (which also keeps its samples, random draws included, what they were).
STOP_EVERY = 8
_compiled_step = None


def decode_plan(device, static=None):
    """(static cache?, steps between stop checks, compiled step?) of a rollout on `device`; `static` overrides."""
    cuda = torch.device(device).type == "cuda"
    static = cuda if static is None else static
    compiled = cuda and static and not is_dist() and os.environ.get("CPT_COMPILE_DECODE") == "1"
    return static, STOP_EVERY if cuda else 1, compiled


def static_cache(model, cache, length):
    """The prefill's KV cache copied into a preallocated one of `length` positions (transformers' StaticCache): the
    decoding steps then write in place into fixed tensors, as a CUDA graph needs; attention reads all `length`
    positions, the unwritten ones masked out."""
    from transformers import StaticCache
    static = StaticCache(config=model.config, max_cache_len=length)
    for i, layer in enumerate(cache.layers):
        where = torch.arange(layer.keys.shape[-2], device=layer.keys.device)  # older 5.x versions ask for it
        static.update(layer.keys, layer.values, i, {"cache_position": where})
    return static


def one_token(model, cache_arg, token, mask, pos, cache):
    """The decoding step: one token per sequence through the model, on top of the cache; its next-token logits."""
    out = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=pos, use_cache=True,
                **{cache_arg: cache})
    return out.logits[:, -1].float()


@torch.no_grad()
def sample(lm, items, fmt, max_new_tokens, temperature=1.0, greedy=False, device="cpu", group=1, static=None):
    """`group` completions per item (item-major: item 0's group, then item 1's), written out: each prompt is
    encoded and prefilled once (images included), the KV cache is repeated `group` times, then token by token
    next_token until every sequence has ended its turn or the budget is spent. Returns (token-id lists ending at
    EOS, or cut: truncated flags). Under torchrun every rank steps until all ranks are done (one small collective
    per stop check), as FSDP needs the same forwards on every rank. `static`: the preallocated KV cache on or off
    (default: decode_plan's)."""
    global _compiled_step
    model = lm.model
    batch = to_device(encode(lm, items, fmt)[0], device)
    pos = prompt_positions(lm, batch)
    static, stop_every, compiled = decode_plan(device, static)
    step = one_token
    if compiled:
        _compiled_step = _compiled_step or torch.compile(one_token, mode="reduce-overhead")
        step = _compiled_step
    was_training = model.training
    model.eval()
    with gathered(model), autocast(device):
        out = model(**batch, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache, logits = _kv_cache(out), out.logits[:, -1].float()
        if group > 1:  # the samples of one prompt share its prefill
            cache.batch_repeat_interleave(group)
            logits, pos = logits.repeat_interleave(group, 0), pos.repeat_interleave(group, -2)
        prompt_len = batch["attention_mask"].shape[1]
        length = prompt_len + max_new_tokens
        if static:  # rounded up: fewer distinct shapes for a compiled step
            length = -(-length // 128) * 128
            cache = static_cache(model, cache, length)
        # the rollout's attention mask, allocated once: the prompts', then one column per new token
        mask = F.pad(batch["attention_mask"].repeat_interleave(group, 0), (0, length - prompt_len))
        next_pos = pos.amax(-1, keepdim=True) + 1  # [B, 1] or [3, B, 1]: right after the prompt's last token
        ban = forbidden_bias(lm.forbidden, logits.shape[-1], logits.device)
        tokens = torch.full((logits.shape[0], max_new_tokens), lm.pad_id, dtype=torch.long, device=logits.device)
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        broken = torch.zeros_like(done)
        cache_arg = _cache_arg(model)
        for t in range(max_new_tokens):
            token, bad = next_token(logits, ban, temperature, greedy)
            tokens[:, t] = token.masked_fill_(done, lm.pad_id)
            broken |= bad
            done |= token == lm.eos_id
            if t + 1 == max_new_tokens or ((t + 1) % stop_every == 0 and not _busy(done, device)):
                break
            mask[:, prompt_len + t] = ~done
            # a growing cache attends to the mask's filled part (a view); a static one to all of it
            logits = step(model, cache_arg, token, mask if static else mask[:, :prompt_len + t + 1], next_pos, cache)
            next_pos = next_pos + 1
        if broken.any():
            raise Diverged("the model's logits are NaN or infinite while sampling (the last update broke the weights)")
    model.train(was_training)
    comps, truncated = [], []
    for row in tokens[:, :t + 1].tolist():
        ended = lm.eos_id in row
        comps.append(row[:row.index(lm.eos_id) + 1] if ended else row)
        truncated.append(not ended)
    return comps, truncated


def _busy(done, device):
    """Whether any sequence is still going, on any rank (FSDP needs the same forwards on every rank): a host sync."""
    busy = float(not done.all())
    return (all_max(busy, device) if is_dist() else busy) > 0


def token_logprobs(lm, items, fmt, completions, device, temperature=1.0):
    """log pi(token) of every completion token under the current model: [B, Lc], with the completion mask.
    Only the completion positions go through the LM head (logits_to_keep), which keeps real-vocab memory small."""
    batch, prompt_len, comp_mask = encode(lm, items, fmt, completions)
    batch = to_device(batch, device)
    comp_len = comp_mask.shape[1]
    with autocast(device):  # the positions the sampler used
        logits = lm.model(**batch, position_ids=prompt_positions(lm, batch), logits_to_keep=comp_len + 1,
                          use_cache=False).logits[:, :-1].float()
    comp_mask = comp_mask.to(device)
    return completion_logprobs(logits, batch["input_ids"][:, prompt_len:], comp_mask, lm.forbidden,
                               temperature), comp_mask


def completion_logprobs(logits, targets, comp_mask, forbidden, temperature):
    """log pi(target) at every completion position, from its logits: the never-sampled tokens masked out and the
    temperature applied, as in the sampler. Padding positions are zeroed: their targets are forbidden tokens
    (log p = -inf), and -inf * 0 would be NaN."""
    logits = (logits + forbidden_bias(forbidden, logits.shape[-1], logits.device)) / temperature
    logp = torch.gather(F.log_softmax(logits, -1), 2, targets.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(comp_mask == 0, 0.0)


def shared_prompt_logprobs(lm, items, fmt, completions, device, temperature=1.0):
    """token_logprobs for sequences that come in groups sharing a prompt (a GRPO group: G completions of one
    prompt, `items` holding the same item object G times in a row): each distinct prompt is forwarded once, with
    grad, its KV cache indexed out to its completions, and the completions run through that cache. The log-probs,
    and so the gradient, are those of the repeated forward, at the cost of one prompt per group: on an image prompt
    the vision tower runs once per group too. Returns ([B, Lc] log-probs, completion mask), as token_logprobs."""
    is_first = [i == 0 or it is not items[i - 1] for i, it in enumerate(items)]
    firsts = [i for i, f in enumerate(is_first) if f]
    owner = torch.tensor(list(itertools.accumulate(is_first)), device=device) - 1  # each sequence's prompt
    batch = to_device(encode(lm, [items[i] for i in firsts], fmt)[0], device)
    pos = prompt_positions(lm, batch)
    with autocast(device):
        out = lm.model(**batch, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache, first = _kv_cache(out), out.logits[:, -1].float()[owner]  # the logits of every first completion token
    comp_len = max(map(len, completions))
    ids = torch.full((len(items), comp_len), lm.pad_id, dtype=torch.long, device=device)
    comp_mask = torch.zeros_like(ids)
    for i, c in enumerate(completions):
        ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        comp_mask[i, :len(c)] = 1
    logits = first.unsqueeze(1)
    if comp_len > 1:  # token j of a completion is read at position j - 1 of this forward
        cache.batch_select_indices(owner)
        mask = torch.cat([batch["attention_mask"][owner], comp_mask[:, :-1]], 1)
        steps = torch.arange(comp_len - 1, device=device)
        start = pos.amax(-1, keepdim=True)[..., owner, :] + 1
        with autocast(device):
            rest = lm.model(input_ids=ids[:, :-1], attention_mask=mask, position_ids=start + steps,
                            use_cache=True, **{_cache_arg(lm.model): cache}).logits.float()
        logits = torch.cat([logits, rest], 1)
    return completion_logprobs(logits, ids, comp_mask, lm.forbidden, temperature), comp_mask


def autocast_dtype(device_type, distributed):
    """bf16 compute on a single GPU; none on CPU, and none under FSDP, whose MixedPrecisionPolicy already casts
    (autocasting on top would hide the policy's fp32 gradient reduction)."""
    return torch.bfloat16 if device_type == "cuda" and not distributed else None


def autocast(device):
    dtype = autocast_dtype(torch.device(device).type, is_dist())
    return torch.autocast("cuda", dtype=dtype, enabled=True) if dtype else torch.autocast("cpu", enabled=False)


def decode(lm, ids):
    return lm.tok.decode([i for i in ids if i != lm.eos_id], skip_special_tokens=False)


# ----------------------------------------------------------------------------- 6. FSDP2 and checkpoints

def _fully_shard_blocks(model, device):
    """FSDP2: fully_shard every transformer block (text decoder layers and vision blocks, named by the model's own
    _no_split_modules), the vision tower, then the root. On GPU params are bf16 for compute, gradients reduced in
    fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # transformers splits the vision tower's output per image (torch.split: views) and only concatenates them, out
    # of place, so FSDP2's warning about in-place ops on returned views does not apply
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if torch.device(device).type == "cuda" else MixedPrecisionPolicy()
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for m in model.modules():
        if type(m).__name__ in blocks:
            fully_shard(m, mp_policy=mp)
    # the vision tower as its own unit: its patch embedding and merger are gathered with it, not held by the root
    visual = getattr(getattr(model, "model", model), "visual", None)
    if visual is not None:
        fully_shard(visual, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def shard_model(model, device):
    """FSDP2-shard a model already built on every rank (tests/bench.py's random-init shapes); checkpoints go
    through load_model, which shards without a whole copy per GPU."""
    _fully_shard_blocks(model, device)
    _settle_root(model, device)
    return model


def _settle_root(model, device):
    # FSDP2 picks its root on the first forward: make it the whole model's, before anything calls a part alone
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    model.reshard()  # the root keeps its weights gathered after a forward; stale copies would outlive opt.step()


def reshard(lm):
    """Put every FSDP2 unit back to its shards. The root stays gathered after a forward with no backward (an
    evaluation pass), and while it is gathered `model.parameters()` returns the gathered copies: an optimizer built
    then would step on copies that the next reshard throws away, so the root's own weights (embeddings, final
    norm, LM head) would never learn. Call before building an optimizer."""
    if is_dist():
        lm.model.reshard()


def full_state_dict(model):
    """The whole model's weights on CPU (gathered from all ranks under FSDP; rank 0 gets them)."""
    if not is_dist():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(lm, path):
    """A folder that from_pretrained loads back, written to a temporary name and renamed (never half-written),
    with the checkpoint's own generation_config (which `sample` never reads). LoRA adapters are merged into their
    weights: the folder holds plain weights."""
    from safetensors import SafetensorError
    sd = merged(full_state_dict(lm.model), scale_of(lm.model))
    if rank() == 0:
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            lm.model.save_pretrained(tmp, state_dict=sd)
            lm.tok.save_pretrained(tmp)
            if lm.improc is not None:
                lm.improc.save_pretrained(tmp)
        except (OSError, SafetensorError) as e:  # a full disk: the half-written folder goes, to free its space
            shutil.rmtree(tmp, ignore_errors=True)
            raise WriteFailed(path, e) from None
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    if is_dist():
        dist.barrier()


def peak_memory(device):
    """Peak memory so far: GPU allocator peak on CUDA, the process's max resident set on CPU (GiB)."""
    if torch.device(device).type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    import resource
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
