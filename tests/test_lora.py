"""LoRA (lora.py) against numbers worked by hand: the adapted forward and the merge of a 2x2 linear, the base
unchanged at initialisation, the trainable count from the tiny base's config, the merged checkpoint equal to the
adapted model after training, and a LoRA run end to end (its checkpoint evaluates to what it recorded; resuming
gives the same numbers; an old results.json without the LoRA settings still resumes)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import cpt_rft
import cpt_sft
import lora
import runtime
from cpt_sft import sft_step
from data.tasks import builtin_items

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def small_linear():
    """W = [[1, 2], [3, 4]], b = [0.5, -1], rank 1, alpha 2 (scale 2), A = [[1, -1]], B = [[2], [0]]."""
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        lin.bias.copy_(torch.tensor([0.5, -1.0]))
    layer = lora.LoRALinear(lin, rank=1, alpha=2.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, -1.0]]))
        layer.lora_B.copy_(torch.tensor([[2.0], [0.0]]))
    return layer


def test_adapted_forward_of_a_small_linear_by_hand():
    # x = [3, 1]:  W x + b = [3 + 2, 9 + 4] + [0.5, -1] = [5.5, 12];  A x = 3 - 1 = 2;  B A x = [4, 0];
    # scale alpha / R = 2 / 1 = 2  ->  y = [5.5 + 8, 12 + 0] = [13.5, 12]
    layer = small_linear()
    assert layer.scale == 2.0
    assert layer(torch.tensor([[3.0, 1.0]])).tolist() == [[13.5, 12.0]]
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_merge_of_a_small_linear_by_hand():
    # W + 2 B A = [[1, 2], [3, 4]] + 2 [[2, -2], [0, 0]] = [[5, -2], [3, 4]]; at x = [3, 1]: [13, 13] + b = [13.5, 12]
    sd = lora.merged(small_linear().state_dict(), 2.0)
    assert sorted(sd) == ["bias", "weight"]  # the keys of a plain nn.Linear: no adapter left
    assert sd["weight"].tolist() == [[5.0, -2.0], [3.0, 4.0]]
    plain = nn.Linear(2, 2)
    plain.load_state_dict(sd)
    assert plain(torch.tensor([[3.0, 1.0]])).tolist() == [[13.5, 12.0]]
    assert lora.merged({"x.weight": torch.ones(1)}, None)["x.weight"].tolist() == [1.0]  # no adapters: unchanged


def test_default_alpha_keeps_the_scale_at_two():
    assert [lora.lora_scale(r, lora.default_alpha(r)) for r in (1, 8, 64)] == [2.0, 2.0, 2.0]


def logits(lm, items):
    batch, _, _ = runtime.encode(lm, items, "plain")
    with torch.no_grad():
        return lm.model(**batch, position_ids=runtime.prompt_positions(lm, batch)).logits


ITEMS = builtin_items("left_color", "test", 2) + builtin_items("add", "test", 2)


def test_the_adapted_model_is_the_base_at_initialisation_and_only_decoder_adapters_train():
    base = runtime.load_model(runtime.DEFAULT_MODEL, "cpu")
    before = logits(base, ITEMS)
    n = lora.apply_lora(base.model, rank=4, alpha=8.0, seed=0)
    assert torch.equal(logits(base, ITEMS), before)  # B = 0: W x + b + 0, bit for bit
    # the tiny base's text config: hidden 128, intermediate 512, 4 heads of 32 (q, o: 128 -> 128), 2 KV heads
    # (k, v: 128 -> 64), 4 decoder layers. R (in + out) per linear, R = 4:
    #   q, o: 4 (128 + 128) = 1024 each; k, v: 4 (128 + 64) = 768 each; gate, up: 4 (128 + 512) = 2560 each;
    #   down: 4 (512 + 128) = 2560  ->  2 * 1024 + 2 * 768 + 3 * 2560 = 11264 per layer, x 4 layers = 45056
    assert n == 45056
    trained = [k for k, p in base.model.named_parameters() if p.requires_grad]
    assert len(trained) == 4 * 7 * 2 and all(k.endswith(("lora_A", "lora_B")) for k in trained)
    assert all(".language_model.layers." in k for k in trained)  # never the vision tower, embeddings or LM head
    # the same seed gives the same A (every rank and every process draws its own)
    again = runtime.load_model(runtime.DEFAULT_MODEL, "cpu", lora_rank=4, lora_alpha=8.0, lora_seed=0).model
    a = dict(base.model.named_parameters())
    assert all(torch.equal(p, a[k]) for k, p in again.named_parameters() if k.endswith("lora_A"))


def test_the_merged_checkpoint_gives_the_adapted_models_logits(tmp_path):
    lm = runtime.load_model(runtime.DEFAULT_MODEL, "cpu", lora_rank=4, lora_alpha=8.0, lora_seed=1)
    frozen = {k: v.clone() for k, v in lm.model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW(lora.trainable_parameters(lm.model), lr=1e-2)
    items = builtin_items("left_color", "train", 8)
    for step in range(3):
        pairs = [(it, runtime.target_ids(lm, f"It is {it['answer']}.", "plain")) for it in items]
        sft_step(lm, opt, pairs, "plain", 4, "cpu", items[0])
    sd = lm.model.state_dict()
    assert max(sd[k].abs().max().item() for k in sd if k.endswith("lora_B")) > 1e-3  # B has moved off zero
    assert all(torch.equal(sd[k], v) for k, v in frozen.items())  # nothing else did
    adapted = logits(lm, ITEMS)
    runtime.save_checkpoint(lm, str(tmp_path / "ckpt"))
    from transformers import AutoModelForImageTextToText
    plain = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "ckpt"))  # no adapter code involved
    assert not any("lora_" in k for k in plain.state_dict())
    back = runtime.Bundle(plain, lm.tok, lm.improc)
    assert (logits(back, ITEMS) - adapted).abs().max().item() < 1e-4
    assert (logits(back, ITEMS) - adapted).abs().max().item() < 1e-3 * adapted.abs().max().item()


def test_an_old_results_json_without_the_lora_settings_still_resumes(tmp_path):
    import loop
    path = str(tmp_path / "results.json")
    old = {"columns": ["a"], "rows": ["base"], "acc": [[0.5]], "config": {"lr": 1e-5, "script": "sft"}}
    runtime.write_json(path, old)
    assert loop.read_or_start_results(path, ["a"], {"lr": 1e-5, "script": "sft", "lora_rank": 0,
                                                    "lora_alpha": None})["rows"] == ["base"]
    with pytest.raises(SystemExit, match="--lora_rank: 0 there, 8 now"):
        loop.read_or_start_results(path, ["a"], {"lr": 1e-5, "script": "sft", "lora_rank": 8, "lora_alpha": 16.0})


TINY = ["--tasks", "left_color", "top_color", "--general", "color", "add", "--eval_n", "24", "--steps", "3",
        "--batch_size", "4", "--kl_n", "4", "--lora_rank", "4", "--lr", "3e-3"]


def run(*args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "cpt_sft.py"), *TINY, *args], env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(args[args.index("--out") + 1], "results.json")) as f:
        return json.load(f)


def test_a_lora_run_checkpoint_evaluates_to_its_numbers_and_resumes_alike(tmp_path):
    full = str(tmp_path / "full")
    res = run("--out", full, "--keep_stages")
    assert res["config"]["lora_rank"] == 4 and res["config"]["lora_alpha"] == 8.0
    assert res["acc"][2] != res["acc"][0]  # it learned something: the comparison below is not base vs base
    assert len(res["kl_to_base_general"]) == 3 and res["kl_to_base_general"][2][1] != 0.0  # add: a text prompt
    # the last checkpoint, loaded by plain from_pretrained, evaluates to the row the run recorded
    from measure import evaluate_all
    lm = runtime.load_model(os.path.join(full, "stage-2"), "cpu")
    assert not any("lora_" in k for k in lm.model.state_dict())
    runtime.seed_all(0, "eval")
    from measure import eval_items
    eval_sets = {t: eval_items(t, 24) for t in ["left_color", "top_color", "color", "add"]}
    acc, _ = evaluate_all(lm, eval_sets, "free", "cpu", 64, 128)
    assert [acc[c] for c in res["columns"]] == res["acc"][2]
    # a run stopped after stage 1 resumes from the merged checkpoint with fresh adapters: the same numbers
    part = str(tmp_path / "part")
    shutil.copytree(full, part)
    shutil.rmtree(os.path.join(part, "stage-2"))
    cut = {**res, **{k: res[k][:2] for k in ("rows", "acc", "truncated", "kl_to_base", "kl_to_base_general",
                                             "general_ll")}, "stage_seconds": res["stage_seconds"][:1]}
    runtime.write_json(os.path.join(part, "results.json"), cut)
    again = run("--out", part, "--keep_stages")
    assert again["acc"] == res["acc"] and again["kl_to_base_general"] == res["kl_to_base_general"]


def test_bad_lora_flags_are_refused_before_any_work(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        cpt_sft.main(["--lora_rank", "-1", "--out", out])
    assert "--lora_rank -1: must be 0 (full fine-tuning) or more" in str(e.value)
    with pytest.raises(SystemExit) as e:
        cpt_rft.main(["--lora_alpha", "16", "--out", out])   # alpha alone would change nothing: said, not ignored
    assert "without --lora_rank it would do nothing" in str(e.value)
    with pytest.raises(SystemExit) as e:
        cpt_rft.main(["--lora_rank", "8", "--lora_alpha", "0", "--out", out])
    assert "--lora_alpha 0.0: must be a positive number" in str(e.value)
    assert not os.path.exists(out)
