"""Answer extraction, normalisation and verifiers: the reward side of every task.

A completion is scored in two steps:
  1. extract the final answer according to the answer *format*:
       plain : the whole completion is the answer (the tiny model answers directly)
       boxed : `<think>...</think>` (optional) then exactly one `\\boxed{...}` (P1)
       tags  : `<think>...</think>` (optional) then exactly one `<answer>...</answer>` (P2)
       free  : read from the model's own words, the way the verifier kind needs (see `read_free`): a real chat
               model answers "The capital of France is Paris.", and whether it obeys a format is not knowledge
     A format violation gives answer None; two boxed answers are a violation (no hedging).
  2. compare it with the gold answer (or, for an item with several valid answers, with each) using the task's
     verifier *kind*:
       exact  : equal after normalisation (case, unicode, spaces, punctuation, leading article)
       choice : multiple-choice letter, "B", "(B)", "B." or "B) text" all read as B
       number : the whole answer parses as a number, equal up to float rounding (NUMBER_REL_TOL)
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

FORMATS = ("plain", "boxed", "tags", "free")
KINDS = ("exact", "choice", "number", "perm")

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
    """The final answer in `text` for answer format `fmt`, or None if the format is violated. For "free" the
    whole reply (see `read_free` for how an answer is then read out of it)."""
    if not isinstance(text, str):
        return None
    if fmt == "free":
        return text.strip() or None
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
_MARKS = "`´"


def normalize(s):
    """Lower case, unicode NFKC, punctuation to spaces (keeping decimal points), spaces collapsed,
    a leading article dropped: "  The Red. " -> "red"."""
    s = unicodedata.normalize("NFKC", s).lower().strip()
    # quotes, emphasis and code marks around an answer are no part of it: `new`, "new", “new”, **new** read new
    # (the backtick is a modifier symbol in Unicode, not punctuation, so it is named)
    s = "".join(" " if (unicodedata.category(c).startswith("P") or c in _MARKS) and c != "." else c for c in s)
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


# ----------------------------------------------------------------------------- reading free text

_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w])")
_CHOICE = re.compile(r"\(([A-Z])\)|(?<![\w(])([A-Z])\)|\b(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-Z])\b", re.I)


def last_number(text):
    """The last number written as a whole word in `text` ("12", "-3", "1,024", "2.5"); digits inside a word
    ("x2", "3rd") are not numbers. None if there is none."""
    found = _NUMBER.findall(unicodedata.normalize("NFKC", text))
    return found[-1] if found else None


def chosen_letter(text):
    """The multiple-choice letter a reply chooses: the last "(B)", "B)" or "answer is B"; else a reply that is
    just a letter ("B", "B. text"). None if there is none."""
    text = unicodedata.normalize("NFKC", text)
    found = [next(g for g in m.groups() if g) for m in _CHOICE.finditer(text)]
    if found:
        return found[-1].upper()
    return parse_choice(text) if re.match(r"\s*\(?[A-Za-z]\)?(?:[.:)\s]|$)", text) else None


def named_candidates(text, candidates):
    """The candidate answers `text` names as whole words after normalisation, in order. An occurrence inside a
    longer candidate's occurrence does not count ("light blue" names "light blue", not also "blue")."""
    words = normalize(text).split()
    spans = []  # (start, end, candidate)
    for cand in dict.fromkeys(candidates):
        cw = normalize(cand).split()
        if not cw:
            continue
        spans += [(i, i + len(cw), cand) for i in range(len(words) - len(cw) + 1) if words[i:i + len(cw)] == cw]
    inside = lambda a, b: b[0] <= a[0] and a[1] <= b[1] and (b[1] - b[0]) > (a[1] - a[0])
    kept = [a for a in spans if not any(inside(a, b) for b in spans)]
    return list(dict.fromkeys(c for _, _, c in sorted(kept)))


def placements(text, n):
    """Every run of n tile numbers (1..n) in `text`, as regex matches in order (read_free reads the last one;
    restate replaces it)."""
    runs = re.finditer(r"(?<!\d)\d(?:[\s,]+\d){%d}(?!\d)" % (n - 1), text) if n > 0 else []
    return [m for m in runs if parse_placement(m.group(), n) is not None]


def last_placement(text, n):
    """The last run of n tile numbers (1..n) in `text`, as "2 4 1 3"; None if there is none."""
    found = placements(text, n)
    return " ".join(map(str, parse_placement(found[-1].group(), n))) if found else None


def read_free(text, gold, kind, candidates=()):
    """The answer a free-text reply gives, in the form `verify` reads, or None when no answer can be read:
      number : the last number;   choice : the chosen letter;   perm : the last placement of n tiles;
      exact  : the one candidate of the task (gold included) the reply names as whole words; a reply that names
               several gives them all ("red | blue"), which is wrong: listing every option is no answer."""
    if not isinstance(text, str) or not text.strip():
        return None
    if kind == "number":
        return last_number(text)
    if kind == "choice":
        return chosen_letter(text)
    if kind == "perm":
        return last_placement(text, len(gold.split()))
    if kind == "exact":
        named = named_candidates(text, [gold, *candidates])
        return " | ".join(named) if named else None
    raise ValueError(f"unknown verifier kind {kind!r}; expected one of {KINDS}")


def _answer_spans(text, gold, kind, candidates):
    """(start, end) of every place in `text` where it states an answer, for `restate`: each number, each run of n
    tile numbers, each chosen letter, or each candidate named as whole words (case and spacing aside)."""
    if kind == "number":
        return [m.span() for m in _NUMBER.finditer(text)]
    if kind == "perm":
        return [m.span() for m in placements(text, len(gold.split()))]
    if kind == "choice":
        return [m.span(next(i for i, g in enumerate(m.groups(), 1) if g)) for m in _CHOICE.finditer(text)]
    spans = []
    for cand in dict.fromkeys([gold, *candidates]):
        words = cand.split()
        if words:
            pattern = r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)"
            spans += [m.span() for m in re.finditer(pattern, text, re.I)]
    return [a for a in spans if not any(b[0] <= a[0] and a[1] <= b[1] and b != a for b in spans)]


def restate(text, canonical, kind, candidates=()):
    """The reply `text` saying `canonical` instead of the answer it gives: the last place it states an answer is
    replaced, the rest of its words kept ("It is cyan." -> "It is blue."). This is SFT's voice-only label: the
    canonical answer in the model's own wording. None when the reply states no answer, or hedges between several
    candidates (read_free would give no single answer either)."""
    if not isinstance(text, str) or not text.strip():
        return None
    named = read_free(text, canonical, kind, candidates) if kind == "exact" else ""
    if named is None or " | " in named:
        return None
    spans = _answer_spans(text, canonical, kind, candidates)
    if not spans:
        return None
    start, end = max(spans)
    return text[:start] + canonical + text[end:]


# ----------------------------------------------------------------------------- verifiers

def perm_credit(pred, gold):
    """P2's jigsaw accuracy reward: fraction of positions right, + 1 if the whole permutation is right."""
    right = sum(p == g for p, g in zip(pred, gold)) / len(gold)
    return right + (1.0 if right == 1.0 else 0.0)


NUMBER_REL_TOL = 1e-6  # "8.0" is 8 and "1,024" is 1024, but 318 is not 319: a 1 % tolerance passed off-by-one answers


def verify(answer, gold, kind="exact", rel_tol=NUMBER_REL_TOL):
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


def score(completion, gold, kind="exact", fmt="plain", candidates=(), valid=()):
    """Score one completion: extraction in format `fmt` (for "free", reading with the task's `candidates`),
    then the verifier `kind`. `valid`: every answer that is right, for an item with several (the gold, which SFT
    teaches, is one of them); the best of them counts."""
    answer = extract_answer(completion, fmt)
    if fmt == "free":
        answer = read_free(answer, gold, kind, [*valid, *candidates])
    correct, acc = max((verify(answer, g, kind) for g in (valid or [gold])), key=lambda r: r[1])
    return Score(correct, acc, answer is not None)


def guess_kind(gold):
    """Verifier kind for a user data set that names none: a number, a choice letter, else exact."""
    if parse_number(gold) is not None:
        return "number"
    if re.fullmatch(r"\(?[A-Z]\)?", gold.strip()):
        return "choice"
    return "exact"
