"""The continual post-training loop's services: everything a run does around training, in the order it runs.

    (flags.py: every input checked) -> Run: one run per --out, the model, the base row -> the script's own loop:
        for stage in run.pending_stages():   # seeded, the model resharded, the clock started
            ... the script trains run.lm here (cpt_sft.py: SFT steps; cpt_rft.py: GRPO steps) ...
            run.finish_stage(stage)          # evaluate every task, checkpoint, results.json, stop a broken run

The scripts call these services; nothing here calls back into a script. Rerunning the same command resumes after
the last finished stage; Ctrl-C, a full disk or a diverged stage end in one line that says what was kept.
"""
import gc
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from data.tasks import askable, task_name
from flags import refuse
from measure import eval_counts, eval_items, evaluate_all, general_loglik, kl_to_base, sample_base
from runtime import (ROOT, Diverged, Log, WriteFailed, all_sum, cleanup, configure, encode, init_dist, is_dist,
                     load_model, model_config, peak_memory, print0, rank, reshard, save_checkpoint, seed_all,
                     split_model_path, text_config, world, write_json)

# the base row of a comparison is computed once and shared by its runs; keyed by everything that changes it
CACHE_DIR = os.environ.get("CPT_CACHE", os.path.join(ROOT, "runs", ".cache"))


# ----------------------------------------------------------------------------- the run

@dataclass
class Stage:
    """Stage k (1-based) of a run: its name (a task, or "multitask") and the task specs it trains on."""
    k: int
    name: str
    specs: list


class Run:
    """One continual post-training run in OUT (default runs/<script>), used as `with Run(script, args) as run:`.

    Opening it takes OUT's lock (one run per folder), reads or starts OUT/results.json (a different command's is
    refused), loads the model (from the last finished stage when resuming) and computes row "base": the starting
    model's accuracy on every task, its samples for the KL, the general tasks' gold log-likelihood. The settings
    are read from the command's flags here, once; everything after takes plain values."""

    def __init__(self, script, args):
        self.out = args.out or os.path.join("runs", script)
        self.model_path, self.fmt, self.seed, self.lr = args.model, args.format, args.seed, args.lr
        self.tasks, self.general = list(args.tasks), list(args.general)
        self.specs = self.tasks + self.general
        self.stages = ([Stage(1, "multitask", self.tasks)] if args.multitask else
                       [Stage(k, task_name(t), [t]) for k, t in enumerate(self.tasks, 1)])
        self.counts, self.split = eval_counts(self.tasks, self.general, args.eval_n, args.general_n), args.eval_split
        self.eval_sets = {s: eval_items(s, self.counts[s], self.split) for s in self.specs}  # every row's items
        self.eval_tokens, self.eval_batch = args.eval_max_new_tokens, args.eval_batch
        self.kl_n, self.kl_samples, self.keep_stages = args.kl_n, args.kl_samples, args.keep_stages
        self.grad_ckpt, self.lora_rank, self.lora_alpha = args.grad_ckpt, args.lora_rank, args.lora_alpha
        self.res_path = os.path.join(self.out, "results.json")
        columns = [task_name(s) for s in self.specs]
        self.res = read_or_start_results(self.res_path, columns, run_config(args, script))
        rank_, world_, self.device = init_dist()
        self.res["config"]["world"] = world_
        self.res["items"] = [len(self.eval_sets[s]) for s in self.specs]  # per column
        self.lock = RunLock(self.out) if rank_ == 0 else None  # a second process on this --out is refused here
        self.done = max(len(self.res["rows"]) - 1, 0)  # finished stages
        self.at, self.lm = "before the base row", None  # where an interrupt or a write failure finds the run
        try:
            start = os.path.join(self.out, f"stage-{self.done}") if self.done else self.model_path
            print0(f"{script}: {len(self.stages)} stage(s) on {', '.join(columns[:len(self.tasks)])}; general tasks "
                   f"{', '.join(columns[len(self.tasks):]) or '-'}; world size {world_}; device {self.device}; " +
                   (f"resuming after stage {self.done} from {start}" if self.done else f"starting from {start}"))
            cannot_resume = f"The run cannot resume from it: delete {self.out} (or use another --out) to start again"
            if self.done:
                refuse(architecture_errors(start, self.model_path, cannot_resume))
            self.lm = load_model(start, self.device, grad_ckpt=args.grad_ckpt,
                                 what=f"the checkpoint of stage {self.done}, {start}" if self.done else None,
                                 advice=cannot_resume if self.done else None)
            configure(self.lm, args.min_pixels, args.max_pixels)
            if self.lm.is_vlm:
                print0("image tokens per sample: " + ", ".join(
                    f"{k} {v}" for k, v in image_tokens(self.lm, self.specs).items()))
            # the KL to the base on the CPT tasks' prompts, and on the general tasks' (where damage the first misses
            # shows)
            firsts = {t: v[:self.kl_n] for t, v in self.eval_sets.items()}
            self.kl_items = {t: v for t, v in firsts.items() if v and askable(v, self.lm.is_vlm)}
            samples = self.base_row() if not self.res["rows"] else None
            self.samples = self.keep_on_disk(samples, rank_)
            self.log = open_log(os.path.join(self.out, "log.jsonl"), self.done)
        except BaseException as e:
            self.__exit__(type(e), e, None)
            raise

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        """Release the lock, free the model; turn an interrupt, a full disk or a diverged stage into one line."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if error is None:
            print0(f"results: {self.res_path}")
            # free the sharded model while its process group still exists: left to interpreter teardown, a gloo
            # rank sometimes aborted at exit ("terminate called without an active exception")
            self.lm.model = None
            gc.collect()
            cleanup()
        if isinstance(error, Diverged):
            raise SystemExit(self.diverged(error)) from None
        if isinstance(error, (KeyboardInterrupt, WriteFailed)):
            kept = os.path.exists(self.res_path)
            what = "interrupted" if isinstance(error, KeyboardInterrupt) else f"stopped: {error}"
            fix = "" if isinstance(error, KeyboardInterrupt) else "free space on its disk (or fix the folder), then "
            after = f"stage {self.done}" if self.done else "the base row" if kept else "nothing"
            raise SystemExit(f"\n{what} {self.at}; " + (f"{self.res_path} keeps the base row and {self.done} finished "
                             f"stage(s)" if kept else "nothing was kept") +
                             f". To go on, {fix}run the same command again: it resumes after {after}") from None
        return False

    def base_row(self):
        """Row 0: the starting model's accuracy on every task, its samples for the KL, its general log-likelihood.
        Each is the same in every run of a comparison that shares its settings, so each is computed once (cached)."""
        lm, device, key = self.lm, self.device, (self.model_path, self.counts, self.fmt, self.split, str(self.device))
        seed_all(self.seed, "eval")
        row = cached_base("row", *key, self.evaluate_row, specs=self.specs, eval_tokens=self.eval_tokens)
        self.record_row("base", row)

        def draw_samples():
            seed_all(self.seed, "kl")
            return {t: sample_base(lm, v, self.fmt, self.kl_samples, self.eval_tokens, device)
                    for t, v in self.kl_items.items()}
        samples = cached_base("kl-samples", *key, draw_samples, per_rank=True, tasks=sorted(self.kl_items),
                              kl_n=self.kl_n, kl_samples=self.kl_samples, seed=self.seed, eval_tokens=self.eval_tokens)
        self.res["kl_to_base"] = [[0.0 if t in self.kl_items else None for t in self.tasks]]
        self.res["kl_to_base_general"] = [[0.0 if g in self.kl_items else None for g in self.general]]
        self.res["general_ll"] = [cached_base("general-ll", *key,
                                              lambda: general_loglik(lm, self.general_items(), self.fmt, device),
                                              general=self.general, kl_n=self.kl_n)]
        return samples

    def evaluate_row(self):
        acc, truncated = evaluate_all(self.lm, self.eval_sets, self.fmt, self.device, self.eval_tokens,
                                      self.eval_batch)
        return {"acc": acc, "truncated": truncated}

    def general_items(self):
        """The general tasks' items for the gold log-likelihood: the first --kl_n of each task's evaluation items."""
        return [self.eval_sets[g][:self.kl_n] for g in self.general]

    def record_row(self, name, row):
        """Append a row of the accuracy matrix (and its truncated shares) and say it, with a warning where more
        than TRUNCATION_WARN of the replies hit the token budget."""
        res, columns = self.res, self.res["columns"]
        res["rows"].append(name)
        res["acc"].append([row["acc"][c] for c in columns])
        res.setdefault("truncated", []).append([row["truncated"].get(c) for c in columns])
        print0(format_row(name, row["acc"], columns))
        for line in truncation_warning(name, row["truncated"], self.eval_tokens):
            print0(line)

    def keep_on_disk(self, samples, rank_):
        """results.json now (the base row), and this rank's KL reference samples (read back when resuming)."""
        samples_path = os.path.join(self.out, f"base-samples-rank{rank_}.json")
        if samples is None and os.path.exists(samples_path):
            with open(samples_path) as f:
                samples = json.load(f)
        if rank_ == 0:
            write_json(self.res_path, self.res)
        if is_dist():
            dist.barrier()
        if samples is not None and not os.path.exists(samples_path):
            write_json(samples_path, samples)
        return samples

    # ------------------------------------------------------------------------- the stages, as the script trains them

    def pending_stages(self):
        """The stages not yet finished, in order. Before each is handed to the script: the stage's seed, the model
        back to its shards (the evaluation passes leave the root gathered, and the stage's optimizer must see the
        shards), and its clock. Under LoRA, fresh adapters on the stage's start weights (lora.py: why one adapter
        per stage)."""
        for stage in self.stages[self.done:]:
            self.at = f"in stage {stage.k} ({stage.name})"
            if self.lora_rank:
                self.lm.model = None
                self.lm.model = load_model(self.lm.path, self.device, grad_ckpt=self.grad_ckpt,
                                           lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
                                           lora_seed=seed_all(self.seed, stage.k, "lora")).model
            self.t0, self.first_line = time.time(), len(self.log.rows)
            seed_all(self.seed, stage.k, stage.name)
            reshard(self.lm)
            yield stage

    def finish_stage(self, stage):
        """After the script trained a stage: evaluate everything, save the checkpoint, append the row and write
        results.json; say what would mislead (a stage that trained nothing, a rising loss); stop a broken run."""
        k, name, out, lm, res = stage.k, stage.name, self.out, self.lm, self.res
        train_s = time.time() - self.t0
        stage_rows = [r for r in self.log.rows[self.first_line:] if r.get("stage") == k and "step" in r]
        if self.lora_rank:  # the adapters merged into plain weights, and those evaluated: the checkpoint's numbers
            save_checkpoint(lm, os.path.join(out, f"stage-{k}"))
            lm.model = None
            lm.model = load_model(os.path.join(out, f"stage-{k}"), self.device).model
        seed_all(self.seed, "eval")
        row = self.evaluate_row()
        if not self.lora_rank:
            save_checkpoint(lm, os.path.join(out, f"stage-{k}"))
        lm.path = os.path.join(out, f"stage-{k}")
        self.record_row(name, row)
        res["stage_seconds"].append(round(train_s, 2))
        if self.samples is not None and "kl_to_base" in res:
            def kl(t):  # None where the base's samples lack the task (an image task on a text model; an older run)
                return round(kl_to_base(lm, self.kl_items[t], self.samples[t], self.fmt, self.device), 6) \
                    if t in self.samples and t in self.kl_items else None
            res["kl_to_base"].append([kl(t) for t in self.tasks])
            if "kl_to_base_general" in res:  # a run started before this reading was recorded has none
                res["kl_to_base_general"].append([kl(g) for g in self.general])
            res["general_ll"].append(general_loglik(lm, self.general_items(), self.fmt, self.device))
        if rank() == 0:
            write_json(self.res_path, res)
            if not self.keep_stages and k > 1:
                shutil.rmtree(os.path.join(out, f"stage-{k - 1}"), ignore_errors=True)
        self.done = k
        print0(f"  stage {k} trained in {train_s:.1f} s; {peak_memory(self.device)}")
        for line in stage_warnings(stage_rows):
            print0(f"warning: stage {k} ({name}): {line}")
        if collapsed(res["acc"][0], res["acc"][-1]):
            raise SystemExit(f"error: after stage {k} ({name}) every task reads 0 %, the base's tasks too: the model "
                             f"is broken (the likely cause: --lr {self.lr} too high for this model). {self.res_path} "
                             f"keeps the rows so far; rerun with a smaller --lr in a new --out.")

    def diverged(self, error):
        """The line for a stage whose loss, gradient norm, reward or logit stopped being finite."""
        k = self.done + 1
        name = self.stages[k - 1].name
        last = self.log.last if hasattr(self, "log") else {}
        step = last.get("step") if last.get("stage") == k else None
        when = f"after step {step}" if step is not None else "in its first step"
        return (f"error: stage {k} ({name}) diverged {when}: {error}. The likely cause is a learning rate too high "
                f"for this model (--lr {self.lr}). {self.res_path} keeps the {k - 1} finished stage(s)" +
                (f" and {os.path.join(self.out, f'stage-{k - 1}')}" if k > 1 else "") +
                "; rerun with a smaller --lr in a new --out.")


TRUNCATION_WARN = 0.10  # a reply cut at the budget scores as wrong: above this share the accuracy misleads


def truncation_warning(name, truncated, budget):
    """The warning for a row whose share of replies cut at the token budget is above TRUNCATION_WARN somewhere."""
    cut = {c: t for c, t in truncated.items() if t is not None and t > TRUNCATION_WARN}
    return [f"warning: [{name}] replies cut at the {budget}-token budget: " +
            ", ".join(f"{c} {100 * t:.0f}%" for c, t in cut.items()) +
            "; a cut reply usually scores as wrong: raise --eval_max_new_tokens"] if cut else []


def open_log(path, done):
    """The per-step log; only the finished stages' lines are kept: a killed stage is rerun from its start."""
    if rank() == 0:
        keep = [x for x in open(path)] if os.path.exists(path) and done else []
        with open(path, "w") as f:
            f.writelines(x for x in keep if json.loads(x).get("stage", 0) <= done)
    return Log(path)


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
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {res_path} cannot be read ({e}); delete it (or the folder) to start again") from None
    if not (isinstance(old, dict) and isinstance(old.get("config"), dict) and isinstance(old.get("rows"), list)):
        raise SystemExit(f"error: {res_path} is not the results file of a run of this project (no 'config' or "
                         f"'rows'); use another --out, or move the file away")
    old["config"] = with_later_settings(old["config"])
    differ = sorted(k for k in set(old["config"]) | set(config) if k != "world" and
                    old["config"].get(k) != config.get(k))
    if differ:
        raise SystemExit(f"error: {res_path} was written by a different command; it differs in " + "; ".join(
            f"--{k}: {old['config'].get(k)!r} there, {config.get(k)!r} now" for k in differ) +
            ". Use another --out, or delete the folder to start again")
    return old


class RunLock:
    """OUT/.lock names the run writing to OUT: its pid and that process's start time. A second live run on the same
    --out is refused; a lock whose process is gone, or whose pid now belongs to another process (pids are reused,
    and a container's pid 1 is always alive), is stale and taken over."""

    def __init__(self, out):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, ".lock")
        self.made_folder = not os.listdir(out)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = _lock_owner(self.path)
                if owner is not None and owner[0] != os.getpid() and _running(*owner):
                    raise SystemExit(f"error: another run (pid {owner[0]}) is writing to {out} (its lock: {self.path});"
                                     f" wait for it to finish, or use another --out. If no run uses {out}, delete "
                                     f"{self.path}") from None
                os.remove(self.path)  # a stale lock: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {_start_time(os.getpid())}")
            return
        raise SystemExit(f"error: cannot take the lock {self.path}; delete it if no run is using {out}")

    def release(self):
        owner = _lock_owner(self.path) if os.path.exists(self.path) else None
        if owner is not None and owner[0] == os.getpid():
            os.remove(self.path)
        out = os.path.dirname(self.path)
        if self.made_folder and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)  # a run that stopped before writing anything leaves no empty folder behind


def _lock_owner(path):
    """(pid, start time or None) written in a lock file; None when it holds no pid."""
    try:
        with open(path) as f:
            fields = f.read().split()
        return int(fields[0]), (fields[1] if len(fields) > 1 and fields[1] != "None" else None)
    except (OSError, ValueError, IndexError):
        return None


def _start_time(pid):
    """When process pid started, in clock ticks since boot (/proc/PID/stat, field 22); None where there is no
    /proc. A pid and its start time name one process for good."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(pid, started):
    """Whether the process that wrote a lock still runs: the pid is alive and, where both are known, started when
    the lock says (otherwise the pid was reused by another process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _start_time(pid)
    if started is not None and now is not None:
        return started == now
    if now is not None and started is None:  # a lock without a start time: only a Python process can be our run
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return b"python" in f.read()
        except OSError:
            return True
    return True


def architecture_errors(checkpoint, model, advice):
    """A stage checkpoint a run resumes from must be readable and the same kind of model as --model (the matrix
    would otherwise mix two models)."""
    try:
        a = model_config(checkpoint)
    except Exception as e:  # a missing or corrupt config.json
        return [f"the checkpoint {checkpoint} cannot be read ({type(e).__name__}: {str(e)[:200]}). {advice}"]
    b = model_config(model)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    differ = [k for k in keys if text_config(a).get(k) != text_config(b).get(k)]
    if differ:
        return [f"{checkpoint} is not a checkpoint of --model {model} (" + ", ".join(
            f"{k}: {text_config(a).get(k)} there, {text_config(b).get(k)} in --model" for k in differ) +
            f"). {advice}"]
    return []


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


def cached_base(what, model, counts, fmt, split, device, compute, per_rank=False, **setting):
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
    key = hashlib.sha256(repr((what, os.path.abspath(model), files, counts, fmt, split,
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
