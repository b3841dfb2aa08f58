"""Stage 05's work: run a system (teacher, direct answer, each student at each ratio) over the test examples,
score every response with `vskip_core.metrics`, and reduce the records to one summary row (accuracy, ANLS,
POPE F1 / yes-ratio, rationale tokens, ActRatio, VARR, hallucinations); latency at batch 1; the gate gallery.
Notebook 05 calls it; the parsing and the metrics themselves are pure functions in `vskip_core.metrics`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vskip_core.method.gating import GateError, as_scored, keep_mask
from vskip_core.metrics import (
    aggregate_varr,
    attribute_hallucinations,
    family_metrics,
    question_words,
    rationale_part,
    score_example,
    varr_text,
)
from vskip_core.modeling.decoding import generate
from vskip_core.stages.distillation import load_student, ratio_prefix


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
                "varr": varr_text(
                    ex.get("rationale") or "", text if rat else "", ex.get("scene"), question_words(ex)
                ),
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
                seed=cfg.runtime.seed,
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
