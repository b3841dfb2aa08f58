"""The run summary a reader opens first: results/<run>/summary.md and summary.json (the paper's table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from vskip_core.runtime import atomic_write_bytes, atomic_write_json

ACT_RATIO_TOL = 0.05  # the ActRatio bar: a student asked for r writes r +- this of the teacher's length
FAMILY_COLUMNS = ("attribute", "multistep")
TABLE_VARR = ("colour", "shape", "category", "overall", "bound_overall")


def table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Flatten summary rows into the paper's layout: method x metrics (`n`: test examples of the row)."""
    out = []
    for r in rows:
        flat = {"method": r["method"], "ratio": r["ratio"], "n": r.get("n_examples")}
        flat["acc_mean"] = r.get("accuracy_mean")  # mean over families
        for fam in FAMILY_COLUMNS:
            flat[f"acc_{fam}"] = r["accuracy"].get(fam)
        flat.update(
            anls=r["anls"],
            pope_f1=r["pope_f1"],
            yes_ratio=r["yes_ratio"],
            tokens=r["tokens"],
            latency_s=r.get("latency_s"),
            speedup_vs_teacher=r.get("speedup_vs_teacher"),
            act_ratio=r["act_ratio"],
        )
        for (
            t
        ) in TABLE_VARR:  # the paper's types and pool, then the binding-aware pool (all types: summary.json)
            flat[f"varr_{t}"] = r["varr"].get(t)
        flat["halluc/ex"] = r.get("hallucinations_per_example")
        out.append(flat)
    return pd.DataFrame(out)


def write_summary(
    run_dir: Path,
    rows: list[dict[str, Any]],
    env: dict[str, Any],
    params: dict[str, Any],
    notes: list[str] | None = None,
) -> pd.DataFrame:
    """Write summary.json ({"rows": [...], "env", "params"}) and summary.md (the table + provenance)."""
    df = table(rows)
    ratio = (params.get("eval") or {}).get("main_ratio", 0.5)
    found = claims(rows, ratio)
    atomic_write_json(run_dir / "summary.json", {"rows": rows, "claims": found, "env": env, "params": params})
    fmt = df.copy()
    for c in fmt.columns:
        if fmt[c].dtype.kind == "f":
            fmt[c] = fmt[c].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    fmt["ratio"] = df["ratio"].map(lambda v: "" if v is None or pd.isna(v) else f"{v:g}")
    fmt = fmt.astype(object).where(fmt.notna(), "")  # a column with no value at all (e.g. varr_category here)
    md = [
        f"# vskip run summary: `{run_dir.name}`",
        "",
        "Test split of the configured benchmark. `acc_*`: accuracy per family; `anls`: reading (DocVQA-style);",
        "`pope_f1`, `yes_ratio`: existence (POPE-style; yes-ratio of *predictions*); `tokens`: rationale",
        "tokens per example; `latency_s`: median end-to-end generate() at batch 1 on the machine below;",
        "`speedup_vs_teacher`: the teacher's median latency over the row's (the paper's speed-up; against the",
        "`full` control in summary.json); `act_ratio`: body tokens (before the answer line) over the teacher's",
        "full-rationale body tokens on the same examples, pooled, truncated teacher rationales left out",
        "(`metrics.act_ratio`); `varr_colour|shape|category|overall`: the paper's VARR, the share of the teacher's",
        "full-rationale colour / shape / object-category mentions the generated rationale still carries",
        "(`metrics.attribute_mentions`); `varr_bound_overall`: the embedded world's binding-aware VARR (the gold",
        "rationale's attributes still said of the right object, true of the scene; empty on real benchmarks);",
        "`halluc/ex`: attribute hallucinations per example.",
        "`teacher` = frozen teacher, full rationale; `direct` = teacher answering with no rationale; `full` =",
        "student fine-tuned on full rationales (ratio 1.0): compare students with `full`, not with `teacher`.",
        "",
        _markdown(fmt),
        "",
        f"Machine: {env.get('device')} ({env.get('device_name') or env.get('machine')}), "
        f"CPU {env.get('cpu_model') or 'unknown'} ({env.get('cpu_count')} CPUs, torch kernels "
        f"{env.get('cpu_capability') or 'unknown'}{_caps(env)}), torch threads {env.get('torch_threads')}. "
        f"Versions: {', '.join(f'{k} {v}' for k, v in env.get('versions', {}).items() if v)}. "
        f"Git {str(env.get('git', {}).get('commit'))[:10]} (dirty: {env.get('git', {}).get('dirty')}).",
    ]
    md += comparisons(rows)
    md += claims_markdown(found)
    if notes:
        md += ["", *notes]
    atomic_write_bytes(run_dir / "summary.md", ("\n".join(md) + "\n").encode())
    return df


def _caps(env: dict[str, Any]) -> str:
    """The instruction-set caps the run was made under, as "; capped: K=V, ...", or nothing."""
    caps = env.get("isa_caps") or {}
    return "; capped: " + ", ".join(f"{k}={v}" for k, v in caps.items()) if caps else ""


def claims(rows: list[dict[str, Any]], ratio: float = 0.5) -> list[dict[str, Any]]:
    """The paper's student-level claims on this run, each with the figure, its 95% interval and the bar it is
    held to (issue 18): ActRatio per requested ratio within 0.05; at `ratio`, accuracy (mean over families)
    at most 0.06 below the full control, POPE yes-ratio within 0.05 of it, batch-1 decode >= 1.6x faster than
    the teacher and than the full control, and the V-Skip student's (paper) VARR above the text-only and
    LLMLingua-2 students' (interval above 0)."""
    out: list[dict[str, Any]] = []

    def add(claim, value, ci, target, met):
        value = None if value is None else float(value)
        out.append(
            {
                "claim": claim,
                "value": value,
                "ci": ci,
                "target": target,
                "met": None if met is None else bool(met),
            }
        )

    for r in rows:
        if r.get("act_ratio") is None or r["method"] in ("teacher", "direct", "full"):
            continue
        a = r["act_ratio"]
        add(f"{r['method']} ActRatio at {r['ratio']:g}", a, r.get("act_ratio_ci"),
            f"{r['ratio']:g} +- {ACT_RATIO_TOL:g}",
            abs(a - r["ratio"]) <= ACT_RATIO_TOL if r["ratio"] >= 0.5 else None)  # fmt: skip
    for r in rows:
        if r["method"] in ("teacher", "direct", "full") or r.get("ratio") != ratio:
            continue
        m, vs = r["method"], r.get("vs_full") or {}
        if vs.get("accuracy_mean_diff") is not None:
            d = vs["accuracy_mean_diff"]
            add(f"{m} accuracy - full's", d, vs["accuracy_mean_diff_ci"], ">= -0.06", d >= -0.06)
        if vs.get("yes_ratio_diff") is not None and vs["yes_ratio_diff"] == vs["yes_ratio_diff"]:
            d = vs["yes_ratio_diff"]
            add(f"{m} yes-ratio - full's", d, vs["yes_ratio_diff_ci"], "within 0.05", abs(d) <= 0.05)
        for ref in ("teacher", "full"):
            if r.get(f"speedup_vs_{ref}") is not None:
                x = r[f"speedup_vs_{ref}"]
                add(f"{m} decode speed-up vs {ref}", x, r.get(f"speedup_vs_{ref}_ci"), ">= 1.6x", x >= 1.6)
        for base in ("text_only", "llmlingua2"):
            vs = r.get(f"vs_{base}") or {}
            if vs.get("varr_diff") is not None and vs["varr_diff"] == vs["varr_diff"]:
                d, ci = vs["varr_diff"], vs["varr_diff_ci"]
                add(f"{m} VARR - {base}'s", d, ci, "> 0, interval above 0", ci[0] is not None and ci[0] > 0)
    return out


def _with_ci(c: dict[str, Any]) -> str:
    """A claim's value with its 95% interval, as every claims table and reading shows it."""
    lo, hi = c["ci"] or (None, None)
    return f"{c['value']:.3f}" + ("" if lo is None else f" [{lo:.3f}, {hi:.3f}]")


def claims_frame(found: list[dict[str, Any]]) -> pd.DataFrame:
    """The claims as a table to read: the value with its 95% interval in one cell, the bar, and whether it is
    met (blank where no bar applies)."""
    out = []
    for c in found:
        met = "" if c["met"] is None else ("yes" if c["met"] else "no")
        out.append({"claim": c["claim"], "measured [95% interval]": _with_ci(c), "target": c["target"],
                    "met": met})  # fmt: skip
    return pd.DataFrame(out).set_index("claim") if out else pd.DataFrame()


def claims_reading(found: list[dict[str, Any]]) -> str:
    """A short markdown reading of the student-level claims of this run, written from the claims rows (so it
    cannot go stale): which bars are met and which are missed, with the figures."""
    if not found:
        return "No student-level claims measured (no students evaluated)."

    def item(c: dict[str, Any]) -> str:
        return f"{c['claim']} {_with_ci(c)} (bar {c['target']})"

    met = [item(c) for c in found if c["met"] is True]
    missed = [item(c) for c in found if c["met"] is False]
    lines = [
        f"**What this run says** (from `summary.json`): {len(met)} of {len(met) + len(missed)} bars met.",
        "",
    ]
    lines += [f"- missed: {m}" for m in missed] + [f"- met: {m}" for m in met]
    return "\n".join(lines)


def claims_markdown(found: list[dict[str, Any]]) -> list[str]:
    if not found:
        return []
    return [
        "",
        "The paper's claims at the student level (bootstrap 95% intervals over test examples; `met` is blank",
        "where no bar applies):",
        "",
        _markdown(claims_frame(found).reset_index().replace({"met": {"no": "**no**"}})),
    ]


def comparisons(rows: list[dict[str, Any]]) -> list[str]:
    """The paired comparisons of `stages.evaluation.add_intervals` as markdown lines (none if absent)."""

    def cell(d: dict[str, Any] | None, name: str) -> str:
        if not d or d.get(f"{name}_diff") is None:
            return ""
        lo, hi = d[f"{name}_diff_ci"]
        ci = "" if lo is None else f" [{lo:+.3f}, {hi:+.3f}]"
        return f"{d[f'{name}_diff']:+.3f}{ci}"

    lines = [
        f"| {r['method']} | {r['ratio']:g} | {cell(r.get('vs_full'), 'accuracy_mean')} | "
        f"{cell(r.get('vs_full'), 'yes_ratio')} | {cell(r.get('vs_text_only'), 'varr')} | "
        f"{cell(r.get('vs_llmlingua2'), 'varr')} |"
        for r in rows
        if r.get("vs_full") or r.get("vs_text_only")
    ]
    if not lines:
        return []
    return [
        "",
        "Paired comparisons (difference, bootstrap 95% interval over the same test examples): accuracy (mean",
        "over families) and yes-ratio against the `full` control; the paper's VARR against the text-only and",
        "LLMLingua-2 students at the same ratio.",
        "",
        "| method | ratio | accuracy vs full | yes-ratio vs full | VARR vs text-only | VARR vs LLMLingua-2 |",
        "|---|---|---|---|---|---|",
        *lines,
    ]


def _markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines)
