"""What cpt_sft.py, cpt_rft.py, filter.py and evaluate.py share, written once.

In the order a run uses it:
  1. distributed set-up (torchrun or plain python), seeds, print0
  2. model loading: any Hugging Face folder; Qwen2-VL / Qwen2.5-VL through AutoModelForImageTextToText,
     text-only chat models through AutoModelForCausalLM
  3. prompt encoding: chat template, image tokens expanded, mm_token_type_ids (M-RoPE is off without them)
  4. sampling (generate) with the tokens that must never be sampled masked out, and per-token log-probs
     computed with the very same mask, so the loss and the sampler see one distribution
  5. evaluation (greedy) on task test splits
  6. FSDP2: fully_shard on every decoder / vision block, then the root; full-state-dict checkpoints by rank 0
  7. the continual post-training loop: base row, then train stage -> evaluate everything -> checkpoint -> results.json
"""
import datetime
import hashlib
import json
import os
import random
import shutil
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data.rewards import FORMAT_INSTRUCTIONS, score
from data.tasks import BUILTIN, DEFAULT_GENERAL, DEFAULT_SEQUENCE, load_split, open_image, task_name

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(ROOT, "data", "tiny-base")
IGNORE = -100


# ----------------------------------------------------------------------------- 1. distributed set-up

def init_dist():
    """(rank, world, device). Under torchrun: a process group (NCCL on GPU, gloo on CPU); else a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        cuda = torch.cuda.is_available()
        local = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_dist():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_dist() else 0


def world():
    return dist.get_world_size() if is_dist() else 1


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


def equal_chunks(seq, size, device, filler):
    """(chunk, real) for consecutive chunks of this rank's `seq`, as many on every rank: under FSDP all ranks must
    run the same forwards, so a rank that has run out gets ([filler], False), a pass whose output is thrown away."""
    for i in range(int(all_max(-(-len(seq) // size), device))):
        chunk = seq[i * size:(i + 1) * size]
        yield (chunk, True) if chunk else ([filler], False)


def all_sum(values, device):
    """Sum a list of floats over ranks (identity in a single process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_dist():
        dist.all_reduce(t)
    return t.tolist()


def seed_all(*parts):
    """Seed python and torch from any tuple (seed, stage, ...): the same parts give the same run."""
    s = int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16)
    random.seed(s)
    torch.manual_seed(s)
    return s


# ----------------------------------------------------------------------------- 2. model loading

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


def load_model(path, device, dtype=torch.float32):
    """Load any HF checkpoint folder. A config with a vision tower is a VLM (tokenizer + image processor);
    anything else is a text-only causal LM."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText, \
        AutoTokenizer
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path}: not a checkpoint folder (config.json, weights, tokenizer)")
    cfg = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.chat_template is None:
        raise ValueError(f"--model {path}: the tokenizer has no chat template; use a chat/instruct checkpoint")
    if getattr(cfg, "vision_config", None) is not None:
        # The Qwen2.5-VL processor class needs torchvision (for video) even for images, so the tokenizer and
        # image processor are composed here exactly as the processor does (see `encode`).
        improc = AutoImageProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    else:
        improc = None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    b = Bundle(model.to(device), tok, improc)
    b.path = path
    return b


# ----------------------------------------------------------------------------- 3. prompt encoding

def messages(item, fmt):
    """Chat messages of one item: EasyR1's "<image>" placeholders become image entries in the user turn."""
    content, parts = [], item["problem"].split("<image>")
    for i, text in enumerate(parts):
        if i:
            content.append({"type": "image"})
        if text:
            content.append({"type": "text", "text": text})
    content.append({"type": "text", "text": FORMAT_INSTRUCTIONS[fmt]}) if FORMAT_INSTRUCTIONS[fmt] else None
    return [{"role": "user", "content": content}]


def encode(b, items, fmt, completions=None):
    """Batch of prompts (left-padded) followed by optional completions (lists of token ids, right-padded).

    Returns model inputs plus `prompt_len` and `comp_mask` (1 on completion tokens). For a VLM each
    <|image_pad|> is repeated once per merged patch (grid_t*grid_h*grid_w / merge^2), and mm_token_type_ids
    marks those tokens with 1: transformers computes 3-D M-RoPE positions only when it is given."""
    texts, images = [], []
    for it in items:
        n_img = it["problem"].count("<image>")
        if n_img and not b.is_vlm:
            raise ValueError(f"{it.get('where', 'a task item')}: has images but the model is text-only")
        msgs = messages(it, fmt)
        if not b.is_vlm:  # text-only models take plain string content
            msgs = [{"role": m["role"], "content": "".join(c["text"] for c in m["content"])} for m in msgs]
        texts.append(b.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
        images += [(im, it.get("where", "?")) for im in it["images"]]
    out = {}
    if images:
        out = _pixels(b, images)
        merge = b.improc.merge_size ** 2
        counts = iter((out["image_grid_thw"].prod(-1) // merge).tolist())
        texts = [_expand_images(t, b.image_token, counts) for t in texts]
    prompts = [b.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    comps = completions if completions is not None else [[] for _ in prompts]
    lp, lc = max(map(len, prompts)), max(map(len, comps))
    ids = torch.full((len(prompts), lp + lc), b.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    comp_mask = torch.zeros((len(prompts), lc), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        ids[i, lp - len(p):lp] = torch.tensor(p)
        ids[i, lp:lp + len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, lp - len(p):lp + len(c)] = 1
        comp_mask[i, :len(c)] = 1
    out.update(input_ids=ids, attention_mask=mask)
    if b.is_vlm:
        out["mm_token_type_ids"] = (ids == b.model.config.image_token_id).long()
    return out, lp, comp_mask


def _pixels(b, images):
    """pixel_values and image_grid_thw of a list of (image entry, where) pairs. Each distinct entry is processed
    once: a GRPO batch repeats every prompt's image G times, and the image processor works per image anyway."""
    distinct = {}  # id(entry) -> (position among the distinct images, entry, where)
    for entry, where in images:
        distinct.setdefault(id(entry), (len(distinct), entry, where))
    vis = b.improc(images=[open_image(e, w) for _, e, w in distinct.values()], return_tensors="pt")
    grid = vis["image_grid_thw"]
    rows = vis["pixel_values"].split(grid.prod(-1).tolist())
    idx = [distinct[id(entry)][0] for entry, _ in images]
    return {"pixel_values": torch.cat([rows[i] for i in idx]), "image_grid_thw": grid[idx]}


def _expand_images(text, token, counts):
    pieces = text.split(token)
    return pieces[0] + "".join(token * next(counts) + p for p in pieces[1:])


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------- 4. sampling and log-probs

def mask_forbidden(logits, forbidden):
    """Logits with the never-sampled tokens at -inf; used by the sampler and by the loss alike."""
    if forbidden:
        logits = logits.clone()
        logits[..., forbidden] = float("-inf")
    return logits


class _Forbid:  # a transformers LogitsProcessor
    def __init__(self, forbidden):
        self.forbidden = forbidden

    def __call__(self, input_ids, scores):
        return mask_forbidden(scores, self.forbidden)


@torch.no_grad()
def generate(b, items, fmt, max_new_tokens, temperature=1.0, greedy=False, device="cpu"):
    """Sample one completion per item. Returns (list of token-id lists ending at EOS or truncated, truncated flags).
    Under FSDP all ranks must run the same number of forwards: synced_gpus keeps finished ranks stepping."""
    from transformers import LogitsProcessorList
    batch, lp, _ = encode(b, items, fmt)
    batch = to_device(batch, device)
    was_training = b.model.training
    b.model.eval()
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    with autocast(device):
        out = b.model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=b.eos_id, pad_token_id=b.pad_id,
                               logits_processor=LogitsProcessorList([_Forbid(b.forbidden)]),
                               synced_gpus=is_dist(), use_cache=True, **kw)
    b.model.train(was_training)
    if is_dist():
        b.model.reshard()  # no backward follows to reshard the root; never leave gathered weights to go stale
    comps, truncated = [], []
    for row in out[:, lp:].tolist():
        if b.eos_id in row:
            comps.append(row[:row.index(b.eos_id) + 1])
            truncated.append(False)
        else:
            comps.append(row)
            truncated.append(True)
    return comps, truncated


def token_logprobs(b, items, fmt, completions, device, temperature=1.0):
    """log pi(token) of every completion token under the current model: [B, Lc], with the completion mask.
    Only the completion positions go through the LM head (logits_to_keep), which keeps real-vocab memory small."""
    batch, lp, comp_mask = encode(b, items, fmt, completions)
    batch = to_device(batch, device)
    lc = comp_mask.shape[1]
    with autocast(device):
        logits = b.model(**batch, logits_to_keep=lc + 1, use_cache=False).logits[:, :-1].float()
    logits = mask_forbidden(logits, b.forbidden) / temperature
    targets = batch["input_ids"][:, lp:]
    logp = torch.gather(F.log_softmax(logits, -1), 2, targets.unsqueeze(-1)).squeeze(-1)
    comp_mask = comp_mask.to(device)
    # padding targets are forbidden tokens (log p = -inf): zero them, since -inf * 0 would be NaN
    return logp.masked_fill(comp_mask == 0, 0.0), comp_mask


def autocast(device):
    """bf16 autocast on GPU when FSDP's mixed precision is not doing it already; nothing on CPU."""
    on = torch.device(device).type == "cuda" and not is_dist()
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on)


def decode(b, ids):
    return b.tok.decode([i for i in ids if i != b.eos_id], skip_special_tokens=False)


def rollout(b, items, fmt, k, temperature, max_new_tokens, device, batch_size=256):
    """K sampled completions per item, scored by the item's verifier. One dict per item:
    completions (token ids), texts, scores (rewards.Score), rewards, truncated flags. Generation runs in chunks
    of whole groups; every rank runs the same number of chunks (FSDP), padding with a dummy chunk if needed."""
    assert items, "every rank needs at least one item to roll out"
    out = []
    for chunk, real in equal_chunks(items, max(1, batch_size // k), device, items[0]):
        comps, trunc = generate(b, [it for it in chunk for _ in range(k)], fmt, max_new_tokens, temperature,
                                device=device)
        for i, it in enumerate(chunk if real else []):
            cs, ts = comps[i * k:(i + 1) * k], trunc[i * k:(i + 1) * k]
            texts = [decode(b, x) for x in cs]
            scores = [score(t, it["answer"], it["kind"], fmt) for t in texts]
            out.append({"item": it, "completions": cs, "texts": texts, "scores": scores,
                        "rewards": [s.reward for s in scores], "truncated": ts})
    return out


# ----------------------------------------------------------------------------- 5. evaluation

_EVAL_CACHE = {}


def eval_items(spec, n, split="test"):
    if (spec, n, split) not in _EVAL_CACHE:
        _EVAL_CACHE[(spec, n, split)] = load_split(spec, split, n)
    return _EVAL_CACHE[(spec, n, split)]


def max_tokens(fmt, plain=16):
    return plain if fmt == "plain" else 512


@torch.no_grad()
def evaluate_task(b, items, fmt, device, batch_size=256, desc=None):
    """Greedy accuracy (and mean reward) on a list of items; items are split over ranks, counts summed."""
    correct = rew = 0.0
    chunks = list(equal_chunks(items[rank()::world()], batch_size, device, items[0]))  # a list: tqdm shows the total
    for chunk, real in tqdm(chunks, desc=desc, disable=rank() != 0 or desc is None, leave=False):
        comps, _ = generate(b, chunk, fmt, max_tokens(fmt), greedy=True, device=device)
        for it, c in zip(chunk if real else [], comps):
            s = score(decode(b, c), it["answer"], it["kind"], fmt)
            correct += s.correct
            rew += s.reward
    correct, rew = all_sum([correct, rew], device)
    return correct / len(items), rew / len(items)


def evaluate_all(b, specs, fmt, device, n, batch_size=256, split="test"):
    """{task name: accuracy} over task specs (n items each of the test split, or of val when tuning)."""
    acc = {}
    for spec in specs:
        items = eval_items(spec, n, split)
        if not b.is_vlm and any(it["images"] for it in items):
            acc[task_name(spec)] = None  # an image task cannot be asked of a text-only model
            continue
        acc[task_name(spec)], _ = evaluate_task(b, items, fmt, device, batch_size, desc=f"eval {task_name(spec)}")
    return acc


# ----------------------------------------------------------------------------- 6. FSDP2 and checkpoints

def shard_model(model, device):
    """FSDP2: fully_shard every transformer block (text decoder layers and vision blocks, named by the model's
    own _no_split_modules), then the root. On GPU params are bf16 for compute, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
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
    # FSDP2 picks its root on the first forward; make it the whole model's, before generate() calls the tower alone
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    model.reshard()  # the root keeps its weights gathered after a forward; stale copies would outlive opt.step()
    return model


def full_state_dict(model):
    """The whole model's weights on CPU (gathered from all ranks under FSDP; rank 0 gets them)."""
    if not is_dist():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(b, path):
    """A folder that from_pretrained loads back, written to a temporary name and renamed (never half-written)."""
    sd = full_state_dict(b.model)
    if rank() == 0:
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        b.model.save_pretrained(tmp, state_dict=sd)
        b.tok.save_pretrained(tmp)
        if b.improc is not None:
            b.improc.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    if is_dist():
        dist.barrier()


def write_json(path, obj):
    """Atomic write: a reader sees the old file or the new one, never a half-written one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class Log:
    """Per-step metrics as JSON lines (rank 0)."""

    def __init__(self, path):
        self.path = path

    def __call__(self, **row):
        if rank() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **row}) + "\n")


# ----------------------------------------------------------------------------- 7. the continual post-training loop

class Stream:
    """An endless, seeded stream of training items from one or more task specs (several = multi-task).
    Built-in tasks draw fresh items; JSONL tasks are shuffled and cycled."""

    def __init__(self, specs, seed, data=None):
        self.rng = random.Random(f"stream/{seed}/{specs}")
        self.specs = list(specs)
        self.cursor = {s: self.rng.randrange(10_000_000) if s in BUILTIN else 0 for s in self.specs}
        self.data = data or {s: None if s in BUILTIN else load_split(s, "train") for s in self.specs}
        for s, items in self.data.items():
            if items is not None:
                self.rng.shuffle(items)

    @classmethod
    def from_items(cls, items, seed):
        """A stream that cycles through a fixed list of items (e.g. the instances a filter kept)."""
        return cls(["pool"], seed, {"pool": list(items)})

    def next(self, n):
        out = []
        for _ in range(n):
            s = self.rng.choice(self.specs)
            if self.data[s] is None:
                out += load_split(s, "train", 1, self.cursor[s])
            else:
                out.append(self.data[s][self.cursor[s] % len(self.data[s])])
            self.cursor[s] += 1
        return out


def add_common_args(p, steps, micro_batch, lr, lr_note, batch_size=16):
    """Flags both training scripts share, grouped by topic; the defaults that differ are the script's."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL, help="HF checkpoint folder (default: the shipped tiny base)")
    g.add_argument("--tasks", nargs="+", default=DEFAULT_SEQUENCE, help="CPT sequence: built-in names or JSONL files")
    g.add_argument("--general", nargs="*", default=DEFAULT_GENERAL, help="held-out tasks evaluated after every stage")
    g.add_argument("--multitask", action="store_true", help="train once on the union of --tasks (the upper bound)")
    g.add_argument("--format", default="plain", choices=["plain", "boxed", "tags"], help="answer format")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run directory (default: runs/<script>)")
    g.add_argument("--seed", type=int, default=0, help="seed of data order and sampling")
    g.add_argument("--eval_n", type=int, default=500, help="test items per task")
    g.add_argument("--eval_split", default="test", choices=["test", "val"], help="val: for tuning settings")
    g.add_argument("--eval_batch", type=int, default=128, help="evaluation batch size (128: fastest per item on a CPU core)")
    g.add_argument("--keep_stages", action="store_true", help="keep every stage's checkpoint, not only the last")
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


def configure(b, args):
    """Apply the memory flags to a loaded bundle."""
    if getattr(args, "grad_ckpt", False):
        b.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if b.improc is not None and (getattr(args, "min_pixels", None) or getattr(args, "max_pixels", None)):
        size = dict(b.improc.size)
        size["shortest_edge"] = args.min_pixels or size["shortest_edge"]
        size["longest_edge"] = args.max_pixels or size["longest_edge"]
        b.improc.size = type(b.improc.size)(**size) if not isinstance(b.improc.size, dict) else size


def image_tokens(b, specs):
    """{task: image tokens of its first test item}, the number that memory grows with."""
    out = {}
    for s in specs:
        it = eval_items(s, 1)[0]
        if it["images"] and b.is_vlm:
            batch, _, _ = encode(b, [it], "plain")
            out[task_name(s)] = int(batch["mm_token_type_ids"].sum())
    return out


def peak_memory(device):
    """Peak memory so far: GPU allocator peak on CUDA, the process's max resident set on CPU (GiB)."""
    if torch.device(device).type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    import resource
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def run_cpt(args, script, train_stage):
    """The sequential training-and-evaluation loop.

    Row "base" is the starting model; then for each task in --tasks (or once, on all of them, with --multitask)
    train_stage(b, specs, stage, log) trains the model in place, everything is evaluated again, the model is saved
    to OUT/stage-K and the new row is appended to OUT/results.json. Rerunning the same command resumes after the
    last stage that results.json records."""
    rank_, world_, device = init_dist()
    out = args.out or os.path.join("runs", script)
    os.makedirs(out, exist_ok=True)
    stages = [("multitask", list(args.tasks))] if args.multitask else [(task_name(t), [t]) for t in args.tasks]
    columns = [task_name(t) for t in args.tasks] + [task_name(g) for g in args.general]
    config = {k: v for k, v in sorted(vars(args).items())
              if k not in ("out", "eval_batch", "keep_stages", "grad_ckpt", "micro_batch", "gen_batch")}
    config.update(script=script, world=world_)
    res_path = os.path.join(out, "results.json")
    res = {"columns": columns, "rows": [], "acc": [], "config": config, "stage_seconds": []}
    if os.path.exists(res_path):
        with open(res_path) as f:
            old = json.load(f)
        if {k: v for k, v in old["config"].items() if k != "world"} != {k: v for k, v in config.items() if k != "world"}:
            raise SystemExit(f"{res_path} was written by a different command; use another --out or delete it")
        res = old
    done = max(len(res["rows"]) - 1, 0)
    start = os.path.join(out, f"stage-{done}") if done else args.model
    print0(f"{script}: {len(stages)} stage(s) on {', '.join(columns)}; world size {world_}; device {device}; "
           f"{'resuming after stage ' + str(done) + ' from ' + start if done else 'starting from ' + args.model}")
    b = load_model(start, device)
    configure(b, args)
    specs = list(args.tasks) + list(args.general)
    if b.is_vlm:
        print0("image tokens per sample: " + ", ".join(f"{k} {v}" for k, v in image_tokens(b, specs).items()))
    if is_dist():
        shard_model(b.model, device)
    log = Log(os.path.join(out, "log.jsonl"))
    if rank_ == 0:  # keep only the finished stages' lines: a killed stage is rerun from its start
        keep = [x for x in open(log.path)] if os.path.exists(log.path) and done else []
        with open(log.path, "w") as f:
            f.writelines(x for x in keep if json.loads(x).get("stage", 0) <= done)
    if not res["rows"]:
        seed_all(args.seed, "eval")
        acc = cached_base_row(args.model, specs, args, lambda: evaluate_all(
            b, specs, args.format, device, args.eval_n, args.eval_batch, args.eval_split))
        res["rows"].append("base")
        res["acc"].append([acc[c] for c in columns])
        if rank_ == 0:
            write_json(res_path, res)
        print0(format_row("base", acc, columns))
    for k, (name, stage_specs) in enumerate(stages, 1):
        if k <= done:
            continue
        t0 = time.time()
        seed_all(args.seed, k, name)
        train_stage(b, stage_specs, k, log)
        train_s = time.time() - t0
        seed_all(args.seed, "eval")
        acc = evaluate_all(b, specs, args.format, device, args.eval_n, args.eval_batch, args.eval_split)
        save_checkpoint(b, os.path.join(out, f"stage-{k}"))
        b.path = os.path.join(out, f"stage-{k}")
        res["rows"].append(name)
        res["acc"].append([acc[c] for c in columns])
        res["stage_seconds"].append(round(train_s, 2))
        if rank_ == 0:
            write_json(res_path, res)
            if not args.keep_stages and k > 1:
                shutil.rmtree(os.path.join(out, f"stage-{k - 1}"), ignore_errors=True)
        print0(format_row(name, acc, columns) + f"   (trained {train_s:.1f} s, {peak_memory(device)})")
    print0(f"results: {res_path}")
    cleanup()
    return res


def cached_base_row(model, specs, args, compute):
    """The base row is a greedy (deterministic) evaluation of the same starting model in every run of a
    comparison: compute it once per (model files, tasks, n, format, split) and keep it in runs/.cache/."""
    files = sorted((f, os.path.getsize(os.path.join(model, f)), os.path.getmtime(os.path.join(model, f)))
                   for f in os.listdir(model))
    key = hashlib.sha256(repr((os.path.abspath(model), files, specs, args.eval_n, args.format,
                               args.eval_split, world())).encode()).hexdigest()[:16]
    path = os.path.join("runs", ".cache", f"base-{key}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    acc = compute()
    if rank() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json(path, acc)
    return acc


def format_row(name, acc, columns):
    cells = " ".join(f"{c}={'n/a' if acc[c] is None else f'{100 * acc[c]:.1f}%'}" for c in columns)
    return f"[{name}] {cells}"
