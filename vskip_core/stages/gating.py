"""Stage 03, gate ablations: every gate method at every gamma measured (actual ratio, VARR), notebook 03's
ablations (budget split, key-layer band), the rows the gate can serve, the external scorers' columns, and
the HTML / tables of the notebook. The gates themselves are in `vskip_core.method.gating`."""

from __future__ import annotations

import dataclasses
import html
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from vskip_core.common.external import external_columns, with_external_columns
from vskip_core.config import Config
from vskip_core.method.gating import (
    Scored,
    as_scored,
    column_fix,
    gate_rows,
    gate_values,
    method_columns,
    usable_rows,
)
from vskip_core.method.scoring import anchoring_for_layers
from vskip_core.metrics import (
    VARR_GROUPS,
    WORD_CATEGORIES,
    WORD_RE,
    act_ratio,
    aggregate_varr,
    anchor_tokens,
    body_tokens,
    bootstrap_ci,
    compress_text,
    question_vocabulary,
    question_words,
    varr_kept,
    varr_reference,
    word_category,
)
from vskip_core.modeling.external_lm import llmlingua2_status
from vskip_core.modeling.loading import embedded_dir
from vskip_core.modeling.standins import resolve
from vskip_core.runtime import fast_dtype, resolve_device


# --------------------------------------------------------------------------------------------- measures
def evaluate(
    rows: Sequence[Any],
    examples: Sequence[dict],
    method: str,
    gamma: float,
    cfg: Config,
    tokenizer,
    seed: int = 0,
    mode: str | None = None,
) -> dict[str, Any]:
    """Gate every row and measure: actual ratio (`metrics.act_ratio`: student-tokenizer body tokens of the rebuilt
    vs the full texts), the mask's
    own ratio (teacher tokens), and VARR (`metrics.varr_text`: the rebuilt text against the full one, each
    row's scene and question from its benchmark example in `examples`) pooled over the corpus."""
    return Evaluator(rows, examples, tokenizer)(method, gamma, cfg, seed, mode)


class Evaluator:
    """`evaluate` for many settings of one corpus: full-text token counts and the reference side of VARR
    computed once. `Evaluator(rows, examples, tokenizer)(method, gamma, cfg, seed, mode)` -> the dict of
    `evaluate`."""

    def __init__(self, rows: Sequence[Any], examples: Sequence[dict], tokenizer) -> None:
        self.rows = [as_scored(r) for r in rows]
        if len(examples) != len(self.rows):
            raise ValueError(f"{len(self.rows)} rows but {len(examples)} examples; pass one per row")
        if not self.rows:
            raise ValueError("no rows to evaluate (did every row get skipped? see usable_rows' counts)")
        self.tokenizer = tokenizer
        self.full_body = body_tokens([r.text for r in self.rows], tokenizer)
        self.context = [(ex.get("scene"), question_words(ex)) for ex in examples]
        self.refs = [varr_reference(r.text, sc, q) for r, (sc, q) in zip(self.rows, self.context)]

    def counts(self, method, gamma, cfg, seed=0, mode=None) -> tuple[list[dict], list[str], list[np.ndarray]]:
        """Per row: VARR counts {type: (kept, total)}; and the rebuilt texts and keep masks."""
        keeps = gate_rows(self.rows, method, gamma, cfg, seed, mode)
        texts = [compress_text(r, k) for r, k in zip(self.rows, keeps)]
        counts = [varr_kept(ref, t, sc, q) for ref, t, (sc, q) in zip(self.refs, texts, self.context)]
        return counts, texts, keeps

    def __call__(self, method, gamma, cfg, seed=0, mode=None) -> dict[str, Any]:
        counts, texts, keeps = self.counts(method, gamma, cfg, seed, mode)
        return {
            "actual_ratio": act_ratio(body_tokens(texts, self.tokenizer), self.full_body),
            "mask_ratio": sum(int(k.sum()) for k in keeps) / sum(r.n for r in self.rows),
            "varr": aggregate_varr(counts),
        }


def sweep(
    rows: Sequence[Any],
    examples: Sequence[dict],
    methods: Sequence[str],
    gammas: Sequence[float],
    cfg: Config,
    tokenizer,
    seed: int = 0,
    modes: Sequence[str] = ("example",),
):
    """Every method at every gamma and threshold mode: a DataFrame with one row each (method, gamma, mode,
    actual_ratio, mask_ratio, varr_<type>..., varr_overall; NaN for a type the corpus never mentions)."""
    import pandas as pd

    measure, out = Evaluator(rows, examples, tokenizer), []
    for mode in modes:
        for method in methods:
            for gamma in gammas:
                m = measure(method, gamma, cfg, seed, mode)
                varr_cols = {f"varr_{k}": v for k, v in m.pop("varr").items()}
                out.append({"method": method, "gamma": gamma, "mode": mode, **m, **varr_cols})
    df = pd.DataFrame(out)
    return df.astype({c: float for c in df.columns if c.startswith("varr_")})  # None (no mention) -> NaN


def metrics_from_sweep(df) -> dict[str, dict]:
    """{method: {"<gamma>": {"actual_ratio": float, "varr": {type: float, "overall": float}}}} of one mode."""
    if df["mode"].nunique() != 1:
        raise ValueError(f"pass the rows of one threshold mode, got {sorted(df['mode'].unique())}")
    out: dict[str, dict] = {}
    for r in df.to_dict("records"):
        varr_ = {
            k[5:]: (None if v is None or v != v else float(v)) for k, v in r.items() if k.startswith("varr_")
        }
        out.setdefault(r["method"], {})[f"{r['gamma']:g}"] = {
            "actual_ratio": float(r["actual_ratio"]),
            "varr": varr_,
        }
    return out


def decision_table(rows: Sequence[Any], keeps: Sequence[np.ndarray], cfg: Config, anchors=None):
    """One line per token: the values the gate saw (word values when word-level), kept or not, and the
    anchor type the token belongs to ('' if none). For the kept/pruned scatter."""
    import pandas as pd

    frames = []
    for i, (row, keep) in enumerate(zip(rows, keeps)):
        row = as_scored(row)
        d = {"id": row.id, "kept": np.asarray(keep, dtype=bool)}
        for col in ("surprisal", "anchoring"):
            d[col] = gate_values(row, col, cfg)
        kinds = np.full(row.n, "", dtype=object)
        for kind, tokens in anchor_tokens(row, anchors[i]) if anchors is not None else []:
            kinds[tokens] = kind
        d["anchor"] = kinds
        frames.append(pd.DataFrame(d))
    return pd.concat(frames, ignore_index=True)


def strikethrough_html(row: Any, keep: np.ndarray) -> str:
    """The full rationale as HTML with pruned tokens struck through (kept ones plain)."""
    row = as_scored(row)
    out, pos = [], 0
    for j, (s, e) in enumerate(row.offsets):
        out.append(html.escape(row.text[pos:s]))
        piece = html.escape(row.text[s:e])
        out.append(piece if keep[j] else f'<s style="color:#999">{piece}</s>')
        pos = e
    out.append(html.escape(row.text[pos:]))
    return "".join(out)


def student_tokenizer(cfg: Config):
    """The student's tokenizer (`distill.student`: the embedded teacher's, or a hub id / local folder)."""
    from transformers import AutoTokenizer

    name = resolve(cfg, cfg.distill.student)
    src = embedded_dir(cfg) if name == "embedded" else (cfg.path(name) if cfg.path(name).exists() else name)
    return AutoTokenizer.from_pretrained(src)


# ------------------------------------------------------------------------------------------ notebook 03
def gateable_rows(records: Sequence[dict], cfg: Config) -> tuple[list[Scored], Counter, Config]:
    """The rows the gate can serve at every gamma of `gate.gammas` (`usable_rows` at the smallest), their
    drop counts, and the Config to gate them with. If no row is usable and `gate.force_keep_answer` is on
    (a teacher that writes no final answer line), the answer line is no longer forced, and this says so."""
    gamma_min = min(cfg.gate.gammas)
    rows, skipped = usable_rows(records, gamma_min, cfg)
    print(
        f"usable at every gamma >= {gamma_min}: {len(rows)} of {len(records)} rationales; dropped: {dict(skipped)}"
    )
    if rows or not cfg.gate.force_keep_answer:
        return rows, skipped, cfg
    before = dict(skipped)
    cfg = dataclasses.replace(cfg, gate=dataclasses.replace(cfg.gate, force_keep_answer=False))
    rows, skipped = usable_rows(records, gamma_min, cfg)
    print(
        f"gate.force_keep_answer switched OFF for this stage: with it no rationale was usable (dropped: {before}; "
        f"no_answer_line = no final answer line to keep, budget = forced tokens over gamma). Without it "
        f"{len(rows)} rationales are usable (dropped: {dict(skipped)}); their answer lines may be pruned."
    )
    return rows, skipped, cfg


def external_scores(cfg: Config, scores, search_dirs=()):
    """`scores` (stage 02's frame) with the external scorers' columns (`common.external.with_external_columns`):
    `surprisal_external` from SmolLM2 (the question as context, no image) and `keep_prob_llmlingua2` when
    llmlingua2 is in gate.methods or distill.methods (an unavailable model then raises) or its model is local.
    Returns (frame, facts for metrics.json: SmolLM2's source and timings, LLMLingua-2's source and status)."""
    import torch

    records = scores.to_dict("records")
    ok, status = llmlingua2_status(cfg)
    asked = "keep_prob_llmlingua2" in external_columns([*cfg.gate.methods, *cfg.distill.methods])
    columns = (
        ["keep_prob_llmlingua2"] if asked or ok else []
    )  # first: a failing load comes before SmolLM2's work
    llmlingua2 = status + ("" if columns else "; not in gate.methods or distill.methods: not added")
    if columns:
        t0 = time.perf_counter()
        records, sources = with_external_columns(cfg, records, columns, search_dirs)
        llmlingua2 += (
            f"; keep_prob_llmlingua2: {sources['keep_prob_llmlingua2']} ({time.perf_counter() - t0:.1f} s)"
        )
    t0, c0 = time.perf_counter(), time.process_time()
    records, sources = with_external_columns(cfg, records, ["surprisal_external"], search_dirs)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0  # model load included
    out = scores.copy()
    for column in ["surprisal_external", *columns]:
        out[column] = [[float(v) for v in r[column]] for r in records]
    n_tokens = int(sum(len(o) for o in scores["offsets"]))
    info = {
        "model": "SmolLM2-135M-Instruct",
        "dtype": str(fast_dtype(cfg.gate.external_dtype, resolve_device(cfg.runtime.device))).removeprefix(
            "torch."
        ),
        "source": sources["surprisal_external"],
        "texts": len(records),
        "teacher_tokens": n_tokens,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "teacher_tokens_per_s": n_tokens / max(seconds, 1e-9),
        "threads": cfg.gate.external_threads or torch.get_num_threads(),
        "llmlingua2": llmlingua2,
    }
    return out, info


def split_ablation(rows, examples, tokenizer, cfg: Config, seed: int = 0, gammas=None):
    """V-Skip's two readings of how gamma reaches the thresholds (`gate.split`): share (`gate.text_share` of
    the free budget to the text path first) and symmetric (one shared percentile), at every gamma: one row per
    (split, gamma) with the actual ratio and VARR per type and overall."""
    import pandas as pd

    measure, out = Evaluator(rows, examples, tokenizer), []
    for split in ("share", "symmetric"):
        c = dataclasses.replace(cfg, gate=dataclasses.replace(cfg.gate, split=split))
        for gamma in gammas or cfg.gate.gammas:
            m = measure("vskip", gamma, c, seed, "example")
            out.append({"split": split, "gamma": gamma, "actual_ratio": m["actual_ratio"], **m["varr"]})
    return pd.DataFrame(out)


def share_ablation(
    rows, examples, tokenizer, cfg: Config, seed: int = 0, gamma: float = 0.5,
    shares=(0.0, 0.25, 0.5, 0.75, 1.0), methods=("vskip", "intersection", "weighted"),
):  # fmt: skip
    """Union vs intersection vs weighted sum at `gamma`, each at every `gate.text_share` in `shares`: one row
    per (method, text_share) with the actual ratio and VARR per type and overall."""
    import pandas as pd

    measure, out = Evaluator(rows, examples, tokenizer), []
    for share in shares:
        c = dataclasses.replace(cfg, gate=dataclasses.replace(cfg.gate, text_share=share))
        for method in methods:
            m = measure(method, gamma, c, seed, "example")
            out.append(
                {"method": method, "text_share": share, "actual_ratio": m["actual_ratio"], **m["varr"]}
            )
    return pd.DataFrame(out)


def query_ablation(
    rows: Sequence[Scored], score_records: Sequence[dict], examples, tokenizer, cfg: Config, seed: int = 0,
    gammas=None, methods=("vskip", "visual_only"),
):  # fmt: skip
    """The anchoring query row (`scoring.query_position`): `predict` (the row that writes the token) vs `self`
    (the token's own row), from stage 02's `anchoring_predict` / `anchoring_self`: one row per (query, method,
    gamma) with the actual ratio and VARR per type and overall. Empty, with a printed reason, when stage 02
    stored only one reading."""
    import pandas as pd

    raw = {r["id"]: r for r in score_records}
    if not rows or any(not isinstance(raw[r.id].get("anchoring_self"), list | np.ndarray) for r in rows):
        print("stage 02 stored one query row only (scores from an older run): query ablation skipped")
        return pd.DataFrame()
    out = []
    for query in ("predict", "self"):
        variant = [r.with_scores(anchoring=np.asarray(raw[r.id][f"anchoring_{query}"], float)) for r in rows]
        measure = Evaluator(variant, examples, tokenizer)
        for method in methods:
            for gamma in gammas or cfg.gate.gammas:
                m = measure(method, gamma, cfg, seed, "example")
                out.append(
                    {"query": query, "method": method, "gamma": gamma, "actual_ratio": m["actual_ratio"],
                     **m["varr"]}
                )  # fmt: skip
    return pd.DataFrame(out)


def layer_bands(all_layers: Sequence[int], key_layers: Sequence[int]) -> dict[str, list[int]]:
    """Key-layer bands to ablate: each candidate layer alone (up to 8), else the first and last third of
    the candidates; then all of them and this run's key layers."""
    layers = list(all_layers)
    third = max(1, len(layers) // 3)
    if len(layers) <= 8:
        bands = {f"layer {i}": [i] for i in layers}
    else:
        bands = {"early": layers[:third], "late": layers[-third:]}
    return bands | {"all": layers, f"key {list(key_layers)} (this run)": list(key_layers)}


def band_ablation(
    rows: Sequence[Scored], score_records: Sequence[dict], examples, tokenizer, cfg: Config, seed: int = 0,
    gamma: float = 0.5, methods=("vskip", "visual_only"),
):  # fmt: skip
    """VARR at `gamma` with the visual path recomputed for other key-layer bands and head reductions from
    stage 02's per-layer anchoring (`method.scoring.anchoring_for_layers`), without re-scoring: one row per
    (band, heads, method). Empty, with a printed reason, when stage 02 stored no per-layer anchoring."""
    import pandas as pd

    raw = {r["id"]: r for r in score_records}
    stored = [raw[r.id].get("anchoring_by_layer_max") for r in rows]
    if not rows or any(v is None or (isinstance(v, float) and v != v) for v in stored):
        print("stage 02 stored no per-layer anchoring (scores from an older run): band ablation skipped")
        return pd.DataFrame()
    first = raw[rows[0].id]
    out = []
    for name, band in layer_bands(first["all_layers"], first["key_layers"]).items():
        for head in ("max", "mean"):
            variant = [r.with_scores(anchoring=anchoring_for_layers(raw[r.id], band, head)) for r in rows]
            measure = Evaluator(variant, examples, tokenizer)
            for method in methods:
                m = measure(method, gamma, cfg, seed, "example")
                out.append({"band": name, "heads": head, "method": method, **m["varr"]})
    return pd.DataFrame(out)


def varr_intervals(
    rows, examples, methods, gamma: float, cfg: Config, tokenizer, seed: int = 0, against: str = "text_only",
    reps: int = 1000,
):  # fmt: skip
    """VARR per attribute type and pooled group (`metrics.VARR_GROUPS`: the paper's, the binding-aware) at `gamma`, per-example thresholds, with a 95% bootstrap interval
    over rationales (the pooled counts re-pooled per resample), and each method's paired difference from
    `against` on the same resamples: one row per (method, type)."""
    import pandas as pd

    ev = Evaluator(rows, examples, tokenizer)
    types = [
        t for g, members in VARR_GROUPS.items() for t in (*members, g)
    ]  # each group's types, then its pool
    arrays = {}
    for m in dict.fromkeys([*methods, against]):
        c = ev.counts(m, gamma, cfg, seed, "example")[0]
        cols = {
            t: (np.array([x[t][0] for x in c], float), np.array([x[t][1] for x in c], float))
            for t in types
            if t not in VARR_GROUPS
        }
        for g, members in VARR_GROUPS.items():
            cols[g] = (sum(cols[t][0] for t in members), sum(cols[t][1] for t in members))
        arrays[m] = (np.c_[tuple(cols[t][0] for t in types)], np.c_[tuple(cols[t][1] for t in types)])

    def varr(m, j, idx):
        k, t = arrays[m]
        tot = t[idx, j].sum()
        return k[idx, j].sum() / tot if tot else float("nan")

    n, out = len(ev.rows), []
    everyone = np.arange(n)
    for m in methods:
        for j, t in enumerate(types):
            if not arrays[m][1][:, j].sum():
                continue
            row = {"method": m, "type": t, "varr": varr(m, j, everyone)}
            row["ci"] = bootstrap_ci(lambda i, m=m, j=j: varr(m, j, i), n, reps, seed)
            if m != against:
                row[f"minus_{against}"] = row["varr"] - varr(against, j, everyone)
                row[f"minus_{against}_ci"] = bootstrap_ci(
                    lambda i, m=m, j=j: varr(m, j, i) - varr(against, j, i), n, reps, seed
                )
            out.append(row)
    return pd.DataFrame(
        out, columns=["method", "type", "varr", "ci", f"minus_{against}", f"minus_{against}_ci"]
    )


def interval_table(intervals, against: str = "text_only"):
    """`varr_intervals` as a compact table: one row per method, 'VARR [lo, hi]' per type, and the paired
    difference from `against` per type."""
    import pandas as pd

    def cell(v, ci):
        return "-" if ci is None or ci[0] is None else f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"

    if intervals.empty:
        print("no visual-attribute mention in these rationales: no VARR to bracket")
        return intervals
    out = pd.DataFrame(index=list(dict.fromkeys(intervals.method)))
    for r in intervals.itertuples(index=False):
        out.loc[r.method, r.type] = cell(r.varr, r.ci)
        d = getattr(r, f"minus_{against}", None)
        if d is not None and d == d:
            out.loc[r.method, f"{r.type} - {against}"] = cell(d, getattr(r, f"minus_{against}_ci"))
    return out.fillna("")


ANCHOR_CATEGORIES = ("colour", "shape", "size", "position", "text")  # the scene's anchor types
CATEGORIES = ("answer line", *ANCHOR_CATEGORIES, *(c for c in WORD_CATEGORIES if c not in ANCHOR_CATEGORIES))


def token_categories(row: Scored, anchors: Sequence[dict], question: str) -> np.ndarray:
    """Each token's category, first match wins: the final answer line, a visual-attribute mention of the
    scene (its anchor type: colour, shape, size, position, text), else the `metrics.word_category` of the
    word the token belongs to (negation, number, decision word, question word, function word, other; a
    colour, shape or size word the scene does not anchor counts as its word category)."""
    cat = np.full(row.n, "other", dtype=object)
    qwords = question_vocabulary(question)
    spans = [(m.start(), m.end(), word_category(m.group(0), qwords)) for m in WORD_RE.finditer(row.text)]
    starts = np.array([a for a, _, _ in spans], dtype=np.int64)
    for j, (s, e) in enumerate(row.offsets):
        piece = row.text[s:e]
        p = s + len(piece) - len(piece.lstrip())  # the token's first visible character
        k = int(np.searchsorted(starts, p, "right")) - 1
        if k >= 0 and p < spans[k][1]:  # inside a word (punctuation between words stays "other")
            cat[j] = spans[k][2]
    for kind, tokens in anchor_tokens(row, anchors):
        cat[tokens] = kind
    if row.answer_start is not None:
        cat[row.answer_start :] = "answer line"
    return cat


def kept_by_category(rows, examples, anchors, methods, gamma: float, cfg: Config, seed: int = 0):
    """Share of each token category (`token_categories`) that each method keeps at `gamma` (per-example
    thresholds), with the category's share of all tokens: one row per method, one column per category."""
    import pandas as pd

    rows = [as_scored(r) for r in rows]
    cats = [token_categories(r, a, question_words(ex)) for r, a, ex in zip(rows, anchors, examples)]
    allc = np.concatenate(cats)
    present = [c for c in CATEGORIES if (allc == c).any()]
    out = [{"method": "(share of tokens)", **{c: float((allc == c).mean()) for c in present}}]
    for m in methods:
        kept = np.concatenate(gate_rows(rows, m, gamma, cfg, seed, "example"))
        out.append({"method": m, **{c: float(kept[allc == c].mean()) for c in present}})
    return pd.DataFrame(out).set_index("method")


def report_scores(scores):
    """Stage 02's rows that 03 reports on: those not held out to choose the key layers (`held_out`), and how
    many were held out (printed)."""
    if "held_out" not in scores or not scores["held_out"].any():
        print("stage 02 held out no rationale (key layers not chosen from data here): every row is reported")
        return scores, 0
    held = scores["held_out"].astype(bool)
    print(
        f"{int(held.sum())} of {len(scores)} rationales were held out by stage 02 to choose the key layers; "
        f"the tables below use the other {int((~held).sum())}"
    )
    return scores[~held].reset_index(drop=True), int(held.sum())


def available_methods(methods: Sequence[str], rows: Sequence[Scored]) -> list[str]:
    """The methods whose score columns every row has; prints the ones left out and what adds their column."""
    out = []
    for m in methods:
        missing = [c for c in method_columns(m) if any(c not in r.columns for r in rows)]
        if missing:
            print(f"{m} left out: no {missing[0]!r} scores ({column_fix(missing[0])})")
        else:
            out.append(m)
    return out


def gamma_table(main, gamma: float, out_dir=None):
    """The table at one gamma: actual ratio and VARR per type, one row per method (per-example thresholds'
    sweep rows); with `out_dir`, also written as `table_gamma_<gamma>.csv` and `.md`."""
    types = [c for c in main.columns if c.startswith("varr_")]
    table = main[main["gamma"] == gamma].set_index("method")[["actual_ratio", *types]]
    table.columns = ["actual ratio", *[t[5:] for t in types]]
    if out_dir is not None:
        from pathlib import Path

        table.to_csv(Path(out_dir) / f"table_gamma_{gamma:g}.csv")
        header = "| method | " + " | ".join(table.columns) + " |\n|---|" + "---|" * len(table.columns) + "\n"
        lines = [
            f"| {m} | " + " | ".join("-" if v != v else f"{v:.3f}" for v in r) + " |"
            for m, r in table.iterrows()
        ]
        (Path(out_dir) / f"table_gamma_{gamma:g}.md").write_text(header + "\n".join(lines) + "\n")
    return table
