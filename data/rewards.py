"""Answer extraction, normalisation and verifiers: the reward side of every task.

A completion is scored in two steps:
  1. extract the final answer according to the answer *format*:
       plain : the whole completion is the answer (the tiny model answers directly)
       boxed : `<think>...</think>` (optional) then exactly one `\\boxed{...}` (P1)
       tags  : `<think>...</think>` (optional) then exactly one `<answer>...</answer>` (P2)
     A format violation gives answer None; two boxed answers are a violation (no hedging).
  2. compare it with the gold answer using the task's verifier *kind*:
       exact  : equal after normalisation (case, unicode, spaces, punctuation, leading article)
       choice : multiple-choice letter, "B", "(B)", "B." or "B) text" all read as B
       number : the whole answer parses as a number, equal within a relative tolerance
       perm   : a placement "2 4 1 3" of n tiles; partial credit = fraction of positions right (P2 jigsaw); a
                placement with repeats ("2 1 1 4") is scored position by position but can never be all right,
                and a constant guess ("1 1 1 1") gets exactly 1/n, what a random permutation gets on average

reward = 0.9 * accuracy + 0.1 * format   (P1); for `perm`, accuracy = fraction right + 1 if all right (P2).
Nothing here matches by substring, and nothing raises on odd text: a bad answer scores 0.
"""
import math
import re
import unicodedata
from dataclasses import dataclass

FORMATS = ("plain", "boxed", "tags")
KINDS = ("exact", "choice", "number", "perm")

FORMAT_INSTRUCTIONS = {  # appended to the question so that a real chat model knows the format
    "plain": "",
    "boxed": " Think inside <think> </think>, then give the final answer in \\boxed{}.",
    "tags": " Think inside <think> </think>, then give the final answer inside <answer> </answer>.",
}


@dataclass
class Score:
    correct: bool      # the answer is entirely right (what the accuracy matrix counts)
    accuracy: float    # accuracy part of the reward: 0/1, or partial credit for permutations
    format_ok: bool    # the completion follows the answer format

    @property
    def reward(self):
        return reward(self.accuracy, self.format_ok)


def reward(accuracy, format_ok):
    """P1's rule-based reward: 0.9 * accuracy + 0.1 * format."""
    return 0.9 * accuracy + 0.1 * float(format_ok)


# ----------------------------------------------------------------------------- extraction

_THINK = re.compile(r"^\s*(<think>.*?</think>)?(.*)$", re.S)


def _boxed_contents(text):
    """Contents of every \\boxed{...} with balanced braces; None if a brace is never closed."""
    out, i = [], 0
    while True:
        i = text.find("\\boxed{", i)
        if i < 0:
            return out
        j, depth = i + len("\\boxed{"), 1
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:
            return None
        out.append(text[i + len("\\boxed{"):j - 1])
        i = j


def extract_answer(text, fmt="plain"):
    """The final answer in `text` for answer format `fmt`, or None if the format is violated."""
    if not isinstance(text, str):
        return None
    if fmt == "plain":
        ans = text.strip()
        return ans if ans and "\n" not in ans and len(ans) <= 200 else None
    rest = _THINK.match(text).group(2)
    if "<think>" in rest or "</think>" in rest:  # a second or unclosed think block
        return None
    if fmt == "boxed":
        boxes = _boxed_contents(rest)
        return boxes[0].strip() if boxes is not None and len(boxes) == 1 and boxes[0].strip() else None
    if fmt == "tags":
        found = re.findall(r"<answer>(.*?)</answer>", rest, re.S)
        if len(found) != 1 or rest.count("<answer>") != 1:
            return None
        return found[0].strip() or None
    raise ValueError(f"unknown answer format {fmt!r}; expected one of {FORMATS}")


# ----------------------------------------------------------------------------- normalisation

_ARTICLE = re.compile(r"^(a|an|the)\s+")


def normalize(s):
    """Lower case, unicode NFKC, punctuation to spaces (keeping decimal points), spaces collapsed,
    a leading article dropped: "  The Red. " -> "red"."""
    s = unicodedata.normalize("NFKC", s).lower().strip()
    s = "".join(" " if unicodedata.category(c).startswith("P") and c != "." else c for c in s)
    s = re.sub(r"\.(?!\d)", " ", s)  # a period that is not a decimal point
    s = " ".join(s.split())
    return _ARTICLE.sub("", s)


def parse_number(s):
    """The number that `s` is, entirely (commas as thousands separators, a trailing % allowed); else None."""
    s = unicodedata.normalize("NFKC", s).strip().replace(",", "").rstrip("%").strip()
    if not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", s):
        return None
    x = float(s)
    return x if math.isfinite(x) else None


def parse_choice(s):
    """The letter of a multiple-choice answer: "B", "(B)", "B.", "B) text", "b" -> "B"; else None."""
    m = re.fullmatch(r"\(?([A-Za-z])\)?(?:[.:)]\s*.*)?", s.strip(), re.S)
    return m.group(1).upper() if m else None


def parse_placement(s, n):
    """n tile numbers in 1..n separated by spaces or commas (repeats allowed); else None."""
    parts = re.split(r"[\s,]+", s.strip())
    if len(parts) != n or not all(p.isdigit() for p in parts):
        return None
    tiles = [int(p) for p in parts]
    return tiles if all(1 <= t <= n for t in tiles) else None


def parse_perm(s, n=None):
    """A permutation of 1..n written as digits separated by spaces or commas; else None."""
    parts = re.split(r"[\s,]+", s.strip())
    tiles = parse_placement(s, n or len(parts))
    return tiles if tiles is not None and sorted(tiles) == list(range(1, len(tiles) + 1)) else None


# ----------------------------------------------------------------------------- verifiers

def perm_credit(pred, gold):
    """P2's jigsaw accuracy reward: fraction of positions right, + 1 if the whole permutation is right."""
    right = sum(p == g for p, g in zip(pred, gold)) / len(gold)
    return right + (1.0 if right == 1.0 else 0.0)


def verify(answer, gold, kind="exact", rel_tol=1e-2):
    """(correct, accuracy) of an extracted answer against the gold answer string."""
    if answer is None:
        return False, 0.0
    if kind == "exact":
        ok = normalize(answer) == normalize(gold) and normalize(gold) != ""
    elif kind == "choice":
        ok = parse_choice(answer) is not None and parse_choice(answer) == parse_choice(gold)
    elif kind == "number":
        p, g = parse_number(answer), parse_number(gold)
        ok = p is not None and g is not None and math.isclose(p, g, rel_tol=rel_tol, abs_tol=1e-9)
    elif kind == "perm":
        g = parse_perm(gold)
        p = parse_placement(answer, len(g))
        if p is None:
            return False, 0.0
        credit = perm_credit(p, g)
        return credit > 1.0, credit
    else:
        raise ValueError(f"unknown verifier kind {kind!r}; expected one of {KINDS}")
    return ok, float(ok)


def score(completion, gold, kind="exact", fmt="plain"):
    """Score one completion: extraction in format `fmt`, then the verifier `kind`."""
    answer = extract_answer(completion, fmt)
    correct, acc = verify(answer, gold, kind)
    return Score(correct, acc, answer is not None)


def guess_kind(gold):
    """Verifier kind for a user data set that names none: a number, a choice letter, else exact."""
    if parse_number(gold) is not None:
        return "number"
    if re.fullmatch(r"\(?[A-Z]\)?", gold.strip()):
        return "choice"
    return "exact"
