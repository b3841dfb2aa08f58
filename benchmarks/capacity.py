"""Capacity (issue 33): does compression cost a small student more than a large one? Runs stages 00-05 of
the pipeline at three embedded sizes spanning 8x in parameters (`params/capacity/xs.yaml` 0.59 M, `s.yaml`
1.40 M, and the default run's 4.82 M), then reads each run's equal-length comparison (stage 05's
`equal_length`: every student interpolated to ActRatio 0.5) and writes the table: per size, the accuracy drop
of the V-Skip and text-only students against the `full` control, with 95% intervals, and the direction
compared with the paper's claim (the drop shrinks as the model grows). Not part of `make reproduce`.

    .venv/bin/python benchmarks/capacity.py                # run what is missing, then the table
    .venv/bin/python benchmarks/capacity.py --table-only   # the table from finished runs

Writes results/capacity/capacity.json and capacity.md (and capacity.png)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# size -> (params file, run): smallest first; the default size is `make reproduce`'s own run (its V-Skip and
# text-only students are the ones a capacity run of it would train: one student per method and ratio)
SIZES = {
    "xs": ("params/capacity/xs.yaml", "capacity_xs"),
    "s": ("params/capacity/s.yaml", "capacity_s"),
    "default": ("params/default.yaml", "default"),
}


def run(size: str, jobs: int) -> None:
    params, name = SIZES[size]
    cmd = [sys.executable, "-m", "vskip_core.pipeline", "--params", params, "--run", name,
           "--stages", "00,01,02,03,04,05", "--jobs", str(jobs)]  # fmt: skip
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def row(size: str) -> dict:
    d = Path("results") / SIZES[size][1]
    summary = json.loads((d / "summary.json").read_text())
    teacher = json.loads((d / "00_embedded_teacher" / "metrics.json").read_text())
    eq = summary.get("equal_length") or {}
    rows = {(r["method"], r["ratio"]): r for r in summary["rows"]}
    out = {
        "size": size,
        "params_millions": teacher.get("params_millions"),
        "teacher_accuracy_mean": (rows.get(("teacher", None)) or {}).get("accuracy_mean"),
        "full_accuracy_mean": (rows.get(("full", 1.0)) or {}).get("accuracy_mean"),
        "at": eq.get("at"),
        "n": eq.get("n"),
    }
    for m in ("vskip", "text_only"):
        d_full = (eq.get("vs_full") or {}).get(m) or {}
        out[f"{m}_drop"] = d_full.get("value")
        out[f"{m}_drop_ci"] = d_full.get("ci")
        out[f"{m}_bracket"] = ((eq.get("methods") or {}).get(m) or {}).get("bracket")
        out[f"{m}_act_ratio"] = {
            f"{r['ratio']:g}": r.get("act_ratio") for (k, _), r in rows.items() if k == m
        }
    return out


def direction(rows: list[dict], method: str) -> str:
    """Does the drop shrink as the model grows (the paper: 2B -> 72B, robustness grows)?"""
    drops = [r[f"{method}_drop"] for r in rows if r[f"{method}_drop"] is not None]
    if len(drops) < 2:
        return "not measured"
    if all(b >= a for a, b in zip(drops, drops[1:])):
        return "the paper's direction: the drop shrinks as the model grows"
    if all(b <= a for a, b in zip(drops, drops[1:])):
        return "against the paper: the drop grows with the model"
    return "no monotone trend"


def table(rows: list[dict]) -> str:
    def cell(v, ci):
        if v is None:
            return ""
        return f"{v:+.3f}" + ("" if not ci or ci[0] is None else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]")

    lines = [
        "| size | parameters (M) | teacher acc. | `full` acc. | V-Skip - `full` at ActRatio 0.5 | text-only - `full` |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['params_millions']:.2f} | {r['teacher_accuracy_mean']:.3f} | "
            f"{r['full_accuracy_mean']:.3f} | {cell(r['vskip_drop'], r['vskip_drop_ci'])} | "
            f"{cell(r['text_only_drop'], r['text_only_drop_ci'])} |"
        )
    lines += ["", f"V-Skip: {direction(rows, 'vskip')}. Text-only: {direction(rows, 'text_only')}."]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for m, colour in (("vskip", "#1f77b4"), ("text_only", "#ff7f0e")):
        pts = [r for r in rows if r[f"{m}_drop"] is not None]
        x = [r["params_millions"] for r in pts]
        y = [r[f"{m}_drop"] for r in pts]
        err = [[v - (r[f"{m}_drop_ci"][0] or v) for v, r in zip(y, pts)],
               [(r[f"{m}_drop_ci"][1] or v) - v for v, r in zip(y, pts)]]  # fmt: skip
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=colour, label=m)
    ax.axhline(0, color="#444444", lw=0.6)
    ax.axhline(-0.06, color="#999999", ls="--", lw=0.8, label="-0.06 bar")
    ax.set_xscale("log")
    ax.set_xlabel("embedded teacher / student parameters (M)")
    ax.set_ylabel("accuracy - full's at ActRatio 0.5")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table-only", action="store_true", help="only read finished runs")
    ap.add_argument("--jobs", type=int, default=2, help="stages side by side within one size")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES))
    args = ap.parse_args()
    if not args.table_only:
        for size in args.sizes:
            run(size, args.jobs)
    rows = [row(s) for s in args.sizes if (Path("results") / SIZES[s][1] / "summary.json").exists()]
    out = Path("results") / "capacity"
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.json").write_text(json.dumps(rows, indent=1))
    (out / "capacity.md").write_text(table(rows) + "\n")
    if rows:
        plot(rows, out / "capacity.png")
    print(table(rows))


if __name__ == "__main__":
    main()
