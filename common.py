"""What cpt_sft.py, cpt_rft.py, filter.py and evaluate.py share, written once.

In the order a run uses it:
  1. distributed set-up (torchrun or plain python), seeds, print0, equal work on every rank
  2. results on disk: atomic strict-JSON files, the per-step log, the stop on a diverging run
  3. model loading: any Hugging Face folder or .gguf file; Qwen2-VL / Qwen2.5-VL through
     AutoModelForImageTextToText, text-only chat models through AutoModelForCausalLM; memory flags
  4. prompt encoding: chat template, image tokens expanded, mm_token_type_ids (M-RoPE is off without them)
  5. sampling (generate) from exactly the distribution the loss sees: the tokens that must never be sampled masked
     out in both, and no sampling setting of the checkpoint's own generation_config
  6. rollouts and the reward-variance filter (RIF-RFT), shared by cpt_rft.py --rif and filter.py
  7. evaluation (greedy) on task test splits
  8. FSDP2: fully_shard on every decoder / vision block, then the root (built on the meta device, filled from rank
     0's copy); full-state-dict checkpoints by rank 0
  9. the continual post-training loop: every input checked, base row, then train stage -> evaluate everything ->
     checkpoint -> results.json
"""
import datetime
import gc
import hashlib
import json
import math
import os
import random
import shutil
import time
import warnings
import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from data.rewards import FORMAT_INSTRUCTIONS, FORMATS, answer_text, score
from data.tasks import BUILTIN, DEFAULT_GENERAL, DEFAULT_SEQUENCE, DataError, load_split, open_image, task_name

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(ROOT, "data", "tiny-base")
# the base row of a comparison is computed once and shared by its runs; keyed by everything that changes it
CACHE_DIR = os.environ.get("CPT_CACHE", os.path.join(ROOT, "runs", ".cache"))


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
    """Per-step metrics as strict JSON lines (rank 0); remembers the last row for error messages."""

    def __init__(self, path):
        self.path, self.last = path, {}

    def __call__(self, **row):
        self.last = row
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
        self.prompt_ids = {}  # (problem, format, image tokens per image) -> prompt token ids (encode's cache)
        self.path = None  # the folder the current weights were loaded from or last saved to
        # the checkpoint's own sampling settings (e.g. Qwen2.5's repetition_penalty 1.05) would shape the samples
        # but not the log-probs the loss uses (off-policy samples): sampling runs on a neutral config, and the
        # checkpoint's own one is written back into every saved checkpoint
        from transformers import GenerationConfig
        self.saved_generation_config = model.generation_config
        model.generation_config = GenerationConfig(eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                                                   bos_token_id=getattr(tok, "bos_token_id", None))


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


def is_vlm_config(cfg):
    return getattr(cfg, "vision_config", None) is not None


def load_model(path, device, dtype=torch.float32, grad_ckpt=False):
    """Load any HF checkpoint folder or .gguf file (dequantised). A config with a vision tower is a VLM (tokenizer
    + image processor); anything else is a text-only causal LM. Under torchrun the model comes back FSDP2-sharded,
    and only rank 0 ever reads (or holds) the whole of it (`_load_sharded`). grad_ckpt: activation checkpointing."""
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
    if is_dist():
        model = _load_sharded(cls, cfg, folder, kw, device, dtype, grad_ckpt)
    else:
        model = _plain(cls.from_pretrained(folder, dtype=dtype, **kw)).to(device)
        if grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm = Bundle(model, tok, improc)
    lm.path = path
    return lm


def _plain(model):
    """A model loaded from a .gguf file is dequantised to float on load, but transformers keeps marking it as
    quantized and then refuses to save it: drop the marks, so that stage checkpoints are plain HF folders."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        model.config.quantization_config = None
        del model.config.quantization_config
    return model


def _load_sharded(cls, cfg, folder, kw, device, dtype, grad_ckpt):
    """FSDP2 loading without a whole copy per GPU: every rank builds the model on the meta device (no memory) and
    shards it, then allocates only its own shard on `device`; rank 0 alone reads the checkpoint (into CPU memory)
    and sends each rank its part. Buffers that are not in the state dict (rotary frequencies) are sent as they
    are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    full = _plain(cls.from_pretrained(folder, dtype=dtype, **kw)) if rank() == 0 else None
    with torch.device("meta"):
        model = cls.from_config(cfg, dtype=dtype)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
        # the rendered prompt depends only on these: cached, since the same questions come back every step and row
        key = (it["problem"], fmt, tuple(counts[at:at + len(it["images"])]))
        at += len(it["images"])
        if key not in lm.prompt_ids:
            msgs = messages(it, fmt)
            if not lm.is_vlm:  # text-only models take plain string content
                msgs = [{"role": m["role"], "content": "".join(c["text"] for c in m["content"])} for m in msgs]
            text = lm.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            text = _expand_images(text, lm.image_token, iter(key[2]))
            if len(lm.prompt_ids) >= 100_000:  # a data set of distinct prompts: keep memory bounded
                lm.prompt_ids.clear()
            lm.prompt_ids[key] = lm.tok(text, add_special_tokens=False)["input_ids"]
        prompts.append(lm.prompt_ids[key])
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


PIXEL_CACHE_BYTES = [int(os.environ.get("CPT_PIXEL_CACHE_MB", "1024")) << 20]  # left of this process's budget


def _pixels(lm, images):
    """pixel_values and image_grid_thw of a list of (image entry, where) pairs. Each distinct entry is processed
    once: a GRPO batch repeats every prompt's image G times, and the image processor works per image anyway.
    An in-memory image keeps its processed pixels (up to $CPT_PIXEL_CACHE_MB per process, 1024 by default), since
    the same evaluation images are encoded again after every stage; a path is read and processed each time."""
    setting = lm.improc.to_json_string()
    done, todo = {}, {}
    for entry, where in images:
        kept = getattr(entry, "_cpt_pixels", None)
        if kept is not None and kept[0] == setting:
            done[id(entry)] = kept[1:]
        elif id(entry) not in todo:
            todo[id(entry)] = (entry, where)
    if todo:
        vis = lm.improc(images=[open_image(e, w) for e, w in todo.values()], return_tensors="pt")
        grid = vis["image_grid_thw"]
        for (key, (entry, _)), rows, g in zip(todo.items(), vis["pixel_values"].split(grid.prod(-1).tolist()), grid):
            done[key] = (rows, g)
            size = rows.numel() * rows.element_size()
            if isinstance(entry, Image.Image) and size <= PIXEL_CACHE_BYTES[0]:
                entry._cpt_pixels = (setting, rows.clone(), g.clone())  # a copy: a view would keep the batch alive
                PIXEL_CACHE_BYTES[0] -= size
                weakref.finalize(entry, _release_pixels, size)
    order = [id(entry) for entry, _ in images]
    return {"pixel_values": torch.cat([done[k][0] for k in order]),
            "image_grid_thw": torch.stack([done[k][1] for k in order])}


def _release_pixels(size):
    PIXEL_CACHE_BYTES[0] += size


def _expand_images(text, token, counts):
    pieces = text.split(token)
    return pieces[0] + "".join(token * next(counts) + p for p in pieces[1:])


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def target_ids(lm, answer, fmt):
    """Token ids SFT teaches: the answer written in the run's format (rewards.answer_text), then end-of-turn."""
    return lm.tok(answer_text(answer, fmt), add_special_tokens=False)["input_ids"] + [lm.eos_id]


def image_tokens(lm, specs):
    """{task: image tokens of its first test item}, the number that memory grows with."""
    out = {}
    for s in specs:
        it = eval_items(s, 1)[0]
        if it["images"] and lm.is_vlm:
            batch, _, _ = encode(lm, [it], "plain")
            out[task_name(s)] = int(batch["mm_token_type_ids"].sum())
    return out


# ----------------------------------------------------------------------------- 5. sampling and log-probs

def mask_forbidden(logits, forbidden):
    """Logits with the never-sampled tokens at -inf; used by the sampler and by the loss alike."""
    if forbidden:
        logits = logits.clone()
        logits[..., forbidden] = float("-inf")
    return logits


class _Forbid:  # a transformers LogitsProcessor: the loss's mask, and the stop on NaN logits
    def __init__(self, forbidden):
        self.forbidden = forbidden

    def __call__(self, input_ids, scores):
        if torch.isnan(scores).any() or torch.isposinf(scores).any():
            raise Diverged("the model's logits are NaN or infinite while sampling (the last update broke the weights)")
        return mask_forbidden(scores, self.forbidden)


@torch.no_grad()
def generate(lm, items, fmt, max_new_tokens, temperature=1.0, greedy=False, device="cpu"):
    """Sample one completion per item. Returns (list of token-id lists ending at EOS or truncated, truncated flags).
    Under FSDP all ranks must run the same number of forwards: synced_gpus keeps finished ranks stepping."""
    from transformers import LogitsProcessorList
    batch, prompt_len, _ = encode(lm, items, fmt)
    batch = to_device(batch, device)
    was_training = lm.model.training
    lm.model.eval()
    # plain softmax sampling at `temperature` (what token_logprobs computes); the model's generation_config is
    # the neutral one Bundle installs, so no repetition penalty or top-k of the checkpoint slips in
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    with autocast(device):
        out = lm.model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=lm.eos_id,
                                pad_token_id=lm.pad_id, logits_processor=LogitsProcessorList([_Forbid(lm.forbidden)]),
                                synced_gpus=is_dist(), use_cache=True, **kw)
    lm.model.train(was_training)
    if is_dist():
        lm.model.reshard()  # no backward follows to reshard the root; never leave gathered weights to go stale
    comps, truncated = [], []
    for row in out[:, prompt_len:].tolist():
        if lm.eos_id in row:
            comps.append(row[:row.index(lm.eos_id) + 1])
            truncated.append(False)
        else:
            comps.append(row)
            truncated.append(True)
    return comps, truncated


def token_logprobs(lm, items, fmt, completions, device, temperature=1.0):
    """log pi(token) of every completion token under the current model: [B, Lc], with the completion mask.
    Only the completion positions go through the LM head (logits_to_keep), which keeps real-vocab memory small."""
    batch, prompt_len, comp_mask = encode(lm, items, fmt, completions)
    batch = to_device(batch, device)
    comp_len = comp_mask.shape[1]
    with autocast(device):
        logits = lm.model(**batch, logits_to_keep=comp_len + 1, use_cache=False).logits[:, :-1].float()
    logits = mask_forbidden(logits, lm.forbidden) / temperature
    targets = batch["input_ids"][:, prompt_len:]
    logp = torch.gather(F.log_softmax(logits, -1), 2, targets.unsqueeze(-1)).squeeze(-1)
    comp_mask = comp_mask.to(device)
    # padding targets are forbidden tokens (log p = -inf): zero them, since -inf * 0 would be NaN
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
        comps, trunc = generate(lm, [it for it in chunk for _ in range(k)], fmt, max_new_tokens, temperature,
                                device=device)
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


# ----------------------------------------------------------------------------- 6. the reward-variance filter

REWARD_TOL = 1e-6  # rewards closer than this are equal: 0.9*1 + 0.1*1 is not exactly 1.0 in floats


def zero_variance(rewards, tol=REWARD_TOL):
    """True when all K rewards are equal within tol: the group's rewards cannot rank its samples."""
    return max(rewards) - min(rewards) <= tol


def pass_rate(correct):
    """Fraction of the K rollouts that are entirely correct."""
    return sum(bool(c) for c in correct) / len(correct)


def keep(mode, rewards, correct, low=0.0, high=1.0, tol=REWARD_TOL):
    """Whether an instance with these K rollouts is kept under a filter mode:
      incompetent     drop instances whose K rollouts are all wrong (pass rate 0)
      zero_variance   drop every instance whose K rewards are equal (all wrong or all right): no GRPO gradient
      pass_rate       keep low < pass rate < high (open-r1's offline filter)"""
    if mode == "none":
        return True
    if mode == "incompetent":
        return pass_rate(correct) > 0
    if mode == "zero_variance":
        return not zero_variance(rewards, tol)
    if mode == "pass_rate":
        return low + tol < pass_rate(correct) < high - tol
    raise ValueError(f"unknown filter mode {mode!r}")


def pass_count_histogram(correct_counts, k):
    """How many instances had 0, 1, ..., K correct rollouts (K + 1 bins: 7/8 and 8/8 are different instances)."""
    counts = [0] * (k + 1)
    for c in correct_counts:
        counts[c] += 1
    return counts


def filter_items(lm, items, mode, fmt, k, temperature, max_new_tokens, device, gen_batch=256, low=0.0, high=1.0):
    """Roll out this rank's items K times; return (a keep flag per item, stats summed over ranks, the rollout
    table)."""
    t0 = time.time()
    table = rollout(lm, items, fmt, k, temperature, max_new_tokens, device, gen_batch)
    flags = [keep(mode, row["rewards"], [s.correct for s in row["scores"]], low, high) for row in table]
    n_correct = [sum(s.correct for s in row["scores"]) for row in table]
    tokens = sum(len(c) for row in table for c in row["completions"])
    n, n_kept, tokens, *hist = all_sum([len(items), sum(flags), tokens] + pass_count_histogram(n_correct, k), device)
    stats = {"mode": mode, "k": k, "instances": int(n), "kept": int(n_kept), "kept_fraction": n_kept / n,
             "correct_rollouts_histogram": [int(h) for h in hist], "rollout_tokens": int(tokens),
             "rollout_seconds": round(time.time() - t0, 2)}
    return flags, stats, table


# ----------------------------------------------------------------------------- 7. evaluation

_EVAL_CACHE = {}


def eval_items(spec, n, split="test"):
    if (spec, n, split) not in _EVAL_CACHE:
        _EVAL_CACHE[(spec, n, split)] = load_split(spec, split, n)
    return _EVAL_CACHE[(spec, n, split)]


def max_tokens(fmt, plain=16):
    """Greedy evaluation's completion budget: a bare answer is short; free text and reasoning are not."""
    return {"plain": plain, "free": 24}.get(fmt, 512)


@torch.no_grad()
def evaluate_task(lm, items, fmt, device, batch_size=256, desc=None):
    """Greedy accuracy (and mean reward) on a list of items; items are split over ranks, counts summed."""
    correct = rew = 0.0
    chunks = list(equal_chunks(items[rank()::world()], batch_size, device, items[0]))  # a list: tqdm shows the total
    for chunk, real in tqdm(chunks, desc=desc, disable=rank() != 0 or desc is None, leave=False):
        comps, _ = generate(lm, chunk, fmt, max_tokens(fmt), greedy=True, device=device)
        for it, c in zip(chunk if real else [], comps):
            s = score_item(decode(lm, c), it, fmt)
            correct += s.correct
            rew += s.reward
    correct, rew = all_sum([correct, rew], device)
    return correct / len(items), rew / len(items)


def evaluate_all(lm, specs, fmt, device, n, batch_size=256, split="test"):
    """{task name: accuracy} over task specs (n items each of the test split, or of val when tuning; n may be a
    {spec: count} dict)."""
    acc = {}
    for spec in specs:
        items = eval_items(spec, n[spec] if isinstance(n, dict) else n, split)
        if not lm.is_vlm and any(it["images"] for it in items):
            acc[task_name(spec)] = None  # an image task cannot be asked of a text-only model
            continue
        acc[task_name(spec)], _ = evaluate_task(lm, items, fmt, device, batch_size, desc=f"eval {task_name(spec)}")
    return acc


def eval_counts(args):
    """{spec: evaluation items}: --eval_n for the CPT tasks, --general_n (default: the same) for the general ones."""
    return {**{t: args.eval_n for t in args.tasks}, **{g: args.general_n or args.eval_n for g in args.general}}


# ----------------------------------------------------------------------------- 7b. distance from the base, knowledge held
# Forgetting follows how far training pulls the model's outputs from the base's own on the new task's inputs (the
# forward KL, RL's Razor): measured after every stage, next to a continuous reading of the general tasks.

@torch.no_grad()
def sequence_logprobs(lm, pairs, fmt, device, filler, batch_size=64):
    """log pi(completion | prompt), summed over the completion, of this rank's (item, completion ids) pairs; every
    rank runs the same forwards (`filler`: the stand-in pair of a rank that has run out)."""
    out = []
    for chunk, real in equal_chunks(pairs, batch_size, device, filler):
        logp, mask = token_logprobs(lm, [it for it, _ in chunk], fmt, [c for _, c in chunk], device)
        out += (logp * mask).sum(1).tolist() if real else []
    return out


def kl_estimate(base_logp, now_logp):
    """Monte-Carlo forward KL(pi_base || pi) in nats per prompt: the mean over completions sampled from the base of
    log pi_base(y|x) - log pi(y|x). Unbiased over whole completions (any length); 0 for the base itself."""
    return sum(b - n for b, n in zip(base_logp, now_logp)) / len(base_logp)


def sample_base(lm, items, fmt, n_samples, max_new_tokens, device, batch_size=256):
    """n_samples completions per item (this rank's share) from the model as it is (the base), at temperature 1,
    with their summed log-probs: the reference that kl_to_base compares every later model with."""
    mine = items[rank()::world()]
    table = rollout(lm, mine, fmt, n_samples, 1.0, max_new_tokens, device, batch_size) if mine else []
    pairs = [(i, c) for i, row in zip(range(rank(), len(items), world()), table) for c in row["completions"]]
    logps = sequence_logprobs(lm, [(items[i], c) for i, c in pairs], fmt, device, (items[0], [lm.eos_id]))
    return [[i, c, lp] for (i, c), lp in zip(pairs, logps)]


def kl_to_base(lm, items, samples, fmt, device):
    """The forward KL from the base to the current model on `items`, estimated on the base's own samples (summed
    over ranks)."""
    now = sequence_logprobs(lm, [(items[i], c) for i, c, _ in samples], fmt, device, (items[0], [lm.eos_id]))
    total, n = all_sum([sum(lp - x for (_, _, lp), x in zip(samples, now)), len(samples)], device)
    return total / n if n else None


@torch.no_grad()
def gold_loglik(lm, items, fmt, device, batch_size=64):
    """Mean log-likelihood (nats per item) of the gold answers as SFT would write them: a continuous reading of a
    skill, which moves before greedy accuracy flips."""
    pairs = [(it, target_ids(lm, it["answer"], fmt)) for it in items[rank()::world()]]
    logps = sequence_logprobs(lm, pairs, fmt, device, (items[0], [lm.eos_id]), batch_size)
    total, n = all_sum([sum(logps), len(logps)], device)
    return total / n


# ----------------------------------------------------------------------------- 8. FSDP2 and checkpoints

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
    # transformers' generate() encodes images before the first forward, by calling the vision tower directly:
    # as its own FSDP unit, the tower gathers its remaining weights (patch embedding, merger) on that call too
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
    # FSDP2 picks its root on the first forward; make it the whole model's, before generate() calls the tower alone
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    model.reshard()  # the root keeps its weights gathered after a forward; stale copies would outlive opt.step()


def full_state_dict(model):
    """The whole model's weights on CPU (gathered from all ranks under FSDP; rank 0 gets them)."""
    if not is_dist():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(lm, path):
    """A folder that from_pretrained loads back, written to a temporary name and renamed (never half-written).
    It carries the checkpoint's own generation_config, not the neutral one sampling uses."""
    sd = full_state_dict(lm.model)
    if rank() == 0:
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        neutral, lm.model.generation_config = lm.model.generation_config, lm.saved_generation_config
        try:
            lm.model.save_pretrained(tmp, state_dict=sd)
        finally:
            lm.model.generation_config = neutral
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


# ----------------------------------------------------------------------------- 9. the continual post-training loop

def add_common_args(p, steps, micro_batch, lr, lr_note, batch_size=16):
    """Flags both training scripts share, grouped by topic; the defaults that differ are the script's."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL, help="HF checkpoint folder or .gguf file (default: the tiny base)")
    g.add_argument("--tasks", nargs="+", default=DEFAULT_SEQUENCE, help="CPT sequence: built-in names or JSONL files")
    g.add_argument("--general", nargs="*", default=DEFAULT_GENERAL, help="held-out tasks evaluated after every stage")
    g.add_argument("--multitask", action="store_true", help="train once on the union of --tasks (the upper bound)")
    g.add_argument("--format", default="plain", choices=FORMATS, help="answer format (free: read from free text)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run directory (default: runs/<script>)")
    g.add_argument("--seed", type=int, default=0, help="seed of data order and sampling")
    g.add_argument("--eval_n", type=int, default=500, help="test items per CPT task")
    g.add_argument("--general_n", type=int, default=None, help="test items per general task (default: --eval_n)")
    g.add_argument("--eval_split", default="test", choices=["test", "val"], help="val: for tuning settings")
    g.add_argument("--eval_batch", type=int, default=128, help="evaluation batch size (128: fastest per item on a CPU core)")
    g.add_argument("--keep_stages", action="store_true", help="keep every stage's checkpoint, not only the last")
    g.add_argument("--kl_n", type=int, default=100, help="items per task for the continuous readings: KL to the base "
                                                          "(CPT tasks), gold log-likelihood (general tasks); 0: off")
    g.add_argument("--kl_samples", type=int, default=4, help="base samples per prompt for the KL estimate")
    g = p.add_argument_group("optimisation (per stage)")
    g.add_argument("--steps", type=int, default=steps, help="optimizer steps per stage (x tasks with --multitask)")
    g.add_argument("--batch_size", type=int, default=batch_size, help="items (SFT) or prompts (GRPO) per step, global")
    g.add_argument("--micro_batch", type=int, default=micro_batch, help="sequences per forward pass on one rank")
    g.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate ({lr_note})")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--grad_clip", type=float, default=1.0, help="gradient norm clip")
    g = p.add_argument_group("memory (real models)")
    g.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing in the decoder and vision blocks")
    g.add_argument("--min_pixels", type=int, default=None, help="image processor's min pixels (image tokens grow "
                                                                "with pixels / 784)")
    g.add_argument("--max_pixels", type=int, default=None, help="image processor's max pixels")
    return p


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
    if not (math.isfinite(args.lr) and args.lr > 0):
        errors.append(f"--lr {args.lr}: must be a positive number")
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
        vlm = is_vlm_config(model_config(args.model))
    except (OSError, ValueError) as e:
        return errors + [str(e)]
    with_images = set()
    for spec in list(args.tasks) + list(args.general):
        try:
            for split in ("train", "val", "test"):
                items = load_split(spec, split, 1 if spec in BUILTIN else None)
                if not vlm and spec in args.tasks and any(it["images"] for it in items):
                    raise DataError(f"{items[0].get('where', spec)}: has images but {args.model} is a text-only model")
                with_images |= {(spec, bool(it["images"])) for it in items}
        except DataError as e:
            errors.append(str(e))
    # under FSDP every rank runs the same units: a rank training on text while another trains on images would run
    # the vision tower alone and hang; a training stage must be all-image or all-text (evaluation goes task by task)
    stages = [list(args.tasks)] if args.multitask else [[t] for t in args.tasks]
    for stage in stages:
        kinds = {has for spec, has in with_images if spec in stage}
        if w > 1 and vlm and len(kinds) > 1:
            errors.append(f"under torchrun a training stage cannot mix image and text-only items ({', '.join(stage)})")
    return errors


def refuse(errors):
    """Stop before any work with every problem listed (exit status 2, as argparse's own errors)."""
    if errors:
        raise SystemExit("error: cannot start:\n  " + "\n  ".join(errors))


def run_cpt(args, script, train_stage):
    """The sequential training-and-evaluation loop.

    Row "base" is the starting model; then for each task in --tasks (or once, on all of them, with --multitask)
    train_stage(lm, specs, stage, log) trains the model in place, everything is evaluated again, the model is saved
    to OUT/stage-K and the new row is appended to OUT/results.json. Rerunning the same command resumes after the
    last stage that results.json records. A stage that diverges stops the run; the finished stages stay."""
    out = args.out or os.path.join("runs", script)
    stages = [("multitask", list(args.tasks))] if args.multitask else [(task_name(t), [t]) for t in args.tasks]
    columns = [task_name(t) for t in args.tasks] + [task_name(g) for g in args.general]
    config = {k: v for k, v in sorted(vars(args).items())
              if k not in ("out", "eval_batch", "keep_stages", "grad_ckpt", "micro_batch", "gen_batch")}
    config.update(script=script)
    res_path = os.path.join(out, "results.json")
    res = {"columns": columns, "rows": [], "acc": [], "config": config, "stage_seconds": []}
    if os.path.exists(res_path):
        with open(res_path) as f:
            old = json.load(f)
        differ = sorted(k for k in set(old["config"]) | set(config) if k != "world" and
                        old["config"].get(k) != config.get(k))
        if differ:
            raise SystemExit(f"error: {res_path} was written by a different command; it differs in " + "; ".join(
                f"--{k}: {old['config'].get(k)!r} there, {config.get(k)!r} now" for k in differ) +
                ". Use another --out, or delete the folder to start again")
        res = old
    rank_, world_, device = init_dist()
    config["world"] = world_
    done = max(len(res["rows"]) - 1, 0)
    start = os.path.join(out, f"stage-{done}") if done else args.model
    print0(f"{script}: {len(stages)} stage(s) on {', '.join(columns)}; world size {world_}; device {device}; "
           f"{'resuming after stage ' + str(done) + ' from ' + start if done else 'starting from ' + args.model}")
    lm = load_model(start, device, grad_ckpt=args.grad_ckpt)
    configure(lm, args.min_pixels, args.max_pixels)
    specs = list(args.tasks) + list(args.general)
    if lm.is_vlm:
        print0("image tokens per sample: " + ", ".join(f"{k} {v}" for k, v in image_tokens(lm, specs).items()))
    kl_items = {t: eval_items(t, args.eval_n, args.eval_split)[:args.kl_n] for t in args.tasks}
    kl_items = {t: v for t, v in kl_items.items() if v and (lm.is_vlm or not any(it["images"] for it in v))}
    samples_path = os.path.join(out, f"base-samples-rank{rank_}.json")
    samples = None
    if not res["rows"]:
        seed_all(args.seed, "eval")
        acc = cached_base("row", args.model, args, str(device), lambda: evaluate_all(
            lm, specs, args.format, device, eval_counts(args), args.eval_batch, args.eval_split), specs=specs)
        res["rows"].append("base")
        res["acc"].append([acc[c] for c in columns])

        def draw_samples():
            seed_all(args.seed, "kl")
            return {t: sample_base(lm, v, args.format, args.kl_samples, max_tokens(args.format), device)
                    for t, v in kl_items.items()}
        samples = cached_base("kl-samples", args.model, args, str(device), draw_samples, per_rank=True,
                              tasks=sorted(kl_items), kl_n=args.kl_n, kl_samples=args.kl_samples, seed=args.seed)
        res["kl_to_base"] = [[0.0 if t in kl_items else None for t in args.tasks]]
        res["general_ll"] = [cached_base("general-ll", args.model, args, str(device),
                                         lambda: general_loglik(lm, args, device), general=list(args.general),
                                         kl_n=args.kl_n)]
        print0(format_row("base", acc, columns))
    elif os.path.exists(samples_path):
        with open(samples_path) as f:
            samples = json.load(f)
    if rank_ == 0:  # the folder appears only once there is something to keep in it
        os.makedirs(out, exist_ok=True)
        write_json(res_path, res)
    if is_dist():
        dist.barrier()
    if samples is not None and not os.path.exists(samples_path):
        write_json(samples_path, samples)
    log = Log(os.path.join(out, "log.jsonl"))
    if rank_ == 0:  # keep only the finished stages' lines: a killed stage is rerun from its start
        keep_lines = [x for x in open(log.path)] if os.path.exists(log.path) and done else []
        with open(log.path, "w") as f:
            f.writelines(x for x in keep_lines if json.loads(x).get("stage", 0) <= done)
    for k, (name, stage_specs) in enumerate(stages, 1):
        if k <= done:
            continue
        t0 = time.time()
        seed_all(args.seed, k, name)
        try:
            train_stage(lm, stage_specs, k, log)
        except Diverged as e:
            step = log.last.get("step") if log.last.get("stage") == k else None
            raise SystemExit(
                f"error: stage {k} ({name}) diverged {'after step ' + str(step) if step is not None else 'in its first step'}"
                f": {e}. The likely cause is a learning rate too high for this model (--lr {args.lr}). "
                f"{res_path} keeps the {k - 1} finished stage(s)" + (f" and {os.path.join(out, f'stage-{k - 1}')}"
                                                                     if k > 1 else "") +
                "; rerun with a smaller --lr in a new --out.") from None
        train_s = time.time() - t0
        seed_all(args.seed, "eval")
        acc = evaluate_all(lm, specs, args.format, device, eval_counts(args), args.eval_batch, args.eval_split)
        save_checkpoint(lm, os.path.join(out, f"stage-{k}"))
        lm.path = os.path.join(out, f"stage-{k}")
        res["rows"].append(name)
        res["acc"].append([acc[c] for c in columns])
        res["stage_seconds"].append(round(train_s, 2))
        if samples is not None and "kl_to_base" in res:
            res["kl_to_base"].append([round(kl_to_base(lm, kl_items[t], samples[t], args.format, device), 6)
                                      if t in samples else None for t in args.tasks])
            res["general_ll"].append(general_loglik(lm, args, device))
        if rank_ == 0:
            write_json(res_path, res)
            if not args.keep_stages and k > 1:
                shutil.rmtree(os.path.join(out, f"stage-{k - 1}"), ignore_errors=True)
        print0(format_row(name, acc, columns) + f"   (trained {train_s:.1f} s, {peak_memory(device)})")
    print0(f"results: {res_path}")
    # free the sharded model while its process group still exists: left to interpreter teardown, a gloo rank
    # sometimes aborted at exit ("terminate called without an active exception")
    lm.model = None
    gc.collect()
    cleanup()
    return res


def general_loglik(lm, args, device):
    """[mean gold log-likelihood of each general task over its first --kl_n items] (None for an image task on a
    text-only model, or with --kl_n 0)."""
    out = []
    for spec in args.general:
        items = eval_items(spec, eval_counts(args)[spec], args.eval_split)[:args.kl_n]
        ok = items and (lm.is_vlm or not any(it["images"] for it in items))
        out.append(round(gold_loglik(lm, items, args.format, device), 5) if ok else None)
    return out


def cached_base(what, model, args, device, compute, per_rank=False, **setting):
    """What the starting model gives is the same in every run of a comparison that shares these settings: the
    greedy base row ("row"), its KL reference samples (drawn with the run's seed, per rank), its general gold
    log-likelihoods. Compute each once per (model files, items, format, split, world, device, library versions,
    and `setting`) and keep it in CACHE_DIR."""
    import transformers
    folder, gguf = split_model_path(model)
    names = [gguf] if gguf else os.listdir(folder)
    files = sorted((f, os.path.getsize(os.path.join(folder, f)), os.path.getmtime(os.path.join(folder, f)))
                   for f in names)
    key = hashlib.sha256(repr((what, os.path.abspath(model), files, eval_counts(args), args.format, args.eval_split,
                               world(), rank() if per_rank else 0, torch.device(device).type,
                               str(torch.get_default_dtype()), torch.__version__, transformers.__version__,
                               sorted(setting.items()))).encode()).hexdigest()[:16]
    path = os.path.join(CACHE_DIR, f"base-{what}-{key}.json")
    # every rank must take the same branch: computing runs collectives (a rank whose file survived a killed run
    # would otherwise wait forever for the others)
    if all_sum([0.0 if os.path.exists(path) else 1.0], device)[0] == 0:
        with open(path) as f:
            return json.load(f)
    value = compute()
    if per_rank or rank() == 0:
        os.makedirs(CACHE_DIR, exist_ok=True)
        write_json(path, value)
    return value


def format_row(name, acc, columns):
    cells = " ".join(f"{c}={'n/a' if acc[c] is None else f'{100 * acc[c]:.1f}%'}" for c in columns)
    return f"[{name}] {cells}"
