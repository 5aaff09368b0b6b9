"""The training scripts end to end on tiny budgets: results.json, resume after a kill, text-only models,
the multi-task upper bound, RIF, SFT on own rollouts, and evaluate.py's report."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import torch

import rollouts
import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the runs these tests start are CPU runs (gloo ranks, fp32 numbers), on a machine with a GPU too
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
TINY = ["--tasks", "left_color", "top_color", "--general", "color", "add", "--eval_n", "24", "--steps", "2",
        "--batch_size", "4"]


def run(script, *args, timeout=300):
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], env=ENV, capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def results(d):
    with open(os.path.join(d, "results.json")) as f:
        return json.load(f)


def test_sft_writes_results_and_resumes_after_a_kill(tmp_path):
    full = str(tmp_path / "full")
    run("cpt_sft.py", *TINY, "--out", full)
    res = results(full)
    assert res["rows"] == ["base", "left_color", "top_color"]
    assert res["columns"] == ["left_color", "top_color", "color", "add"]
    assert len(res["acc"]) == 3 and all(len(r) == 4 and all(0 <= a <= 1 for a in r) for r in res["acc"])
    assert os.path.exists(os.path.join(full, "stage-2", "model.safetensors"))
    assert not os.path.exists(os.path.join(full, "stage-1"))  # only the last checkpoint is kept
    logs = [json.loads(x) for x in open(os.path.join(full, "log.jsonl"))]
    assert len(logs) == 4 and all("loss" in x for x in logs)
    # kill a second run during stage 2, then rerun: it resumes after stage 1 and gives the same matrix
    part = str(tmp_path / "part")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "cpt_sft.py"), *TINY, "--steps", "2", "--out", part],
                         env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 240:
        if os.path.exists(os.path.join(part, "results.json")) and len(results(part)["rows"]) == 2:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert len(results(part)["rows"]) == 2, "the run was not killed in stage 2"
    out = run("cpt_sft.py", *TINY, "--out", part)
    assert "resuming after stage 1" in out
    assert results(part)["acc"] == res["acc"]
    relog = [json.loads(x) for x in open(os.path.join(part, "log.jsonl"))]
    assert [(x["stage"], x["step"]) for x in relog] == [(x["stage"], x["step"]) for x in logs]  # no duplicates
    # a different command on the same folder is refused rather than mixed in
    r = subprocess.run([sys.executable, "cpt_sft.py", *TINY, "--lr", "0.5", "--out", part], env=ENV, cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "different command" in r.stderr


def test_rft_multitask_and_logged_metrics(tmp_path):
    d = str(tmp_path / "rft")
    out = run("cpt_rft.py", *TINY, "--multitask", "--group", "4", "--kl_coef", "0.01", "--out", d)
    assert results(d)["rows"] == ["base", "multitask"]
    logs = [json.loads(x) for x in open(os.path.join(d, "log.jsonl"))]
    keys = {"reward", "accuracy", "zero_var_groups", "truncated", "completion_len", "rollout_s", "update_s",
            "rollout_tok_per_s", "grad_norm", "kl"}
    assert len(logs) == 4 and keys <= set(logs[0])   # multi-task: --steps x 2 tasks
    assert 0 <= logs[0]["zero_var_groups"] <= 1 and logs[0]["kl"] >= 0
    assert "[multitask]" in out


def test_rft_rif_and_online_skip(tmp_path):
    d = str(tmp_path / "rif")
    out = run("cpt_rft.py", *TINY, "--rif", "zero_variance", "--rif_k", "4", "--group", "4", "--skip_zero_var",
              "--adv", "rloo", "--out", d)
    assert "rif zero_variance: kept" in out
    logs = [json.loads(x) for x in open(os.path.join(d, "log.jsonl"))]
    for stage in (1, 2):
        (rif,) = [x["rif"] for x in logs if "rif" in x and x["stage"] == stage]
        hist = rif["correct_rollouts_histogram"]
        assert rif["instances"] == 8 == sum(hist) and len(hist) == 5            # --steps 2 x --batch_size 4
        # all-wrong and all-right instances are dropped unless the format term alone varies their rewards
        assert 8 - hist[0] - hist[4] <= rif["kept"] <= 8 - hist[4] and rif["kept"] >= 1
        steps = [x for x in logs if "step" in x and x["stage"] == stage]
        assert len(steps) == math.ceil(2 * rif["kept"] / 8)                     # RIF's saving: fewer steps
        for x in steps:  # --skip_zero_var: exactly the sequences of the groups that are not silent are trained
            assert x["trained_seqs"] == round((1 - x["silent_groups"]) * 4) * 4
            assert x["skipped_step"] == (x["silent_groups"] == 1)


def test_sft_on_own_correct_rollouts(tmp_path):
    d = str(tmp_path / "self")
    run("cpt_sft.py", *TINY, "--sft_data", "self", "--k", "4", "--out", d)
    logs = [json.loads(x) for x in open(os.path.join(d, "log.jsonl"))]
    assert len(logs) == 4
    trained = [x for x in logs if not x.get("skipped_step")]
    # each step trains on the correct ones of 4 items x 4 rollouts: a selection, not the 4 gold answers
    assert trained and all(0 < x["items"] <= 16 for x in trained) and any(x["items"] != 4 for x in trained)
    # a correct rollout is the base's sentence ("It is red." and end of turn: 5 tokens with this tokenizer), not
    # the bare gold answer (the word and end of turn: 2)
    assert all(x["tokens"] >= 4 * x["items"] for x in trained)


def test_oracle_sft_learns_from_the_base_not_from_the_model_being_trained(tmp_path):
    """--sft_data oracle: the targets of every stage are the base's correct samples. Near-greedy sampling (temperature
    1e-4, k 1) makes them checkable: stage 2's first step trains on exactly the items whose base greedy answer is
    right, whatever stage 1 did to the model."""
    from data.tasks import Stream
    d = str(tmp_path / "oracle")
    run("cpt_sft.py", *TINY, "--sft_data", "oracle", "--k", "1", "--temperature", "1e-4", "--lr", "1e-3", "--out", d)
    logs = [json.loads(x) for x in open(os.path.join(d, "log.jsonl"))]
    base = runtime.load_model(runtime.DEFAULT_MODEL, "cpu")
    for stage, task in ((1, "left_color"), (2, "top_color")):
        items = Stream([task], (0, stage)).next(4)  # the stage's first batch (seed 0, one process)
        greedy, _ = runtime.sample(base, items, "free", 64, greedy=True)
        right = sum(rollouts.score_item(runtime.decode(base, c), it, "free").correct for c, it in zip(greedy, items))
        first = next(x for x in logs if x["stage"] == stage and x["step"] == 0)
        assert first.get("items", 0) == right, (stage, first, right)


def test_filter_cli_writes_kept_and_correct(tmp_path):
    out = str(tmp_path / "f")
    from data.tasks import load_jsonl
    run("filter.py", "--task", "left_color", "--n", "12", "--k", "4", "--mode", "none", "--out", out)
    items = load_jsonl(os.path.join(out, "kept.jsonl"))     # written images load back as a user data set
    assert len(items) == 12 and all(os.path.exists(p) for it in items for p in it["images"])
    # that file as a user's task: --n takes its first train lines; without --n, every train line (12 lines less
    # line 5, held out for test, and line 10, for validation)
    for n, want in (("5", 5), (None, 10)):
        run("filter.py", "--task", os.path.join(out, "kept.jsonl"), *(["--n", n] if n else []), "--k", "2",
            "--mode", "none", "--out", str(tmp_path / "user"))
        assert json.load(open(tmp_path / "user" / "stats.json"))["instances"] == want
    run("filter.py", "--task", "left_color", "--n", "12", "--k", "4", "--mode", "incompetent", "--out", out)
    stats = json.load(open(os.path.join(out, "stats.json")))
    kept = open(os.path.join(out, "kept.jsonl")).read().splitlines()
    hist = stats["correct_rollouts_histogram"]
    assert stats["instances"] == 12 and stats["kept"] == len(kept) and sum(hist) == 12 and len(hist) == 5
    assert stats["kept"] == 12 - hist[0]   # incompetent drops exactly the instances with 0 of 4 correct
    run("filter.py", "--task", "left_color", "--n", "12", "--k", "4", "--emit", "correct", "--out", out)
    rows = [json.loads(x) for x in open(os.path.join(out, "correct.jsonl"))]
    # a correct rollout is a sentence of the base's that ends with the gold colour ("It is red.")
    assert rows and all(r["answer"].rstrip(".").split()[-1].lower() == r["gold"] for r in rows)


def test_text_only_model(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(runtime.DEFAULT_MODEL)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                      pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    path = str(tmp_path / "llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    d = str(tmp_path / "run")
    run("cpt_sft.py", "--model", path, "--tasks", "add", "--general", "--eval_n", "8", "--steps", "2", "--out", d)
    assert results(d)["rows"] == ["base", "add"]
    run("cpt_rft.py", "--model", path, "--tasks", "add", "--general", "color", "--eval_n", "8", "--steps",
        "1", "--group", "2", "--batch_size", "2", "--out", str(tmp_path / "rft"))
    assert results(str(tmp_path / "rft"))["acc"][0][1] is None   # an image task is n/a for a text-only model
    r = subprocess.run([sys.executable, "cpt_sft.py", "--model", path, "--tasks", "color", "--general", "add",
                        "--steps", "1", "--eval_n", "4", "--out", str(tmp_path / "bad")], env=ENV, cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "color: has images but" in r.stderr and "is a text-only model" in r.stderr
    assert not os.path.exists(tmp_path / "bad")   # refused before anything was written


def test_evaluate_report_and_checkpoint_mode(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run("cpt_sft.py", *TINY, "--out", a)
    run("cpt_sft.py", *TINY, "--seed", "1", "--out", b)
    rep = str(tmp_path / "rep")
    out = run("evaluate.py", a, b, "--report", rep, "--frontier")
    assert "| sft lr=1e-05 | 2 |" in out   # gold SFT's default rate
    for f in ("report.md", "summary.json", "curves.png", "frontier.png"):
        assert os.path.exists(os.path.join(rep, f))
    out = run("evaluate.py", os.path.join(a, "stage-2"), "--tasks", "add", "--eval_n", "10")
    assert "add" in out and "of 10 items" in out


def test_compare_quick(tmp_path):
    out = str(tmp_path / "cmp")
    r = subprocess.run(["bash", os.path.join(ROOT, "compare.sh"), "--quick"], env={**ENV, "OUT": out}, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for arm in ("sft lr=1e-05 k=8 sft_data=gold", "sft sft_data=voice lr=3e-05 k=8", "sft sft_data=self lr=0.0001 k=4",
                "rft lr=0.0001", "sft lora_rank=8 lr=1e-05 k=8 sft_data=gold"):
        assert f"| {arm} | 1 |" in r.stdout, arm
    assert os.path.exists(os.path.join(out, "report", "report.md"))
    assert "total wall time" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr  # the progress monitor prints one if it breaks


def test_gpu_check_dry_run(tmp_path):
    """tests/gpu_check.sh on a CPU, the tiny shape: the suite collected, the decode, the bench with and without
    activation checkpointing, the main job cut down, and a 2-rank torchrun run stopped after stage 1 and resumed."""
    r = subprocess.run(["bash", os.path.join(ROOT, "tests", "gpu_check.sh"), "--dry-run"],
                       env={**ENV, "OUT": str(tmp_path)}, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    for line in ("tests collected", "SFT  batch 8x", "GRPO 1 prompts x G=8", "decode 2 prompts x G=8 x 16 new tokens",
                 "main job wall time", "resuming after stage 1", "every step ran"):
        assert line in r.stdout, line
