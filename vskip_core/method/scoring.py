"""Dual scoring of rationale tokens: linguistic surprisal and visual anchoring (V-Skip's two paths).

One teacher-forced pass over prompt + image + rationale gives, for every rationale token t:

- **surprisal** s_t = -log p(t | prefix, image) in nats, read from the logits of the position that predicts t;
  optionally also s_t with a blank image (`scoring.surprisal_without_image`, analysis only);
- **visual anchoring** a_t = the attention mass that the same predicting position puts on the image keys,
  averaged over the key layers and reduced over heads by max (`scoring.head_reduce: mean` for the mean).
  "Predicting position" (`scoring.query_position: predict`): the row whose output is the distribution of t,
  i.e. the attention the teacher paid to the image while it was *writing* t, as in decoding; both scores then
  come from the same row. `self` uses t's own row instead.

**Hooked capture, not `output_attentions`.** `output_attentions=True` materializes every layer's full
(heads x T x T) map (~40 GB for a 3B model) and forces eager attention. Here only the key layers' attention
modules are rerouted, for one forward, through `_capture_attention`, registered in transformers'
`AttentionInterface`: it runs the model's own attention implementation (eager or sdpa, whatever the model was
loaded with) to produce the layer output, and on the side recomputes the softmax rows of the rationale query
positions only, from the very query/key tensors the model attends with (after its rotary embedding and norms),
with the same scaling, the same mask (causal + padding; the cross-attention mask for Mllama) and the same GQA
head grouping, in chunks of rows, keeping only the image-key columns (or only their sum). The recomputation
runs in float32 whatever the model dtype (fp16 q . k of Qwen2-family activations overflows on a T4). Every
other layer, and the rest of the model, runs untouched. `naive_anchor_maps` is the `output_attentions=True` reference the
tests compare against (equal to 1e-5, batched and padded too); `benchmarks/bench_scoring.py` measures both.

**Key layers.** `scoring.key_layers` (explicit indices) or, when empty, every candidate layer whose centre
depth (i + 0.5) / n_layers lies in `scoring.layer_band` (default [0.25, 0.75]: the middle half of the
decoder). Why the middle: in the first layers attention to image tokens is broad and largely positional
(FastV measures that the image receives a large, unspecific share of attention only in the first two layers);
analyses of information flow in LLaVA-style models (Zhang et al. 2025, "Cross-modal information flow in
multimodal LLMs"; Kaduri et al. 2024, "What's in the image?") find that object- and attribute-specific image
information reaches the text positions in the middle layers, while the last layers mostly shape the next-token
distribution and attend to image tokens little. The middle band is where "this token looks at the image"
means "this token takes content from the image". The band maps onto any depth: layers 1-2 of the 4-layer
embedded teacher, 7-20 of a 28-layer Qwen2-VL-7B, and for Mllama the cross-attention layers 13, 18, 23, 28 of
40 (the only layers where text attends to the image). Notebook 02 reports the per-layer AUC for detecting
anchor tokens on the embedded teacher, so the choice can be checked there; `scoring.store_all_layers` keeps
every candidate layer's mass (max and mean over heads) in `scores.parquet`, so stage 03 can ablate the band
and the head reduction without re-scoring (`anchoring_for_layers`).

**Word-level aggregation** (`word_ids`, `aggregate_words`). Words are whitespace-delimited, as LLMLingua-2
maps its subword probabilities onto words; a whitespace-only token (a newline) belongs to the next word. The
word's value, shared by its tokens:
- surprisal: the **sum** over its tokens (`scoring.word_surprisal`). By the chain rule this is exactly the
  word's surprisal -log p(word | context), the quantity Selective-Context scores; a mean would rate `$4.57`
  (five tokens, digits split) as cheap because `$` and `.` are predictable, though the price is the content.
- anchoring: the **max** over its tokens (`scoring.word_anchoring`). Attention mass is not additive
  information; a word is visually anchored if any of its tokens was written while looking at the image (the
  digits of a price, not its `$`). The mean would dilute exactly those tokens.
Both are configurable (sum, mean, max); `scores.parquet` keeps the raw token values and the word values.

**Model families** (`ANCHOR_FAMILIES`, keyed by `model.config.model_type`): the only family-specific parts
are which attention modules can be key layers and which key columns are image tokens.
- `qwen2_vl`, `qwen2_5_vl`: image tokens inside the sequence; key layers = decoder self-attention layers;
  image keys = positions of the image-pad token.
- `mllama`: the image enters through cross-attention layers; key layers must be among
  `config.text_config.cross_attention_layers`; image keys = the vision tokens of each image, without each
  tile's CLS token and without tiles outside the image's aspect ratio (`aspect_ratio_mask`). (Text rows before
  the image token attend uniformly and are masked out by the model; rationale rows always follow the image.)
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

CAPTURE_IMPLEMENTATION = "vskip_capture"
SCORES_FILE = "scores.parquet"
SHARD_DIR = "score_shards"
WORD_AGGREGATIONS = ("sum", "mean", "max")
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


# ------------------------------------------------------------------------------------------ model families
@dataclass(frozen=True)
class AnchorFamily:
    """What the hooked capture needs to know about one model family."""

    name: str
    # model -> {decoder layer index: attention module whose softmax rows are the anchoring}; every candidate
    attention_modules: Callable[[Any], dict[int, torch.nn.Module]]
    # (model, model inputs) -> (key_index (B, K) long, key_valid (B, K) bool): image-key columns per row
    image_keys: Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def _language_layers(model) -> torch.nn.ModuleList:
    inner = getattr(model, "model", model)
    lm = getattr(inner, "language_model", None)
    if lm is None or not hasattr(lm, "layers"):
        raise TypeError(
            f"{type(model).__name__}: no language_model.layers found; is this a vision-language model?"
        )
    return lm.layers


def _qwen_attention_modules(model) -> dict[int, torch.nn.Module]:
    return {i: layer.self_attn for i, layer in enumerate(_language_layers(model))}


def _pad_columns(cols: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    K = max(len(c) for c in cols)
    index = torch.zeros((len(cols), K), dtype=torch.long, device=device)
    valid = torch.zeros((len(cols), K), dtype=torch.bool, device=device)
    for b, c in enumerate(cols):
        index[b, : len(c)] = c
        valid[b, : len(c)] = True
    return index, valid


def _qwen_image_keys(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    image_token = model.config.image_token_id
    ids = inputs["input_ids"]
    cols = [torch.nonzero(row == image_token).flatten() for row in ids]
    for b, c in enumerate(cols):
        if len(c) == 0:
            raise ValueError(
                f"row {b} of the batch has no image tokens (token id {image_token}); visual anchoring "
                f"needs the image in the sequence: build inputs with vskip_core.modeling.loading.encode (it expands "
                f"the image pad)"
            )
    return _pad_columns(cols, ids.device)


def _mllama_attention_modules(model) -> dict[int, torch.nn.Module]:
    layers = _language_layers(model)
    cross = model.config.text_config.cross_attention_layers
    return {i: layers[i].cross_attn for i in cross}


def _mllama_image_keys(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Vision-token columns of the cross-attention keys: per real image (aspect_ratio_id > 0; batch padding
    images have id 0), per tile inside its aspect ratio, the patch tokens (index 1.. of the tile block;
    index 0 is the tile's CLS token, dropped)."""
    if inputs.get("pixel_values") is None or inputs.get("aspect_ratio_mask") is None:
        raise ValueError(
            "Mllama inputs without pixel_values / aspect_ratio_mask: visual anchoring needs the image; "
            "build inputs with the Mllama processor (it returns both)"
        )
    arm = inputs["aspect_ratio_mask"].bool()  # (B, n_images, max_tiles)
    if inputs.get("aspect_ratio_ids") is not None:
        arm = arm & (inputs["aspect_ratio_ids"] > 0)[:, :, None]
    n_patches = model.model.vision_model.num_patches  # 1 CLS + patches per tile
    B, n_images, max_tiles = arm.shape
    cols = []
    for b in range(B):
        c = [
            (i * max_tiles + t) * n_patches + torch.arange(1, n_patches, device=arm.device)
            for i in range(n_images)
            for t in range(max_tiles)
            if arm[b, i, t]
        ]
        if not c:
            raise ValueError(f"row {b}: no valid image tile (aspect_ratio_mask is all zero); pass the image")
        cols.append(torch.cat(c))
    return _pad_columns(cols, arm.device)


ANCHOR_FAMILIES: dict[str, AnchorFamily] = {
    "qwen2_vl": AnchorFamily("qwen2_vl", _qwen_attention_modules, _qwen_image_keys),
    "qwen2_5_vl": AnchorFamily("qwen2_5_vl", _qwen_attention_modules, _qwen_image_keys),
    "mllama": AnchorFamily("mllama", _mllama_attention_modules, _mllama_image_keys),
}


def anchor_family(model) -> AnchorFamily:
    kind = model.config.model_type
    if kind not in ANCHOR_FAMILIES:
        raise NotImplementedError(
            f"visual anchoring has no adapter for model_type {kind!r}; supported: {sorted(ANCHOR_FAMILIES)} "
            f"(add an AnchorFamily to vskip_core.method.scoring.ANCHOR_FAMILIES)"
        )
    return ANCHOR_FAMILIES[kind]


def candidate_layers(model) -> list[int]:
    """Decoder layers that can serve as key layers (all for Qwen, the cross-attention layers for Mllama)."""
    return sorted(anchor_family(model).attention_modules(model))


def n_decoder_layers(model) -> int:
    return len(_language_layers(model))


def resolve_key_layers(model, scoring) -> list[int]:
    """`scoring.key_layers` if given (checked), else the candidates whose centre depth (i + 0.5) / n_layers
    lies inside `scoring.layer_band`; if none does, the candidate nearest the band's centre."""
    cands = candidate_layers(model)
    if scoring.key_layers:
        bad = [i for i in scoring.key_layers if i not in cands]
        if bad:
            raise ValueError(
                f"scoring.key_layers {bad} are not attention layers that see the image for "
                f"{model.config.model_type}; valid: {cands}"
            )
        return sorted(set(scoring.key_layers))
    n = n_decoder_layers(model)
    lo, hi = scoring.layer_band
    inside = [i for i in cands if lo <= (i + 0.5) / n <= hi]
    if inside:
        return inside
    centre = (lo + hi) / 2
    return [min(cands, key=lambda i: (abs((i + 0.5) / n - centre), i))]


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
        # they are not computed at all (half the work on average); cross-attention sees every key
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
            if mask is None and is_causal:  # sdpa's causal fast path: no padding, plain causal
                lo = int(qi.min()) + Tk - T + 1  # every key before this is visible to every row of the chunk
                if lo < n:
                    later = (
                        torch.arange(lo, n, device=query.device)[None, None, :] > (qi + Tk - T)[:, :, None]
                    )
                    logits[..., lo:n].masked_fill_(later[:, None], float("-inf"))
            elif mask is None:  # no mask on a non-causal module: every key is visible
                pass
            elif mask.dtype == torch.bool:
                logits.masked_fill_(~_rows(mask, qi)[..., :n], float("-inf"))
            else:  # additive: 0 or the mask dtype's min, which float32 logits can outgrow (fp16 min is -65504)
                m = _rows(mask, qi)[..., :n]
                logits.add_(m).masked_fill_(m <= torch.finfo(mask.dtype).min, torch.finfo(torch.float32).min)
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
    modules = anchor_family(model).attention_modules(model)
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
    `predict`: the row that predicts token j (start + j - 1); `self`: the token's own row."""
    if mode not in ("predict", "self"):
        raise ValueError(f"query mode must be predict or self, got {mode!r}")
    R = max(n for _, n in spans)
    shift = -1 if mode == "predict" else 0
    index = torch.zeros((len(spans), R), dtype=torch.long)
    valid = torch.zeros((len(spans), R), dtype=torch.bool)
    for b, (start, n) in enumerate(spans):
        if start + shift < 0:
            raise ValueError(
                f"row {b}: the rationale starts at position {start}; it needs a prompt before it"
            )
        index[b, :n] = torch.arange(start + shift, start + shift + n)
        index[b, n:] = start + shift
        valid[b, :n] = True
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

    def anchoring(self, layers: list[int], head_reduce: str = "max") -> list[np.ndarray]:
        a = reduce_anchoring(self.mass, layers, head_reduce).cpu().numpy()
        return [a[b, : int(v.sum())] for b, v in enumerate(self.query_valid.cpu())]


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
        ki, kv = anchor_family(model).image_keys(model, inputs)
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
    return PassScores(surprisal=surprisal, mass=mass, query_valid=qv)


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
    from vskip_core.metrics import ANSWER_RE

    matches = list(ANSWER_RE.finditer(text))
    if not matches:
        return None
    pos = matches[-1].start()
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


# ------------------------------------------------------------------------------------------ the stage
def _qwen_build_inputs(loaded, examples, texts, images, instruction: str, device):
    """Default input builder (Qwen2-VL / Qwen2.5-VL, `vskip_core.modeling.loading.encode`): returns the model inputs of
    one left-padded batch and each row's rationale span (start, n)."""
    from vskip_core.modeling.loading import collate, encode, model_inputs

    tok = loaded.tokenizer
    items = [
        encode(ex, tok, loaded.processor, target=t, instruction=instruction, image=img)
        for ex, t, img in zip(examples, texts, images)
    ]
    batch = collate(items, tok.pad_token_id, padding_side="left")
    spans = []
    for it, off in zip(items, batch["offsets"].tolist()):
        n = len(it["input_ids"]) - it["target_start"] - 1  # the target ends with <|im_end|>, not scored
        spans.append((off + it["target_start"], n))
    return model_inputs(batch, device), spans


def blank_image(ex: dict[str, Any]):
    """The grounding control: the same background with no objects (a grey image of the same size for
    examples without a scene)."""
    from PIL import Image

    from vskip_core.data.embedded import render_scene

    if ex.get("scene"):
        return render_scene(ex["scene"], blank=True)
    return Image.new("RGB", ex["image"].size, (128, 128, 128))


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


def _fingerprint(cfg, loaded, require_answer_line: bool) -> str:
    import hashlib

    parts = [cfg.hash("scoring", "model", "data", "embedded", "generation"), str(loaded.path)]
    parts += [str(require_answer_line), hashlib.sha256(Path(__file__).read_bytes()).hexdigest()]  # this code
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _score_chunk(loaded, cfg, chunk: list[_Prepared], key_layers, all_layers, build_inputs) -> list[dict]:
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
    capture = sorted(set(all_layers) | set(key_layers))
    ps = teacher_forced_scores(loaded.model, inputs, spans, capture, sc.query_position)
    anchoring = ps.anchoring(key_layers, sc.head_reduce)
    by_layer = {h: [ps.anchoring([i], h) for i in all_layers] for h in ("max", "mean")} if all_layers else {}
    noimg = [None] * len(chunk)
    if sc.surprisal_without_image:
        blank = [blank_image(ex) for ex in exs]
        inputs0, spans0 = build_inputs(loaded, exs, texts, blank, cfg.generation.instruction, device)
        noimg = [s.tolist() for s in teacher_forced_scores(loaded.model, inputs0, spans0, None).surprisal]
    rows = []
    for b, p in enumerate(chunk):
        wids = word_ids(p.rec["rationale"], p.offsets)
        row = {
            "id": p.rec["id"],
            "family": p.rec.get("family", p.ex.get("family")),
            "text": p.rec["rationale"],
            "token_ids": p.token_ids,
            "offsets": p.offsets,
            "surprisal": ps.surprisal[b].astype(float).tolist(),
            "anchoring": anchoring[b].astype(float).tolist(),
            "surprisal_noimg": noimg[b],
            "word_ids": wids,
            "answer_start": p.answer_start,
            "surprisal_word": aggregate_words(ps.surprisal[b], wids, sc.word_surprisal).tolist(),
            "anchoring_word": aggregate_words(anchoring[b], wids, sc.word_anchoring).tolist(),
            "anchor_type": token_anchor_types(p.offsets, p.rec.get("anchors", [])),
            "key_layers": list(key_layers),
            "split": p.rec.get("split"),
            "index": p.rec.get("index"),
            "generated_ids_match": p.rec.get("token_ids") is None or p.rec["token_ids"] == p.token_ids,
        }
        if all_layers:
            row["all_layers"] = list(all_layers)
            for h in ("max", "mean"):
                row[f"anchoring_by_layer_{h}"] = [
                    by_layer[h][k][b].astype(float).tolist() for k in range(len(all_layers))
                ]
        rows.append(row)
    return rows


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
    examples behind them, aligned (`vskip_core.stages.generation.example_for`). Rationales that cannot be scored are
    skipped and counted in `df.attrs["skipped"]`: empty text, no final answer line, no image. With
    `require_answer_line=False` (smoke runs, `generation.keep: all`) a rationale without an answer line is
    scored anyway with `answer_start` = its length, and counted as `no_answer_line_kept`. With `out_dir`,
    rows are written in shards of `scoring.shard_size` under `out_dir/score_shards/` as they are done; a
    killed run resumes from the shards (no rationale lost or duplicated; `df.attrs["resumed"]` counts them);
    shards written under other params or another version of this module are discarded.
    `worker=(i, n)` (several GPUs, `python -m vskip_core.stages.scoring --shard i/n`) scores only every n-th scorable
    rationale, writes its own shards beside the others' and returns its rows; a later call with the default
    `(0, 1)` reads every worker's shards back and scores only what is missing.
    `build_inputs(loaded, examples, texts, images, instruction, device) -> (inputs, spans)`
    builds one batch (default: Qwen2-VL / Qwen2.5-VL through `vskip_core.modeling.loading.encode`).

    Returns a DataFrame with the columns of the data contract (`CONTRACT_COLUMNS`) plus `surprisal_word`,
    `anchoring_word` (token-aligned word values), `anchor_type` (per token), `key_layers`, and, with
    `scoring.store_all_layers`, `all_layers` and `anchoring_by_layer_max/mean` (candidate layers x tokens).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from vskip_core.runtime import atomic_write_bytes

    if len(records) != len(examples):
        raise ValueError(f"{len(records)} records but {len(examples)} examples; pass one example per record")
    sc = cfg.scoring
    model = loaded.model
    build_inputs = build_inputs or _builder_for(model)
    key_layers = resolve_key_layers(model, sc)
    all_layers = candidate_layers(model) if sc.store_all_layers else []
    prepared, skipped = _prepare(loaded, records, examples, require_answer_line)
    ids = [p.rec["id"] for p in prepared]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate record ids; each rationale must have a unique id")

    shard_dir = Path(out_dir) / SHARD_DIR if out_dir is not None else None
    done, n_shards = {}, 0
    if shard_dir is not None:
        done, n_shards = _resume(shard_dir, _fingerprint(cfg, loaded, require_answer_line), prepared)
    if not (0 <= worker[0] < worker[1]):
        raise ValueError(f"worker {worker}: need (i, n) with 0 <= i < n")
    mine = [p for j, p in enumerate(prepared) if j % worker[1] == worker[0]]
    todo = [p for p in mine if p.rec["id"] not in done]
    tag = "" if worker == (0, 1) else f"w{worker[0]}of{worker[1]}-"
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="scoring", disable=not progress)
    new_rows: list[dict] = []
    with torch.no_grad():
        for s in range(0, len(todo), sc.shard_size):
            shard = todo[s : s + sc.shard_size]
            order = sorted(range(len(shard)), key=lambda j: len(shard[j].token_ids))  # less padding
            rows: dict[int, dict] = {}
            for b in range(0, len(order), sc.batch_size):
                idx = order[b : b + sc.batch_size]
                for j, row in zip(
                    idx,
                    _score_chunk(loaded, cfg, [shard[j] for j in idx], key_layers, all_layers, build_inputs),
                ):
                    rows[j] = row
                bar.update(len(idx))
            shard_rows = [rows[j] for j in range(len(shard))]
            if shard_dir is not None:
                buf = _to_parquet_bytes(pd.DataFrame(shard_rows))
                while (shard_dir / f"shard-{tag}{n_shards:05d}.parquet").exists():
                    n_shards += 1
                atomic_write_bytes(shard_dir / f"shard-{tag}{n_shards:05d}.parquet", buf)
                n_shards += 1
            new_rows += shard_rows
    bar.close()
    by_id = {**done, **{r["id"]: r for r in new_rows}}
    df = pd.DataFrame([by_id[p.rec["id"]] for p in mine])
    df.attrs["skipped"] = skipped
    df.attrs["key_layers"] = key_layers
    df.attrs["resumed"] = len(mine) - len(todo)  # rows read back from shards of an earlier run
    return df


def _resume(shard_dir: Path, fingerprint: str, prepared: list[_Prepared]) -> tuple[dict[str, dict], int]:
    """Rows already written by an earlier (killed) run, by id, and the number of shards. Shards written under
    other params (manifest fingerprint) or for other text under the same id are discarded, all of them."""
    import pandas as pd

    from vskip_core.runtime import atomic_write_json

    manifest = shard_dir / "manifest.json"
    shards = sorted(shard_dir.glob("shard-*.parquet"))
    done: dict[str, dict] = {}
    stale = manifest.exists() and json.loads(manifest.read_text()).get("fingerprint") != fingerprint
    if not stale:
        text = {p.rec["id"]: p.rec["rationale"] for p in prepared}
        for f in shards:
            for r in pd.read_parquet(f).to_dict("records"):
                done.setdefault(r["id"], {k: _to_list(v) for k, v in r.items()})
        stale = any(i in text and r["text"] != text[i] for i, r in done.items())
    if stale:
        for f in shards:
            f.unlink()
        done, shards = {}, []
    if not manifest.exists() or stale:
        atomic_write_json(manifest, {"fingerprint": fingerprint})
    return done, len(shards)


def _adapter_build_inputs(loaded, examples, texts, images, instruction: str, device):
    """Input builder through the family adapter (`vskip_core.modeling.adapters`: encode / collate / model_inputs),
    for families other than Qwen (Mllama): the target is followed by one end token, as in `models.encode`."""
    from vskip_core.modeling.adapters import adapter_for

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


def _builder_for(model) -> Callable:
    kind = model.config.model_type
    if kind in ("qwen2_vl", "qwen2_5_vl"):
        return _qwen_build_inputs
    try:
        from vskip_core.modeling.adapters import adapter_for

        adapter_for(model)
    except (ImportError, ValueError) as e:
        raise NotImplementedError(
            f"score_rationales has no input builder for {kind!r} ({e}); pass build_inputs= (see its "
            f"docstring)"
        ) from None
    return _adapter_build_inputs


def _to_parquet_bytes(df) -> bytes:
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def save_scores(stage_dir: str | Path, df) -> Path:
    """Write `scores.parquet` (atomic) into a stage folder."""
    from vskip_core.runtime import atomic_write_bytes

    missing = [c for c in CONTRACT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"scores frame lacks contract columns {missing}")
    path = Path(stage_dir) / SCORES_FILE
    atomic_write_bytes(path, _to_parquet_bytes(df))
    return path


def load_scores(stage_dir: str | Path):
    """Read `scores.parquet` of stage 02 back as a DataFrame; list columns come back as Python lists."""
    import pandas as pd

    path = Path(stage_dir) / SCORES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run stage 02_dual_scoring first")
    df = pd.read_parquet(path)
    for c in df.columns:
        if len(df) and isinstance(df[c].iloc[0], np.ndarray):
            df[c] = df[c].map(_to_list)
    return df


def _to_list(v):
    if isinstance(v, np.ndarray):
        return [_to_list(x) for x in v] if v.dtype == object else v.tolist()
    return v


def anchoring_for_layers(row, layers: list[int], head_reduce: str = "max") -> np.ndarray:
    """Anchoring of one scores row recomputed for another key-layer set / head reduction (needs the row's
    `anchoring_by_layer_*`, written when `scoring.store_all_layers`)."""
    col = f"anchoring_by_layer_{head_reduce}"
    if col not in row or row[col] is None:
        raise KeyError(f"{col} not stored; re-run stage 02 with scoring.store_all_layers: true")
    avail = list(row["all_layers"])
    bad = [i for i in layers if i not in avail]
    if bad:
        raise ValueError(f"layers {bad} not stored; available: {avail}")
    return np.mean([np.asarray(row[col][avail.index(i)], dtype=np.float64) for i in layers], axis=0)


# ------------------------------------------------------------------------------------------ notebook 00
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
    from vskip_core.data.real import find_anchors_for

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
        rows = [enc["target_start"] + token_index_for_anchor(offsets, text, a) - 1 for a in wanted]
        qi = torch.tensor([rows], device=device)
        ki = key_index.to(device)
        with capture_image_attention(
            model, layers, qi, torch.ones_like(qi, dtype=torch.bool), ki, torch.ones_like(ki, dtype=torch.bool),
            keep_columns=True,
        ) as cap:  # fmt: skip
            model(**ad.model_inputs(batch, device))
        w = torch.stack([cap.maps[layer][0].float() for layer in layers]).mean(0).amax(0)  # (R, K)
        image = ad.messages(ex)[1][0]
        for a, j, row in zip(wanted, rows, w):
            piece = text[offsets[j - enc["target_start"] + 1][0] : offsets[j - enc["target_start"] + 1][1]]
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


# ------------------------------------------------------------------------------------------ analysis
TOKEN_CLASSES = ("colour", "shape", "size", "position", "text", "other")


def auc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged); nan if one class is empty."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]  # average rank of each tie group
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def nan_to_none(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def token_table(df):
    """One row per token of a scores frame: id, family, position, the scores, word values, anchor type and
    `token_class` (the anchor type, or `other`)."""
    import pandas as pd

    cols = ["surprisal", "anchoring", "surprisal_word", "anchoring_word", "anchor_type"]
    if df["surprisal_noimg"].notna().any():
        cols.append("surprisal_noimg")
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
    scores = ["anchoring", "surprisal", "anchoring_word", "surprisal_word", "surprisal_noimg"]
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
    and its mean on anchor / other tokens (needs `scoring.store_all_layers`). Checks the key-layer band."""
    import pandas as pd

    if "anchoring_by_layer_max" not in df:
        raise KeyError("no per-layer anchoring stored; run stage 02 with scoring.store_all_layers: true")
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


# ------------------------------------------------------------------------------------------ figures (02)
def _plt():
    from vskip_core.plots import (  # the project's matplotlib set-up (non-interactive backend outside notebooks)
        plt,
        sns,
    )

    return plt, sns


def _save_fig(fig, path):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def _palette():
    from vskip_core.plots import ANCHOR_COLOURS

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
