"""Stage 07 plumbing around the pruning methods of `vskip_core.method.pruning` (run by the decoder of
`vskip_core.modeling.pruned_decoding`): pruned decoding batched over
examples, batch-1 latency, the accuracy grid over methods and retentions, the retention-1.0 exactness check,
RVIS records and summaries, tables, plots, and the distilled student to combine the methods with."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace
from typing import Any

from vskip_core.method.pruning import (
    METHODS,
    VARIANTS,
    PruneSpec,
    kept_count,
    random_jaccard,
    rvis_overlaps,
    user_text_mask,
)
from vskip_core.metrics import family_metrics, headline, score_example
from vskip_core.modeling.decoding import decoding_config, generate
from vskip_core.modeling.loading import collate, encode, model_inputs
from vskip_core.modeling.pruned_decoding import PrunedOutput, pruned_generate
from vskip_core.plots import _save
from vskip_core.runtime import progress as tqdm
from vskip_core.stages.distillation import load_student as _load
from vskip_core.stages.distillation import ratio_prompt

SIMPLE_FAMILIES = ("attribute", "existence")
REASONING_FAMILIES = ("multistep", "reading")
STUDENT_ADAPTER = "vskip"  # the stage 04 student combined with pruning (the V-Skip one)


# ------------------------------------------------------------------------------------------- decoding
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
                prompt_mask=user_text_mask(batch["input_ids"], model.config.vision_end_token_id, end_id),
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
) -> dict[str, float]:
    """Batch-1 timing: one warm-up example, then medians over `examples` of the prefill time and the decode
    time per token (variant as in `spec`)."""
    if not examples:
        return {"prefill_s": float("nan"), "decode_s_per_token": float("nan"), "n": 0}
    generate_pruned(
        loaded, examples[:1], spec, max_new_tokens, 1, prefix, images=images[:1] if images else None
    )
    recs = generate_pruned(loaded, examples, spec, max_new_tokens, 1, prefix, images=images)
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
    )
    scored = [score_example(x, g["text"]) for x, g in zip(examples, gens)]
    lat = latency(loaded, examples[:latency_examples], spec, max_new_tokens, prefix, instruction=instruction)
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
            "tokens": len(g["token_ids"]),
            "kept": g["kept"],
            "reselections": g["reselections"],
            "swapped_in": g["swapped_in"],
            "host_overlap": statistics.fmean(g["host_overlap"]) if g["host_overlap"] else None,
        }
        for x, g, s in zip(examples, gens, scored)
    ]
    return entry, records


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
            prompt["instruction"])  # fmt: skip
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
    for ret in records[0]["overlap"]:
        res: dict[str, Any] = {}
        for g, fams in groups.items():
            agg = _Agg()
            for r in records:
                ov = r["overlap"][ret]
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

    key = key or {"attribute": "accuracy", "existence": "f1", "reading": "anls", "multistep": "accuracy"}
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


def headline_text(metrics: dict[str, Any], retention: float = 0.333) -> str:
    """A plain-text summary: each method's headline score per family at `retention` next to the unpruned
    model, and the RVIS overlap of simple vs reasoning families at that budget."""
    key = retention_key(retention)
    t = metrics_table(metrics["methods"])
    if t.empty:
        return "no measurements"
    t = t[(t["retention"] == float(key)) | t["method"].str.endswith("unpruned")]
    pv = t.pivot_table(index="method", columns="family", values="score").round(3)
    lines = [f"scores at retention {key} (accuracy; F1 for existence; ANLS for reading):", pv.to_string()]
    rv = metrics.get("rvis", {}).get("by_retention", {}).get(key, {})
    if "simple" in rv and "reasoning" in rv:

        def f(x) -> str:  # a decile with too few steps has no value
            return "n/a" if x is None else f"{x:.3f}"

        lines.append(
            f"RVIS at {key} (mean Jaccard of top-k prefill vs step): simple {f(rv['simple']['mean'])}, "
            f"reasoning {f(rv['reasoning']['mean'])}; last decile: simple {f(rv['simple']['final_decile'])}, "
            f"reasoning {f(rv['reasoning']['final_decile'])}; random top-k sets: {f(rv.get('chance'))}"
        )
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- plots
def plot_accuracy(table, path=None):
    """Score per family against retention, one line per method (+dstp dashed)."""
    import seaborn as sns

    t = table[table["method"] != "unpruned"].copy()
    t["dstp"] = t["method"].str.endswith("+dstp")
    t["base"] = t["method"].str.replace("+dstp", "", regex=False)
    g = sns.relplot(
        data=t,
        x="retention",
        y="score",
        hue="base",
        style="dstp",
        col="family",
        kind="line",
        marker="o",
        height=2.8,
        aspect=1.0,
    )
    ref = table[table["method"] == "unpruned"]
    for ax, fam in zip(g.axes.flat, g.col_names):
        v = ref[ref["family"] == fam]["score"]
        if len(v):
            ax.axhline(float(v.iloc[0]), color="grey", ls=":", lw=1, label="unpruned")
        rets = sorted(t["retention"].unique())
        ax.set_xticks(rets, [f"{r:.1%}" for r in rets])
    g.set_titles("{col_name}")
    return _save(g.figure, path)


def plot_rvis(summary: dict[str, Any], path=None):
    """RVIS overlap against relative decoding progress, one panel per retention, one line per family."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    rets = list(summary["by_retention"])
    fig, axes = plt.subplots(1, len(rets), figsize=(3.6 * len(rets), 3.0), squeeze=False, sharey=True)
    palette = sns.color_palette("tab10")
    for ax, r in zip(axes[0], rets):
        by = summary["by_retention"][r]
        for j, (fam, s) in enumerate(by.items()):
            if fam in ("simple", "reasoning", "chance"):
                continue
            ys = s["progress_curve"]
            xs = [(i + 0.5) / len(ys) for i in range(len(ys))]
            ax.plot(
                xs,
                [y if y is not None else float("nan") for y in ys],
                marker="o",
                ms=3,
                color=palette[j % 10],
                label=f"{fam} (n={s['n']})",
            )
        if "chance" in by:
            ax.axhline(by["chance"], color="grey", ls=":", lw=1, label="random top-k")
        ax.set_title(f"top-k at retention {r}")
        ax.set_xlabel("decoding progress")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("Jaccard(top-k prefill, top-k step)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- student
def load_student(cfg, run_dir) -> tuple[Any, str, str]:
    """The V-Skip student to combine with pruning: (loaded or None, its `ratio_prompt`, what happened). Looks for
    `<run_dir>/04_qlora_distillation/adapters/vskip/`; absent module or adapter -> None."""
    from pathlib import Path

    adapter = Path(run_dir) / "04_qlora_distillation" / "adapters" / STUDENT_ADAPTER
    if not (adapter / "adapter_config.json").exists():
        return None, {}, f"no student adapter at {adapter} (run stage 04 first): student combination skipped"
    prompt = ratio_prompt(cfg, cfg.prune.student_ratio)
    said = " / ".join(v.strip() for v in prompt.values() if v.strip())
    return _load(cfg, adapter), prompt, f"student {adapter} prompted with {said!r}"
