"""Every flag checked before any work, and every failure after that one clear line naming the file or flag and what
to do, with nothing lost: what a careful (or careless) user tries, and what the project says. The research
record's probe table (docs/findings.md, "Probes") lists the same cases."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

import cpt_rft
import cpt_sft
import evaluate
import filter as rif
import loop
import runtime
from cpt_rft import few_correct
from data.tasks import DataError, builtin_items, load_jsonl
from tests.test_inputs import refused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
TINY = ["--tasks", "left_color", "--general", "color", "--eval_n", "8", "--steps", "2", "--batch_size", "4",
        "--kl_n", "0"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _adds(n):
    return [{"problem": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(n)]


def run(script, *args, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], env=ENV, capture_output=True,
                          text=True, timeout=300, cwd=ROOT, **kw)


# ----------------------------------------------------------------------------- 1. flags that change the meaning

def test_flags_that_would_change_the_algorithm_are_refused_with_why(tmp_path):
    msg = refused(cpt_rft.main, *TINY, "--grad_clip", "-1", "--clip_low", "-1", "--clip_high", "-0.5",
                  "--kl_coef", "-1", "--weight_decay", "-1", "--min_pixels", "0", "--max_pixels", "1", "--seed", "-1",
                  "--probe_general", "-2", tmp_path=tmp_path)
    for line in ("--grad_clip -1.0: must be positive", "a negative value turns every step uphill",
                 "--clip_low -1.0: must be in [0, 1)", "--clip_high -0.5: must be 0 or more",
                 "--kl_coef -1.0: must be 0 (off) or more", "--weight_decay -1.0: must be 0 or more",
                 "--min_pixels 0: must be at least 784", "--max_pixels 1: must be at least 784",
                 "--seed -1: must be 0 or more", "--probe_general -2"):
        assert line in msg, line
    msg = refused(cpt_sft.main, *TINY, "--min_pixels", "10000", "--max_pixels", "5000", tmp_path=tmp_path)
    assert "--min_pixels 10000 is above --max_pixels 5000" in msg
    cpt_sft_inf = refused(cpt_sft.main, *TINY, "--grad_clip", "inf", "--steps", "0", tmp_path=tmp_path)
    assert "grad_clip" not in cpt_sft_inf                     # inf: no clipping, a meaningful choice


def test_a_budget_above_the_context_names_the_flag_not_every_line(tmp_path):
    f = _jsonl(tmp_path / "adds.jsonl", _adds(12))
    msg = refused(cpt_sft.main, "--tasks", f, "--general", "color", "--max_new_tokens", "5000", tmp_path=tmp_path)
    assert "--max_new_tokens 5000: " in msg and "reads at most 1024 tokens" in msg
    assert f"{f}:" not in msg                                 # the data lines are not blamed for the flag


def test_probe_general_logs_the_general_log_likelihood_change(tmp_path):
    out = str(tmp_path / "run")
    cpt_rft.main([*TINY, "--group", "2", "--batch_size", "2", "--probe_general", "2", "--out", out])
    rows = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    deltas = [r["general_ll_delta"] for r in rows if "general_ll_delta" in r]
    assert len(deltas) == 2 and all(isinstance(d, float) for d in deltas)


# ----------------------------------------------------------------------------- 2. memory the check must see

def test_a_long_answer_is_counted_like_a_prompt(tmp_path):
    rows = _adds(12)
    rows[0]["answer"] = "7 " * 3000                           # ~3,000 tokens: SFT would forward all of them
    f = _jsonl(tmp_path / "adds.jsonl", rows)
    msg = refused(cpt_sft.main, "--tasks", f, "--general", "color", "--format", "plain", tmp_path=tmp_path)
    assert f"{f}:1: the prompt is" in msg and "the answer is" in msg and "shorten the answer" in msg


def test_image_tokens_are_counted_with_the_runs_pixel_flags(tmp_path):
    Image.new("RGB", (1400, 1400), "red").save(tmp_path / "big.png")
    rows = [{"problem": "<image>What colour is this?", "answer": "red", "images": ["big.png"]}] * 12
    f = _jsonl(tmp_path / "big.jsonl", rows)
    # the processor's own bound (7,056 pixels) makes it 9 tokens; 2,000,000 pixels make it ~2,500 > 1,024
    msg = refused(cpt_sft.main, "--tasks", f, "--general", "color", "--max_pixels", "2000000", tmp_path=tmp_path)
    assert f"{f}:1: the prompt is" in msg and "with its images" in msg
    msg = refused(cpt_sft.main, "--tasks", f, "--general", "color", "--steps", "0", tmp_path=tmp_path)
    assert "the prompt is" not in msg


def test_evaluation_counts_are_bounded_and_a_smaller_split_is_said(tmp_path, capsys):
    msg = refused(cpt_sft.main, *TINY, "--eval_n", "100000000", tmp_path=tmp_path)
    assert "--eval_n 100000000: at most 20000" in msg
    refused(cpt_sft.main, "--tasks", "add", "--general", "capital", "--general_n", "5000", "--steps", "0",
            tmp_path=tmp_path)
    assert "capital's test split holds 202 distinct item(s); evaluating those 202, not 5000" in capsys.readouterr().out
    items = builtin_items("capital", "test", 5000)
    assert len(items) == 202 and len({it["problem"] for it in items}) == 202   # never the same item twice


# ----------------------------------------------------------------------------- 3. one clear line, not a traceback

def test_an_out_the_file_system_refuses_is_refused_before_work(tmp_path):
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("no /sys on this system")
    with pytest.raises(SystemExit) as e:
        cpt_sft.main([*TINY, "--out", "/sys/kernel/cpt-run"])
    assert "--out /sys/kernel/cpt-run: /sys/kernel cannot be written to" in str(e.value)


def test_report_and_filter_outputs_that_are_files_are_refused_first(tmp_path):
    run_dir = tmp_path / "r"
    os.makedirs(run_dir)
    json.dump(_results(["a", "g"]), open(run_dir / "results.json", "w"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(run_dir), "--report", str(afile)])
    assert f"--report {afile}: is a file" in str(e.value)
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        rif.main(["--task", "left_color", "--n", "4", "--out", str(afile)])
    assert f"--out {afile}: is a file" in str(e.value) and time.time() - t0 < 30   # before any rollout


def _results(columns, tasks=None):
    tasks = tasks or columns[:1]
    return {"columns": columns, "rows": ["base", tasks[0]], "acc": [[0.5] * len(columns), [0.6] * len(columns)],
            "truncated": [], "stage_seconds": [1.0],
            "config": {"tasks": tasks, "general": columns[len(tasks):], "script": "sft", "lr": 1e-5, "seed": 0}}


def test_a_foreign_or_cut_results_file_is_named(tmp_path):
    out = tmp_path / "run"
    os.makedirs(out)
    (out / "results.json").write_text('{"rows": []}')          # valid JSON, not a run's results
    with pytest.raises(SystemExit) as e:
        cpt_sft.main([*TINY, "--out", str(out)])
    assert f"{out / 'results.json'} is not the results file of a run of this project" in str(e.value)
    (out / "results.json").write_text(json.dumps(_results(["a", "g"]))[:40])   # cut
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(out)])
    assert f"{out / 'results.json'} cannot be read" in str(e.value)


def test_a_truncated_gguf_is_named_without_a_traceback(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")                   # the magic and version, then nothing
    msg = refused(cpt_sft.main, "--model", str(bad), "--tasks", "add", "--general", "capital", tmp_path=tmp_path)
    assert f"--model {bad}: its config cannot be read (" in msg and "copy it again" in msg


def test_ctrl_c_says_where_the_run_stopped_and_that_it_resumes(tmp_path):
    out = tmp_path / "run"
    # Ctrl-C as in a terminal: a suite started in the background (`pytest &`) passes SIGINT on ignored, and Python
    # then never raises KeyboardInterrupt
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "cpt_sft.py"), *TINY, "--steps", "400", "--out",
                          str(out)], env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not (out / "log.jsonl").exists() or not (out / "log.jsonl").read_text():   # training has begun
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "Traceback" not in err, err[-2000:]
    assert "interrupted in stage 1 (left_color)" in err and "keeps the base row and 0 finished stage(s)" in err
    assert "run the same command again: it resumes after the base row" in err
    assert json.load(open(out / "results.json"))["rows"] == ["base"] and not (out / ".lock").exists()


def test_a_full_disk_while_saving_a_stage_is_one_line_and_resumable(tmp_path, monkeypatch):
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cpt_sft.main([*TINY, "--out", str(out)])
    msg = str(e.value)
    assert f"stopped: {out / 'stage-1'} could not be written (Error while serializing" in msg
    assert "free space on its disk" in msg and "it resumes after the base row" in msg
    assert sorted(os.listdir(out)) == ["base-samples-rank0.json", "log.jsonl", "results.json"]  # no half folder


def test_evaluate_checks_a_models_input_before_loading_it(tmp_path, monkeypatch):
    import transformers
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded before its input was checked"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in _adds(11)) + "{oops\n")
    with pytest.raises(SystemExit) as e:
        evaluate.main([runtime.DEFAULT_MODEL, "--tasks", str(bad), "color", "--eval_n", "0", "--eval_batch", "0"])
    msg = str(e.value)
    assert "--eval_n 0: must be at least 1" in msg and "--eval_batch 0: must be at least 1" in msg
    assert f"{bad}:12: not valid JSON" in msg


# ----------------------------------------------------------------------------- 4. wrong or misleading answers

def test_a_lock_of_a_reused_pid_is_stale_and_a_live_run_names_its_lock(tmp_path):
    out = tmp_path / "run"
    os.makedirs(out)
    (out / ".lock").write_text("1 4")                          # pid 1 lives, but did not start at tick 4
    lock = loop.RunLock(str(out))
    pid, started = open(out / ".lock").read().split()
    assert int(pid) == os.getpid() and started == loop._start_time(os.getpid())
    lock.release()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{live.pid} {loop._start_time(live.pid)}")
        with pytest.raises(SystemExit) as e:
            loop.RunLock(str(out))
        assert f"another run (pid {live.pid})" in str(e.value) and f"delete {out / '.lock'}" in str(e.value)
    finally:
        live.kill()
        live.wait()


def test_a_model_folder_without_its_tokenizer_is_refused_before_loading(tmp_path):
    m = tmp_path / "model"
    shutil.copytree(runtime.DEFAULT_MODEL, m)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        os.remove(m / f)
    msg = refused(cpt_sft.main, *TINY, "--model", str(m), tmp_path=tmp_path)
    assert f"--model {m}: no tokenizer files (tokenizer.json, " in msg


def test_an_unreadable_stage_checkpoint_is_named_with_what_to_do(tmp_path):
    out = tmp_path / "run"
    cpt_sft.main([*TINY, "--out", str(out)])
    w = out / "stage-1" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(SystemExit) as e:
        cpt_sft.main([*TINY, "--out", str(out)])
    msg = str(e.value)
    assert f"the checkpoint of stage 1, {out / 'stage-1'}: its weights cannot be read" in msg
    assert "--model" not in msg and "copy it again" not in msg and f"delete {out}" in msg


def test_evaluate_refuses_runs_on_different_task_lists(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, cols in ((a, ["left_color", "color"]), (b, ["jigsaw", "color"])):
        os.makedirs(d)
        json.dump(_results(cols), open(d / "results.json", "w"))
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(a), str(b)])
    assert "evaluated on different tasks" in str(e.value) and f"left_color color: {a}" in str(e.value)


# ----------------------------------------------------------------------------- 5. data that can never score

@pytest.mark.parametrize("answer,kind,why", [
    ("NaN", None, "the literal NaN is no answer"),
    ("Infinity", None, "the literal Infinity is no answer"),
    ('"red"', "number", "the answer 'red' can never be scored right by the 'number' verifier")])
def test_an_answer_no_verifier_can_accept_is_refused_with_its_line(tmp_path, answer, kind, why):
    lines = [json.dumps(r) for r in _adds(11)]
    lines.append('{"problem": "Which?", "answer": ' + answer + (f', "kind": "{kind}"' if kind else '') + '}')
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_jsonl(str(f))
    assert str(e.value).startswith(f"{f}:12: ") and why in str(e.value)


def test_filter_refuses_settings_that_keep_nothing_before_any_rollout(tmp_path):
    for argv, line in ((["--k", "1"], "--k 1 with --mode zero_variance"),
                       (["--mode", "pass_rate", "--low", "0.5", "--high", "0.5"], "--low 0.5 --high 0.5")):
        with pytest.raises(SystemExit) as e:
            rif.main(["--task", "left_color", "--n", "4", "--out", str(tmp_path / "f"), *argv])
        assert line in str(e.value)
    assert not os.path.exists(tmp_path / "f")


def test_the_overlap_warning_compares_problem_and_images_and_skips_general_tasks(tmp_path, capsys):
    for c in ("red", "blue"):
        Image.new("RGB", (56, 56), c).save(tmp_path / f"{c}.png")
    rows = lambda c: [{"problem": "<image>What colour?", "answer": c, "images": [f"{c}.png"]}] * 12  # noqa: E731
    red, blue = _jsonl(tmp_path / "red.jsonl", rows("red")), _jsonl(tmp_path / "blue.jsonl", rows("blue"))
    same = _jsonl(tmp_path / "same.jsonl", _adds(12))
    args = ["--general", "color", "--steps", "0"]
    refused(cpt_sft.main, "--tasks", f"{red}:{blue}", *args, tmp_path=tmp_path)   # same words, other images
    refused(cpt_sft.main, "--tasks", "left_color", "--general", f"{same}:{same}", "--steps", "0",
            tmp_path=tmp_path)                                                      # a general task
    assert "also training items" not in capsys.readouterr().out
    refused(cpt_sft.main, "--tasks", f"{same}:{same}", *args, tmp_path=tmp_path)    # one file as train and test
    assert "11 of the 12 test items of same are also training items" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 6. a stage that can barely learn

def test_a_stage_with_few_correct_samples_is_warned_by_hand():
    # (0.10 + 0.14) / 2 = 12 % of the prompts had a correct sample: below 20 %, warned with what can help
    msg = few_correct([{"prompts_with_correct": 0.10}, {"prompts_with_correct": 0.14}])
    assert msg.startswith("only 12% of the prompts had a correct sample") and "--rif incompetent" in msg
    assert few_correct([{"prompts_with_correct": 0.3}, {"prompts_with_correct": 0.2}]) is None   # 25 %
    assert few_correct([]) is None
