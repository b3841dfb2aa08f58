"""Answer parsing and the benchmarks' metrics, following each benchmark's official conventions.

- `parse_multiple_choice`: MMMU's parser: `(A)`, then `A ` / `A.` bare letters, then option text for
  responses longer than five words; the last occurrence wins; no match -> a seeded random letter, flagged.
- `anls`: DocVQA's ANLS (lowercase, collapsed whitespace, normalized Levenshtein, best reference, < 0.5 -> 0).
- `pope_metrics`: accuracy, precision, recall, F1 and yes-ratio = share of *predicted* yes.
- `score_example`: the family's metric for one response of the embedded benchmark.
"""

from __future__ import annotations

import random
import re
from typing import Any

ANSWER_RE = re.compile(r"answer\s*(?:is|:)", re.IGNORECASE)


def final_answer(response: str) -> str | None:
    """The text after the last 'Answer:' / 'answer is' in a chain-of-thought output (None if absent)."""
    matches = list(ANSWER_RE.finditer(response))
    if not matches:
        return None
    rest = response[matches[-1].end() :].strip()
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


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str | None, references: list[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one prediction (best over references)."""
    if prediction is None:
        return 0.0
    p = normalize_text(prediction)
    best = 0.0
    for r in references:
        r = normalize_text(r)
        denom = max(len(p), len(r))
        nl = levenshtein(p, r) / denom if denom else 0.0
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


def score_example(ex: dict[str, Any], response: str, seed: int = 0) -> dict[str, Any]:
    """Parse one response of the embedded benchmark and score it with its family's metric."""
    fam = ex["family"]
    ans = final_answer(response)
    out: dict[str, Any] = {"id": ex["id"], "family": fam, "parsed": ans, "unparsed": ans is None}
    if fam == "multistep":
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
