"""The external scorers' columns (SmolLM2 surprisal without the image, LLMLingua-2's keep probability), computed
for scored rows that lack them and cached; stage 03 compares them and stage 04 distils from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vskip_core.common.artifacts import example_for, example_ref
from vskip_core.config import Config
from vskip_core.method.external_lm import external_surprisal, keep_probability
from vskip_core.method.gating import method_columns
from vskip_core.modeling.external_lm import load_llmlingua2, load_smollm2
from vskip_core.modeling.loading import user_text
from vskip_core.runtime import is_missing, torch_threads

EXTERNAL_BATCH_SIZE = 32  # rationales (LLMLingua-2: chunks) per forward when an external column is computed


def _smollm2_surprisal(cfg: Config, rows: list[dict[str, Any]]) -> list[np.ndarray]:
    lm = load_smollm2(cfg)
    # the same context as stage 03: the user turn (question and options), no image; a row of your own data
    # (vskip_core.api) brings its `context`
    contexts = [
        r.get("context") or user_text(example_for(cfg, dict(zip(("split", "index"), example_ref(r)))))
        for r in rows
    ]
    texts, offsets = [r["text"] for r in rows], [r["offsets"] for r in rows]
    return external_surprisal(lm, texts, offsets, contexts, EXTERNAL_BATCH_SIZE)[0]


def _llmlingua2_keep(cfg: Config, rows: list[dict[str, Any]]) -> list[np.ndarray]:
    clf = load_llmlingua2(cfg)  # the rationale alone, as LLMLingua-2 compresses a text
    return keep_probability(clf, [r["text"] for r in rows], [r["offsets"] for r in rows], EXTERNAL_BATCH_SIZE)


# the external scorers' columns: column -> (scorer, how its values are computed for rows that lack them)
EXTERNAL_COLUMNS = {
    "keep_prob_llmlingua2": ("LLMLingua-2", _llmlingua2_keep),
    "surprisal_external": ("SmolLM2-135M-Instruct", _smollm2_surprisal),
}


def external_columns(methods) -> list[str]:
    """The external scorers' columns that `methods` read, LLMLingua-2 first (its load can fail: before any work)."""
    need = {c for m in methods for c in method_columns(m)}
    return [c for c in EXTERNAL_COLUMNS if c in need]


def with_external_columns(
    cfg: Config, rows: list[dict[str, Any]], columns, search_dirs=(), cache_dir=None
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Rows with each external column in `columns` (keys of EXTERNAL_COLUMNS): taken from any parquet file
    with `id` and that column in `search_dirs` (stage 03's `scores_external.parquet`), else computed for these
    rows and cached as `cache_dir/<column>.parquet`. Returns (rows, where each column came from)."""
    sources = {}
    for column in columns:
        rows, sources[column] = _with_column(cfg, rows, column, search_dirs, cache_dir)
    return rows, sources


def _with_column(cfg: Config, rows, column: str, search_dirs, cache_dir):
    import pandas as pd
    import pyarrow.parquet as pq

    scorer, compute = EXTERNAL_COLUMNS[column]
    need = {str(r["id"]) for r in rows if is_missing(r.get(column))}
    if not need:
        return rows, "scores"
    files = [p for d in search_dirs if d and Path(d).exists() for p in sorted(Path(d).glob("*.parquet"))]
    if cache_dir is not None:
        files.append(Path(cache_dir) / f"{column}.parquet")
    found: dict[str, Any] = {}
    source = ""
    for f in files:
        if f.exists() and {"id", column} <= set(pq.read_schema(f).names):
            df = pd.read_parquet(f, columns=["id", column])
            got = {str(i): v for i, v in zip(df["id"], df[column]) if str(i) in need}
            if need <= set(got):
                found, source = got, str(f)
                break
    if not found:
        todo = [r for r in rows if str(r["id"]) in need]
        with torch_threads(cfg.gate.external_threads):
            found = {str(r["id"]): v for r, v in zip(todo, compute(cfg, todo))}
        source = f"computed with {scorer}"
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            table = {"id": list(found), column: [list(map(float, v)) for v in found.values()]}
            pd.DataFrame(table).to_parquet(Path(cache_dir) / f"{column}.parquet")
    out = [r if str(r["id"]) not in found else {**r, column: list(found[str(r["id"])])} for r in rows]
    return out, source
