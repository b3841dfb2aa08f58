"""Two runs of the pipeline, figure by figure: is a difference the method or the machine?

    python -m vskip_core.infra.compare results/default results/mine [--out compare.json]

Walks every stage's `metrics.json` in both runs (and `summary.json`) and pairs their numbers. A figure that
comes with a 95% interval in the first run (`<key>_ci`, a `{"value", "ci"}` or `{"diff", "ci"}` pair, the
`score` / `score_ci` tables, stage 08's `95% CI`) is *inside* when the second run's value lies in it. Times
(seconds, latency, tokens per second, speed-ups) measure the machine, not the method: counted apart.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TIMING_WORDS = ("second", "latency", "minutes", "speedup", "time", "prefill", "decode")
CI_KEYS = {"value": "ci", "diff": "ci", "varr": "ci", "student - teacher": "95% CI"}
ROW_KEYS = ("method", "claim", "subject", "comparison", "type", "family", "prompt")  # what names a row
SKIP = ("env", "params", "environment")  # provenance, not figures


@dataclass
class Figure:
    stage: str
    path: str
    a: float
    b: float
    ci: tuple[float, float] | None
    timing: bool

    @property
    def same(self) -> bool:
        return self.a == self.b or (math.isnan(self.a) and math.isnan(self.b))

    @property
    def inside(self) -> bool | None:
        if self.ci is None:
            return None
        return self.ci[0] - 1e-12 <= self.b <= self.ci[1] + 1e-12


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _interval(x: Any) -> tuple[float, float] | None:
    if isinstance(x, list | tuple) and len(x) == 2 and all(_number(v) for v in x):
        return float(x[0]), float(x[1])
    return None


def _timing(path: tuple[str, ...]) -> bool:
    return any(p.endswith("_s") or any(w in p for w in TIMING_WORDS) for p in path)


def _row_key(row: Any, i: int) -> str:
    if not (isinstance(row, dict) and any(k in row for k in ROW_KEYS)):
        return str(i)
    key = ":".join(str(row[k]) for k in ROW_KEYS if k in row)
    at = row.get("ratio", row.get("retention"))
    return key if at is None else f"{key}@{at}"


def _row_keys(rows: list[Any]) -> list[str]:
    """Each row's key, a repeated one numbered in order (`#2`, `#3`)."""
    seen: dict[str, int] = {}
    out = []
    for i, r in enumerate(rows):
        k = _row_key(r, i)
        seen[k] = seen.get(k, 0) + 1
        out.append(k if seen[k] == 1 else f"{k}#{seen[k]}")
    return out


def pair(stage: str, a: Any, b: Any, path: tuple[str, ...] = (), cis: dict | None = None) -> list[Figure]:
    """Every number present in both `a` and `b` at the same place, with its interval from `a` when it has one
    (`cis`: the `score_ci`-style table parallel to the one being walked)."""
    out: list[Figure] = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k, va in a.items():
            if k not in b or k.endswith("_ci") or k in ("ci", "95% CI") or (not path and k in SKIP):
                continue
            vb, p = b[k], (*path, str(k))
            if _number(va) and _number(vb):
                ci = _interval(a.get(f"{k}_ci")) or _interval(a.get(CI_KEYS.get(k, "")))
                ci = ci or (_interval(cis.get(k)) if isinstance(cis, dict) else None)
                out.append(Figure(stage, "/".join(p), float(va), float(vb), ci, _timing(p)))
            else:
                sub = a.get(f"{k}_ci") if isinstance(a.get(f"{k}_ci"), dict) else None
                sub = sub or (cis.get(k) if isinstance(cis, dict) else None)
                out += pair(stage, va, vb, p, sub)
    elif isinstance(a, list) and isinstance(b, list):
        if all(_number(x) for x in a):  # per-example values (timings, curves): not headline figures
            return out
        rows_b = dict(zip(_row_keys(b), b))
        for i, (key, va) in enumerate(zip(_row_keys(a), a)):
            if key in rows_b:  # rows matched by what names them, not by position
                sub = cis[i] if isinstance(cis, list) and i < len(cis) else None
                out += pair(stage, va, rows_b[key], (*path, key), sub)
    return out


def compare_runs(a: Path, b: Path) -> list[Figure]:
    figures: list[Figure] = []
    for fa in sorted(Path(a).glob("*/metrics.json")) + [Path(a) / "summary.json"]:
        fb = Path(b) / fa.relative_to(a)
        if fa.exists() and fb.exists():
            stage = fa.parent.name if fa.name == "metrics.json" else "summary"
            figures += pair(stage, json.loads(fa.read_text()), json.loads(fb.read_text()))
    return figures


def report(figures: list[Figure], moved: int = 12) -> str:
    """Markdown: per stage, figures compared / identical / with an interval and inside it; then the figures
    outside their interval and the largest relative moves."""
    lines = [
        "| stage | figures | identical | differ | with a 95% interval: inside / outside | times (apart) |",
        "|---|---|---|---|---|---|",
    ]
    for stage in dict.fromkeys(f.stage for f in figures):
        fs = [f for f in figures if f.stage == stage and not f.timing]
        ts = [f for f in figures if f.stage == stage and f.timing]
        ci = [f for f in fs if not f.same and f.ci is not None]
        inside = sum(bool(f.inside) for f in ci)
        lines.append(
            f"| {stage} | {len(fs)} | {sum(f.same for f in fs)} | {sum(not f.same for f in fs)} | "
            f"{inside} / {len(ci) - inside} | {len(ts)} |"
        )
    out = [f for f in figures if not f.timing and f.inside is False]
    if out:
        lines += ["", "Outside the first run's 95% interval:", "", "| figure | first | second | interval |"]
        lines.append("|---|---|---|---|")
        lines += [
            f"| {f.stage}: {f.path} | {f.a:.4g} | {f.b:.4g} | [{f.ci[0]:.4g}, {f.ci[1]:.4g}] |" for f in out
        ]
    diff = sorted(
        (f for f in figures if not f.timing and not f.same),
        key=lambda f: -abs(f.b - f.a) / max(abs(f.a), 1e-9),
    )[:moved]
    if diff:
        lines += ["", f"The {len(diff)} largest relative moves:", "", "| figure | first | second |"]
        lines.append("|---|---|---|")
        lines += [f"| {f.stage}: {f.path} | {f.a:.4g} | {f.b:.4g} |" for f in diff]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vskip_core.infra.compare", description=__doc__)
    ap.add_argument("first", help="results/<run> whose intervals are used (e.g. the README's run)")
    ap.add_argument("second", help="results/<run> to compare with it")
    ap.add_argument("--out", default=None, help="also write every paired figure as JSON here")
    args = ap.parse_args(argv)
    for d in (args.first, args.second):
        if not Path(d).is_dir():
            print(f"error: {d} is not a run folder (results/<run>/)", file=sys.stderr)
            return 2
    figures = compare_runs(Path(args.first), Path(args.second))
    if not figures:
        print("error: no stage has metrics.json in both runs", file=sys.stderr)
        return 2
    print(report(figures))
    if args.out:
        rows = [asdict(f) | {"same": f.same, "inside": f.inside} for f in figures]
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
