"""The task suite is deterministic and says what it draws; the JSONL loader names the file and line of bad input."""
import json

import pytest
from PIL import Image

from data.tasks import BUILTIN, CPT, GENERAL, SIZE, DataError, Stream, builtin_items, load_jsonl, load_split, \
    task_name


def test_builtin_tasks_are_deterministic_and_splits_disjoint():
    for name in BUILTIN:
        a, b = builtin_items(name, "test", 5), builtin_items(name, "test", 5)
        assert [x["answer"] for x in a] == [x["answer"] for x in b]
        assert all(x["images"][0].tobytes() == y["images"][0].tobytes() for x, y in zip(a, b) if x["images"])
        train = builtin_items(name, "train", 5)
        if a[0]["images"]:  # text tasks (add, successor, ...) have few distinct questions: collisions are expected
            assert {x["images"][0].tobytes() for x in train}.isdisjoint({x["images"][0].tobytes() for x in a})
    assert len(GENERAL) >= 3 and len(CPT) >= 4 and "jigsaw" in CPT


def test_answers_follow_the_rule():
    # left_color and top_color draw the same scenes; they disagree on about half of them (interference by design)
    lc, tc = builtin_items("left_color", "test", 200), builtin_items("top_color", "test", 200)
    from data.tasks import gen_left_color, gen_top_color
    import random
    agree = 0
    for i in range(200):
        a = gen_left_color(random.Random(f"x/{i}"))[1]
        b = gen_top_color(random.Random(f"x/{i}"))[1]
        agree += a == b
    assert 60 < agree < 140
    from data.tasks import COLORS
    assert {x["answer"] for x in lc} == {x["answer"] for x in tc} == set(COLORS)


def _pixels(img):
    return list(zip(*[iter(img.convert("RGB").tobytes())] * 3))


def test_any_color_accepts_exactly_the_colours_drawn_and_its_canonical_answer_is_the_first_in_palette_order():
    from data.tasks import COLORS
    for it in builtin_items("any_color", "test", 40):
        px = set(_pixels(it["images"][0]))
        near = lambda rgb: any(max(abs(a - b) for a, b in zip(p, rgb)) <= 25 for p in px)
        assert [c for c in COLORS if near(COLORS[c])] == it["valid"]  # drawn <=> valid, in palette order
        assert 2 <= len(it["valid"]) <= 4 and it["answer"] == it["valid"][0]


def test_circle_cell_answers_are_occupied_cells_and_the_canonical_one_is_the_lowest():
    for it in builtin_items("circle_cell", "test", 40):
        img = it["images"][0]
        for cell in it["valid"]:
            c = int(cell) - 1
            crop = img.crop(((c % 3) * 28, (c // 3) * 28, (c % 3 + 1) * 28, (c // 3 + 1) * 28))
            assert any(max(p) - min(p) > 60 for p in _pixels(crop))  # a coloured object there, not grey only
        assert 2 <= len(it["valid"]) <= 4 and it["answer"] == min(it["valid"], key=int)
        assert it["valid"] == sorted(it["valid"], key=int)


def test_the_base_habit_by_hand():
    """_habit: 0.8 x the habit + 0.2 x uniform over the candidates. Habit b among a, b, c, d:
    P(b) = 0.8 + 0.2 / 4 = 0.85, P(a) = P(c) = P(d) = 0.05."""
    import random
    from data.tasks import _habit
    rng, n = random.Random(0), 40000
    draws = [_habit(rng, "b", ["a", "b", "c", "d"]) for _ in range(n)]
    for x, p in {"a": 0.05, "b": 0.85, "c": 0.05, "d": 0.05}.items():
        assert abs(draws.count(x) / n - p) < 0.01, (x, draws.count(x) / n)


def test_any_color_exposure_labels_follow_the_habit():
    """The base's any_color labels: on tiny items (3/4) the favourite cyan 0.8 + 0.2/8 of the time; on seen items the
    biggest object's colour, which is cyan 1/8 of the time by symmetry. P(cyan) = 3/4 * 0.825 + 1/4 * (0.8/8 + 0.2/8)
    = 0.61875 + 0.03125 = 0.65. And the favourite is never the canonical answer (last in palette order, K >= 2)."""
    from data.tasks import COLORS, FAVOURITE
    n = 4000
    weak = [it["answer"] for it in builtin_items("any_color", "train", n, weak=True)]
    assert abs(weak.count("cyan") / n - 0.65) < 0.03, weak.count("cyan") / n
    assert FAVOURITE["any_color"] == list(COLORS)[-1] and FAVOURITE["circle_cell"] == "9"
    gold = builtin_items("any_color", "train", 500)
    assert all(it["answer"] != "cyan" for it in gold)


def test_jigsaw_answer_reassembles_the_picture():
    it = builtin_items("jigsaw", "test", 1)[0]
    perm = [int(x) - 1 for x in it["answer"].split()]
    assert sorted(perm) == [0, 1, 2, 3] and perm != [0, 1, 2, 3]
    img, t = it["images"][0], SIZE // 2
    restored = Image.new("RGB", (SIZE, SIZE))
    for p, src in enumerate(perm):  # shuffled position p holds original tile src
        restored.paste(img.crop(((p % 2) * t, (p // 2) * t, (p % 2 + 1) * t, (p // 2 + 1) * t)),
                       ((src % 2) * t, (src // 2) * t))
    px = restored.load()
    # the frame is dark on every outer edge of the restored picture, and only there
    assert all(sum(px[x, 2]) < 150 and sum(px[x, SIZE - 3]) < 150 for x in range(SIZE))
    assert all(sum(px[2, y]) < 150 and sum(px[SIZE - 3, y]) < 150 for y in range(SIZE))


def test_weak_answers_have_the_form_but_not_the_rule():
    items = builtin_items("left_color", "train", 300, weak=True)
    true = builtin_items("left_color", "train", 300)
    agree = sum(a["answer"] == b["answer"] for a, b in zip(items, true)) / 300
    assert 0.35 < agree < 0.65  # a colour in the picture, right about half the time


def test_jsonl_valid_answers(tmp_path):
    p = _write(tmp_path, [json.dumps({"problem": f"q{i}", "answer": "a", "valid": ["a", "b"]}) for i in range(10)])
    items = load_jsonl(str(p))
    assert items[0]["valid"] == ["a", "b"] and items[0]["candidates"] == ["a", "b"]
    bad = _write(tmp_path, ['{"problem": "q", "answer": "c", "valid": ["a", "b"]}'], "bad.jsonl")
    with pytest.raises(DataError, match=r"bad.jsonl:1: the answer 'c' is not one of its 'valid' answers"):
        load_jsonl(str(bad))
    bad = _write(tmp_path, ['{"problem": "q", "answer": "a", "valid": "a"}'], "bad2.jsonl")
    with pytest.raises(DataError, match=r"bad2.jsonl:1: 'valid' must be a non-empty list"):
        load_jsonl(str(bad))


def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_jsonl_loads_images_relative_to_the_file(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (28, 28), "red").save(tmp_path / "img" / "a.png")
    p = _write(tmp_path, [json.dumps({"problem": "<image>What color?", "answer": "red", "images": ["img/a.png"]}),
                          "",
                          json.dumps({"problem": "2+2?", "answer": 4}),
                          json.dumps({"problem": "Pick", "answer": "B"})])
    items = load_jsonl(p)
    assert [it["kind"] for it in items] == ["exact", "number", "choice"]
    assert items[0]["images"][0] == str(tmp_path / "img" / "a.png")
    assert items[1]["images"] == [] and items[1]["answer"] == "4"


@pytest.mark.parametrize("line,msg", [
    ('{"problem": "x", "answer": ', "not valid JSON"),
    ('["problem", "answer"]', "expected a JSON object"),
    ('{"answer": "a"}', "'problem'"),
    ('{"problem": "x", "answer": null}', "'answer'"),
    ('{"problem": "x", "answer": "a", "images": "a.png"}', "'images' must be a list"),
    ('{"problem": "<image>x", "answer": "a", "images": ["missing.png"]}', "image not found"),
    ('{"problem": "x", "answer": "a", "kind": "fuzzy"}', "unknown verifier kind"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, line, msg):
    good = json.dumps({"problem": "2+2?", "answer": "4"})
    p = _write(tmp_path, [good, good, line])
    with pytest.raises(DataError) as e:
        load_jsonl(p)
    assert f"{p}:3:" in str(e.value) and msg in str(e.value)


def test_placeholder_count_must_match(tmp_path):
    Image.new("RGB", (28, 28)).save(tmp_path / "a.png")
    p = _write(tmp_path, [json.dumps({"problem": "<image><image>x", "answer": "a", "images": ["a.png"]})])
    with pytest.raises(DataError, match=r":1: 2 <image> placeholders for 1 images"):
        load_jsonl(p)


def test_jsonl_splits_hold_out_disjoint_val_and_test(tmp_path):
    p = _write(tmp_path, [json.dumps({"problem": f"q{i}", "answer": str(i)}) for i in range(20)])
    test, val, train = (load_split(p, s) for s in ("test", "val", "train"))
    assert [it["answer"] for it in test] == ["4", "14"]          # lines 5 and 15 (1-based)
    assert [it["answer"] for it in val] == ["9", "19"]           # lines 10 and 20: tuning never sees test
    assert len(train) == 16 and not {it["answer"] for it in train} & {"4", "14", "9", "19"}
    # with a separate test file, validation is still carved out of the train file, never the test file
    t = _write(tmp_path, [json.dumps({"problem": "t", "answer": "x"})] * 3, "t.jsonl")
    assert [it["answer"] for it in load_split(f"{p}:{t}", "val")] == ["9", "19"]
    assert [it["answer"] for it in load_split(f"{p}:{t}", "test")] == ["x", "x", "x"]
    assert len(load_split(f"{p}:{t}", "train")) == 18
    with pytest.raises(DataError, match="neither a built-in task"):
        load_split(str(tmp_path / "nope.jsonl"), "train")


def test_a_file_too_small_to_hold_out_items_is_refused(tmp_path):
    p = _write(tmp_path, [json.dumps({"problem": f"q{i}", "answer": str(i)}) for i in range(3)])
    with pytest.raises(DataError, match=r"3 data lines; at least 10 are needed"):
        load_split(p, "test")


def test_non_utf8_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"problem": "q", "answer": "a"}\n{"problem": "caf\xe9", "answer": "a"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not UTF-8 text \(byte 0xe9 at column 17\)"):
        load_jsonl(str(p))


def test_task_names_drop_the_train_suffix():
    assert task_name("data/add_train.jsonl:data/add_test.jsonl") == "add"
    assert task_name("x/capitals.jsonl") == "capitals" and task_name("left_color") == "left_color"
    assert task_name("_train.jsonl") == "_train"


def test_exact_answers_carry_their_task_candidates(tmp_path):
    assert builtin_items("left_color", "test", 1)[0]["candidates"] == ["red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan"]
    assert builtin_items("add", "test", 1)[0]["candidates"] == []
    p = _write(tmp_path, [json.dumps({"problem": f"q{i}", "answer": a}) for i, a in enumerate(["Paris", "Rome", "2"])])
    assert [it["candidates"] for it in load_jsonl(p)] == [["Paris", "Rome"], ["Paris", "Rome"], []]


def test_ranks_share_one_global_batch():
    from runtime import share
    whole = Stream(["left_color", "add"], 7).next(6)
    parts = [share(Stream(["left_color", "add"], 7).next(6), r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [2, 2, 2]
    assert [p[i]["problem"] for i in range(2) for p in parts] == [it["problem"] for it in whole]  # each item once
    assert share(list("abcdefg"), 1, 3) == ["b", "e"] and share(range(5), 0, 1) == range(5)


def test_text_tasks_for_a_real_chat_model():
    from data.tasks import CAPITAL_SPLITS, CAPITALS
    test, val = CAPITAL_SPLITS["test"], CAPITAL_SPLITS["val"]
    assert len(test) >= 200 and len(set(test)) == len(test) and not set(test) & set(val)   # distinct prompts
    assert [it["problem"] for it in builtin_items("capital", "test", 3)] == [q for q, _ in test[:3]]
    capitals = set(CAPITALS.values())
    assert not capitals & {c.removeprefix("the ") for c in CAPITALS}      # no capital is also a country's name
    for it in builtin_items("parity", "test", 20):
        n = int(it["problem"].split()[1])
        assert it["answer"] == ("even" if n % 2 == 0 else "odd") and it["candidates"] == ["even", "odd"]
    for it in builtin_items("successor", "test", 20):
        assert int(it["answer"]) == int(it["problem"].split()[-1].rstrip("?")) + 1 and it["kind"] == "number"
    assert all(not it["images"] for t in ("capital", "successor", "parity", "multiply")
               for it in builtin_items(t, "val", 2))


def test_an_image_task_is_askable_of_a_vision_model_only():
    from data.tasks import askable, text_model_errors
    text = {"problem": "2+2?", "images": []}
    image = {"problem": "<image> color?", "images": ["a.png"], "where": "t.jsonl:3"}
    assert askable([text, image], vlm=True) and askable([text], vlm=False)
    assert not askable([text, image], vlm=False)
    assert text_model_errors("t.jsonl", [image], vlm=False, model="m") == [
        "t.jsonl:3: has images but m is a text-only model"]
    assert text_model_errors("t.jsonl", [image], vlm=True, model="m") == []
    text["where"] = "t.jsonl:1"  # a file whose first line is text: the message names the line with images
    assert text_model_errors("t.jsonl", [text, image], vlm=False, model="m")[0].startswith("t.jsonl:3:")
