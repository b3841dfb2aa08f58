"""Dual scoring of rationale tokens: linguistic surprisal and visual anchoring (V-Skip's two paths).

One teacher-forced pass over prompt + image + rationale gives, for every rationale token t:

- **surprisal** s_t = -log p(t | prefix, image) in nats, from the logits of the position that predicts t;
- **visual anchoring** a_t = the attention mass that the same predicting position puts on the image keys,
  averaged over the key layers and reduced over heads by max or mean (the paper's is max; with
  `scoring.head_reduce: auto` the reduction is chosen with the layers, see Key layers).
  `scoring.query_position: predict` reads the row whose output is the distribution of t (the attention paid
  to the image while *writing* t); `self` reads t's own row.

**Hooked capture, not `output_attentions`.** `output_attentions=True` materializes every layer's full
(heads x T x T) map and forces eager attention. Here only the key layers' attention modules are rerouted, for
one forward, through `_capture_attention` (registered in transformers' `AttentionInterface`): it runs the
model's own implementation (eager or sdpa) for the output and, on the side, recomputes in float32 the softmax
rows of the rationale query positions from the very query/key tensors the model attends with (same scaling,
mask and GQA grouping), keeping only the image-key columns or their sum. `naive_anchor_maps` is the
`output_attentions=True` reference the tests compare against.

**Key layers.** `scoring.key_layers` if given; otherwise (`scoring.layer_select: auto`) they are chosen from data
on held-out rationales (`held_out_mask`, a fixed `scoring.select_share` by id hash): among every contiguous
run of candidate layers and both head reductions, the one whose anchoring best separates visual-attribute
words from the rest inside each rationale (`key_layer_table`, `choose_key_layers`). This works on any model
depth: early layers attend to the image broadly and by position (FastV), and where content is read off the
image differs between models. `layer_select: band` keeps the fixed rule: candidates whose centre depth
(i + 0.5) / n_layers lies in `scoring.layer_band`; it is also the fallback when the held-out rationales have
no visual-attribute mention.

**Words** (`word_ids`, `aggregate_words`): whitespace-delimited words, as LLMLingua-2 maps subwords onto
words. Surprisal is summed over a word's tokens (the chain rule gives -log p(word | context)); anchoring is
maxed (a word is anchored if any of its tokens was written looking at the image).

**Model families** come from `vskip_core.modeling.adapters`: which attention modules can be key layers
(`Adapter.image_layers`, `Adapter.attention_module`) and which key columns are image tokens
(`Adapter.image_keys`: image-pad positions for Qwen2-VL / Qwen2.5-VL; for Mllama the patch tokens of each real
tile of the cross-attention keys, CLS tokens excluded).
"""

from __future__ import annotations

import contextlib
import copy
import re
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vskip_core.data.answers import answer_line_start
from vskip_core.data.embedded import render_scene
from vskip_core.data.real import find_anchors_for
from vskip_core.metrics import auc
from vskip_core.modeling.adapters import adapter_for, example_images
from vskip_core.runtime import is_missing

CAPTURE_IMPLEMENTATION = "vskip_capture"
WORD_AGGREGATIONS = ("sum", "mean", "max")


# ------------------------------------------------------------------------------------------ model families
QUERY_MODES = ("predict", "self", "both")


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """{decoder layer index: attention module whose softmax rows are the anchoring}, for every candidate."""
    ad = adapter_for(model)
    return {i: ad.attention_module(model, i) for i in ad.image_layers(model)}


def candidate_layers(model) -> list[int]:
    """Decoder layers that can serve as key layers (all for Qwen, the cross-attention layers for Mllama)."""
    return adapter_for(model).image_layers(model)


def n_decoder_layers(model) -> int:
    return adapter_for(model).num_layers(model)


def image_key_columns(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The image-key columns of each row of a batch, padded: (key_index (B, K) long, key_valid (B, K) bool)."""
    try:
        mask = adapter_for(model).image_keys(model, inputs).key_mask
    except KeyError as e:
        raise ValueError(
            f"no image tokens found: the inputs lack {e}; visual anchoring needs the image: build inputs with "
            "the family adapter (vskip_core.modeling.adapters: encode, collate, model_inputs)"
        ) from None
    cols = [torch.nonzero(row).flatten() for row in mask]
    for b, c in enumerate(cols):
        if len(c) == 0:
            raise ValueError(f"row {b} of the batch has no image tokens; visual anchoring needs the image")
    K = max(len(c) for c in cols)
    index = torch.zeros((len(cols), K), dtype=torch.long, device=mask.device)
    valid = torch.zeros((len(cols), K), dtype=torch.bool, device=mask.device)
    for b, c in enumerate(cols):
        index[b, : len(c)] = c
        valid[b, : len(c)] = True
    return index, valid


def resolve_key_layers(model, scoring) -> list[int]:
    """`scoring.key_layers` if given (checked against the candidates), else the `scoring.layer_band` rule
    (`Adapter.key_layers`): the key layers before, or instead of, stage 02's choice from data."""
    return adapter_for(model).key_layers(model, scoring)


# ------------------------------------------------------------------------------------------ hooked capture
def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, X, T, D), index (B, C) -> t[b, :, index[b]] as (B, X, C, D)."""
    return t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))


@dataclass
class _Capture:
    """The state of one hooked forward: which rows and columns to keep, and what was kept per layer."""

    query_index: torch.Tensor  # (B, R) positions of the query rows (any valid position where padded)
    query_valid: torch.Tensor  # (B, R) bool
    key_index: torch.Tensor  # (B, K) image-key columns
    key_valid: torch.Tensor  # (B, K) bool
    base: str  # the model's own attention implementation (eager, sdpa, ...)
    keep_columns: bool = False  # keep (B, H, R, K) maps, not just their sum over K
    chunk: int = 128  # query rows per recomputation chunk (bounds the (B, H, chunk, T) buffer)
    mass: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, H, R) image mass
    maps: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, H, R, K), if keep_columns

    def base_function(self, module) -> Callable:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if self.base == "eager":
            fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            if fn is None:
                raise NotImplementedError(
                    f"{type(module).__name__}: no eager_attention_forward in its module"
                )
            return fn
        return ALL_ATTENTION_FUNCTIONS[self.base]

    @torch.no_grad()
    def record(
        self, layer: int, module, query: torch.Tensor, key: torch.Tensor, mask, scaling: float
    ) -> None:
        B, H, T, d = query.shape
        Hkv, Tk = key.shape[1], key.shape[2]
        G = H // Hkv  # GQA: query head h reads key head h // G (transformers' repeat_kv order)
        # float32 throughout: in fp16 (a T4) q . k of Qwen2-family activations exceeds 65504 and the recomputed
        # rows turn inf / nan, while the model's own sdpa kernel (fp32 accumulation, scaled inputs) is fine
        keys_t = key.float().transpose(2, 3)  # (B, Hkv, d, Tk); the G query heads of a key head form one GEMM
        # causal self-attention without a cache: keys after a chunk's last query row are masked anyway, so
        # they are not computed at all; cross-attention sees every key
        is_causal = bool(getattr(module, "is_causal", False))  # self-attention; cross-attention is not
        causal = is_causal and Tk == T
        if mask is not None and mask.shape[0] != B:  # a mask shared by the batch
            mask = mask.expand(B, *mask.shape[1:])
        masses, maps = [], []
        for s in range(0, self.query_index.shape[1], self.chunk):
            qi = self.query_index[:, s : s + self.chunk]
            C = qi.shape[1]
            n = int(qi.max()) + 1 if causal else Tk
            q = _rows(query, qi).float().reshape(B, Hkv, G * C, d)
            logits = torch.matmul(q, keys_t[..., :n]).view(B, H, C, n).mul_(scaling)
            _mask_logits(logits, mask, qi, is_causal, T, Tk)
            p = torch.softmax(logits, dim=-1, dtype=torch.float32)  # float32, as the eager path
            inside = self.key_valid & (self.key_index < n)  # image keys after every row: no mass
            cols = self.key_index.clamp(max=n - 1)[:, None, None, :].expand(B, H, C, -1)
            img = p.gather(-1, cols) * inside[:, None, None, :]
            masses.append(img.sum(-1))
            if self.keep_columns:
                maps.append(img)
        valid = self.query_valid[:, None, :]
        self.mass[layer] = torch.cat(masses, dim=2) * valid
        if self.keep_columns:
            self.maps[layer] = torch.cat(maps, dim=2) * valid[..., None]


def _mask_logits(logits: torch.Tensor, mask, qi: torch.Tensor, is_causal: bool, T: int, Tk: int) -> None:
    """Mask one chunk's (B, H, C, n) logits in place as the model's attention masks them."""
    n = logits.shape[-1]
    if mask is None and is_causal:  # sdpa's causal fast path: no padding, plain causal
        lo = int(qi.min()) + Tk - T + 1  # every key before this is visible to every row of the chunk
        if lo < n:
            later = torch.arange(lo, n, device=logits.device)[None, None, :] > (qi + Tk - T)[:, :, None]
            logits[..., lo:n].masked_fill_(later[:, None], float("-inf"))
    elif mask is None:  # no mask on a non-causal module: every key is visible
        return
    elif mask.dtype == torch.bool:
        logits.masked_fill_(~_rows(mask, qi)[..., :n], float("-inf"))
    else:  # additive: 0 or the mask dtype's min, which float32 logits can outgrow (fp16 min is -65504)
        m = _rows(mask, qi)[..., :n]
        logits.add_(m).masked_fill_(m <= torch.finfo(mask.dtype).min, torch.finfo(torch.float32).min)


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Registered as the `vskip_capture` attention implementation; only the key layers' modules see it.
    Runs the model's own implementation for the output, and records the image-key softmax rows."""
    cap: _Capture = module._vskip_capture
    if scaling is None:
        scaling = module.scaling
    out = cap.base_function(module)(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )
    cap.record(module.layer_idx, module, query, key, attention_mask, scaling)
    return out


def _register_capture() -> None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if CAPTURE_IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention)


@contextlib.contextmanager
def capture_image_attention(
    model,
    layers: list[int],
    query_index: torch.Tensor,
    query_valid: torch.Tensor,
    key_index: torch.Tensor,
    key_valid: torch.Tensor,
    keep_columns: bool = False,
    chunk: int = 128,
) -> Iterator[_Capture]:
    """Within the block, one forward of `model` records, for each layer in `layers`, the softmax mass of the
    query rows on the image keys (`cap.mass[layer]`: (B, H, R); with `keep_columns`, `cap.maps[layer]`:
    (B, H, R, K)). Only those layers' attention modules are rerouted (a shallow copy of their config names
    the capture implementation); everything is restored on exit."""
    _register_capture()
    modules = attention_modules(model)
    missing = [i for i in layers if i not in modules]
    if missing:
        raise ValueError(f"layers {missing} cannot be captured; candidates: {sorted(modules)}")
    base = modules[layers[0]].config._attn_implementation or "eager"
    cap = _Capture(query_index, query_valid, key_index, key_valid, base, keep_columns, chunk)
    saved = {}
    try:
        for i in layers:
            m = modules[i]
            saved[i] = m.config
            conf = copy.copy(m.config)
            conf._attn_implementation_internal = CAPTURE_IMPLEMENTATION
            m.config = conf
            m._vskip_capture = cap
        yield cap
    finally:
        for i, conf in saved.items():
            modules[i].config = conf
            del modules[i]._vskip_capture


def query_rows(
    spans: list[tuple[int, int]], mode: str = "predict", device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rationale spans [(start, n)] in the padded batch -> (query_index (B, R), query_valid (B, R)).
    `predict`: the row that predicts token j (start + j - 1); `self`: the token's own row; `both`: the n + 1
    rows start - 1 .. start + n - 1, from which `PassScores.anchoring` takes either reading."""
    if mode not in QUERY_MODES:
        raise ValueError(f"query mode must be one of {QUERY_MODES}, got {mode!r}")
    extra = 1 if mode == "both" else 0
    R = max(n for _, n in spans) + extra
    shift = 0 if mode == "self" else -1
    index = torch.zeros((len(spans), R), dtype=torch.long)
    valid = torch.zeros((len(spans), R), dtype=torch.bool)
    for b, (start, n) in enumerate(spans):
        if start + shift < 0:
            raise ValueError(
                f"row {b}: the rationale starts at position {start}; it needs a prompt before it"
            )
        index[b, : n + extra] = torch.arange(start + shift, start + shift + n + extra)
        index[b, n + extra :] = start + shift
        valid[b, : n + extra] = True
    return index.to(device), valid.to(device)


def reduce_anchoring(
    mass: dict[int, torch.Tensor], layers: list[int], head_reduce: str = "max"
) -> torch.Tensor:
    """Per-layer (B, H, R) image mass -> (B, R): reduce heads (max or mean), then mean over `layers`."""
    if head_reduce not in ("max", "mean"):
        raise ValueError(f"head_reduce must be max or mean, got {head_reduce!r}")
    per_layer = [mass[i].amax(1) if head_reduce == "max" else mass[i].mean(1) for i in layers]
    return torch.stack(per_layer).mean(0)


@torch.no_grad()
def naive_anchor_maps(
    model,
    inputs: dict[str, torch.Tensor],
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    key_valid: torch.Tensor,
    layers: list[int],
) -> dict[int, torch.Tensor]:
    """Reference path: one forward with `output_attentions=True` (eager, all layers, full maps), then the same
    rows and image columns. Returns layer -> (B, H, R, K). Memory: every layer's (B, H, T, T) at once."""
    out = model(**inputs, output_attentions=True)
    if not out.attentions:
        raise RuntimeError("the model returned no attention maps; load it with attn_implementation='eager'")
    if len(out.attentions) != n_decoder_layers(model):
        raise RuntimeError(
            f"{len(out.attentions)} attention maps for {n_decoder_layers(model)} decoder layers"
        )
    res = {}
    for i in layers:
        a = _rows(out.attentions[i].float(), query_index)  # (B, H, R, Tk)
        B, H, R, _ = a.shape
        res[i] = a.gather(-1, key_index[:, None, None, :].expand(B, H, R, -1)) * key_valid[:, None, None, :]
    return res


# ------------------------------------------------------------------------------------------ one scoring pass
@dataclass
class PassScores:
    """Token scores of one padded batch; lists are per row, each of that row's rationale length."""

    surprisal: list[np.ndarray]
    mass: dict[int, torch.Tensor]  # layer -> (B, H, R) image mass of the captured layers
    query_valid: torch.Tensor  # (B, R)
    query_mode: str = "predict"  # the rows captured (`query_rows`); `both` holds either reading

    def anchoring(
        self, layers: list[int], head_reduce: str = "max", mode: str | None = None
    ) -> list[np.ndarray]:
        """Per row, each rationale token's anchoring read from its `mode` row (default: the captured one)."""
        mode = mode or self.query_mode
        if mode != self.query_mode and self.query_mode != "both":
            raise ValueError(f"rows were captured for {self.query_mode!r}; {mode!r} needs query_mode='both'")
        a = reduce_anchoring(self.mass, layers, head_reduce).cpu().numpy()
        n = [int(v.sum()) for v in self.query_valid.cpu()]
        if self.query_mode != "both":
            return [a[b, : n[b]] for b in range(len(n))]
        first = 1 if mode == "self" else 0  # `both` starts at the predicting row of the first token
        return [a[b, first : first + n[b] - 1] for b in range(len(n))]


@torch.no_grad()
def teacher_forced_scores(
    model,
    inputs: dict[str, torch.Tensor],
    spans: list[tuple[int, int]],
    layers: list[int] | None,
    query_mode: str = "predict",
    chunk: int = 128,
) -> PassScores:
    """One forward: surprisal of every rationale token (nats) and, if `layers`, the image mass of their query
    rows in those layers. `spans[b] = (start, n)`: the rationale occupies positions start..start+n-1 of row b
    of the padded `inputs` (left or right padding). Logits are computed only from the first predicting row
    on."""
    ids = inputs["input_ids"]
    T = ids.shape[1]
    for b, (start, n) in enumerate(spans):
        if n <= 0 or start < 1 or start + n > T:
            raise ValueError(
                f"row {b}: rationale span (start={start}, n={n}) is empty or outside the {T} positions"
            )
    first = min(start for start, _ in spans) - 1
    keep = T - first
    qi, qv = query_rows(spans, query_mode, ids.device)
    if layers:
        ki, kv = image_key_columns(model, inputs)
        with capture_image_attention(model, layers, qi, qv, ki, kv, chunk=chunk) as cap:
            logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
        mass = cap.mass
    else:
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
        mass = {}
    surprisal = []
    for b, (start, n) in enumerate(spans):
        rows = logits[b, start - 1 - first : start - 1 - first + n].float()
        target = ids[b, start : start + n]
        nll = -torch.log_softmax(rows, dim=-1).gather(-1, target[:, None])[:, 0]
        surprisal.append(nll.cpu().numpy())
    return PassScores(surprisal=surprisal, mass=mass, query_valid=qv, query_mode=query_mode)


# ------------------------------------------------------------------------------------------ words and tokens
def word_ids(text: str, offsets: list[tuple[int, int]] | list[list[int]]) -> list[int]:
    """Word index (whitespace-delimited words, 0-based) of each token, from its character offsets. A token
    belongs to the word of its first non-space character; a whitespace-only token to the next word (the
    last word if none follows)."""
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    ends = [e for _, e in words]
    out = []
    for s, e in offsets:
        piece = text[s:e]
        lead = len(piece) - len(piece.lstrip())
        pos = s + lead if piece.strip() else e  # whitespace-only: the word after it
        w = int(np.searchsorted(ends, pos, side="right"))
        out.append(min(w, max(len(words) - 1, 0)))
    return out


def aggregate_words(values, wids: list[int], how: str) -> np.ndarray:
    """Token values -> token-aligned word values: each token gets its word's sum, mean or max."""
    if how not in WORD_AGGREGATIONS:
        raise ValueError(f"word aggregation must be one of {WORD_AGGREGATIONS}, got {how!r}")
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(wids, dtype=np.int64)
    if len(v) != len(w):
        raise ValueError(f"{len(v)} values but {len(w)} word ids")
    if len(v) == 0:
        return v
    n = int(w.max()) + 1
    if how == "max":
        agg = np.full(n, -np.inf)
        np.maximum.at(agg, w, v)
    else:
        agg = np.bincount(w, weights=v, minlength=n)
        if how == "mean":
            agg = agg / np.maximum(np.bincount(w, minlength=n), 1)
    return agg[w]


def answer_token_start(text: str, offsets) -> int | None:
    """Index of the first token of the final answer statement (the last `Answer:` / `answer is`), or None."""
    pos = answer_line_start(text)
    if pos is None:
        return None
    for j, (_, e) in enumerate(offsets):
        if e > pos:
            return j
    return None


def token_anchor_types(offsets, anchors: list[dict[str, Any]]) -> list[str]:
    """Per token: the type of the anchor span it overlaps (colour, shape, size, position, text) or ''."""
    out = [""] * len(offsets)
    for a in anchors or []:
        for j, (s, e) in enumerate(offsets):
            if s < a["end"] and e > a["start"]:
                out[j] = a["type"]
    return out


# ------------------------------------------------------------------------------------------ stored scores
def blank_image(ex: dict[str, Any]):
    """The grounding control: the same background with no objects; for examples without a scene, a grey image
    of each image's size (a list when the example has several), so the image takes the same positions."""
    from PIL import Image

    if ex.get("scene"):
        return render_scene(ex["scene"], blank=True)
    grey = [Image.new("RGB", im.size, (128, 128, 128)) for im in example_images(ex)]
    return grey[0] if len(grey) == 1 else grey


def anchoring_for_layers(
    row, layers: list[int], head_reduce: str = "max", prefix: str = "anchoring_by_layer"
) -> np.ndarray:
    """Anchoring of one scores row recomputed for another key-layer set / head reduction from stage 02's
    per-layer values: `prefix` anchoring_by_layer (the configured query row), anchoring_blank_by_layer (the
    blank image) or anchoring_<other query>_by_layer."""
    col = f"{prefix}_{head_reduce}"
    if col not in row or is_missing(row[col]):
        raise KeyError(
            f"{col} not stored (scores from an older stage 02, or scoring.blank_image off); re-run stage 02"
        )
    avail = list(row["all_layers"])
    bad = [i for i in layers if i not in avail]
    if bad:
        raise ValueError(f"layers {bad} not stored; available: {avail}")
    return np.mean([np.asarray(row[col][avail.index(i)], dtype=np.float64) for i in layers], axis=0)


# ------------------------------------------------------------------------------------------ key-layer choice
def held_out_mask(ids, share: float) -> np.ndarray:
    """Which rationales are held out to choose the key layers: a fixed `share` of them by a hash of the id,
    the same on every rerun and in any order. Stage 03 reports its tables on the others."""
    return np.array([zlib.crc32(str(i).encode()) % 10_000 < share * 10_000 for i in ids], dtype=bool)


def layer_windows(candidates: list[int]) -> list[list[int]]:
    """Every contiguous run of the candidate layers (in their order): the key-layer sets the choice tries."""
    c = list(candidates)
    return [c[a:b] for a in range(len(c)) for b in range(a + 1, len(c) + 1)]


@dataclass
class SelectionRow:
    """One held-out rationale as the key-layer choice reads it."""

    by_layer: dict[str, np.ndarray]  # head reduction -> (candidate layers, tokens) anchoring
    attribute: np.ndarray  # (tokens,) bool: the token is part of a visual-attribute mention
    word_ids: np.ndarray | None  # word index per token (the gate's units), or None (tokens are units)
    include: np.ndarray  # (tokens,) bool: tokens the gate decides on (the forced answer line left out)


def _unit_max(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Token values (..., tokens) -> unit values (..., units): the max over each unit's contiguous tokens."""
    return np.maximum.reduceat(values, starts, axis=-1)


def key_layer_table(rows: list[SelectionRow], candidates: list[int]) -> list[dict[str, Any]]:
    """For every contiguous key-layer set (`layer_windows`) and head reduction: how well its anchoring, at the
    gate's units (a word's value = the max of its tokens), separates visual-attribute units from the rest.
    `auc_within`: the AUC inside each rationale, averaged over the rationales that have both kinds (the gate's
    thresholds are per rationale by default); `auc_pooled`: one AUC over every unit of every rationale."""
    windows = layer_windows(candidates)
    heads = sorted({h for r in rows for h in r.by_layer})
    prepared = []  # per rationale: unit starts, unit labels, cumulative per-layer sums by head
    for r in rows:
        keep = np.flatnonzero(r.include)
        if not len(keep):
            continue
        units = np.arange(len(keep)) if r.word_ids is None else np.asarray(r.word_ids)[keep]
        starts = np.flatnonzero(np.r_[True, np.diff(units) != 0])
        labels = _unit_max(r.attribute[keep].astype(np.int8), starts).astype(bool)
        cum = {
            h: np.vstack([np.zeros((1, len(keep))), np.cumsum(r.by_layer[h][:, keep], axis=0)]) for h in heads
        }
        prepared.append((starts, labels, cum))
    out = []
    for h in heads:
        for w in windows:
            a, b = candidates.index(w[0]), candidates.index(w[-1]) + 1
            values = [_unit_max((cum[h][b] - cum[h][a]) / (b - a), starts) for starts, _, cum in prepared]
            labels = [y for _, y, _ in prepared]
            within = [auc(v, y) for v, y in zip(values, labels) if y.any() and not y.all()]
            pooled = auc(np.concatenate(values), np.concatenate(labels)) if prepared else float("nan")
            out.append(
                {
                    "layers": list(w),
                    "head_reduce": h,
                    "auc_within": float(np.mean(within)) if within else float("nan"),
                    "auc_pooled": pooled,
                    "n_rationales": len(within),
                }
            )
    return out


def choose_key_layers(table: list[dict[str, Any]], heads: tuple[str, ...] = ("max", "mean")) -> dict | None:
    """The entry of `key_layer_table` with the highest `auc_within` among `heads`; ties go to max over heads
    (the paper's), then fewer layers, then earlier ones. None if no entry could be measured."""
    ok = [t for t in table if t["head_reduce"] in heads and t["auc_within"] == t["auc_within"]]
    if not ok:
        return None
    return max(
        ok, key=lambda t: (t["auc_within"], t["head_reduce"] == "max", -len(t["layers"]), -t["layers"][0])
    )


# ------------------------------------------------------------------------------------------ reference path and heat maps (notebook 00)
@torch.no_grad()
def naive_image_attention(
    model, inputs: dict[str, torch.Tensor], image_positions: torch.Tensor, query_positions: torch.Tensor
) -> torch.Tensor:
    """Reference path: one forward with `output_attentions=True` (eager attention, every layer, full maps).
    Returns (layers, heads, n_query, n_image) attention weights of one example (batch of 1)."""
    out = model(**inputs, output_attentions=True)
    if not out.attentions:
        raise RuntimeError("the model returned no attention maps; load it with attn_implementation='eager'")
    att = torch.stack([a[0] for a in out.attentions])  # (L, H, T, T)
    return att[:, :, query_positions][:, :, :, image_positions].float()


def token_index_for_anchor(offsets: list[tuple[int, int]], text: str, anchor: dict) -> int:
    """Index of the first target token overlapping an anchor span (for prices: its first digit)."""
    for j, (s, e) in enumerate(offsets):
        if (
            s < anchor["end"]
            and e > anchor["start"]
            and (anchor["type"] != "text" or text[s:e].strip().isdigit())
        ):
            return j
    raise ValueError(f"no token overlaps anchor {anchor}")


def anchor_attention_maps(
    loaded,
    examples: list[dict],
    texts: list[str] | None = None,
    types=("colour", "text"),
    per_example: int = 2,
    limit: int = 8,
) -> list[dict]:
    """For anchor tokens not given away by the question, in the gold rationale or in `texts` (e.g. the
    teacher's own rationales, anchors found by `benchmarks.find_anchors_for`): attention from the position that
    predicts the token onto the first image's tokens, teacher-forced through the hooked capture (works under
    sdpa), mean over the layers that reach the image, max over heads, as a heat grid (Llama-3.2-Vision: the
    first tile's patches)."""

    ad, tok, model = loaded.adapter, loaded.tokenizer, loaded.model
    layers = ad.image_layers(model)
    device = next(model.parameters()).device
    items: list[dict] = []
    for i, ex in enumerate(examples):
        text = ex["rationale"] if texts is None else texts[i]
        anchors = ex["anchors"] if texts is None else find_anchors_for(text, ex)
        wanted = [a for a in anchors if a["type"] in types and not a.get("in_question")][:per_example]
        if not text or not wanted:
            continue
        enc = ad.encode(ex, tok, loaded.processor, target=text)
        batch = ad.collate([enc], tok.pad_token_id, padding_side="right")
        keys = ad.image_keys(model, batch)
        if keys.kind == "cross":  # the first tile's patches (CLS excluded)
            key_index = torch.arange(1, keys.tokens_per_tile)[None]
            side = int(round((keys.tokens_per_tile - 1) ** 0.5))
            grid = (side, side)
        else:  # the first image's merged tokens
            g = enc["image_grid_thw"][0]
            grid = (int(g[1]) // 2, int(g[2]) // 2)
            key_index = torch.nonzero(keys.key_mask[0]).T[:, : grid[0] * grid[1]]
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        tokens = [token_index_for_anchor(offsets, text, a) for a in wanted]
        rows = [enc["target_start"] + j - 1 for j in tokens]  # the row that predicts token j
        qi = torch.tensor([rows], device=device)
        ki = key_index.to(device)
        with capture_image_attention(
            model, layers, qi, torch.ones_like(qi, dtype=torch.bool), ki, torch.ones_like(ki, dtype=torch.bool),
            keep_columns=True,
        ) as cap:  # fmt: skip
            model(**ad.model_inputs(batch, device))
        w = torch.stack([cap.maps[layer][0].float() for layer in layers]).mean(0).amax(0)  # (R, K)
        image = ad.messages(ex)[1][0]
        for a, j, row in zip(wanted, tokens, w):
            piece = text[offsets[j][0] : offsets[j][1]]
            items.append(
                {
                    "image": image,
                    "grid": grid,
                    "weights": row.cpu().numpy(),
                    "title": f"{a['type']} token '{piece.strip()}' of '{a['value']}'",
                }
            )
        if len(items) >= limit:
            break
    return items[:limit]
