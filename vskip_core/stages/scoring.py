"""Stage 02, dual scoring: every kept rationale of stage 01 scored by the frozen teacher (batched, sharded,
resumable), written as `scores.parquet`, plus the analysis tables, figures and HTML of notebook 02.

The equations (surprisal, hooked visual-anchoring capture, key layers, words) are in `vskip_core.method.scoring`.
For several GPUs: `python -m vskip_core.stages.scoring --params ... --run ... --shard i/n` (one process per GPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vskip_core.arguments import parse_sets, parse_shard, stage_parser
from vskip_core.common.artifacts import SCORES_FILE, example_for, kept_rationales, load_scores  # noqa: F401
from vskip_core.config import ParamsError, load_params
from vskip_core.method import scoring as method_scoring
from vskip_core.method.gating import as_scored, forced_tokens
from vskip_core.method.scoring import (
    SelectionRow,
    aggregate_words,
    anchoring_for_layers,
    answer_token_start,
    blank_image,
    candidate_layers,
    choose_key_layers,
    held_out_mask,
    key_layer_table,
    resolve_key_layers,
    teacher_forced_scores,
    token_anchor_types,
    word_ids,
)
from vskip_core.metrics import auc
from vskip_core.modeling.adapters import adapter_for
from vskip_core.modeling.loading import load_model
from vskip_core.plots import (  # the project's matplotlib set-up (non-interactive backend outside notebooks)
    ANCHOR_COLOURS,
    plt,
    sns,
)
from vskip_core.runtime import ShardedWriter, atomic_write_bytes, is_missing, results_dir
from vskip_core.runtime import progress as tqdm
from vskip_core.teacher import build_teacher

SHARD_DIR = "score_shards"
CONTRACT_COLUMNS = (
    "id",
    "family",
    "text",
    "token_ids",
    "offsets",
    "surprisal",
    "anchoring",
    "surprisal_noimg",
    "word_ids",
    "answer_start",
)


# ------------------------------------------------------------------------------------------ inputs
def adapter_inputs(loaded, examples, texts, images, instruction: str, device):
    """One left-padded batch through the family adapter (encode / collate / model_inputs) and each row's
    rationale span (start, n); the end token after the rationale is not scored."""

    ad, tok = adapter_for(loaded.model), loaded.tokenizer
    items = [
        ad.encode(ex, tok, loaded.processor, target=t, instruction=instruction, image=img)
        for ex, t, img in zip(examples, texts, images)
    ]
    batch = ad.collate(items, tok.pad_token_id, padding_side="left")
    spans = [
        (off + it["target_start"], len(it["input_ids"]) - it["target_start"] - 1)
        for it, off in zip(items, batch["offsets"].tolist())
    ]
    return ad.model_inputs(batch, device), spans


# ------------------------------------------------------------------------------------------ one pass per batch
@dataclass
class _Prepared:
    rec: dict[str, Any]
    ex: dict[str, Any]
    token_ids: list[int]
    offsets: list[list[int]]
    answer_start: int


def _prepare(loaded, records, examples, require_answer_line: bool) -> tuple[list[_Prepared], dict[str, int]]:
    """Tokenize each rationale with offsets; skip (and count) what cannot be scored."""
    tok = loaded.tokenizer
    skipped = {"empty_rationale": 0, "no_answer_line": 0, "no_image": 0}
    if not require_answer_line:
        skipped["no_answer_line_kept"] = 0
    ok = []
    for rec, ex in zip(records, examples):
        if rec["id"] != ex.get("id", rec["id"]):
            raise ValueError(f"record {rec['id']} is paired with example {ex.get('id')}; pass aligned lists")
        text = rec["rationale"] or ""
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], [list(o) for o in enc["offset_mapping"]]
        if not ids:
            skipped["empty_rationale"] += 1
            continue
        ans = answer_token_start(text, offsets)
        if ans is None and require_answer_line:
            skipped["no_answer_line"] += 1
            continue
        if ans is None:  # kept on request: answer_start = n (no answer tokens to force-keep)
            skipped["no_answer_line_kept"] += 1
            ans = len(ids)
        if ex.get("image") is None:
            skipped["no_image"] += 1
            continue
        ok.append(_Prepared(rec, ex, ids, offsets, ans))
    return ok, skipped


# scoring params that only pick what is read from the stored per-layer rows (the key-layer choice, the gate's
# units): changing them reuses the scored shards
CHOICE_FIELDS = ("key_layers", "layer_select", "select_share", "layer_band", "head_reduce", "word_level")


def _fingerprint(cfg, loaded, require_answer_line: bool) -> str:
    """Params, checkpoint and the code of both scoring modules: shards written under another are stale."""
    import json

    scoring = {k: v for k, v in cfg.to_dict()["scoring"].items() if k not in CHOICE_FIELDS}
    parts = [
        cfg.hash("model", "data", "embedded", "generation"),
        json.dumps(scoring, sort_keys=True),
        str(loaded.path),
        str(require_answer_line),
    ]
    for f in (Path(method_scoring.__file__), Path(__file__)):
        parts.append(hashlib.sha256(f.read_bytes()).hexdigest())
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _score_chunk(loaded, cfg, chunk: list[_Prepared], all_layers, build_inputs) -> list[dict]:
    """Score one batch: surprisal and every candidate layer's anchoring (both query rows, both head
    reductions) and, with `scoring.blank_image`, the same rationale's surprisal and anchoring on a blank image."""
    sc = cfg.scoring
    device = next(loaded.model.parameters()).device
    texts = [p.rec["rationale"] for p in chunk]
    exs = [p.ex for p in chunk]
    inputs, spans = build_inputs(loaded, exs, texts, [None] * len(chunk), cfg.generation.instruction, device)
    for p, (_, n) in zip(chunk, spans):
        if n != len(p.token_ids):
            raise RuntimeError(
                f"{p.rec['id']}: the input builder placed {n} rationale tokens, the tokenizer gives "
                f"{len(p.token_ids)}; the builder must tokenize the rationale the same way"
            )
    # both query rows of every token (one row more per rationale): stage 03 compares predict with self
    ps = teacher_forced_scores(loaded.model, inputs, spans, all_layers, "both")
    other = "self" if sc.query_position == "predict" else "predict"
    per_layer = {
        f"anchoring{'' if m == sc.query_position else '_' + m}_by_layer_{h}": _by_layer(ps, all_layers, h, m)
        for m in (sc.query_position, other)
        for h in ("max", "mean")
    }
    noimg = [None] * len(chunk)
    if sc.blank_image:
        blank = [blank_image(ex) for ex in exs]
        inputs0, spans0 = build_inputs(loaded, exs, texts, blank, cfg.generation.instruction, device)
        ps0 = teacher_forced_scores(loaded.model, inputs0, spans0, all_layers, sc.query_position)
        noimg = [s.tolist() for s in ps0.surprisal]
        for h in ("max", "mean"):
            per_layer[f"anchoring_blank_by_layer_{h}"] = _by_layer(ps0, all_layers, h, sc.query_position)
    return [
        _row(p, ps.surprisal[b], noimg[b], {k: v[b] for k, v in per_layer.items()}, all_layers, sc)
        for b, p in enumerate(chunk)
    ]


def _by_layer(ps, layers: list[int], head_reduce: str, mode: str) -> list[list[list[float]]]:
    """Per row: one list of token values per layer (the layer alone, heads reduced)."""
    per = [ps.anchoring([i], head_reduce, mode) for i in layers]  # layer -> rows -> tokens
    return [[per[k][b].astype(float).tolist() for k in range(len(layers))] for b in range(len(per[0]))]


def _row(p: _Prepared, surprisal, noimg, per_layer: dict, all_layers, sc) -> dict:
    """One row of scores.parquet as scored: surprisal, word ids, anchor types and every candidate layer's
    anchoring. The key-layer columns (`anchoring`, ...) are added by `apply_key_layers` once they are chosen."""
    wids = word_ids(p.rec["rationale"], p.offsets)
    return {
        "id": p.rec["id"],
        "family": p.rec.get("family", p.ex.get("family")),
        "text": p.rec["rationale"],
        "token_ids": p.token_ids,
        "offsets": p.offsets,
        "surprisal": surprisal.astype(float).tolist(),
        "surprisal_noimg": noimg,
        "word_ids": wids,
        "answer_start": p.answer_start,
        "surprisal_word": aggregate_words(surprisal, wids, sc.word_surprisal).tolist(),
        "anchor_type": token_anchor_types(p.offsets, p.rec.get("anchors", [])),
        "split": p.rec.get("split"),
        "index": p.rec.get("index"),
        "generated_ids_match": p.rec.get("token_ids") is None or p.rec["token_ids"] == p.token_ids,
        "all_layers": list(all_layers),
        **per_layer,
    }


# ------------------------------------------------------------------------------------------ key layers
def _filled(df, column: str) -> bool:
    """Every row of the frame has a value in `column` (a blank-image column is empty when that pass is off)."""
    return column in df and not df[column].map(is_missing).any()


def apply_key_layers(df, layers: list[int], head_reduce: str, sc):
    """The scores frame with its key-layer columns computed from the stored per-layer values: `anchoring`
    (the configured query row), `anchoring_word`, `anchoring_predict` / `anchoring_self`, and with a blank-image
    pass `anchoring_blank`, `anchoring_delta` (anchoring minus its blank-image value) and `surprisal_gain`
    (surprisal without the image minus with it)."""
    df = df.copy()
    other = "self" if sc.query_position == "predict" else "predict"
    records = df.to_dict("records")

    def col(prefix):
        return [anchoring_for_layers(r, layers, head_reduce, prefix).tolist() for r in records]

    df["anchoring"] = col("anchoring_by_layer")
    df[f"anchoring_{sc.query_position}"] = df["anchoring"]
    df[f"anchoring_{other}"] = col(f"anchoring_{other}_by_layer")
    df["anchoring_word"] = [aggregate_words(a, w, "max").tolist() for a, w in zip(df.anchoring, df.word_ids)]
    blank = _filled(df, "anchoring_blank_by_layer_max")
    df["anchoring_blank"] = col("anchoring_blank_by_layer") if blank else None
    df["anchoring_delta"] = (
        [(np.asarray(a) - np.asarray(b)).tolist() for a, b in zip(df.anchoring, df.anchoring_blank)]
        if blank
        else None
    )
    noimg = _filled(df, "surprisal_noimg")
    df["surprisal_gain"] = (
        [(np.asarray(n) - np.asarray(s)).tolist() for n, s in zip(df.surprisal_noimg, df.surprisal)]
        if noimg
        else None
    )
    df["key_layers"] = [list(layers)] * len(df)
    df["head_reduce"] = head_reduce
    return df


def selection_inputs(df, mask, gate, word_level: bool = True) -> list[SelectionRow]:
    """The rows of a scores frame picked by `mask`, as the key-layer choice reads them: per-layer anchoring by
    head reduction, visual-attribute tokens (stage 01's anchors), the gate's units (words when `word_level`)
    and the units it decides on: a word holding a token the gate forces (`method.gating.forced_tokens`: the
    answer line, digits with `gate.force_keep_digits`) is left out whole, as the gate keeps it whole."""
    out = []
    for r in df[np.asarray(mask, dtype=bool)].to_dict("records"):
        row = as_scored(r)
        # a rationale without an answer line (kept on request) has no answer tokens to force
        forced = forced_tokens(
            row,
            dataclasses.replace(
                gate, force_keep_answer=gate.force_keep_answer and row.answer_start is not None
            ),
        )
        wids = row.word_ids if word_level else None
        if wids is not None:
            forced = (np.bincount(wids, weights=forced, minlength=int(wids.max()) + 1) > 0)[wids]
        out.append(
            SelectionRow(
                by_layer={
                    h: np.asarray(r[f"anchoring_by_layer_{h}"], dtype=np.float64) for h in ("max", "mean")
                },
                attribute=np.asarray(r["anchor_type"]) != "",
                word_ids=wids,
                include=~forced,
            )
        )
    return out


def layer_choice(df, cfg, candidates: list[int], fixed: list[int]) -> dict:
    """Which key layers and head reduction this run uses, and why: `fixed` (`resolve_key_layers`: explicit
    `scoring.key_layers`, else the band rule) unless `layer_select: auto` finds better on a held-out share of
    the rows (`held_out_mask`; `fixed` again when those rows hold no visual-attribute mention). The table is
    measured on that share in every case; `held_out` (the rows stage 03 leaves out) is that share only when
    the data chose. Also the best single layer under mean over heads (`score_layer`: what DSTP and RVIS read,
    `prune.score_from: key_layers`)."""
    sc = cfg.scoring
    share = held_out_mask(df["id"], sc.select_share) if len(df) else np.zeros(0, dtype=bool)
    table = key_layer_table(selection_inputs(df, share, cfg.gate, sc.word_level), list(candidates))
    heads = ("max", "mean") if sc.head_reduce == "auto" else (sc.head_reduce,)
    best = choose_key_layers(table, heads)
    single = choose_key_layers([t for t in table if len(t["layers"]) == 1], ("mean",))
    band, fixed_head = f"band {sc.layer_band}", "max" if sc.head_reduce == "auto" else sc.head_reduce
    chose = False
    if sc.key_layers:
        rule, layers, head = "explicit (scoring.key_layers)", fixed, fixed_head
    elif sc.layer_select == "band":
        rule, layers, head = f"{band} (scoring.layer_select: band)", fixed, fixed_head
    elif best is None:
        why = (
            "no rationale was held out"
            if not share.any()
            else "the held-out rationales have no visual-attribute mention"
        )
        rule, layers, head = f"{band}: {why}", fixed, fixed_head
    else:
        rule, layers, head = (
            "auto: best within-rationale AUC on the held-out rationales",
            best["layers"],
            best["head_reduce"],
        )
        chose = True
    held = share if chose else np.zeros(len(df), dtype=bool)
    return {
        "rule": rule,
        "layers": list(layers),
        "head_reduce": head,
        "score_layer": single["layers"][0] if single else None,
        "n_held_out": int(held.sum()),
        "n_reported": int(len(df) - held.sum()),
        "n_measured": int(share.sum()),
        "select_share": sc.select_share,
        "held_out": held,
        "table": table,
    }


# ------------------------------------------------------------------------------------------ the stage
def score_rationales(
    loaded,
    cfg,
    records: list[dict[str, Any]],
    examples: list[dict[str, Any]],
    progress: bool = True,
    out_dir: str | Path | None = None,
    build_inputs: Callable | None = None,
    require_answer_line: bool = True,
    worker: tuple[int, int] = (0, 1),
):
    """Score every rationale (batched teacher-forced passes, `scoring.batch_size` per pass, progress bar).

    `records` are 01's rationale records (id, family, rationale, anchors, ...), `examples` the benchmark
    examples behind them, aligned (`vskip_core.common.artifacts.example_for`). Rationales that cannot be
    scored are skipped and counted in `df.attrs["skipped"]`: empty text, no final answer line, no image. With
    `require_answer_line=False` (smoke runs, `generation.keep: all`) a rationale without an answer line is
    scored anyway with `answer_start` = its length, and counted as `no_answer_line_kept`. With `out_dir`,
    rows are written in shards of `scoring.shard_size` under `out_dir/score_shards/` as they are done; a
    killed run resumes from the shards (`df.attrs["resumed"]` counts them); shards written under other params
    or another version of the scoring code are discarded.
    `worker=(i, n)` (several GPUs, `python -m vskip_core.stages.scoring --shard i/n`) scores only every n-th
    scorable rationale, writes its own shards beside the others' and returns its rows; a later call with the
    default `(0, 1)` reads every worker's shards back and scores only what is missing.
    `build_inputs(loaded, examples, texts, images, instruction, device) -> (inputs, spans)` builds one batch
    (default: `adapter_inputs`, through the family adapter).

    The key layers and head reduction are chosen once every row is scored (`layer_choice`: explicit, band,
    or from the held-out rows, flagged `held_out`), then the key-layer columns are computed
    (`apply_key_layers`). Returns a DataFrame with the columns of the data contract (`CONTRACT_COLUMNS`) plus
    `surprisal_word`, `anchoring_word` (token-aligned word values), `anchor_type` (per token), `held_out`,
    `key_layers`, `head_reduce`, `all_layers`, the per-layer values `anchoring[_<other query>|_blank]_by_layer_
    max/mean` (candidate layers x tokens; stage 03 ablates bands and head reductions from them), and
    `anchoring_predict` / `anchoring_self`, `anchoring_blank`, `anchoring_delta`, `surprisal_gain`. The choice
    and its table are in `df.attrs["layer_choice"]`.
    """
    import pandas as pd

    if len(records) != len(examples):
        raise ValueError(f"{len(records)} records but {len(examples)} examples; pass one example per record")
    if not (0 <= worker[0] < worker[1]):
        raise ValueError(f"worker {worker}: need (i, n) with 0 <= i < n")
    all_layers = candidate_layers(loaded.model)
    fixed = resolve_key_layers(loaded.model, cfg.scoring)  # explicit key layers checked before any work
    prepared, skipped = _prepare(loaded, records, examples, require_answer_line)
    ids = [p.rec["id"] for p in prepared]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate record ids; each rationale must have a unique id")
    shards = None
    if out_dir is not None:
        fingerprint = _fingerprint(cfg, loaded, require_answer_line)
        shards = ShardedWriter(Path(out_dir) / SHARD_DIR, fingerprint, "parquet", worker)
    done = _resume(shards, prepared)
    mine = [p for j, p in enumerate(prepared) if j % worker[1] == worker[0]]
    todo = [p for p in mine if p.rec["id"] not in done]

    def score(chunk: list[_Prepared]) -> list[dict]:
        return _score_chunk(loaded, cfg, chunk, all_layers, build_inputs or adapter_inputs)

    new_rows = _score_in_shards(todo, score, shards, cfg.scoring, len(mine), progress)
    by_id = {**done, **{r["id"]: r for r in new_rows}}
    df = pd.DataFrame([by_id[p.rec["id"]] for p in mine])
    choice = layer_choice(df, cfg, all_layers, fixed)
    df["held_out"] = choice.pop("held_out")
    df = apply_key_layers(df, choice["layers"], choice["head_reduce"], cfg.scoring) if len(df) else df
    df.attrs["skipped"] = skipped
    df.attrs["key_layers"] = choice["layers"]
    df.attrs["layer_choice"] = choice
    df.attrs["resumed"] = len(mine) - len(todo)  # rows read back from shards of an earlier run
    return df


def _score_in_shards(
    todo: list[_Prepared], score, shards: ShardedWriter | None, sc, total: int, progress: bool
):
    """Score `todo` shard by shard (each sorted by length for less padding, then batched), writing each
    shard as it is done (with `shards`). Returns the new rows in `todo`'s order."""

    bar = tqdm(total=total, initial=total - len(todo), desc="scoring", disable=not progress)
    new_rows: list[dict] = []
    with torch.no_grad():
        for s in range(0, len(todo), sc.shard_size):
            shard = todo[s : s + sc.shard_size]
            order = sorted(range(len(shard)), key=lambda j: len(shard[j].token_ids))
            rows: dict[int, dict] = {}
            for b in range(0, len(order), sc.batch_size):
                idx = order[b : b + sc.batch_size]
                rows.update(zip(idx, score([shard[j] for j in idx])))
                bar.update(len(idx))
            shard_rows = [rows[j] for j in range(len(shard))]
            if shards is not None:
                shards.write(shard_rows)
            new_rows += shard_rows
    bar.close()
    return new_rows


def _resume(shards: ShardedWriter | None, prepared: list[_Prepared]) -> dict[str, dict]:
    """Rows already written (by a killed run or by other workers), by id. Shards holding other text under
    one of these ids (stage 01 re-run under the same params) are discarded, all of them."""
    if shards is None:
        return {}
    done: dict[str, dict] = {}
    for r in shards.rows():
        done.setdefault(r["id"], r)
    text = {p.rec["id"]: p.rec["rationale"] for p in prepared}
    if any(i in text and r["text"] != text[i] for i, r in done.items()):
        shards.discard("written for other rationale text under the same ids (stage 01 re-run)")
        return {}
    return done


def _to_parquet_bytes(df) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def save_scores(stage_dir: str | Path, df) -> Path:
    """Write `scores.parquet` (atomic) into a stage folder."""

    missing = [c for c in CONTRACT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"scores frame lacks contract columns {missing}")
    path = Path(stage_dir) / SCORES_FILE
    atomic_write_bytes(path, _to_parquet_bytes(df))
    return path


# ------------------------------------------------------------------------------------------ analysis
TOKEN_CLASSES = ("colour", "shape", "size", "position", "text", "object", "other")  # object: real data


def nan_to_none(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def token_table(df):
    """One row per token of a scores frame: id, family, position, the scores, word values, anchor type and
    `token_class` (the anchor type, or `other`)."""
    import pandas as pd

    cols = ["surprisal", "anchoring", "surprisal_word", "anchoring_word", "anchor_type"]
    for c in ("surprisal_noimg", "anchoring_blank", "anchoring_delta", "surprisal_gain"):
        if _filled(df, c):
            cols.append(c)
    parts = []
    for r in df.itertuples(index=False):
        n = len(r.token_ids)
        d = {c: getattr(r, c) for c in cols}
        d.update(id=[r.id] * n, family=[r.family] * n, pos=list(range(n)))
        d["answer_line"] = [j >= r.answer_start for j in range(n)]
        parts.append(pd.DataFrame(d))
    t = pd.concat(parts, ignore_index=True)
    t["is_anchor"] = t["anchor_type"] != ""
    t["token_class"] = t["anchor_type"].where(t["is_anchor"], "other")
    return t


def anchor_detection_summary(tokens) -> dict[str, Any]:
    """Mean scores on anchor vs other tokens, and the AUC of each score for telling anchor tokens apart
    (overall, and per anchor type against all non-anchor tokens). None where a class is empty."""
    scores = ["anchoring", "surprisal", "anchoring_word", "surprisal_word", "surprisal_noimg", "anchoring_blank",
              "anchoring_delta", "surprisal_gain"]  # fmt: skip
    out: dict[str, Any] = {"n_tokens": int(len(tokens)), "n_anchor_tokens": int(tokens["is_anchor"].sum())}
    other = ~tokens.is_anchor
    for c in [c for c in scores if c in tokens]:
        by_type = {}
        for t in sorted(set(tokens.anchor_type) - {""}):
            sel = (tokens.anchor_type == t) | other
            by_type[t] = nan_to_none(auc(tokens.loc[sel, c], tokens.loc[sel, "is_anchor"]))
        out[c] = {
            "mean_anchor": nan_to_none(tokens.loc[tokens.is_anchor, c].mean()),
            "mean_other": nan_to_none(tokens.loc[other, c].mean()),
            "auc_anchor": nan_to_none(auc(tokens[c], tokens.is_anchor)),
            "auc_by_type": by_type,
        }
    return out


def layer_profile(df):
    """Per candidate layer and head reduction: the AUC of that single layer's anchoring for anchor tokens,
    and its mean on anchor / other tokens (needs the per-layer columns stage 02 writes); this run's key layers marked."""
    import pandas as pd

    if "anchoring_by_layer_max" not in df:
        raise KeyError(
            "no per-layer anchoring stored (scores written before stage 02 kept it); re-run stage 02"
        )
    is_anchor = np.concatenate([np.asarray(t) != "" for t in df.anchor_type])
    rows = []
    layers = list(df.all_layers.iloc[0])
    for h in ("max", "mean"):
        col = f"anchoring_by_layer_{h}"
        for k, layer in enumerate(layers):
            v = np.concatenate([np.asarray(x[k], dtype=np.float64) for x in df[col]])
            rows.append(
                {
                    "layer": layer,
                    "head_reduce": h,
                    "auc_anchor": auc(v, is_anchor),
                    "mean_anchor": float(v[is_anchor].mean()) if is_anchor.any() else float("nan"),
                    "mean_other": float(v[~is_anchor].mean()) if (~is_anchor).any() else float("nan"),
                    "key_layer": layer in list(df.key_layers.iloc[0]),
                }
            )
    return pd.DataFrame(rows)


def position_share(values, positions, max_position: int = 128) -> float:
    """Share of the variance of `values` explained by the token's position in its rationale (eta squared of
    the per-position means; positions from `max_position` on pooled)."""
    v = np.asarray(values, dtype=np.float64)
    pos = np.minimum(np.asarray(positions), max_position)
    total = ((v - v.mean()) ** 2).sum()
    if len(v) < 2 or total == 0:
        return float("nan")
    n = np.bincount(pos)
    means = np.bincount(pos, weights=v) / np.maximum(n, 1)
    return float((n * (means - v.mean()) ** 2).sum() / total)


def position_table(df, head_reduce: str):
    """Per candidate layer (heads reduced by `head_reduce`) and for the key layers: how much of the anchoring
    is explained by the token's position (`position_share`) and how well it marks visual-attribute tokens
    (AUC), on the real image, on a blank image (no content, same positions) and for their difference (the
    position-free variant); the surprisal gain from the image as one more row. Needs stage 02's blank-image
    pass (`scoring.blank_image`); without it only the real image's rows."""
    import pandas as pd

    pos = np.concatenate([np.arange(len(t)) for t in df.token_ids])
    label = np.concatenate([np.asarray(t) != "" for t in df.anchor_type])
    blank = _filled(df, "anchoring_blank")
    layers = list(df.all_layers.iloc[0])
    sets = {f"layer {i}": [i] for i in layers} | {
        f"key {list(df.key_layers.iloc[0])}": list(df.key_layers.iloc[0])
    }
    rows = []

    def add(layers_name, source, v):
        rows.append(
            {
                "layers": layers_name,
                "source": source,
                "position_share": position_share(v, pos),
                "auc_anchor": auc(v, label),
            }
        )

    recs = df.to_dict("records")
    for name, ls in sets.items():
        real = np.concatenate([anchoring_for_layers(r, ls, head_reduce) for r in recs])
        add(name, "image", real)
        if blank:
            off = np.concatenate(
                [anchoring_for_layers(r, ls, head_reduce, "anchoring_blank_by_layer") for r in recs]
            )
            add(name, "blank image", off)
            add(name, "image - blank", real - off)
    if _filled(df, "surprisal_gain"):
        add(
            "-",
            "surprisal gain (no image - image)",
            np.concatenate(df.surprisal_gain.map(np.asarray).tolist()),
        )
    return pd.DataFrame(rows)


def key_layer_frame(choice: dict):
    """The key-layer choice's table as a frame, best first, the chosen entry marked."""
    import pandas as pd

    t = pd.DataFrame(choice["table"])
    if t.empty:
        return t
    t["chosen"] = [
        ls == choice["layers"] and h == choice["head_reduce"] for ls, h in zip(t.layers, t.head_reduce)
    ]
    t["layers"] = t.layers.map(lambda ls: f"{ls[0]}" if len(ls) == 1 else f"{ls[0]}-{ls[-1]}")
    return t.sort_values("auc_within", ascending=False, ignore_index=True)


# ------------------------------------------------------------------------------------------ figures (02)
def _plt():

    return plt, sns


def _save_fig(fig, path):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def _palette():

    return {**ANCHOR_COLOURS, "other": "#9d9d9d"}


def plot_score_distributions(tokens, path=None):
    """Box plots of surprisal and anchoring per token class (each anchor type vs the rest)."""
    plt, sns = _plt()
    order = [c for c in TOKEN_CLASSES if c in set(tokens.token_class)]
    counts = tokens.token_class.value_counts()
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    for ax, col, title in [
        (axes[0], "anchoring", "visual anchoring (image attention mass)"),
        (axes[1], "surprisal", "surprisal (nats, image in context)"),
    ]:
        sns.boxplot(
            data=tokens,
            x="token_class",
            y=col,
            order=order,
            hue="token_class",
            palette=_palette(),
            ax=ax,
            showfliers=False,
            legend=False,
        )
        ax.set_xticks(range(len(order)), [f"{c}\n(n={counts[c]})" for c in order])
        ax.set_title(title)
        ax.set_xlabel("")
    fig.tight_layout()
    return _save_fig(fig, path)


def plot_surprisal_vs_anchoring(tokens, path=None, max_points: int = 20000, seed: int = 0):
    """Scatter of the two paths per token, anchor tokens coloured by type (a random subsample if large)."""
    plt, sns = _plt()
    t = tokens.sample(n=min(max_points, len(tokens)), random_state=seed)
    t = t.sort_values("is_anchor")  # anchors drawn on top
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sns.scatterplot(
        data=t,
        x="surprisal",
        y="anchoring",
        hue="token_class",
        palette=_palette(),
        hue_order=[c for c in TOKEN_CLASSES if c in set(t.token_class)],
        s=9,
        alpha=0.5,
        linewidth=0,
        ax=ax,
    )
    ax.set_xlabel("surprisal (nats)")
    ax.set_ylabel("visual anchoring")
    ax.set_title(f"two paths per token ({len(t)} of {len(tokens)} tokens)")
    ax.legend(title="", markerscale=2, fontsize=8)
    fig.tight_layout()
    return _save_fig(fig, path)


def plot_layer_profile(profile, path=None):
    """AUC for anchor tokens of each candidate layer alone, max vs mean over heads; key layers marked."""
    plt, sns = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    sns.barplot(data=profile, x="layer", y="auc_anchor", hue="head_reduce", ax=ax)
    layers = sorted(profile.layer.unique())
    key = set(profile.layer[profile.key_layer])
    ax.set_xticks(range(len(layers)), [f"{i}\n(key)" if i in key else str(i) for i in layers])
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_ylabel("AUC (anchor tokens)")
    ax.set_title("which layers' image attention marks visual-anchor tokens")
    fig.tight_layout()
    return _save_fig(fig, path)


def plot_key_layer_choice(choice: dict, path=None):
    """Within-rationale AUC of every contiguous key-layer set (rows: first layer, columns: last layer), one
    panel per head reduction; the chosen set outlined."""
    plt, _ = _plt()
    table = choice["table"]
    heads = sorted({t["head_reduce"] for t in table})
    layers = sorted({i for t in table for i in t["layers"]})
    if not table or not layers:
        return None
    fig, axes = plt.subplots(1, len(heads), figsize=(3.2 * len(heads) + 1, 2.9), squeeze=False)
    idx = {v: k for k, v in enumerate(layers)}
    for ax, h in zip(axes[0], heads):
        grid = np.full((len(layers), len(layers)), np.nan)
        for t in table:
            if t["head_reduce"] == h:
                grid[idx[t["layers"][0]], idx[t["layers"][-1]]] = t["auc_within"]
        im = ax.imshow(
            grid, vmin=0.5, vmax=max(0.51, np.nanmax(grid)) if np.isfinite(grid).any() else 1, cmap="viridis"
        )
        if h == choice["head_reduce"] and any(t["layers"] == choice["layers"] for t in table):
            r, c = idx[choice["layers"][0]], idx[choice["layers"][-1]]
            ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="red", lw=2))
        ticks = [str(i) for i in layers] if len(layers) <= 12 else None
        if ticks:
            ax.set_xticks(range(len(layers)), ticks)
            ax.set_yticks(range(len(layers)), ticks)
        ax.set_xlabel("last layer")
        ax.set_ylabel("first layer")
        ax.set_title(f"{h} over heads")
    fig.colorbar(im, ax=list(axes[0]), label="AUC within rationale")
    fig.suptitle(f"key layers measured on {choice['n_measured']} rationales (red: this run's)", fontsize=10)
    return _save_fig(fig, path)


def plot_position(table, path=None):
    """Per layer: the share of anchoring explained by position and its AUC for visual-attribute tokens, on
    the real image, a blank image and their difference."""
    plt, sns = _plt()
    t = table[table.layers != "-"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    for ax, col, title in [
        (axes[0], "position_share", "variance explained by position"),
        (axes[1], "auc_anchor", "AUC for visual-attribute tokens"),
    ]:
        sns.barplot(data=t, x="layers", y=col, hue="source", ax=ax)
        ax.set_title(title)
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", labelsize=8)
    axes[1].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[0].get_legend().remove()
    axes[1].legend(title="", fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    return _save_fig(fig, path)


def _ranks01(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    if len(v) < 2:
        return np.ones_like(v)
    return np.argsort(np.argsort(v, kind="mergesort"), kind="mergesort") / (len(v) - 1)


def token_heat_html(row, fields=(("surprisal", "255,127,14"), ("anchoring", "31,119,180"))) -> str:
    """One rationale rendered once per score, each token's background as dark as its rank within the
    rationale; anchor tokens underlined, values in the tooltip."""
    import html

    parts = [
        f"<div style='font-family:monospace;font-size:12px'><b>{html.escape(str(row['id']))}</b> "
        f"({html.escape(str(row['family']))})"
    ]
    for name, rgb in fields:
        vals = row[name]
        heat = _ranks01(vals)
        spans = []
        for j, (s, e) in enumerate(row["offsets"]):
            piece = html.escape(row["text"][s:e]).replace("\n", "&#9166;<br>")
            line = "border-bottom:2px solid black;" if row["anchor_type"][j] else ""
            spans.append(
                f"<span title='{name}={vals[j]:.3f} {row['anchor_type'][j]}' "
                f"style='background:rgba({rgb},{0.85 * heat[j]:.2f});{line}'>{piece}</span>"
            )
        parts.append(f"<div style='margin:4px 0'><i>{name}</i>: " + "".join(spans) + "</div>")
    return "".join(parts) + "</div>"


# ------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    """Stage 02 outside the notebook, for several GPUs: worker i of n scores every n-th kept rationale of
    stage 01 and writes its shards under results/<run>/02_dual_scoring/score_shards/ (one process per GPU,
    `CUDA_VISIBLE_DEVICES=i`). Then run the pipeline (or notebook 02): it reads every worker's shards back,
    scores only what is missing, and writes scores.parquet and the report."""

    ap = stage_parser("stages.scoring", main.__doc__, workers=True)
    a = ap.parse_args(argv)
    try:
        cfg = load_params(a.params, parse_sets(a.set))
        worker = parse_shard(a.shard)
    except (ParamsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = results_dir(cfg, a.run)
    gen_dir = run_dir / "01_rationale_generation"
    try:
        recs = kept_rationales(cfg, gen_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if cfg.model.teacher == "embedded":
        build_teacher(cfg)
    out = run_dir / "02_dual_scoring"
    df = score_rationales(
        load_model(cfg),
        cfg,
        recs,
        [example_for(cfg, r) for r in recs],
        out_dir=out,
        require_answer_line=cfg.generation.keep != "all",
        worker=worker,
    )
    print(f"worker {a.shard}: {len(df)} rationales scored ({df.attrs['resumed']} already in shards) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
