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
from pathlib import Path
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


# ---------------------------------------------------------------------------------- rationale-level metrics
VARR_TYPES = ("colour", "shape", "size", "position", "text")


def rationale_part(response: str) -> str:
    """The reasoning before the final `Answer:` marker (the whole response if there is none)."""
    i = response.lower().rfind("answer:")
    return response[:i].rstrip() if i >= 0 else response


def varr_generated(
    gold_anchors: list[dict[str, Any]], generated: str, scene: dict[str, Any] | None
) -> dict[str, tuple[int, int]]:
    """VARR of a generated rationale: of the scene attributes the gold rationale mentions (distinct
    type/value pairs that are in the scene), how many the generated rationale also mentions. Returns
    {type: (hits, total)}; aggregate hits and totals over examples, then divide."""
    from .data import find_anchors

    gold = {(a["type"], a["value"]) for a in gold_anchors if a.get("in_scene", True)}
    gen = {(a["type"], a["value"]) for a in find_anchors(generated, scene) if a.get("in_scene", True)}
    return {
        t: (len({g for g in gold if g[0] == t} & gen), len({g for g in gold if g[0] == t}))
        for t in VARR_TYPES
    }


def aggregate_varr(per_example: list[dict[str, tuple[int, int]]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    hits_all = total_all = 0
    for t in VARR_TYPES:
        hits = sum(x[t][0] for x in per_example)
        total = sum(x[t][1] for x in per_example)
        out[t] = hits / total if total else None
        hits_all += hits
        total_all += total
    out["overall"] = hits_all / total_all if total_all else None
    return out


def attribute_hallucinations(text: str, scene: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Mentions that contradict the scene: a colour/shape/price absent from the image, or a colour-shape pair
    bound wrongly ("a blue triangle" when the triangle is red). Needs scene ground truth."""
    from .data import COLOURS, SHAPES, find_anchors

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


def latency(
    model,
    tok,
    proc,
    examples: list[dict[str, Any]],
    max_new_tokens: int,
    prefix: str = "",
    instruction: str = "",
    warmup: int = 1,
    assistant_prefill: str = "",
    repetition_penalty: float = 1.0,
) -> dict[str, Any]:
    """End-to-end `generate` latency per example at batch 1, after `warmup` untimed calls: median and p90
    (seconds) and generated tokens. A measurement of this machine; label it with env.json's device."""
    import numpy as np

    from .generation import generate

    for ex in examples[:warmup]:
        generate(
            model,
            tok,
            proc,
            [ex],
            max_new_tokens,
            1,
            prefix=prefix,
            instruction=instruction,
            assistant_prefill=assistant_prefill,
            repetition_penalty=repetition_penalty,
        )
    times, toks = [], []
    for ex in examples:
        g = generate(
            model,
            tok,
            proc,
            [ex],
            max_new_tokens,
            1,
            prefix=prefix,
            instruction=instruction,
            assistant_prefill=assistant_prefill,
            repetition_penalty=repetition_penalty,
        )[0]
        times.append(g["time_s"])
        toks.append(len(g["token_ids"]))
    return {
        "median_s": float(np.median(times)),
        "p90_s": float(np.percentile(times, 90)),
        "mean_tokens": float(np.mean(toks)),
        "n": len(times),
    }


# ------------------------------------------------------------------------------------------ system runs
def evaluate_system(
    loaded,
    examples: list[dict[str, Any]],
    name: str,
    ratio: float | None = None,
    prefix: str = "",
    max_new_tokens: int = 192,
    batch_size: int = 32,
    instruction: str = "",
    reference_tokens: dict[str, int] | None = None,
    seed: int = 0,
    assistant_prefill: str = "",
    progress: bool = True,
    repetition_penalty: float = 1.0,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate for every example, score with each family's metric, and measure rationale tokens, ActRatio
    (vs `reference_tokens`, the teacher's full-rationale token counts by id), VARR and hallucinations.
    `assistant_prefill` starts the answer (e.g. "Answer:" for the direct-answer baseline); pass
    `repetition_penalty=cfg.generation.repetition_penalty` (the decoding of `generation.decoding_config`)."""
    from .generation import generate

    tok = loaded.tokenizer
    gens = generate(
        loaded.model,
        tok,
        loaded.processor,
        examples,
        max_new_tokens,
        batch_size,
        prefix=prefix,
        instruction=instruction,
        progress=progress,
        desc=name,
        assistant_prefill=assistant_prefill,
        repetition_penalty=repetition_penalty,
    )
    recs = []
    for ex, g in zip(examples, gens):
        text = assistant_prefill + g["text"] if assistant_prefill else g["text"]
        s = score_example(ex, text, seed)
        rat = rationale_part(text) if not assistant_prefill else ""
        n_rat = len(tok(rat, add_special_tokens=False)["input_ids"]) if rat else 0
        ref = (reference_tokens or {}).get(ex["id"])
        recs.append(
            {
                **s,
                "system": name,
                "ratio": ratio,
                "response": text,
                "gen_tokens": len(g["token_ids"]),
                "rationale_tokens": n_rat,
                "act_ratio": n_rat / ref if ref else None,
                "varr": varr_generated(ex.get("anchors") or [], rat, ex.get("scene")),
                "hallucinations": len(attribute_hallucinations(rat, ex.get("scene"))),
                "time_s": g["time_s"],
            }
        )
    return recs, summarize(examples, recs, name, ratio)


def summarize(
    examples: list[dict[str, Any]], recs: list[dict[str, Any]], name: str, ratio: float | None
) -> dict[str, Any]:
    """One summary row: the paper's table layout."""
    import numpy as np

    fm = family_metrics(examples, recs)
    acts = [r["act_ratio"] for r in recs if r["act_ratio"] is not None]
    return {
        "method": name,
        "ratio": ratio,
        "accuracy": {f: m["accuracy"] for f, m in fm.items()},
        "anls": fm.get("reading", {}).get("anls"),
        "pope_f1": fm.get("existence", {}).get("f1"),
        "yes_ratio": fm.get("existence", {}).get("yes_ratio"),
        "tokens": float(np.mean([r["rationale_tokens"] for r in recs])) if recs else None,
        "gen_tokens": float(np.mean([r["gen_tokens"] for r in recs])) if recs else None,
        "act_ratio": float(np.mean(acts)) if acts else None,
        "varr": aggregate_varr([r["varr"] for r in recs]),
        "hallucinations_per_example": float(np.mean([r["hallucinations"] for r in recs])) if recs else None,
        "unparsed": int(sum(r["unparsed"] for r in recs)),
        "random_fallback": int(sum(bool(r.get("random_fallback")) for r in recs)),
        "n": len(recs),
    }


def student_adapters(stage04: Path) -> dict[str, str]:
    """{method: adapter dir} from 04's metrics.json (includes the full-rationale control `full`)."""
    import json

    m = json.loads((Path(stage04) / "metrics.json").read_text())["methods"]
    return {k: v["adapter"] for k, v in m.items() if v.get("adapter")}


def evaluate_students(
    cfg,
    adapters: dict[str, str],
    examples: list[dict[str, Any]],
    reference_tokens: dict[str, int],
    progress: bool = True,
):
    """Every student at every `eval.ratios` (the `full` control at 1.0 only). Yields (records, row, loaded)
    per (method, ratio); the student is merged into its base for generation (no adapter overhead)."""
    from .distill import load_student, ratio_prefix

    g, e = cfg.generation, cfg.eval
    for method, path in adapters.items():
        student = load_student(cfg, path)
        ratios = [1.0] if method == "full" else list(e.ratios)
        for r in ratios:
            recs, row = evaluate_system(
                student,
                examples,
                method,
                r,
                prefix=ratio_prefix(r),
                max_new_tokens=g.max_new_tokens,
                batch_size=e.batch_size,
                instruction=g.instruction,
                reference_tokens=reference_tokens,
                seed=e.seed,
                progress=progress,
                repetition_penalty=g.repetition_penalty,
            )
            yield recs, row, student


def latency_fields(
    cfg, loaded, examples: list[dict[str, Any]], prefix: str = "", assistant_prefill: str = ""
) -> dict[str, float]:
    """Latency of one system as summary-row fields (median and p90 seconds at batch 1)."""
    lat = latency(
        loaded.model,
        loaded.tokenizer,
        loaded.processor,
        examples,
        cfg.generation.max_new_tokens,
        prefix=prefix,
        instruction=cfg.generation.instruction,
        assistant_prefill=assistant_prefill,
        repetition_penalty=cfg.generation.repetition_penalty,
    )
    return {"latency_s": lat["median_s"], "latency_p90_s": lat["p90_s"]}


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
    from collections import defaultdict

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
    from collections import Counter, defaultdict

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


def _survives(row, keep, anchor: dict[str, Any]) -> bool:
    tok = (row.offsets[:, 0] < anchor["end"]) & (row.offsets[:, 1] > anchor["start"])
    return bool(tok.any()) and bool(keep[tok].all())


def gallery_cases(
    rows,
    anchors_by_id: dict[str, list[dict[str, Any]]],
    cfg,
    gamma: float = 0.5,
    n: int = 3,
    a: str = "vskip",
    b: str = "text_only",
) -> dict[str, list[dict[str, Any]]]:
    """Rationales where method `b` drops a visual anchor that `a` keeps (and, honestly, the reverse), at
    `gamma`. Returns {"a_keeps": [...], "b_keeps": [...]}, each case with both masks and the anchors lost."""
    from .gating import GateError, as_scored, keep_mask

    out: dict[str, list[dict[str, Any]]] = {"a_keeps": [], "b_keeps": []}
    for raw in rows:
        row = as_scored(raw)
        try:
            ka, kb = keep_mask(row, a, gamma, cfg), keep_mask(row, b, gamma, cfg)
        except GateError:
            continue
        anchors = anchors_by_id.get(row.id, [])
        only_a = [x for x in anchors if _survives(row, ka, x) and not _survives(row, kb, x)]
        only_b = [x for x in anchors if _survives(row, kb, x) and not _survives(row, ka, x)]
        case = {"row": row, "keep_a": ka, "keep_b": kb}
        if only_a and len(out["a_keeps"]) < n:
            out["a_keeps"].append({**case, "lost": only_a})
        if only_b and len(out["b_keeps"]) < n:
            out["b_keeps"].append({**case, "lost": only_b})
        if len(out["a_keeps"]) >= n and len(out["b_keeps"]) >= n:
            break
    return out
