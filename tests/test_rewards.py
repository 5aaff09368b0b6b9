"""Verifiers, extraction and the reward, on hand-written cases (adversarial ones included)."""
import pytest

from data.rewards import extract_answer, normalize, parse_choice, parse_number, parse_perm, parse_placement, \
    perm_credit, reward, score, verify


def test_reward_is_0_9_accuracy_plus_0_1_format():
    assert reward(1.0, True) == pytest.approx(1.0)
    assert reward(0.0, True) == pytest.approx(0.1)
    assert reward(1.0, False) == pytest.approx(0.9)
    assert reward(0.5, True) == pytest.approx(0.55)


@pytest.mark.parametrize("text,fmt,expected", [
    ("red", "plain", "red"),
    ("  red  ", "plain", "red"),
    ("", "plain", None),
    ("   ", "plain", None),
    ("red\nblue", "plain", None),                                 # two lines: not a direct answer
    ("<think>it is round</think> \\boxed{circle}", "boxed", "circle"),
    ("\\boxed{circle}", "boxed", "circle"),                       # think is optional
    ("\\boxed{\\frac{1}{2}}", "boxed", "\\frac{1}{2}"),           # nested braces
    ("\\boxed{red} or \\boxed{blue}", "boxed", None),             # two boxed answers: hedging is a violation
    ("\\boxed{red", "boxed", None),                               # never closed
    ("\\boxed{}", "boxed", None),                                 # empty
    ("the answer is red", "boxed", None),
    ("<think>a</think><think>b</think>\\boxed{red}", "boxed", None),
    ("<think>hmm</think><answer> 2 4 1 3 </answer>", "tags", "2 4 1 3"),
    ("<answer>red</answer><answer>blue</answer>", "tags", None),
    ("<answer></answer>", "tags", None),
    ("<answer>red", "tags", None),
    (None, "plain", None),
])
def test_extract_answer(text, fmt, expected):
    assert extract_answer(text, fmt) == expected


def test_extract_unknown_format_raises():
    with pytest.raises(ValueError):
        extract_answer("x", "json")


@pytest.mark.parametrize("raw,norm", [
    ("Red", "red"), ("  RED. ", "red"), ("the circle", "circle"), ("A  square!", "square"),
    ("3.5", "3.5"), ("left,", "left"), ("ｒｅｄ", "red"),          # full-width unicode folds by NFKC
    ("Theater", "theater"),                                        # "the" only as a whole leading word
])
def test_normalize(raw, norm):
    assert normalize(raw) == norm


def test_exact_match_never_by_substring():
    assert verify("red", "red", "exact") == (True, 1.0)
    assert verify("Red.", "red", "exact") == (True, 1.0)
    assert verify("dark red", "red", "exact") == (False, 0.0)     # answer inside other text
    assert verify("red blue", "red", "exact") == (False, 0.0)
    assert verify("re", "red", "exact") == (False, 0.0)
    assert verify("", "red", "exact") == (False, 0.0)
    assert verify(None, "red", "exact") == (False, 0.0)
    assert verify("...", "...", "exact") == (False, 0.0)           # empty after normalisation never matches


@pytest.mark.parametrize("pred,letter", [("B", "B"), ("(b)", "B"), ("B.", "B"), ("B) a cat", "B"), ("C: dog", "C"),
                                         ("BC", None), ("", None), ("the answer is B", None)])
def test_parse_choice(pred, letter):
    assert parse_choice(pred) == letter


def test_choice_verifier():
    assert verify("(C)", "C", "choice")[0]
    assert not verify("B", "C", "choice")[0]
    assert not verify("answer C", "C", "choice")[0]


@pytest.mark.parametrize("s,x", [("12", 12.0), (" -3.5 ", -3.5), ("1,000", 1000.0), ("50%", 50.0), (".5", 0.5),
                                 ("1e3", 1000.0), ("12 apples", None), ("", None), ("nan", None), ("inf", None),
                                 ("٣", 3.0)])  # a unicode digit is still the digit
def test_parse_number(s, x):
    assert parse_number(s) == x


def test_number_tolerance():
    assert verify("10.0", "10", "number") == (True, 1.0)           # the same number written otherwise
    assert verify("1,024", "1024", "number") == (True, 1.0)
    assert verify("0.30000000000000004", "0.3", "number") == (True, 1.0)   # float rounding
    assert verify("10.05", "10", "number") == (False, 0.0)         # a 1 % tolerance would pass it
    assert verify("318", "319", "number") == (False, 0.0)          # off by one (a real model's reply, read as right
    assert verify("10.2", "10", "number") == (False, 0.0)          # under the old 1 % tolerance)
    assert verify("0", "0", "number") == (True, 1.0)
    assert verify("1e-12", "0", "number") == (True, 1.0)           # absolute tolerance at zero
    assert verify("ten", "10", "number") == (False, 0.0)


def test_perm_partial_credit_by_hand():
    assert parse_perm("2 4 1 3") == [2, 4, 1, 3]
    assert parse_perm("2,4,1,3") == [2, 4, 1, 3]
    assert parse_perm("2 4 1") is None                             # not a permutation of 1..3
    assert parse_perm("2 3 1") == [2, 3, 1]
    assert parse_perm("2 4 1", 4) is None                          # wrong length
    assert parse_perm("2 2 1 3") is None                           # repeated tile
    assert parse_perm("a b c d") is None
    assert perm_credit([2, 4, 1, 3], [2, 4, 1, 3]) == 2.0         # 4/4 right + 1 for the whole
    assert perm_credit([2, 4, 3, 1], [2, 4, 1, 3]) == 0.5         # 2/4 right
    assert perm_credit([4, 3, 2, 1], [2, 4, 1, 3]) == 0.0
    assert verify("2 4 3 1", "2 4 1 3", "perm") == (False, 0.5)
    assert verify("2 4 1 3", "2 4 1 3", "perm") == (True, 2.0)
    assert verify("2 4 1 3 5", "2 4 1 3", "perm") == (False, 0.0)     # five tiles for a four-tile puzzle
    assert verify("2 4 1 5", "2 4 1 3", "perm") == (False, 0.0)       # no tile 5
    assert verify("", "2 4 1 3", "perm") == (False, 0.0)
    # repeats: scored position by position (P2's "tiles placed correctly"), never all right
    assert parse_placement("2 1 1 4", 4) == [2, 1, 1, 4] and parse_perm("2 1 1 4") is None
    assert verify("2 4 1 1", "2 4 1 3", "perm") == (False, 0.75)
    for gold in ("2 4 1 3", "4 3 2 1", "1 3 4 2"):                   # a constant guess gets exactly 1/n
        assert verify("1 1 1 1", gold, "perm") == (False, 0.25)


def test_score_combines_format_and_verifier():
    s = score("<think>x</think>\\boxed{Red}", "red", "exact", "boxed")
    assert (s.correct, s.format_ok, s.reward) == (True, True, pytest.approx(1.0))
    s = score("red", "red", "exact", "boxed")                      # right word, wrong format: nothing
    assert (s.correct, s.format_ok, s.reward) == (False, False, 0.0)
    s = score("blue", "red", "exact", "plain")                     # well formed, wrong: format credit only
    assert s.reward == pytest.approx(0.1)
    s = score("2 4 3 1", "2 4 1 3", "perm", "plain")
    assert s.reward == pytest.approx(0.9 * 0.5 + 0.1)
    s = score("\U0001F600 \x00 \\boxed{", "red", "exact", "boxed")   # garbage never raises
    assert s.reward == 0.0


# ----------------------------------------------------------------------------- free text (--format free)

from data.rewards import chosen_letter, last_number, last_placement, named_candidates, read_free  # noqa
from data.tasks import answer_text  # noqa

CAPITALS = ["Paris", "Rome", "Berlin", "New Delhi", "Delhi"]


@pytest.mark.parametrize("reply,gold,correct,format_ok", [
    ("The capital of France is Paris.", "Paris", True, True),       # a sentence, as a chat model writes
    ("paris", "Paris", True, True),
    ("PARIS!!", "Paris", True, True),
    ("It is Paris, not Rome.", "Paris", False, True),               # two candidates: hedging is wrong
    ("Paris or Rome", "Paris", False, True),
    ("Rome", "Paris", False, True),                                 # a wrong answer was read: format ok
    ("Parisian food is great.", "Paris", False, False),             # the answer inside a longer word
    ("Comparison", "Paris", False, False),
    ("I do not know.", "Paris", False, False),                      # no answer can be read
    ("", "Paris", False, False),
    ("   ", "Paris", False, False),
    ("The capital of India is New Delhi.", "New Delhi", True, True),  # "Delhi" inside "New Delhi" is not a 2nd
    ("The capital of India is Delhi.", "New Delhi", False, True),
    ("ＰＡＲＩＳ", "Paris", True, True),                              # full-width unicode folds by NFKC
    ("Well, " * 2000 + "the answer is Paris.", "Paris", True, True),  # a very long reply
])
def test_free_text_exact_answers(reply, gold, correct, format_ok):
    s = score(reply, gold, "exact", "free", CAPITALS)
    assert (s.correct, s.format_ok) == (correct, format_ok)
    assert s.reward == pytest.approx(0.9 * correct + 0.1 * format_ok)


def test_named_candidates_by_hand():
    assert named_candidates("It is light blue", ["blue", "light blue"]) == ["light blue"]
    assert named_candidates("blue, then light blue", ["blue", "light blue"]) == ["blue", "light blue"]
    assert named_candidates("Red and RED", ["red", "green"]) == ["red"]
    assert named_candidates("reddish", ["red"]) == []


@pytest.mark.parametrize("reply,number", [
    ("3 plus 5 is 8.", "8"),                  # the last number, not the first
    ("The answer is -3", "-3"),
    ("About 1,024 items", "1,024"),
    ("x2 and the 3rd", None),                 # digits inside words are not numbers
    ("It is 2.5.", "2.5"),
    ("no number here", None),
    ("٣ + ٩ = ١٢", "١٢"),                      # Arabic-Indic digits are digits too
])
def test_last_number(reply, number):
    assert last_number(reply) == number


def test_free_text_numbers_score_the_last_number():
    assert score("3 plus 5 equals 8", "8", "number", "free").correct
    assert not score("8 is wrong, it is 9", "8", "number", "free").correct
    assert score("8 is wrong, it is 9", "8", "number", "free").format_ok
    assert not score("eight", "8", "number", "free").format_ok
    assert score("٣ + ٩ = ١٢", "12", "number", "free").correct      # read, and equal to 12


@pytest.mark.parametrize("reply,letter", [
    ("The answer is (B).", "B"), ("B) the circle", "B"), ("C", "C"), ("c.", "C"), ("answer: d", "D"),
    ("(A) or maybe (C)", "C"), ("A red ball", None), ("I think so", None),
])
def test_chosen_letter(reply, letter):
    assert chosen_letter(reply) == letter


def test_free_text_placements():
    assert last_placement("First 1 2 3 4, no: 2 4 1 3.", 4) == "2 4 1 3"
    assert last_placement("2, 4, 1, 3", 4) == "2 4 1 3"
    assert last_placement("tiles 12 3 4 5", 4) is None               # 12 is not a tile number
    assert last_placement("9 9 9 9", 4) is None
    s = score("The order is 2 4 1 3", "2 4 1 3", "perm", "free")
    assert s.correct and s.accuracy == 2.0
    assert read_free("", "2 4 1 3", "perm") is None


def test_answer_text_is_the_inverse_of_extraction():
    for fmt in ("plain", "boxed", "tags", "free"):
        assert score(answer_text("red", fmt), "red", "exact", fmt, ["red", "blue"]).correct
    assert answer_text("red", "boxed") == "\\boxed{red}"
    with pytest.raises(ValueError):
        answer_text("red", "json")


def test_an_item_with_several_valid_answers_accepts_each_and_nothing_else():
    valid, cands = ["red", "blue", "cyan"], ["red", "green", "blue", "yellow", "cyan"]
    for v in valid:  # the canonical answer (red) is one of them, not the only one
        assert score(v, "red", "exact", "plain", cands, valid).correct
        assert score(f"I can see {v} there.", "red", "exact", "free", cands, valid).correct
    assert not score("green", "red", "exact", "plain", cands, valid).correct
    assert not score("red blue", "red", "exact", "plain", cands, valid).correct
    # naming two valid answers is still hedging, in free text too
    assert not score("red and blue", "red", "exact", "free", cands, valid).correct
    s = score("green", "red", "exact", "free", cands, valid)
    assert not s.correct and s.format_ok and abs(s.reward - 0.1) < 1e-12
    assert score("7", "2", "exact", "plain", [str(c) for c in range(1, 10)], ["2", "7"]).reward == 0.9 + 0.1


def test_restate_puts_the_canonical_answer_in_the_reply_s_own_words():
    """SFT's voice-only label: the reply's wording kept, its answer replaced (the last place it states one)."""
    from data.rewards import restate
    colours = ["red", "blue", "cyan", "light blue"]
    assert restate("It is cyan.", "blue", "exact", colours) == "It is blue."
    assert restate("The answer is Red!", "blue", "exact", colours) == "The answer is blue!"
    assert restate("I see light blue.", "red", "exact", colours) == "I see red."      # the longer name, whole
    assert restate("blue", "red", "exact", colours) == "red"                          # a bare reply stays bare
    assert restate("The sum of 3 and 5 is 9.", "8", "number") == "The sum of 3 and 5 is 8."
    assert restate("Tiles: 1 2 3 4, so 2 1 3 4.", "2 4 1 3", "perm") == "Tiles: 1 2 3 4, so 2 4 1 3."
    assert restate("The answer is (B).", "C", "choice") == "The answer is (C)."
    assert restate("\\boxed{9}", "8", "number") == "\\boxed{8}"                       # a format's wrapping kept
    # no single answer stated: no label (read_free would read none either)
    assert restate("red or blue", "blue", "exact", colours) is None
    assert restate("I do not know.", "blue", "exact", colours) is None
    assert restate("", "8", "number") is None and restate("no number", "8", "number") is None
