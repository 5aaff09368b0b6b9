"""The continual post-training loop: the tasks one after another, everything evaluated after every stage.

    (flags.py: every input checked) -> one run per --out -> load the model -> base row -> for each stage:
    train -> evaluate -> checkpoint -> results.json -> stop a run that broke

cpt_sft.py and cpt_rft.py each hand run_cpt a train_stage(lm, specs, stage, log) that trains the model in place;
everything else a run does is here, in the order it runs. Rerunning the same command resumes after the last
finished stage.
"""
import gc
import hashlib
import json
import os
import shutil
import time

import torch
import torch.distributed as dist

from data.tasks import task_name
from flags import eval_counts, refuse
from measure import eval_items, evaluate_all, general_loglik, kl_to_base, sample_base
from runtime import (ROOT, Diverged, Log, all_sum, cleanup, configure, encode, init_dist, is_dist, load_model,
                     model_config, peak_memory, print0, rank, reshard, save_checkpoint, seed_all, split_model_path,
                     text_config, world, write_json)

# the base row of a comparison is computed once and shared by its runs; keyed by everything that changes it
CACHE_DIR = os.environ.get("CPT_CACHE", os.path.join(ROOT, "runs", ".cache"))


# ----------------------------------------------------------------------------- the loop

def run_cpt(args, script, train_stage):
    """The sequential training-and-evaluation loop.

    Row "base" is the starting model; then for each task in --tasks (or once, on all of them, with --multitask)
    train_stage(lm, specs, stage, log) trains the model in place, everything is evaluated again, the model is saved
    to OUT/stage-K and the new row is appended to OUT/results.json. Rerunning the same command resumes after the
    last stage that results.json records. A stage that diverges stops the run; the finished stages stay."""
    out = args.out or os.path.join("runs", script)
    stages = [("multitask", list(args.tasks))] if args.multitask else [(task_name(t), [t]) for t in args.tasks]
    specs = list(args.tasks) + list(args.general)
    columns = [task_name(s) for s in specs]
    res_path = os.path.join(out, "results.json")
    res = read_or_start_results(res_path, columns, run_config(args, script))
    rank_, world_, device = init_dist()
    res["config"]["world"] = world_
    res["items"] = [len(eval_items(s, eval_counts(args)[s], args.eval_split)) for s in specs]  # per column
    lock = RunLock(out) if rank_ == 0 else None  # one run per --out: a second process is refused here
    try:
        done = max(len(res["rows"]) - 1, 0)
        start = os.path.join(out, f"stage-{done}") if done else args.model
        print0(f"{script}: {len(stages)} stage(s) on {', '.join(columns[:len(args.tasks)])}; general tasks "
               f"{', '.join(columns[len(args.tasks):]) or '-'}; world size {world_}; device {device}; "
               f"{'resuming after stage ' + str(done) + ' from ' + start if done else 'starting from ' + args.model}")
        if done:
            refuse(architecture_errors(start, args.model))
        lm = load_model(start, device, grad_ckpt=args.grad_ckpt)
        configure(lm, args.min_pixels, args.max_pixels)
        if lm.is_vlm:
            print0("image tokens per sample: " + ", ".join(f"{k} {v}" for k, v in image_tokens(lm, specs).items()))
        # the KL to the base on the CPT tasks' prompts and on the general tasks' (where damage the first misses shows)
        kl_items = {t: eval_items(t, eval_counts(args)[t], args.eval_split)[:args.kl_n] for t in specs}
        kl_items = {t: v for t, v in kl_items.items() if v and (lm.is_vlm or not any(it["images"] for it in v))}
        samples = base_row(lm, res, args, specs, kl_items, device) if not res["rows"] else None
        samples = keep_on_disk(out, res_path, res, samples, rank_)
        log = open_log(os.path.join(out, "log.jsonl"), done)
        for k, (name, stage_specs) in enumerate(stages, 1):
            if k > done:
                run_stage(lm, res, args, k, name, stage_specs, train_stage, log, specs, kl_items, samples, out,
                          device)
        print0(f"results: {res_path}")
    finally:
        if lock is not None:
            lock.release()
    # free the sharded model while its process group still exists: left to interpreter teardown, a gloo rank
    # sometimes aborted at exit ("terminate called without an active exception")
    lm.model = None
    gc.collect()
    cleanup()
    return res


def run_config(args, script):
    """The settings that make a run's numbers what they are (not where they go or how fast)."""
    config = {k: v for k, v in sorted(vars(args).items())
              if k not in ("out", "eval_batch", "keep_stages", "grad_ckpt", "micro_batch", "gen_batch")}
    return {**config, "script": script}


# settings added after runs had been recorded: a results.json without them was written with these values
LATER_SETTINGS = {"lora_rank": 0, "lora_alpha": None}


def with_later_settings(config):
    """A recorded config with the settings it predates filled in (so an old run still resumes, and groups with new
    runs of the same command)."""
    return {**LATER_SETTINGS, **config}


def read_or_start_results(res_path, columns, config):
    """An existing results.json of the same command (to resume), or a fresh one; another command's is refused."""
    if not os.path.exists(res_path):
        return {"columns": columns, "rows": [], "acc": [], "truncated": [], "config": config, "stage_seconds": []}
    try:
        with open(res_path) as f:
            old = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {res_path} cannot be read ({e}); delete it (or the folder) to start again") from None
    old["config"] = with_later_settings(old["config"])
    differ = sorted(k for k in set(old["config"]) | set(config) if k != "world" and
                    old["config"].get(k) != config.get(k))
    if differ:
        raise SystemExit(f"error: {res_path} was written by a different command; it differs in " + "; ".join(
            f"--{k}: {old['config'].get(k)!r} there, {config.get(k)!r} now" for k in differ) +
            ". Use another --out, or delete the folder to start again")
    return old


class RunLock:
    """OUT/.lock holds the pid of the run writing to OUT. A second live run on the same --out is refused; the lock
    of a process that no longer exists (killed) is taken over."""

    def __init__(self, out):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, ".lock")
        self.made_folder = not os.listdir(out)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = _lock_owner(self.path)
                if owner is not None and owner != os.getpid() and _alive(owner):
                    raise SystemExit(f"error: another run (pid {owner}) is writing to {out}; wait for it to finish, "
                                     f"or use another --out") from None
                os.remove(self.path)  # a stale lock: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return
        raise SystemExit(f"error: cannot take the lock {self.path}; delete it if no run is using {out}")

    def release(self):
        if os.path.exists(self.path) and _lock_owner(self.path) == os.getpid():
            os.remove(self.path)
        out = os.path.dirname(self.path)
        if self.made_folder and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)  # a run that stopped before writing anything leaves no empty folder behind


def _lock_owner(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def architecture_errors(checkpoint, model):
    """A stage checkpoint a run resumes from must be the same kind of model as --model (the matrix would otherwise
    mix two models)."""
    a, b = model_config(checkpoint), model_config(model)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    differ = [k for k in keys if text_config(a).get(k) != text_config(b).get(k)]
    if differ:
        return [f"{checkpoint} is not a checkpoint of --model {model} (" + ", ".join(
            f"{k}: {text_config(a).get(k)} there, {text_config(b).get(k)} in --model" for k in differ) +
            "); use another --out, or delete the folder to start again"]
    return []


def base_row(lm, res, args, specs, kl_items, device):
    """Row 0: the starting model's accuracy on every task, its samples for the KL, its general log-likelihood.
    Each is the same in every run of a comparison that shares its settings, so each is computed once (cached)."""
    seed_all(args.seed, "eval")
    row = cached_base("row", args.model, args, str(device), lambda: evaluate_row(lm, args, specs, device),
                      specs=specs, eval_tokens=args.eval_max_new_tokens)
    record_row(res, "base", row, args)

    def draw_samples():
        seed_all(args.seed, "kl")
        return {t: sample_base(lm, v, args.format, args.kl_samples, args.eval_max_new_tokens, device)
                for t, v in kl_items.items()}
    samples = cached_base("kl-samples", args.model, args, str(device), draw_samples, per_rank=True,
                          tasks=sorted(kl_items), kl_n=args.kl_n, kl_samples=args.kl_samples, seed=args.seed,
                          eval_tokens=args.eval_max_new_tokens)
    res["kl_to_base"] = [[0.0 if t in kl_items else None for t in args.tasks]]
    res["kl_to_base_general"] = [[0.0 if g in kl_items else None for g in args.general]]
    res["general_ll"] = [cached_base("general-ll", args.model, args, str(device),
                                     lambda: general_loglik(lm, general_items(args), args.format, device),
                                     general=list(args.general), kl_n=args.kl_n)]
    return samples


def evaluate_row(lm, args, specs, device):
    acc, truncated = evaluate_all(lm, specs, args.format, device, eval_counts(args), args.eval_max_new_tokens,
                                  args.eval_batch, args.eval_split)
    return {"acc": acc, "truncated": truncated}


def general_items(args):
    """The general tasks' items for the gold log-likelihood: the first --kl_n of each task's evaluation items."""
    return [eval_items(g, eval_counts(args)[g], args.eval_split)[:args.kl_n] for g in args.general]


TRUNCATION_WARN = 0.10  # a reply cut at the budget scores as wrong: above this share the accuracy misleads


def record_row(res, name, row, args):
    """Append a row of the accuracy matrix (and its truncated shares) and say it, with a warning where more than
    TRUNCATION_WARN of the replies hit the token budget."""
    columns = res["columns"]
    res["rows"].append(name)
    res["acc"].append([row["acc"][c] for c in columns])
    res.setdefault("truncated", []).append([row["truncated"].get(c) for c in columns])
    print0(format_row(name, row["acc"], columns))
    cut = {c: t for c, t in row["truncated"].items() if t is not None and t > TRUNCATION_WARN}
    if cut:
        print0(f"warning: [{name}] replies cut at the {args.eval_max_new_tokens}-token budget: " +
               ", ".join(f"{c} {100 * t:.0f}%" for c, t in cut.items()) +
               "; a cut reply usually scores as wrong: raise --eval_max_new_tokens")


def keep_on_disk(out, res_path, res, samples, rank_):
    """results.json now (the base row), and this rank's KL reference samples (read back when resuming)."""
    samples_path = os.path.join(out, f"base-samples-rank{rank_}.json")
    if samples is None and os.path.exists(samples_path):
        with open(samples_path) as f:
            samples = json.load(f)
    if rank_ == 0:
        write_json(res_path, res)
    if is_dist():
        dist.barrier()
    if samples is not None and not os.path.exists(samples_path):
        write_json(samples_path, samples)
    return samples


def open_log(path, done):
    """The per-step log; only the finished stages' lines are kept: a killed stage is rerun from its start."""
    if rank() == 0:
        keep = [x for x in open(path)] if os.path.exists(path) and done else []
        with open(path, "w") as f:
            f.writelines(x for x in keep if json.loads(x).get("stage", 0) <= done)
    return Log(path)


def run_stage(lm, res, args, k, name, stage_specs, train_stage, log, specs, kl_items, samples, out, device):
    """Train stage k, evaluate everything, save the checkpoint, append the row; stop a run that broke."""
    if args.lora_rank:  # fresh adapters on the stage's start weights (lora.py: why one adapter per stage)
        lm.model = None
        lm.model = load_model(lm.path, device, grad_ckpt=args.grad_ckpt, lora_rank=args.lora_rank,
                              lora_alpha=args.lora_alpha, lora_seed=seed_all(args.seed, k, "lora")).model
    t0 = time.time()
    seed_all(args.seed, k, name)
    first_line = len(log.rows)
    reshard(lm)  # the evaluation passes leave the root gathered: the stage's optimizer must see the shards
    try:
        train_stage(lm, stage_specs, k, log)
    except Diverged as e:
        step = log.last.get("step") if log.last.get("stage") == k else None
        raise SystemExit(
            f"error: stage {k} ({name}) diverged {'after step ' + str(step) if step is not None else 'in its first step'}"
            f": {e}. The likely cause is a learning rate too high for this model (--lr {args.lr}). "
            f"{os.path.join(out, 'results.json')} keeps the {k - 1} finished stage(s)" +
            (f" and {os.path.join(out, f'stage-{k - 1}')}" if k > 1 else "") +
            "; rerun with a smaller --lr in a new --out.") from None
    train_s = time.time() - t0
    stage_rows = [r for r in log.rows[first_line:] if r.get("stage") == k and "step" in r]
    if args.lora_rank:  # the adapters merged into plain weights, and those evaluated: the numbers are the checkpoint's
        save_checkpoint(lm, os.path.join(out, f"stage-{k}"))
        lm.model = None
        lm.model = load_model(os.path.join(out, f"stage-{k}"), device).model
    seed_all(args.seed, "eval")
    row = evaluate_row(lm, args, specs, device)
    if not args.lora_rank:
        save_checkpoint(lm, os.path.join(out, f"stage-{k}"))
    lm.path = os.path.join(out, f"stage-{k}")
    record_row(res, name, row, args)
    res["stage_seconds"].append(round(train_s, 2))
    if samples is not None and "kl_to_base" in res:
        def kl(t):  # None where the base's samples lack the task (an image task on a text model; an older run)
            return round(kl_to_base(lm, kl_items[t], samples[t], args.format, device), 6) \
                if t in samples and t in kl_items else None
        res["kl_to_base"].append([kl(t) for t in args.tasks])
        if "kl_to_base_general" in res:  # a run started before this reading was recorded has none
            res["kl_to_base_general"].append([kl(g) for g in args.general])
        res["general_ll"].append(general_loglik(lm, general_items(args), args.format, device))
    if rank() == 0:
        write_json(os.path.join(out, "results.json"), res)
        if not args.keep_stages and k > 1:
            shutil.rmtree(os.path.join(out, f"stage-{k - 1}"), ignore_errors=True)
    print0(f"  stage {k} trained in {train_s:.1f} s; {peak_memory(device)}")
    for line in stage_warnings(stage_rows):
        print0(f"warning: stage {k} ({name}): {line}")
    if collapsed(res["acc"][0], res["acc"][-1]):
        raise SystemExit(f"error: after stage {k} ({name}) every task reads 0 %, the base's tasks too: the model is "
                         f"broken (the likely cause: --lr {args.lr} too high for this model). "
                         f"{os.path.join(out, 'results.json')} keeps the rows so far; rerun with a smaller --lr in a "
                         f"new --out.")


# ----------------------------------------------------------------------------- a run that learns nothing, or breaks

LOSS_RISE = 2.0   # a stage's loss above twice its first value ...
LOSS_PATIENCE = 3  # ... on this many steps in a row is no noise: the run is moving away from its data


def collapsed(base_acc, acc):
    """Every task at 0 after a stage while the base solved some: a model that answers nothing any more. Certain
    enough to stop: no later stage can be read against such a row."""
    known = [(b, a) for b, a in zip(base_acc, acc) if a is not None and b is not None]
    return bool(known) and any(b > 0 for b, _ in known) and all(a == 0 for _, a in known)


def loss_rose(losses, factor=LOSS_RISE, patience=LOSS_PATIENCE):
    """The step at which a stage's loss had stayed above factor x its first value for `patience` steps in a row
    (None if never). A rising loss can still come back, so it is warned, not stopped."""
    run = 0
    for i, x in enumerate(losses[1:], 1):
        run = run + 1 if x > factor * losses[0] else 0
        if run >= patience:
            return i
    return None


def stage_warnings(rows):
    """What a user would be misled by in a stage's log rows: steps that trained nothing, a loss that rose."""
    out = []
    steps = [r for r in rows if "skipped_step" in r or "loss" in r]
    skipped = sum(bool(r.get("skipped_step")) for r in steps)
    if steps and skipped == len(steps):
        out.append(f"all {len(steps)} steps were skipped (no group's rewards differed, no sample was correct, or "
                   f"no reply stated an answer to restate): "
                   f"the stage trained nothing and its row is the previous model's")
    losses = [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]
    at = loss_rose(losses)
    if at is not None:
        out.append(f"the loss rose from {losses[0]:.3g} to {max(losses):.3g} nats per token (above {LOSS_RISE:g}x its "
                   f"start from step {at - LOSS_PATIENCE + 1}): a learning rate too high for this model?")
    return out


# ----------------------------------------------------------------------------- the base's values, computed once

def image_tokens(lm, specs):
    """{task: image tokens of its first test item}, the number that memory grows with."""
    out = {}
    for s in specs:
        it = eval_items(s, 1)[0]
        if it["images"] and lm.is_vlm:
            batch, _, _ = encode(lm, [it], "plain")
            out[task_name(s)] = int(batch["mm_token_type_ids"].sum())
    return out


def cached_base(what, model, args, device, compute, per_rank=False, **setting):
    """What the starting model gives is the same in every run of a comparison that shares these settings: the
    greedy base row ("row"), its KL reference samples (drawn with the run's seed, per rank), its general gold
    log-likelihoods. Compute each once per (model files, items, format, split, world, device, library versions,
    and `setting`) and keep it in CACHE_DIR, with a checksum: a file that is corrupt or was edited is named and
    computed again."""
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
    # every rank must take the same branch: computing runs collectives (a rank whose file survived a killed run,
    # or whose file is corrupt, would otherwise wait forever for the others)
    kept = read_cache(path)
    if all_sum([0.0 if kept is not None else 1.0], device)[0] == 0:
        return kept
    value = compute()
    if per_rank or rank() == 0:
        os.makedirs(CACHE_DIR, exist_ok=True)
        write_json(path, {"sha256": checksum(value), "value": value})
    return value


def checksum(value):
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def read_cache(path):
    """A cached value, or None when there is none or it cannot be trusted (then it is said, and recomputed)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            kept = json.load(f)
        if checksum(kept["value"]) == kept["sha256"]:
            return kept["value"]
        why = "its checksum does not match its contents"
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"it cannot be read ({type(e).__name__}: {e})"
    print(f"warning: the cache file {path} is not used: {why}; computing it again", flush=True)
    return None


def format_row(name, acc, columns):
    cells = " ".join(f"{c}={'n/a' if acc[c] is None else f'{100 * acc[c]:.1f}%'}" for c in columns)
    return f"[{name}] {cells}"
