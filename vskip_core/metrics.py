"""Metrics: answer parsing, ANLS, POPE, VARR (one definition, `varr_text`, for compressed and generated
rationales alike), attribute hallucinations, and the measures of a compressed rationale (rebuilt text, actual
ratio). Pure functions of texts and records (no models),
used by the teacher's report, the gate ablations (stage 03), distillation (04), evaluation (05) and the
hallucination analysis (06)."""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from rapidfuzz.distance import Levenshtein

from vskip_core.data.embedded import ANCHOR_TYPES, COLOURS, PRICE_RE, SCENE_FIELD, SHAPES, SIZES, find_anchors
from vskip_core.data.lexicons import MENTION_RE, PAPER_VARR_TYPES, UNIT_AFTER_SQUARE, lexicon_type
from vskip_core.modeling.prompts import ANSWER_RE, answer_line_start  # noqa: F401  (ANSWER_RE re-exported)


def final_answer(response: str) -> str | None:
    """The first line after the final answer statement (`prompts.answer_line_start`: the last 'Answer:' /
    'answer is'), without a trailing period; None if there is none."""
    i = answer_line_start(response)
    if i is None:
        return None
    rest = response[ANSWER_RE.match(response, i).end() :].strip()
    ans = rest.splitlines()[0].strip() if rest else ""
    return ans.rstrip(".").strip() or None


def parse_multiple_choice(response: str, options: list[str], seed: int = 0) -> tuple[str, bool]:
    """MMMU-style letter parsing. Returns (letter, was_random_fallback)."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    text = " " + response.strip().strip(".,:;!?") + " "
    candidates: list[tuple[int, str]] = []
    for L in letters:  # (A)
        candidates += [(m.start(), L) for m in re.finditer(re.escape(f"({L})"), text)]
    if not candidates:
        for L in letters:  # bare letter followed by a space, or a period
            candidates += [(m.start(), L) for m in re.finditer(rf"(?<![A-Za-z]){L}(?=[ .])", text)]
    if not candidates and len(response.split()) > 5:
        low = text.lower()
        for L, opt in zip(letters, options):
            o = opt.lower().strip()
            if o:
                candidates += [(m.start(), L) for m in re.finditer(re.escape(o), low)]
    if not candidates:
        return random.Random(f"{seed}:{response}").choice(letters), True
    return max(candidates)[1], False


def normalize_text(s: str) -> str:
    return " ".join(s.lower().strip().split())


def anls(prediction: str | None, references: list[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one prediction (best over references)."""
    if prediction is None:
        return 0.0
    p = normalize_text(prediction)
    best = 0.0
    for r in references:
        r = normalize_text(r)
        denom = max(len(p), len(r))
        nl = Levenshtein.distance(p, r) / denom if denom else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def parse_yes_no(response: str) -> str | None:
    """yes/no from the final answer of a CoT output (falls back to the last yes/no word)."""
    ans = final_answer(response)
    for src in ([ans] if ans else []) + [response]:
        words = re.findall(r"\b(yes|no)\b", src.lower())
        if words:
            return words[-1] if src is response else words[0]
    return None


def pope_metrics(predictions: list[str | None], labels: list[str]) -> dict[str, float]:
    """POPE metrics with 'yes' as positive. Unparseable predictions count as wrong and as not-yes."""
    tp = sum(p == "yes" and y == "yes" for p, y in zip(predictions, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(predictions, labels))
    fn = sum(p != "yes" and y == "yes" for p, y in zip(predictions, labels))
    n = len(labels)
    acc = sum(p == y for p, y in zip(predictions, labels)) / n if n else 0.0
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {
        "accuracy": acc,
        "precision": prec,
        "recall": rec,
        "f1": f1,
        "yes_ratio": sum(p == "yes" for p in predictions) / n if n else 0.0,
        "unparsed": sum(p is None for p in predictions),
        "n": n,
    }


def _numbers(text: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)]


def open_answer_correct(prediction: str, answers: list[str]) -> bool:
    """MMMU's open-question rule (its `parse_open_response` / `eval_open`, simplified): correct when a gold
    answer appears in the normalized prediction, or a number in it equals a numeric gold answer (to 2 dp)."""
    pred = normalize_text(prediction)
    nums = _numbers(prediction)
    for a in answers:
        gold = normalize_text(a)
        if gold and gold in pred:
            return True
        g = _numbers(a)
        if len(g) == 1 and any(abs(n - g[0]) < 5e-3 for n in nums):
            return True
    return False


def score_example(ex: dict[str, Any], response: str, seed: int = 0) -> dict[str, Any]:
    """Parse one response of the embedded benchmark and score it with its family's metric."""
    fam = ex["family"]
    ans = final_answer(response)
    out: dict[str, Any] = {"id": ex["id"], "family": fam, "parsed": ans, "unparsed": ans is None}
    if fam == "multistep" and ex.get("question_type") == "open":  # MMMU open questions: no options
        out["correct"] = float(open_answer_correct(ans if ans else response, ex["answers"]))
    elif fam == "multistep":
        letter, rnd = parse_multiple_choice(ans if ans else response, ex["options"], seed)
        out.update(parsed=letter, random_fallback=rnd, correct=float(letter == ex["answer"]))
    elif fam == "reading":
        out.update(
            anls=anls(ans, ex["answers"]),
            correct=float(ans is not None and normalize_text(ans) in map(normalize_text, ex["answers"])),
        )
    elif fam == "existence":
        yn = parse_yes_no(response)
        out.update(parsed=yn, unparsed=yn is None, correct=float(yn == ex["answer"]))
    else:
        out["correct"] = float(ans is not None and normalize_text(ans) in map(normalize_text, ex["answers"]))
    return out


def family_metrics(
    examples: list[dict[str, Any]], scored: list[dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """Per-family headline metrics: accuracy (attribute, multistep), ANLS (reading), POPE (existence)."""
    out: dict[str, dict[str, float]] = {}
    fams = sorted({e["family"] for e in examples})
    for fam in fams:
        idx = [i for i, e in enumerate(examples) if e["family"] == fam]
        s = [scored[i] for i in idx]
        m: dict[str, float] = {
            "n": len(idx),
            "unparsed": sum(x["unparsed"] for x in s),
            "accuracy": sum(x["correct"] for x in s) / max(len(s), 1),
        }
        if fam == "reading":
            m["anls"] = sum(x["anls"] for x in s) / max(len(s), 1)
        if fam == "multistep":
            m["random_fallback"] = sum(x.get("random_fallback", False) for x in s)
        if fam == "existence":
            m.update(pope_metrics([x["parsed"] for x in s], [examples[i]["answer"] for i in idx]))
        out[fam] = m
    return out


# --------------------------------------------------------------------------- compressed rationales (stage 03)
# What a keep mask over the teacher's tokens leaves: the rebuilt text, its token ratio, and its VARR.
def _token_spans(row: Any) -> tuple[str, str, np.ndarray]:
    """(id, text, (n, 2) token char offsets) of a scores row: a `method.gating.Scored` (already checked) or a
    mapping (dict, pandas Series) with `text` and `offsets`, checked as `gating.as_scored` checks them."""
    if not hasattr(row, "get"):
        return row.id, row.text, row.offsets
    rid, text, offsets = str(row.get("id", "?")), row.get("text"), row.get("offsets")
    if not isinstance(text, str):
        raise ValueError(f"{rid}: `text` must be the rationale string, got {type(text).__name__}")
    offsets = np.asarray([tuple(o) for o in ([] if offsets is None else offsets)], dtype=np.int64).reshape(
        -1, 2
    )
    if len(offsets) and (
        offsets.min() < 0 or offsets.max() > len(text) or (offsets[:, 1] < offsets[:, 0]).any()
    ):
        raise ValueError(f"{rid}: token offsets fall outside the {len(text)}-character text")
    return rid, text, offsets


def compress_text(row: Any, keep: np.ndarray) -> str:
    """The kept tokens as text. Kept neighbours in the original are joined as they were; across a pruned
    stretch the pieces are joined by one space (a newline if the stretch held one) when a word boundary was
    crossed, and glued when it was not (a pruned piece inside a word). No double spaces, no glued words.

    The first kept token stays verbatim, with its own leading space (" top" when "First, ..." was pruned):
    stripping it changes how the word tokenizes (the embedded vocabulary has " top" but not "top", 1 token
    becomes 3), so the student would be trained on, and the actual ratio would count, tokens the gate never
    chose. Kept as is, the student's tokens of the rebuilt text are exactly the kept teacher tokens when the
    two share a tokenizer. `.strip()` it for display."""
    rid, text, offsets = _token_spans(row)
    keep = np.asarray(keep, dtype=bool)
    if len(keep) != len(offsets):
        raise ValueError(f"{rid}: keep mask has {len(keep)} entries for {len(offsets)} tokens")
    out, prev_end = "", None
    for j in np.flatnonzero(keep):
        s, e = offsets[j]
        piece = text[s:e]
        if prev_end is None:
            out = piece
        elif s == prev_end:
            out += piece
        else:
            gap = text[prev_end:s]
            head = piece[: len(piece) - len(piece.lstrip())]
            tail = out[len(out.rstrip()) :]
            if any(c.isspace() for c in tail + gap + head):
                sep = "\n" if "\n" in tail + gap + head else " "
                out = out.rstrip() + sep + piece.lstrip()
            else:
                out += piece
        prev_end = e
    return out.rstrip()


def body_tokens(texts: Sequence[str], tokenizer) -> list[int]:
    """ActRatio's unit: the tokens of each rationale's body (`rationale_part`: the text before its final answer
    line), counted with `tokenizer` (the student's: never compare counts of two tokenizers)."""
    bodies = [rationale_part(t) for t in texts]
    return [len(x) for x in tokenizer(bodies, add_special_tokens=False)["input_ids"]] if bodies else []


def act_ratio(kept: Sequence[int], full: Sequence[int]) -> float | None:
    """ActRatio, the one definition (stages 03, 04 and 05; docs/RESULTS.md): body tokens of the compressed or
    generated rationales over the body tokens of the full teacher rationales of the same examples, pooled
    (sum over sum). Examples without a valid reference (full = 0 or None, e.g. a truncated teacher rationale)
    are left out on both sides; None when none is left."""
    pairs = [(k, f) for k, f in zip(kept, full, strict=True) if f]
    total = sum(f for _, f in pairs)
    return sum(k for k, _ in pairs) / total if total else None


def anchor_tokens(row: Any, anchors: Sequence[dict]) -> list[tuple[str, np.ndarray]]:
    """Each anchor (a char span {type, start, end} of the full rationale) as (type, indices of the tokens
    overlapping it)."""
    rid, text, offsets = _token_spans(row)
    starts, ends = offsets[:, 0], offsets[:, 1]
    out = []
    for a in anchors:
        if a["end"] > len(text) or a["start"] >= a["end"]:
            raise ValueError(f"{rid}: anchor {a} is not a span of this {len(text)}-character rationale")
        out.append((a["type"], np.flatnonzero((starts < a["end"]) & (ends > a["start"]))))
    return out


# ---------------------------------------------------------------------------------- rationale-level metrics


def rationale_part(response: str) -> str:
    """The reasoning before the final answer statement (`prompts.answer_line_start`; the whole response if
    there is none)."""
    i = answer_line_start(response)
    return response[:i].rstrip() if i is not None else response


# ------------------------------------------------------------------------------- word categories
# What a compression drops, by kind of word (issue 33): one definition for the gates (stage 03) and the
# students (stage 05). First match wins, in WORD_CATEGORIES order.
NEGATIONS = frozenset(
    "no not none never without nothing neither nor nobody cannot can't isn't aren't doesn't don't "
    "wasn't weren't hasn't haven't".split()
)
SIZE_WORDS = frozenset(
    "small large big tiny huge medium little smaller larger bigger smallest largest".split()
)
DECISION_WORDS = frozenset({"yes", "same", "different"})  # where the rationales branch ("no" is a negation)
FUNCTION_WORDS = frozenset(
    "a an the of in on at to for from by with and or but as is are was were be been being it its this that "
    "these those there here then so than which who what where when how if into onto over under between "
    "we i you he she they them their our your his her has have had do does did will would can could should "
    "must may might also only just all any each both some more most other such own same".split()
)
WORD_CATEGORIES = (
    "negation", "number", "colour", "shape", "size", "decision", "question word", "function word", "other",
)  # fmt: skip
WORD_RE = re.compile(r"[A-Za-z0-9$.%']+")


def _word(word: str) -> str:
    """A word as the categories read it: lower case, surrounding punctuation and quotes off."""
    return word.lower().strip(".,;:!?()[]\"'")


def word_category(word: str, question: set[str] | frozenset[str] = frozenset()) -> str:
    """The `WORD_CATEGORIES` entry of one word (punctuation around it ignored): a negation, a number or price
    (a digit, `$` or `%`), a colour / shape word (`data.lexicons`), a size word, a decision word, a word the
    question or its options already give (`question`: their lower-cased words), a function word, other."""
    w = _word(word)
    if w in NEGATIONS:
        return "negation"
    if any(c.isdigit() for c in w) or "$" in w or "%" in w:
        return "number"
    if w in COLOURS or w in SHAPES:
        return "colour" if w in COLOURS else "shape"
    if MENTION_RE.fullmatch(w) and lexicon_type(w)[0] in ("colour", "shape"):
        return lexicon_type(w)[0]
    if w in SIZE_WORDS or w in SIZES:
        return "size"
    if w in DECISION_WORDS:
        return "decision"
    if w in FUNCTION_WORDS:
        return "function word"
    if w and w in question:
        return "question word"
    return "other"


def question_vocabulary(question: str) -> set[str]:
    """The lower-cased words of a question and its options (`question_words`), as `word_category` reads them."""
    return {_word(w) for w in WORD_RE.findall(question)}


def words_by_category(text: str, question: set[str] | frozenset[str] = frozenset()) -> Counter:
    """Counter of (category, lower-cased word) over a rationale's body (`rationale_part`)."""
    return Counter((word_category(w, question), _word(w)) for w in WORD_RE.findall(rationale_part(text)))


def dropped_categories(reference: str, candidate: str, question: set[str] | frozenset[str] = frozenset()):
    """{category: words of the reference body the candidate's body no longer carries} (multiset difference),
    and "answer line": 1 when the candidate has no answer line."""
    ref, cand = words_by_category(reference, question), words_by_category(candidate, question)
    out = dict.fromkeys(WORD_CATEGORIES, 0)
    for (cat, w), n in ref.items():
        out[cat] += max(0, n - cand[(cat, w)])
    out["answer line"] = int(answer_line_start(candidate) is None)
    return out


# -------------------------------------------------------------------- VARR: one definition for 03 and 05
# Two readings of "visual attributes retained", computed together by `varr_text`:
# - the paper's VARR (types colour, shape, category; `attribute_mentions`): of the full rationale's lexicon
#   mentions, the share the candidate still carries, value by value. Needs no scene: real benchmarks too.
# - the binding-aware VARR of the embedded world (types bound_<colour|shape|size|position|text>;
#   `bound_mentions`): a mention counts only when said of the right object and true of the scene.
BOUND_PREFIX = "bound_"
BOUND_VARR_TYPES = tuple(BOUND_PREFIX + t for t in ANCHOR_TYPES)
VARR_GROUPS = {
    "overall": PAPER_VARR_TYPES,
    "bound_overall": BOUND_VARR_TYPES,
}  # pooled shares aggregate_varr adds


def attribute_mentions(text: str) -> Counter:
    """Counter of (type, canonical value) over the colour, shape and object-category words of a rationale's
    body (`rationale_part`: the answer line left out); lexicons in `data.lexicons`."""
    out: Counter = Counter()
    body = rationale_part(text)
    for m in MENTION_RE.finditer(body):
        t, value = lexicon_type(m.group(0))
        if t == "shape" and value == "square" and UNIT_AFTER_SQUARE.match(body, m.end()):
            continue
        out[(t, value)] += 1
    return out


def paper_varr(reference: Counter, candidate: str) -> dict[str, tuple[int, int]]:
    """The paper's VARR counts {type: (kept, total)}: each value the reference (`attribute_mentions` of the
    full rationale) mentions n times is kept min(n, times the candidate mentions it)."""
    said = attribute_mentions(candidate)
    out = {t: [0, 0] for t in PAPER_VARR_TYPES}
    for (t, value), n in reference.items():
        out[t][0] += min(n, said[(t, value)])
        out[t][1] += n
    return {t: (k, n) for t, (k, n) in out.items()}


def bound_mentions(text: str, scene: dict[str, Any] | None, question: str = "") -> list[tuple[str, str, str]]:
    """(object, type, value) for each visual-attribute mention of `text` before its answer line, the object
    named by its shape (shapes are distinct within a scene). A colour or size binds to the shape right after
    it ("a large blue circle"); any other mention to the last shape named before it ("..., marked $5.75",
    "It is blue"). Mentions whose value the question names, or bound to no shape of the scene, are left out."""
    if not scene:
        return []
    shapes = {o["shape"] for o in scene["objects"]}
    q = question.lower()
    found = find_anchors(rationale_part(text), scene)
    out, last = [], None
    for i, a in enumerate(found):
        if a["type"] == "shape":
            last = a["value"]
            obj = a["value"]
        elif a["type"] in ("colour", "size"):
            obj, j = last, i + 1  # through the adjectives right after it ("large blue") to the shape
            while j < len(found) and found[j]["start"] - found[j - 1]["end"] <= 1:
                if found[j]["type"] == "shape":
                    obj = found[j]["value"]
                    break
                if found[j]["type"] not in ("colour", "size"):
                    break
                j += 1
        else:
            obj = last
        if obj in shapes and not _in_question(a["value"], q):
            out.append((obj, a["type"], a["value"]))
    return out


def question_words(ex: dict[str, Any]) -> str:
    """What the prompt gives the model to copy: the question and its options (`varr_text`'s `question`)."""
    return " ".join([ex.get("question") or "", *(ex.get("options") or [])])


def _in_question(value: str, question: str) -> bool:
    return (
        bool(question) and re.search(rf"(?<![a-z]){re.escape(value.lower())}(?![a-z])", question) is not None
    )


def varr_text(
    reference: str | None,
    candidate: str,
    scene: dict[str, Any] | None,
    question: str = "",
    bound_reference: str | None = None,
) -> dict[str, tuple[int, int]]:
    """VARR counts of one rationale, {type: (kept, total)}, both readings (the block comment above). The paper's
    types count against `reference` (the full teacher rationale; None: no valid reference, totals 0). The
    bound_* types count against `bound_reference` (default `reference`): of its mentions of the scene's objects'
    true attributes (`bound_mentions`: answer line and question words left out), how many the candidate still
    says of the same object; an object's shape counts as kept only when the candidate binds nothing false to it
    that the reference does not. No scene (real benchmarks): bound totals 0. The one VARR of the gate's
    compressed rationales (03, candidate = `compress_text`) and the students' generated ones (05); pool with
    `aggregate_varr`."""
    return varr_kept(varr_reference(reference, scene, question, bound_reference), candidate, scene, question)


def varr_reference(
    reference: str | None,
    scene: dict[str, Any] | None,
    question: str = "",
    bound_reference: str | None = None,
) -> tuple[Counter | None, Counter]:
    """The reference's side of `varr_text` (computed once when many candidates share a reference)."""
    bound = reference if bound_reference is None else bound_reference
    paper = attribute_mentions(reference) if reference is not None else None
    return paper, Counter(bound_mentions(bound or "", scene, question))


def varr_kept(
    ref: tuple[Counter | None, Counter], candidate: str, scene: dict[str, Any] | None, question: str = ""
) -> dict:
    """The candidate's side of `varr_text`, against a `varr_reference`."""
    paper_ref, bound_ref = ref
    out = paper_varr(paper_ref if paper_ref is not None else Counter(), candidate)
    bound = {t: [0, 0] for t in ANCHOR_TYPES}
    if scene:
        said = bound_mentions(candidate, scene, question)
        wrong = {m[0] for m in said if not _true_of(m, scene) and m not in bound_ref}
        cand = Counter(m for m in said if _true_of(m, scene) and not (m[1] == "shape" and m[0] in wrong))
        for m, n in bound_ref.items():
            if _true_of(m, scene):
                bound[m[1]][0] += min(n, cand[m])
                bound[m[1]][1] += n
    return out | {BOUND_PREFIX + t: (k, n) for t, (k, n) in bound.items()}


def _true_of(m: tuple[str, str, str], scene: dict[str, Any]) -> bool:
    """Whether a bound mention (object shape, type, value) is true of that object."""
    if m[1] == "shape":
        return True
    o = next(o for o in scene["objects"] if o["shape"] == m[0])
    return o[SCENE_FIELD[m[1]]] == m[2]


def aggregate_varr(per_example: list[dict[str, tuple[int, int]]]) -> dict[str, float | None]:
    """Pooled VARR per type (kept / total over the examples; None where nothing was mentioned), and per group
    of `VARR_GROUPS`: `overall` (the paper's: colour, shape, category) and `bound_overall`."""
    out: dict[str, float | None] = {}
    for g, members in VARR_GROUPS.items():  # each group's types, then its pool
        hits = {t: sum(x[t][0] for x in per_example if t in x) for t in members}
        total = {t: sum(x[t][1] for x in per_example if t in x) for t in members}
        for t in members:
            out[t] = hits[t] / total[t] if total[t] else None
        n = sum(total.values())
        out[g] = sum(hits.values()) / n if n else None
    return out


def auc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged); nan if one class is empty."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]  # average rank of each tie group
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bootstrap_ci(stat, n: int, reps: int = 2000, seed: int = 0, level: float = 0.95) -> list[float | None]:
    """Percentile bootstrap interval of `stat(idx)` over `reps` resamples of `n` example indices (with
    replacement). `stat` takes the indices, so a paired comparison resamples the same examples for both
    systems (stat = metric of A on idx - metric of B on idx). NaN draws (a family absent from a resample) are
    dropped; [None, None] when nothing is left."""
    if n <= 0:
        return [None, None]
    rng = np.random.default_rng(seed)
    vals = np.array([stat(rng.integers(0, n, n)) for _ in range(reps)], dtype=float)
    vals = vals[~np.isnan(vals)]
    if not len(vals):
        return [None, None]
    lo, hi = np.percentile(vals, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


FAMILY_SCORE = {"attribute": "accuracy", "existence": "f1", "multistep": "accuracy", "reading": "anls"}
# each family's headline score (POPE F1 for existence, DocVQA's ANLS for reading), as `headline` reports them


class FamilyScores:
    """One system's per-example outcomes in a fixed example order (so two systems on the same ids pair by
    index), scored on any resample `idx` (what `bootstrap_ci` draws): each family's headline metric
    (`FAMILY_SCORE`), plain accuracy, yes-ratio, ActRatio and VARR. Records need `id`, `family`, `correct`;
    reading also `anls`; existence `parsed` (and `label`, yes / no, for F1); students `rationale_tokens` and `reference_tokens` (ActRatio) and `varr`."""

    def __init__(self, records: Sequence[dict[str, Any]], ids: Sequence[str]) -> None:
        by_id = {r["id"]: r for r in records}
        rs = [by_id[i] for i in ids]
        self.family = np.array([r["family"] for r in rs])
        self.correct = np.array([float(r["correct"]) for r in rs])
        self.anls = np.array([float(r.get("anls") or 0.0) for r in rs])
        self.yes = np.array([r.get("parsed") == "yes" for r in rs])
        self.label_yes = np.array([r.get("label") == "yes" for r in rs])
        self.varr_counts = {  # per VARR group: (kept, total) per example
            g: tuple(
                np.array([sum((r.get("varr") or {}).get(t, (0, 0))[j] for t in members) for r in rs], float)
                for j in (0, 1)
            )
            for g, members in VARR_GROUPS.items()
        }
        self.act_kept = np.array([r.get("rationale_tokens") or 0 for r in rs], dtype=float)
        self.act_ref = np.array([r.get("reference_tokens") or 0 for r in rs], dtype=float)
        self.families = sorted(set(self.family))
        self.n = len(rs)

    def score(self, idx, family: str) -> float:
        """The family's headline score on examples `idx` (NaN when none of them is of that family)."""
        sel = idx[self.family[idx] == family]
        if not len(sel):
            return float("nan")
        if family == "reading":
            return float(self.anls[sel].mean())
        if family == "existence":  # POPE F1, yes positive: 2 tp / (2 tp + fp + fn)
            yes, lab = self.yes[sel], self.label_yes[sel]
            tp = float((yes & lab).sum())
            wrong = float((yes & ~lab).sum() + (~yes & lab).sum())
            return 2 * tp / (2 * tp + wrong) if tp else 0.0
        return self.accuracy(idx, family)

    def accuracy(self, idx, family: str) -> float:
        sel = self.family[idx] == family
        return float(self.correct[idx][sel].mean()) if sel.any() else float("nan")

    def accuracy_mean(self, idx) -> float:
        """Accuracy averaged over the families (the summary's `acc_mean`)."""
        vals = [self.accuracy(idx, f) for f in self.families]
        return float(np.nanmean(vals)) if vals else float("nan")

    def yes_ratio(self, idx) -> float:
        sel = self.family[idx] == "existence"
        return float(self.yes[idx][sel].mean()) if sel.any() else float("nan")

    def act_ratio(self, idx) -> float:
        """`act_ratio` pooled over the examples that have a valid reference."""
        n = self.act_ref[idx].sum()
        return float(self.act_kept[idx][self.act_ref[idx] > 0].sum() / n) if n else float("nan")

    def varr(self, idx, group: str = "overall") -> float:
        """Pooled VARR of a `VARR_GROUPS` group (the paper's by default): mentions kept over mentions."""
        kept, total = self.varr_counts[group]
        n = total[idx].sum()
        return float(kept[idx].sum() / n) if n else float("nan")

    def varr_bound(self, idx) -> float:
        """Pooled binding-aware VARR (the embedded world's extra reading)."""
        return self.varr(idx, "bound_overall")

    def group(self, idx, families: Sequence[str]) -> float:
        """Mean of the families' headline scores (families absent from `idx` are left out)."""
        vals = [self.score(idx, f) for f in families]
        vals = [v for v in vals if v == v]
        return float(np.mean(vals)) if vals else float("nan")


def attribute_hallucinations(text: str, scene: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Mentions that contradict the scene: a colour/shape/price absent from the image, or a colour-shape pair
    bound wrongly ("a blue triangle" when the triangle is red). Needs scene ground truth."""

    if not scene:
        return []
    out = [
        {"kind": "absent_" + a["type"], "value": a["value"], "start": a["start"]}
        for a in find_anchors(text, scene)
        if not a["in_scene"] and a["type"] in ("colour", "shape", "text")
    ]
    pairs = {(o["colour"], o["shape"]) for o in scene["objects"]}
    shapes_present = {o["shape"] for o in scene["objects"]}
    colours_present = {o["colour"] for o in scene["objects"]}
    pat = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")
    for m in pat.finditer(text):
        c, s = m.group(1), m.group(2)
        # a wrong binding of two attributes that are each present; absent values are counted above
        if (c, s) not in pairs and c in colours_present and s in shapes_present:
            out.append({"kind": "wrong_binding", "value": f"{c} {s}", "start": m.start()})
    return out


# -------------------------------------------------------------------------------- hallucination analysis
def pope_by_split(
    records: list[dict[str, Any]], examples_by_id: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """POPE metrics per (system, ratio, negative sampler) from evaluation records of existence questions.
    Each split is scored on its own rows only (its positives and its negatives, by the example's
    `pope_split`), as lmms-eval's per-category POPE tasks are: in POPE every category has its own positives
    (real POPE: 1500 yes + 1500 no per category; the embedded benchmark draws the split of every existence
    example, positive or negative, before its answer), so each split is a balanced set whose precision, F1
    and yes-ratio are not shifted by the other splits' positives. Splits without rows get no row."""

    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["family"] == "existence":
            groups[(r["system"], r["ratio"])].append(r)
    rows = []
    for (system, ratio), recs in groups.items():
        for split in ("random", "popular", "adversarial"):
            sel = [r for r in recs if examples_by_id[r["id"]].get("pope_split") == split]
            if not sel:  # a split not evaluated (data.pope_categories) gets no row, not a row of zeros
                continue
            m = pope_metrics([r["parsed"] for r in sel], [examples_by_id[r["id"]]["answer"] for r in sel])
            rows.append({"method": system, "ratio": ratio, "split": split, **m})
    return rows


def hallucination_rows(
    records: list[dict[str, Any]], examples_by_id: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Attribute hallucinations in generated rationales, per (system, ratio) and kind, per example."""

    groups: dict[tuple, Counter] = defaultdict(Counter)
    counts: Counter = Counter()
    for r in records:
        key = (r["system"], r["ratio"])
        counts[key] += 1
        ex = examples_by_id[r["id"]]
        for h in attribute_hallucinations(rationale_part(r["response"]), ex.get("scene")):
            groups[key][h["kind"]] += 1
    kinds = ("absent_colour", "absent_shape", "absent_text", "wrong_binding")
    return [
        {
            "method": k[0],
            "ratio": k[1],
            **{kd: groups[k][kd] / counts[k] for kd in kinds},
            "total_per_example": sum(groups[k].values()) / counts[k],
            "n": counts[k],
        }
        for k in counts
    ]


# ------------------------------------------------------------------------------------------ evaluation
def chance_levels(examples: list[dict[str, Any]], seed: int = 0) -> dict[str, dict[str, float]]:
    """What an image-blind guesser scores: uniform over the asked attribute's values (attribute), a fair
    coin (existence), uniform over options (multistep), a random price from the generator (reading)."""

    rng = random.Random(seed)
    n_values = {"colour": len(COLOURS), "shape": len(SHAPES), "size": len(SIZES)}
    out: dict[str, dict[str, float]] = {}
    att = [1 / n_values[x["attr_type"]] for x in examples if x["family"] == "attribute"]
    if att:
        out["attribute"] = {"accuracy": sum(att) / len(att)}
    if any(x["family"] == "existence" for x in examples):
        out["existence"] = {"f1": 0.5, "yes_ratio": 0.5, "accuracy": 0.5}
    mc = [1 / len(x["options"]) for x in examples if x["family"] == "multistep" and x["options"]]
    if mc:
        out["multistep"] = {"accuracy": sum(mc) / len(mc)}
    rd = [x for x in examples if x["family"] == "reading"]
    if rd:
        guesses = [f"${rng.randint(1, 9)}.{rng.randint(0, 99):02d}" for _ in rd]
        out["reading"] = {
            "anls": sum(anls(g, x["answers"]) for g, x in zip(guesses, rd)) / len(rd),
            "accuracy": 1 / 900,
        }
    return out


def headline(fm: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The metrics.json layout of issue 3: accuracy / f1 + yes_ratio / anls / accuracy per family."""
    out: dict[str, dict[str, float]] = {}
    for fam, m in fm.items():
        if fam == "existence":
            out[fam] = {
                "f1": m["f1"],
                "yes_ratio": m["yes_ratio"],
                "accuracy": m["accuracy"],
                "unparsed": m["unparsed"],
            }
        elif fam == "reading":
            out[fam] = {"anls": m["anls"], "accuracy": m["accuracy"], "unparsed": m["unparsed"]}
        else:
            out[fam] = {"accuracy": m["accuracy"], "unparsed": m["unparsed"]}
            if "random_fallback" in m:
                out[fam]["random_fallback"] = m["random_fallback"]
    return out


_OPTION_RE = re.compile(
    r"\(([A-D])\) the (\w+) (\w+)(:? )(.*?)(?=\([A-D]\) the |\([A-D]\) \d or |The (?:highest|lowest)|From \$|So the|"
    r"Therefore the|This means|Answer:|$)",
    re.S,
)
_CHECK_RE = re.compile(r"it is (\w+); we need (\w+): (same|different)")
_RANK_RE = re.compile(r"; is it the (?:most expensive|cheapest)\? (yes|no)")
_VERIFY_RE = re.compile(r"; is it the (\w+) (\w+)\? (yes|no)")
_COMPARE_RE = re.compile(r"\(([A-D])\) (\d) or \(([A-D])\) (\d), (higher|lower): leader \(([A-D])\) (\d)")
_LEADER_RE = re.compile(r"leader \(([A-D])\) (\d)")
_SCAN_RE = re.compile(r"From \$\d (?:down|up): (.*?)(?=So the|Therefore the|This means|Answer:|$)", re.S)
_IMAGE_RE = re.compile(
    r"The (?:most expensive|cheapest) object in the image is the (\w+) (\w+), with the price (\$\d+\.\d\d)"
    r"(?:; it is option \(([A-D])\))?"
)
_SCAN_STEP_RE = re.compile(r"\$(\d): none|(\$\d\.\d\d) for \(([A-D])\)")
_EXTREME_RE = re.compile(r"The (highest|lowest) price is (\$\d+\.\d\d), option \(([A-D])\)")


def multistep_steps(
    text: str, scene: dict[str, Any], most: bool, options: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Each step of an embedded multi-step rationale checked against the scene, for every design
    (`data.multistep_rationale`). Per option: the presence claim ("costs $4.57" / "is not in the image" /
    "there is no circle"), the look-up ("it is blue"), the colour verdict, the price read; then the
    comparison(s) and the leader, or the scan's misses ("$9: none") and its hit ("$7.63 for (B)": compare,
    leader), or the image design's extreme object (compare), its price and its letter (leader: checked against
    `options`, the question's option texts), or the rank design's "is it the most expensive? yes" (rank) and the
    letter of its first yes (leader); the verify design's option checks and picks. One row per step: option, step, claim, ok."""
    objs = {o["shape"]: o for o in scene["objects"]}
    present = {(o["colour"], o["shape"]): o for o in scene["objects"]}
    right = _extreme(present, most) if present else None  # the right answer's (colour, shape)
    rows: list[dict[str, Any]] = []
    lead: tuple[str, int] | None = None  # the true running leader over the options read so far
    named: dict[str, str] = {}  # option letter -> price of the object it names, when present
    image = _IMAGE_RE.search(text)
    picked = None  # the pick design's letter: the option it says "yes" to
    for m in _OPTION_RE.finditer(text):
        letter, colour, shape, _sep, body = m.groups()
        o, obj = objs.get(shape), present.get((colour, shape))
        if obj is not None:
            named[letter] = obj["price"]

        def add(step: str, claim: str, ok: bool, letter: str = letter) -> None:
            rows.append({"option": letter, "step": step, "claim": claim.strip(), "ok": ok})

        if image and body.startswith(("yes", "no")):  # pick: is this option the object found?
            yes = body.startswith("yes")
            add("pick", body.split(".")[0], yes == ((colour, shape) == image.group(1, 2)))
            picked = picked or (letter if yes else None)
            continue

        if body.startswith("there is no"):
            add("presence", body.split(".")[0], o is None)
            continue
        if body.startswith("is not in the image"):
            add("presence", "not in the image", obj is None)
            continue
        check = _CHECK_RE.search(body)
        if check:
            seen, need, verdict = check.groups()
            add("look-up", f"it is {seen}", o is not None and o["colour"] == seen)
            add(
                "verdict",
                f"{seen} vs {need}: {verdict}",
                (seen == need) == (verdict == "same") and need == colour,
            )
            if verdict != "same":
                continue
            same = _VERIFY_RE.search(body) if image else None
            if same:  # verify: is this option the object found in the image (named beside it)?
                yes = same.group(3) == "yes"
                add("pick", same.group(0)[2:], yes == ((colour, shape) == image.group(1, 2)))
                picked = picked or (letter if yes else None)
                continue
            rank = _RANK_RE.search(body)
            if rank:  # rank: is this option the extreme object (read off its image tokens)?
                yes = rank.group(1) == "yes"
                add("rank", rank.group(0)[2:], yes == ((colour, shape) == right))
                picked = picked or (letter if yes else None)
                continue
        elif body.startswith("costs"):
            add("presence", "in the image", obj is not None)
        price = PRICE_RE.search(body)
        add(
            "price",
            price.group(0) if price else "(none)",
            bool(price and obj and price.group(0) == obj["price"]),
        )
        if obj is not None and (lead is None or (int(obj["price"][1]) > lead[1]) == most):
            lead = (letter, int(obj["price"][1]))
        cmp_ = _COMPARE_RE.match(text, m.end(5))  # the comparison right after this option's line, if any
        if cmp_:
            p, dp, q, dq, direction, win, dw = cmp_.groups()
            best = (p, dp) if (int(dp) > int(dq)) == (direction == "higher") else (q, dq)
            add("compare", cmp_.group(0), (win, dw) == best and (direction == "higher") == most)
        leader = cmp_.group(6) if cmp_ else (x.group(1) if (x := _LEADER_RE.search(body)) else None)
        if leader is not None:
            add("leader", f"leader ({leader})", lead is not None and leader == lead[0])
    if picked and not image and present and options:  # rank: the letter of the first yes
        ok = _names(options, picked, right)
        rows.append({"option": picked, "step": "leader", "claim": f"({picked})", "ok": ok})
    if image and present:
        colour, shape, price, letter = image.groups()
        letter = letter or picked or "?"
        found = present.get((colour, shape))
        rows.append(
            {
                "option": letter,
                "step": "compare",
                "claim": f"{colour} {shape}",
                "ok": (colour, shape) == right,
            }
        )
        rows.append(
            {"option": letter, "step": "price", "claim": price, "ok": bool(found and found["price"] == price)}
        )
        if options:
            ok = _names(options, letter, (colour, shape))
            rows.append({"option": letter, "step": "leader", "claim": f"({letter})", "ok": ok})
    scan = _SCAN_RE.search(text)
    if scan and named:
        best = (max if most else min)(named.values(), key=lambda v: float(v[1:]))
        for st in _SCAN_STEP_RE.finditer(scan.group(1)):
            miss, price, letter = st.groups()
            if miss is not None:
                ok = all(p[1] != miss for p in named.values())
                rows.append({"option": "", "step": "scan", "claim": st.group(0), "ok": ok})
                continue
            rows.append({"option": letter, "step": "compare", "claim": price, "ok": price == best})
            ok = named.get(letter) == best
            rows.append({"option": letter, "step": "leader", "claim": f"({letter})", "ok": ok})
    extreme = _EXTREME_RE.search(text)
    if extreme and present:
        _, price, letter = extreme.groups()
        opts_prices = [o["price"] for o in present.values()]
        best = (
            max(opts_prices, key=lambda v: float(v[1:]))
            if most
            else min(opts_prices, key=lambda v: float(v[1:]))
        )
        rows.append({"option": letter, "step": "compare", "claim": extreme.group(0), "ok": price == best})
    return rows


def _extreme(present: dict[tuple[str, str], dict[str, Any]], most: bool) -> tuple[str, str]:
    """(colour, shape) of the most expensive (or cheapest) object present."""
    value = {k: float(o["price"][1:]) for k, o in present.items()}
    return (max if most else min)(value, key=value.get)


def _names(options: Sequence[str], letter: str, obj: tuple[str, str]) -> bool:
    """Whether option `letter` of the question is the (colour, shape) object."""
    i = "ABCD".find(letter) if len(letter) == 1 else -1
    return 0 <= i < len(options) and options[i] == f"the {obj[0]} {obj[1]}"


def facts_right(rows: list[dict[str, Any]]) -> bool:
    """Whether every fact read off the image in a multi-step rationale is right (presence, colour, price, rank)."""
    facts = [r for r in rows if r["step"] in ("presence", "look-up", "price", "rank")]
    return bool(facts) and all(r["ok"] for r in facts)


def multistep_report(texts: Sequence[str], examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The steps of embedded multi-step rationales checked against their scenes (`multistep_steps`): the share
    of rationales whose facts read off the image are all right, and each step kind's accuracy. Examples of
    other families, or without a scene (real benchmarks), are left out; `n` counts the ones checked."""
    facts, ok, total = 0, Counter(), Counter()
    n = 0
    for text, ex in zip(texts, examples, strict=True):
        if ex.get("family") != "multistep" or not ex.get("scene") or not ex.get("options"):
            continue
        n += 1
        rows = multistep_steps(text, ex["scene"], "most" in ex["question"], ex["options"])
        facts += facts_right(rows)
        for r in rows:
            total[r["step"]] += 1
            ok[r["step"]] += bool(r["ok"])
    steps = {k: ok[k] / total[k] for k in total}
    return {"n": n, "facts_right": facts / n if n else None, "step_accuracy": steps}
