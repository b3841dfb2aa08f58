"""The embedded benchmark: procedurally generated scenes, questions and gold chains of thought.

Example `i` of a split is a pure function of `(split seed, i)`: `make_example(cfg, "test", 17)` always gives
the same image bytes, question and rationale. A scene is a `grid x grid` board with 2-4 objects, one per
cell, each with a colour, a shape (distinct within a scene, so "the triangle" names one object), a size and
a printed price (`$4.57`, distinct dollar digits within a scene) drawn with a built-in bitmap font (no font
files, so the bytes do not depend on the FreeType build).

Four families mirror the paper's benchmarks:

| family     | question                                   | answer            | metric (paper analogue) |
|------------|--------------------------------------------|-------------------|-------------------------|
| attribute  | colour / shape / size of one object        | a word            | accuracy; VARR          |
| reading    | price printed below one object             | `$4.57`           | ANLS (DocVQA)           |
| multistep  | most / least expensive object, options A-D | a letter          | accuracy (MMMU)         |
| existence  | "Is there a red square?", balanced yes/no  | yes / no          | F1, yes-ratio (POPE)    |

Existence negatives follow POPE's three samplers (`pope_split`): *random* (any absent colour-shape
category), *popular* (the absent category most frequent in the train split; the generator is uniform, so
"popular" is close to random here, unlike COCO), *adversarial* (an absent category that shares its colour
or shape with an object in the scene: the near miss a model that half-looks gets wrong). As in POPE, each
split has its own positives: the split of every existence example, yes or no, is drawn first (uniformly), and
`metrics.pope_by_split` scores each split on its own rows.

Every rationale looks the asked object up by what it looks like ("The triangle is a small red triangle with
the price $4.57, at the top left."), then reasons to a final `Answer: ...` line; existence puts the found and
the asked colour side by side before its verdict ("It is orange; we need red: different."). `anchors`
gives the character span of every visual-attribute mention (type colour / shape / size / position / text,
its value, and whether the value also appears in the question): ground truth for VARR and hallucination.
`decisions` marks the words where the reasoning branches ("same" / "different", "There is no"); the
embedded teacher weights them in its loss.
"""

from __future__ import annotations

import io
import json
import random
import re
from collections.abc import Iterator
from typing import Any

from PIL import Image, ImageDraw

from vskip_core.config import Config, DataConfig
from vskip_core.data.answers import ANSWER_PREFIX
from vskip_core.runtime import build_dir_once

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
BACKGROUND = (238, 238, 232)
# Bumped whenever the generator's output changes for the same params: it is part of every cache key built on
# the benchmark (the benchmark on disk, the embedded teacher), so an old cache is never read as a new one.
# 2: existence rationales compare the found and the asked colour side by side ("It is orange; we need red:
# different."), and records carry `decisions`.
GENERATOR_VERSION = 2
INK = (20, 20, 20)
SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2, "teacher": 3}
ANCHOR_TYPES = ("colour", "shape", "size", "position", "text")
POPE_SPLITS = ("random", "popular", "adversarial")

# 3x5 bitmap glyphs, drawn at scale 2 (6x10 px): crisp, and identical on every machine.
_GLYPHS = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
    "$": ("011", "110", "010", "011", "110"),
    ".": ("0", "0", "0", "0", "1"),
}


def position_name(cell: int, grid: int) -> str:
    r, c = divmod(cell, grid)
    if grid == 1:
        return "middle"
    rows = {2: ("top", "bottom"), 3: ("top", "middle", "bottom"), 4: ("top", "upper", "lower", "bottom")}[
        grid
    ]
    cols = {
        2: ("left", "right"),
        3: ("left", "centre", "right"),
        4: ("left", "inner left", "inner right", "right"),
    }[grid]
    return f"{rows[r]} {cols[c]}"


def split_seed(data: DataConfig, split: str) -> int:
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLIT_OFFSETS)}")
    return data.seed * 10 + SPLIT_OFFSETS[split]


def _rng(seed: int, i: int) -> random.Random:
    # random.Random seeded with a str hashes it with SHA-512: stable across Python versions and platforms.
    return random.Random(f"vskip:{seed}:{i}")


# ----------------------------------------------------------------------------------------------- scenes
def sample_scene(rng: random.Random, data: DataConfig) -> dict[str, Any]:
    n_cells = data.grid**2
    n = rng.randint(data.min_objects, min(data.max_objects, n_cells))
    cells = sorted(rng.sample(range(n_cells), n))
    shapes = rng.sample(SHAPES, n)
    colours = rng.sample(list(COLOURS), n)
    dollars = rng.sample(range(1, 10), n)
    cell_px = data.image_size // data.grid
    objects = []
    for cell, shape, colour, dollar in zip(cells, shapes, colours, dollars):
        size = rng.choice(SIZES)
        r, c = divmod(cell, data.grid)
        radius = round(cell_px * (0.16 if size == "small" else 0.27))
        cx = c * cell_px + cell_px // 2 + rng.randint(-2, 2)
        cy = r * cell_px + round(cell_px * 0.36) + rng.randint(-1, 1)
        objects.append(
            {
                "cell": cell,
                "position": position_name(cell, data.grid),
                "colour": colour,
                "shape": shape,
                "size": size,
                "price": f"${dollar}.{rng.randint(0, 99):02d}",
                "box": [cx - radius, cy - radius, cx + radius, cy + radius],
            }
        )
    return {"grid": data.grid, "image_size": data.image_size, "objects": objects}


def render_scene(scene: dict[str, Any], blank: bool = False) -> Image.Image:
    """Draw a scene; `blank=True` gives the same background with no objects (the grounding control)."""
    size = scene["image_size"]
    img = Image.new("RGB", (size, size), BACKGROUND)
    if blank:
        return img
    draw = ImageDraw.Draw(img)
    cell_px = size // scene["grid"]
    for o in scene["objects"]:
        x0, y0, x1, y1 = o["box"]
        fill = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse(o["box"], fill=fill)
        elif o["shape"] == "square":
            draw.rectangle(o["box"], fill=fill)
        elif o["shape"] == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # diamond
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
        r, c = divmod(o["cell"], scene["grid"])
        _draw_text(img, o["price"], c * cell_px + cell_px // 2, r * cell_px + round(cell_px * 0.70))
    return img


def _draw_text(img: Image.Image, text: str, cx: int, top: int, scale: int = 2) -> None:
    widths = [len(_GLYPHS[ch][0]) * scale + scale for ch in text]
    x = cx - sum(widths) // 2
    px = img.load()
    for ch, w in zip(text, widths):
        for gy, row in enumerate(_GLYPHS[ch]):
            for gx, bit in enumerate(row):
                if bit == "1":
                    for dy in range(scale):
                        for dx in range(scale):
                            px[x + gx * scale + dx, top + gy * scale + dy] = INK
        x += w


# -------------------------------------------------------------------------------------------- rationales
class _Writer:
    """Builds a rationale string while recording the character span of every visual-attribute mention."""

    def __init__(self, question: str) -> None:
        self.text = ""
        self.anchors: list[dict[str, Any]] = []
        self.decisions: list[dict[str, Any]] = []  # spans where the reasoning branches (teacher loss weight)
        self.question = question.lower()

    def add(self, s: str) -> _Writer:
        self.text += s
        return self

    def anchor(self, kind: str, value: str) -> _Writer:
        start = len(self.text)
        self.text += value
        self.anchors.append(
            {
                "type": kind,
                "value": value,
                "start": start,
                "end": len(self.text),
                "in_question": value.lower() in self.question,
            }
        )
        return self

    def decision(self, value: str) -> _Writer:
        """A word that decides the answer ("same" / "different", "There is no"): not a visual anchor."""
        self.decisions.append({"value": value, "start": len(self.text), "end": len(self.text) + len(value)})
        self.text += value
        return self

    def obj(self, o: dict[str, Any], size: bool = False) -> _Writer:
        if size:
            self.anchor("size", o["size"]).add(" ")
        return self.anchor("colour", o["colour"]).add(" ").anchor("shape", o["shape"])


_OPENINGS = (
    "Let me look at the image carefully before I answer. ",
    "I will reason step by step about the picture. ",
    "To answer this, I need to check the image. ",
)
_NEED = ("We need ", "The question asks for ", "I must find ")
_SO = ("So the answer is ", "Therefore the answer is ", "This means the answer is ")


def _key(w: _Writer, o: dict[str, Any], key: str) -> _Writer:
    """How the question names the object: by shape, by colour ("the red object") or by both."""
    if key == "shape":
        return w.anchor("shape", o["shape"])
    if key == "colour":
        return w.anchor("colour", o["colour"]).add(" object")
    return w.obj(o)


def _locate(w: _Writer, o: dict[str, Any], key: str, t: int) -> None:
    """The look-up step: find the asked object by what it looks like, describe it fully, then say where it is.
    Position comes last: a small model learns the content-to-position hop far more slowly than
    content-to-content, and no answer depends on it (docs/TEACHER.md)."""
    w.add("The ")
    _key(w, o, key)
    w.add((" is a ", " in the image is a ", " here is a ")[t]).obj(o, size=True)
    w.add((" with the price ", " whose label reads ", " marked ")[t]).anchor("text", o["price"])
    w.add((", at the ", "; it is at the ", ", in the ")[t]).anchor("position", o["position"])
    w.add((". ", ". ", " cell. ")[t])


def _finish(w: _Writer, scene: dict[str, Any], t: int, answer: str, kind: str | None) -> None:
    w.add(_SO[t])
    w.anchor(kind, answer) if kind else w.add(answer)
    w.add(". ")


def _attribute(rng: random.Random, scene: dict[str, Any], t: int) -> dict[str, Any]:
    o = rng.choice(scene["objects"])
    kind = rng.choice(("colour", "shape", "size"))
    if kind == "colour":
        key = "shape"
        q = rng.choice((f"What colour is the {o['shape']}?", f"Which colour does the {o['shape']} have?"))
    elif kind == "shape":
        key = "colour"
        q = rng.choice(
            (f"What shape is the {o['colour']} object?", f"Which shape is drawn in {o['colour']}?")
        )
    else:
        key = "both"
        q = rng.choice(
            (
                f"Is the {o['colour']} {o['shape']} small or large?",
                f"What size is the {o['colour']} {o['shape']}, small or large?",
            )
        )
    ans = o[kind]
    w = _Writer(q)
    w.add(_OPENINGS[t]).add(_NEED[t]).add(f"the {kind} of the ")
    _key(w, o, key).add(". ")
    _locate(w, o, key, t)
    _finish(w, scene, t, ans, kind)
    return {"question": q, "answer": ans, "answers": [ans], "options": [], "writer": w, "attr_type": kind}


def _reading(rng: random.Random, scene: dict[str, Any], t: int) -> dict[str, Any]:
    o = rng.choice(scene["objects"])
    v = rng.randrange(3)
    q = (
        f"What price is printed below the {o['colour']} {o['shape']}?",
        f"What does the label under the {o['shape']} say?",
        f"How much does the {o['colour']} {o['shape']} cost?",
    )[v]
    key = "shape" if v == 1 else "both"
    w = _Writer(q)
    w.add(_OPENINGS[t]).add(_NEED[t]).add("the price of the ")
    _key(w, o, key).add(". ")
    _locate(w, o, key, t)
    _finish(w, scene, t, o["price"], "text")
    return {
        "question": q,
        "answer": o["price"],
        "answers": [o["price"], o["price"].lstrip("$")],
        "options": [],
        "writer": w,
        "attr_type": "text",
    }


def _multistep(rng: random.Random, scene: dict[str, Any], t: int, style: str = "list") -> dict[str, Any]:
    objs = scene["objects"]
    most = rng.random() < 0.5
    by_name = {(o["colour"], o["shape"]): o for o in objs}
    distractors = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in by_name]
    rng.shuffle(distractors)
    opts = list(by_name)[:4]
    opts += distractors[: 4 - len(opts)]
    rng.shuffle(opts)
    present = [k for k in opts if k in by_name]
    value = {k: float(by_name[k]["price"][1:]) for k in present}
    target = max(present, key=value.get) if most else min(present, key=value.get)
    letter = "ABCD"[opts.index(target)]
    word = "most expensive" if most else "cheapest"
    q = f"Which object is the {word}?"
    options = [f"the {c} {s}" for c, s in opts]
    w = _Writer(q + " " + " ".join(f"({L}) {x}" for L, x in zip("ABCD", options)))
    w.add(_OPENINGS[t]).add(_NEED[t]).add(f"the {word} option. ")
    # the rationale designs tried for this family and their figures: docs/TEACHER.md
    if style == "local":
        _multistep_local(w, objs, opts, most)
    elif style == "rank":  # each present option asked of its own image tokens
        _multistep_until_yes(w, objs, opts, target, word)
    elif style == "scan":
        _multistep_scan(w, objs, opts, most)
    elif style == "verify":  # the extreme object found first, then each present option compared with it
        _found_object(w, by_name[target], word).add(". ")
        _multistep_until_yes(w, objs, opts, target, " ".join(target))
    elif style in ("image", "pick"):
        # the extreme object read off the image (the vision tower learns each object's price rank), then its
        # letter: `image` names it at once, `pick` goes through the options in order until one is that object
        _found_object(w, by_name[target], word)
        if style == "image":
            w.add("; it is option (").decision(letter).add("). ")
        else:
            w.add(". ")
            for L, k in zip("ABCD", opts):
                w.add(f"({L}) the {k[0]} {k[1]}: ").decision("yes" if k == target else "no").add(". ")
                if k == target:
                    break
    else:
        for L, k in zip("ABCD", opts):
            w.add(f"({L}) the ").anchor("colour", k[0]).add(" ").anchor("shape", k[1])
            if k in by_name:
                w.add(" costs ").anchor("text", by_name[k]["price"]).add(". ")
            else:
                w.add(" is not in the image. ")
        w.add(f"The {'highest' if most else 'lowest'} price is ").anchor("text", by_name[target]["price"])
        w.add(f", option ({letter}). ")
    _finish(w, scene, t, letter, None)
    return {
        "question": q,
        "answer": letter,
        "answers": [letter],
        "options": options,
        "writer": w,
        "attr_type": "multistep",
    }


def _found_object(w: _Writer, o: dict[str, Any], word: str) -> _Writer:
    """The extreme object read off the image (image, pick, verify): "The most expensive object in the image is
    the orange square, with the price $9.13"."""
    return (
        w.add(f"The {word} object in the image is the ")
        .obj(o)
        .add(", with the price ")
        .anchor("text", o["price"])
    )


OPTION_ABSENT = (
    "there is no"  # an option line's presence decision ("(A) the red circle: there is no circle.")
)


def _check_option(
    w: _Writer, objs: list[dict[str, Any]], L: str, colour: str, shape: str
) -> dict[str, Any] | None:
    """One option checked with the existence verdict's words ("(A) the red circle: it is blue; we need red:
    different." / "...: there is no circle."); returns the object when the colours match, before its "same"."""
    w.add(f"({L}) the ").anchor("colour", colour).add(" ").anchor("shape", shape).add(": ")
    o = next((o for o in objs if o["shape"] == shape), None)
    if o is None:
        w.decision(OPTION_ABSENT).add(" ").anchor("shape", shape).add(". ")
        return None
    w.add("it is ").anchor("colour", o["colour"]).add("; we need ").anchor("colour", colour).add(": ")
    if o["colour"] != colour:
        w.decision("different").add(". ")
        return None
    return o


def _multistep_local(w: _Writer, objs: list[dict[str, Any]], opts: list[tuple[str, str]], most: bool) -> None:
    """Every step local: each option checked with the existence verdict's own words ("(A) the red circle: it
    is blue; we need red: different."), then a running leader updated by comparing two dollar digits
    ("(A) 9 or (C) 4, higher: leader (A) 9."): no step compares more than two things or copies cents."""
    leader: tuple[str, str] | None = None
    for L, (colour, shape) in zip("ABCD", opts):
        o = _check_option(w, objs, L, colour, shape)
        if o is None:
            continue
        w.decision("same").add(", ").anchor("text", o["price"]).add(". ")
        digit = o["price"][1]
        if leader is not None:
            w.add(f"({leader[0]}) {leader[1]} or ({L}) {digit}, {'higher' if most else 'lower'}: ")
            if (int(digit) > int(leader[1])) == most:
                leader = (L, digit)
        else:
            leader = (L, digit)
        w.add("leader (").decision(leader[0]).add(") ").decision(leader[1]).add(". ")


def _multistep_until_yes(
    w: _Writer, objs: list[dict[str, Any]], opts: list[tuple[str, str]], target: tuple[str, str], asked: str
) -> None:
    """The options in order until the first yes: each checked with the existence verdict's words, a present one
    then asked "is it the <asked>?": `rank` asks "the most expensive" (a fact of the option's own image tokens,
    whose price rank the vision tower learns), `verify` names the extreme object found before ("is it the
    orange square?"), so the two things compared stand side by side."""
    for L, (colour, shape) in zip("ABCD", opts):
        if _check_option(w, objs, L, colour, shape) is None:
            continue
        hit = (colour, shape) == target
        w.decision("same").add(f"; is it the {asked}? ").decision("yes" if hit else "no").add(". ")
        if hit:
            return


def _multistep_scan(w: _Writer, objs: list[dict[str, Any]], opts: list[tuple[str, str]], most: bool) -> None:
    """Each option checked as in `local`, its price closed by its letter ("same, $7.63 for (B)."); then the
    dollar digits scanned from $9 down (cheapest: from $1 up) until one was written: "$9: none. $7.63 for (B)."
    A miss or a hit is decided by whether "$7" occurs earlier, and a hit copies what followed it there, so no
    step compares two values or copies a look-alike token from an unmatched place."""
    written: dict[str, tuple[str, str]] = {}
    for L, (colour, shape) in zip("ABCD", opts):
        o = _check_option(w, objs, L, colour, shape)
        if o is None:
            continue
        w.decision("same").add(", ").anchor("text", o["price"]).add(f" for ({L}). ")
        written[o["price"][1]] = (L, o["price"])
    w.add("From $9 down: " if most else "From $1 up: ")
    for d in "987654321" if most else "123456789":
        if d not in written:
            w.add(f"${d}").decision(": none").add(". ")
            continue
        L, price = written[d]
        w.anchor("text", price)
        end = len(w.text)
        w.decisions.append({"value": price[2:], "start": end - 3, "end": end})  # ".63": the hit
        w.add(" for (").decision(L).add("). ")
        return


def popular_categories(data: DataConfig, n: int = 2000) -> list[tuple[str, str]]:
    """Colour-shape categories ordered by frequency in the first `n` train scenes (POPE's 'popular')."""
    counts: dict[tuple[str, str], int] = {(c, s): 0 for c in COLOURS for s in SHAPES}
    seed = split_seed(data, "train")
    for i in range(n):
        for o in sample_scene(_rng(seed, i), data)["objects"]:
            counts[(o["colour"], o["shape"])] += 1
    return sorted(counts, key=lambda k: (-counts[k], k))


def _existence(rng: random.Random, scene: dict[str, Any], t: int, popular: list[tuple[str, str]]) -> dict:
    objs = scene["objects"]
    present = {(o["colour"], o["shape"]) for o in objs}
    split = rng.choice(POPE_SPLITS)
    positive = rng.random() < 0.5
    if positive:
        o = rng.choice(objs)
        colour, shape = o["colour"], o["shape"]
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        if split == "random":
            colour, shape = rng.choice(absent)
        elif split == "popular":
            colour, shape = next(k for k in popular if k not in present)
        else:
            near = [k for k in absent if any(k[0] == c or k[1] == s for c, s in present)]
            colour, shape = rng.choice(near)
    a = "an" if colour[0] in "aeiou" else "a"
    q = rng.choice(
        (f"Is there {a} {colour} {shape} in the image?", f"Does the picture contain {a} {colour} {shape}?")
    )
    w = _Writer(q)
    w.add(_OPENINGS[t]).add(_NEED[t]).add(f"{a} ").anchor("colour", colour).add(" ").anchor(
        "shape", shape
    ).add(". ")
    same_shape = next((o for o in objs if o["shape"] == shape), None)
    if same_shape is None:
        w.decision("There is no").add(" ").anchor("shape", shape).add(" in the image. ")
    else:
        # the found colour and the asked one side by side, then the verdict (why: docs/TEACHER.md)
        _locate(w, same_shape, "shape", t)
        w.add("It is ").anchor("colour", same_shape["colour"]).add("; we need ").anchor("colour", colour)
        w.add(": ").decision("same" if positive else "different").add(". ")
    ans = "yes" if positive else "no"
    _finish(w, scene, t, ans, None)
    return {
        "question": q,
        "answer": ans,
        "answers": [ans],
        "options": [],
        "writer": w,
        "attr_type": "existence",
        "pope_split": split,
    }


# ------------------------------------------------------------------------------ instruction-tuned variants
# Harmless instruction sentences the embedded teacher sees beside some training questions
# (`embedded.instruct_share`), each example's target unchanged: a real instruction-tuned VLM shrugs off a
# sentence it never saw, and the students' ratio sentence is one (issue 32). None is a ratio request.
TRAIN_INSTRUCTIONS = (
    "Be concise.",
    "Look carefully at the image.",
    "Explain your reasoning.",
    "Think step by step.",
    "Answer the question about the picture.",
    "Please be accurate.",
    "Use the image to answer.",
    "Take your time.",
    "Give a clear answer.",
    "Check every object before you answer.",
    "Read the labels if you need them.",
    "Pay attention to the colours.",
    "Describe what you see, then answer.",
    "Only the picture matters here.",
    "Be careful with the details.",
    "This is a test question.",
    "Please answer in English.",
    "Show your work.",
    "Reply with the final answer at the end.",
    "Do not guess.",
    "Focus on the objects in the scene.",
    "You may think before answering.",
    "Here is a question for you.",
    "Try your best.",
    "Keep it brief.",
    "The image is a simple drawing.",
    "Answer as a careful assistant would.",
    "Count the objects if it helps.",
    "Note the prices printed under each shape.",
    "Consider each option in turn.",
    "Be precise about colours and shapes.",
    "Think about the layout of the scene.",
    "Your answer will be checked.",
    "No need to hurry.",
    "Stay focused on the question.",
    "Look at the whole picture.",
)
# Never used in training: notebook 00 appends each to the question and checks every family stays within 0.05
# of the plain prompt. The first is the students' ratio sentence (modeling.prompts.RATIO_TEMPLATE at 0.9).
HELDOUT_INSTRUCTIONS = (
    "Keep 0.9 of the reasoning.",
    "Please double-check your answer.",
    "Be brief and to the point.",
    "Examine the picture closely.",
    "Give your reasoning before the answer.",
    "Answer truthfully.",
    "Think it through.",
    "Make sure you are right.",
    "Use only what is visible.",
    "Respond like an expert.",
    "Summarize your thoughts.",
    "The drawing may have several objects.",
)


def instruct_variant(
    ex: dict[str, Any],
    key: str,
    direct_share: float = 0.0,
    instruct_share: float = 0.0,
    instruct_after: float = 0.5,
) -> dict[str, Any]:
    """A training example as an instruction-tuned teacher sees it (a pure function of `key`, e.g. the
    stream index): with probability `direct_share` (examples with an `answer` only) the target is the answer
    line alone (`Answer: red`, what a prompt prefilled with `Answer:` decodes), and independently with
    probability `instruct_share` one of `TRAIN_INSTRUCTIONS` goes after the question (`instruction`, with
    probability `instruct_after`) or before it (`prefix`, as the ratio sentence at `turn_start`). Off at 0 and 0: `ex` unchanged.
    A direct target's `Answer:` is `prefilled` (no loss): taught to start its turn with it, a teacher that sees
    both kinds of target would answer directly whenever `Answer:` is its likeliest first word."""
    if direct_share <= 0 and instruct_share <= 0:
        return ex
    rng = random.Random(f"variant:{key}")
    direct, instruct = rng.random() < direct_share, rng.random() < instruct_share
    sentence, before = rng.choice(TRAIN_INSTRUCTIONS), rng.random() < 1 - instruct_after
    ex = dict(ex)
    if direct and "answer" in ex:
        ex.update(rationale=f"{ANSWER_PREFIX} {ex['answer']}", anchors=[], decisions=[], direct=True)
        ex["prefilled"] = len(ANSWER_PREFIX)  # characters of the target given in the prompt at inference
        ex.pop("loss_on", None)
    if instruct:
        if before:
            ex["prefix"] = sentence + "\n"
        else:
            ex["instruction"] = sentence
    return ex


# ------------------------------------------------------------------------------------------------ public
_POPULAR_CACHE: dict[str, list[tuple[str, str]]] = {}


def _popular(data: DataConfig) -> list[tuple[str, str]]:
    key = json.dumps([data.seed, data.grid, data.min_objects, data.max_objects, data.image_size])
    if key not in _POPULAR_CACHE:
        _POPULAR_CACHE[key] = popular_categories(data)
    return _POPULAR_CACHE[key]


def make_example(data: DataConfig | Config, split: str, i: int, family: str | None = None) -> dict[str, Any]:
    """Example `i` of `split`: a dict in the normalized record schema shared with MMMU/DocVQA/POPE loaders.

    `image` is a PIL image; `scene`, `anchors` hold ground truth. `family` forces a family (default:
    families rotate with `i`, so every split is exactly balanced)."""
    data = data.data if isinstance(data, Config) else data
    seed = split_seed(data, split)
    rng = _rng(seed, i)
    scene = sample_scene(rng, data)
    family = family or data.families[i % len(data.families)]
    t = rng.randrange(3)  # paraphrase template
    if family == "attribute":
        ex = _attribute(rng, scene, t)
    elif family == "reading":
        ex = _reading(rng, scene, t)
    elif family == "multistep":
        ex = _multistep(rng, scene, t, data.multistep_rationale)
    elif family == "existence":
        ex = _existence(rng, scene, t, _popular(data))
    else:
        raise ValueError(f"unknown family {family!r}")
    w: _Writer = ex.pop("writer")
    w.add(f"{ANSWER_PREFIX} {ex['answer']}")
    return {
        "id": f"{split}-{i:06d}",
        "family": family,
        "source": "embedded",
        "image": render_scene(scene),
        "question": ex["question"],
        "options": ex["options"],
        "answer": ex["answer"],
        "answers": ex["answers"],
        "question_type": "multiple-choice" if ex["options"] else "open",
        "attr_type": ex["attr_type"],
        "pope_split": ex.get("pope_split", ""),
        "scene": scene,
        "rationale": w.text,
        "anchors": w.anchors,
        "decisions": w.decisions,
        "template": t,
    }


def make_lookup_drill(data: DataConfig | Config, split: str, i: int) -> dict[str, Any]:
    """A short look-up drill for teacher training: "Describe the triangle." -> the rationales' own look-up
    sentence ("The triangle is a small red triangle with the price $4.57, at the top left."), or, for a
    shape that is not in the scene (a quarter of drills), "There is no diamond in the image." It trains the
    one skill every family needs (find an object by what it looks like, read its attributes off the image) at
    a third of a full example's length. The keys the teacher's training reads (`question`, `options`, `image`,
    `scene`, `rationale`, `anchors`); no `Answer:` line, no `decisions`."""
    data = data.data if isinstance(data, Config) else data
    rng = _rng(split_seed(data, split), -1 - i)  # negative indices: disjoint from make_example's stream
    scene = sample_scene(rng, data)
    t = rng.randrange(3)
    present = {o["shape"] for o in scene["objects"]}
    absent = [s for s in SHAPES if s not in present]
    if absent and rng.random() < 0.25:
        shape = rng.choice(absent)
        q = f"Describe the {shape}."
        w = _Writer(q)
        w.add("There is no ").anchor("shape", shape).add(" in the image.")
    else:
        o = rng.choice(scene["objects"])
        key = rng.choice(("shape", "colour", "both"))
        name = {"shape": o["shape"], "colour": f"{o['colour']} object", "both": f"{o['colour']} {o['shape']}"}
        q = f"Describe the {name[key]}."
        w = _Writer(q)
        _locate(w, o, key, t)
        w.text = w.text.rstrip()
    return {
        "id": f"{split}-drill-{i:06d}",
        "family": "drill",
        "image": render_scene(scene),
        "question": q,
        "options": [],
        "scene": scene,
        "rationale": w.text,
        "anchors": w.anchors,
        "template": t,
    }


def make_compare_drill(data: DataConfig | Config, split: str, i: int, blank: bool = True) -> dict[str, Any]:
    """A colour-comparison drill for teacher training, on a blank image: "It is blue; we need red: different."
    with the loss on the verdict only (`loss_on="decisions"`). It is the last step of an existence rationale
    with nothing to see, so the verdict can only come from the two colour words beside it; half are "same".
    Why: the embedded teacher looked up and wrote both colours right and still gave the wrong verdict in 34 of
    175 existence examples ("It is blue; we need blue: different."), a text-only equality it had not learned
    from full examples, where the image and the question offer weaker cues to the same verdict."""
    data = data.data if isinstance(data, Config) else data
    rng = _rng(split_seed(data, split), -10_000_000 - i)  # disjoint from make_example and look-up drills
    colours = list(COLOURS)
    found = rng.choice(colours)
    need = found if rng.random() < 0.5 else rng.choice([c for c in colours if c != found])
    if blank:
        scene = {"grid": data.grid, "image_size": data.image_size, "objects": []}
    else:  # a real scene that has nothing to do with the two colours: as uninformative, in distribution
        scene = sample_scene(rng, data)
    q = "Compare the two colours."
    w = _Writer(q)
    w.add("It is ").anchor("colour", found).add("; we need ").anchor("colour", need).add(": ")
    w.decision("same" if found == need else "different").add(".")
    return {
        "id": f"{split}-compare-{i:06d}",
        "family": "drill",
        "image": render_scene(scene, blank=blank),
        "question": q,
        "options": [],
        "scene": scene,
        "rationale": w.text,
        "anchors": w.anchors,
        "decisions": w.decisions,
        "loss_on": "decisions",
        "template": 0,
    }


def make_reasoning_drill(
    data: DataConfig | Config, split: str, i: int, presence: bool = False
) -> dict[str, Any]:
    """A multi-step rationale on a blank image with the loss on its decisions only (verdicts, winning prices,
    leaders, the final letter): each decision then has to come from the words before it, as the comparison
    drills teach the existence verdict. An option's presence ("there is no circle") cannot come from the words,
    so it carries no loss unless `presence` (trained on a blank image, it taught the teacher to say "There is
    no" without looking: docs/TEACHER.md)."""
    data = data.data if isinstance(data, Config) else data
    ex = make_example(data, split, 20_000_000 + i, family="multistep")
    ex.update(id=f"{split}-reason-{i:06d}", family="drill", loss_on="decisions")
    if not presence:
        ex["decisions"] = [d for d in ex["decisions"] if d["value"] != OPTION_ABSENT]
    ex["image"] = render_scene(ex["scene"], blank=True)
    return ex


def iter_examples(data: DataConfig | Config, split: str, n: int, start: int = 0) -> Iterator[dict[str, Any]]:
    for i in range(start, start + n):
        yield make_example(data, split, i)


def image_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


FEATURES_JSON_COLUMNS = ("scene", "anchors", "decisions")


def build_split(data: DataConfig | Config, split: str, n: int):
    """A `datasets.Dataset` with an `Image` feature; `scene`, `anchors`, `decisions` are JSON strings (the schema
    stays flat and identical to the real-benchmark loaders)."""
    import datasets

    data = data.data if isinstance(data, Config) else data
    rows: dict[str, list] = {
        k: []
        for k in (
            "id",
            "family",
            "source",
            "image",
            "question",
            "options",
            "answer",
            "answers",
            "question_type",
            "attr_type",
            "pope_split",
            "scene",
            "rationale",
            "anchors",
            "decisions",
            "template",
        )
    }
    for ex in iter_examples(data, split, n):
        for k in rows:
            v = ex[k]
            rows[k].append(json.dumps(v) if k in FEATURES_JSON_COLUMNS else v)
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "family": datasets.Value("string"),
            "source": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "options": datasets.Sequence(datasets.Value("string")),
            "answer": datasets.Value("string"),
            "answers": datasets.Sequence(datasets.Value("string")),
            "question_type": datasets.Value("string"),
            "attr_type": datasets.Value("string"),
            "pope_split": datasets.Value("string"),
            "scene": datasets.Value("string"),
            "rationale": datasets.Value("string"),
            "anchors": datasets.Value("string"),
            "decisions": datasets.Value("string"),
            "template": datasets.Value("int32"),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


def decode_record(row: dict[str, Any]) -> dict[str, Any]:
    """Undo the JSON encoding of `scene`/`anchors`/`decisions` for a row read back from a saved dataset."""
    row = dict(row)
    for k in FEATURES_JSON_COLUMNS:
        if isinstance(row.get(k), str):
            row[k] = json.loads(row[k]) if row[k] else None
    return row


def build_benchmark(cfg: Config, splits: tuple[str, ...] = ("train", "val", "test")):
    """Build (or load from cache) the train/val/test DatasetDict, keyed by a hash of `cfg.data`."""
    import datasets

    path = cfg.path(cfg.runtime.cache_dir) / f"benchmark-{cfg.hash('data')}-g{GENERATOR_VERSION}"
    if (path / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(path)), path
    sizes = {"train": cfg.data.n_train, "val": cfg.data.n_val, "test": cfg.data.n_test}

    def build(tmp) -> None:
        # datasets cannot reload an empty saved split; an absent split reads as empty (as in benchmarks.py)
        dd = datasets.DatasetDict({s: build_split(cfg.data, s, sizes[s]) for s in splits if sizes[s] > 0})
        dd.save_to_disk(str(tmp))

    build_dir_once(path, build, "dataset_dict.json")
    return datasets.load_from_disk(str(path)), path


PRICE_RE = re.compile(r"\$\d+\.\d\d")  # a printed price, as the scenes write it


SCENE_FIELD = {"colour": "colour", "shape": "shape", "size": "size", "position": "position", "text": "price"}
# the scene object field each anchor type names (a printed price is a "text" anchor)


def find_anchors(text: str, scene: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Visual-attribute mentions in any text (a generated or compressed rationale): every colour, shape, size,
    position word and price, with its span, and `in_scene` = whether that value belongs to the scene.

    This is how anchors are recovered on text the generator did not write (the teacher's own rationales);
    it finds the same spans as the gold `anchors` on gold text (a test checks it)."""
    vocab = [("colour", c) for c in COLOURS] + [("shape", s) for s in SHAPES] + [("size", s) for s in SIZES]
    grid = scene["grid"] if scene else 2
    vocab += [("position", position_name(c, grid)) for c in range(grid * grid)]
    found: list[dict[str, Any]] = []
    taken = [False] * len(text)
    for kind, value in sorted(vocab, key=lambda kv: -len(kv[1])):  # longest first: "top left" before "left"
        for m in re.finditer(rf"(?<![A-Za-z]){re.escape(value)}(?![A-Za-z])", text):
            if any(taken[m.start() : m.end()]):
                continue
            taken[m.start() : m.end()] = [True] * (m.end() - m.start())
            found.append({"type": kind, "value": value, "start": m.start(), "end": m.end()})
    for m in PRICE_RE.finditer(text):
        found.append({"type": "text", "value": m.group(0), "start": m.start(), "end": m.end()})
    if scene:
        objs = scene["objects"]
        values = {t: {o[f] for o in objs} for t, f in SCENE_FIELD.items()}
        for a in found:
            a["in_scene"] = a["value"] in values[a["type"]]
    return sorted(found, key=lambda a: a["start"])
