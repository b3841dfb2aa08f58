"""Visual-token pruning for Qwen2-VL-class models: FastV, DivPrune, prompt-aware relevance + diversity
(ZSPAPrune, arXiv 2510.17197), the DSTP decoding-stage add-on (arXiv 2604.12358), and the RVIS overlap.

`PruneSpec(method, retention, dstp=..., variant=...)` says which visual tokens stay; `pruned_generate(model,
inputs, spec, ...)` (`vskip_core.modeling.pruned_decoding`, re-exported here) runs greedy decoding with it on the
inputs of `vskip_core.modeling.loading.encode/collate`. Batching over datasets, timing and tables:
`vskip_core.stages.pruning`.

Budget
    k = max(1, round(retention * n_visual)) visual tokens (Python `round`), retention in (0, 1]; n_visual counts
    every image token of the example (several images share one budget).

Rules (each a pure function below)
- FastV (`fastv_select`): layers 0..K-1 see every visual token. After layer K-1 has run, rank the visual
  tokens by the attention they receive from the last prompt token at layer K-1 (mean over heads); layers
  K.. see only the top k. K = `prune.fastv_layer` (clamped to n_layers - 1, with a warning).
- DivPrune (`divprune_select`): before the language model, on the projected visual features (the merger
  output, i.e. the LM input embeddings of the image tokens): cosine distance d = 1 - cos; first pick the
  token whose nearest other token is farthest; then repeatedly add the token whose minimum distance to the
  chosen set is largest (greedy max-min). Every layer sees only the chosen k.
- Prompt-aware (`prompt_aware_select`, method "zspaprune"): relevance of visual token v = cos(f_v, p),
  p = mean of the LM input embeddings of the question and options (`question_mask`: the user's text between
  the last `<|vision_end|>` and the next `<|im_end|>`, less the CoT instruction and the ratio sentence).
  Core = the round(`prune.core_fraction` * k) most relevant tokens; the remaining budget is filled by greedy
  max-min cosine diversity against everything chosen so far (core included). Before the language model;
  every layer sees only the chosen k.
- DSTP (`host_reselect` + `dstp_update`, an add-on that lets any method re-select; the paper gives no code,
  this is the rule implemented): let l = the spec's `score_layer` (-1: K - 1, the FastV ranking layer; stage
  07 passes stage 02's chosen layer, `prune.score_from`). At decoding step t = 1, 2, ... (step t feeds
  generated token t), before layer l runs, the HOST's own rule
  re-selects k tokens T_t with the decoding state in place of the prompt: FastV, the top k of the current
  token's attention at layer l over the FULL visual KV cache (every visual token's key, plus the text and
  generated keys and its own key in the softmax; mean over heads); prompt-aware, its core + diversity rule
  with relevance to the decoding state (`prune.dstp_state`: the mean LM input embedding of the last
  `prune.dstp_window` decoded tokens, by default averaged with p, the question's mean embedding); DivPrune, its
  max-min diversity rule started from the visual token the current token attends to most. With S the set in
  use and J = |T_t ∩ S| / |T_t ∪ S|: if t % `prune.dstp_interval` == 0 or J < `prune.dstp_shift_threshold`,
  then S <- T_t. The new S is used from layer l of step t on (layers below l already ran with the old S)
  and by every pruned layer of the following steps. The budget k never changes. Which layers are pruned is
  the base method's (FastV: K.., the others: all).
  Swapping a token back in needs its keys/values at every pruned layer, so with DSTP the prefill runs every
  visual token through every layer (non-selected visual keys masked) and the full visual KV cache is kept:
  DSTP saves decode time, not prefill.
- RVIS (`rvis_overlaps`): at step t, Jaccard(top-k relevance at prefill, top-k relevance at step t), the
  relevance being the score layer's attention over the visual tokens (mean over heads), unpruned decoding.
  Per host (`host_rvis`, recorded by host + DSTP runs): at every step the trigger may fire (every
  `prune.dstp_interval` steps; every step with a shift threshold), Jaccard(the host's prefill selection, the
  host's own candidate T_t). Steps where the trigger cannot fire do no DSTP work at all.

Registry
    Each pruner is a `Pruner` in `registry.PRUNERS` (FastV, DivPrune and prompt-aware are registered at the end
    of the selection rules, below): where it selects (`pre_lm` or `in_lm`), whether it reads the prompt, its
    selection rule and its DSTP host rule. `PruneSpec` and `host_reselect` dispatch through the entry, never on
    a name; `none` is the unpruned control. Adding one is one file, imported before the params that name it:

        import torch
        from vskip_core.method.pruning import register_pruner

        def _stride(features, prompt, k, spec):  # every n-th visual token, n = n_visual // k
            return torch.arange(0, features.shape[0], features.shape[0] // k)[:k]

        def _stride_again(relevance, k, features, state, spec):  # DSTP host rule: the same tokens
            return _stride(features, None, k, spec)

        register_pruner("stride", "stride", "#e377c2", "pre_lm", _stride, _stride_again)

Execution (`PrunedDecoder`, the "drop" and "mask" variants, positions, KV-cache swaps, and why Mllama has no
visual-token pruning) is model plumbing, in `vskip_core.modeling.pruned_decoding`: it runs whatever a
`PruneSpec` decides, through the spec's rule methods (`layers`, `budget`, `select`, `rank`, `reselect`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import vskip_core.registry as registry
from vskip_core.modeling.pruned_decoding import (  # noqa: F401  (re-exported: the decoder that runs these rules)
    PrunedOutput,
    pruned_generate,
    unsupported_reason,
)

VARIANTS = ("drop", "mask")
WHERE = ("pre_lm", "in_lm")  # where a pruner selects: on the vision features before the LM, or inside it


class _Methods(Sequence[str]):
    """Every valid `PruneSpec` method, read live from the registry: the unpruned control, then the pruners."""

    def _names(self) -> tuple[str, ...]:
        return ("none", *registry.PRUNERS.names())

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self) -> int:
        return len(registry.PRUNERS) + 1

    def __repr__(self) -> str:
        return repr(self._names())


METHODS: Sequence[str] = _Methods()


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
    dist = (
        cosine_distances(features).cpu().numpy()
    )  # the greedy loop in numpy: k small steps, no device syncs
    chosen = [int(i) for i in (selected.tolist() if torch.is_tensor(selected) else (selected or []))]
    if not chosen:
        d = dist.copy()
        np.fill_diagonal(d, np.inf)
        chosen = [int(np.argmax(d.min(1)))]  # argmax: the first maximum, so ties go to the lower index
    mind = dist[chosen].min(0)
    mind[chosen] = -np.inf
    while len(chosen) < k:
        j = int(np.argmax(mind))
        chosen.append(j)
        np.minimum(mind, dist[j], out=mind)
        mind[j] = -np.inf
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


def random_jaccard(n: int, k: int) -> float:
    """Expected Jaccard overlap of two independent uniformly random k-subsets of n tokens (RVIS's chance level)."""
    total = math.comb(n, k)
    return sum(math.comb(k, i) * math.comb(n - k, k - i) / total * i / (2 * k - i) for i in range(k + 1))


def rvis_overlaps(relevance: torch.Tensor, k: int) -> list[float]:
    """Jaccard(top-k at prefill, top-k at step t) for t = 1.. given a (1 + steps, n_visual) relevance trace."""
    ref = _top_indices(relevance[0], k)
    return [jaccard(ref, _top_indices(r, k)) for r in relevance[1:]]


def host_reselect(
    method: str,
    relevance: torch.Tensor,
    k: int,
    features: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
    core_fraction: float = 0.6,
) -> torch.Tensor:
    """The host method's own selection of k visual tokens during decoding (DSTP's candidate set), by its
    registered `reselect` rule: FastV, the top k of `relevance` (the current token's attention over every
    visual token); prompt-aware, core + diversity fill with relevance to `state` (embeddings of the recent
    decoded tokens, (m, d) or (d,)) in place of the prompt; DivPrune, greedy max-min diversity on `features`
    started from the most attended token. Returns k sorted indices."""
    spec = PruneSpec(method, core_fraction=core_fraction)
    return spec.pruner.reselect(relevance, k, features, state, spec)


def dstp_update(
    candidate: torch.Tensor, active: torch.Tensor, step: int, interval: int, threshold: float
) -> tuple[torch.Tensor, bool, float]:
    """DSTP's trigger for one row: adopt the host's new selection `candidate` when `step % interval == 0` or
    its Jaccard overlap with the set in use is below `threshold`. Returns (set in use, re-selected?,
    overlap)."""
    overlap = jaccard(candidate, active)
    if step % interval == 0 or overlap < threshold:
        return candidate, True, overlap
    return active, False, overlap


# ----------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Pruner:
    """A visual-token pruner as the registry holds it: where it selects, its selection rule and its DSTP host
    re-selection rule. Every rule returns k sorted indices into the example's visual tokens and may read the
    spec's knobs (`spec.core_fraction`, ...).

    where "pre_lm": `select(features (n, d), prompt_embeddings (m, d) or None, k, spec)` on the projected
    visual features, before layer 0; every layer sees only the k. "in_lm": `select(attention (heads, n), k,
    spec)` with layer K-1's attention from the last prompt token; layers K.. see only the k.
    `reselect(relevance (n,), k, features (n, d) or None, state (m, d) or None, spec)`: the host's choice
    during decoding (DSTP), from the current token's attention and, for prompt readers, the decoding state."""

    name: str
    label: str  # how tables and figures name it (registry.display)
    colour: str
    where: str  # pre_lm | in_lm
    select: Callable[..., torch.Tensor] | None
    reselect: Callable[..., torch.Tensor]
    uses_prompt: bool = False  # the pre-LM selection reads the question's embeddings

    def __post_init__(self) -> None:
        where = f"pruner {self.name!r}"
        if self.where not in WHERE and not (self.name == self.where == "none"):
            raise ValueError(f"{where}: where must be one of {list(WHERE)}, got {self.where!r}")
        if not callable(self.reselect) or (self.where != "none" and not callable(self.select)):
            raise ValueError(f"{where}: select and reselect must be functions (see the Pruner docstring)")
        if self.uses_prompt and self.where != "pre_lm":
            raise ValueError(f"{where}: only a pre_lm pruner reads the prompt")


def register_pruner(
    name: str,
    label: str,
    colour: str,
    where: str,
    select: Callable[..., torch.Tensor],
    reselect: Callable[..., torch.Tensor],
    uses_prompt: bool = False,
    replace: bool = False,
) -> Pruner:
    """Register a pruner under `name` (PruneSpec, prune.methods and stage 07 accept it) with its label and
    colour."""
    if name == "none":
        raise ValueError(
            "'none' is the unpruned control (PruneSpec(method='none')); name the pruner otherwise"
        )
    pruner = Pruner(name, label, colour, where, select, reselect, uses_prompt)
    return registry.add(registry.PRUNERS, name, pruner, label, colour, replace)


def unregister_pruner(name: str) -> None:
    registry.remove(registry.PRUNERS, name)


def top_relevance(relevance: torch.Tensor, k: int, *_: Any) -> torch.Tensor:
    """Re-selection by attention alone: the top k of the current token's relevance (FastV's host rule)."""
    return torch.sort(_top_indices(relevance, k)).values


def _fastv_rank(attention: torch.Tensor, k: int, spec: PruneSpec) -> torch.Tensor:
    return fastv_select(attention, k)


def _divprune(features: torch.Tensor, prompt: torch.Tensor | None, k: int, spec: PruneSpec) -> torch.Tensor:
    return divprune_select(features, k)


def _divprune_reselect(relevance, k, features, state, spec: PruneSpec) -> torch.Tensor:
    """Max-min diversity started from the visual token the current token attends to most."""
    if features is None:
        raise ValueError(f"{spec.method}: re-selection needs the visual features")
    return max_min_diversity(features, k, selected=[int(torch.argmax(relevance))])


def _prompt_aware(
    features: torch.Tensor, prompt: torch.Tensor | None, k: int, spec: PruneSpec
) -> torch.Tensor:
    return prompt_aware_select(features, prompt, k, spec.core_fraction)


def _prompt_aware_reselect(relevance, k, features, state, spec: PruneSpec) -> torch.Tensor:
    """Core + diversity with relevance to the decoding state in place of the prompt."""
    if features is None:
        raise ValueError(f"{spec.method}: re-selection needs the visual features")
    if state is None:
        raise ValueError(f"{spec.method}: re-selection needs the decoding state's embeddings")
    return prompt_aware_select(features, state, k, spec.core_fraction)


# the unpruned control: nothing selected; as a DSTP host (RVIS) its set is every token, re-ranked by attention
NO_PRUNING = Pruner("none", registry.display("none").label, registry.display("none").colour, "none", None,
                    top_relevance)  # fmt: skip
# replace=True: a module reload redefines them
register_pruner("fastv", "fastv", "#4c78a8", "in_lm", _fastv_rank, top_relevance, replace=True)
register_pruner("divprune", "divprune", "#f58518", "pre_lm", _divprune, _divprune_reselect, replace=True)
register_pruner("zspaprune", "prompt-aware", "#54a24b", "pre_lm", _prompt_aware, _prompt_aware_reselect,
                uses_prompt=True, replace=True)  # fmt: skip


# --------------------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class PruneSpec:
    """Which visual tokens stay: the method, the retention, DSTP on/off, and how it is executed."""

    method: str = "none"  # none (unpruned) or a registered pruner: fastv, divprune, zspaprune, ...
    retention: float = 1.0  # fraction of visual tokens kept, in (0, 1]
    dstp: bool = False  # re-select the visual tokens in use during decoding
    variant: str = "drop"  # drop (shorter sequence and cache: real savings) or mask (full length, masked)
    fastv_layer: int = 2  # FastV's K: layers < K see every visual token
    score_layer: int = -1  # layer whose attention ranks visual tokens for DSTP/RVIS; -1 = K - 1
    core_fraction: float = 0.6  # prompt-aware: share of the budget chosen by relevance
    dstp_interval: int = 4  # DSTP: re-select every this many decoding steps
    dstp_shift_threshold: float = 0.0  # DSTP: also re-select when the new set's Jaccard with S is below this
    dstp_window: int = 4  # DSTP with the prompt-aware host: decoded tokens whose embeddings are the state
    dstp_state: str = (
        "prompt+decoded"  # prompt-aware host's state: decoded, or prompt+decoded (equal weights)
    )
    repetition_penalty: float = 1.0  # generation.repetition_penalty, applied as generate() does

    def __post_init__(self) -> None:
        if self.method != "none" and self.method not in registry.PRUNERS:
            why = registry.PRUNERS.unknown(self.method).removeprefix(f"unknown {registry.PRUNERS.kind} ")
            raise ValueError(f"unknown pruning method {why} ('none' runs unpruned)")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; valid: {list(VARIANTS)}")
        object.__setattr__(self, "retention", check_retention(self.retention))
        if self.fastv_layer < 1:
            raise ValueError(f"fastv_layer must be >= 1 (layer K-1 ranks the tokens), got {self.fastv_layer}")
        if self.dstp_interval < 1:
            raise ValueError(f"dstp_interval must be >= 1, got {self.dstp_interval}")
        if self.dstp_window < 1:
            raise ValueError(f"dstp_window must be >= 1, got {self.dstp_window}")
        if self.dstp_state not in ("decoded", "prompt+decoded"):
            raise ValueError(f"dstp_state must be decoded or prompt+decoded, got {self.dstp_state!r}")
        if not 0 <= self.core_fraction <= 1:
            raise ValueError(f"core_fraction must be in [0, 1], got {self.core_fraction}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def name(self) -> str:
        return self.method + ("+dstp" if self.dstp else "")

    @property
    def pruner(self) -> Pruner:
        """The registered pruner this spec runs (the no-pruning control for `none`)."""
        return NO_PRUNING if self.method == "none" else registry.PRUNERS.get(self.method)

    # the rules as `modeling.pruned_decoding.PrunedDecoder` calls them
    @property
    def pre_lm(self) -> bool:
        """Selects before the language model (DivPrune, prompt-aware): every layer sees only the chosen k."""
        return self.pruner.where == "pre_lm"

    @property
    def uses_prompt(self) -> bool:
        return self.pruner.uses_prompt

    @property
    def ranks_in_lm(self) -> bool:
        """FastV: ranks with layer K-1's attention from the last prompt token, inside the prefill."""
        return self.pruner.where == "in_lm"

    def layers(self, n_layers: int) -> tuple[int, int, list[bool]]:
        """(K, score layer, which layers see only the selected visual tokens: FastV's K.., all for pre-LM)."""
        k, s = resolve_layers(self, n_layers)
        return k, s, [self.pre_lm or (self.ranks_in_lm and i >= k) for i in range(n_layers)]

    def budget(self, n_visual: int) -> int:
        return kept_count(self.retention, n_visual)

    def select(self, features: torch.Tensor, prompt_embeddings: torch.Tensor | None, k: int) -> torch.Tensor:
        """A pre-LM pruner's choice of k tokens on the projected visual features."""
        return self.pruner.select(features, prompt_embeddings, k, self)

    def rank(self, attention: torch.Tensor, k: int) -> torch.Tensor:
        """An in-LM pruner's choice of k tokens from layer K-1's attention (heads, n_visual)."""
        return self.pruner.select(attention, k, self)

    def due(self, step: int) -> bool:
        """Can the trigger fire at this step? Every `dstp_interval` steps, or every step when a shift threshold
        is set (the host's candidate must then be computed to be compared)."""
        return self.dstp_shift_threshold > 0 or step % self.dstp_interval == 0

    def reselect(
        self,
        relevance: torch.Tensor,
        active: torch.Tensor,
        step: int,
        features: torch.Tensor | None = None,
        decoded: torch.Tensor | None = None,
        prompt: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, bool, torch.Tensor]:
        """DSTP for one row: the host's own rule (`host_reselect`) on the decoding state, then the trigger.
        The state is the recent `decoded` tokens' embeddings, averaged with the `prompt`'s mean embedding
        when `dstp_state` is prompt+decoded. Returns (set in use, re-selected?, the host's candidate set)."""
        state = decoded
        if decoded is not None and prompt is not None and self.dstp_state == "prompt+decoded":
            state = torch.stack([prompt, decoded.mean(0)])  # the question and the words written, equally
        cand = self.pruner.reselect(relevance, len(active), features, state, self).to(active.device)
        now, fired, _ = dstp_update(cand, active, step, self.dstp_interval, self.dstp_shift_threshold)
        return now, fired, cand

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
            dstp_window=p.dstp_window,
            dstp_state=p.dstp_state,
            repetition_penalty=cfg.generation.repetition_penalty,
        )


def resolve_layers(spec: PruneSpec, n_layers: int) -> tuple[int, int]:
    """(effective FastV K, effective score layer) for a model with `n_layers` decoder layers."""
    if n_layers < 2 and spec.ranks_in_lm:
        raise ValueError(f"{spec.method} needs at least 2 decoder layers (one to rank, one to prune)")
    k = spec.fastv_layer
    if k > n_layers - 1:
        if spec.ranks_in_lm:
            warnings.warn(
                f"prune.fastv_layer={k} but the model has {n_layers} decoder layers; using K={n_layers - 1}",
                stacklevel=3,
            )
        k = max(1, n_layers - 1)
    s = spec.score_layer if spec.score_layer >= 0 else k - 1
    if not 0 <= s < n_layers:
        raise ValueError(f"prune.score_layer={spec.score_layer} is outside 0..{n_layers - 1}")
    return k, s


def user_text_mask(input_ids: torch.Tensor, vision_end_id: int, end_id: int) -> torch.Tensor:
    """(B, L) bool: the user's text tokens, strictly between the last `<|vision_end|>` and the next
    end-of-turn token; `question_mask` narrows it to what the prompt-aware relevance pools."""
    out = torch.zeros_like(input_ids, dtype=torch.bool)
    for b, row in enumerate(input_ids.tolist()):
        starts = [i for i, t in enumerate(row) if t == vision_end_id]
        if not starts:
            continue
        s = starts[-1] + 1
        e = next((i for i in range(s, len(row)) if row[i] == end_id), len(row))
        out[b, s:e] = True
    return out


def question_mask(
    input_ids: torch.Tensor, tok, vision_end_id: int, end_id: int, prefix: str = "", instruction: str = ""
) -> torch.Tensor:
    """(B, L) bool: `user_text_mask` less the tokens lying wholly inside the leading `prefix` or the trailing
    "\\n" + `instruction` (the prompt's CoT instruction and ratio sentence), i.e. the question and options.
    Character spans come from cumulative decoding, so a token merged across a boundary stays; a side the span
    does not start (end) with is left alone."""
    out = user_text_mask(input_ids, vision_end_id, end_id)
    tail = "\n" + instruction if instruction else ""
    for b in range(out.shape[0]):
        pos = out[b].nonzero().flatten().tolist()
        ids = input_ids[b, pos].tolist()
        ends = [len(tok.decode(ids[: i + 1], clean_up_tokenization_spaces=False)) for i in range(len(ids))]
        text = tok.decode(ids, clean_up_tokenization_spaces=False)
        head = len(prefix) if prefix and text.startswith(prefix) else 0
        foot = len(text) - len(tail) if tail and text.endswith(tail) else len(text)
        for i, p in enumerate(pos):
            start = ends[i - 1] if i else 0
            out[b, p] = ends[i] > head and start < foot
    return out
