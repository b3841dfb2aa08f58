"""Stage 05's work: run a system (teacher, direct answer, each student at each ratio) over the test examples,
score every response with `vskip_core.metrics`, and reduce the records to one summary row (accuracy, ANLS,
POPE F1 / yes-ratio, rationale tokens, ActRatio, VARR, hallucinations); latency at batch 1; the gate gallery.
Notebook 05 calls it; the parsing and the metrics themselves are pure functions in `vskip_core.metrics`."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from vskip_core.common.students import (  # noqa: F401  (student_adapters: notebooks 05 and 06 import it here)
    load_student,
    parse_student,
    ratio_prompt,
    student_adapters,
    students_at,
)
from vskip_core.method.gating import GateError, as_scored, keep_mask
from vskip_core.metrics import (
    WORD_CATEGORIES,
    FamilyScores,
    act_ratio,
    aggregate_varr,
    attribute_hallucinations,
    body_tokens,
    bootstrap_ci,
    dropped_categories,
    family_metrics,
    question_vocabulary,
    question_words,
    rationale_part,
    score_example,
    varr_text,
)
from vskip_core.modeling.decoding import generate
from vskip_core.modeling.prompts import answer_line_start


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

    def one(ex):
        return generate(
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

    for ex in examples[:warmup]:
        one(ex)
    times, toks = [], []
    for ex in examples:
        g = one(ex)
        times.append(g["time_s"])
        toks.append(len(g["token_ids"]))
    return {
        "median_s": float(np.median(times)),
        "p90_s": float(np.percentile(times, 90)),
        "mean_tokens": float(np.mean(toks)),
        "n": len(times),
        "times_s": [float(t) for t in times],
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
    reference: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
    assistant_prefill: str = "",
    progress: bool = True,
    repetition_penalty: float = 1.0,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate for every example, score with each family's metric, and measure rationale tokens, ActRatio and
    the paper's VARR (both against `reference`, the teacher's full-rationale records by id, `teacher_reference`;
    a truncated one is no reference), the binding-aware VARR (against the gold rationale) and hallucinations.
    `assistant_prefill` starts the answer (e.g. "Answer:" for the direct-answer baseline); pass
    `repetition_penalty=cfg.generation.repetition_penalty` (the decoding of `generation.decoding_config`)."""

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
    # a prefill that starts the answer line ("Answer:", the direct baseline) is part of the response; one that
    # is prompt (a student's ratio line, distill.ratio_position answer_start) is not
    answers = assistant_prefill and answer_line_start(assistant_prefill) == 0
    texts = [assistant_prefill + g["text"] if answers else g["text"] for g in gens]
    rats = ["" if answers else rationale_part(t) for t in texts]
    bodies = body_tokens(rats, tok)
    recs = []
    for ex, g, text, rat, n_body in zip(examples, gens, texts, rats, bodies):
        s = score_example(ex, text, seed)
        ref = (reference or {}).get(ex["id"])
        ref_ok = ref is not None and not ref["truncated"]
        recs.append(
            {
                **s,
                "system": name,
                "ratio": ratio,
                "response": text,
                "gen_tokens": len(g["token_ids"]),
                "truncated": len(g["token_ids"]) >= max_new_tokens,  # hit the cap: not a full rationale
                "rationale_tokens": n_body,  # the body, ActRatio's unit (`metrics.body_tokens`)
                "reference_tokens": ref["rationale_tokens"] if ref_ok else None,
                "act_ratio": act_ratio([n_body], [ref["rationale_tokens"]]) if ref_ok else None,
                "varr": varr_text(
                    ref["response"] if ref_ok else None,
                    text if rat else "",
                    ex.get("scene"),
                    question_words(ex),
                    bound_reference=ex.get("rationale") or "",
                ),
                "hallucinations": len(attribute_hallucinations(rat, ex.get("scene"))),
                "time_s": g["time_s"],
            }
        )
    return recs, summarize(examples, recs, name, ratio)


def teacher_reference(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The teacher's full-rationale records by id: what ActRatio and the paper's VARR compare against. Those that
    hit `max_new_tokens` stay flagged (`truncated`) and are left out of both, never silently shortening them."""
    return {r["id"]: {k: r[k] for k in ("response", "rationale_tokens", "truncated")} for r in records}


def summarize(
    examples: list[dict[str, Any]], recs: list[dict[str, Any]], name: str, ratio: float | None
) -> dict[str, Any]:
    """One summary row: the paper's table layout."""
    import numpy as np

    fm = family_metrics(examples, recs)
    return {
        "method": name,
        "ratio": ratio,
        "accuracy": {f: m["accuracy"] for f, m in fm.items()},
        "anls": fm.get("reading", {}).get("anls"),
        "pope_f1": fm.get("existence", {}).get("f1"),
        "yes_ratio": fm.get("existence", {}).get("yes_ratio"),
        "tokens": float(np.mean([r["rationale_tokens"] for r in recs])) if recs else None,
        "gen_tokens": float(np.mean([r["gen_tokens"] for r in recs])) if recs else None,
        "act_ratio": act_ratio([r["rationale_tokens"] for r in recs], [r["reference_tokens"] for r in recs]),
        "act_ratio_n": sum(bool(r["reference_tokens"]) for r in recs),  # examples with a valid reference
        "truncated": int(sum(r["truncated"] for r in recs)),
        "varr": aggregate_varr([r["varr"] for r in recs]),
        "hallucinations_per_example": float(np.mean([r["hallucinations"] for r in recs])) if recs else None,
        "unparsed": int(sum(r["unparsed"] for r in recs)),
        "random_fallback": int(sum(bool(r.get("random_fallback")) for r in recs)),
        "n": len(recs),
    }


# ------------------------------------------------------------------------------------ intervals
def add_intervals(rows: list[dict[str, Any]], records: list[dict[str, Any]], reps: int = 2000, seed: int = 0):
    """Bootstrap 95% intervals (`metrics.bootstrap_ci`, resampling test examples) on every summary row:
    `accuracy_mean` (mean over families) and `*_ci` fields for it, each family's accuracy, yes-ratio, ActRatio
    and VARR; and, paired by example (on the examples both rows have), each student against the `full` control
    (`vs_full`: accuracy_mean and yes-ratio differences) and each V-Skip student against the text-only student
    and the LLMLingua-2 student at its ratio (`vs_text_only`, `vs_llmlingua2`: paper and binding-aware VARR
    differences). Rows are updated in place."""

    def key(r):
        return (r["method"], r["ratio"])

    by_key: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_key[(r["system"], r["ratio"])].append(r)
    ids = {k: [r["id"] for r in v] for k, v in by_key.items()}

    def ci(a: FamilyScores, metric: str, *args) -> list[float | None]:
        return bootstrap_ci(lambda i: getattr(a, metric)(i, *args), a.n, reps, seed)

    def diff(ka, kb, metric: str, name: str) -> dict[str, Any]:
        other = set(ids[kb])
        common = [i for i in ids[ka] if i in other]
        fa, fb = (
            getattr(FamilyScores(by_key[ka], common), metric),
            getattr(FamilyScores(by_key[kb], common), metric),
        )
        return {
            f"{name}_diff": fa(np.arange(len(common))) - fb(np.arange(len(common))),
            f"{name}_diff_ci": bootstrap_ci(lambda i: fa(i) - fb(i), len(common), reps, seed),
            f"{name}_diff_n": len(common),
        }

    full = ("full", 1.0) if ("full", 1.0) in by_key else None
    for row in rows:
        a = FamilyScores(by_key[key(row)], ids[key(row)])
        every = np.arange(a.n)
        row["n_examples"] = a.n
        row["accuracy_mean"] = a.accuracy_mean(every)
        row["accuracy_mean_ci"] = ci(a, "accuracy_mean")
        row["accuracy_ci"] = {f: ci(a, "accuracy", f) for f in a.families}
        row["yes_ratio_ci"] = ci(a, "yes_ratio")
        row["act_ratio_ci"] = ci(a, "act_ratio")
        row["varr_overall_ci"] = ci(a, "varr")
        row["varr_bound_overall_ci"] = ci(a, "varr", "bound_overall")
        if full is not None and row["method"] not in ("teacher", "direct", "full"):
            row["vs_full"] = diff(key(row), full, "accuracy_mean", "accuracy_mean") | diff(
                key(row), full, "yes_ratio", "yes_ratio"
            )
        for base in ("text_only", "llmlingua2"):  # the paper's comparisons: V-Skip against blind compression
            if row["method"] == "vskip" and (base, row["ratio"]) in by_key:
                row[f"vs_{base}"] = diff(key(row), (base, row["ratio"]), "varr", "varr") | diff(
                    key(row), (base, row["ratio"]), "varr_bound", "varr_bound"
                )
    return rows


# ------------------------------------------------------------------------------- curves, equal length
ANCHORS = ("direct", "full")  # the ends of every method's curve: no rationale (ActRatio 0), the full one (~1)


def curves(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per student method, its points by requested ratio (ascending), each with ActRatio, mean and per-family
    accuracy, the paper's VARR and the POPE yes-ratio and their 95% intervals (`add_intervals` first); the
    anchors `direct` and `full` as one-point curves. What summary.json's `curves` holds and notebook 05 draws."""

    def point(r):
        return {
            "ratio": r["ratio"],
            "n": r.get("n_examples"),
            "act_ratio": r["act_ratio"],
            "act_ratio_ci": r.get("act_ratio_ci"),
            "accuracy_mean": r.get("accuracy_mean"),
            "accuracy_mean_ci": r.get("accuracy_mean_ci"),
            "accuracy": r["accuracy"],
            "accuracy_ci": r.get("accuracy_ci"),
            "varr_overall": r["varr"].get("overall"),
            "varr_overall_ci": r.get("varr_overall_ci"),
            "yes_ratio": r["yes_ratio"],
            "yes_ratio_ci": r.get("yes_ratio_ci"),
        }

    out: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: (r["ratio"] is None, r["ratio"] or 0.0)):
        if r["method"] != "teacher":
            out.setdefault(r["method"], []).append(point(r))
    return out


def _interp(at: float, xs: list[float], ys: list[float]) -> float:
    """y at x = `at` on the polyline through (xs, ys) sorted by x; NaN outside its span or on a NaN point."""
    pts = sorted((x, y) for x, y in zip(xs, ys) if x == x)
    if not pts or any(y != y for _, y in pts) or not pts[0][0] <= at <= pts[-1][0]:
        return float("nan")
    return float(np.interp(at, [x for x, _ in pts], [y for _, y in pts]))


def equal_length(
    records: list[dict[str, Any]],
    at: float = 0.5,
    base: str = "vskip",
    reps: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every student method read at the same actual length: each metric interpolated linearly on the method's
    curve (its points by requested ratio, with `direct` and `full` as the ends: evaluated against the same
    reference, the direct answer measures ActRatio 0 and VARR 0) at
    ActRatio `at`, on the examples every point ran (paired). Returns, with bootstrap 95% intervals that
    resample those examples and redo the interpolation: per method `accuracy_mean`, `varr` (the paper's),
    `yes_ratio` and `yes_dist` (|yes-ratio - full's|) and the ActRatios bracketing `at`; `vs_full`
    (accuracy minus full's); and `vs` (`base` minus each other method: accuracy, VARR, yes_dist)."""
    by_key: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_key[(r["system"], r["ratio"])].append(r)
    anchors = [k for k in by_key if k[0] in ANCHORS]
    methods = sorted({k[0] for k in by_key if k[0] not in (*ANCHORS, "teacher")})
    if ("full", 1.0) not in by_key or not methods:
        return {}
    keys = [k for k in by_key if k[0] in methods] + anchors
    common = set.intersection(*({r["id"] for r in by_key[k]} for k in keys))
    ids = [r["id"] for r in by_key[("full", 1.0)] if r["id"] in common]
    fs = {k: FamilyScores(by_key[k], ids) for k in keys}

    def read(m: str, metric: str, idx) -> float:
        ks = [k for k in keys if k[0] in (m, *ANCHORS)]
        xs = [fs[k].act_ratio(idx) for k in ks]
        if metric == "yes_dist":
            full_yes = fs[("full", 1.0)].yes_ratio(idx)
            return abs(_interp(at, xs, [fs[k].yes_ratio(idx) for k in ks]) - full_yes)
        return _interp(at, xs, [getattr(fs[k], metric)(idx) for k in ks])

    every = np.arange(len(ids))
    names = ("accuracy_mean", "varr", "yes_ratio", "yes_dist")

    def with_ci(f) -> dict[str, Any]:
        return {"value": f(every), "ci": bootstrap_ci(f, len(ids), reps, seed)}

    out: dict[str, Any] = {"at": at, "n": len(ids), "base": base, "methods": {}, "vs_full": {}, "vs": {}}
    for m in methods:
        xs = sorted(fs[k].act_ratio(every) for k in keys if k[0] in (m, *ANCHORS))
        below = [x for x in xs if x <= at]
        above = [x for x in xs if x >= at]
        out["methods"][m] = {
            "bracket": [below[-1] if below else None, above[0] if above else None],
            **{n: with_ci(lambda i, m=m, n=n: read(m, n, i)) for n in names},
        }
        out["vs_full"][m] = with_ci(
            lambda i, m=m: read(m, "accuracy_mean", i) - fs[("full", 1.0)].accuracy_mean(i)
        )
    if base in methods:
        for m in methods:
            if m != base:
                out["vs"][m] = {
                    n: with_ci(lambda i, m=m, n=n: read(base, n, i) - read(m, n, i))
                    for n in ("accuracy_mean", "varr", "yes_dist")
                }
    return out


# --------------------------------------------------------------------------- what the students drop
def category_errors(
    records: list[dict[str, Any]],
    reference: dict[str, dict[str, Any]],
    examples: list[dict[str, Any]],
    ratio: float = 0.5,
    reps: int = 2000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Which dropped word categories go with a student's wrong answers: for each student at `ratio`, each
    family and each category (`metrics.WORD_CATEGORIES` and "answer line"), the examples whose rationale lost
    at least one word of that category the teacher's rationale had (`metrics.dropped_categories`) against
    those that lost none: their counts, accuracies, and the difference (dropped minus kept) with a bootstrap
    95% interval over the family's examples. An association, not a cause: a harder example may both lose more
    and fail more."""
    vocab = {ex["id"]: question_vocabulary(question_words(ex)) for ex in examples}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        ref = reference.get(r["id"])
        if r["ratio"] != ratio or r["system"] in (*ANCHORS, "teacher") or not ref or ref["truncated"]:
            continue
        drops = dropped_categories(ref["response"], r["response"], vocab.get(r["id"], set()))
        groups[(r["system"], r["family"])].append({"correct": float(r["correct"]), **drops})
    out = []
    for (system, family), rs in sorted(groups.items()):
        correct, every = np.array([x["correct"] for x in rs]), np.arange(len(rs))
        for cat in (*WORD_CATEGORIES, "answer line"):
            lost = np.array([x[cat] > 0 for x in rs])

            def diff(i, lost=lost, correct=correct):
                a, b = correct[i][lost[i]], correct[i][~lost[i]]
                return float(a.mean() - b.mean()) if len(a) and len(b) else float("nan")

            out.append(
                {
                    "method": system,
                    "family": family,
                    "category": cat,
                    "n": len(rs),
                    "dropped_share": float(lost.mean()),
                    "acc_dropped": float(correct[lost].mean()) if lost.any() else None,
                    "acc_kept": float(correct[~lost].mean()) if (~lost).any() else None,
                    "diff": diff(every),
                    "diff_ci": bootstrap_ci(diff, len(rs), reps, seed),
                }
            )
    return out


def evaluate_students(
    cfg,
    adapters: dict[str, str],
    examples: list[dict[str, Any]],
    reference: dict[str, dict[str, Any]],
    progress: bool = True,
):
    """Every student at every `eval.ratios` (the `full` control at 1.0 only): on all `examples` at
    `eval.main_ratio` (and the control), on the first `eval.sweep_examples` of them at the other ratios.
    `adapters`: 04's students by name (`student_adapters`); each (method, ratio) is answered by the student
    `distillation.students_at` picks (its own-ratio student, else the ratio-conditioned one).
    Yields (records, row, loaded) per (method, ratio); the student is merged into its base for generation
    (no adapter overhead)."""

    g, e = cfg.generation, cfg.eval
    sweep = examples[: e.sweep_examples] if e.sweep_examples else examples
    loaded: dict[str, Any] = {}
    for method in dict.fromkeys(parse_student(name)[0] for name in adapters):
        ratios = [1.0] if method == "full" else list(e.ratios)
        for r in ratios:
            path = students_at(adapters, r).get(method)  # its student of that ratio, or the conditioned one
            if path is None:
                continue
            if path not in loaded:
                loaded = {path: load_student(cfg, path)}  # one student in memory at a time
            student = loaded[path]
            recs, row = evaluate_system(
                student,
                examples if method == "full" or r == e.main_ratio else sweep,
                method,
                r,
                **ratio_prompt(cfg, r),
                max_new_tokens=g.max_new_tokens,
                batch_size=e.batch_size,
                reference=reference,
                seed=cfg.runtime.seed,
                progress=progress,
                repetition_penalty=g.repetition_penalty,
            )
            yield recs, row, student


def latency_fields(
    cfg, loaded, examples: list[dict[str, Any]], ratio: float | None = None, assistant_prefill: str = ""
) -> dict[str, float]:
    """Latency of one system as summary-row fields (median and p90 seconds at batch 1); a student is asked
    for `ratio` (`distillation.ratio_prompt`)."""
    prompt = ratio_prompt(cfg, ratio) if ratio is not None else {"instruction": cfg.generation.instruction}
    prompt = {**prompt, "assistant_prefill": prompt.get("assistant_prefill", "") + assistant_prefill}
    lat = latency(
        loaded.model,
        loaded.tokenizer,
        loaded.processor,
        examples,
        cfg.generation.max_new_tokens,
        **prompt,
        repetition_penalty=cfg.generation.repetition_penalty,
    )
    return {"latency_s": lat["median_s"], "latency_p90_s": lat["p90_s"], "latency_times_s": lat["times_s"]}


def add_speedups(rows: list[dict[str, Any]], reps: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Batch-1 speed-up of every row with its bootstrap 95% interval, paired by timed example (the same examples
    time every system): `speedup_vs_teacher` (the original model writing its full rationale, as the paper
    reports it) and `speedup_vs_full` (the full-rationale LoRA control). Rows updated in place."""
    for ref_name in ("teacher", "full"):
        ref = next((r for r in rows if r["method"] == ref_name and r.get("latency_times_s")), None)
        for r in rows:
            t = np.asarray(r.get("latency_times_s") or [], float)
            field = f"speedup_vs_{ref_name}"
            if ref is None or not len(t):
                r[field], r[field + "_ci"] = None, [None, None]
                continue
            f = np.asarray(ref["latency_times_s"], float)[: len(t)]
            r[field] = float(np.median(f) / np.median(t))
            r[field + "_ci"] = bootstrap_ci(
                lambda i, f=f, t=t: float(np.median(f[i]) / np.median(t[i])), len(t), reps, seed
            )
    return rows


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
    `gamma`. Returns {"a_keeps": [...], "b_keeps": [...]}, each case with both masks and the anchors lost; a
    rationale appears in one list only."""

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
        elif only_b and len(out["b_keeps"]) < n:  # each rationale shown once
            out["b_keeps"].append({**case, "lost": only_b})
        if len(out["a_keeps"]) >= n and len(out["b_keeps"]) >= n:
            break
    return out
