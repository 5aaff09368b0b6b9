"""Bad input is refused before any work (nothing written, nothing loaded), with the file and line or the flag and
what would be right; a diverging run stops at once with the step and stage named and the finished stages kept."""
import json
import os
import subprocess
import sys

import pytest

import cpt_rft
import cpt_sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the runs these tests start are CPU runs (gloo ranks, fp32 numbers), on a machine with a GPU too
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
TINY = ["--tasks", "left_color", "top_color", "--general", "color", "--eval_n", "8", "--steps", "2",
        "--batch_size", "4"]


def refused(main, *argv, tmp_path):
    """Run a script's main in-process; it must stop before creating its --out folder. Returns the message."""
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", out])
    assert not os.path.exists(out), "a refused run left its folder behind"
    return str(e.value)


def _jsonl(tmp_path, n, name="t.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps({"problem": f"What is {i} plus 1?", "answer": str(i + 1)}) + "\n"
                         for i in range(n)))
    return str(p)


def test_out_of_range_flags_are_refused_with_what_would_be_right(tmp_path):
    msg = refused(cpt_sft.main, *TINY, "--steps", "0", tmp_path=tmp_path)
    assert "--steps 0: must be at least 1" in msg
    msg = refused(cpt_rft.main, *TINY, "--group", "1", "--lr", "-1", tmp_path=tmp_path)
    assert "--group 1: must be at least 2" in msg and "--lr -1.0: must be a positive number" in msg
    msg = refused(cpt_sft.main, *TINY, "--general_n", "0", tmp_path=tmp_path)
    assert "--general_n 0: must be at least 1" in msg


def test_batch_not_divisible_by_the_world_size_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # what torchrun --nproc_per_node=3 sets, read before any process group
    msg = refused(cpt_sft.main, *TINY, tmp_path=tmp_path)
    assert "--batch_size 4: must be divisible by the number of processes (3); try 3" in msg


def test_a_task_given_twice_is_refused(tmp_path):
    msg = refused(cpt_sft.main, "--tasks", "add", "--general", "add", "color", tmp_path=tmp_path)
    assert "task(s) add given more than once" in msg


def test_bad_task_files_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(open(_jsonl(tmp_path, 12), "rb").read() + b'{"problem": "caf\xe9", "answer": "1"}\n')
    msg = refused(cpt_sft.main, "--tasks", str(bad), "--general", "color", tmp_path=tmp_path)
    assert f"{bad}:13: not UTF-8 text" in msg
    small = _jsonl(tmp_path, 3, "small.jsonl")
    msg = refused(cpt_rft.main, "--tasks", small, "--general", "color", tmp_path=tmp_path)
    assert "small.jsonl: 3 data lines; at least 10 are needed" in msg
    msg = refused(cpt_sft.main, "--tasks", "no_such_task", tmp_path=tmp_path)
    assert "no_such_task" in msg and "neither a built-in task" in msg


def test_an_image_task_for_a_text_only_model_is_refused_before_loading(tmp_path):
    from transformers import LlamaConfig
    d = tmp_path / "textonly"
    LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=1).save_pretrained(d)   # a config and no weights: loading would fail
    msg = refused(cpt_sft.main, "--model", str(d), "--tasks", "left_color", "--general", "add", tmp_path=tmp_path)
    assert "has images but" in msg and "text-only model" in msg


def test_a_different_command_on_the_same_folder_names_the_setting(tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out)
    cfg = {"columns": [], "rows": ["base"], "acc": [[]], "stage_seconds": [], "config": {"lr": 3e-5, "steps": 2}}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(SystemExit) as e:
        cpt_sft.main([*TINY, "--lr", "1e-4", "--out", out])
    assert "--lr: 3e-05 there, 0.0001 now" in str(e.value)


def _diverge(tmp_path, script, *extra):
    out = str(tmp_path / script)
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *TINY, "--lr", "1e9", *extra, "--out", out],
                       env=ENV, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    return r, out


@pytest.mark.parametrize("script,extra", [("cpt_sft.py", ()), ("cpt_rft.py", ("--group", "4"))])
def test_a_diverging_run_stops_and_keeps_the_finished_stages(tmp_path, script, extra):
    r, out = _diverge(tmp_path, script, *extra)
    assert r.returncode != 0
    assert "stage 1 (left_color) diverged" in r.stderr and "--lr 1000000000.0" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)          # strict JSON, the base row kept
    assert res["rows"] == ["base"]
    for line in open(os.path.join(out, "log.jsonl")):
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c} in log.jsonl"))
    assert not os.path.exists(os.path.join(tmp_path, "runs")), "a cache was written under the working folder"


def test_general_tasks_have_their_own_evaluation_count(tmp_path):
    """--eval_n for the CPT tasks, --general_n for the general ones, and a file's test split caps either: read back
    from the items each column of results.json was measured on. A general file of 30 lines holds 3 test items
    (lines 5, 15, 25)."""
    general = _jsonl(tmp_path, 30, "g.jsonl")
    out = str(tmp_path / "run")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "cpt_sft.py"), "--tasks", "left_color", "--general", "color",
                        general, "--eval_n", "6", "--general_n", "10", "--steps", "1", "--batch_size", "2",
                        "--kl_n", "0", "--out", out], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["columns"] == ["left_color", "color", "g"] and res["items"] == [6, 10, 3]


def test_what_the_base_gives_is_computed_once_per_setting(tmp_path, monkeypatch):
    """cached_base: the same settings read the kept value back without computing; another seed (or rank, for
    per-rank values) is another entry."""
    import loop
    import runtime
    monkeypatch.setattr(loop, "CACHE_DIR", str(tmp_path))
    counts = {"left_color": 10, "color": 10}
    calls = []

    def compute(value):
        return lambda: calls.append(value) or {"v": value}

    get = lambda seed, value: loop.cached_base("kl-samples", runtime.DEFAULT_MODEL, counts, "plain", "test",  # noqa
                                                 "cpu", compute(value), per_rank=True, seed=seed)
    assert get(0, 1) == {"v": 1} and get(0, 2) == {"v": 1}     # the second call reads the first one's value
    assert get(1, 3) == {"v": 3}                               # another seed: computed
    monkeypatch.setattr(loop, "rank", lambda: 1)
    assert get(0, 4) == {"v": 4}                               # another rank's own samples
    assert calls == [1, 3, 4]
