"""The pruned decoder: greedy decoding of a Qwen2-VL-class model whose layers see only some visual tokens,
phase by phase (vision tower, pre-LM selection, prefill, decoding steps), with the KV-cache bookkeeping that
lets the set of visual tokens in use change during decoding. *Which* tokens stay is not decided here: the
`spec` (a `vskip_core.method.pruning.PruneSpec`) brings the papers' rules as methods (`PruningRules`), and this
module only runs them.

Variants (say which one a measurement used)
- "drop": the sequence and the KV cache really shorten: pre-LM methods remove the dropped image tokens
  from the input; FastV removes them from the hidden states entering layer K; decoding attends to a cache
  holding only the kept visual entries (with DSTP: the prefill is the full-length masked one, and a swap
  copies the swapped-in tokens' keys/values from the full visual cache into the evicted tokens' slots).
- "mask": full-length sequence and cache; dropped visual keys are masked (additive -inf-like bias) at the
  pruned layers. Numerically the same as "drop" (up to float summation order), no time saved.
Positions are never renumbered: 3D rotary position ids come once from the model's own `get_rope_index`
on the full sequence and each kept token carries its original ids; decoded tokens continue at
max position + 1 exactly as `generate` does, so at retention 1.0 every method (and +dstp), in both variants,
reproduces `model.generate`'s greedy output. Attention weights for ranking are computed here from the layer's
own projections, so the language model may run eager or sdpa.

Llama-3.2-Vision (Mllama) is not supported: its image enters through cross-attention layers as a separate
key/value set with no positions in the text sequence, so dropping visual tokens from the sequence (FastV)
and position-preserving swaps (DSTP) have no counterpart there.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from vskip_core.modeling.adapters import ADAPTERS, _unwrap


def supported_model_types() -> tuple[str, ...]:
    """The model types of the registered families the pruned decoder runs (no `pruned_decoding_unsupported`)."""
    return tuple(dict.fromkeys(a.model_type for a in ADAPTERS.values() if not a.pruned_decoding_unsupported))


def __getattr__(name: str):
    if name == "SUPPORTED_MODEL_TYPES":  # read from the registry each time: families may register later
        return supported_model_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class PruningRules(Protocol):
    """What the decoder asks the spec (`method.pruning.PruneSpec` implements it)."""

    variant: str  # drop | mask
    dstp: bool  # re-select during decoding (then the prefill keeps the full visual cache)
    repetition_penalty: float
    pre_lm: bool  # select on the LM input embeddings, before layer 0
    uses_prompt: bool  # the pre-LM selection reads the prompt's embeddings
    ranks_in_lm: bool  # rank inside the prefill, with layer K-1's attention from the last prompt token

    def layers(self, n_layers: int) -> tuple[int, int, list[bool]]: ...  # (K, score layer, pruned layers)
    def budget(self, n_visual: int) -> int: ...
    def select(
        self, features: torch.Tensor, prompt_embeddings: torch.Tensor | None, k: int
    ) -> torch.Tensor: ...
    def rank(self, attention: torch.Tensor, k: int) -> torch.Tensor: ...

    dstp_window: int  # decoded tokens whose embeddings the prompt-aware host re-selects with

    def due(self, step: int) -> bool: ...  # may DSTP re-select at this step (else no DSTP work at all)

    def reselect(
        self,
        relevance: torch.Tensor,
        active: torch.Tensor,
        step: int,
        features: torch.Tensor | None = None,
        decoded: torch.Tensor | None = None,
        prompt: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, bool, torch.Tensor]: ...  # (set in use, re-selected?, host's candidate)


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
    host_overlap: list[
        list[float]
    ]  # DSTP: per row, Jaccard(set adopted, the prefill selection) per re-selection
    host_rvis: list[
        list[float]
    ]  # DSTP: per row, Jaccard(host's candidate, prefill selection) at each due step
    timings: dict[str, float]  # vision_s, select_s, lm_prefill_s, prefill_s, decode_s, decode_steps
    layers: dict[str, int]  # effective fastv_layer and score_layer
    relevance: list[torch.Tensor] | None = None  # per row (1 + steps, n_visual) at the score layer
    n_visual: int = 0


def unsupported_reason(model) -> str | None:
    """Why visual-token pruning does not apply to this model (None when it does)."""
    mt = getattr(model.config, "model_type", None)
    supported = supported_model_types()
    if mt in supported:
        return None
    why = next((a.pruned_decoding_unsupported for a in ADAPTERS.values() if a.serves(mt)), "")
    return (
        f"visual-token pruning supports {list(supported)} (image tokens inside the sequence), got {mt!r}"
        + (f"; {why}" if why else "")
    )


def _model_parts(model):

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


class PrunedDecoder:
    """Greedy decoding of one left-padded batch with visual-token pruning, phase by phase: `embed` (vision
    tower and rotary index), `select` (pre-LM methods), `prefill` (FastV ranks inside it), `start_decoding`, then
    `step` per decoded token (DSTP re-selects inside it). `pruned_generate` runs the phases in order."""

    def __init__(
        self,
        model,
        spec: PruningRules,
        max_new_tokens: int,
        eos_token_id: int | None,
        pad_token_id: int,
        record_relevance: bool = False,
        ignore_eos: bool = False,
    ) -> None:
        self.model, self.spec, self.max_new_tokens = model, spec, max_new_tokens
        self.inner, self.lm = _model_parts(model)
        self.layers = list(self.lm.layers)
        self.n_layers = len(self.layers)
        # which layers see only the selected visual tokens: FastV's K.., everything for pre-LM methods
        self.K, self.S, self.pruned = spec.layers(self.n_layers)
        self.eos = -1 if (eos_token_id is None or ignore_eos) else eos_token_id
        self.pad_token_id = pad_token_id
        self.record_relevance = record_relevance

    # ------------------------------------------------------------------------------------------ phases
    def embed(self, inputs: dict[str, torch.Tensor]) -> None:
        """Embeddings with the projected visual features scattered in (as the model's forward does), the
        image token positions, and the 3D rotary position ids of the full sequence."""
        inner = self.inner
        self.input_ids, self.attn = inputs["input_ids"], inputs["attention_mask"]
        self.device = self.input_ids.device
        self.B, self.L = B, _ = self.input_ids.shape
        embeds = inner.get_input_embeddings()(self.input_ids)
        img = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        feats = torch.cat(img.pooler_output, dim=0).to(embeds.device, embeds.dtype)
        is_img = self.input_ids == self.model.config.image_token_id
        n_img = is_img.sum(1)
        if not bool((n_img == n_img[0]).all()) or int(n_img[0]) == 0:
            raise ValueError(
                f"every row must hold the same (non-zero) number of image tokens, got {n_img.tolist()}; "
                f"use batch_size=1 or images of one size"
            )
        self.embeds = embeds.masked_scatter(is_img.unsqueeze(-1), feats)
        self.dtype = self.embeds.dtype
        self.n_vis = n_vis = int(n_img[0])
        self.vis_pos = torch.nonzero(is_img)[:, 1].view(B, n_vis)  # (B, n_vis) positions in the padded prompt
        self.vis_feats = feats.view(B, n_vis, -1)  # (B, n_vis, d) the projected visual features, row by row
        self.pos3, _ = inner.get_rope_index(
            self.input_ids,
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=self.attn,
        )
        # (B,): decoded token t sits at max_pos + t, as in generate()
        self.max_pos = self.pos3.amax(dim=(0, 2))
        self.valid_prompt = self.attn.bool()
        self.k = self.spec.budget(n_vis)
        self.active = torch.arange(n_vis, device=self.device)[None].expand(B, n_vis)

    def select(self, prompt_mask: torch.Tensor | None = None) -> None:
        """DivPrune / prompt-aware: choose the k visual tokens per row on the LM input embeddings."""
        spec = self.spec
        self.prompt_means: list[torch.Tensor] = []  # per row: the prompt text's mean embedding (DSTP)
        if not spec.pre_lm:
            return
        if spec.uses_prompt and prompt_mask is None:
            prompt_mask = _prompt_mask_default(
                self.input_ids, self.attn, self.vis_pos, self.model.config.vision_end_token_id
            )
        rows = []
        for b in range(self.B):
            f, p = self.vis_feats[b], None
            if spec.uses_prompt:
                p = self.embeds[b, prompt_mask[b].to(self.device)]
                self.prompt_means.append(p.mean(0))
                if p.shape[0] == 0:
                    raise ValueError("prompt-aware pruning found no prompt text tokens in a row")
            rows.append(spec.select(f, p, self.k))
        self.active = torch.stack(rows).to(self.device)

    def prefill(self) -> torch.Tensor:
        """Run the prompt through every layer (the pruned ones see only the active visual tokens) and return
        the first generated token. Without DSTP the drop variant really shortens the sequence; with DSTP the
        prefill stays full length (masked) and the full visual keys/values of pruned layers are kept for swaps."""
        spec, B, L, dev = self.spec, self.B, self.L, self.device
        drop = spec.variant == "drop" and not spec.dstp
        self.cache = _Cache(self.n_layers, self.max_new_tokens)
        self.full_k: list[torch.Tensor | None] = [None] * self.n_layers
        self.full_v: list[torch.Tensor | None] = [None] * self.n_layers
        h = self.embeds
        cur_pos = torch.arange(L, device=dev)[None].expand(B, L)  # original positions of the rows of h
        cur_valid = self.valid_prompt
        rel0 = h_prev = cos = sin = None  # h_prev, cos, sin: the input and rotary of the layer just run
        compacted = False
        for i, layer in enumerate(self.layers):
            if self.pruned[i] and not compacted:
                if spec.ranks_in_lm:
                    self.active = self._fastv_rank(i - 1, h_prev, cos, sin)
                if drop:
                    keep = self._keep_positions(self.active)
                    h = h.gather(1, keep[..., None].expand(-1, -1, h.shape[-1]))
                    cur_pos, cur_valid = keep, self.valid_prompt.gather(1, keep)
                compacted = True
            key_ok = (
                cur_valid & self._visual_key_mask(self.active) if self.pruned[i] and not drop else cur_valid
            )
            cos, sin = self.lm.rotary_emb(h, self.pos3.gather(2, cur_pos[None].expand(3, -1, -1)))
            h_prev = h
            h = layer(
                h,
                attention_mask=self._prefill_mask(key_ok),
                position_embeddings=(cos, sin),
                past_key_values=self.cache,
                use_cache=True,
            )
            self._store_prefill_layer(i, cur_pos, key_ok)
            if self.record_relevance and i == self.S:
                q, _ = _qk(layer, h_prev[:, -1:], cos[:, -1:], sin[:, -1:])
                rel0 = self.visual_relevance(i, q, [])
        self.kept = self.active.clone()
        self.penalize = _repetition_penalty(spec.repetition_penalty, self.attn)
        h = self.lm.norm(h)
        logits = self.model.lm_head(h[:, -1:])[:, -1].float()
        first = self.penalize(self.input_ids, logits).argmax(-1)
        self.out_tokens = [first]
        self.unfinished = first != self.eos
        self.relevance_trace = [[rel0[b].float().cpu()] for b in range(B)] if self.record_relevance else None
        self.reselections, self.swapped_in = [0] * B, [0] * B
        self.host_overlap: list[list[float]] = [[] for _ in range(B)]
        self.host_rvis: list[list[float]] = [[] for _ in range(B)]
        return first

    def start_decoding(self) -> None:
        """With DSTP + drop, pruned layers now keep only the active visual entries (in slots a swap overwrites)."""
        if self.spec.dstp:
            self._enter_decoding(self.active)

    def step(self, t: int) -> torch.Tensor:
        """Decode token t + 1 from generated token t (t = 1, 2, ...); DSTP may re-select at the score layer.
        Finished rows get padding."""
        B, dev = self.B, self.device
        h = self.inner.get_input_embeddings()(self.out_tokens[-1][:, None])
        pos = (self.max_pos + t)[None, :, None].expand(3, B, 1)
        cos, sin = self.lm.rotary_emb(h, pos)
        cache = self.cache
        for i, layer in enumerate(self.layers):
            if i == self.S and ((self.spec.dstp and self.spec.due(t)) or self.record_relevance):
                self._score_step(i, layer, h, cos, sin, t)
            valid = torch.cat(
                [cache.valid[i][:, : cache.n[i]], torch.ones(B, 1, dtype=torch.bool, device=dev)], 1
            )
            h = layer(
                h,
                attention_mask=_additive(valid[:, None, None, :], self.dtype),
                position_embeddings=(cos, sin),
                past_key_values=cache,
                use_cache=True,
            )
        h = self.lm.norm(h)
        ids = torch.cat([self.input_ids, *(x[:, None] for x in self.out_tokens)], 1)
        nxt = self.penalize(ids, self.model.lm_head(h)[:, -1].float()).argmax(-1)
        nxt = torch.where(self.unfinished, nxt, torch.full_like(nxt, self.pad_token_id))
        self.out_tokens.append(nxt)
        self.unfinished = self.unfinished & (nxt != self.eos)
        return nxt

    def output(self, timings: dict[str, float]) -> PrunedOutput:
        seqs = torch.stack(self.out_tokens, 1).cpu()
        lengths = [row.index(self.eos) if self.eos in row else len(row) for row in seqs.tolist()]
        vis_per_layer = [self.k if p else self.n_vis for p in self.pruned]
        trace = self.relevance_trace
        return PrunedOutput(
            sequences=seqs,
            lengths=lengths,
            kept=self.kept.cpu(),
            active=self.active.cpu(),
            visual_tokens=sum(vis_per_layer) / self.n_layers,
            reselections=self.reselections,
            swapped_in=self.swapped_in,
            host_overlap=self.host_overlap,
            host_rvis=self.host_rvis,
            timings=timings,
            layers={"fastv_layer": self.K, "score_layer": self.S},
            relevance=[torch.stack(r) for r in trace] if trace is not None else None,
            n_visual=self.n_vis,
        )

    # ------------------------------------------------------------------------------ visual relevance
    def _fastv_rank(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """FastV: rank with layer i = K-1's attention from the last prompt token (mean over heads)."""
        q, _ = _qk(self.layers[i], h[:, -1:], cos[:, -1:], sin[:, -1:])
        lg = _logits(self.layers[i], q, self.cache.k[i][:, :, : self.L])
        probs = lg.masked_fill(~self.valid_prompt[:, None, None, :], -math.inf).softmax(-1)[:, :, 0]
        vis_att = probs.gather(2, self.vis_pos[:, None, :].expand(-1, probs.shape[1], -1))
        return torch.stack([self.spec.rank(vis_att[b], self.k) for b in range(self.B)]).to(self.device)

    def visual_relevance(self, i: int, q: torch.Tensor, extra_logits: list[torch.Tensor]) -> torch.Tensor:
        """(B, n_vis) attention of query q at layer i over every visual token with keys at that layer (all of
        them unless the layer was dropped to the kept set without DSTP), mean over heads. The softmax also
        spans the prompt text and `extra_logits` (generated tokens, own key); dropped-masking is ignored."""
        B, L = self.B, self.L
        if self.full_k[i] is not None:
            keys, pos = self.full_k[i], torch.arange(L, device=self.device)[None].expand(B, L)
        else:
            pos = self.cache.prompt_pos[i]
            keys = self.cache.k[i][:, :, : pos.shape[1]]
        lg = _logits(self.layers[i], q, keys).masked_fill(
            ~self.valid_prompt.gather(1, pos)[:, None, None, :], -math.inf
        )
        probs = torch.cat([lg, *extra_logits], dim=-1).softmax(-1)[:, :, 0].mean(1)[:, : pos.shape[1]]
        return torch.zeros(B, L, device=self.device).scatter(1, pos, probs).gather(1, self.vis_pos)

    def _score_step(
        self, i: int, layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, t: int
    ) -> None:
        """At the score layer of step t: the current token's relevance over the full visual cache, recorded
        and/or handed to DSTP."""
        q, kself = _qk(layer, h, cos, sin)
        P, n = self.cache.prompt_len[i], self.cache.n[i]
        rel = self.visual_relevance(
            i, q, [_logits(layer, q, self.cache.k[i][:, :, P:n]), _logits(layer, q, kself)]
        )
        if self.record_relevance:
            for b, live in enumerate(self.unfinished.tolist()):  # one device sync, not one per row
                if live:
                    self.relevance_trace[b].append(rel[b].float().cpu())
        if self.spec.dstp and self.spec.due(t):
            self._dstp(rel, t)

    # ------------------------------------------------------------------------------------------- DSTP
    def _dstp(self, rel: torch.Tensor, t: int) -> None:
        """Apply the spec's re-selection rule (DSTP) per unfinished row; swap the changed rows' visual tokens in
        every pruned layer."""
        spec, active = self.spec, self.active
        new_rows, changed = [], False
        decoded = None
        if spec.uses_prompt:  # the prompt-aware host re-selects with the recent decoded tokens' embeddings
            recent = torch.stack(self.out_tokens[-spec.dstp_window :], 1)  # (B, <= window) token ids
            decoded = self.inner.get_input_embeddings()(recent)
        for b, live in enumerate(self.unfinished.tolist()):  # one device sync, not one per row
            if not live:  # a finished row's set no longer matters: no host rule run for it
                new_rows.append(active[b])
                continue
            a, fired, cand = spec.reselect(
                rel[b],
                active[b],
                t,
                self.vis_feats[b],
                None if decoded is None else decoded[b],
                self.prompt_means[b] if self.prompt_means else None,
            )
            kept, c = set(self.kept[b].tolist()), set(cand.tolist())
            self.host_rvis[b].append(len(kept & c) / len(kept | c))
            if not fired:
                new_rows.append(active[b])
                continue
            self.reselections[b] += 1
            new = set(a.tolist())
            self.host_overlap[b].append(len(kept & new) / len(kept | new))
            n_new = len(new - set(active[b].tolist()))
            self.swapped_in[b] += n_new
            changed = changed or n_new > 0
            new_rows.append(a.to(self.device))
        if changed:
            new_active = torch.stack(new_rows)
            self._swap(active, new_active)
            self.active = new_active

    def _enter_decoding(self, act: torch.Tensor) -> None:
        """After the full-length DSTP prefill (drop): pruned layers hold [prompt text + k visual entries] in
        slots; `slot_of` maps an original prompt position to its slot (-1: not held)."""
        B, L, dev, cache = self.B, self.L, self.device, self.cache
        self.slot_of = torch.full((B, L), -1, dtype=torch.long, device=dev)
        keep = self._keep_positions(act)
        self.slot_of.scatter_(
            1, keep, torch.arange(keep.shape[1], device=dev)[None].expand(B, -1).contiguous()
        )
        for i in range(self.n_layers):
            if self.pruned[i] and self.spec.variant == "drop":
                fk, fv = self.full_k[i], self.full_v[i]
                idx = keep[:, None, :, None].expand(-1, fk.shape[1], -1, fk.shape[3])
                cache.set_layout(
                    i, fk.gather(2, idx), fv.gather(2, idx), self.valid_prompt.gather(1, keep), keep
                )

    def _swap(self, old: torch.Tensor, new: torch.Tensor) -> None:
        """Put the visual tokens of `new` in use instead of `old` ((B, k) index sets) at every pruned layer:
        mask: re-mask the keys; drop: overwrite the evicted tokens' slots with the swapped-in tokens'
        keys/values from the full prefill cache."""
        B, L, dev, cache = self.B, self.L, self.device, self.cache
        if self.spec.variant == "mask":
            for i in range(self.n_layers):
                if self.pruned[i]:
                    cache.valid[i][:, :L] = self.valid_prompt & self._visual_key_mask(new)
            return
        in_old = torch.zeros(B, self.n_vis, dtype=torch.bool, device=dev).scatter_(1, old, True)
        in_new = torch.zeros(B, self.n_vis, dtype=torch.bool, device=dev).scatter_(1, new, True)
        # evicted and swapped-in tokens, row-major, so the i-th of each pair up within a row
        out_idx, in_idx = torch.nonzero(in_old & ~in_new), torch.nonzero(in_new & ~in_old)
        rows = out_idx[:, 0]
        p_out, p_in = self.vis_pos[rows, out_idx[:, 1]], self.vis_pos[rows, in_idx[:, 1]]
        slots = self.slot_of[rows, p_out]
        for i in range(self.n_layers):
            if self.pruned[i]:
                cache.k[i][rows, :, slots] = self.full_k[i][rows, :, p_in]
                cache.v[i][rows, :, slots] = self.full_v[i][rows, :, p_in]
                cache.prompt_pos[i][rows, slots] = p_in
        self.slot_of[rows, p_out] = -1
        self.slot_of[rows, p_in] = slots

    # ------------------------------------------------------------------------------------------ masks
    def _visual_key_mask(self, act: torch.Tensor) -> torch.Tensor:
        """(B, L) bool over prompt positions: False at non-active visual tokens."""
        m = torch.ones(self.B, self.L, dtype=torch.bool, device=self.device)
        m.scatter_(1, self.vis_pos, False)
        m.scatter_(1, self.vis_pos.gather(1, act), True)
        return m

    def _keep_positions(self, act: torch.Tensor) -> torch.Tensor:
        """(B, L - n_vis + k) prompt positions that stay when only the active visual tokens are kept."""
        return torch.nonzero(self._visual_key_mask(act))[:, 1].view(self.B, -1)

    def _prefill_mask(self, key_ok: torch.Tensor) -> torch.Tensor:
        n = key_ok.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        return _additive(causal[None, None] & key_ok[:, None, None, :], self.dtype)

    def _store_prefill_layer(self, i: int, cur_pos: torch.Tensor, key_ok: torch.Tensor) -> None:
        """Record which prefill slots of layer i may be attended and their original positions; with DSTP +
        drop, keep the layer's full prompt keys/values (swaps copy from them)."""
        cache, P = self.cache, cur_pos.shape[1]
        cache.valid[i] = torch.ones(self.B, cache.k[i].shape[2], dtype=torch.bool, device=self.device)
        cache.valid[i][:, :P] = key_ok
        cache.prompt_len[i], cache.prompt_pos[i] = P, cur_pos
        if self.spec.dstp and self.spec.variant == "drop" and self.pruned[i]:
            self.full_k[i] = cache.k[i][:, :, : self.L].clone()
            self.full_v[i] = cache.v[i][:, :, : self.L].clone()


@torch.no_grad()
def pruned_generate(
    model,
    inputs: dict[str, torch.Tensor],
    spec: PruningRules,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    prompt_mask: torch.Tensor | None = None,
    record_relevance: bool = False,
    ignore_eos: bool = False,
) -> PrunedOutput:
    """Greedy decoding of one left-padded batch (`model_inputs(collate(...))`) with visual-token pruning, with
    `spec.repetition_penalty` applied as transformers' generate applies it. Every row must hold the same
    number of image tokens. `prompt_mask` (B, L) marks the text the prompt-aware relevance pools (default:
    the text after the image). `ignore_eos` decodes exactly `max_new_tokens` steps. Wall-clock time of each
    phase goes to `timings`."""
    dec = PrunedDecoder(model, spec, max_new_tokens, eos_token_id, pad_token_id, record_relevance, ignore_eos)
    is_cuda = inputs["input_ids"].device.type == "cuda"
    stamps = [time.perf_counter()]

    def stamp() -> None:
        if is_cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    dec.embed(inputs)
    stamp()
    dec.select(prompt_mask)
    stamp()
    dec.prefill()
    stamp()
    dec.start_decoding()
    steps = 0
    for t in range(1, max_new_tokens):
        if not bool(dec.unfinished.any()):
            break
        steps += 1
        dec.step(t)
    stamp()
    t0, t_vision, t_select, t_prefill, t_end = stamps
    timings = {
        "vision_s": t_vision - t0,
        "select_s": t_select - t_vision,
        "lm_prefill_s": t_prefill - t_select,
        "prefill_s": t_prefill - t0,
        "decode_s": t_end - t_prefill,
        "decode_steps": steps,
    }
    return dec.output(timings)
