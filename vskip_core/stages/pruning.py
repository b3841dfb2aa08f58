"""Stage 07 plumbing around the pruning methods of `vskip_core.method.pruning` (run by the decoder of
`vskip_core.modeling.pruned_decoding`): pruned decoding batched over
examples, batch-1 latency, the accuracy grid over methods and retentions, the retention-1.0 exactness check,
RVIS records and summaries, tables, plots, and the distilled student to combine the methods with."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vskip_core.common.students import load_student as _load
from vskip_core.common.students import ratio_prompt, student_adapters, students_at
from vskip_core.method.pruning import (
    METHODS,
    VARIANTS,
    PruneSpec,
    kept_count,
    question_mask,
    random_jaccard,
    rvis_overlaps,
)
from vskip_core.metrics import (
    FAMILY_SCORE,
    FamilyScores,
    bootstrap_ci,
    family_metrics,
    headline,
    score_example,
)
from vskip_core.modeling.decoding import decoding_config, generate
from vskip_core.modeling.loading import collate, encode, model_inputs
from vskip_core.modeling.pruned_decoding import PrunedOutput, pruned_generate
from vskip_core.plots import _save
from vskip_core.registry import display
from vskip_core.runtime import progress as tqdm
from vskip_core.runtime import relative_path

SIMPLE_FAMILIES = ("attribute", "existence")
REASONING_FAMILIES = ("multistep", "reading")
STUDENT_ADAPTER = "vskip"  # the stage 04 student combined with pruning (the V-Skip one)


# ------------------------------------------------------------------------------------------- decoding
def with_score_layer(cfg, scoring_dir: Path | None):
    """`cfg` with the DSTP / RVIS score layer resolved (`prune.score_layer`, else `prune.score_from`): stage
    02's best single layer on its held-out rationales (`key_layers`), or FastV's K - 1 (`fastv`, also the
    fallback when stage 02 chose none). Returns (cfg, a line saying where the layer came from)."""
    p = cfg.prune
    if p.score_layer >= 0:
        return cfg, f"prune.score_layer = {p.score_layer}"
    if p.score_from == "fastv":
        return cfg, "FastV's K - 1 (prune.score_from: fastv)"
    d = Path(scoring_dir) if scoring_dir else None
    finished = d is not None and (d / ".finished").exists() and (d / "metrics.json").is_file()
    layer = (
        json.loads((d / "metrics.json").read_text()).get("layer_choice", {}).get("score_layer")
        if finished
        else None
    )
    if layer is None:
        why = "stage 02 has not finished" if not finished else "stage 02 recorded no score layer"
        return cfg, f"FastV's K - 1: {why} ({d})"
    cfg = replace(cfg, prune=replace(p, score_layer=int(layer)))
    return (
        cfg,
        f"layer {layer}: stage 02's best single layer for visual-attribute tokens (prune.score_from: key_layers)",
    )


def generate_pruned(
    loaded,
    examples: list[dict[str, Any]],
    spec: PruneSpec,
    max_new_tokens: int,
    batch_size: int = 32,
    prefix: str = "",
    instruction: str = "",
    record_relevance: bool = False,
    images: list | None = None,
    progress: bool = False,
    desc: str = "pruned generate",
    assistant_prefill: str = "",
) -> list[dict[str, Any]]:
    """`generation.generate` with pruning: per example the text, generated ids (no end token), the batch's
    timings divided by its size, the visual tokens in use, DSTP re-selections/swaps, and (with
    `record_relevance`) the score layer's attention over the visual tokens at prefill and each step."""

    tok, proc, model = loaded.tokenizer, loaded.processor, loaded.model
    device = next(model.parameters()).device
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    out: list[dict[str, Any]] = []
    bar = tqdm(total=len(examples), desc=desc, disable=not progress, leave=False)
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        items = [
            encode(
                ex,
                tok,
                proc,
                instruction=instruction,
                prefix=prefix,
                image=None if images is None else images[s + j],
                assistant_prefill=assistant_prefill,  # a student's ratio line
            )
            for j, ex in enumerate(chunk)
        ]
        counts = {int((it["input_ids"] == model.config.image_token_id).sum()) for it in items}
        groups = [items] if len(counts) == 1 else [[it] for it in items]  # unequal image sizes: one by one
        for group in groups:
            batch = collate(group, tok.pad_token_id, padding_side="left")
            res = pruned_generate(
                model,
                model_inputs(batch, device),
                spec,
                max_new_tokens,
                eos_token_id=end_id,
                pad_token_id=tok.pad_token_id,
                prompt_mask=question_mask(
                    batch["input_ids"], tok, model.config.vision_end_token_id, end_id, prefix, instruction
                ),
                record_relevance=record_relevance,
            )
            out += _records(res, tok, len(group), record_relevance)
        bar.update(len(chunk))
    bar.close()
    return out


def _records(res: PrunedOutput, tok, n: int, record_relevance: bool) -> list[dict[str, Any]]:
    out = []
    for b, row in enumerate(res.sequences.tolist()):
        ids = [t for t in row[: res.lengths[b]] if t != tok.pad_token_id]
        rec = {
            "text": tok.decode(ids, skip_special_tokens=True),
            "token_ids": ids,
            "prefill_s": res.timings["prefill_s"] / n,
            "decode_s_per_token": res.timings["decode_s"] / max(1, res.timings["decode_steps"]),
            "visual_tokens": res.visual_tokens,
            "n_visual": res.n_visual,
            "kept": res.kept[b].tolist(),
            "reselections": res.reselections[b],
            "swapped_in": res.swapped_in[b],
            "host_overlap": res.host_overlap[b],  # Jaccard with the prefill selection, per re-selection
            "host_rvis": res.host_rvis[b],  # Jaccard(host's candidate, prefill selection), per step
            "layers": res.layers,
        }
        if record_relevance:
            rec["relevance"] = res.relevance[b]
        out.append(rec)
    return out


def latency(
    loaded,
    examples: list[dict[str, Any]],
    spec: PruneSpec,
    max_new_tokens: int,
    prefix: str = "",
    images: list | None = None,
    instruction: str = "",
    assistant_prefill: str = "",
) -> dict[str, float]:
    """Batch-1 timing: one warm-up example, then medians over `examples` of the prefill time and the decode
    time per token (variant as in `spec`)."""
    if not examples:
        return {"prefill_s": float("nan"), "decode_s_per_token": float("nan"), "n": 0}
    generate_pruned(
        loaded,
        examples[:1],
        spec,
        max_new_tokens,
        1,
        prefix,
        instruction,
        images=images[:1] if images else None,
        assistant_prefill=assistant_prefill,
    )
    recs = generate_pruned(
        loaded, examples, spec, max_new_tokens, 1, prefix, instruction, images=images,
        assistant_prefill=assistant_prefill,
    )  # fmt: skip
    return {
        "prefill_s": statistics.median(r["prefill_s"] for r in recs),
        "decode_s_per_token": statistics.median(r["decode_s_per_token"] for r in recs),
        "n": len(recs),
    }


def evaluate(
    loaded,
    examples: list[dict[str, Any]],
    spec: PruneSpec,
    max_new_tokens: int,
    batch_size: int,
    latency_examples: int,
    prefix: str = "",
    progress: bool = False,
    instruction: str = "",
    assistant_prefill: str = "",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Accuracy per family (batched greedy), batch-1 timing, visual tokens in use: one metrics.json entry
    `{"accuracy", "prefill_s", "decode_s_per_token", "visual_tokens"}` and per-example records."""

    gens = generate_pruned(
        loaded,
        examples,
        spec,
        max_new_tokens,
        batch_size,
        prefix,
        instruction=instruction,
        progress=progress,
        desc=spec.name,
        assistant_prefill=assistant_prefill,
    )
    scored = [score_example(x, g["text"]) for x, g in zip(examples, gens)]
    lat = latency(
        loaded, examples[:latency_examples], spec, max_new_tokens, prefix, instruction=instruction,
        assistant_prefill=assistant_prefill,
    )  # fmt: skip
    entry = {
        "accuracy": headline(family_metrics(examples, scored)),
        "prefill_s": lat["prefill_s"],
        "decode_s_per_token": lat["decode_s_per_token"],
        "visual_tokens": statistics.fmean(g["visual_tokens"] for g in gens),
    }
    records = [
        {
            "id": x["id"],
            "family": x["family"],
            "method": spec.name,
            "retention": spec.retention,
            "response": g["text"],
            "correct": s["correct"],
            "anls": s.get("anls"),
            "parsed": s["parsed"],
            "label": x.get("answer") if x["family"] == "existence" else None,
            "tokens": len(g["token_ids"]),
            "decode_s_per_token": g["decode_s_per_token"],  # its batch's decode time / steps
            "prefill_s": g["prefill_s"],  # its batch's prefill time / batch size
            "n_visual": g["n_visual"],
            "kept": g["kept"],
            "reselections": g["reselections"],
            "swapped_in": g["swapped_in"],
            "host_overlap": statistics.fmean(g["host_overlap"]) if g["host_overlap"] else None,
            "host_rvis": [round(v, 4) for v in g["host_rvis"]],
        }
        for x, g, s in zip(examples, gens, scored)
    ]
    return entry, records


def retention_label(retention: Any) -> Any:
    """A retention (0.333 or "0.333") as tables and axes show it, "33.3%"; anything else (another level of a
    column index) as it is."""
    try:
        return f"{float(retention):.1%}"
    except (TypeError, ValueError):
        return retention


def retention_key(retention: float) -> str:
    """How a retention is written in metrics.json: "0.333", "1.0"."""
    return str(float(retention))


def run_grid(
    loaded,
    examples: list[dict[str, Any]],
    cfg,
    retentions: list[float] | None = None,
    methods: list[str] | None = None,
    prompt: dict[str, str] | None = None,
    name_prefix: str = "",
    progress: bool = False,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Every method with and without DSTP at every retention, plus the unpruned model: the `methods` block of
    metrics.json (`{"<name_prefix><method>[+dstp]": {"<retention>": entry}}`, unpruned as "<name_prefix>unpruned"
    at "1.0") and all per-example records. `prompt`: a student's `ratio_prompt` (prefix and instruction)."""
    p = cfg.prune
    retentions = p.retentions if retentions is None else retentions
    methods = p.methods if methods is None else methods
    n_lat = min(p.latency_examples, len(examples))
    prompt = prompt or {"prefix": "", "instruction": cfg.generation.instruction}
    args = (cfg.generation.max_new_tokens, p.batch_size, n_lat, prompt.get("prefix", ""), progress,
            prompt["instruction"], prompt.get("assistant_prefill", ""))  # fmt: skip
    table: dict[str, dict[str, Any]] = {}
    records: list[dict[str, Any]] = []
    entry, recs = evaluate(loaded, examples, PruneSpec.from_config(cfg, "none"), *args)
    table[name_prefix + "unpruned"] = {retention_key(1.0): entry}
    records += [{**r, "method": name_prefix + "unpruned"} for r in recs]
    for m in methods:
        for dstp in (False, True):
            for r in retentions:
                spec = PruneSpec.from_config(cfg, m, r, dstp)
                entry, recs = evaluate(loaded, examples, spec, *args)
                table.setdefault(name_prefix + spec.name, {})[retention_key(r)] = entry
                records += [{**x, "method": name_prefix + spec.name} for x in recs]
    return table, records


def exactness_check(loaded, examples: list[dict[str, Any]], cfg, max_new_tokens: int) -> dict[str, Any]:
    """At retention 1.0, does every method (and +dstp, both variants) reproduce `generation.generate`?
    {"<method> (<variant>)": bool, ..., "generation_config": the greedy decoding config both sides ran under
    (`generation.decoding_config`; the checkpoint's generation_config.json plays no part)}."""

    ins = cfg.generation.instruction
    tok, proc = loaded.tokenizer, loaded.processor
    rp = cfg.generation.repetition_penalty
    dec = decoding_config(max_new_tokens, repetition_penalty=rp)  # greedy, as the pruned decoder
    ref = generate(
        loaded.model,
        tok,
        proc,
        examples,
        max_new_tokens,
        len(examples),
        instruction=ins,
        repetition_penalty=rp,
    )
    out: dict[str, Any] = {}
    for m in METHODS:
        for dstp in (False, True):
            for variant in VARIANTS:
                spec = PruneSpec.from_config(cfg, m, 1.0, dstp, variant)
                got = generate_pruned(loaded, examples, spec, max_new_tokens, len(examples), instruction=ins)
                out[f"{spec.name} ({variant})"] = [g["token_ids"] for g in got] == [
                    r["token_ids"] for r in ref
                ]
    out["generation_config"] = dec
    return out


# ---------------------------------------------------------------------------------------------------- RVIS
def rvis_records(
    loaded,
    examples: list[dict[str, Any]],
    retentions: list[float],
    max_new_tokens: int,
    batch_size: int,
    spec: PruneSpec | None = None,
    prefix: str = "",
    progress: bool = False,
    instruction: str = "",
) -> list[dict[str, Any]]:
    """Unpruned greedy decoding with the score layer's attention recorded; per example and retention the
    RVIS overlap at every decoding step."""
    spec = spec or PruneSpec()
    spec = replace(spec, method="none", retention=1.0, dstp=False)
    gens = generate_pruned(
        loaded,
        examples,
        spec,
        max_new_tokens,
        batch_size,
        prefix,
        instruction=instruction,
        record_relevance=True,
        progress=progress,
        desc="RVIS",
    )
    out = []
    for x, g in zip(examples, gens):
        rel = g["relevance"]
        out.append(
            {
                "id": x["id"],
                "family": x["family"],
                "steps": rel.shape[0] - 1,
                "score_layer": g["layers"]["score_layer"],
                "n_visual": g["n_visual"],
                "overlap": {str(r): rvis_overlaps(rel, kept_count(r, g["n_visual"])) for r in retentions},
            }
        )
    return out


@dataclass
class _Agg:
    per_step: list[list[float]] = field(default_factory=list)
    per_bin: list[list[float]] = field(default_factory=list)
    means: list[float] = field(default_factory=list)


def rvis_summary(records: list[dict[str, Any]], n_bins: int = 10, min_count: int = 3) -> dict[str, Any]:
    """RVIS by retention and family (plus `simple` = attribute+existence, `reasoning` = multistep+reading):
    mean overlap over all steps (`mean`: mean of the per-example means), the per-step curve (steps with at
    least `min_count` examples still decoding), a curve over `n_bins` bins of relative progress, and `chance`:
    the overlap two random top-k sets would have (same n and k)."""
    out: dict[str, Any] = {"score_layer": records[0]["score_layer"] if records else None, "by_retention": {}}
    if not records:
        return out
    groups = {f: [f] for f in sorted({r["family"] for r in records})}
    groups["simple"] = list(SIMPLE_FAMILIES)
    groups["reasoning"] = list(REASONING_FAMILIES)
    for ret in dict.fromkeys(k for r in records for k in r["overlap"]):  # every retention any record has
        res: dict[str, Any] = {}
        for g, fams in groups.items():
            agg = _Agg()
            for r in records:
                ov = r["overlap"].get(ret) or []
                if r["family"] not in fams or not ov:
                    continue
                agg.means.append(statistics.fmean(ov))
                for t, v in enumerate(ov):
                    if len(agg.per_step) <= t:
                        agg.per_step.append([])
                    agg.per_step[t].append(v)
                bins: list[list[float]] = [[] for _ in range(n_bins)]
                for t, v in enumerate(ov):
                    bins[min(n_bins - 1, t * n_bins // len(ov))].append(v)
                if not agg.per_bin:
                    agg.per_bin = [[] for _ in range(n_bins)]
                for j, bv in enumerate(bins):
                    if bv:
                        agg.per_bin[j].append(statistics.fmean(bv))
            if not agg.means:
                continue
            res[g] = {
                "n": len(agg.means),
                "mean": statistics.fmean(agg.means),
                "final_decile": statistics.fmean(agg.per_bin[-1]) if agg.per_bin[-1] else None,
                "curve": [statistics.fmean(v) for v in agg.per_step if len(v) >= min_count],
                "progress_curve": [statistics.fmean(v) if v else None for v in agg.per_bin],
            }
        n_vis = records[0].get("n_visual")
        if n_vis:
            res["chance"] = random_jaccard(n_vis, kept_count(float(ret), n_vis))
        out["by_retention"][ret] = res
    return out


# ------------------------------------------------------------------------------------------------ claims
# DSTP's claims (issue 19) on the teacher grid's per-example records, with bootstrap 95% intervals over test
# examples (`metrics.bootstrap_ci`); comparisons are paired on the examples both systems ran.
GROUPS = {"simple": SIMPLE_FAMILIES, "reasoning": REASONING_FAMILIES}


def _systems(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault((r["method"], retention_key(r["retention"])), []).append(r)
    return out


def _paired(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[FamilyScores, FamilyScores, int]:
    """Two systems' per-example scores on the examples both ran, in one order."""
    ids_b = {r["id"] for r in b}
    ids = [r["id"] for r in a if r["id"] in ids_b]
    return FamilyScores(a, ids), FamilyScores(b, ids), len(ids)


def _verdict(ci: list[float | None] | None, direction: int) -> str:
    """agrees (the interval lies on the claimed side of 0), disagrees (on the other side), or undecided."""
    if not ci or ci[0] is None:
        return "undecided"
    lo, hi = (ci[0], ci[1]) if direction > 0 else (-ci[1], -ci[0])
    return "agrees" if lo > 0 else "disagrees" if hi < 0 else "undecided"


def score_intervals(records: list[dict[str, Any]], reps: int = 2000, seed: int = 0) -> dict[str, Any]:
    """{method: {retention: {"score": {family: headline score}, "score_ci": {family: [lo, hi]}}}} per system
    (families plus the simple / reasoning means)."""
    out: dict[str, Any] = {}
    for (m, r), recs in _systems(records).items():
        fs = FamilyScores(recs, [x["id"] for x in recs])
        every = np.arange(fs.n)
        fams = {f: (f,) for f in sorted(set(fs.family))} | GROUPS
        out.setdefault(m, {})[r] = {
            "score": {g: fs.group(every, f) for g, f in fams.items()},
            "score_ci": {
                g: bootstrap_ci(lambda i, f=f, fs=fs: fs.group(i, f), fs.n, reps, seed)
                for g, f in fams.items()
            },
        }
    return out


def dstp_vs_host(records: list[dict[str, Any]], reps: int = 2000, seed: int = 0) -> dict[str, Any]:
    """{host: {retention: {family or group: {"diff", "ci", "n", "host", "dstp"}}}}: host + DSTP minus the host,
    paired per example, for each family, the simple and reasoning means, and the mean of all four."""
    sys_ = _systems(records)
    out: dict[str, Any] = {}
    for (m, r), recs in sys_.items():
        if not m.endswith("+dstp") or (m.removesuffix("+dstp"), r) not in sys_:
            continue
        host = m.removesuffix("+dstp")
        A, B, n = _paired(recs, sys_[(host, r)])
        every = np.arange(n)
        fams = {f: (f,) for f in sorted(set(A.family))} | GROUPS
        fams["all"] = tuple(sorted(set(A.family)))
        out.setdefault(host, {})[r] = {
            g: {
                "diff": A.group(every, f) - B.group(every, f),
                "ci": bootstrap_ci(lambda i, f=f, A=A, B=B: A.group(i, f) - B.group(i, f), n, reps, seed),
                "n": n,
                "host": B.group(every, f),
                "dstp": A.group(every, f),
            }
            for g, f in fams.items()
        }
    return out


def rvis_shift_stats(
    rv: list[dict[str, Any]], retention: str, reps: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """From RVIS records (`rvis_records`, or a host's `host_rvis_records`) at one retention: the mean overlap
    of simple minus reasoning examples (> 0: reasoning shifts more) and, per example, the last tenth of the
    rationale minus the first tenth (< 0: the shift grows), each with a bootstrap interval over examples."""
    rows = [r for r in rv if r["overlap"].get(retention)]
    fam = np.array([r["family"] for r in rows])
    mean = np.array([statistics.fmean(r["overlap"][retention]) for r in rows])

    def tenth(ov: list[float], last: bool) -> float:
        m = max(1, -(-len(ov) // 10))
        return statistics.fmean(ov[-m:] if last else ov[:m])

    growth = np.array(
        [tenth(r["overlap"][retention], True) - tenth(r["overlap"][retention], False) for r in rows]
    )
    simple, reasoning = np.isin(fam, SIMPLE_FAMILIES), np.isin(fam, REASONING_FAMILIES)

    def gap(i) -> float:
        s, q = mean[i][simple[i]], mean[i][reasoning[i]]
        return float(s.mean() - q.mean()) if len(s) and len(q) else float("nan")

    every = np.arange(len(rows))
    return {
        "simple_minus_reasoning": gap(every) if len(rows) else None,
        "simple_minus_reasoning_ci": bootstrap_ci(gap, len(rows), reps, seed),
        "last_minus_first_tenth": float(growth.mean()) if len(rows) else None,
        "last_minus_first_tenth_ci": bootstrap_ci(lambda i: float(growth[i].mean()), len(rows), reps, seed),
        "n": len(rows),
    }


def host_rvis_records(records: list[dict[str, Any]], score_layer: int) -> dict[str, list[dict[str, Any]]]:
    """RVIS under each host's own rule, from its + DSTP runs: {host: records shaped as `rvis_records`'}, the
    overlap per retention being Jaccard(host's prefill selection, host's candidate) at each step the trigger
    may fire (`PruneSpec.due`), on the trajectory DSTP itself steers."""
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for r in records:
        if not r["method"].endswith("+dstp") or "host_rvis" not in r:
            continue  # (an empty list stays: a rationale shorter than one trigger interval)
        host = r["method"].removesuffix("+dstp")
        row = by.setdefault(host, {}).setdefault(
            r["id"],
            {"id": r["id"], "family": r["family"], "n_visual": r["n_visual"], "overlap": {},
             "score_layer": "input embeddings" if host == "zspaprune" else score_layer},
        )  # fmt: skip
        row["overlap"][retention_key(r["retention"])] = r["host_rvis"]
    return {h: list(rows.values()) for h, rows in by.items()}


def claims(
    records: list[dict[str, Any]],
    rvis: dict[str, list[dict[str, Any]]],
    retentions: list[float],
    batch_size: int,
    reps: int = 2000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """DSTP's claims (issue 19) on this run, one row each: `claim`, `subject` (the system or RVIS source the
    comparison is about), `comparison`, `retention`, `value`, its 95% `ci` (paired on the same examples, except
    RVIS simple vs reasoning: two groups of examples), `n` examples, the `target` direction and `verdict`
    (agrees / disagrees / undecided: the interval against 0; `met` = agrees). About 50 verdicts at 95% each: a
    few agree / disagree marks are expected by chance alone. `rvis`: {source name: `rvis_records`-shaped
    records}. Overhead: ratios of median decode times per token and prefill times of the accuracy runs
    (batches of `batch_size`; no interval, indicative; `benchmarks/bench_visual_tokens.py` measures batch 1 at
    256 visual tokens)."""
    sys_, out = _systems(records), []
    one = retention_key(1.0)

    def add(claim, subject, comparison, retention, value, ci, n, target, direction):
        v = _verdict(ci, direction)
        out.append({"claim": claim, "subject": subject, "comparison": comparison, "retention": retention,
                    "value": value, "ci": ci, "n": n, "target": target, "verdict": v,
                    "met": v == "agrees"})  # fmt: skip

    hosts = sorted({m.removesuffix("+dstp") for m, _ in sys_ if m != "unpruned"})
    rets = [retention_key(r) for r in retentions]
    for h in hosts:
        for r in rets:
            if (h, r) not in sys_ or ("unpruned", one) not in sys_:
                continue
            A, B, n = _paired(sys_[(h, r)], sys_[("unpruned", one)])
            S, R = GROUPS["simple"], GROUPS["reasoning"]

            def f(i, A=A, B=B, S=S, R=R):
                return (A.group(i, R) - B.group(i, R)) - (A.group(i, S) - B.group(i, S))

            add("pruning hurts reasoning more than simple understanding", h,
                f"{h}: (reasoning - unpruned) - (simple - unpruned)", r, f(np.arange(n)),
                bootstrap_ci(f, n, reps, seed), n, "< 0", -1)  # fmt: skip
    vs = dstp_vs_host(records, reps, seed)
    for h in hosts:
        for r in rets:
            d = vs.get(h, {}).get(r)
            if not d:
                continue
            g = d["reasoning"]
            add(
                "DSTP limits the reasoning drop",
                f"{h}+dstp",
                f"{h}+dstp - {h}, reasoning",
                r,
                g["diff"],
                g["ci"],
                g["n"],
                "> 0",
                1,
            )
            g = d["simple"]
            add("DSTP gains on simple understanding", f"{h}+dstp", f"{h}+dstp - {h}, simple", r, g["diff"], g["ci"], g["n"],
                "> 0", 1)  # fmt: skip
    lo, hi = (retention_key(min(retentions, key=lambda x: abs(x - t))) for t in (0.333, 0.666))
    for h in hosts:
        if float(hi) > float(lo) and (h + "+dstp", lo) in sys_ and ("fastv", hi) in sys_:
            A, B, n = _paired(sys_[(h + "+dstp", lo)], sys_[("fastv", hi)])
            fams = tuple(sorted(set(A.family)))

            def f(i, A=A, B=B, fams=fams):
                return A.group(i, fams) - B.group(i, fams)

            add("DSTP at a third of the tokens beats FastV at two thirds", f"{h}+dstp",
                f"{h}+dstp @ {lo} - fastv @ {hi}, mean of families", lo,
                f(np.arange(n)), bootstrap_ci(f, n, reps, seed), n, "> 0", 1)  # fmt: skip
    for name, rv in rvis.items():
        for r in rets:
            st = rvis_shift_stats(rv, r, reps, seed)
            if not st["n"]:
                continue
            add("RVIS is larger on reasoning than on simple tasks", name, f"{name}: overlap simple - reasoning", r,
                st["simple_minus_reasoning"], st["simple_minus_reasoning_ci"], st["n"], "> 0", 1)  # fmt: skip
            add("RVIS grows over the rationale", name, f"{name}: overlap last tenth - first tenth", r,
                st["last_minus_first_tenth"], st["last_minus_first_tenth_ci"], st["n"], "< 0", -1)  # fmt: skip
    for h in hosts:
        for r in rets:
            a, b = sys_.get((h + "+dstp", r)), sys_.get((h, r))
            if not (a and b):
                continue
            for key, what, phase in (("decode_s_per_token", "decode time per token", "decode"),
                                     ("prefill_s", "prefill time", "prefill")):  # fmt: skip
                ratio = statistics.median(x[key] for x in a) / statistics.median(x[key] for x in b)
                out.append({"claim": "DSTP's overhead is minimal", "subject": f"{h}+dstp {phase}", "comparison":
                            f"{h}+dstp / {h}: {what} (batches of {batch_size}, median; indicative)",
                            "retention": r, "value": ratio, "ci": None, "n": len(a), "target": "<= 1.10",
                            "verdict": "agrees" if ratio <= 1.10 else "disagrees", "met": ratio <= 1.10})  # fmt: skip
    return out


def claims_table(found: list[dict[str, Any]]):
    """The claims as a DataFrame, one row per claim and comparison, one column per retention: the value, its
    95% interval and the verdict (+ agrees, - disagrees, ? undecided)."""
    import pandas as pd

    mark = {"agrees": "+", "disagrees": "-", "undecided": "?"}
    rows: dict[tuple[str, str], dict[str, str]] = {}
    order = list(dict.fromkeys(c["claim"] for c in found))
    for c in sorted(found, key=lambda c: order.index(c["claim"])):
        ci = "" if not c["ci"] or c["ci"][0] is None else f" [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"
        if c["value"] is None:
            continue
        value = f"{c['value']:.3f}" if c["ci"] is None else f"{c['value']:+.3f}"  # a ratio, or a difference
        cell = f"{value}{ci} {mark[c['verdict']]}"
        rows.setdefault((c["claim"], f"{c['comparison']} ({c['target']})"), {})[
            retention_label(c["retention"])
        ] = cell
    t = pd.DataFrame.from_dict(rows, orient="index")
    t.index = pd.MultiIndex.from_tuples(t.index, names=["claim", "comparison (target)"])
    return t.fillna("")


def claims_reading(found: list[dict[str, Any]]) -> str:
    """A short markdown reading of this run's claims, written from the claims rows (so it cannot go stale):
    per claim, where it agrees with the paper and where it disagrees."""
    if not found:
        return "No claims measured (visual-token pruning does not apply to this model, or nothing ran)."

    def where(rows: list[dict[str, Any]], most: int = 4) -> str:
        def value(c: dict[str, Any]) -> str:
            return f"{c['value']:.2f}x" if c["ci"] is None else f"{c['value']:+.3f}"

        shown = "; ".join(
            f"{c['subject']} at {retention_label(c['retention'])} {value(c)}" for c in rows[:most]
        )
        return shown + (f"; {len(rows) - most} more" if len(rows) > most else "")

    lines = ["**What this run says about DSTP's claims** (verdicts at 95%, from `metrics.json`):", ""]
    for claim in dict.fromkeys(c["claim"] for c in found):
        rows = [c for c in found if c["claim"] == claim and c["value"] is not None]
        agree = [c for c in rows if c["verdict"] == "agrees"]
        disagree = [c for c in rows if c["verdict"] == "disagrees"]
        overall = ("agrees" if len(agree) > len(rows) / 2 and not disagree else
                   "disagrees" if len(disagree) > len(agree) else "mixed or undecided")  # fmt: skip
        text = f"- **{claim}: {overall}** ({len(agree)} of {len(rows)} comparisons agree, {len(disagree)} disagree"
        text += f"; agree: {where(agree)}" if agree else ""
        text += f"; disagree: {where(disagree)}" if disagree else ""
        lines.append(text + ").")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- tables
def rvis_table(summary: dict[str, Any]):
    """Mean RVIS overlap per family / group (rows) and retention (columns), with the random-top-k row."""
    import pandas as pd

    cols = {}
    for r, by in summary["by_retention"].items():
        cols[r] = {g: v["mean"] for g, v in by.items() if isinstance(v, dict)}
        if "chance" in by:
            cols[r]["random top-k"] = by["chance"]
    return pd.DataFrame(cols).rename_axis("family / retention")


def metrics_table(methods: dict[str, Any], key: dict[str, str] | None = None):
    """metrics['methods'] -> a long DataFrame: method, retention, family, score, prefill_s, decode_s_per_token,
    visual_tokens (score = each family's headline metric: accuracy, F1 for existence, ANLS for reading)."""
    import pandas as pd

    key = key or FAMILY_SCORE
    rows = []
    for m, by_r in methods.items():
        for r, e in by_r.items():
            for fam, acc in e["accuracy"].items():
                rows.append(
                    {
                        "method": m,
                        "retention": float(r),
                        "family": fam,
                        "metric": key.get(fam, "accuracy"),
                        "score": acc.get(key.get(fam, "accuracy"), acc.get("accuracy")),
                        "prefill_s": e["prefill_s"],
                        "decode_s_per_token": e["decode_s_per_token"],
                        "visual_tokens": e["visual_tokens"],
                    }
                )
    cols = [
        "method",
        "retention",
        "family",
        "metric",
        "score",
        "prefill_s",
        "decode_s_per_token",
        "visual_tokens",
    ]
    return pd.DataFrame(rows, columns=cols)


def mean_score_table(table):
    """`metrics_table` as one number a cell: the mean of the families' headline scores per method (rows) and
    retention (columns, most kept first; the unpruned model has 100% only), styled for a notebook."""
    t = table.pivot_table(index="method", columns="retention", values="score").sort_index(
        axis=1, ascending=False
    )
    t = t.rename(columns=retention_label).rename_axis("mean score", axis=1)
    return t.style.format(precision=3, na_rep="")


def speed_table(table):
    """Prefill time and decode time per token of each method over the unpruned model's, per retention (most
    kept first); None when the unpruned model did not run."""
    import pandas as pd

    t = table.drop_duplicates(["method", "retention"]).set_index(["method", "retention"])
    if ("unpruned", 1.0) not in t.index:
        return None
    ref, t = t.loc[("unpruned", 1.0)], t.drop(index="unpruned", level=0)
    out = pd.DataFrame(
        {
            "prefill vs unpruned": t["prefill_s"] / ref["prefill_s"],
            "decode vs unpruned": t["decode_s_per_token"] / ref["decode_s_per_token"],
        }
    ).unstack("retention")
    return out.sort_index(axis=1, ascending=[True, False]).round(2).rename(columns=retention_label)


# -------------------------------------------------------------------------------------------------- plots
def plot_accuracy(
    scores: dict[str, Any], path=None, families: tuple[str, ...] = (*SIMPLE_FAMILIES, *REASONING_FAMILIES)
):
    """Each family's score against retention (evenly spaced, most kept on the left), one row per host: the host
    solid, host + DSTP dashed, 95% intervals as bars, the unpruned model dotted. `scores`: `score_intervals`."""
    import matplotlib.pyplot as plt

    hosts = sorted(
        {m.removesuffix("+dstp") for m in scores if m != "unpruned" and "+" not in m.removesuffix("+dstp")}
    )
    fams = [f for f in families if any(f in e["score"] for by in scores.values() for e in by.values())]
    fig, axes = plt.subplots(len(hosts), len(fams), figsize=(2.6 * len(fams), 2.1 * len(hosts) + 0.4),
                             squeeze=False, sharex=True, sharey="col")  # fmt: skip
    ref = scores.get("unpruned", {}).get(retention_key(1.0))
    for row, h in enumerate(hosts):
        rets = sorted(scores.get(h, {}), key=float, reverse=True)
        xs = range(len(rets))
        for col, fam in enumerate(fams):
            ax = axes[row][col]
            for m, style, colour in ((h, "-", "tab:blue"), (h + "+dstp", "--", "tab:orange")):
                by = scores.get(m, {})
                ys = [by[r]["score"].get(fam, float("nan")) if r in by else float("nan") for r in rets]
                cis = [by[r]["score_ci"].get(fam) if r in by else None for r in rets]
                err = [[max(0.0, y - (c[0] if c and c[0] is not None else y)) for y, c in zip(ys, cis)],
                       [max(0.0, (c[1] if c and c[1] is not None else y) - y) for y, c in zip(ys, cis)]]  # fmt: skip
                ax.errorbar(xs, ys, yerr=err, ls=style, marker="o", ms=3, capsize=2, color=colour,
                            label="host + DSTP" if m.endswith("+dstp") else "host alone")  # fmt: skip
            if ref and fam in ref["score"]:
                ax.axhline(ref["score"][fam], color="grey", ls=":", lw=1, label="unpruned")
            ax.set_xticks(list(xs), [retention_label(r) for r in rets])
            if row == 0:
                ax.set_title(f"{fam} ({FAMILY_SCORE.get(fam, 'accuracy')})")
            if col == 0:
                ax.set_ylabel(display(h).label)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.supxlabel("visual tokens kept (bars: 95% bootstrap intervals)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.legend(handles, labels, loc="upper center", ncol=3, fontsize=8, frameon=False)
    return _save(fig, path)


def plot_dstp_gain(vs: dict[str, Any], path=None):
    """Host + DSTP minus the host per family and group (paired, 95% intervals), one panel per host, one colour
    per retention: a forest plot of DSTP's claims. `vs`: `dstp_vs_host`."""
    import matplotlib.pyplot as plt

    hosts = sorted(vs)
    fig, axes = plt.subplots(1, len(hosts), figsize=(3.4 * len(hosts), 3.0), squeeze=False, sharey=True)
    for ax, h in zip(axes[0], hosts):
        rets = sorted(vs[h], key=float, reverse=True)
        groups = list(next(iter(vs[h].values())))
        for j, r in enumerate(rets):
            for g_i, g in enumerate(groups):
                d = vs[h][r][g]
                y = g_i + (j - (len(rets) - 1) / 2) * 0.22
                lo, hi = d["ci"] if d["ci"][0] is not None else (d["diff"], d["diff"])
                ax.plot([lo, hi], [y, y], color=f"C{j}", lw=1.5)
                ax.plot(
                    d["diff"],
                    y,
                    "o",
                    ms=3.5,
                    color=f"C{j}",
                    label=f"{retention_label(r)} kept" if g_i == 0 else None,
                )
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(groups)), groups)
        ax.invert_yaxis()
        ax.set_title(f"{display(h).label} + DSTP - {display(h).label}", fontsize=9)
        ax.set_xlabel("score difference")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_rvis(summaries: dict[str, dict[str, Any]], path=None):
    """RVIS overlap against decoding progress (10 bins), one row per source (the unpruned model's attention,
    each host's own rule), one column per retention, one line per family; random top-k sets dotted."""
    import matplotlib.pyplot as plt

    rets = sorted({r for s in summaries.values() for r in s["by_retention"]}, key=float, reverse=True)
    fig, axes = plt.subplots(len(summaries), len(rets), figsize=(3.0 * len(rets), 2.3 * len(summaries) + 0.3),
                             squeeze=False, sharey=True, sharex=True)  # fmt: skip
    fams = (*SIMPLE_FAMILIES, *REASONING_FAMILIES)
    for row, (name, summary) in enumerate(summaries.items()):
        for col, r in enumerate(rets):
            ax, by = axes[row][col], summary["by_retention"].get(r, {})
            for j, fam in enumerate(fams):
                if fam not in by:
                    continue
                ys = [y if y is not None else float("nan") for y in by[fam]["progress_curve"]]
                xs = [(i + 0.5) / len(ys) for i in range(len(ys))]
                ax.plot(xs, ys, marker="o", ms=2.5, color=f"C{j}", ls="-" if fam in SIMPLE_FAMILIES else "--",
                        label=f"{fam} (n={by[fam]['n']})")  # fmt: skip
            if "chance" in by:
                ax.axhline(by["chance"], color="grey", ls=":", lw=1, label="random top-k")
            if row == 0:
                ax.set_title(f"{retention_label(r)} kept")
            if col == 0:
                ax.set_ylabel(f"{name}\nJaccard with prefill", fontsize=8)
            ax.set_ylim(0, 1.02)
    for ax in axes[-1]:
        ax.set_xlabel("decoding progress")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.legend(handles, [lab.split(" (")[0] for lab in labels], loc="upper center", ncol=5, fontsize=8,
               frameon=False)  # fmt: skip
    return _save(fig, path)


def student_vs_teacher(
    student: list[dict[str, Any]], teacher: list[dict[str, Any]], prefix: str = "vskip+", reps: int = 2000
):
    """Per pruner and retention, the V-Skip student (records named `prefix` + method) against the teacher on the
    same examples (paired): mean of the families' headline scores, the student minus the teacher with a
    bootstrap 95% interval, and mean generated tokens. A DataFrame, one row per system."""
    import pandas as pd

    t_sys = _systems(teacher)
    rows = []
    for (m, r), recs in sorted(_systems(student).items()):
        host = m.removeprefix(prefix)
        if (host, r) not in t_sys:
            continue
        S, T, n = _paired(recs, t_sys[(host, r)])
        fams = tuple(sorted(set(S.family)))
        every = np.arange(n)
        s_score, t_score = S.group(every, fams), T.group(every, fams)
        diff = bootstrap_ci(lambda i, S=S, T=T, f=fams: S.group(i, f) - T.group(i, f), n, reps, 0)
        common = {x["id"] for x in recs} & {x["id"] for x in t_sys[(host, r)]}
        tokens = [
            float(np.mean([x["tokens"] for x in side if x["id"] in common]))
            for side in (t_sys[(host, r)], recs)
        ]
        rows.append(
            {
                "method": host,
                "retention": float(r),
                "n": n,
                "teacher score": t_score,
                "student score": s_score,
                "student - teacher": s_score - t_score,
                "95% CI": diff,
                "teacher tokens": tokens[0],
                "student tokens": tokens[1],
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- student
def load_student(cfg, run_dir) -> tuple[Any, str, str]:
    """The V-Skip student to combine with pruning: (loaded or None, its `ratio_prompt`, what happened): the one
    stage 04 trained for `prune.student_ratio` (`distillation.students_at`: its own-ratio student, else the
    ratio-conditioned one); absent stage or adapter -> None."""
    from pathlib import Path

    stage04 = Path(run_dir) / "04_qlora_distillation"
    found = (
        students_at(student_adapters(stage04), cfg.prune.student_ratio)
        if (stage04 / "metrics.json").exists()
        else {}
    )
    adapter = Path(found.get(STUDENT_ADAPTER, stage04 / "adapters" / STUDENT_ADAPTER))
    if not (adapter / "adapter_config.json").exists():
        where = relative_path(adapter, run_dir)
        return None, {}, f"no student adapter at {where} (run stage 04 first): student combination skipped"
    prompt = ratio_prompt(cfg, cfg.prune.student_ratio)
    said = " / ".join(v.strip() for v in prompt.values() if v.strip())
    where = relative_path(
        adapter, run_dir
    )  # as 04's metrics store it: no path of this machine in details.json
    return _load(cfg, adapter), prompt, f"student {where} prompted with {said!r}"
