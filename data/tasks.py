"""The synthetic task suite (drawn with Pillow, deterministic by seed) and the JSONL loader for user data.

Every built-in image is an 84x84 scene: a grey background and coloured shapes. With Qwen2.5-VL's 14-pixel
patches and 2x2 merge this is 36 patches -> 9 image tokens, small enough for a 2-core CPU; a 3x3 grid of 28-pixel
cells is one image token per cell.

General tasks (held out from every CPT stage; the base model masters them; the analogue of MMMU/POPE/MMLU):
  color       one object                       "What color is the object?"            8 colours
  shape       one big object                   "What shape is the object?"            circle|square|triangle
  side        one object, left or right half   "Is the object on the left or right?"  left|right
  add         text only                        "What is 3 plus 5?"                    0..18
CPT tasks with several valid answers (the mechanism: an SFT label is one canonical answer, chosen by a fixed rule
as real annotations are, while RFT may keep any valid answer the model already gives):
  any_color   2-4 objects in a 3x3 grid        "Name a color in the picture."         any colour present (K = 2-4)
  circle_cell 5-6 objects in a 3x3 grid        "Name a cell (1-9) with a circle."     any cell holding a circle (K = 2-4)
    canonical SFT answer: the first valid one in palette / reading order. Instance difficulty: on most of
    the items (3/4) every object is tiny (radius 3-4 px) and the base's habit is a fixed favourite guess; on the
    rest one object is big, and its habit is to name the biggest (see _habit).
CPT tasks with a unique answer (K = 1; the control: no SFT-vs-RFT gap is predicted):
  left_color  two objects in diagonal quadrants "What color is the left object?"
  jigsaw      a framed scene cut 2x2, tiles shuffled; answer = where each tile came from, "2 4 1 3" (P2)
  right_shape, top_color   the left_color scenes asked otherwise (left_color and top_color disagree on half of them)
The default sequence is any_color, circle_cell, left_color, jigsaw: two multi-answer tasks, the control, P2's jigsaw.

An item is a dict: {"problem": text with one "<image>" per image, "answer": str (the canonical answer SFT
teaches), "valid": [every answer the verifier accepts] (multi-answer tasks only), "images": [PIL images or paths],
"kind": verifier kind (see rewards.py)}.
"""
import json
import os
import random

from PIL import Image, ImageDraw

from data.rewards import FORMATS, KINDS, guess_kind, verify

SIZE = 84
COLORS = {"red": (215, 45, 40), "green": (40, 165, 70), "blue": (45, 85, 215), "yellow": (225, 195, 35),
          "purple": (135, 50, 175), "orange": (245, 135, 20), "pink": (245, 130, 200), "cyan": (40, 205, 215)}
SHAPES = ("circle", "square", "triangle")
SPLIT_OFFSET = {"train": 0, "val": 1_000_000, "test": 2_000_000}  # disjoint seeds per split


# ----------------------------------------------------------------------------- drawing

def _jitter(rgb, rng, amount=25):
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _canvas(rng):
    g = rng.randint(175, 225)
    return Image.new("RGB", (SIZE, SIZE), (g, g, g))


def _draw(img, rng, shape, color, cx, cy, r):
    d = ImageDraw.Draw(img)
    fill = _jitter(COLORS[color], rng)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = int(r * 0.85)
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + int(0.8 * r)), (cx + r, cy + int(0.8 * r))], fill=fill)


def _two_diagonal(rng):
    """Two objects of different colours and shapes in opposite quadrants (TL+BR or TR+BL):
    a (colour, column, row, shape) tuple each."""
    c1, c2 = rng.sample(list(COLORS), 2)
    s1, s2 = rng.sample(SHAPES, 2)
    quads = rng.choice([((0, 0), (1, 1)), ((1, 0), (0, 1))])  # (col, row)
    img = _canvas(rng)
    objs = []
    for color, shape, (qx, qy) in zip((c1, c2), (s1, s2), quads):
        r = rng.randint(9, 13)
        cx = qx * 42 + rng.randint(r + 2, 40 - r)
        cy = qy * 42 + rng.randint(r + 2, 40 - r)
        _draw(img, rng, shape, color, cx, cy, r)
        objs.append((color, qx, qy, shape))
    return img, objs


# ----------------------------------------------------------------------------- generators
# Each returns (problem, answer, images, kind, weak_answer[, valid answers]): weak_answer is a plausible guess that
# does not (or not always) use the task's rule, for the base model's "weak exposure" to CPT tasks (it learns the
# answer form, not the skill).

def gen_color(rng):
    img = _canvas(rng)
    color, r = rng.choice(list(COLORS)), rng.randint(8, 18)
    _draw(img, rng, rng.choice(SHAPES), color, rng.randint(r + 2, SIZE - r - 3), rng.randint(r + 2, SIZE - r - 3), r)
    return "<image>What color is the object?", color, [img], "exact", color


def gen_shape(rng):
    img = _canvas(rng)
    shape, r = rng.choice(SHAPES), rng.randint(15, 22)
    _draw(img, rng, shape, rng.choice(list(COLORS)), rng.randint(r + 2, SIZE - r - 3), rng.randint(r + 2, SIZE - r - 3), r)
    return "<image>What shape is the object?", shape, [img], "exact", shape


def gen_side(rng):
    img = _canvas(rng)
    side, r = rng.choice(["left", "right"]), rng.randint(8, 14)
    cx = rng.randint(r + 2, 38 - r) if side == "left" else rng.randint(46 + r, SIZE - r - 3)
    _draw(img, rng, rng.choice(SHAPES), rng.choice(list(COLORS)), cx, rng.randint(r + 2, SIZE - r - 3), r)
    return "<image>Is the object on the left or right?", side, [img], "exact", side


def gen_add(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"What is {a} plus {b}?", str(a + b), [], "number", str(a + b)


def gen_left_color(rng):
    img, objs = _two_diagonal(rng)
    left = next(c for c, qx, _, _ in objs if qx == 0)
    return "<image>What color is the left object?", left, [img], "exact", rng.choice(objs)[0]


def gen_top_color(rng):
    img, objs = _two_diagonal(rng)
    top = next(c for c, _, qy, _ in objs if qy == 0)
    return "<image>What color is the top object?", top, [img], "exact", rng.choice(objs)[0]


def gen_right_shape(rng):
    """The left_color / top_color scenes, asked for a shape: both objects are equally salient, so a base that names
    a shape in the picture is right about half the time (a big-vs-small version was not: the general `shape` prior
    reads the big object, so "the big one" started at 68 % and "the small one" at 3 %)."""
    img, objs = _two_diagonal(rng)
    right = next(s for _, qx, _, s in objs if qx == 1)
    return "<image>What shape is the right object?", right, [img], "exact", rng.choice(objs)[3]


def gen_jigsaw(rng, grid=2):
    """P2's jigsaw on a framed scene: the frame on a tile's outer edges tells which corner it came from.
    shuffled position p shows original tile perm[p]; the answer lists perm[p] + 1 in reading order."""
    img = _canvas(rng)
    for _ in range(rng.randint(1, 2)):
        r = rng.randint(7, 12)
        _draw(img, rng, rng.choice(SHAPES), rng.choice(list(COLORS)), rng.randint(r + 8, SIZE - r - 9),
              rng.randint(r + 8, SIZE - r - 9), r)
    ImageDraw.Draw(img).rectangle([0, 0, SIZE - 1, SIZE - 1], outline=(20, 20, 20), width=6)
    n, t = grid * grid, SIZE // grid
    perm = list(range(n))
    while perm == sorted(perm):  # never the identity: the puzzle must be shuffled
        rng.shuffle(perm)
    out = Image.new("RGB", (SIZE, SIZE))
    for p, src in enumerate(perm):
        tile = img.crop(((src % grid) * t, (src // grid) * t, (src % grid + 1) * t, (src // grid + 1) * t))
        out.paste(tile, ((p % grid) * t, (p // grid) * t))
    weak = rng.sample(range(1, n + 1), n)
    problem = "<image>The four tiles of this picture were shuffled. Where did each tile come from?"
    return problem, " ".join(str(s + 1) for s in perm), [out], "perm", " ".join(map(str, weak))


def _grid_scene(rng, n, tiny):
    """n objects of distinct colours in distinct cells of a 3x3 grid (cell 1 top left, reading order); all tiny
    (radius 3-4 px) or of mixed sizes (one big, radius 9-11, the others 4-8). Returns the image and (colour, shape, cell, radius) tuples."""
    img = _canvas(rng)
    cells, colors = rng.sample(range(9), n), rng.sample(list(COLORS), n)
    radii = [rng.randint(3, 4) if tiny else rng.randint(4, 8) for _ in range(n)]
    if not tiny:
        radii[rng.randrange(n)] = rng.randint(9, 11)
    objs = []
    for cell, color, r in zip(cells, colors, radii):
        shape = rng.choice(SHAPES)
        cx = (cell % 3) * 28 + 14 + rng.randint(-(12 - r), 12 - r)
        cy = (cell // 3) * 28 + 14 + rng.randint(-(12 - r), 12 - r)
        _draw(img, rng, shape, color, cx, cy, r)
        objs.append((color, shape, cell + 1, r))
    return img, objs


def _habit(rng, habit, candidates):
    """The base's exposure label for a multi-answer task: 80 % of the time its habit, else any candidate. The habit
    is sharp, as a real model's is: on an item it can see (one object is big) the biggest object's answer, which is
    always valid; on an item of tiny objects a fixed favourite (FAVOURITE), a guess that is right only when the
    favourite happens to be in the picture. So the base starts at about half on these tasks, its own correct answers
    are mostly one answer per item, and the canonical SFT answer (the first valid one by a fixed rule) is that answer
    only by chance (never on a tiny item: the favourite is last in the rule's order). The 20 % of other answers keep
    every answer sampleable, so RFT can find the right ones on the items the habit gets wrong. (A first version drew
    the habit in proportion to salience and uniformly on tiny items: the base came out diffuse, ~1.9 nats per answer,
    and its own answers were no more likely than the canonical ones; see README.)"""
    return habit if rng.random() < 0.8 else rng.choice(candidates)


TINY_FRACTION = 3 / 4  # items whose objects are all tiny: the hard instances of the multi-answer tasks
FAVOURITE = {"any_color": "cyan", "circle_cell": "9"}  # the base's guess on tiny items: last in the canonical order


def gen_any_color(rng):
    tiny = rng.random() < TINY_FRACTION
    img, objs = _grid_scene(rng, rng.randint(2, 4), tiny)
    valid = [c for c in COLORS if any(o[0] == c for o in objs)]  # palette order: the first is the canonical answer
    habit = FAVOURITE["any_color"] if tiny else max(objs, key=lambda o: o[3])[0]
    weak = _habit(rng, habit, list(COLORS))
    return "<image>Name a color in the picture.", valid[0], [img], "exact", weak, valid


def gen_circle_cell(rng):
    tiny = rng.random() < TINY_FRACTION
    while True:
        img, objs = _grid_scene(rng, rng.randint(5, 6), tiny)
        circles = [o for o in objs if o[1] == "circle"]
        if 2 <= len(circles) <= 4:
            break
    valid = sorted(str(o[2]) for o in circles)  # reading order: the lowest cell is the canonical answer
    habit = FAVOURITE["circle_cell"] if tiny else str(max(circles, key=lambda o: o[3])[2])
    weak = _habit(rng, habit, [str(c) for c in range(1, 10)])
    return "<image>Name a cell (1-9) with a circle.", valid[0], [img], "exact", weak, valid


# The tiny base's voice: it answers every task in a short sentence of its own, from a few templates it prefers
# unevenly, as a chat model has its habits of phrasing. SFT's labels stay what data sets hold, the bare canonical
# answer, so that they differ from the base's own replies in *how* the answer is said as well as in *which* answer
# (the real chat model's labels do both: "8" against "The sum of 3 and 5 is 8.").
VOICE = {"It is {}.": 0.6, "The answer is {}.": 0.3, "I see {}.": 0.1}


def in_voice(answer, rng):
    """The answer said in one of the base's templates, drawn by its preference (make_base's pre-training labels)."""
    return rng.choices(list(VOICE), list(VOICE.values()))[0].format(answer)


# every answer a task can have: a free-text reply that names two of them is hedging, not answering (rewards.read_free)
CANDIDATES = {"color": list(COLORS), "shape": list(SHAPES), "side": ["left", "right"], "left_color": list(COLORS),
              "right_shape": list(SHAPES), "top_color": list(COLORS), "any_color": list(COLORS),
              "circle_cell": [str(c) for c in range(1, 10)]}

# ----------------------------------------------------------------------------- text tasks for a real chat model
# (compare.sh --real): knowledge a small pretrained chat model already has, and skills it can still learn; read
# from its sentences with --format free. Capitals without accents or disputed spellings, so that whole-word reading
# is fair; the capital's country is never one of the candidates, so "Mexico City, Mexico" names one answer.

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "the United Kingdom": "London", "Ireland": "Dublin", "Belgium": "Brussels", "Austria": "Vienna",
    "Poland": "Warsaw", "the Czech Republic": "Prague", "Hungary": "Budapest", "Greece": "Athens",
    "Sweden": "Stockholm", "Norway": "Oslo", "Denmark": "Copenhagen", "Finland": "Helsinki", "Iceland": "Reykjavik",
    "Russia": "Moscow", "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb",
    "Slovakia": "Bratislava", "Slovenia": "Ljubljana", "Lithuania": "Vilnius", "Latvia": "Riga", "Estonia": "Tallinn",
    "Belarus": "Minsk", "Albania": "Tirana", "Malta": "Valletta", "Cyprus": "Nicosia", "Japan": "Tokyo",
    "China": "Beijing", "South Korea": "Seoul", "North Korea": "Pyongyang", "India": "New Delhi",
    "Pakistan": "Islamabad", "Bangladesh": "Dhaka", "Nepal": "Kathmandu", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "Cambodia": "Phnom Penh", "Laos": "Vientiane", "Malaysia": "Kuala Lumpur", "Indonesia": "Jakarta",
    "the Philippines": "Manila", "Afghanistan": "Kabul", "Iran": "Tehran", "Iraq": "Baghdad", "Syria": "Damascus",
    "Lebanon": "Beirut", "Jordan": "Amman", "Saudi Arabia": "Riyadh", "Qatar": "Doha", "Oman": "Muscat",
    "the United Arab Emirates": "Abu Dhabi", "Turkey": "Ankara", "Uzbekistan": "Tashkent", "Georgia": "Tbilisi",
    "Armenia": "Yerevan", "Azerbaijan": "Baku", "Egypt": "Cairo", "Kenya": "Nairobi", "Ethiopia": "Addis Ababa",
    "Morocco": "Rabat", "Algeria": "Algiers", "Tunisia": "Tunis", "Libya": "Tripoli", "Sudan": "Khartoum",
    "Ghana": "Accra", "Senegal": "Dakar", "Nigeria": "Abuja", "Uganda": "Kampala", "Zimbabwe": "Harare",
    "Zambia": "Lusaka", "Angola": "Luanda", "Mozambique": "Maputo", "Somalia": "Mogadishu", "Rwanda": "Kigali",
    "Mali": "Bamako", "Niger": "Niamey", "the United States": "Washington", "Canada": "Ottawa",
    "Mexico": "Mexico City", "Cuba": "Havana", "Jamaica": "Kingston", "Haiti": "Port-au-Prince",
    "Guatemala": "Guatemala City", "Honduras": "Tegucigalpa", "Nicaragua": "Managua", "Panama": "Panama City",
    "Venezuela": "Caracas", "Ecuador": "Quito", "Peru": "Lima", "Chile": "Santiago", "Argentina": "Buenos Aires",
    "Uruguay": "Montevideo", "Australia": "Canberra", "New Zealand": "Wellington", "Fiji": "Suva"}
CAPITAL_QUESTIONS = ("What is the capital of {}?", "Which city is the capital of {}?", "Name the capital city of {}.")


def _enumerated(pairs, salt):
    """A fixed task of finitely many prompts, shuffled once and split 2/3 test, 1/3 validation (general tasks are
    never trained on): each split lists distinct prompts, cycled if more are asked for."""
    pairs = sorted(pairs)
    random.Random(salt).shuffle(pairs)
    cut = 2 * len(pairs) // 3
    return {"test": pairs[:cut], "val": pairs[cut:], "train": pairs[cut:]}


CAPITAL_SPLITS = _enumerated([(q.format(c), a) for c, a in CAPITALS.items() for q in CAPITAL_QUESTIONS], "capital")


def gen_capital(rng, index=0, split="test"):
    pairs = CAPITAL_SPLITS[split]
    problem, answer = pairs[index % len(pairs)]
    return problem, answer, [], "exact", answer


def gen_successor(rng):
    n = rng.randint(10, 998)
    return f"What number comes right after {n}?", str(n + 1), [], "number", str(n + 1)


def gen_parity(rng):
    n = rng.randint(10, 999)
    answer = "even" if n % 2 == 0 else "odd"
    return f"Is {n} an even or an odd number?", answer, [], "exact", answer


def gen_multiply(rng):
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"What is {a} times {b}?", str(a * b), [], "number", str(a * b)


CANDIDATES.update(capital=sorted(set(CAPITALS.values())), parity=["even", "odd"])
ENUMERATED = {"capital"}  # generators that take (rng, index, split): a fixed list of distinct prompts
TEXT = {"capital": gen_capital, "successor": gen_successor, "parity": gen_parity, "multiply": gen_multiply}

GENERAL = {"color": gen_color, "shape": gen_shape, "side": gen_side, "add": gen_add}
MULTI = {"any_color": gen_any_color, "circle_cell": gen_circle_cell}  # several valid answers per item
CPT = {**MULTI, "left_color": gen_left_color, "jigsaw": gen_jigsaw, "right_shape": gen_right_shape,
       "top_color": gen_top_color}
BUILTIN = {**GENERAL, **CPT, **TEXT}
DEFAULT_SEQUENCE = ["any_color", "circle_cell", "left_color", "jigsaw"]
DEFAULT_GENERAL = list(GENERAL)


def distinct_items(spec, split):
    """How many distinct items a built-in task's split holds (None: as many as asked, drawn at random)."""
    return len(CAPITAL_SPLITS[split]) if spec == "capital" else None


def builtin_items(name, split, n, start=0, weak=False):
    """Items start..start+n-1 of a built-in task's split; each item is seeded by (task, split, index)."""
    gen = BUILTIN[name]
    if name in ENUMERATED and split != "train":  # evaluating: each distinct item once, never repeated (training
        n = max(0, min(n, distinct_items(name, split) - start))  # streams cycle)
    out = []
    for i in range(start, start + n):
        rng = random.Random(f"{name}/{SPLIT_OFFSET[split] + i}")
        problem, answer, images, kind, weak_answer, *valid = gen(rng, i, split) if name in ENUMERATED else gen(rng)
        item = {"problem": problem, "answer": weak_answer if weak else answer, "images": images, "kind": kind,
                "candidates": CANDIDATES.get(name, [])}
        if valid and not weak:
            item["valid"] = valid[0]
        out.append(item)
    return out


# ----------------------------------------------------------------------------- how an item is asked and answered

FORMAT_INSTRUCTIONS = {  # appended to the question so that a real chat model knows the format
    "plain": "",
    "boxed": " Think inside <think> </think>, then give the final answer in \\boxed{}.",
    "tags": " Think inside <think> </think>, then give the final answer inside <answer> </answer>.",
    "free": " Answer briefly.",  # a hint only: rewards.read_free does not depend on it being followed
}


def answer_text(answer, fmt):
    """The inverse of extraction (rewards.extract_answer): how the gold answer is written in format `fmt` (what SFT
    teaches)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown answer format {fmt!r}; expected one of {FORMATS}")
    return {"boxed": f"\\boxed{{{answer}}}", "tags": f"<answer>{answer}</answer>"}.get(fmt, answer)


# ----------------------------------------------------------------------------- user data (EasyR1-style JSONL)

class DataError(ValueError):
    """A bad line in a user data file; the message names the file and the line."""


def load_jsonl(path):
    """Read `{"problem": "... <image> ...", "answer": "...", "images": ["rel/path.png"], "kind": optional,
    "valid": optional [every right answer]}` lines. Image paths are relative to the JSONL file. Every problem is checked before anything runs."""
    items, base = [], os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line, parse_constant=_no_constant)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            except ValueError as e:  # NaN / Infinity: Python's json reads them, strict JSON has no such value
                raise DataError(f"{where}: {e}") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for key in ("problem", "answer"):
                if not isinstance(row.get(key), (str, int, float)) or isinstance(row.get(key), bool):
                    raise DataError(f"{where}: missing or non-text field {key!r}")
            images = row.get("images", [])
            if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
                raise DataError(f"{where}: 'images' must be a list of paths")
            paths = [p if os.path.isabs(p) else os.path.join(base, p) for p in images]
            for p in paths:
                if not os.path.isfile(p):
                    raise DataError(f"{where}: image not found: {p}")
                try:
                    with Image.open(p) as im:
                        im.verify()  # reads the header and checks the file's structure, without decoding it
                except Exception as e:  # PIL raises several kinds for a file that is no image
                    raise DataError(f"{where}: {p} is not an image PIL can read ({type(e).__name__}: {e})") from None
            if not str(row["answer"]).strip():
                raise DataError(f"{where}: the answer is empty; SFT would teach an empty reply and every verifier "
                                f"would score it wrong: give the answer, or drop the line")
            problem = str(row["problem"])
            if problem.count("<image>") not in (0, len(paths)):
                raise DataError(f"{where}: {problem.count('<image>')} <image> placeholders for {len(paths)} images")
            if paths and "<image>" not in problem:
                problem = "<image>" * len(paths) + problem
            kind = row.get("kind") or guess_kind(str(row["answer"]))
            if kind not in KINDS:
                raise DataError(f"{where}: unknown verifier kind {kind!r}; expected one of {KINDS}")
            item = {"problem": problem, "answer": str(row["answer"]), "images": paths, "kind": kind, "where": where}
            if "valid" in row:  # several right answers; "answer" is the one SFT teaches
                valid = row["valid"]
                if not isinstance(valid, list) or not valid or not all(isinstance(v, str) for v in valid):
                    raise DataError(f"{where}: 'valid' must be a non-empty list of answers")
                if item["answer"] not in valid:
                    raise DataError(f"{where}: the answer {item['answer']!r} is not one of its 'valid' answers")
                item["valid"] = valid
            never = [a for a in item.get("valid", [item["answer"]]) if not verify(a, a, kind)[0]]
            if never:
                raise DataError(f"{where}: the answer {never[0]!r} can never be scored right by the {kind!r} "
                                f"verifier (not even when the reply is the answer itself): fix the answer or 'kind'")
            items.append(item)
    if not items:
        raise DataError(f"{path}: no data lines")
    exact = sorted({a for it in items if it["kind"] == "exact" for a in it.get("valid", [it["answer"]])})
    for it in items:  # the answers this data set has: what a free-text reply must not hedge between
        it["candidates"] = exact if it["kind"] == "exact" else []
    return items


def _no_constant(name):
    raise ValueError(f"the literal {name} is no answer (strict JSON has no NaN or Infinity): write the answer as "
                     f"text, or drop the line")


def open_image(img, where="?"):
    """A PIL RGB image from an item's image entry (already an image, or a path)."""
    if isinstance(img, Image.Image):
        return img
    try:
        with Image.open(img) as im:
            return im.convert("RGB")
    except OSError as e:
        raise DataError(f"{where}: cannot read image {img}: {e}") from None


# ----------------------------------------------------------------------------- task specs

def askable(items, vlm):
    """Whether a model can be asked these items: a vision-language model (vlm) any, a text-only one only items
    without images (an image task is n/a for it: refused for training, left out of evaluation)."""
    return vlm or not any(it["images"] for it in items)


def text_model_errors(spec, items, vlm, model):
    """The refusal of an image task for a text-only model, before any load: as a message in a list (or none)."""
    if askable(items, vlm):
        return []
    first = next(it for it in items if it["images"])
    return [f"{first.get('where', spec)}: has images but {model} is a text-only model"]


def task_name(spec):
    """Short column name of a task spec: the built-in name, or the JSONL file's stem without a "_train" suffix
    ("data/add_train.jsonl:data/add_test.jsonl" -> "add")."""
    if spec in BUILTIN:
        return spec
    stem = os.path.splitext(os.path.basename(spec.split(":")[0]))[0]
    return stem[:-len("_train")] if stem.endswith("_train") and len(stem) > len("_train") else stem


HOLD_OUT = 10  # JSONL: of every 10 lines, one is validation and one test (one file), or one validation (two files)


def _held_out(i, split, has_test_file):
    """Which split line i of a train file belongs to: val and test never share a line, so tuning on val never
    sees test."""
    if i % HOLD_OUT == HOLD_OUT - 1:
        return "val"
    if i % HOLD_OUT == HOLD_OUT // 2 - 1 and not has_test_file:
        return "test"
    return "train"


def load_split(spec, split, n=None, start=0):
    """Items of a task spec for a split. Built-in: generated. JSONL: `train.jsonl[:test.jsonl]`; with one file,
    lines 5, 15, 25, ... are test and 10, 20, 30, ... validation (1-based); with two, test is the second file and
    validation every 10th line of the first. A file too small to hold out one item per split is refused."""
    if spec in BUILTIN:
        return builtin_items(spec, split, n if n is not None else 500, start)
    train_path, _, test_path = spec.partition(":")
    for path in filter(None, (train_path, test_path)):
        if not os.path.isfile(path):
            raise DataError(f"task {spec!r}: {path} is neither a built-in task ({', '.join(BUILTIN)}) nor an "
                            f"existing file")
    if test_path and split == "test":
        items = load_jsonl(test_path)
    else:
        items = load_jsonl(train_path)
        if len(items) < HOLD_OUT:
            raise DataError(f"{train_path}: {len(items)} data lines; at least {HOLD_OUT} are needed to hold out "
                            f"validation{'' if test_path else ' and test'} items (one line in {HOLD_OUT} each)")
        items = [it for i, it in enumerate(items) if _held_out(i, split, bool(test_path)) == split]
    items = items[start:]
    return items[:n] if n is not None else items


# ----------------------------------------------------------------------------- training streams

class Stream:
    """An endless, seeded stream of training items from one or more task specs (several = multi-task).
    Built-in tasks draw fresh items; JSONL tasks are shuffled and cycled. Every rank builds the same stream and
    takes its own slice of each batch, so the data do not depend on which rank runs them."""

    def __init__(self, specs, seed, data=None):
        self.rng = random.Random(f"stream/{seed}/{specs}")
        self.specs = list(specs)
        self.cursor = {s: self.rng.randrange(10_000_000) if s in BUILTIN else 0 for s in self.specs}
        self.data = data or {s: None if s in BUILTIN else load_split(s, "train") for s in self.specs}
        for s, items in self.data.items():
            if items is not None:
                self.rng.shuffle(items)

    @classmethod
    def from_items(cls, items, seed):
        """A stream that cycles through a fixed list of items (e.g. the instances a filter kept)."""
        return cls(["pool"], seed, {"pool": list(items)})

    def next(self, n):
        out = []
        for _ in range(n):
            s = self.rng.choice(self.specs)
            if self.data[s] is None:
                out += load_split(s, "train", 1, self.cursor[s])
            else:
                out.append(self.data[s][self.cursor[s] % len(self.data[s])])
            self.cursor[s] += 1
        return out
