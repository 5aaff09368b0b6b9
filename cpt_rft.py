"""Continual post-training by reinforcement fine-tuning (RFT): GRPO, written out.

The model learns the tasks one after another, with no replay. One GRPO step on a batch of prompts:
  1. rollout   G completions per prompt from the current model (temperature, max new tokens)
  2. reward    r = 0.9 * accuracy + 0.1 * format, from the task's verifier (data/rewards.py)
  3. advantage per group of G:  grpo  A = (r - mean) / (std + eps)   (std unbiased, eps = ADV_EPS)
                                rloo  A = r - mean of the other G-1
                                remax A = r - reward of the greedy completion
  4. loss      per token t: -min(rho_t A, clip(rho_t, 1 - clip_low, 1 + clip_high) A) + kl_coef * k3(t),
               rho_t = pi(y_t) / pi_old(y_t), k3 = exp(ref - logp) - (ref - logp) - 1 against the frozen start model,
               aggregated by --loss_agg with normalisers counted over the *global* batch (all micro-batches and
               ranks), so accumulation and world size do not change the gradient.
     pi(y_t) is the distribution the rollout sampled from, exactly: softmax(masked logits / temperature), where
     the mask sets to -inf the tokens that are never sampled (image / video placeholders, vision delimiters, pad),
     in the sampler and in runtime.token_logprobs alike. Scored any other way the samples would be off-policy.
A stage's first steps with no correct sample in any group are warned (nothing to reinforce: only the format term
ranks the samples), and each stage ends with a line: prompts with a correct sample, groups ranked only by the
format term, silent groups, rollouts cut at the budget, steps skipped.
A group whose advantages are all 0 teaches nothing (P1's "selective update"): under grpo and rloo a group whose
rewards are all equal, under remax one whose rewards all equal the greedy baseline (an all-correct group with a
wrong greedy answer does teach). Without the KL term such groups are not even run through the model (they would
add exactly zero) but still count in the normaliser; --skip_zero_var drops them from the normaliser too, and a step
whose every group is silent takes no optimizer step at all (AdamW's momentum and weight decay would still move the
weights). --rif MODE drops zero-variance instances before the stage (rollouts.filter_items, as filter.py does).
A non-finite reward, loss, gradient norm or logit stops the run before the optimizer steps on it.
With --lora_rank R only low-rank adapters on the decoder's linear layers train (lora.py; the vision tower and
everything else frozen); each stage's checkpoint has them merged into plain weights.
After each stage the model is evaluated on every task and on the held-out general tasks (loop.Run.finish_stage).

    python3 cpt_rft.py                                # the tiny default, a few minutes on 2 CPU cores
    python3 cpt_rft.py --multitask                    # all tasks at once: the upper bound
    python3 cpt_rft.py --rif zero_variance            # RIF-RFT (P1)
    python3 cpt_rft.py --lora_rank 8 --lr 1e-3        # LoRA-GRPO: rank-8 adapters on the decoder only (lora.py)
    python3 cpt_rft.py --model /ckpt/Qwen2.5-VL-7B-Instruct --tasks a.jsonl b.jsonl --format boxed --lr 1e-6 \\
        --kl_coef 0.01 --group 8 --max_new_tokens 512
    torchrun --standalone --nproc_per_node=8 cpt_rft.py --model /ckpt/Qwen2.5-VL-7B-Instruct \\
        --tasks a.jsonl b.jsonl --format boxed --lr 1e-6 --kl_coef 0.01 --group 8 --max_new_tokens 512
"""
import argparse
import math
import time
from dataclasses import dataclass, fields

import torch
from tqdm import tqdm

import runtime
from data.tasks import Stream, askable, load_split
from rollouts import REWARD_TOL, filter_items, rollout, score_item, zero_variance
from flags import HelpFormatter, add_common_args, input_errors, refuse, settle_defaults
from loop import Run

ADV_EPS = 1e-6         # verl / EasyR1 value (TRL uses 1e-4)
STD_CORRECTION = 1     # unbiased group std, as TRL, verl and EasyR1


@dataclass
class GRPOConfig:
    """The settings one GRPO step reads. The CLI flags of the same names take their defaults from here, except the
    ones both training scripts share (flags.py: --format, --temperature, --max_new_tokens, --grad_clip)."""
    format: str = "plain"
    group: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 16
    gen_batch: int = 256
    adv: str = "grpo"
    loss_agg: str = "token_mean"
    clip_low: float = 0.2
    clip_high: float = 0.3
    ppo_epochs: int = 1
    kl_coef: float = 0.0
    skip_zero_var: bool = False
    micro_batch: int = 64
    grad_clip: float = 1.0

    @classmethod
    def from_args(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


# ----------------------------------------------------------------------------- the formulas

def group_advantages(rewards, estimator="grpo", baseline=None, eps=ADV_EPS):
    """Advantages for rewards of shape [groups, G]. `baseline` [groups] is the greedy reward (remax only).
    An all-equal group gets 0 under grpo and rloo; under remax only when its rewards equal the baseline."""
    if estimator == "grpo":
        mean = rewards.mean(1, keepdim=True)
        std = rewards.std(1, keepdim=True, correction=STD_CORRECTION)
        return (rewards - mean) / (std + eps)
    if estimator == "rloo":
        g = rewards.shape[1]
        return (rewards - (rewards.sum(1, keepdim=True) - rewards) / (g - 1))
    if estimator == "remax":
        return rewards - baseline.unsqueeze(1)
    raise ValueError(f"unknown advantage estimator {estimator!r}")


def silent_groups(rewards, estimator="grpo", baseline=None, tol=REWARD_TOL):
    """[groups] bool: the groups whose advantages are all 0, so that they teach nothing. grpo / rloo: the rewards
    are all equal (within tol); remax: every reward equals the greedy baseline (within tol)."""
    if estimator == "remax":
        return (rewards - baseline.unsqueeze(1)).abs().amax(1) <= tol
    return torch.tensor([zero_variance(r, tol) for r in rewards.tolist()], dtype=torch.bool)


def clipped_token_loss(logp, old_logp, adv, clip_low=0.2, clip_high=0.3):
    """PPO's clipped surrogate, negated for descent: -min(rho A, clip(rho, 1-lo, 1+hi) A), per token.
    logp/old_logp [B, L], adv [B] (one advantage per sequence)."""
    ratio = torch.exp(logp - old_logp)
    a = adv.unsqueeze(1)
    return -torch.minimum(ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a)


def k3_kl(logp, ref_logp):
    """Schulman's low-variance KL estimator, per token: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(token_loss, mask, mode, n_tokens, n_seqs, max_len):
    """This micro-batch's share of the batch loss. n_tokens / n_seqs are counted over the global batch, so the
    shares of all micro-batches on all ranks add up to the loss of one big batch:
      token_mean  sum(loss) / all completion tokens            (verl, EasyR1, TRL "dapo")
      seq_mean    sum over sequences of their token mean / sequences   (original GRPO)
      dr_grpo     sum(loss) / (sequences * max_new_tokens)     (Dr.GRPO's constant normaliser)"""
    masked = token_loss * mask
    if mode == "token_mean":
        return masked.sum() / n_tokens
    if mode == "seq_mean":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    if mode == "dr_grpo":
        return masked.sum() / (n_seqs * max_len)
    raise ValueError(f"unknown loss aggregation {mode!r}")


# ----------------------------------------------------------------------------- one GRPO step

def grpo_step(lm, ref, opt, items, cfg, device):
    """One GRPO step on this rank's prompts (cfg: a GRPOConfig): rollout, rewards, advantages, update. Returns the
    scored rollout, its [groups, G] rewards, the silent groups and the update's stats (step_metrics reads them)."""
    t0 = time.time()
    table = rollout(lm, items, cfg.format, cfg.group, cfg.temperature, cfg.max_new_tokens, device,
                    cfg.gen_batch)
    rewards = torch.tensor([row["rewards"] for row in table], dtype=torch.float32)
    baseline = None
    if cfg.adv == "remax":  # ReMax's baseline: the reward of the greedy completion of the same prompt
        greedy, _ = runtime.sample(lm, items, cfg.format, cfg.max_new_tokens, greedy=True, device=device)
        baseline = torch.tensor([score_item(runtime.decode(lm, c), it, cfg.format).reward
                                 for c, it in zip(greedy, items)])
    silent = silent_groups(rewards, cfg.adv, baseline)
    adv = group_advantages(rewards, cfg.adv, baseline).masked_fill(silent.unsqueeze(1), 0.0)
    rollout_s = time.time() - t0

    # flatten groups into (item, completion, advantage); --skip_zero_var drops the silent groups. Without the KL
    # term a silent group adds exactly nothing to the gradient (A = 0), so its sequences are not run through the
    # model, but they still count in the loss normaliser: the gradient is the full batch's.
    seqs, silent_tokens, silent_seqs = [], 0, 0
    for row, advs, quiet in zip(table, adv, silent.tolist()):
        if quiet and cfg.skip_zero_var:
            continue
        if quiet and cfg.kl_coef == 0:
            silent_tokens += sum(len(c) for c in row["completions"])
            silent_seqs += len(row["completions"])
            continue
        seqs += [(row["item"], c, float(a)) for c, a in zip(row["completions"], advs)]
    t1 = time.time()
    update = grpo_update(lm, ref, opt, seqs, cfg, device, filler=items[0],
                         normaliser_extra=(silent_tokens, silent_seqs))
    update.update(rollout_s=rollout_s, update_s=time.time() - t1)
    return table, rewards, silent, update


def grpo_update(lm, ref, opt, seqs, cfg, device, filler=None, normaliser_extra=(0, 0)):
    """--ppo_epochs optimizer steps on this rank's (item, completion ids, advantage) triples.
    `normaliser_extra` (tokens, sequences) are silent sequences left out of the forward but counted in the loss
    normalisers, which are counted over all ranks. When no rank has a sequence to train on, no step is taken."""
    n_tokens, n_seqs = runtime.all_sum([sum(len(c) for _, c, _ in seqs) + normaliser_extra[0],
                                       len(seqs) + normaliser_extra[1]], device)
    n_trained = runtime.all_sum([len(seqs)], device)[0]
    if n_trained == 0:
        return {"grad_norm": 0.0, "trained_seqs": 0, "kl": 0.0, "skipped_step": True}
    stand_in = seqs[0] if seqs else (filler, [lm.eos_id], 0.0)
    micro_batches = list(runtime.equal_chunks(seqs, cfg.micro_batch, device, stand_in))
    old = ref_logp = [None] * len(micro_batches)
    with torch.no_grad():
        if cfg.ppo_epochs > 1:
            old = [_logp(lm, mb, cfg, device)[0] for mb, _ in micro_batches]
        if ref is not None:
            ref_logp = [_logp(ref, mb, cfg, device)[0] for mb, _ in micro_batches]
    norm, kl_sum = 0.0, 0.0
    for _ in range(cfg.ppo_epochs):
        loss_sum = 0.0
        for j, (mb, real) in enumerate(micro_batches):
            logp, mask, advs = _logp(lm, mb, cfg, device)
            # one epoch on-policy: pi_old is the current model, so rho = 1 and only its gradient matters
            old_j = old[j] if old[j] is not None else logp.detach()
            tok = clipped_token_loss(logp, old_j, advs, cfg.clip_low, cfg.clip_high)
            if ref_logp[j] is not None:
                kl = k3_kl(logp, ref_logp[j])
                tok = tok + cfg.kl_coef * kl
                kl_sum += real * (kl * mask).sum().item()
            loss = aggregate(tok, mask, cfg.loss_agg, n_tokens, n_seqs, cfg.max_new_tokens)
            (loss * runtime.world() * real).backward()  # FSDP averages over ranks; `real` zeroes stand-in passes
            loss_sum += real * loss.item()
        norm = runtime.optimizer_step(lm.model, opt, cfg.grad_clip, runtime.all_sum([loss_sum], device)[0])
    return {"grad_norm": norm, "trained_seqs": int(n_trained), "skipped_step": False,
            "kl": runtime.all_sum([kl_sum], device)[0] / n_tokens / cfg.ppo_epochs}


def shares_prompt(model):
    """Whether the update forwards each group's prompt once (see _logp)."""
    return not runtime.is_dist() and not runtime.is_activation_checkpointing(model)


def _logp(lm, micro_batch, cfg, device):
    """Per-token log-probs, completion mask and advantages of a micro-batch of (item, completion, advantage).
    A group's completions follow each other, so each prompt is forwarded once for all of them
    (runtime.shared_prompt_logprobs: the same log-probs and gradient as forwarding it G times). Activation
    checkpointing turns the KV cache off, and FSDP2 is not yet checked with a forward split in two: those repeat
    the prompt."""
    scorer = runtime.shared_prompt_logprobs if shares_prompt(lm.model) else runtime.token_logprobs
    logp, mask = scorer(lm, [s[0] for s in micro_batch], cfg.format, [s[1] for s in micro_batch], device,
                        cfg.temperature)
    return logp, mask, torch.tensor([s[2] for s in micro_batch], device=device)


def general_probe(lm, specs, n, fmt, device):
    """A closure measuring the change of the mean log-likelihood of the general tasks' gold answers since its last
    call: P1's interference of an update with prior knowledge, made visible per step."""
    items = [it for s in specs for it in load_split(s, "val", n) if askable([it], lm.is_vlm)]
    targets = [runtime.target_ids(lm, it["answer"], fmt) for it in items]
    last = [None]

    def probe():
        with torch.no_grad():
            logp, mask = runtime.token_logprobs(lm, items, fmt, targets, device)
            ll = ((logp * mask).sum(1)).mean().item()
        delta = 0.0 if last[0] is None else ll - last[0]
        last[0] = ll
        return round(delta, 6)

    probe()
    return probe


# ----------------------------------------------------------------------------- what a step says

def step_metrics(table, rewards, silent, update, group, device):
    """What a GRPO step's rollout says, summed over ranks, with its update's stats: mean reward and accuracy, the
    shares of zero-variance, silent and format-only groups, of prompts with a correct sample and of replies cut at
    the budget, the mean completion length, group reward variance and rollout speed."""
    tokens = sum(len(c) for row in table for c in row["completions"])
    r_sum, n_groups, n_zero_var, n_silent, n_correct, n_trunc, tokens, var_sum, n_any, n_format_only = \
        runtime.all_sum([rewards.sum().item() / group, len(table),
                         sum(zero_variance(row["rewards"]) for row in table), int(silent.sum()),
                         sum(s.correct for row in table for s in row["scores"]),
                         sum(t for row in table for t in row["truncated"]), tokens,
                         rewards.var(1, correction=0).sum().item(),
                         sum(any(s.correct for s in row["scores"]) for row in table),
                         sum(format_only(row["scores"]) for row in table)], device)
    n_samples = n_groups * group
    return {"reward": r_sum / n_groups, "accuracy": n_correct / n_samples, "zero_var_groups": n_zero_var / n_groups,
            "silent_groups": n_silent / n_groups, "truncated": n_trunc / n_samples,
            "completion_len": tokens / n_samples, "reward_var": var_sum / n_groups,
            "prompts_with_correct": n_any / n_groups, "format_only_groups": n_format_only / n_groups,
            "rollout_tok_per_s": round(tokens / max(update["rollout_s"], 1e-9), 1), **update}


def format_only(scores, tol=REWARD_TOL):
    """True when a group's rewards differ only by the format term: every sample's accuracy part is the same (all
    wrong, typically) while the rewards are not. Normalised by the group's std, that small difference becomes
    full-size advantages that teach the format and nothing of the task."""
    accuracies = [s.accuracy for s in scores]
    return zero_variance(accuracies, tol) and not zero_variance([s.reward for s in scores], tol)


NO_CORRECT_STEPS = 3  # steps with no correct sample in any group before the stage says it cannot learn


def learning_warnings(rows, truncated_warn=0.10):
    """What the first rows (steps) of a GRPO stage say a user must know, as messages: no prompt with a correct
    sample in any of the first NO_CORRECT_STEPS steps (nothing right to reinforce: only the format term ranks the
    samples), and rollouts cut at the token budget."""
    out = []
    if len(rows) == NO_CORRECT_STEPS and all(r["prompts_with_correct"] == 0 for r in rows):
        fmt_only = sum(r["format_only_groups"] for r in rows) / len(rows)
        out.append(f"no rollout was correct in the first {len(rows)} steps: GRPO can reinforce only partial credit, "
                   f"where the task gives any, and the format term ({100 * fmt_only:.0f}% of the groups differ by it "
                   f"alone, which the std normalisation makes full-size). What can help: a longer --max_new_tokens, a "
                   f"larger --group, SFT first, or --rif incompetent (train only on prompts with a correct rollout)")
    if rows and rows[-1]["truncated"] > truncated_warn and all(r["truncated"] <= truncated_warn for r in rows[:-1]):
        out.append(f"{100 * rows[-1]['truncated']:.0f}% of the rollouts hit the --max_new_tokens budget (step "
                   f"{len(rows) - 1}); a cut reply usually scores as wrong: raise --max_new_tokens")
    return out


FEW_CORRECT = 0.20  # below this share of prompts with a correct sample, a stage's accuracy signal is thin


def few_correct(rows, low=FEW_CORRECT):
    """The stage-end warning when fewer than `low` of a stage's prompts had any correct sample (None otherwise):
    only those groups can reinforce a right answer, so the stage can learn little even when it runs every step."""
    if not rows:
        return None
    share = sum(r["prompts_with_correct"] for r in rows) / len(rows)
    if share >= low:
        return None
    return (f"only {100 * share:.0f}% of the prompts had a correct sample: GRPO can reinforce a right answer in "
            f"those groups alone, so this stage learns little of its task. What can help: SFT first, a larger "
            f"--group, a longer --max_new_tokens, or --rif incompetent (train only on prompts with a correct rollout)")


def stage_summary(rows):
    """One line per GRPO stage: how much of it could teach anything."""
    if not rows:
        return "no step"
    mean = lambda k: 100 * sum(r[k] for r in rows) / len(rows)  # noqa: E731
    return (f"{len(rows)} steps; prompts with a correct sample {mean('prompts_with_correct'):.0f}%, groups ranked "
            f"only by the format term {mean('format_only_groups'):.0f}%, silent groups {mean('silent_groups'):.0f}%, "
            f"rollouts cut {mean('truncated'):.0f}%, steps skipped {sum(r['skipped_step'] for r in rows)}")


def objective_errors(clip_low, clip_high, kl_coef, probe_general):
    """The GRPO objective's flags in the range where they mean what their names say."""
    errors = []
    if not 0 <= clip_low < 1:
        errors.append(f"--clip_low {clip_low}: must be in [0, 1); the ratio is clipped below at 1 - clip_low, and "
                      f"a negative value makes that bound exceed 1 (positive advantages then give no gradient)")
    if not (math.isfinite(clip_high) and clip_high >= 0):
        errors.append(f"--clip_high {clip_high}: must be 0 or more; the ratio is clipped above at 1 + clip_high")
    if not (math.isfinite(kl_coef) and kl_coef >= 0):
        errors.append(f"--kl_coef {kl_coef}: must be 0 (off) or more; a negative weight would reward moving away "
                      f"from the reference model")
    if probe_general < 0:
        errors.append(f"--probe_general {probe_general}: must be 0 (off) or more")
    return errors


def main(argv=None):
    d = GRPOConfig()  # the defaults
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_common_args(p, steps=20, micro_batch=d.micro_batch, lr=1e-4, lr_note="tuned on val; P1: 1e-6 on 7B",
                    batch_size=8)
    g = p.add_argument_group("rollout")
    g.add_argument("--group", type=int, default=d.group, help="completions per prompt (G)")
    g.add_argument("--gen_batch", type=int, default=d.gen_batch, help="sequences sampled at once")
    g = p.add_argument_group("GRPO objective")
    g.add_argument("--adv", default=d.adv, choices=["grpo", "rloo", "remax"], help="advantage estimator")
    g.add_argument("--loss_agg", default=d.loss_agg, choices=["token_mean", "seq_mean", "dr_grpo"],
                   help="how token losses are averaged (see aggregate)")
    g.add_argument("--clip_low", type=float, default=d.clip_low, help="PPO clip below 1")
    g.add_argument("--clip_high", type=float, default=d.clip_high, help="PPO clip above 1")
    g.add_argument("--ppo_epochs", type=int, default=d.ppo_epochs, help="updates per rollout batch")
    g.add_argument("--kl_coef", type=float, default=d.kl_coef, help="k3 KL weight to the stage's start model (P1: 0.01)")
    g.add_argument("--skip_zero_var", action="store_true",
                   help="drop silent groups (all advantages 0) from the update and its normaliser")
    g = p.add_argument_group("instance filtering (P1's RIF-RFT) and diagnostics")
    g.add_argument("--rif", default="none", choices=["none", "incompetent", "zero_variance"],
                   help="filter each stage's prompt pool with the current model first")
    g.add_argument("--rif_k", type=int, default=8, help="rollouts per instance for --rif")
    g.add_argument("--probe_general", type=int, default=0, help="general items per task for the per-step "
                                                                  "log-likelihood probe (0: off)")
    args = settle_defaults(p.parse_args(argv))
    refuse(input_errors(args, positive=("gen_batch", "ppo_epochs", "rif_k"), at_least_two=("group",)) +
           objective_errors(args.clip_low, args.clip_high, args.kl_coef, args.probe_general))

    cfg = GRPOConfig.from_args(args)
    with Run("rft", args) as run:
        lm, device = run.lm, run.device
        for stage in run.pending_stages():
            ref = None
            if args.kl_coef > 0:  # frozen copy of the stage's start model; never loaded when the KL is off
                ref = runtime.load_model(lm.path, device)  # lm.path: the checkpoint this stage starts from
                ref.model.requires_grad_(False).eval()
            opt = runtime.adamw(lm.model, args.lr, args.weight_decay, device)
            # a multi-task stage trains on all tasks: it gets the whole sequence's budget, steps x tasks
            stream, steps = Stream(stage.specs, (args.seed, stage.k)), args.steps * len(stage.specs)
            if args.rif != "none":  # RIF-RFT: the same passes over the instances that can teach, so fewer steps
                kept, stats = rif_filter(lm, stream.next(steps * args.batch_size), args.rif, args.rif_k, cfg, device)
                run.log(stage=stage.k, rif=stats)
                stream = Stream.from_items(kept, (args.seed, stage.k)) if kept else stream
                steps = max(1, math.ceil(steps * stats["kept_fraction"])) if kept else 0
            probe = general_probe(lm, args.general, args.probe_general, args.format, device) \
                if args.probe_general else None
            lm.model.train()
            rows = []
            for step in tqdm(range(steps), desc=f"grpo stage {stage.k}", disable=runtime.rank() != 0):
                items = runtime.share(stream.next(args.batch_size))  # the global batch: this rank's part
                table, rewards, silent, update = grpo_step(lm, ref, opt, items, cfg, device)
                m = step_metrics(table, rewards, silent, update, args.group, device)
                if probe is not None:
                    m["general_ll_delta"] = probe()
                run.log(stage=stage.k, step=step, **{k: round(v, 5) if isinstance(v, float) else v
                                                     for k, v in m.items()})
                rows.append(m)
                for line in learning_warnings(rows):
                    tqdm.write(f"warning: grpo stage {stage.k}: {line}") if runtime.rank() == 0 else None
            runtime.print0(f"  grpo stage {stage.k}: {stage_summary(rows)}")
            thin = few_correct(rows)
            if thin:
                runtime.print0(f"warning: grpo stage {stage.k}: {thin}")
            run.finish_stage(stage)
    return run.res


def rif_filter(lm, pool, mode, group, cfg, device):
    """RIF-RFT on a stage's whole prompt pool: K rollouts each, the instances that can teach kept (and the stats).
    Every rank filters its share and the keep flags are summed, so all ranks hold the same kept pool."""
    mine = runtime.share(range(len(pool)))
    flags, stats, _ = filter_items(lm, [pool[i] for i in mine], mode, cfg.format, group, cfg.temperature,
                                   cfg.max_new_tokens, device, cfg.gen_batch)
    kept_mask = [0.0] * len(pool)
    for i, f in zip(mine, flags):
        kept_mask[i] = float(f)
    kept = [it for it, f in zip(pool, runtime.all_sum(kept_mask, device)) if f]
    runtime.print0(f"  rif {mode}: kept {stats['kept']}/{stats['instances']} ({100 * stats['kept_fraction']:.0f}%) "
                   f"in {stats['rollout_seconds']} s" + ("" if kept else "; no instance kept: the stage takes no step"))
    return kept, stats


if __name__ == "__main__":
    runtime.run_script(main)
