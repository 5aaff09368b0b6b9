"""The traps a user's own model, data and flags fall into, each said plainly: replies cut at the token budget,
a GRPO stage with nothing right to reinforce, a run that breaks without a NaN, input that only fails late, two runs
on one folder, a corrupt cache or weights file, answers in quotes."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import cpt_rft
import cpt_sft
import loop
import runtime
from cpt_rft import format_only, learning_warnings
from data.rewards import Score, score
from tests.test_inputs import refused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the runs these tests start are CPU runs (gloo ranks, fp32 numbers), on a machine with a GPU too
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
TINY = ["--tasks", "left_color", "--general", "color", "--eval_n", "8", "--steps", "2", "--batch_size", "4",
        "--kl_n", "0"]


def run(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], env=ENV, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------- 1. replies cut at the budget

def test_truncated_replies_are_counted_in_results_and_warned(tmp_path):
    out = str(tmp_path / "cut")
    # a plain answer is a word and the end of turn: a 1-token budget cuts every reply
    r = run("cpt_sft.py", *TINY, "--eval_max_new_tokens", "1", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["truncated"] == [[1.0, 1.0], [1.0, 1.0]]
    assert "replies cut at the 1-token budget: left_color 100%, color 100%" in r.stdout
    assert "raise --eval_max_new_tokens" in r.stdout


def test_rollouts_cut_at_the_budget_are_warned_during_the_stage():
    rows = [{"prompts_with_correct": 0.5, "format_only_groups": 0.0, "truncated": 0.05},
            {"prompts_with_correct": 0.5, "format_only_groups": 0.0, "truncated": 0.40}]
    assert learning_warnings(rows[:1]) == []
    (msg,) = learning_warnings(rows)
    assert msg.startswith("40% of the rollouts hit the --max_new_tokens budget (step 1)")
    # said once, when it first passes the threshold, not at every later step
    assert learning_warnings(rows + [{**rows[1]}]) == []


# ----------------------------------------------------------------------------- 2. a GRPO stage that cannot learn

def test_groups_ranked_only_by_the_format_term_by_hand():
    wrong_fmt, wrong_nofmt, right = Score(False, 0.0, True), Score(False, 0.0, False), Score(True, 1.0, True)
    assert format_only([wrong_fmt, wrong_nofmt, wrong_fmt])        # rewards 0.1, 0, 0.1: only the format differs
    assert not format_only([wrong_fmt, wrong_fmt, wrong_fmt])      # all equal: silent, not format-only
    assert not format_only([right, wrong_fmt, wrong_fmt])          # a right answer: the task ranks them


def test_no_correct_rollout_in_the_first_steps_is_warned_with_what_can_help():
    dead = {"prompts_with_correct": 0.0, "format_only_groups": 0.5, "truncated": 0.0}
    assert learning_warnings([dead, dead]) == []                   # not yet: the first steps may be unlucky
    (msg,) = learning_warnings([dead, dead, dead])
    assert "no rollout was correct in the first 3 steps" in msg and "50% of the groups differ by it alone" in msg
    assert "--rif incompetent" in msg and "SFT first" in msg
    alive = {**dead, "prompts_with_correct": 0.125}
    assert learning_warnings([dead, alive, dead]) == []


def test_a_grpo_step_logs_how_many_prompts_had_a_correct_sample(tmp_path):
    out = str(tmp_path / "rft")
    r = run("cpt_rft.py", *TINY, "--group", "4", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [json.loads(x) for x in open(os.path.join(out, "log.jsonl")) if '"step"' in x]
    assert all(0 <= s["prompts_with_correct"] <= 1 and 0 <= s["format_only_groups"] <= 1 for s in steps)
    assert "grpo stage 1: 2 steps; prompts with a correct sample" in r.stdout


# ----------------------------------------------------------------------------- 3. breaking without a NaN

def test_a_loss_that_stays_far_above_its_start_is_found_by_hand():
    assert loop.loss_rose([3.0, 3.5, 6.1, 7.0, 9.0]) == 4          # above 6.0 on steps 2, 3, 4: the third is step 4
    assert loop.loss_rose([3.0, 6.1, 7.0, 2.0, 6.5]) is None       # it came back: noise
    assert loop.loss_rose([3.0, 2.0, 1.0]) is None
    (msg,) = loop.stage_warnings([{"stage": 1, "step": i, "loss": x} for i, x in enumerate([3.36, 7, 9, 12.04])])
    assert "the loss rose from 3.36 to 12 nats per token" in msg


def test_a_stage_that_trained_nothing_is_warned():
    rows = [{"stage": 2, "step": i, "skipped_step": True} for i in range(4)]
    (msg,) = loop.stage_warnings(rows)
    assert msg.startswith("all 4 steps were skipped")
    assert loop.stage_warnings(rows[:3] + [{"stage": 2, "step": 3, "skipped_step": False}]) == []


def test_every_task_at_zero_after_a_stage_is_a_broken_model():
    assert loop.collapsed([0.9, 0.3, None], [0.0, 0.0, None])
    assert not loop.collapsed([0.9, 0.3], [0.0, 0.01])
    assert not loop.collapsed([0.0, 0.0], [0.0, 0.0])               # the base knew nothing either: no news


@pytest.mark.parametrize("value", ["0", "nan", "-1", "inf"])
def test_temperature_must_be_positive_and_finite_before_any_work(tmp_path, value):
    msg = refused(cpt_rft.main, *TINY, "--temperature", value, tmp_path=tmp_path)
    assert f"--temperature {float(value)}: must be a positive number" in msg


# ----------------------------------------------------------------------------- 4. every input checked first

def test_a_text_file_named_png_is_refused_with_its_line(tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    rows = [{"problem": "<image>What colour?", "answer": "red", "images": ["x.png"]}] * 12
    f = _jsonl(tmp_path / "img.jsonl", rows)
    msg = refused(cpt_sft.main, "--tasks", f, "--general", "color", tmp_path=tmp_path)
    assert f"{f}:1: {tmp_path / 'x.png'} is not an image PIL can read" in msg


def test_an_empty_answer_is_refused(tmp_path):
    rows = [{"problem": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(12)]
    rows[4]["answer"] = "  "
    f = _jsonl(tmp_path / "t.jsonl", rows)
    msg = refused(cpt_sft.main, "--tasks", f, "--general", "color", tmp_path=tmp_path)
    assert f"{f}:5: the answer is empty" in msg


def test_a_prompt_longer_than_the_context_is_refused_before_the_model_runs(tmp_path):
    """20,000 characters for a 1,024-token model: named with file:line and its token count, before any work."""
    rows = [{"problem": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(12)]
    rows[6]["problem"] = "Add these up: " + " ".join(["7"] * 10_000)
    f = _jsonl(tmp_path / "long.jsonl", rows)
    out = str(tmp_path / "out")
    r = run("cpt_sft.py", "--tasks", f, "--general", "color", "--out", out)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"{f}:7: the prompt is" in r.stderr and "reads at most 1024" in r.stderr
    assert not os.path.exists(out)


def test_the_long_prompt_check_reads_no_weights(tmp_path, monkeypatch):
    """The context check counts tokens with the tokenizer alone: it must not load a model (the 20,000-character
    line OOM-killed the machine when it reached the first forward)."""
    import transformers
    def no_model(*a, **k):
        raise AssertionError("a model was loaded by the input checks")
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", no_model)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    rows = [{"problem": "Add these up: " + " ".join(["7"] * 10_000), "answer": "1"}] * 12
    f = _jsonl(tmp_path / "long.jsonl", rows)
    msg = refused(cpt_sft.main, "--tasks", f, "--general", "color", tmp_path=tmp_path)
    assert f"{f}:1: the prompt is" in msg and "tokens and the reply budget is 64" in msg


def test_out_that_is_a_file_or_under_a_file_is_refused(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    for out in (str(f), str(f / "sub")):
        with pytest.raises(SystemExit) as e:
            cpt_sft.main([*TINY, "--out", out])
        assert f"--out {out}:" in str(e.value)


def test_a_train_file_inside_its_test_file_is_warned(tmp_path, capsys):
    rows = [{"problem": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(12)]
    train, test = _jsonl(tmp_path / "a_train.jsonl", rows), _jsonl(tmp_path / "a_test.jsonl", rows)
    with pytest.raises(SystemExit):
        cpt_sft.main(["--tasks", f"{train}:{test}", "--general", "color", "--steps", "0", "--out",
                      str(tmp_path / "o")])
    # line 10 of the train file is validation, the other 11 train: 11 of the 12 test items were trained on
    assert "11 of the 12 test items of a are also training items" in capsys.readouterr().out


def test_a_corrupt_or_edited_cache_file_is_named_and_recomputed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "CACHE_DIR", str(tmp_path))
    counts = {"left_color": 10, "color": 10}
    get = lambda value: loop.cached_base("row", runtime.DEFAULT_MODEL, counts, "plain", "test", "cpu",  # noqa: E731
                                         lambda: value)
    assert get({"acc": 1}) == {"acc": 1} and get({"acc": 2}) == {"acc": 1}
    (path,) = [os.path.join(tmp_path, p) for p in os.listdir(tmp_path)]
    open(path, "w").write('{"sha256": "')                           # cut short
    assert get({"acc": 3}) == {"acc": 3}
    assert f"the cache file {path} is not used: it cannot be read" in capsys.readouterr().out
    kept = json.load(open(path))
    kept["value"]["acc"] = 0.99                                      # well-formed, but not what was computed
    open(path, "w").write(json.dumps(kept))
    assert get({"acc": 4}) == {"acc": 4}
    assert "its checksum does not match" in capsys.readouterr().out


def test_an_unreadable_weights_file_is_named(tmp_path):
    bad = tmp_path / "model"
    shutil.copytree(runtime.DEFAULT_MODEL, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])                              # a cut download
    with pytest.raises(SystemExit) as e:
        runtime.load_model(str(bad), "cpu")
    assert f"--model {bad}: its weights cannot be read" in str(e.value) and "model.safetensors" in str(e.value)


# ----------------------------------------------------------------------------- 5. one run per --out

def test_a_second_run_on_the_same_out_is_refused_and_a_stale_lock_taken_over(tmp_path):
    out = str(tmp_path / "run")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.makedirs(out)
        open(os.path.join(out, ".lock"), "w").write(str(live.pid))
        with pytest.raises(SystemExit) as e:
            loop.RunLock(out)
        assert f"another run (pid {live.pid}) is writing to {out}" in str(e.value)
    finally:
        live.kill()
        live.wait()
    lock = loop.RunLock(out)                                         # its owner is gone: taken over
    assert open(os.path.join(out, ".lock")).read().split()[0] == str(os.getpid())
    lock.release()
    assert not os.path.exists(os.path.join(out, ".lock"))


def test_resume_refuses_a_stage_checkpoint_of_another_architecture(tmp_path):
    other = tmp_path / "other"
    shutil.copytree(runtime.DEFAULT_MODEL, other)
    cfg = json.load(open(other / "config.json"))
    cfg.setdefault("text_config", {})["vocab_size"] = 1234
    cfg["vocab_size"] = 1234
    json.dump(cfg, open(other / "config.json", "w"))
    (msg,) = loop.architecture_errors(str(other), runtime.DEFAULT_MODEL, "start again")
    assert "vocab_size: 1234 there" in msg and msg.endswith("start again")
    assert loop.architecture_errors(runtime.DEFAULT_MODEL, runtime.DEFAULT_MODEL, "") == []


# ----------------------------------------------------------------------------- 7. quotes and emphasis

@pytest.mark.parametrize("reply", ["`new`", '"new"', "“new”", "'new'", "**new**", "The antonym is `new`."])
def test_an_answer_in_quotes_or_emphasis_is_read(reply):
    s = score(reply, "new", "exact", "free", ["old", "new", "young"], ["new", "young"])
    assert s.correct and s.format_ok


def test_a_quoted_plain_answer_is_the_answer():
    assert score("`new`", "new", "exact", "plain").correct and score("**red**", "red", "exact", "plain").correct
