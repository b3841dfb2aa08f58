import pytest

from vskip_core.metrics import (
    anls,
    final_answer,
    parse_multiple_choice,
    parse_yes_no,
    pope_metrics,
    score_example,
)


def test_final_answer():
    assert final_answer("I see red. Answer: red") == "red"
    assert final_answer("so the answer is (B).") == "(B)"
    assert final_answer("Answer: no. Later... Answer: yes") == "yes"
    assert final_answer("no answer line") is None


def test_anls_hand_computed():
    assert anls("$4.57", ["$4.57", "4.57"]) == 1.0
    assert anls("$4.52", ["$4.57"]) == pytest.approx(0.8)  # 1 edit / 5 chars
    assert anls("  THE  Cat ", ["the cat"]) == 1.0  # case and whitespace
    assert anls("$1.00", ["$9.99"]) == 0.0  # distance 3/5 = 0.6 >= 0.5 -> 0
    assert anls("4.57", ["$4.57", "4.57"]) == 1.0 and anls("4.57", ["$4.57"]) == pytest.approx(
        0.8
    )  # best ref
    assert anls(None, ["a"]) == 0.0


def test_parse_multiple_choice_mmmu_rules():
    opts = ["the red circle", "the blue square", "the green diamond", "the yellow star"]
    assert parse_multiple_choice("(B)", opts) == ("B", False)
    assert parse_multiple_choice("I think (A) ... no, (C)", opts) == ("C", False)  # last wins
    assert parse_multiple_choice("B", opts) == ("B", False)
    assert parse_multiple_choice("C. the green diamond", opts) == ("C", False)
    assert parse_multiple_choice("The most expensive object is clearly the blue square", opts) == ("B", False)
    letter, rnd = parse_multiple_choice("no idea", opts, seed=1)
    assert rnd and letter in "ABCD"
    assert parse_multiple_choice("no idea", opts, seed=1) == (letter, True)  # seeded


def test_pope_metrics_uses_predicted_yes_ratio():
    preds = ["yes", "yes", "yes", "no", None]
    labels = ["yes", "no", "yes", "yes", "no"]
    m = pope_metrics(preds, labels)
    assert m["yes_ratio"] == pytest.approx(
        3 / 5
    )  # predictions, not labels (labels would give 3/5 too: check below)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(2 / 5) and m["unparsed"] == 1
    m2 = pope_metrics(["no"] * 4, ["yes", "yes", "no", "no"])
    assert m2["yes_ratio"] == 0.0 and m2["f1"] == 0.0


def test_yes_no_from_cot():
    assert parse_yes_no("The red square is there, not blue... Answer: yes") == "yes"
    assert parse_yes_no("Is there a yes? There is no blue one. Answer: no") == "no"


SCENE = {
    "grid": 2,
    "image_size": 112,
    "objects": [
        {
            "cell": 0,
            "position": "top left",
            "colour": "red",
            "shape": "triangle",
            "size": "small",
            "price": "$4.57",
        },
        {
            "cell": 3,
            "position": "bottom right",
            "colour": "blue",
            "shape": "circle",
            "size": "large",
            "price": "$1.20",
        },
    ],
}


def test_rationale_part():
    from vskip_core.metrics import rationale_part

    assert rationale_part("The triangle is red. So the answer is red. Answer: red") == (
        "The triangle is red. So the answer is red."
    )
    assert rationale_part("no line") == "no line"


def test_varr_text_hand_computed():
    """Mention-level and binding-aware: a value counts when the candidate says it of the same object, as often
    as the reference does; the answer line and the question's words are left out."""
    from vskip_core.metrics import aggregate_varr, bound_mentions
    from vskip_core.metrics import varr_text as both

    def varr_text(*args):  # the binding-aware reading: its bound_* types
        return {t.removeprefix("bound_"): v for t, v in both(*args).items() if t.startswith("bound_")}

    ref = (
        "The triangle is a small red triangle marked $4.57, at the top left. It is red; we need red: same. "
        "So the answer is yes. Answer: yes"
    )
    q = "Is there a red triangle in the image?"
    # red and triangle are the question's; the answer line holds nothing
    assert bound_mentions(ref, SCENE, q) == [
        ("triangle", "size", "small"),
        ("triangle", "text", "$4.57"),
        ("triangle", "position", "top left"),
    ]
    assert varr_text(ref, ref, SCENE) == {
        "colour": (3, 3),
        "shape": (2, 2),
        "size": (1, 1),
        "position": (1, 1),
        "text": (1, 1),
    }
    # the purple triangle keeps neither its colour nor its shape; $4.57 said of the circle is not kept
    bad = varr_text(ref, "A small purple triangle. The blue circle is marked $4.57, at the top left.", SCENE)
    assert bad == {"colour": (0, 3), "shape": (0, 2), "size": (1, 1), "position": (0, 1), "text": (0, 1)}
    # "red" said once keeps one of three mentions; the answer line alone keeps nothing
    once = varr_text(ref, "The red triangle. Answer: small red triangle $4.57 top left", SCENE)
    assert once["colour"] == (1, 3) and once["shape"] == (1, 2) and once["text"] == (0, 1)
    assert (
        aggregate_varr([both(ref, "A small purple triangle.", SCENE), both(ref, "The red triangle.", SCENE)])[
            "bound_colour"
        ]
        == 1 / 6
    )
    assert varr_text(ref, ref, None) == {t: (0, 0) for t in ("colour", "shape", "size", "position", "text")}
    # a teacher's misread price ($9.99) is not counted, and keeping it does not cost the shape; adding one does
    misread = "The small red triangle is marked $9.99, at the top left."
    assert varr_text(misread, misread, SCENE)["shape"] == (1, 1)
    assert varr_text(misread, misread, SCENE)["text"] == (0, 0)
    assert varr_text(misread, "The small red triangle is marked $1.11.", SCENE)["shape"] == (0, 1)


def test_paper_varr_hand_computed_on_real_looking_rationales():
    """The paper's VARR (colour, shape, object category) needs no scene: a DocVQA, a POPE and an MMMU rationale,
    each against a compression of it, counted by hand (answer lines left out, a value kept as often as said)."""
    from vskip_core.metrics import aggregate_varr, attribute_mentions, varr_text

    def paper(ref, cand):
        v = varr_text(ref, cand, None)
        assert all(v[t] == (0, 0) for t in v if t.startswith("bound_"))  # no scene: no binding-aware reading
        return {t: v[t] for t in ("colour", "shape", "category")}

    docvqa = (
        "The invoice header is printed in blue ink inside a rectangular box. The total row, in red, reads "
        "$1,250.00 next to a round stamp. Answer: $1,250.00"
    )
    # blue, red; rectangular -> rectangle, round -> circle; no category
    assert attribute_mentions(docvqa) == {("colour", "blue"): 1, ("colour", "red"): 1,
                                          ("shape", "rectangle"): 1, ("shape", "circle"): 1}  # fmt: skip
    assert paper(docvqa, "invoice header blue rectangular box. total row reads $1,250.00. Answer: $1,250.00") == {
        "colour": (1, 2), "shape": (1, 2), "category": (0, 0)}  # fmt: skip
    pope = (
        "I see two people on a white sofa and a dog lying near the coffee table. There is no cat in the "
        "image. Answer: no"
    )
    # people -> person, sofa -> couch, dog, table -> dining table, cat; white
    assert paper(pope, "two people sofa dog table. no cat. Answer: no") == {
        "colour": (0, 1), "shape": (0, 0), "category": (5, 5)}  # fmt: skip
    mmmu = (
        "The diagram shows a green triangle and two green circles; the square root of 16 is 4, so the side of "
        "the square is 4 cm. Answer: (B)"
    )
    # green x2, triangle, circles -> circle, square (the shape; "square root" is a unit) ; no category
    assert paper(mmmu, "a green triangle, circles; the square is 4 cm. Answer: (B)") == {
        "colour": (1, 2), "shape": (3, 3), "category": (0, 0)}  # fmt: skip
    pooled = aggregate_varr([varr_text(docvqa, "blue box", None), varr_text(pope, "a dog", None)])
    assert pooled["colour"] == 1 / 3 and pooled["category"] == 1 / 5 and pooled["shape"] == 0.0
    assert pooled["overall"] == pytest.approx(2 / 10) and pooled["bound_overall"] is None
    # "orange" alone is the colour, "oranges" the fruit; the answer line never counts
    assert attribute_mentions("an orange cup and three oranges. Answer: orange") == {
        ("colour", "orange"): 1, ("category", "cup"): 1, ("category", "orange"): 1}  # fmt: skip
    # no valid reference (a truncated teacher rationale): nothing to retain
    assert paper(None, "a red cat") == {"colour": (0, 0), "shape": (0, 0), "category": (0, 0)}


def test_lexicons_cover_coco_and_the_basic_colours():
    """Every COCO category, its plural and the synonyms POPE's questions use are found; the basic colours too."""
    from vskip_core.data.lexicons import CATEGORY_TERMS, COLOUR_TERMS
    from vskip_core.metrics import attribute_mentions

    coco = {v for v in CATEGORY_TERMS.values()}
    assert len(coco) == 80
    for q, want in [("Is there a hair drier in the image?", "hair drier"), ("Is there a tv?", "tv"),
                    ("Are there two giraffes?", "giraffe"), ("Is there a cell phone in the image?", "cell phone"),
                    ("Is there a dining table in the image?", "dining table"), ("a teddy bear", "teddy bear"),
                    ("Is there a sports ball in the image?", "sports ball"), ("three knives", "knife")]:  # fmt: skip
        assert attribute_mentions(q) == {("category", want): 1}, q
    for c in (
        "red",
        "orange",
        "yellow",
        "green",
        "blue",
        "purple",
        "pink",
        "brown",
        "black",
        "white",
        "grey",
    ):
        assert COLOUR_TERMS[c] == c
    assert attribute_mentions("a gray bus")[("colour", "grey")] == 1


def test_varr_text_is_complete_on_gold_rationales():
    """Every family's gold rationale keeps all of its own mentions, and each counted mention is true of the
    scene (the binding rule reads the generator's sentences right)."""
    from vskip_core.config import load_params
    from vskip_core.data.embedded import make_example
    from vskip_core.metrics import question_words, varr_text

    cfg = load_params("params/default.yaml")
    totals = {}
    for i in range(80):
        ex = make_example(cfg, "test", i)
        v = varr_text(ex["rationale"], ex["rationale"], ex["scene"], question_words(ex))
        assert all(k == n for k, n in v.values()), (ex["rationale"], v)
        for t, (_, n) in v.items():
            if t.startswith("bound_"):  # the binding-aware reading, which leaves the question's words out
                totals[ex["family"], t[6:]] = totals.get((ex["family"], t[6:]), 0) + n
    assert (
        totals["multistep", "text"] == 20
    )  # the found object's price; the options' words are the question's
    assert totals["attribute", "position"] == 20 and totals["existence", "shape"] == 0


def test_attribute_hallucinations():
    from vskip_core.metrics import attribute_hallucinations

    h = attribute_hallucinations("I see a blue triangle, a green circle and a label $9.99.", SCENE)
    kinds = sorted(x["kind"] for x in h)
    # blue triangle: both attributes present but wrongly bound; green: absent colour; $9.99: absent price
    assert kinds == ["absent_colour", "absent_text", "wrong_binding"]
    assert attribute_hallucinations("a red triangle and a blue circle", SCENE) == []


def test_pope_by_split_scores_each_split_on_its_own_rows():
    """Each POPE split is scored on its own positives and negatives only (lmms-eval's per-category tasks),
    not on its negatives plus every split's positives."""
    from vskip_core.metrics import pope_by_split

    rows_in = [  # id, split, gold, parsed
        ("r1", "random", "yes", "yes"),
        ("r2", "random", "yes", "no"),
        ("r3", "random", "no", "no"),
        ("r4", "random", "no", "yes"),
        ("a1", "adversarial", "yes", "yes"),
        ("a2", "adversarial", "no", "yes"),
        ("a3", "adversarial", "no", "yes"),
        ("p1", "popular", "yes", "yes"),
        ("p2", "popular", "no", None),
    ]
    exs = {i: {"answer": y, "pope_split": s} for i, s, y, _ in rows_in}
    exs["m1"] = {"answer": "A", "pope_split": ""}
    recs = [
        {"id": i, "family": "existence", "system": "s", "ratio": None, "parsed": p} for i, _, _, p in rows_in
    ]
    recs.append({"id": "m1", "family": "multistep", "system": "s", "ratio": None, "parsed": "A"})
    rows = {r["split"]: r for r in pope_by_split(recs, exs)}
    # random: TP 1, FN 1, TN 1, FP 1
    assert rows["random"]["n"] == 4
    for k, v in {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5}.items():
        assert rows["random"][k] == pytest.approx(v), k
    # adversarial: TP 1, FP 2
    assert rows["adversarial"]["n"] == 3
    for k, v in {"accuracy": 1 / 3, "precision": 1 / 3, "recall": 1.0, "f1": 0.5, "yes_ratio": 1.0}.items():
        assert rows["adversarial"][k] == pytest.approx(v), k
    # popular: TP 1, one unparsed negative (wrong, not yes)
    assert rows["popular"]["n"] == 2 and rows["popular"]["unparsed"] == 1
    for k, v in {"accuracy": 0.5, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.5}.items():
        assert rows["popular"][k] == pytest.approx(v), k
    # a split with no rows (not in data.pope_categories) gets no row
    only_random = [dict(r, system="t") for r in recs if exs[r["id"]]["pope_split"] == "random"]
    assert [r["split"] for r in pope_by_split(only_random, exs)] == ["random"]


def test_open_question_scoring_needs_no_options():
    """MMMU open questions have no options: scored by the gold string or number, never by a letter."""
    ex = {"id": "mmmu-1", "family": "multistep", "question_type": "open", "options": [], "answer": "3.5",
          "answers": ["3.5"]}  # fmt: skip
    assert score_example(ex, "The area is 3.50 m. Answer: 3.50")["correct"] == 1.0
    assert score_example(ex, "Answer: 4")["correct"] == 0.0
    ex2 = {**ex, "answer": "photosynthesis", "answers": ["photosynthesis"]}
    assert score_example(ex2, "Answer: Photosynthesis.")["correct"] == 1.0
    assert score_example(ex2, "Answer: respiration")["correct"] == 0.0


# ------------------------------------------------------------------------------------ one answer line
HUB_ENDING = "The board shows a red circle and a blue square, so the answer is B."


def test_answer_line_start_is_the_one_definition():
    from vskip_core.modeling.prompts import ANSWER_PREFIX, answer_line_start

    assert answer_line_start("It is red. So the answer is red. Answer: red") == 33  # the last one
    assert answer_line_start(f"x {ANSWER_PREFIX} y") == 2
    assert answer_line_start(HUB_ENDING) == HUB_ENDING.index("answer is")
    assert answer_line_start("no final statement here") is None


def test_hub_ending_is_read_the_same_by_scoring_and_distillation():
    """'... so the answer is B.' is scored (metrics) and kept for training (distillation) alike; it used to
    be scored by 'answer is' and dropped by distillation's 'Answer:' search."""
    from vskip_core.metrics import final_answer, rationale_part
    from vskip_core.stages.distillation import select_rows, split_answer

    assert final_answer(HUB_ENDING) == "B"
    body, sep, answer = split_answer(HUB_ENDING)
    assert answer == "answer is B." and sep == " "
    assert body == rationale_part(HUB_ENDING) == "The board shows a red circle and a blue square, so the"
    rows = [
        {"id": "t-1", "family": "multistep", "rationale": HUB_ENDING, "correct": True},
        {"id": "t-2", "family": "multistep", "rationale": "no final statement", "correct": True},
    ]
    kept, report = select_rows(rows, keep="answered")
    assert [r["id"] for r in kept] == ["t-1"] and report["kept_with_answer_line"] == 1
    assert [r["id"] for r in rows if final_answer(r["rationale"]) is not None] == ["t-1"]


# ------------------------------------------------------------------------------------------------- ANLS
def _levenshtein_reference(a: str, b: str) -> int:
    """The hand-written dynamic programme metrics.py used before rapidfuzz (kept as the reference)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _anls_reference(prediction, references, threshold=0.5):
    from vskip_core.metrics import normalize_text

    if prediction is None:
        return 0.0
    p = normalize_text(prediction)
    best = 0.0
    for r in references:
        r = normalize_text(r)
        denom = max(len(p), len(r))
        nl = _levenshtein_reference(p, r) / denom if denom else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def test_anls_with_rapidfuzz_equals_the_old_implementation():
    import random

    rng = random.Random(16)
    alphabet = "ab$4.57 Xé"  # few symbols, so that pairs are often close (ANLS > 0) and the threshold bites

    def s():
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))

    def edit(x):  # a few random insertions, deletions and substitutions: near misses across the threshold
        x = list(x)
        for _ in range(rng.randint(0, 4)):
            i = rng.randint(0, len(x))
            op = rng.choice("ids") if x and i < len(x) else "i"
            x[i : i + (op != "i")] = [] if op == "d" else [rng.choice(alphabet)]
        return "".join(x)

    refs = [[s() for _ in range(rng.randint(1, 3))] for _ in range(400)]
    cases = [(edit(rng.choice(r)) if k % 4 else s(), r) for k, r in enumerate(refs)]
    cases += [("", [""]), ("", ["a"]), ("$4.57", ["$4.75", "4.57"]), (None, ["x"])]
    got = [anls(p, refs) for p, refs in cases]
    assert got == [_anls_reference(p, refs) for p, refs in cases]
    assert sum(0 < v < 1 for v in got) > 50  # partial matches were exercised, not only 0 and 1


# --------------------------------------------------------------- what produces the headline numbers
def _ex(i, family, answer, answers=None, options=(), anchors=(), **kw):
    return {"id": f"t-{i}", "family": family, "answer": answer, "answers": answers or [answer],
            "options": list(options), "anchors": list(anchors), "scene": SCENE, **kw}  # fmt: skip


HAND_EXAMPLES = [  # (example, the stub model's output, the teacher's full-rationale tokens)
    (_ex(1, "attribute", "red", rationale="The triangle is red. Answer: red"),
     "The triangle is red. Answer: red", 8),
    (_ex(2, "attribute", "blue", rationale="The circle is blue. Answer: blue"),
     "The circle is green. Answer: green", 4),
    (_ex(3, "reading", "$4.57"), "The label says $4.52. Answer: $4.52", None),
    (_ex(4, "existence", "yes"), "I see it. Answer: yes", 6),
    (_ex(5, "existence", "no"), "Answer: yes", 5),
    (_ex(6, "multistep", "B", options=["a", "b", "c", "d"]), "So the answer is (B).", 4),
]  # fmt: skip


class _WordTokenizer:
    """One token per whitespace-separated word: rationale token counts can be read off the texts."""

    def __call__(self, text, add_special_tokens=False):
        if isinstance(text, list):
            return {"input_ids": [t.split() for t in text]}
        return {"input_ids": text.split()}


def _stub_generate(outputs):
    def generate(model, tok, proc, examples, max_new_tokens, batch_size, **kw):
        return [{"text": outputs[ex["id"]], "token_ids": list(range(7)), "time_s": 0.25} for ex in examples]

    return generate


def test_evaluate_system_row_equals_hand_computed(monkeypatch):
    """Stage 05's row from known outputs (generate stubbed): every headline field computed by hand."""
    from types import SimpleNamespace

    from vskip_core.stages import evaluation as stage05  # generate is patched where stage 05 looks it up
    from vskip_core.stages.evaluation import evaluate_system

    examples = [e for e, _, _ in HAND_EXAMPLES]
    monkeypatch.setattr(stage05, "generate", _stub_generate({e["id"]: out for e, out, _ in HAND_EXAMPLES}))
    loaded = SimpleNamespace(model=None, tokenizer=_WordTokenizer(), processor=None)
    # the teacher's full rationales: the gold ones where the example has one; t-6's hit max_new_tokens
    ref = {
        e["id"]: {"response": e.get("rationale") or "", "rationale_tokens": n, "truncated": e["id"] == "t-6"}
        for e, _, n in HAND_EXAMPLES
        if n
    }
    recs, row = evaluate_system(loaded, examples, "stub", 0.5, reference=ref, progress=False)

    # rationales (before the final answer statement): 4, 4, 4, 3, 0 and 2 ("So the") words
    assert [r["rationale_tokens"] for r in recs] == [4, 4, 4, 3, 0, 2]
    # ActRatio: 4/8, 4/4, none (no reference), 3/6, 0/5, none (truncated reference); pooled 11/23
    assert [r["act_ratio"] for r in recs] == [0.5, 1.0, None, 0.5, 0.0, None]
    assert row["act_ratio"] == pytest.approx(11 / 23) and row["act_ratio_n"] == 4
    import numpy as np

    from vskip_core.metrics import FamilyScores  # what the bootstrap resamples: the same pooled ratio

    assert FamilyScores(recs, [r["id"] for r in recs]).act_ratio(np.arange(6)) == pytest.approx(11 / 23)
    assert not any(r["truncated"] for r in recs)  # 7 tokens generated, under the cap
    assert row["method"] == "stub" and row["ratio"] == 0.5 and row["n"] == 6
    # attribute 1 of 2; reading exact 0 of 1; existence 1 of 2; multistep (B) 1 of 1
    assert row["accuracy"] == {"attribute": 0.5, "existence": 0.5, "multistep": 1.0, "reading": 0.0}
    assert row["anls"] == pytest.approx(0.8)  # $4.52 vs $4.57: 1 edit / 5 characters
    # POPE: predictions yes, yes; labels yes, no -> TP 1, FP 1: precision 1/2, recall 1, F1 2/3
    assert row["pope_f1"] == pytest.approx(2 / 3) and row["yes_ratio"] == 1.0
    assert row["tokens"] == pytest.approx(17 / 6) and row["gen_tokens"] == 7.0
    # the paper's VARR against the teacher's rationales: red, triangle and circle kept, blue lost
    assert row["varr"]["colour"] == 0.5 and row["varr"]["shape"] == 1.0 and row["varr"]["category"] is None
    assert row["varr"]["overall"] == pytest.approx(3 / 4)
    # binding-aware VARR against the gold rationales: red and the triangle kept; blue lost, and "the circle is
    # green" binds a false colour to the circle, so its shape is lost too -> colour 1/2, shape 1/2, overall 2/4
    assert row["varr"]["bound_colour"] == 0.5 and row["varr"]["bound_shape"] == 0.5
    assert row["varr"]["bound_overall"] == pytest.approx(2 / 4) and row["varr"]["bound_size"] is None
    # hallucinations: green (absent colour) in 2, $4.52 (absent price) in 3
    assert [r["hallucinations"] for r in recs] == [0, 1, 1, 0, 0, 0]
    assert row["hallucinations_per_example"] == pytest.approx(2 / 6)
    assert row["unparsed"] == 0 and row["random_fallback"] == 0

    # the direct-answer baseline: the prefill starts the answer, so there is no rationale to count
    monkeypatch.setattr(stage05, "generate", _stub_generate({"t-4": " yes"}))
    recs, row = evaluate_system(loaded, examples[3:4], "direct", assistant_prefill="Answer:", progress=False)
    assert recs[0]["response"] == "Answer: yes" and recs[0]["parsed"] == "yes"
    assert row["tokens"] == 0.0 and row["act_ratio"] is None and row["accuracy"] == {"existence": 1.0}


def test_chance_levels_hand_computed():
    import random

    from vskip_core.metrics import chance_levels

    rng = random.Random(3)  # chance_levels(seed=3) draws one price per reading example, in order
    guess = f"${rng.randint(1, 9)}.{rng.randint(0, 99):02d}"
    examples = [
        {"family": "attribute", "attr_type": "colour"},  # 1/6 colours
        {"family": "attribute", "attr_type": "shape"},  # 1/4 shapes
        {"family": "attribute", "attr_type": "size"},  # 1/2 sizes
        {"family": "multistep", "options": ["a", "b", "c", "d"]},
        {"family": "multistep", "options": ["a", "b"]},
        {"family": "multistep", "options": []},  # an open question: no options, no guess
        {"family": "reading", "answers": [guess]},  # the guess itself: ANLS 1
        {"family": "reading", "answers": ["no price at all"]},  # ANLS 0
        {"family": "existence"},
    ]
    c = chance_levels(examples, seed=3)
    assert c["attribute"]["accuracy"] == pytest.approx((1 / 6 + 1 / 4 + 1 / 2) / 3)
    assert c["multistep"]["accuracy"] == pytest.approx((1 / 4 + 1 / 2) / 2)
    assert c["reading"] == {"anls": 0.5, "accuracy": 1 / 900}
    assert c["existence"] == {"f1": 0.5, "yes_ratio": 0.5, "accuracy": 0.5}
    assert chance_levels([{"family": "existence"}]).keys() == {"existence"}


def test_summary_from_hand_made_metrics_files(tmp_path):
    """results/<run>/summary.{md,json} from stage 05's metrics.json rows: every value where it belongs."""
    import json

    from vskip_core.infra.summary import write_summary

    def row(method, ratio, attr, multi, anls, f1, yes, tokens, act, lat):
        return {"method": method, "ratio": ratio, "accuracy": {"attribute": attr, "multistep": multi},
                "anls": anls, "pope_f1": f1, "yes_ratio": yes, "tokens": tokens, "act_ratio": act,
                "latency_s": lat, "varr": {"colour": 0.75, "overall": 0.5},
                "hallucinations_per_example": 0.25}  # fmt: skip

    run = tmp_path / "hand"
    for name, rows in {
        "teacher": [row("teacher", None, 1.0, 0.25, 0.8, 2 / 3, 0.5, 60.0, None, 0.2)],
        "students": [row("vskip", 0.5, 0.5, 0.125, 1.0, 0.0, 0.0, 30.0, 0.5, 0.1)],
    }.items():
        (run / name).mkdir(parents=True)
        (run / name / "metrics.json").write_text(json.dumps({"rows": rows}))
    rows = [
        r for d in ("teacher", "students") for r in json.loads((run / d / "metrics.json").read_text())["rows"]
    ]
    env = {"device": "cpu", "machine": "x86_64", "cpu_count": 2, "torch_threads": 1,
           "cpu_model": "Some CPU 9000", "cpu_capability": "AVX512", "isa_caps": {"ATEN_CPU_CAPABILITY": "avx2"},
           "versions": {"torch": "2.13.0"}, "git": {"commit": "0123456789abcdef", "dirty": False}}  # fmt: skip
    df = write_summary(run, rows, env, {"gate": {"gamma": 0.5}}, notes=["a hand-made note"])

    assert list(df["method"]) == ["teacher", "vskip"]
    assert df.loc[1, "acc_attribute"] == 0.5 and df.loc[1, "acc_multistep"] == 0.125
    assert df.loc[0, "pope_f1"] == pytest.approx(2 / 3) and df.loc[1, "act_ratio"] == 0.5
    assert df.loc[0, "varr_colour"] == 0.75 and df.loc[1, "halluc/ex"] == 0.25
    saved = json.loads((run / "summary.json").read_text())
    assert saved["rows"] == rows and saved["params"] == {"gate": {"gamma": 0.5}} and saved["env"] == env
    md = (run / "summary.md").read_text().splitlines()
    header = next(line for line in md if line.startswith("| method"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    body = [line for line in md if line.startswith("| teacher |") or line.startswith("| vskip |")]
    teacher, vskip = ({k: v.strip() for k, v in zip(cols, b.strip("|").split("|"))} for b in body)
    assert teacher["ratio"] == "" and vskip["ratio"] == "0.5"
    assert (
        teacher["acc_multistep"] == "0.250" and teacher["pope_f1"] == "0.667" and teacher["act_ratio"] == ""
    )
    assert vskip["anls"] == "1.000" and vskip["latency_s"] == "0.100" and vskip["tokens"] == "30.000"
    assert md[0] == "# vskip run summary: `hand`"
    assert any("Git 0123456789 (dirty: False)" in line for line in md) and md[-1] == "a hand-made note"
    machine = next(line for line in md if line.startswith("Machine:"))
    assert (
        "CPU Some CPU 9000" in machine and "torch kernels AVX512; capped: ATEN_CPU_CAPABILITY=avx2" in machine
    )
    assert saved["claims"] == [
        {"claim": "vskip ActRatio at 0.5", "value": 0.5, "ci": None, "target": "0.5 +- 0.05", "met": True}
    ]
    assert "| vskip ActRatio at 0.5 | 0.500 | 0.5 +- 0.05 | yes |" in md
    from vskip_core.infra.summary import claims_frame

    shown = claims_frame([saved["claims"][0] | {"ci": [0.4567891, 0.5432109], "met": False}])
    assert shown.loc["vskip ActRatio at 0.5"].tolist() == ["0.500 [0.457, 0.543]", "0.5 +- 0.05", "no"]


def test_bootstrap_ci_covers_the_estimate_and_pairs_by_example():
    import numpy as np

    from vskip_core.metrics import bootstrap_ci

    rng = np.random.default_rng(0)
    x = rng.random(400) < 0.7
    lo, hi = bootstrap_ci(lambda i: x[i].mean(), len(x), reps=500)
    assert lo < x.mean() < hi and 0.03 < hi - lo < 0.12  # +-1.96 * sqrt(0.21 / 400) = +-0.045
    # the same examples on both sides: a paired difference of a system with itself is exactly 0
    assert bootstrap_ci(lambda i: x[i].mean() - x[i].mean(), len(x), reps=200) == [0.0, 0.0]
    assert bootstrap_ci(lambda i: float("nan"), 10, reps=20) == [None, None]
    assert bootstrap_ci(lambda i: 1.0, 0) == [None, None]


def test_add_intervals_pairs_students_with_the_full_control():
    from vskip_core.stages.evaluation import add_intervals

    fams = ["attribute", "existence", "reading", "multistep"]
    n = 200

    def recs(system, ratio, right, yes, kept):
        return [
            {
                "id": f"t{i}",
                "family": fams[i % 4],
                "system": system,
                "ratio": ratio,
                "correct": float(right(i)),
                "parsed": ("yes" if yes(i) else "no") if fams[i % 4] == "existence" else "x",
                "act_ratio": None if ratio is None else ratio,
                "varr": {"colour": [kept(i), 1], "shape": [0, 0]},
            }
            for i in range(n)
        ]

    records = (
        recs("teacher", None, lambda i: True, lambda i: i % 8 == 1, lambda i: 1)
        + recs("full", 1.0, lambda i: i % 5 != 0, lambda i: i % 8 == 1, lambda i: 1)
        + recs(
            "vskip", 0.5, lambda i: i % 5 != 0 and i % 7 != 0, lambda i: i % 8 == 1, lambda i: int(i % 2 == 0)
        )
        + recs("text_only", 0.5, lambda i: i % 5 != 0, lambda i: True, lambda i: int(i % 4 == 0))
    )
    rows = [
        {"method": m, "ratio": r}
        for m, r in (("teacher", None), ("full", 1.0), ("vskip", 0.5), ("text_only", 0.5))
    ]
    add_intervals(rows, records, reps=300)
    teacher, full, vskip, text_only = rows
    assert (
        teacher["accuracy_mean"] == 1.0
        and teacher["accuracy_mean_ci"] == [1.0, 1.0]
        and "vs_full" not in teacher
    )
    lo, hi = full["accuracy_ci"]["attribute"]
    assert lo <= full["accuracy_mean"] <= hi or lo <= 0.8 <= hi
    d = vskip["vs_full"]
    assert d["accuracy_mean_diff"] < 0 and d["accuracy_mean_diff_ci"][1] <= 0  # never better than full here
    assert d["yes_ratio_diff"] == 0.0 and d["yes_ratio_diff_ci"] == [0.0, 0.0]  # the same answers: paired
    assert text_only["vs_full"]["yes_ratio_diff"] == 0.5  # yes to everything against yes to half
    assert vskip["vs_text_only"]["varr_diff"] == 0.25 and vskip["vs_text_only"]["varr_diff_ci"][0] > 0.1
    assert all(k.endswith("_ci") or "ci" not in k for k in vskip)
    from vskip_core.infra.summary import comparisons

    md = comparisons(rows)
    assert md[-2].startswith("| vskip | 0.5 | -0.") and "[+0." in md[-2].split("|")[5]  # VARR vs text-only
    assert comparisons(rows[:2]) == []
    from vskip_core.infra.summary import claims

    found = {c["claim"]: c for c in claims(rows)}
    assert found["vskip VARR - text_only's"]["met"] is True
    assert found["text_only yes-ratio - full's"]["met"] is False  # +0.5
    assert "teacher ActRatio at None" not in found and not any(k.startswith("full") for k in found)
    # a sweep row on the first 80 examples only: its own n, and paired with the control on those 80
    sweep = recs("vskip", 0.3, lambda i: i % 5 != 0, lambda i: i % 8 == 1, lambda i: 1)[:80]
    rows = [{"method": "full", "ratio": 1.0}, {"method": "vskip", "ratio": 0.3}]
    add_intervals(rows, records + sweep, reps=100)
    assert rows[0]["n_examples"] == 200 and rows[1]["n_examples"] == 80
    assert (
        rows[1]["vs_full"]["accuracy_mean_diff"] == 0.0 and rows[1]["vs_full"]["accuracy_mean_diff_n"] == 80
    )


def test_speedups_pair_the_timed_examples_with_the_teacher_and_the_full_control():
    from vskip_core.stages.evaluation import add_speedups

    full = [0.4, 0.5, 0.6, 0.5, 0.45, 0.55]
    rows = [
        {"method": "teacher", "latency_times_s": [0.5] * 6},
        {"method": "full", "latency_times_s": full},
        {"method": "vskip", "latency_times_s": [t / 2 for t in full]},
        {"method": "direct"},
    ]
    add_speedups(rows, reps=200)
    assert rows[1]["speedup_vs_full"] == 1.0 and rows[1]["speedup_vs_full_ci"] == [1.0, 1.0]
    assert rows[2]["speedup_vs_full"] == 2.0 and rows[2]["speedup_vs_full_ci"] == [2.0, 2.0]  # paired: exact
    assert rows[3]["speedup_vs_full"] is None
    # against the original model writing its full rationale (the paper's): median 0.5 over median 0.25
    assert rows[0]["speedup_vs_teacher"] == 1.0 and rows[2]["speedup_vs_teacher"] == 2.0
    assert rows[2]["speedup_vs_teacher_ci"][0] < 2.0 < rows[2]["speedup_vs_teacher_ci"][1]  # unpaired spread
    assert rows[3]["speedup_vs_teacher"] is None


def test_equal_length_reads_every_method_at_the_same_actratio():
    """Each method's metrics are interpolated on its own curve at the same ActRatio; the direct answer (0) and
    the full control anchor the ends, and the paired differences come with intervals."""
    from vskip_core.infra.summary import claims
    from vskip_core.stages.evaluation import curves, equal_length

    n = 200

    def recs(system, ratio, tokens, right, yes=lambda i: False):
        return [
            {
                "id": f"t{i}",
                "family": ("attribute", "existence")[i % 2],
                "system": system,
                "ratio": ratio,
                "correct": float(right(i)),
                "parsed": "yes" if yes(i) else "no",
                "label": "yes" if i % 4 == 1 else "no",
                "rationale_tokens": tokens,
                "reference_tokens": 10,
                "varr": {"colour": [int(tokens >= 5), 1]},
            }
            for i in range(n)
        ]

    records = (
        recs("direct", None, 0, lambda i: i % 10 < 5)  # accuracy 0.5
        + recs("full", 1.0, 10, lambda i: True, lambda i: i % 4 == 1)
        + recs("vskip", 0.3, 3, lambda i: i % 10 < 7, lambda i: i % 4 == 1)  # 0.7 at ActRatio 0.3
        + recs("vskip", 0.7, 7, lambda i: i % 10 < 9, lambda i: i % 4 == 1)  # 0.9 at 0.7, full's yes
        + recs("text_only", 0.3, 2, lambda i: i % 10 < 6)  # 0.6 at 0.2
        + recs("text_only", 0.7, 6, lambda i: i % 10 < 8, lambda i: True)  # 0.8 at 0.6, says yes to all
    )
    eq = equal_length(records, at=0.5, reps=200)
    assert eq["n"] == n
    v, t = eq["methods"]["vskip"], eq["methods"]["text_only"]
    assert v["bracket"] == [0.3, 0.7] and t["bracket"] == [0.2, 0.6]
    assert abs(v["accuracy_mean"]["value"] - 0.8) < 1e-9  # halfway between 0.7 and 0.9
    assert abs(t["accuracy_mean"]["value"] - 0.75) < 1e-9  # 3/4 of the way from 0.6 to 0.8
    assert abs(eq["vs_full"]["vskip"]["value"] + 0.2) < 1e-9
    d = eq["vs"]["text_only"]
    assert abs(d["accuracy_mean"]["value"] - 0.05) < 1e-9
    assert d["yes_dist"]["value"] < 0 and d["yes_dist"]["ci"][1] < 0  # text-only drifts to "yes"
    # without the anchors' span a method is not read: asked for 1.5, nothing is interpolated
    out = equal_length(records, at=1.5, reps=10)["methods"]["vskip"]
    assert out["accuracy_mean"]["value"] != out["accuracy_mean"]["value"] and out["bracket"][1] is None
    rows = [{"method": "vskip", "ratio": 0.3, "act_ratio": 0.3, "act_ratio_ci": [0.28, 0.32],
             "accuracy": {"attribute": 0.7}, "varr": {"overall": 0.0}, "yes_ratio": 0.0}]  # fmt: skip
    assert curves(rows)["vskip"][0]["act_ratio"] == 0.3
    found = {c["claim"]: c for c in claims(rows, 0.3, eq)}
    assert found["vskip ActRatio at 0.3"]["met"] is True
    assert found["vskip - text_only: |yes-ratio - full's| at ActRatio 0.5"]["met"] is True
    assert found["vskip accuracy - full's at ActRatio 0.5"]["met"] is False  # -0.2


def test_category_errors_tie_dropped_words_to_wrong_answers():
    from vskip_core.metrics import dropped_categories, word_category
    from vskip_core.stages.evaluation import category_errors

    assert word_category("not") == "negation" and word_category("$5.75,") == "number"
    assert word_category("blue") == "colour" and word_category("the") == "function word"
    assert word_category("sphinx", {"sphinx"}) == "question word" and word_category("sphinx") == "other"
    lost = dropped_categories("The red circle is not there. Answer: B", "The circle is there.")
    assert lost["negation"] == 1 and lost["colour"] == 1 and lost["shape"] == 0 and lost["answer line"] == 1
    ref = {f"t{i}": {"response": "There is no blue square. Answer: B", "truncated": False} for i in range(40)}
    examples = [{"id": f"t{i}", "question": "Is there a blue square?", "options": []} for i in range(40)]
    records = [
        {"id": f"t{i}", "family": "existence", "system": "vskip", "ratio": 0.5, "correct": float(i % 2 == 0),
         "response": "There is no blue square. Answer: B" if i % 2 == 0 else "There is blue square. Answer: A"}
        for i in range(40)
    ]  # fmt: skip
    rows = {r["category"]: r for r in category_errors(records, ref, examples, reps=100)}
    neg = rows["negation"]
    assert neg["dropped_share"] == 0.5 and neg["acc_dropped"] == 0.0 and neg["acc_kept"] == 1.0
    assert neg["diff"] == -1.0 and neg["diff_ci"] == [-1.0, -1.0]
    assert rows["colour"]["dropped_share"] == 0.0 and rows["colour"]["diff"] != rows["colour"]["diff"]


def test_curve_and_category_figures_draw(tmp_path):
    import pandas as pd

    from vskip_core import plots

    point = {"ratio": 0.5, "act_ratio": 0.52, "act_ratio_ci": [0.5, 0.54], "accuracy_mean": 0.7,
             "accuracy_mean_ci": [0.6, 0.8], "accuracy": {"attribute": 0.9}, "accuracy_ci": {"attribute": [0.8, 1.0]},
             "varr_overall": 0.6, "varr_overall_ci": [0.5, 0.7], "yes_ratio": 0.5, "yes_ratio_ci": [0.4, 0.6]}  # fmt: skip
    curves = {
        "vskip": [point, {**point, "ratio": 0.3, "act_ratio": 0.33}],
        "direct": [{**point, "act_ratio": 0.0}],
    }
    plots.ratio_curves(curves, at=0.5, path=tmp_path / "curves.png")
    table = pd.DataFrame(
        {
            "method": ["vskip", "text_only"],
            "category": ["negation"] * 2,
            "diff": [-0.5, -0.2],
            "diff_lo": [-0.7, -0.4],
            "diff_hi": [-0.3, 0.0],
        }  # fmt: skip
    )
    plots.category_bars(table, "diff", "t", tmp_path / "cats.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000 and (tmp_path / "cats.png").exists()
