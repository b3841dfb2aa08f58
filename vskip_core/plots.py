"""Figures for the notebooks (seaborn/matplotlib). Each returns the figure and, given `path`, saves a PNG."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg") if not matplotlib.get_backend().lower().startswith(
    ("module://", "nbagg", "ipympl")
) else None
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from vskip_core.config import TEACHER_PHASES  # noqa: E402
from vskip_core.registry import display  # noqa: E402

ANCHOR_COLOURS = {
    "colour": "#e45756",
    "shape": "#4c78a8",
    "size": "#72b7b2",
    "position": "#b279a2",
    "text": "#f58518",
    "object": "#54a24b",  # real data only: COCO object names (`data.real.find_real_anchors`)
}


def _save(fig, path: str | Path | None):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def _plain(text: str) -> str:
    """Matplotlib text shown as written: a price's `$` is not the start of mathtext."""
    return text.replace("$", r"\$")


def HTML(markup: str):  # noqa: N802  (a drop-in for IPython.display.HTML)
    """IPython's HTML output, marked so that JupyterLab does not typeset it: MathJax would read the text between
    two prices ("$5.21 ... $5.21") as LaTeX and drop the dollar signs. MathJax 3 (JupyterLab 4) skips the
    class mathjax_ignore, MathJax 2 (the classic notebook) tex2jax_ignore; `make lab-check` checks it."""
    from IPython.display import HTML as _HTML

    return _HTML(f'<div class="tex2jax_ignore mathjax_ignore">{markup}</div>')


def kv_table(values: dict[str, Any], cols: int = 3):
    """A long flat dict as a compact HTML table: `cols` name / value pairs a row (n entries take ceil(n / cols)
    rows, not one row n columns wide)."""
    import html

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    items = list(values.items())
    rows = ["".join(f"<td><code>{html.escape(k)}</code></td><td>{fmt(v)}</td>" for k, v in items[i : i + cols])
            for i in range(0, len(items), cols)]  # fmt: skip
    return HTML(f"<table>{''.join(f'<tr>{r}</tr>' for r in rows)}</table>")


def text_gallery(frame: pd.DataFrame, title: str, subtitle: str | None = None):
    """One block per row of `frame`: its `title` (and `subtitle`) column as a header, then every other column as
    a labelled line of wrapped text in the notebook's width (generated rationales side by side are unreadable)."""
    import html

    cell = 'style="text-align:left;vertical-align:top;white-space:normal;overflow-wrap:anywhere"'
    blocks = []
    for _, r in frame.iterrows():
        head = f"<b>{html.escape(str(r[title]))}</b>" + (
            f" · {html.escape(str(r[subtitle]))}" if subtitle else ""
        )
        lines = "".join(
            f"<tr><th {cell}>{html.escape(str(c))}</th><td {cell}>{html.escape(str(r[c]))}</td></tr>"
            for c in frame.columns
            if c not in (title, subtitle)
        )
        blocks.append(
            f'<p>{head}</p><table style="width:100%;table-layout:fixed"><col style="width:17%"><col>{lines}</table>'
        )
    return HTML("".join(blocks))


def highlight_anchors(text: str, anchors: list[dict[str, Any]]) -> str:
    """HTML of a rationale with each anchor span coloured by attribute type (for IPython.display.HTML)."""
    import html

    out, pos = [], 0
    for a in sorted(anchors, key=lambda a: a["start"]):
        out.append(html.escape(text[pos : a["start"]]))
        c = ANCHOR_COLOURS.get(a["type"], "#999")
        out.append(
            f'<span style="background:{c}33;border-bottom:2px solid {c}" title="{a["type"]}">'
            f"{html.escape(text[a['start'] : a['end']])}</span>"
        )
        pos = a["end"]
    out.append(html.escape(text[pos:]))
    return "".join(out)


def example_grid(examples: list[dict[str, Any]], path=None, cols: int = 4, width: int = 46):
    """Images with question, answer and the start of the gold rationale."""
    rows = int(np.ceil(len(examples) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 5.6 * rows))
    for ax, ex in zip(np.atleast_1d(axes).ravel(), examples):
        ax.imshow(ex["image"], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        q = ex["question"] + (
            "\n" + " ".join(f"({L}) {o}" for L, o in zip("ABCD", ex["options"])) if ex.get("options") else ""
        )
        ax.set_title(_plain(f"[{ex['family']}] " + textwrap.fill(q, width)), fontsize=8, loc="left")
        start = textwrap.shorten(ex["rationale"], 190, placeholder=" ...")  # the first words, whole
        ax.set_xlabel(_plain(textwrap.fill(start, width) + f"\n-> {ex['answer']}"), fontsize=7, loc="left")
    for ax in np.atleast_1d(axes).ravel()[len(examples) :]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def distributions(df: pd.DataFrame, path=None):
    """Family counts per split, asked-attribute types, objects per scene, rationale length, anchors."""
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    sns.countplot(data=df, x="family", hue="split", ax=axes[0])
    axes[0].set_title("examples per family and split")
    axes[0].tick_params(axis="x", rotation=30)
    sns.move_legend(axes[0], "upper left", bbox_to_anchor=(1, 1), frameon=False)
    sns.countplot(data=df[df.split == "train"], x="attr_type", ax=axes[1], color="#4c78a8")
    axes[1].set_title("question type (train)")
    axes[1].tick_params(axis="x", rotation=30)
    sns.histplot(data=df[df.split == "train"], x="rationale_tokens", hue="family", element="step", ax=axes[2])
    axes[2].set_title("gold rationale length (tokens)")
    sns.move_legend(axes[2], "upper left", bbox_to_anchor=(1, 1), frameon=False)
    anchors = df[df.split == "train"][["n_colour", "n_shape", "n_size", "n_position", "n_text"]].sum()
    sns.barplot(
        x=[c[2:] for c in anchors.index],
        y=anchors.values,
        ax=axes[3],
        palette=[ANCHOR_COLOURS[c[2:]] for c in anchors.index],
        hue=[c[2:] for c in anchors.index],
        legend=False,
    )
    axes[3].set_title("anchor mentions by type (train)")
    fig.tight_layout()
    return _save(fig, path)


def training_curves(history: list[dict[str, Any]], path=None):
    h = pd.DataFrame(history)
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.6))
    v = h[h.phase == "vision"]
    if len(v):
        acc = v[[c for c in v.columns if c.startswith("acc_")]].rolling(10, min_periods=1).mean()
        acc.index = v.step
        names = {
            "d0": "price digit 1",
            "d1": "price digit 2",
            "d2": "price digit 3",
            "cell": "grid cell",
            "rank": "price rank",
        }
        for c in acc.columns:
            axes[0].plot(acc.index, acc[c], label=names.get(c[4:], c[4:]))
        axes[0].set_title("vision pretraining: accuracy of each patch label (what the patch shows)")
        axes[0].set_xlabel("step")
        axes[0].legend(fontsize=7, ncol=2)
    e2e = h[h.phase != "vision"].reset_index(drop=True)
    if len(e2e):  # look-up drills, full examples, verdict phase: one x axis, one colour each
        colours = {"drill": "#f58518", "lm": "#4c78a8", "verdict": "#54a24b"}
        names = {tag: name for name, tag in TEACHER_PHASES.items()}  # history tag -> phase name
        for phase, part in e2e.groupby("phase", sort=False):
            c = colours.get(phase, "grey")
            axes[1].plot(part.index, part.loss, alpha=0.3, color=c)
            label = names.get(phase, phase)
            axes[1].plot(part.index, part.loss.rolling(25, min_periods=1).mean(), color=c, label=label)
        axes[1].set_yscale("log")
        axes[1].set_title("weighted next-token loss (rationale + answer)")
        axes[1].set_xlabel("step (lookup_drills, end_to_end, verdict)")
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def grounding_bars(table: pd.DataFrame, path=None):
    """table: rows family, columns with image / blank image / chance (the family's headline metric)."""
    long = table.reset_index().melt(id_vars="family", var_name="condition", value_name="score")
    fig, ax = plt.subplots(figsize=(8, 3.6))
    sns.barplot(data=long, x="family", y="score", hue="condition", ax=ax)
    ax.set_ylim(0, 1)
    ax.set_title("teacher: headline metric per family, real vs blank image vs chance")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1), frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def attention_overlays(items: list[dict[str, Any]], path=None, cols: int = 4):
    """items: {image, grid (h, w) of merged tokens, weights (h*w,), title}: attention over the image."""
    rows = int(np.ceil(len(items) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows))
    for ax, it in zip(np.atleast_1d(axes).ravel(), items):
        img = np.asarray(it["image"])
        h, w = it["grid"]
        heat = np.asarray(it["weights"]).reshape(h, w)
        ax.imshow(img, interpolation="nearest")
        ax.imshow(
            heat, cmap="magma", alpha=0.55, extent=(0, img.shape[1], img.shape[0], 0), interpolation="nearest"
        )
        ax.set_title(textwrap.fill(it["title"], 34), fontsize=8)
        ax.axis("off")
    for ax in np.atleast_1d(axes).ravel()[len(items) :]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def _colour(method: str) -> str:
    """One colour per system in every figure of 05 and 06: the registered one (`registry.display`)."""
    return display(method).colour


def _label(method: str) -> str:
    return display(method).label


def system_label(frame: pd.DataFrame) -> pd.Series:
    """Each row's system as every table and axis of 05 and 06 names it: `method@ratio` ("vskip@0.5"); the
    teacher and `direct` have no ratio."""
    return frame.method + frame.ratio.map(lambda r: "" if pd.isna(r) else f"@{r:g}")


def accuracy_vs_ratio(df: pd.DataFrame, path=None):
    """Mean accuracy over families (accuracy, ANLS, POPE F1) against ActRatio, one line per method."""
    d = df.copy()
    cols = [c for c in ("acc_attribute", "acc_multistep", "anls", "pope_f1") if c in d]
    d["score"] = d[cols].mean(axis=1)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    students = d[d.ratio.notna() & (d.method != "full")]
    shown = students.assign(method=students.method.map(_label))
    sns.lineplot(data=shown, x="act_ratio", y="score", hue="method", marker="o", ax=ax,
                 palette={_label(m): _colour(m) for m in students.method.unique()})  # fmt: skip
    # the teacher writes its own full rationale (ActRatio 1 by definition), direct answers write none (0)
    for name, marker, x in (("teacher", "*", 1.0), ("full", "D", None), ("direct", "X", 0.0)):
        r = d[d.method == name]
        if len(r):
            xv = float(r.act_ratio.iloc[0]) if x is None and pd.notna(r.act_ratio.iloc[0]) else (x or 0.0)
            ax.scatter(
                [xv],
                r.score.iloc[:1],
                marker=marker,
                s=120,
                color=_colour(name),
                zorder=5,
                label=_label(name),
            )
    ax.set_xlim(-0.05, max(1.15, float(d.act_ratio.max(skipna=True) or 1) + 0.1))
    ax.margins(y=0.15)
    ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("ActRatio (rationale tokens / teacher's)")
    ax.set_ylabel("mean of family metrics")
    ax.set_title("accuracy vs actual compression")
    fig.tight_layout()
    return _save(fig, path)


def ratio_curves(curves: dict[str, list[dict[str, Any]]], at: float | None = None, path=None):
    """Every method's accuracy (mean and per family), the paper's VARR and the POPE yes-ratio against its
    measured ActRatio, one point per requested ratio with 95% intervals on both axes (summary.json's
    `curves`); `direct` (ActRatio 0) and `full` as markers; a dashed line at the equal-length reading `at`."""
    families = sorted({f for pts in curves.values() for p in pts for f in (p.get("accuracy") or {})})
    panels = [("accuracy_mean", "accuracy (mean over families)")]
    panels += [(f"accuracy/{f}", f"accuracy: {f}") for f in families]
    panels += [("varr_overall", "VARR (the paper's)"), ("yes_ratio", "POPE yes-ratio")]
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)

    def value(p, key):
        if key.startswith("accuracy/"):
            f = key.split("/", 1)[1]
            return p["accuracy"].get(f), ((p.get("accuracy_ci") or {}).get(f) or [None, None])
        return p.get(key), (p.get(f"{key}_ci") or [None, None])

    for ax, (key, title) in zip(axes.flat, panels):
        for m, pts in curves.items():
            xs, ys, xe, ye = [], [], [], []
            for p in pts:
                y, (lo, hi) = value(p, key)
                if y is None or p.get("act_ratio") is None or y != y:
                    continue
                x, (xlo, xhi) = p["act_ratio"], (p.get("act_ratio_ci") or [None, None])
                xs.append(x)
                ys.append(y)
                xe.append([x - xlo if xlo is not None else 0, xhi - x if xhi is not None else 0])
                ye.append([y - lo if lo is not None else 0, hi - y if hi is not None else 0])
            if not xs:
                continue
            single = m in ("direct", "full")
            xe, ye = np.clip(np.array(xe).T, 0, None), np.clip(np.array(ye).T, 0, None)
            ax.errorbar(xs, ys, xerr=xe, yerr=ye, color=_colour(m), capsize=2,
                        marker={"direct": "X", "full": "D"}.get(m, "o"), ms=7 if single else 4,
                        ls="none" if single else "-", lw=1.2, label=_label(m))  # fmt: skip
        if at is not None:
            ax.axvline(at, color="#999999", ls="--", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-0.05, 1.1)
        ax.set_ylim(-0.02, 1.02)  # every panel is a share
        ax.set_xlabel("ActRatio", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower right", fontsize=8, ncol=1, frameon=False)
    fig.suptitle(
        "each method over its requested ratios, against the length it actually writes (95% intervals)"
    )
    fig.tight_layout()
    return _save(fig, path)


def category_bars(table: pd.DataFrame, value: str, title: str, path=None):
    """One bar per (category, method) from a long table with columns `category`, `method`, `value` and
    optionally `<value>_lo` / `<value>_hi` (95% interval)."""
    d = table.dropna(subset=[value])
    cats = list(dict.fromkeys(d.category))
    methods = list(dict.fromkeys(d.method))
    w = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cats)), 3.6))
    for k, m in enumerate(methods):
        sub = d[d.method == m].set_index("category").reindex(cats)
        x = np.arange(len(cats)) + (k - (len(methods) - 1) / 2) * w
        err = None
        if f"{value}_lo" in sub:
            err = np.vstack([sub[value] - sub[f"{value}_lo"], sub[f"{value}_hi"] - sub[value]]).clip(min=0)
        ax.bar(x, sub[value], w, yerr=err, capsize=2, color=_colour(m), label=_label(m))
    ax.set_xticks(np.arange(len(cats)), cats, rotation=30, ha="right", fontsize=8)
    ax.axhline(0, color="#444444", lw=0.6)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def latency_bars(df: pd.DataFrame, path=None):
    d = df[df.latency_s.notna()].copy()
    d["system"] = system_label(d)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(d)), 3.8))
    sns.barplot(data=d, x="system", y="latency_s", hue="method", dodge=False, ax=ax, legend=False,
                palette={m: _colour(m) for m in d.method.unique()})  # fmt: skip
    ax.tick_params(axis="x", rotation=70)
    ax.set_title("median end-to-end latency per example (batch 1, this machine)")
    fig.tight_layout()
    return _save(fig, path)


def varr_bars(df: pd.DataFrame, ratio: float, path=None):
    """VARR per attribute type at one ratio, per method (teacher and full as references): the paper's types
    (against the teacher's rationale) and the binding-aware pool `bound_overall` (against the gold one)."""
    d = df[(df.ratio == ratio) | df.method.isin(["teacher", "full"])]
    cols = [c for c in d.columns if c.startswith("varr_") and d[c].notna().any()]  # types with a mention
    long = d.melt(id_vars=["method"], value_vars=cols, var_name="attribute", value_name="VARR")
    long["attribute"] = long.attribute.str[5:]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    sns.barplot(data=long.assign(method=long.method.map(_label)), x="attribute", y="VARR", hue="method", ax=ax,
                palette={_label(m): _colour(m) for m in long.method.unique()})  # fmt: skip
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, not over them
    ax.set_title(f"visual attribute retention of generated rationales (students at ratio {ratio:g})")
    fig.tight_layout()
    return _save(fig, path)
