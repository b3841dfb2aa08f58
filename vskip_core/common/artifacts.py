"""Reading what an earlier stage wrote: the benchmark example behind a record, stage 01's rationales, stage 02's
scores. Every stage and the library read them through these functions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vskip_core.data.real import example_at
from vskip_core.runtime import to_python

SCORES_FILE = "scores.parquet"


def example_for(cfg, rec: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the benchmark example (image, scene, question, gold) behind a rationale record."""

    return example_at(cfg, rec["split"], int(rec["index"]))


def example_ref(row: dict[str, Any]) -> tuple[str, int]:
    """(split, index) of the benchmark example behind a row: its `split`/`index` fields, else its id."""
    if row.get("split") is not None and row.get("index") is not None:
        return str(row["split"]), int(row["index"])
    rid = str(row.get("id", ""))
    split, _, idx = rid.rpartition("-")
    if not split or not idx.isdigit():
        raise ValueError(
            f"row id {rid!r}: expected '<split>-<index>' (e.g. train-000017) or split/index fields"
        )
    return split, int(idx)


def load_rationales(stage_dir: str | Path, correct_only: bool = False) -> list[dict[str, Any]]:
    """Records of 01's rationales.jsonl (optionally only those whose answer was correct)."""
    p = Path(stage_dir) / "rationales.jsonl"
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: run stage 01_rationale_generation first")
    recs = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return [r for r in recs if r["correct"]] if correct_only else recs


def is_kept(cfg, rec: dict[str, Any]) -> bool:
    """Whether a rationale goes on to scoring and distillation, by `generation.keep`: `correct` (the paper's and
    TokenSkip's choice, default), `answered` (has an answer line), or `all` (a teacher too small to be right);
    never an empty one."""
    if not rec["token_ids"]:
        return False
    return {"correct": rec["correct"], "answered": rec["has_answer_line"], "all": True}[cfg.generation.keep]


def kept_rationales(cfg, stage_dir: str | Path) -> list[dict[str, Any]]:
    """The rationales of stage 01 that go on to scoring and distillation (`is_kept`)."""
    return [r for r in load_rationales(stage_dir) if is_kept(cfg, r)]


def load_scores(stage_dir: str | Path, per_layer: bool = True):
    """Read `scores.parquet` of stage 02 back as a DataFrame; list columns come back as Python lists. Without
    `per_layer` the per-layer columns (`*_by_layer_*`, the bulk of the file on a deep model) are not read."""
    import pandas as pd
    import pyarrow.parquet as pq

    path = Path(stage_dir) / SCORES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run stage 02_dual_scoring first")
    names = pq.read_schema(path).names
    df = pd.read_parquet(path, columns=None if per_layer else [c for c in names if "_by_layer_" not in c])
    for c in df.columns:
        if len(df) and isinstance(df[c].iloc[0], np.ndarray):
            df[c] = df[c].map(to_python)
    return df
