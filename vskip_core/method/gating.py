"""The union-of-saliency gate (V-Skip) and the baselines that share its interface.

Stage 02 gives every rationale token two scores: linguistic **surprisal** (nats, image in context) and visual
**anchoring** (attention mass on the image). V-Skip keeps a token when *either* path needs it:

    keep = forced  OR  surprisal >= tau_text  OR  anchoring >= tau_visual

so a token that is linguistically predictable but visually grounded (`red` in "the square is red") survives,
where a text-only compressor drops it.

**Units.** With `scoring.word_level` on and the row's `word_ids`, the unit of decision is the whitespace word
(its tokens share one decision); word values follow stage 02's rules (`scoring.word_surprisal`, default sum
= -log p(word); anchoring, the max: a word is anchored if any of its tokens is). Otherwise each token is a unit. Budgets are counted
in tokens: a unit costs its number of tokens.

**Budget.** gamma is the fraction of the rationale *body* kept (the tokens before the final answer line, the
unit of `metrics.act_ratio`): k = round(gamma * n_body), plus the answer line's tokens when it is forced
(`gate.force_keep_answer`; without it the answer line is body like the rest). Forced body tokens (digits,
`gate.force_keep_digits`) count toward k. A row that cannot meet k (empty, no answer line, forced tokens > k,
k = 0) raises `GateError`; `usable_rows` drops such rows and counts them by reason.

**Thresholds and `gate.text_share`** (per example, `gate.threshold_mode: example`). Let b = k - forced.
1. Text path: walk down the surprisal ranking, keeping units while the text path's total fits in
   text_share * b tokens. tau_text is the score of the last unit taken.
2. Visual path: walk down the anchoring ranking over the units not kept yet, until the union holds k tokens.
   tau_visual is the score of the last unit taken.
3. Margin. A unit longer than what is left is passed over for the next one that fits (first fit, in both
   walks). If the count still ends more than one token short of its target (only long units left, e.g.
   multi-token prices), the best-ranked of them goes in and the lowest-ranked units of the visual walk come
   out, exactly as many tokens as needed, so the kept count is its target within one token. The margin is the
   only place where the gate departs from two pure thresholds.
text_share = 1 gives exactly `text_only`, 0 exactly `visual_only`; 0.5 (default) splits the free budget
evenly. The paper does not say how the two thresholds share gamma; `gate.split: symmetric` is the other
reading: one percentile p on both paths (a unit is kept when its surprisal or its anchoring is in the top
1 - p of its rationale), lowered until the union holds k tokens; notebook 03 compares the two.

**Per corpus** (`threshold_mode: corpus`, `fit_corpus_thresholds`): the same walk over the units of all rows
pooled fixes one tau_text and one tau_visual for the corpus; each row then keeps what clears them, and the
corpus keeps gamma of its tokens.

**Methods**, all through the same budget and forced keeps (registered in `registry.GATES`, in this order):

| method       | rule         | keeps the units ranked highest by                                                  |
|--------------|--------------|------------------------------------------------------------------------------------|
| vskip        | union        | surprisal OR anchoring, as above                                                   |
| text_only    | rank         | surprisal (the blind TokenSkip / ASCoT-style metric)                               |
| external_lm  | rank         | `surprisal_external`: a text-only LM that never sees the image (method.external_lm) |
| visual_only  | rank         | anchoring (the paper's lower bound)                                                |
| intersection | intersection | surprisal AND anchoring: both thresholds lowered together, rank by rank            |
| weighted     | rank         | text_share * pct(surprisal) + (1 - text_share) * pct(anchoring); pct = rank / (units - 1) within the rationale |
| random       | rank         | uniform scores seeded by (seed, row id): the same row gets the same draw in any order |
| vskip_delta  | union        | variant: surprisal OR (anchoring - the same token's anchoring on a blank image): position-free |
| vskip_gain   | union        | variant: surprisal OR (surprisal without the image - with it): "hard to predict from text alone but certain given the image", read literally |
| llmlingua2   | rank         | LLMLingua-2's p(keep) (`keep_prob_llmlingua2`, word value = mean), the paper's main baseline; not default (a 2.2 GB model) |

**Adding a method.** A method is a `GateMethod` entry: the (path, score column) pairs it reads, its `rule`
(union, intersection or rank: the selection code dispatches on the rule, never on a name) and, for a score
that is computed, a `unit_scores(ctx) -> one score per unit` function; its label and colour go to every
table and figure (`registry.display`). One file registers it; import it before loading params naming it:

    import numpy as np
    from vskip_core.method.gating import register_gate

    def _longest(ctx):  # ctx: UnitContext (row, unit of each token, n_units, path values, gate, seed)
        chars = ctx.row.offsets[:, 1] - ctx.row.offsets[:, 0]
        return np.bincount(ctx.unit, weights=chars, minlength=ctx.n_units)

    register_gate("longest_words", "longest words", "#e377c2", rule="rank", unit_scores=_longest)
    # reading a new score column: paths=[("text", "my_col")], word_rules={"my_col": "max"},
    # fix={"my_col": "how to add it"}

**Measures** of what a mask keeps (the rebuilt text `compress_text`, `actual_ratio`, `varr_text`) are pure functions
in `vskip_core.metrics`; sweeps over methods and gammas, and notebook 03's ablations, in
`vskip_core.stages.gating`.

    rows, skipped = usable_rows(scores.to_dict("records"), gamma=0.3, gate_cfg=cfg)
    keep = keep_mask(rows[0], "vskip", 0.5, cfg)
    text = metrics.compress_text(rows[0], keep)
    metrics.varr_text(rows[0].text, text, example["scene"], metrics.question_words(example))  # example: its benchmark example
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

import vskip_core.registry as registry
from vskip_core.config import Config, GateConfig, ScoringConfig
from vskip_core.runtime import is_missing

RULES = ("union", "intersection", "rank")  # how a method's per-unit scores become a keep set (`_select`)
# how a built-in score column's token values become word values: a ScoringConfig field, or a fixed rule
_WORD_RULE = {
    "surprisal": "word_surprisal",
    "surprisal_external": "word_surprisal",
    "anchoring": "max",
    "keep_prob_llmlingua2": "mean",
    "anchoring_delta": "max",
    "surprisal_gain": "word_surprisal",
}
_FIXED_WORD_RULES = ("max", "mean", "sum")


class UnitContext(NamedTuple):
    """What a method's `unit_scores` function is given for one row (corpus mode pools the rows' scores)."""

    row: Scored  # the row: id, text, offsets, word_ids, score columns
    unit: np.ndarray  # unit (word or token) index of each token
    n_units: int
    values: dict[str, np.ndarray]  # per-unit values of the method's `paths`, by path name
    gate: GateConfig
    seed: int


@dataclass(frozen=True)
class GateMethod:
    """A gate method as the registry holds it: the score columns it reads and the rule that turns their
    per-unit values into a keep set, under the shared budget and forced keeps.

    rule "union": keep a unit when its `text` OR its `visual` path clears its threshold (V-Skip's gate, with
    `gate.text_share` / `gate.split`); "intersection": both paths, lowered together rank by rank; "rank": one
    score per unit, the top units kept: the single path's values, or `unit_scores(ctx) -> np.ndarray` when the
    score is computed (random, weighted)."""

    name: str
    label: str  # how tables and figures name it (registry.display)
    colour: str
    # (path, score column) pairs it reads; union and intersection read two paths named text and visual
    paths: tuple[tuple[str, str], ...] = ()
    rule: str = "rank"  # union | intersection | rank
    # rank only: one score per unit (higher = keep), for a score computed rather than read
    unit_scores: Callable[[UnitContext], np.ndarray] | None = None
    # a new column's word value: max, mean, sum, or a ScoringConfig field (word_surprisal); default _WORD_RULE
    word_rules: Mapping[str, str] = field(default_factory=dict)
    fix: Mapping[str, str] = field(default_factory=dict)  # column -> how to add it when a row lacks it
    default: bool = True  # in the default comparison (gate.methods)

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", tuple((str(p), str(c)) for p, c in self.paths))
        where = f"gate method {self.name!r}"
        if self.rule not in RULES:
            raise ValueError(f"{where}: rule must be one of {list(RULES)}, got {self.rule!r}")
        names = [p for p, _ in self.paths]
        if self.rule in ("union", "intersection") and (
            sorted(names) != ["text", "visual"] or self.unit_scores
        ):
            raise ValueError(
                f"{where}: rule {self.rule!r} reads two paths named text and visual, no unit_scores"
            )
        if self.rule == "rank" and not (self.unit_scores or len(names) == 1):
            raise ValueError(f"{where}: rule 'rank' needs one path, or a unit_scores function")
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: path names repeat: {names}")
        scoring_fields = {f.name for f in dataclasses.fields(ScoringConfig)}
        for col in self.columns:
            how = self.word_rule(col)
            if how is None or not (how in _FIXED_WORD_RULES or how in scoring_fields):
                raise ValueError(
                    f"{where}: column {col!r} needs a word rule (word_rules={{{col!r}: 'max'}}: max, mean, sum, "
                    f"or a scoring field such as 'word_surprisal'), got {how!r}"
                )

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(col for _, col in self.paths)

    def word_rule(self, column: str) -> str | None:
        return self.word_rules.get(column, _WORD_RULE.get(column))


def register_gate(
    name: str,
    label: str,
    colour: str,
    paths: Sequence[tuple[str, str]] = (),
    rule: str = "rank",
    unit_scores: Callable[[UnitContext], np.ndarray] | None = None,
    word_rules: Mapping[str, str] | None = None,
    fix: Mapping[str, str] | None = None,
    default: bool = True,
    replace: bool = False,
) -> GateMethod:
    """Register a gate method under `name` (config, gating and stage 03 accept it) with its label and colour."""
    method = GateMethod(
        name, label, colour, tuple(paths), rule, unit_scores, dict(word_rules or {}), dict(fix or {}), default
    )
    return registry.add(registry.GATES, name, method, label, colour, replace)


def unregister_gate(name: str) -> None:
    registry.remove(registry.GATES, name)


def gate_method(name: str) -> GateMethod:
    """The registered method; an unknown name raises the registry's error (the names, the nearest one)."""
    return registry.GATES.get(name)


def default_methods() -> list[str]:
    """The registered methods of the default comparison, in registration order."""
    return [n for n in registry.GATES if registry.GATES.get(n).default]


def score_columns() -> tuple[str, ...]:
    """Every score column a registered method reads (what `as_scored` takes from a row)."""
    return tuple(dict.fromkeys(c for n in registry.GATES for c in registry.GATES.get(n).columns))


def method_columns(method: str) -> tuple[str, ...]:
    """The score columns a gate method reads."""
    return gate_method(method).columns


def column_fix(column: str) -> str:
    """How to add a score column a row lacks."""
    for n in registry.GATES:
        fix = registry.GATES.get(n).fix
        if column in fix:
            return fix[column]
    return "run stage 02"


def _word_rule(column: str) -> str:
    """A column's word rule: the built-in one, else the first registered method's that reads the column."""
    if column in _WORD_RULE:
        return _WORD_RULE[column]
    for n in registry.GATES:
        how = registry.GATES.get(n).word_rule(column)
        if how is not None and column in registry.GATES.get(n).columns:
            return how
    raise ValueError(f"no word rule for score column {column!r}: no registered gate method reads it")


class GateError(ValueError):
    """A row the gate cannot handle at this budget; `reason` is one of empty_rationale, no_answer_line,
    budget, bad_row, missing_column (the counters of `usable_rows`)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ------------------------------------------------------------------------------------------------ rows
@dataclass
class Scored:
    """One row of scores.parquet as arrays: what every function here reads (`as_scored` builds it)."""

    id: str
    text: str
    offsets: np.ndarray  # (n, 2) character offsets of the teacher's tokens into text
    word_ids: np.ndarray | None  # word index per token, or None (token-level decisions)
    answer_start: int | None  # first token of the final answer line, None if there is none
    columns: dict[str, np.ndarray]  # score columns present: surprisal, anchoring, surprisal_external, ...
    family: str = ""
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n(self) -> int:
        return len(self.offsets)

    def column(self, name: str) -> np.ndarray:
        if name not in self.columns:
            raise GateError("missing_column", f"{self.id}: no {name!r} scores; {column_fix(name)}")
        return self.columns[name]

    def with_scores(self, **columns: Sequence[float]) -> Scored:
        """A copy with score columns replaced (ablations: another key-layer band, head reduction, ...)."""
        new = {**self.columns, **{k: _checked_values(self, k, v) for k, v in columns.items()}}
        return dataclasses.replace(self, columns=new, cache={})


def as_scored(row: Any) -> Scored:
    """A scores row (dict, pandas Series or Scored) as a checked `Scored`; GateError('bad_row') names the
    first inconsistency (lengths, offsets outside the text, non-finite scores)."""
    if isinstance(row, Scored):
        return row
    get = row.get
    rid, text = str(get("id", "?")), get("text")
    if not isinstance(text, str):
        raise GateError("bad_row", f"{rid}: `text` must be the rationale string, got {type(text).__name__}")
    offsets = np.asarray([tuple(o) for o in _listish(get("offsets"))], dtype=np.int64).reshape(-1, 2)
    if len(offsets) and (
        offsets.min() < 0 or offsets.max() > len(text) or (offsets[:, 1] < offsets[:, 0]).any()
    ):
        raise GateError("bad_row", f"{rid}: token offsets fall outside the {len(text)}-character text")
    wids = get("word_ids")
    wids = None if is_missing(wids) else np.asarray(_listish(wids), dtype=np.int64)
    ans = get("answer_start")
    ans = None if is_missing(ans) or int(ans) < 0 or int(ans) >= len(offsets) else int(ans)
    scored = Scored(rid, text, offsets, wids, ans, {}, str(get("family", "") or ""))
    if wids is not None and len(wids) != len(offsets):
        raise GateError("bad_row", f"{rid}: {len(wids)} word_ids for {len(offsets)} tokens")
    for name in score_columns():
        v = get(name)
        if not is_missing(v):
            scored.columns[name] = _checked_values(scored, name, v)
    return scored


def _checked_values(row: Scored, name: str, values: Any) -> np.ndarray:
    v = np.asarray(_listish(values), dtype=np.float64)
    if len(v) != row.n:
        raise GateError("bad_row", f"{row.id}: {name} has {len(v)} values for {row.n} tokens")
    if not np.isfinite(v).all():
        raise GateError(
            "bad_row",
            f"{row.id}: {name} has non-finite values at tokens {np.flatnonzero(~np.isfinite(v))[:5]}",
        )
    return v


def _listish(v: Any) -> list:
    return [] if v is None else list(v)


def _sections(cfg: Config | GateConfig) -> tuple[GateConfig, ScoringConfig]:
    if isinstance(cfg, Config):
        return cfg.gate, cfg.scoring
    if isinstance(cfg, GateConfig):
        return cfg, ScoringConfig()
    raise TypeError(f"pass the Config (or its GateConfig), got {type(cfg).__name__}")


# ------------------------------------------------------------------------------------------------ units
def _units(row: Scored, word_level: bool) -> tuple[np.ndarray, np.ndarray]:
    """Unit index of each token and the token cost of each unit."""
    key = ("units", word_level)
    if key not in row.cache:
        if word_level and row.word_ids is not None:
            unit = np.unique(row.word_ids, return_inverse=True)[1].reshape(-1)
        else:
            unit = np.arange(row.n)
        row.cache[key] = (unit, np.bincount(unit, minlength=unit.max() + 1 if row.n else 0))
    return row.cache[key]


def _unit_values(values: np.ndarray, unit: np.ndarray, n_units: int, how: str) -> np.ndarray:
    if how == "max":
        out = np.full(n_units, -np.inf)
        np.maximum.at(out, unit, values)
        return out
    total = np.bincount(unit, weights=values, minlength=n_units)
    return total / np.bincount(unit, minlength=n_units) if how == "mean" else total


def forced_tokens(row: Any, gate_cfg: Config | GateConfig) -> np.ndarray:
    """Tokens kept whatever their scores: the final answer line (from `answer_start` to the end) and, with
    `gate.force_keep_digits`, every token holding a digit."""
    row, (gate, _) = as_scored(row), _sections(gate_cfg)
    forced = np.zeros(row.n, dtype=bool)
    if gate.force_keep_answer:
        if row.answer_start is None:
            raise GateError(
                "no_answer_line",
                f"{row.id}: no final answer line (answer_start is empty) but gate.force_keep_answer is on; "
                "drop the row (usable_rows does) or set gate.force_keep_answer: false",
            )
        forced[row.answer_start :] = True
    if gate.force_keep_digits:
        forced |= np.array([any(c.isdigit() for c in row.text[s:e]) for s, e in row.offsets], dtype=bool)
    return forced


def unit_scores(row: Scored, method: str, cfg: Config | GateConfig, unit: np.ndarray, seed: int = 0) -> dict:
    """Per-unit scores of a method, keyed by path (text, visual), or by the method's name when its
    `unit_scores` computes one score (weighted, random); higher = keep."""
    gate, scoring = _sections(cfg)
    m = gate_method(method)
    n_units = int(unit.max()) + 1 if len(unit) else 0
    out = {}
    for path, col in m.paths:
        rule = m.word_rule(col)
        out[path] = _unit_values(row.column(col), unit, n_units, getattr(scoring, rule, rule))
    if m.unit_scores is not None:
        scores = np.asarray(m.unit_scores(UnitContext(row, unit, n_units, out, gate, seed)), dtype=np.float64)
        if scores.shape != (n_units,) or not np.isfinite(scores).all():
            raise ValueError(
                f"{method}: unit_scores must return {n_units} finite scores, got shape {scores.shape}"
            )
        return {m.name: scores}
    return out


def gate_values(row: Any, column: str, cfg: Config | GateConfig) -> np.ndarray:
    """Token-aligned values of a score column as the gate ranks them (the word's value at word level)."""
    row, scoring = as_scored(row), _sections(cfg)[1]
    unit, cost = _units(row, scoring.word_level)
    rule = _word_rule(column)
    return _unit_values(row.column(column), unit, len(cost), getattr(scoring, rule, rule))[unit]


def _pct(x: np.ndarray) -> np.ndarray:
    """Percentile rank in [0, 1] (1 = highest), ties broken by position."""
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r / max(len(x) - 1, 1)


# ------------------------------------------------------------------------------------------- selection
def _desc(x: np.ndarray) -> np.ndarray:
    return np.argsort(-x, kind="stable")


def _take_prefix(order: np.ndarray, cost: np.ndarray, taken: np.ndarray, budget: float) -> np.ndarray:
    """Walk `order` (skipping units already taken) and take units while the total stays within `budget`
    tokens: a threshold lowered down a ranking. Returns the units taken."""
    order = order[~taken[order]]
    n = int(np.searchsorted(np.cumsum(cost[order]), budget - cost[taken].sum() + 1e-9, side="right"))
    taken[order[:n]] = True
    return order[:n]


def _fill_margin(
    order: np.ndarray, cost: np.ndarray, taken: np.ndarray, locked: np.ndarray, budget: int, target: float
) -> None:
    """Fill what the thresholds left of `budget` by first fit along `order`. If that still ends more than one
    token short of `target` (only units longer than the room are left, e.g. 6-token prices), take the best
    ranked of them and release the lowest-ranked taken units (never `locked` ones: forced, or kept by the
    text path) that free exactly the excess."""
    used = int(cost[taken].sum())
    for u in order:
        if used >= budget:
            return
        if not taken[u] and used + cost[u] <= budget:
            taken[u] = True
            used += int(cost[u])
    rest = order[~taken[order]]
    if target - used <= 1 or not len(rest):
        return
    excess, drop, freed = used + int(cost[rest[0]]) - budget, [], 0
    for w in order[::-1]:
        if taken[w] and not locked[w] and freed + cost[w] <= excess:
            drop.append(w)
            freed += int(cost[w])
            if freed == excess:
                taken[drop] = False
                taken[rest[0]] = True
                return


def _select(
    scores: dict,
    rule: str,
    cost: np.ndarray,
    forced: np.ndarray,
    budget: int,
    text_share: float,
    target: float | None = None,
    split: str = "share",
) -> tuple[np.ndarray, dict[str, float]]:
    """The gate proper: which units to keep so that `budget` tokens are kept, and the thresholds reached.
    With `target` (gamma of the body + the forced answer line, per example) the margin is filled to the token; per corpus the thresholds
    alone decide."""
    taken, locked = forced.copy(), forced.copy()
    if rule == "union" and split == "symmetric":
        t, v = scores["text"], scores["visual"]
        pt, pv = _pct(t), _pct(v)
        margin = _desc(np.maximum(pt, pv))  # one percentile p lowered on both paths at once
        both = _take_prefix(margin, cost, taken, budget)
        p = float(np.maximum(pt, pv)[both].min()) if len(both) else math.inf
        thresholds = {
            "text": _lowest(t, np.flatnonzero(pt >= p)),
            "visual": _lowest(v, np.flatnonzero(pv >= p)),
        }
    elif rule == "union":
        t, v = scores["text"], scores["visual"]
        f = cost[forced].sum()
        share = lambda total: f + text_share * (total - f)  # noqa: E731  (forced + the text path's share)
        by_text = _take_prefix(_desc(t), cost, taken, share(budget))
        if target is not None:
            _fill_margin(_desc(t), cost, taken, locked, int(share(budget) + 1e-9), share(target))
        locked = taken.copy()  # the visual path adds to what the text path kept
        by_visual = _take_prefix(_desc(v), cost, taken, budget)
        thresholds = {"text": _lowest(t, by_text), "visual": _lowest(v, by_visual)}
        margin = _desc(v)
    elif rule == "intersection":
        t, v = scores["text"], scores["visual"]
        rt, rv = np.argsort(_desc(t)), np.argsort(_desc(v))  # rank 0 = highest
        margin = np.lexsort((np.minimum(rt, rv), np.maximum(rt, rv)))  # both thresholds lowered together
        both = _take_prefix(margin, cost, taken, budget)
        thresholds = {"text": _lowest(t, both), "visual": _lowest(v, both)}
    else:
        ((path, s),) = scores.items()
        margin = _desc(s)
        thresholds = {path: _lowest(s, _take_prefix(margin, cost, taken, budget))}
    if target is not None:
        _fill_margin(margin, cost, taken, locked, budget, target)
    return taken, thresholds


def _lowest(x: np.ndarray, units: np.ndarray) -> float:
    return float(x[units].min()) if len(units) else math.inf  # inf: the path keeps nothing


def _apply(scores: dict, rule: str, thresholds: dict[str, float]) -> np.ndarray:
    """Fitted thresholds applied to one row's units (corpus mode)."""
    if rule == "union":
        return (scores["text"] >= thresholds["text"]) | (scores["visual"] >= thresholds["visual"])
    if rule == "intersection":
        return (scores["text"] >= thresholds["text"]) & (scores["visual"] >= thresholds["visual"])
    ((path, s),) = scores.items()
    return s >= thresholds[path]


class _Prepared(NamedTuple):
    row: Scored
    gate: GateConfig
    gamma: float
    unit: np.ndarray  # unit index of each token
    cost: np.ndarray  # tokens per unit
    forced: np.ndarray  # forced units
    scores: dict[str, np.ndarray]  # per-unit scores by path


def _prepare(row: Any, method: str, gamma: float | None, cfg: Config | GateConfig, seed: int) -> _Prepared:
    row = as_scored(row)
    gate, scoring = _sections(cfg)
    gate_method(method)  # an unknown name fails here, with the registered names
    gamma = gate.gamma if gamma is None else gamma
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if row.n == 0:
        raise GateError(
            "empty_rationale", f"{row.id}: empty rationale (no tokens); drop it (usable_rows does)"
        )
    unit, cost = _units(row, scoring.word_level)
    forced = np.bincount(unit, weights=forced_tokens(row, gate), minlength=len(cost)) > 0
    return _Prepared(row, gate, gamma, unit, cost, forced, unit_scores(row, method, cfg, unit, seed))


def body_length(row: Scored, gate: GateConfig) -> int:
    """Tokens gamma applies to: those before a forced answer line (all of them when it is not forced)."""
    return row.answer_start if gate.force_keep_answer and row.answer_start is not None else row.n


def kept_target(row: Scored, gamma: float, gate: GateConfig) -> float:
    """gamma of the body, plus the forced answer line (the kept count the margin fills to)."""
    n_body = body_length(row, gate)
    return gamma * n_body + (row.n - n_body)


def _budget(row: Scored, gamma: float, cost: np.ndarray, forced: np.ndarray, gate: GateConfig) -> int:
    n_body = body_length(row, gate)
    k_body = round(gamma * n_body)  # half to even: no systematic half-token bias over a corpus
    if k_body == 0:
        raise GateError("budget", f"{row.id}: gamma={gamma} keeps 0 of its {n_body} body tokens; raise gamma")
    k = k_body + row.n - n_body
    if cost[forced].sum() > k:
        raise GateError(
            "budget",
            f"{row.id}: its {cost[forced].sum()} forced tokens (answer line / digits) exceed the budget of "
            f"{k} = round({gamma} x {n_body}) body tokens + the answer line; raise gamma or drop the row "
            "(usable_rows does)",
        )
    return k


# ------------------------------------------------------------------------------------------------ API
def keep_mask(
    row: Any,
    method: str,
    gamma: float | None,
    gate_cfg: Config | GateConfig,
    seed: int = 0,
    thresholds: dict | None = None,
) -> np.ndarray:
    """Boolean keep mask over the row's tokens.

    Per example (default): exactly round(gamma * n_body) body tokens kept, plus a forced answer line (at worst
    one short, see the module doc).
    With `thresholds` from `fit_corpus_thresholds`: the corpus thresholds applied to this row.
    `gate_cfg` is the Config (its `scoring` section sets word-level decisions) or just its GateConfig."""
    row, gate, gamma, unit, cost, forced, scores = _prepare(row, method, gamma, gate_cfg, seed)
    if thresholds is not None:
        if thresholds["method"] != method:
            raise ValueError(f"thresholds were fitted for {thresholds['method']!r}, not {method!r}")
        return (forced | _apply(scores, gate_method(method).rule, thresholds["thresholds"]))[unit]
    if gate.threshold_mode == "corpus":
        raise ValueError(
            "gate.threshold_mode is corpus: fit the thresholds on the corpus first, "
            "thresholds = fit_corpus_thresholds(rows, method, gamma, cfg), and pass thresholds=thresholds "
            "(or use gate_rows, which does both)"
        )
    budget = _budget(row, gamma, cost, forced, gate)
    taken, _ = _select(
        scores,
        gate_method(method).rule,
        cost,
        forced,
        budget,
        gate.text_share,
        kept_target(row, gamma, gate),
        gate.split,
    )
    return taken[unit]


def fit_corpus_thresholds(
    rows: Iterable[Any], method: str, gamma: float | None, gate_cfg: Config | GateConfig, seed: int = 0
) -> dict:
    """One threshold per path for the whole corpus, so that the corpus keeps gamma of its body tokens (plus
    the forced answer lines): the walk of the module doc over all rows' units pooled, without the margin step.
    Pass `usable_rows`' rows. Returns {"method", "gamma", "thresholds": {path: tau}, "kept_fraction"}."""
    prepared = [_prepare(r, method, gamma, gate_cfg, seed) for r in rows]
    if not prepared:
        raise ValueError("fit_corpus_thresholds needs at least one row")
    gate, gamma = prepared[0].gate, prepared[0].gamma
    cost = np.concatenate([p.cost for p in prepared])
    forced = np.concatenate([p.forced for p in prepared])
    scores = {path: np.concatenate([p.scores[path] for p in prepared]) for path in prepared[0].scores}
    n = sum(p.row.n for p in prepared)
    n_body = sum(body_length(p.row, gate) for p in prepared)
    k = round(gamma * n_body) + n - n_body  # gamma of the bodies, plus the forced answer lines
    if cost[forced].sum() > k:
        raise GateError(
            "budget", f"the corpus's {cost[forced].sum()} forced tokens exceed gamma={gamma} of {n}"
        )
    rule = gate_method(method).rule
    taken, thresholds = _select(scores, rule, cost, forced, k, gate.text_share, split=gate.split)
    return {
        "method": method,
        "gamma": gamma,
        "thresholds": thresholds,
        "kept_fraction": (cost[taken].sum() - (n - n_body)) / n_body,  # of the bodies
    }


def gate_rows(
    rows: Sequence[Any],
    method: str,
    gamma: float | None,
    cfg: Config | GateConfig,
    seed: int = 0,
    mode: str | None = None,
) -> list[np.ndarray]:
    """Keep masks for every row, per example or per corpus (`mode`, default `gate.threshold_mode`)."""
    mode = mode or _sections(cfg)[0].threshold_mode
    if mode not in ("example", "corpus"):
        raise ValueError(f"mode must be example or corpus, got {mode!r}")
    rows = [as_scored(r) for r in rows]
    thresholds = fit_corpus_thresholds(rows, method, gamma, cfg, seed) if mode == "corpus" else None
    if thresholds is None and _sections(cfg)[0].threshold_mode == "corpus":
        cfg = _with_mode(cfg, "example")
    return [keep_mask(r, method, gamma, cfg, seed, thresholds) for r in rows]


def _with_mode(cfg: Config | GateConfig, mode: str) -> Config | GateConfig:
    if isinstance(cfg, Config):
        return dataclasses.replace(cfg, gate=dataclasses.replace(cfg.gate, threshold_mode=mode))
    return dataclasses.replace(cfg, threshold_mode=mode)


def usable_rows(
    rows: Iterable[Any], gamma: float, gate_cfg: Config | GateConfig
) -> tuple[list[Scored], Counter]:
    """The rows the gate can serve at every gamma >= `gamma` (pass the smallest of a sweep), as `Scored`, and
    a Counter of the others by reason: empty_rationale, no_answer_line, budget, bad_row."""
    kept, skipped = [], Counter()
    for r in rows:
        try:
            p = _prepare(r, "random", gamma, gate_cfg, 0)
            _budget(p.row, p.gamma, p.cost, p.forced, p.gate)
        except GateError as e:
            skipped[e.reason] += 1
            continue
        kept.append(p.row)
    return kept, skipped


# ------------------------------------------------------------------------------------------ built-ins
def _random_scores(ctx: UnitContext) -> np.ndarray:
    """Uniform scores seeded by (seed, row id): the same row gets the same draw in any order."""
    return np.random.default_rng([ctx.seed, zlib.crc32(ctx.row.id.encode())]).random(ctx.n_units)


def _weighted_scores(ctx: UnitContext) -> np.ndarray:
    """text_share * pct(surprisal) + (1 - text_share) * pct(anchoring), percentiles within the rationale."""
    w = ctx.gate.text_share
    return w * _pct(ctx.values["text"]) + (1 - w) * _pct(ctx.values["visual"])


_TEXT, _VISUAL = ("text", "surprisal"), ("visual", "anchoring")
_BLANK_PASS = "stage 02 writes it with scoring.blank_image on (the blank-image pass)"
# registration order is the default comparison's order (gate.methods); replace=True: a module reload redefines them
register_gate("vskip", "vskip", "#1f77b4", (_TEXT, _VISUAL), "union", replace=True)
register_gate("text_only", "text_only", "#ff7f0e", (_TEXT,), "rank", replace=True)
register_gate(
    "external_lm", "external_lm", "#2ca02c", [("text", "surprisal_external")], "rank",
    fix={"surprisal_external": "add it with vskip_core.stages.gating.external_scores (notebook 03 does)"},
    replace=True,
)  # fmt: skip
register_gate("visual_only", "visual_only", "#9467bd", (_VISUAL,), "rank", replace=True)
register_gate("intersection", "intersection", "#e377c2", (_TEXT, _VISUAL), "intersection", replace=True)
register_gate("weighted", "weighted", "#17becf", (_TEXT, _VISUAL), "rank", _weighted_scores, replace=True)
register_gate("random", "random", "#bcbd22", (), "rank", _random_scores, replace=True)
# variants of the visual path, through the union gate: position-free anchoring, and the surprisal gain
register_gate(
    "vskip_delta", "vskip_delta", "#aec7e8", (_TEXT, ("visual", "anchoring_delta")), "union",
    fix={"anchoring_delta": _BLANK_PASS}, replace=True,
)  # fmt: skip
register_gate(
    "vskip_gain", "vskip_gain", "#393b79", (_TEXT, ("visual", "surprisal_gain")), "union",
    fix={"surprisal_gain": _BLANK_PASS}, replace=True,
)  # fmt: skip
# LLMLingua-2 needs its model (a 2.2 GB download): valid, but not in the default comparison
register_gate(
    "llmlingua2", "llmlingua2", "#d62728", [("text", "keep_prob_llmlingua2")], "rank",
    fix={"keep_prob_llmlingua2":
         "add it with vskip_core.stages.gating.external_scores, llmlingua2 in gate.methods"},
    default=False, replace=True,
)  # fmt: skip
