"""The runtime: what any script needs to run a model, and nothing else.

In the order a run uses it:
  1. distributed set-up (torchrun or plain python), seeds, print0, equal work on every rank
  2. results on disk: atomic strict-JSON files, the per-step log, the stop on a non-finite number
  3. model loading: any Hugging Face folder or .gguf file; Qwen2-VL / Qwen2.5-VL through
     AutoModelForImageTextToText, text-only chat models through AutoModelForCausalLM; memory flags
  4. prompt encoding: chat template, image tokens expanded, mm_token_type_ids (M-RoPE is off without them)
  5. sampling and log-probs from one distribution: the tokens that must never be sampled masked out in both,
     and no sampling setting of the checkpoint's own generation_config; rollouts scored by the task's verifier
  6. FSDP2: fully_shard on every decoder / vision block, then the root (built on the meta device, filled from rank
     0's copy); full-state-dict checkpoints by rank 0
"""
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

from data.rewards import FORMAT_INSTRUCTIONS, answer_text, restate, score
from data.tasks import open_image
from lora import apply_lora, merged, scale_of

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(ROOT, "data", "tiny-base")


# ----------------------------------------------------------------------------- 1. distributed set-up

def init_dist():
    """(rank, world, device). Under torchrun: a process group (NCCL on GPU, gloo on CPU); else a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if is_dist():
            return dist.get_rank(), dist.get_world_size(), _device()
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        return dist.get_rank(), dist.get_world_size(), _device()
    return 0, 1, _device()


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


def planned_world():
    """The world size before the process group exists (torchrun sets WORLD_SIZE), for checks before any work."""
    return int(os.environ.get("WORLD_SIZE", 1))


def print0(*args, **kwargs):
    if rank() == 0:
        print(*args, **kwargs, flush=True)


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

def write_json(path, obj):
    """Atomic strict-JSON write: a reader sees the old file or the new one, never a half-written one or a NaN."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
    os.replace(tmp, path)


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


def load_model(path, device, dtype=torch.float32, grad_ckpt=False, lora_rank=0, lora_alpha=None, lora_seed=0):
    """Load any HF checkpoint folder or .gguf file (dequantised). A config with a vision tower is a VLM (tokenizer
    + image processor); anything else is a text-only causal LM. Under torchrun the model comes back FSDP2-sharded,
    and only rank 0 ever reads (or holds) the whole of it (`_load_sharded`). grad_ckpt: activation checkpointing.
    lora_rank > 0: fresh LoRA adapters on the decoder's linear layers, everything else frozen (lora.py), applied
    before sharding."""
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
    cfg = model_config(path)
    folder, gguf = split_model_path(path)
    kw = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    tok.padding_side = "left"
    if tok.chat_template is None:
        raise ValueError(f"--model {path}: the tokenizer has no chat template; use a chat/instruct checkpoint")
    # The Qwen2.5-VL processor class needs torchvision (for video) even for images, so the tokenizer and image
    # processor are composed here exactly as the processor does (see `encode`).
    improc = AutoImageProcessor.from_pretrained(folder) if is_vlm_config(cfg) else None
    cls = AutoModelForImageTextToText if is_vlm_config(cfg) else AutoModelForCausalLM
    adapt = (lambda m: apply_lora(m, lora_rank, lora_alpha, lora_seed)) if lora_rank else (lambda m: None)
    if is_dist():
        model = _load_sharded(cls, cfg, folder, kw, device, dtype, grad_ckpt, adapt)
    else:
        model = _plain(_from_pretrained(cls, path, folder, dtype, kw)).to(device)
        adapt(model)
        if grad_ckpt:
            enable_activation_checkpointing(model)
    lm = Bundle(model, tok, improc)
    lm.path = path
    return lm


def _from_pretrained(cls, path, folder, dtype, kw):
    """cls.from_pretrained, with an unreadable weights file named (a truncated download, a disk error) instead of a
    library traceback that names none."""
    try:
        return cls.from_pretrained(folder, dtype=dtype, **kw)
    except Exception as e:
        weights = [f for f in (os.listdir(folder) if os.path.isdir(folder) else [])
                   if f.endswith((".safetensors", ".bin", ".gguf", ".pt"))]
        if kw.get("gguf_file"):
            weights = [kw["gguf_file"]]
        raise SystemExit(f"error: --model {path}: its weights cannot be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); files: {', '.join(weights) or 'none'}. "
                         f"A truncated or corrupt file is the usual cause: copy it again") from None


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


def _load_sharded(cls, cfg, folder, kw, device, dtype, grad_ckpt, adapt):
    """FSDP2 loading without a whole copy per GPU: every rank builds the model on the meta device (no memory) and
    shards it, then allocates only its own shard on `device`; rank 0 alone reads the checkpoint (into CPU memory)
    and sends each rank its part. Buffers that are not in the state dict (rotary frequencies) are sent as they
    are. `adapt` (LoRA) changes both copies alike before sharding; rank 0's adapters, seeded, are the ones sent."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    full = _plain(_from_pretrained(cls, folder, folder, dtype, kw)) if rank() == 0 else None
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


def configure(lm, min_pixels=None, max_pixels=None):
    """The image processor's pixel bounds (image tokens grow with pixels / 784)."""
    if lm.improc is not None and (min_pixels or max_pixels):
        size = dict(lm.improc.size)
        size["shortest_edge"] = min_pixels or size["shortest_edge"]
        size["longest_edge"] = max_pixels or size["longest_edge"]
        lm.improc.size = type(lm.improc.size)(**size) if not isinstance(lm.improc.size, dict) else size


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
        if it["images"] and not lm.is_vlm:
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


def _pixels(lm, images):
    """pixel_values and image_grid_thw of a list of (image entry, where) pairs. Each distinct entry is processed
    once: a GRPO batch repeats every prompt's image G times."""
    todo = {}
    for entry, where in images:
        todo.setdefault(id(entry), (entry, where))
    vis = lm.improc(images=[open_image(e, w) for e, w in todo.values()], return_tensors="pt")
    grid = vis["image_grid_thw"]
    done = dict(zip(todo, zip(vis["pixel_values"].split(grid.prod(-1).tolist()), grid)))
    order = [id(entry) for entry, _ in images]
    return {"pixel_values": torch.cat([done[k][0] for k in order]),
            "image_grid_thw": torch.stack([done[k][1] for k in order])}


def _expand_images(text, token, counts):
    pieces = text.split(token)
    return pieces[0] + "".join(token * next(counts) + p for p in pieces[1:])


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def target_ids(lm, answer, fmt):
    """Token ids SFT teaches: the answer written in the run's format (rewards.answer_text), then end-of-turn."""
    return lm.tok(answer_text(answer, fmt), add_special_tokens=False)["input_ids"] + [lm.eos_id]


# ----------------------------------------------------------------------------- 5. sampling and log-probs

def mask_forbidden(logits, forbidden):
    """Logits with the never-sampled tokens at -inf; used by the sampler and by the loss alike."""
    if forbidden:
        logits = logits.clone()
        logits[..., forbidden] = float("-inf")
    return logits


def next_token(logits, forbidden, temperature=1.0, greedy=False):
    """One decoding step, [B, V] logits -> [B] token ids: the never-sampled tokens masked out (as in the loss),
    then argmax (greedy) or a draw from softmax(logits / temperature): pi(y_t), exactly what token_logprobs scores."""
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise Diverged("the model's logits are NaN or infinite while sampling (the last update broke the weights)")
    logits = mask_forbidden(logits, forbidden)
    if greedy:
        return logits.argmax(-1)
    return torch.multinomial(F.softmax(logits / temperature, -1), 1).squeeze(-1)


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


@torch.no_grad()
def sample(lm, items, fmt, max_new_tokens, temperature=1.0, greedy=False, device="cpu", n=1):
    """n completions per item (item-major: item 0's n, then item 1's), written out: each prompt is encoded and
    prefilled once (images included), the KV cache is repeated n times, then token by token next_token until every
    sequence has ended its turn or the budget is spent. Returns (token-id lists ending at EOS, or cut: truncated
    flags). Under torchrun every rank steps until all ranks are done (one small collective per step), as FSDP
    needs the same forwards on every rank."""
    model = lm.model
    batch = to_device(encode(lm, items, fmt)[0], device)
    mask = batch["attention_mask"]
    pos = prompt_positions(lm, batch)
    was_training = model.training
    model.eval()
    with gathered(model), autocast(device):
        out = model(**batch, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache, logits = _kv_cache(out), out.logits[:, -1].float()
        if n > 1:  # the samples of one prompt share its prefill
            cache.batch_repeat_interleave(n)
            logits, mask, pos = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), \
                pos.repeat_interleave(n, -2)
        next_pos = pos.amax(-1, keepdim=True) + 1  # [B, 1] or [3, B, 1]: right after the prompt's last token
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        steps = []
        for t in range(max_new_tokens):
            token = next_token(logits, lm.forbidden, temperature, greedy).masked_fill(done, lm.pad_id)
            steps.append(token)
            done |= token == lm.eos_id
            busy = float(not done.all())  # under torchrun: until every rank is done (FSDP needs the same forwards)
            if t + 1 == max_new_tokens or (all_max(busy, device) if is_dist() else busy) == 0:
                break
            mask = torch.cat([mask, (~done).long().unsqueeze(1)], 1)
            out = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=next_pos, use_cache=True,
                        **{_cache_arg(model): cache})
            logits, next_pos = out.logits[:, -1].float(), next_pos + 1  # the cache grew in place
    model.train(was_training)
    comps, truncated = [], []
    for row in torch.stack(steps, 1).tolist():
        ended = lm.eos_id in row
        comps.append(row[:row.index(lm.eos_id) + 1] if ended else row)
        truncated.append(not ended)
    return comps, truncated


def token_logprobs(lm, items, fmt, completions, device, temperature=1.0):
    """log pi(token) of every completion token under the current model: [B, Lc], with the completion mask.
    Only the completion positions go through the LM head (logits_to_keep), which keeps real-vocab memory small."""
    batch, prompt_len, comp_mask = encode(lm, items, fmt, completions)
    batch = to_device(batch, device)
    comp_len = comp_mask.shape[1]
    with autocast(device):  # the positions the sampler used
        logits = lm.model(**batch, position_ids=prompt_positions(lm, batch), logits_to_keep=comp_len + 1,
                          use_cache=False).logits[:, :-1].float()
    logits = mask_forbidden(logits, lm.forbidden) / temperature
    targets = batch["input_ids"][:, prompt_len:]
    logp = torch.gather(F.log_softmax(logits, -1), 2, targets.unsqueeze(-1)).squeeze(-1)
    comp_mask = comp_mask.to(device)
    # padding targets are forbidden tokens (log p = -inf): zero them, since -inf * 0 would be NaN
    return logp.masked_fill(comp_mask == 0, 0.0), comp_mask


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
    logits = mask_forbidden(logits, lm.forbidden) / temperature
    logp = torch.gather(F.log_softmax(logits, -1), 2, ids.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(comp_mask == 0, 0.0), comp_mask


def autocast_dtype(device_type, distributed):
    """bf16 compute on a single GPU; none on CPU, and none under FSDP, whose MixedPrecisionPolicy already casts
    (autocasting on top would hide the policy's fp32 gradient reduction)."""
    return torch.bfloat16 if device_type == "cuda" and not distributed else None


def autocast(device):
    dtype = autocast_dtype(torch.device(device).type, is_dist())
    return torch.autocast("cuda", dtype=dtype, enabled=True) if dtype else torch.autocast("cpu", enabled=False)


def decode(lm, ids):
    return lm.tok.decode([i for i in ids if i != lm.eos_id], skip_special_tokens=False)


def score_item(text, item, fmt):
    """A completion's score against a task item: its gold answer, or any of its valid answers when it has several."""
    return score(text, item["answer"], item["kind"], fmt, item.get("candidates", ()), item.get("valid", ()))


def rollout(lm, items, fmt, k, temperature, max_new_tokens, device, batch_size=256):
    """K sampled completions per item, scored by the item's verifier. One dict per item:
    completions (token ids), texts, scores (rewards.Score), rewards, truncated flags. Generation runs in chunks
    of whole groups; every rank runs the same number of chunks (FSDP), padding with a stand-in chunk if needed."""
    assert items, "every rank needs at least one item to roll out"
    out = []
    for chunk, real in equal_chunks(items, max(1, batch_size // k), device, items[0]):
        comps, trunc = sample(lm, chunk, fmt, max_new_tokens, temperature, device=device, n=k)
        for i, it in enumerate(chunk if real else []):
            cs, ts = comps[i * k:(i + 1) * k], trunc[i * k:(i + 1) * k]
            texts = [decode(lm, x) for x in cs]
            scores = [score_item(t, it, fmt) for t in texts]
            rewards = [s.reward for s in scores]
            if not all(map(math.isfinite, rewards)):
                raise Diverged(f"non-finite reward {rewards}")
            out.append({"item": it, "completions": cs, "texts": texts, "scores": scores, "rewards": rewards,
                        "truncated": ts})
    return out


def restated_replies(lm, items, fmt, max_new_tokens, device, batch_size=256):
    """(item, target ids) pairs for SFT's voice-only arm: each item's greedy reply from `lm` with the answer it gives
    replaced by the item's canonical one (rewards.restate): the answer SFT data hold, in the model's own words. An
    item whose reply states no single answer gives no pair."""
    pairs = []
    for chunk, real in equal_chunks(items, batch_size, device, items[0]):
        comps, _ = sample(lm, chunk, fmt, max_new_tokens, greedy=True, device=device)
        for it, comp in zip(chunk if real else [], comps):
            said = restate(decode(lm, comp), it["answer"], it["kind"], [*it.get("valid", []),
                                                                        *it.get("candidates", [])])
            if said is not None:  # the reply keeps its format's wrapping (a boxed answer, tags): nothing to add
                pairs.append((it, target_ids(lm, said, "plain")))
    return pairs


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
    sd = merged(full_state_dict(lm.model), scale_of(lm.model))
    if rank() == 0:
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        lm.model.save_pretrained(tmp, state_dict=sd)
        lm.tok.save_pretrained(tmp)
        if lm.improc is not None:
            lm.improc.save_pretrained(tmp)
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
