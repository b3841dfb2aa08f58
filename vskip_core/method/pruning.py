"""Visual-token pruning for Qwen2-VL-class models: FastV, DivPrune, prompt-aware relevance + diversity
(ZSPAPrune, arXiv 2510.17197), the DSTP decoding-stage add-on (arXiv 2604.12358), and the RVIS measurement.

One interface: `PruneSpec(method, retention, dstp=..., variant=...)` says which visual tokens stay;
`pruned_generate(model, inputs, spec, ...)` runs greedy decoding with it on the inputs of
`vskip_core.modeling.loading.encode/collate`; `generate_pruned(loaded, examples, spec, ...)` does the encoding too.

Budget
    k = max(1, round(retention * n_visual)) visual tokens (Python `round`), retention in (0, 1]; n_visual counts
    every image token of the example (several images share one budget).

Rules (each a pure function below, tested on hand-built features)
- FastV (`fastv_select`): layers 0..K-1 see every visual token. After layer K-1 has run, rank the visual
  tokens by the attention they receive from the last prompt token at layer K-1 (mean over heads); layers
  K.. see only the top k. K = `prune.fastv_layer` (clamped to n_layers - 1, with a warning).
- DivPrune (`divprune_select`): before the language model, on the projected visual features (the merger
  output, i.e. the LM input embeddings of the image tokens): cosine distance d = 1 - cos; first pick the
  token whose nearest other token is farthest; then repeatedly add the token whose minimum distance to the
  chosen set is largest (greedy max-min). Every layer sees only the chosen k.
- Prompt-aware (`prompt_aware_select`, method "zspaprune"): relevance of visual token v = cos(f_v, p),
  p = mean of the LM input embeddings of the user's text tokens (between `<|vision_end|>` and the next
  `<|im_end|>`). Core = the round(`prune.core_fraction` * k) most relevant tokens; the remaining budget is
  filled by greedy max-min cosine diversity against everything chosen so far (core included). Before the
  language model; every layer sees only the chosen k.
- DSTP (`dstp_update`, add-on to any method; the paper gives no code, this is the rule implemented):
  let l = `prune.score_layer` (-1: K - 1, the FastV ranking layer). At decoding step t = 1, 2, ... (step t
  feeds generated token t), before layer l runs, compute the current token's attention at layer l over the
  FULL visual KV cache (every visual token's key, plus the text and generated keys and its own key in the
  softmax; mean over heads) and take its top k, T_t. With S the set in use and
  J = |T_t ∩ S| / |T_t ∪ S|: if t % `prune.dstp_interval` == 0 or J < `prune.dstp_shift_threshold`,
  then S <- T_t. The new S is used from layer l of step t on (layers below l already ran with the old S)
  and by every pruned layer of the following steps. The budget k never changes. Which layers are pruned is
  the base method's (FastV: K.., the others: all).
  Cost: swapping a token back in needs its keys/values at every pruned layer, so with DSTP the prefill
  runs every visual token through every layer (non-selected visual keys masked for all queries, which is
  what the base method computes) and the full visual KV cache is kept: DSTP saves decode time, not prefill.

Variants (say which one a measurement used)
- "drop": the sequence and the KV cache really shorten: pre-LM methods remove the dropped image tokens
  from the input; FastV removes them from the hidden states entering layer K; decoding attends to a cache
  holding only the kept visual entries (with DSTP: the prefill is the full-length masked one, and a swap
  copies the swapped-in tokens' keys/values from the full visual cache into the evicted tokens' slots).
- "mask": full-length sequence and cache; dropped visual keys are masked (additive -inf-like bias) at the
  pruned layers. Numerically the same as "drop" (up to float summation order), no time saved.
Positions are never renumbered: 3D rotary position ids come once from the model's own `get_rope_index`
on the full sequence and each kept token carries its original ids; decoded tokens continue at
max position + 1 exactly as `generate` does. With retention 1.0, every method (and +dstp), in both variants,
reproduces `model.generate`'s greedy output exactly (tested on random Qwen2-VL / Qwen2.5-VL models with left
padding, and on the embedded teacher). Attention weights for ranking are computed here from the layer's
own projections, so the language model may run eager or sdpa.

RVIS (`rvis_overlaps`, `rvis_summary`): decode unpruned and record, at layer l, the attention of the last
prompt token (prefill) and of each decoding token over the visual tokens (mean over heads); RVIS at step t =
Jaccard(top-k at prefill, top-k at step t), k = the budget of each retention; summarised by family and by
simple (attribute, existence) vs reasoning (multistep, reading).

Llama-3.2-Vision (Mllama) is not supported: its image enters through cross-attention layers as a separate
key/value set with no positions in the text sequence, so "drop the visual tokens from the sequence and the
later layers" (FastV) and position-preserving swaps (DSTP) have no counterpart; pruning there means
shrinking the cross-attention states, which only the few cross-attention layers read.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

METHODS = ("none", "fastv", "divprune", "zspaprune")
PRE_LM_METHODS = ("divprune", "zspaprune")
VARIANTS = ("drop", "mask")
SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
SIMPLE_FAMILIES = ("attribute", "existence")
REASONING_FAMILIES = ("multistep", "reading")


# ------------------------------------------------------------------------------------------------ budget
def check_retention(retention: Any) -> float:
    """Validate a retention ratio: a real number in (0, 1]. Returns it as float."""
    if isinstance(retention, bool) or not isinstance(retention, int | float):
        raise ValueError(
            f"retention must be a number in (0, 1] (fraction of visual tokens kept), got {retention!r}"
        )
    r = float(retention)
    if not math.isfinite(r) or not 0 < r <= 1:
        raise ValueError(
            f"retention must be in (0, 1] (fraction of visual tokens kept), got {retention!r}; "
            f"use e.g. 0.333 to keep a third, 1.0 to keep all"
        )
    return r


def kept_count(retention: float, n_visual: int) -> int:
    """The budget: max(1, round(retention * n_visual)) visual tokens."""
    r = check_retention(retention)
    if n_visual < 1:
        raise ValueError(f"n_visual must be >= 1, got {n_visual}")
    return max(1, min(n_visual, round(r * n_visual)))


# ------------------------------------------------------------------------------------------ selection rules
def _top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores (ties: lower index first), returned sorted ascending."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def fastv_select(attention: torch.Tensor, k: int) -> torch.Tensor:
    """FastV: `attention` (heads, n_visual) or (n_visual,) received from the last prompt token at layer K-1;
    mean over heads, keep the top k. Returns sorted indices into the visual tokens."""
    scores = attention.float().mean(0) if attention.dim() == 2 else attention.float()
    return _top_indices(scores, k)


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    x = F.normalize(features.float(), dim=-1)
    return 1.0 - x @ x.T


def max_min_diversity(
    features: torch.Tensor, k: int, selected: torch.Tensor | list[int] | None = None
) -> torch.Tensor:
    """Greedy max-min cosine diversity (DivPrune's rule). Starting from `selected` (or, when empty, from
    the token whose nearest other token is farthest), repeatedly add the token whose minimum cosine
    distance to the chosen set is largest (ties: lower index). Returns k sorted indices."""
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    dist = cosine_distances(features)
    chosen = [int(i) for i in (selected.tolist() if torch.is_tensor(selected) else (selected or []))]
    if not chosen:
        d = dist.clone()
        d.fill_diagonal_(float("inf"))
        chosen = [int(torch.argmax(d.min(1).values))]
    mind = dist[chosen].min(0).values
    mind[chosen] = float("-inf")
    while len(chosen) < k:
        j = int(torch.argmax(mind))
        chosen.append(j)
        mind = torch.minimum(mind, dist[j])
        mind[chosen] = float("-inf")
    return torch.sort(torch.tensor(chosen[:k], dtype=torch.long)).values


def divprune_select(features: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune: the k most diverse projected visual features (greedy max-min cosine distance)."""
    return max_min_diversity(features, k)


def prompt_relevance(features: torch.Tensor, prompt_embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine of each visual feature (n, d) to the mean-pooled prompt embedding ((m, d) or (d,))."""
    p = prompt_embeddings.float()
    p = p.mean(0) if p.dim() == 2 else p
    return F.cosine_similarity(features.float(), p[None, :], dim=-1)


def prompt_aware_select(
    features: torch.Tensor, prompt_embeddings: torch.Tensor, k: int, core_fraction: float
) -> torch.Tensor:
    """Prompt-aware relevance + diversity: a core of round(core_fraction * k) tokens by relevance to the
    prompt, the rest by greedy max-min cosine diversity against the chosen set. Returns k sorted indices."""
    if not 0 <= core_fraction <= 1:
        raise ValueError(f"core_fraction must be in [0, 1], got {core_fraction}")
    n_core = min(k, round(core_fraction * k))
    core = _top_indices(prompt_relevance(features, prompt_embeddings), n_core) if n_core else None
    if n_core == k:
        return core
    return max_min_diversity(features, k, selected=core)


def jaccard(a: torch.Tensor | list[int], b: torch.Tensor | list[int]) -> float:
    sa = set(a.tolist() if torch.is_tensor(a) else a)
    sb = set(b.tolist() if torch.is_tensor(b) else b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def dstp_update(
    relevance: torch.Tensor, active: torch.Tensor, step: int, interval: int, threshold: float
) -> tuple[torch.Tensor, bool, float]:
    """DSTP's rule for one row: top-k of the current token's relevance over all visual tokens; re-select
    (set in use <- that top-k) when `step % interval == 0` or its Jaccard overlap with the set in use is
    below `threshold`. Returns (set in use, re-selected?, overlap)."""
    top = _top_indices(relevance, len(active))
    overlap = jaccard(top, active)
    if step % interval == 0 or overlap < threshold:
        return top, True, overlap
    return active, False, overlap


# --------------------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class PruneSpec:
    """Which visual tokens stay: the method, the retention, DSTP on/off, and how it is executed."""

    method: str = "none"  # none | fastv | divprune | zspaprune
    retention: float = 1.0  # fraction of visual tokens kept, in (0, 1]
    dstp: bool = False  # re-select the visual tokens in use during decoding
    variant: str = "drop"  # drop (shorter sequence and cache: real savings) or mask (full length, masked)
    fastv_layer: int = 2  # FastV's K: layers < K see every visual token
    score_layer: int = -1  # layer whose attention ranks visual tokens for DSTP/RVIS; -1 = K - 1
    core_fraction: float = 0.6  # prompt-aware: share of the budget chosen by relevance
    dstp_interval: int = 8  # DSTP: re-select every this many decoding steps
    dstp_shift_threshold: float = 0.5  # DSTP: re-select when the top-k Jaccard overlap falls below this
    repetition_penalty: float = (
        1.0  # the decoding's (generation.repetition_penalty), applied as generate() does
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown pruning method {self.method!r}; valid: {list(METHODS)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; valid: {list(VARIANTS)}")
        object.__setattr__(self, "retention", check_retention(self.retention))
        if self.fastv_layer < 1:
            raise ValueError(f"fastv_layer must be >= 1 (layer K-1 ranks the tokens), got {self.fastv_layer}")
        if self.dstp_interval < 1:
            raise ValueError(f"dstp_interval must be >= 1, got {self.dstp_interval}")
        if not 0 <= self.core_fraction <= 1:
            raise ValueError(f"core_fraction must be in [0, 1], got {self.core_fraction}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def name(self) -> str:
        return self.method + ("+dstp" if self.dstp else "")

    @classmethod
    def from_config(
        cls, cfg, method: str, retention: float = 1.0, dstp: bool = False, variant: str | None = None
    ) -> PruneSpec:
        """A spec with the knobs of `cfg.prune` (variant: `prune.variant` unless given) and the decoding's
        `generation.repetition_penalty`."""
        p = cfg.prune
        return cls(
            method=method,
            retention=retention,
            dstp=dstp,
            variant=variant or p.variant,
            fastv_layer=p.fastv_layer,
            score_layer=p.score_layer,
            core_fraction=p.core_fraction,
            dstp_interval=p.dstp_interval,
            dstp_shift_threshold=p.dstp_shift_threshold,
            repetition_penalty=cfg.generation.repetition_penalty,
        )


def resolve_layers(spec: PruneSpec, n_layers: int) -> tuple[int, int]:
    """(effective FastV K, effective score layer) for a model with `n_layers` decoder layers."""
    if n_layers < 2 and spec.method == "fastv":
        raise ValueError("FastV needs at least 2 decoder layers (one to rank, one to prune)")
    k = spec.fastv_layer
    if k > n_layers - 1:
        if spec.method == "fastv":
            warnings.warn(
                f"prune.fastv_layer={k} but the model has {n_layers} decoder layers; using K={n_layers - 1}",
                stacklevel=3,
            )
        k = max(1, n_layers - 1)
    s = spec.score_layer if spec.score_layer >= 0 else k - 1
    if not 0 <= s < n_layers:
        raise ValueError(f"prune.score_layer={spec.score_layer} is outside 0..{n_layers - 1}")
    return k, s


# ------------------------------------------------------------------------------------------------- engine
class _Cache:
    """Per-layer key/value buffers with room for the decoded tokens. `update` is what the model's attention
    calls; `valid[l]` (batch, capacity) says which slots may be attended (padding and masked tokens not)."""

    def __init__(self, n_layers: int, extra: int) -> None:
        self.extra = extra
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.valid: list[torch.Tensor | None] = [None] * n_layers
        self.n = [0] * n_layers
        self.prompt_len = [0] * n_layers  # slots holding prompt tokens (then the generated ones)
        self.prompt_pos: list[torch.Tensor | None] = [None] * n_layers  # (B, prompt_len) original positions

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        q = key.shape[2]
        if self.k[layer_idx] is None:
            B, H, _, D = key.shape
            cap = q + self.extra
            self.k[layer_idx] = key.new_zeros(B, H, cap, D)
            self.v[layer_idx] = value.new_zeros(B, H, cap, D)
        n = self.n[layer_idx]
        self.k[layer_idx][:, :, n : n + q] = key
        self.v[layer_idx][:, :, n : n + q] = value
        self.n[layer_idx] = n + q
        return self.k[layer_idx][:, :, : n + q], self.v[layer_idx][:, :, : n + q]

    def set_layout(self, layer: int, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, pos) -> None:
        """Replace layer `layer` by a prompt part (B, H, P, D) with room for `extra` decoded tokens."""
        B, H, P, D = k.shape
        self.k[layer] = k.new_zeros(B, H, P + self.extra, D)
        self.v[layer] = v.new_zeros(B, H, P + self.extra, D)
        self.k[layer][:, :, :P] = k
        self.v[layer][:, :, :P] = v
        self.valid[layer] = torch.ones(B, P + self.extra, dtype=torch.bool, device=k.device)
        self.valid[layer][:, :P] = valid
        self.n[layer] = self.prompt_len[layer] = P
        self.prompt_pos[layer] = pos


@dataclass
class PrunedOutput:
    """What `pruned_generate` returns (one batch)."""

    sequences: torch.Tensor  # (B, T) generated ids; after the end token, padding
    lengths: list[int]  # generated tokens per row, end token excluded
    kept: torch.Tensor  # (B, k) visual-token indices selected at prefill
    active: torch.Tensor  # (B, k) visual-token indices in use at the end (differs from kept after DSTP swaps)
    visual_tokens: float  # visual tokens attended during decoding, averaged over layers
    reselections: list[int]  # DSTP: re-selections per row
    swapped_in: list[int]  # DSTP: visual tokens swapped in per row
    timings: dict[str, float]  # vision_s, select_s, lm_prefill_s, prefill_s, decode_s, decode_steps
    layers: dict[str, int]  # effective fastv_layer and score_layer
    relevance: list[torch.Tensor] | None = None  # per row (1 + steps, n_visual) at the score layer
    n_visual: int = 0


def unsupported_reason(model) -> str | None:
    """Why visual-token pruning does not apply to this model (None when it does)."""
    mt = getattr(model.config, "model_type", None)
    if mt in SUPPORTED_MODEL_TYPES:
        return None
    return (
        f"visual-token pruning supports {list(SUPPORTED_MODEL_TYPES)} (image tokens inside the sequence), "
        f"got {mt!r}; Mllama reads its image through cross-attention (see the module docstring)"
    )


def _model_parts(model):
    from vskip_core.modeling.adapters import _unwrap

    model = _unwrap(model)  # a peft student: its LoRA layers live inside the base model
    why = unsupported_reason(model)
    if why:
        raise NotImplementedError(why)
    inner = model.model
    lm = inner.language_model
    return inner, lm


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _qk(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated query (B, H, q, D) and key (B, Hkv, q, D) that `layer`'s attention computes from input h."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    B, q, _ = x.shape
    qs = attn.q_proj(x).view(B, q, -1, attn.head_dim).transpose(1, 2)
    ks = attn.k_proj(x).view(B, q, -1, attn.head_dim).transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return qs * c + _rotate_half(qs) * s, ks * c + _rotate_half(ks) * s


def _logits(layer, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Scaled attention logits (B, H, q, n) of rotated queries over cached keys (B, Hkv, n, D). Query heads
    are grouped onto their key/value head (as `repeat_kv` pairs them) instead of copying the keys."""
    attn = layer.self_attn
    B, H, nq, D = q.shape
    Hkv = keys.shape[1]
    lg = q.reshape(B, Hkv, (H // Hkv) * nq, D) @ keys.transpose(2, 3)
    return lg.view(B, H, nq, -1).float() * attn.scaling


def _additive(valid: torch.Tensor, dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=valid.device)
    return torch.where(valid, zero, torch.finfo(dtype).min)


def _prompt_mask_default(input_ids, attn, vis_pos, vision_end_id):
    """Fallback prompt tokens: valid, non-image tokens after the last image token, except <|vision_end|>."""
    B, L = input_ids.shape
    idx = torch.arange(L, device=input_ids.device)[None, :]
    after = idx > vis_pos[:, -1:]
    return after & attn.bool() & (input_ids != vision_end_id)


def user_text_mask(input_ids: torch.Tensor, vision_end_id: int, end_id: int) -> torch.Tensor:
    """(B, L) bool: the user's text tokens, strictly between the last `<|vision_end|>` and the next
    end-of-turn token. The prompt-aware relevance mean-pools their embeddings."""
    out = torch.zeros_like(input_ids, dtype=torch.bool)
    for b, row in enumerate(input_ids.tolist()):
        starts = [i for i, t in enumerate(row) if t == vision_end_id]
        if not starts:
            continue
        s = starts[-1] + 1
        e = next((i for i in range(s, len(row)) if row[i] == end_id), len(row))
        out[b, s:e] = True
    return out


def _repetition_penalty(penalty: float, attention_mask: torch.Tensor):
    """(ids so far, next-token logits) -> logits, as `generate` processes them: transformers'
    RepetitionPenaltyLogitsProcessor over the prompt and the generated tokens, the left padding ignored (the
    prompt_ignore_length generate passes); the identity at 1.0 (generate then adds no processor)."""
    if penalty == 1.0:
        return lambda ids, logits: logits
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    proc = RepetitionPenaltyLogitsProcessor(
        float(penalty), prompt_ignore_length=(attention_mask != 0).int().argmax(dim=1)
    )
    return proc


@torch.no_grad()
def pruned_generate(
    model,
    inputs: dict[str, torch.Tensor],
    spec: PruneSpec,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    prompt_mask: torch.Tensor | None = None,
    record_relevance: bool = False,
    ignore_eos: bool = False,
) -> PrunedOutput:
    """Greedy decoding of one left-padded batch (`model_inputs(collate(...))`) with visual-token pruning, with
    `spec.repetition_penalty` applied as transformers' generate applies it (its own logits processor, over
    the prompt and the generated tokens, left padding ignored). Every row must hold the same number of image
    tokens. `prompt_mask` (B, L) marks the text the
    prompt-aware relevance pools (default: the text after the image). `ignore_eos` decodes exactly
    `max_new_tokens` steps (timing)."""
    inner, lm = _model_parts(model)
    layers = list(lm.layers)
    n_layers = len(layers)
    K, S = resolve_layers(spec, n_layers)
    input_ids, attn = inputs["input_ids"], inputs["attention_mask"]
    device = input_ids.device
    B, L = input_ids.shape
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()

    # --- embeddings with the projected visual features scattered in (as the model's forward does)
    embeds = inner.get_input_embeddings()(input_ids)
    img = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    feats = torch.cat(img.pooler_output, dim=0).to(embeds.device, embeds.dtype)
    is_img = input_ids == model.config.image_token_id
    n_img = is_img.sum(1)
    if not bool((n_img == n_img[0]).all()) or int(n_img[0]) == 0:
        raise ValueError(
            f"every row must hold the same (non-zero) number of image tokens, got {n_img.tolist()}; "
            f"use batch_size=1 or images of one size"
        )
    embeds = embeds.masked_scatter(is_img.unsqueeze(-1), feats)
    n_vis = int(n_img[0])
    vis_pos = torch.nonzero(is_img)[:, 1].view(B, n_vis)  # (B, n_vis) positions in the padded prompt
    pos3, _ = inner.get_rope_index(
        input_ids,
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=attn,
    )
    sync()
    t_vision = time.perf_counter()

    k = kept_count(spec.retention, n_vis)
    pruned = [False] * n_layers
    if spec.method == "fastv":
        pruned = [i >= K for i in range(n_layers)]
    elif spec.method in PRE_LM_METHODS:
        pruned = [True] * n_layers
    active = torch.arange(n_vis, device=device)[None].expand(B, n_vis)
    if spec.method in PRE_LM_METHODS:
        rows = []
        if spec.method == "zspaprune" and prompt_mask is None:
            prompt_mask = _prompt_mask_default(input_ids, attn, vis_pos, model.config.vision_end_token_id)
        for b in range(B):
            f = embeds[b, vis_pos[b]]
            if spec.method == "divprune":
                rows.append(divprune_select(f, k))
            else:
                p = embeds[b, prompt_mask[b].to(device)]
                if p.shape[0] == 0:
                    raise ValueError("prompt-aware pruning found no prompt text tokens in a row")
                rows.append(prompt_aware_select(f, p, k, spec.core_fraction))
        active = torch.stack(rows).to(device)
    sync()
    t_select = time.perf_counter()

    # --- prefill
    drop_prefill = spec.variant == "drop" and not spec.dstp
    cache = _Cache(n_layers, max_new_tokens)
    dtype = embeds.dtype
    valid_prompt = attn.bool()
    h = embeds
    cur_pos = torch.arange(L, device=device)[None].expand(B, L)  # original positions of the rows of h
    cur_valid = valid_prompt
    # DSTP with real dropping keeps the full prompt keys/values of pruned layers: swaps copy from them
    need_full = [spec.dstp and spec.variant == "drop" and pruned[i] for i in range(n_layers)]
    full_k: list[torch.Tensor | None] = [None] * n_layers
    full_v: list[torch.Tensor | None] = [None] * n_layers

    def keep_positions(act: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(B, L, dtype=torch.bool, device=device)
        keep.scatter_(1, vis_pos, False)
        keep.scatter_(1, vis_pos.gather(1, act), True)
        return torch.nonzero(keep)[:, 1].view(B, -1)

    def visual_key_mask(act: torch.Tensor) -> torch.Tensor:
        """(B, L) bool over prompt positions: False at non-active visual tokens."""
        m = torch.ones(B, L, dtype=torch.bool, device=device)
        m.scatter_(1, vis_pos, False)
        m.scatter_(1, vis_pos.gather(1, act), True)
        return m

    def prefill_mask(key_ok: torch.Tensor) -> torch.Tensor:
        n = key_ok.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        return _additive(causal[None, None] & key_ok[:, None, None, :], dtype)

    def visual_relevance(i: int, q: torch.Tensor, extra_logits: list[torch.Tensor]) -> torch.Tensor:
        """(B, n_vis) attention of query q at layer i over every visual token with keys at that layer (all of
        them unless the layer was dropped to the kept set without DSTP), mean over heads. The softmax also
        spans the prompt text and `extra_logits` (generated tokens, own key); dropped-masking is ignored."""
        if full_k[i] is not None:
            keys, pos = full_k[i], torch.arange(L, device=device)[None].expand(B, L)
        else:
            pos = cache.prompt_pos[i]
            keys = cache.k[i][:, :, : pos.shape[1]]
        lg = _logits(layers[i], q, keys).masked_fill(
            ~valid_prompt.gather(1, pos)[:, None, None, :], -math.inf
        )
        probs = torch.cat([lg, *extra_logits], dim=-1).softmax(-1)[:, :, 0].mean(1)[:, : pos.shape[1]]
        return torch.zeros(B, L, device=device).scatter(1, pos, probs).gather(1, vis_pos)

    rel0 = h_prev = cos = sin = None  # h_prev, cos, sin: the input and rotary of the layer just run
    compacted = False
    for i, layer in enumerate(layers):
        if pruned[i] and not compacted:
            if spec.method == "fastv":
                # rank with layer K-1's attention from the last prompt token (mean over heads)
                q, _ = _qk(layers[i - 1], h_prev[:, -1:], cos[:, -1:], sin[:, -1:])
                lg = _logits(layers[i - 1], q, cache.k[i - 1][:, :, :L])
                probs = lg.masked_fill(~valid_prompt[:, None, None, :], -math.inf).softmax(-1)[:, :, 0]
                vis_att = probs.gather(2, vis_pos[:, None, :].expand(-1, probs.shape[1], -1))
                active = torch.stack([fastv_select(vis_att[b], k) for b in range(B)]).to(device)
            if drop_prefill:
                keep = keep_positions(active)
                h = h.gather(1, keep[..., None].expand(-1, -1, h.shape[-1]))
                cur_pos, cur_valid = keep, valid_prompt.gather(1, keep)
            compacted = True
        key_ok = cur_valid & visual_key_mask(active) if pruned[i] and not drop_prefill else cur_valid
        cos, sin = lm.rotary_emb(h, pos3.gather(2, cur_pos[None].expand(3, -1, -1)))
        h_prev = h
        h = layer(
            h,
            attention_mask=prefill_mask(key_ok),
            position_embeddings=(cos, sin),
            past_key_values=cache,
            use_cache=True,
        )
        P = cur_pos.shape[1]
        cache.valid[i] = torch.ones(B, cache.k[i].shape[2], dtype=torch.bool, device=device)
        cache.valid[i][:, :P] = key_ok
        cache.prompt_len[i], cache.prompt_pos[i] = P, cur_pos
        if need_full[i]:
            full_k[i], full_v[i] = cache.k[i][:, :, :L].clone(), cache.v[i][:, :, :L].clone()
        if record_relevance and i == S:
            q, _ = _qk(layer, h_prev[:, -1:], cos[:, -1:], sin[:, -1:])
            rel0 = visual_relevance(i, q, [])
    kept = active.clone()
    penalize = _repetition_penalty(spec.repetition_penalty, attn)
    h = lm.norm(h)
    logits = model.lm_head(h[:, -1:])[:, -1].float()
    next_tok = penalize(input_ids, logits).argmax(-1)
    sync()
    t_prefill = time.perf_counter()

    # --- decoding layout. With DSTP + drop, pruned layers hold [prompt text + k visual entries] in slots;
    # `slot_of` maps an original prompt position to its slot (-1: not held); a swap overwrites the evicted
    # tokens' slots in place with the swapped-in tokens' keys/values from the full prefill cache.
    slot_of = torch.full((B, L), -1, dtype=torch.long, device=device)

    def enter_decoding(act: torch.Tensor) -> None:
        """After the full-length DSTP prefill: keep only the active visual entries in pruned layers (drop)."""
        keep = keep_positions(act)
        slot_of.scatter_(1, keep, torch.arange(keep.shape[1], device=device)[None].expand(B, -1).contiguous())
        for i in range(n_layers):
            if pruned[i] and spec.variant == "drop":
                idx = keep[:, None, :, None].expand(-1, full_k[i].shape[1], -1, full_k[i].shape[3])
                kk, vv = full_k[i].gather(2, idx), full_v[i].gather(2, idx)
                cache.set_layout(i, kk, vv, valid_prompt.gather(1, keep), keep)

    def swap(old: torch.Tensor, new: torch.Tensor) -> None:
        """Put the visual tokens of `new` in use instead of `old` ((B, k) index sets) at every pruned layer."""
        if spec.variant == "mask":
            for i in range(n_layers):
                if pruned[i]:
                    cache.valid[i][:, :L] = valid_prompt & visual_key_mask(new)
            return
        in_old = torch.zeros(B, n_vis, dtype=torch.bool, device=device).scatter_(1, old, True)
        in_new = torch.zeros(B, n_vis, dtype=torch.bool, device=device).scatter_(1, new, True)
        out_idx, in_idx = (
            torch.nonzero(in_old & ~in_new),
            torch.nonzero(in_new & ~in_old),
        )  # row-major, paired
        rows = out_idx[:, 0]
        p_out, p_in = vis_pos[rows, out_idx[:, 1]], vis_pos[rows, in_idx[:, 1]]
        slots = slot_of[rows, p_out]
        for i in range(n_layers):
            if pruned[i]:
                cache.k[i][rows, :, slots] = full_k[i][rows, :, p_in]
                cache.v[i][rows, :, slots] = full_v[i][rows, :, p_in]
                cache.prompt_pos[i][rows, slots] = p_in
        slot_of[rows, p_out] = -1
        slot_of[rows, p_in] = slots

    if spec.dstp:
        enter_decoding(active)

    max_pos = pos3.amax(dim=(0, 2))  # (B,): decoded token t sits at max_pos + t, as in generate()
    eos = -1 if (eos_token_id is None or ignore_eos) else eos_token_id
    out_tokens = [next_tok]
    unfinished = next_tok != eos
    relevance_trace = [[rel0[b].float().cpu()] for b in range(B)] if record_relevance else None
    reselect = [0] * B
    swapped = [0] * B
    steps = 0
    for t in range(1, max_new_tokens):
        if not bool(unfinished.any()):
            break
        steps += 1
        tok = out_tokens[-1]
        h = inner.get_input_embeddings()(tok[:, None])
        pos = (max_pos + t)[None, :, None].expand(3, B, 1)
        cos, sin = lm.rotary_emb(h, pos)
        for i, layer in enumerate(layers):
            if i == S and (spec.dstp or record_relevance):
                q, kself = _qk(layer, h, cos, sin)
                P, n = cache.prompt_len[i], cache.n[i]
                rel = visual_relevance(
                    i, q, [_logits(layer, q, cache.k[i][:, :, P:n]), _logits(layer, q, kself)]
                )
                if record_relevance:
                    for b in range(B):
                        if bool(unfinished[b]):
                            relevance_trace[b].append(rel[b].float().cpu())
                if spec.dstp:
                    new_rows, changed = [], False
                    for b in range(B):
                        a, fired, _ = dstp_update(
                            rel[b], active[b], t, spec.dstp_interval, spec.dstp_shift_threshold
                        )
                        if fired and bool(unfinished[b]):
                            reselect[b] += 1
                            n_new = len(set(a.tolist()) - set(active[b].tolist()))
                            swapped[b] += n_new
                            changed = changed or n_new > 0
                            new_rows.append(a.to(device))
                        else:
                            new_rows.append(active[b])
                    if changed:
                        new_active = torch.stack(new_rows)
                        swap(active, new_active)
                        active = new_active
            valid = torch.cat(
                [cache.valid[i][:, : cache.n[i]], torch.ones(B, 1, dtype=torch.bool, device=device)], 1
            )
            h = layer(
                h,
                attention_mask=_additive(valid[:, None, None, :], dtype),
                position_embeddings=(cos, sin),
                past_key_values=cache,
                use_cache=True,
            )
        h = lm.norm(h)
        nxt = penalize(
            torch.cat([input_ids, *(x[:, None] for x in out_tokens)], 1), model.lm_head(h)[:, -1].float()
        )
        nxt = nxt.argmax(-1)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
        out_tokens.append(nxt)
        unfinished = unfinished & (nxt != eos)
    sync()
    t_end = time.perf_counter()

    seqs = torch.stack(out_tokens, 1).cpu()
    lengths = []
    for row in seqs.tolist():
        lengths.append(row.index(eos) if eos in row else len(row))
    vis_per_layer = [k if p else n_vis for p in pruned]
    return PrunedOutput(
        sequences=seqs,
        lengths=lengths,
        kept=kept.cpu(),
        active=active.cpu(),
        visual_tokens=sum(vis_per_layer) / n_layers,
        reselections=reselect,
        swapped_in=swapped,
        timings={
            "vision_s": t_vision - t0,
            "select_s": t_select - t_vision,
            "lm_prefill_s": t_prefill - t_select,
            "prefill_s": t_prefill - t0,
            "decode_s": t_end - t_prefill,
            "decode_steps": steps,
        },
        layers={"fastv_layer": K, "score_layer": S},
        relevance=[torch.stack(r) for r in relevance_trace] if record_relevance else None,
        n_visual=n_vis,
    )


# --------------------------------------------------------------------------------------- benchmark-level
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
    from tqdm.auto import tqdm

    from vskip_core.modeling.loading import collate, encode, model_inputs

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
    from vskip_core.metrics import family_metrics, headline, score_example

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
    prefix: str = "",
    name_prefix: str = "",
    progress: bool = False,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Every method with and without DSTP at every retention, plus the unpruned model: the `methods` block of
    metrics.json (`{"<name_prefix><method>[+dstp]": {"<retention>": entry}}`, unpruned as "<name_prefix>unpruned"
    at "1.0") and all per-example records."""
    p = cfg.prune
    retentions = p.retentions if retentions is None else retentions
    methods = p.methods if methods is None else methods
    n_lat = min(p.latency_examples, len(examples))
    args = (cfg.generation.max_new_tokens, p.batch_size, n_lat, prefix, progress, cfg.generation.instruction)
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
    from vskip_core.modeling.decoding import decoding_config, generate

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
def random_jaccard(n: int, k: int) -> float:
    """Expected Jaccard overlap of two independent uniformly random k-subsets of n tokens (RVIS's chance level)."""
    total = math.comb(n, k)
    return sum(math.comb(k, i) * math.comb(n - k, k - i) / total * i / (2 * k - i) for i in range(k + 1))


def rvis_overlaps(relevance: torch.Tensor, k: int) -> list[float]:
    """Jaccard(top-k at prefill, top-k at step t) for t = 1.. given a (1 + steps, n_visual) relevance trace."""
    ref = _top_indices(relevance[0], k)
    return [jaccard(ref, _top_indices(r, k)) for r in relevance[1:]]


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

    from vskip_core.plots import _save

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

    from vskip_core.plots import _save

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
