"""The registries (vskip_core.registry): a gate method and a pruner added in this file alone reach the params, the
gate, pruned decoding, stage 07's exactness check and the figures' labels and colours; every built-in is
registered with its label and colour; unknown names fail with the registered names and the nearest one."""

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vskip_core import registry
from vskip_core.config import ParamsError, load_params
from vskip_core.method import gating as G
from vskip_core.method import pruning as P

LONGEST, STRIDE = "longest_words", "stride"
GATE_BUILTINS = (
    "vskip", "text_only", "external_lm", "visual_only", "intersection", "weighted", "random",
    "vskip_delta", "vskip_gain", "llmlingua2",
)  # fmt: skip


# ------------------------------------------------------------------------------------ the toy methods
def _longest(ctx: G.UnitContext) -> np.ndarray:
    """Keep the longest units: a unit's score is its number of characters."""
    chars = ctx.row.offsets[:, 1] - ctx.row.offsets[:, 0]
    return np.bincount(ctx.unit, weights=chars, minlength=ctx.n_units)


def _stride(features, prompt, k, spec):
    """Every n-th visual token, n = n_visual // k (pre-LM: on the projected features)."""
    assert prompt is None  # registered without uses_prompt: the decoder passes no prompt
    n = features.shape[0]
    return torch.arange(0, n, n // k)[:k]


def _stride_again(relevance, k, features, state, spec):
    """DSTP host rule: the same rule, so the set never changes."""
    return _stride(features, None, k, spec)


@pytest.fixture(scope="module", autouse=True)
def toys():
    """Registered for this module only: the finalizer unregisters them, so no other test sees them."""
    G.register_gate(LONGEST, "longest words", "#123456", rule="rank", unit_scores=_longest, default=False)
    P.register_pruner(STRIDE, "every n-th token", "#654321", "pre_lm", _stride, _stride_again)
    yield
    G.unregister_gate(LONGEST)
    P.unregister_pruner(STRIDE)
    assert LONGEST not in registry.GATES and STRIDE not in registry.PRUNERS
    assert registry.display(LONGEST).label == LONGEST  # back to the neutral fallback


@pytest.fixture(scope="module")
def rows():
    """40 gold rationales of the smoke benchmark, tokenized by a BPE trained on benchmark text, with seeded
    random scores (test_gating's synthetic rows, smaller)."""
    from vskip_core.data.embedded import make_example
    from vskip_core.method.scoring import answer_token_start, word_ids
    from vskip_core.modeling.loading import train_tokenizer

    cfg = load_params("params/smoke.yaml")
    exs = [make_example(cfg, "train", i) for i in range(40)]
    tok = train_tokenizer([e["question"] + "\n" + e["rationale"] for e in exs], 640)
    rng = np.random.default_rng(0)
    out = []
    for ex in exs:
        text = ex["rationale"]
        off = [
            list(o)
            for o in tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        ]
        out.append(
            {
                "id": ex["id"],
                "text": text,
                "offsets": off,
                "surprisal": rng.gamma(1.0, 1.0, len(off)).tolist(),
                "anchoring": rng.beta(1, 8, len(off)).tolist(),
                "word_ids": word_ids(text, off),
                "answer_start": answer_token_start(text, off),
            }
        )
    return cfg, out


# ----------------------------------------------------------------------------------------- the toy gate
def test_params_accept_the_registered_toys_and_name_the_nearest_on_a_typo():
    cfg = load_params(
        "params/smoke.yaml",
        {
            "gate.methods": ["vskip", LONGEST],
            "distill.methods": [LONGEST],
            "prune.methods": ["fastv", STRIDE],
        },
    )
    assert cfg.gate.methods == ["vskip", LONGEST] and cfg.prune.methods == ["fastv", STRIDE]
    with pytest.raises(
        ParamsError, match=r"gate\.methods\[1\]: .*'longest_words'.*did you mean 'longest_words'"
    ):
        load_params("params/smoke.yaml", {"gate.methods": ["vskip", "longest_word"]})
    with pytest.raises(ParamsError, match=r"prune\.methods\[0\]: .*did you mean 'stride'"):
        load_params("params/smoke.yaml", {"prune.methods": ["strides"]})


def test_toy_gate_keeps_gamma_of_the_body_by_its_own_score(rows):
    cfg, rs = rows
    for gamma in (0.3, 0.5, 0.7):
        for r in rs:
            keep = G.keep_mask(r, LONGEST, gamma, cfg)
            body = r["answer_start"]
            assert keep[body:].all()  # the forced answer line
            assert abs(keep[:body].sum() - gamma * body) <= 1, (gamma, r["id"])
            # the same ranking read from a score column gives the same mask: the text path's word value is
            # the sum over the word's tokens, so token surprisal = token characters ranks words by length
            chars = [e - s for s, e in r["offsets"]]
            assert np.array_equal(keep, G.keep_mask({**r, "surprisal": chars}, "text_only", gamma, cfg))
    r = rs[0]
    kept, dropped = (G.keep_mask(r, LONGEST, 0.5, cfg)[: r["answer_start"]] == v for v in (True, False))
    lengths = np.array([e - s for s, e in r["offsets"][: r["answer_start"]]])
    assert lengths[kept].mean() > lengths[dropped].mean()


def test_toy_gate_fits_one_corpus_threshold_on_its_score(rows):
    cfg, rs = rows
    th = G.fit_corpus_thresholds(rs, LONGEST, 0.5, cfg)
    assert list(th["thresholds"]) == [LONGEST] and 0.45 < th["kept_fraction"] <= 0.5
    for r in rs[:10]:
        s = G.as_scored(r)
        unit = np.unique(s.word_ids, return_inverse=True)[1]  # word-level decisions (scoring.word_level)
        length = np.bincount(unit, weights=s.offsets[:, 1] - s.offsets[:, 0])
        forced = np.zeros(len(length), dtype=bool)
        forced[unit[r["answer_start"] :]] = True  # the answer line's words
        want = (forced | (length >= th["thresholds"][LONGEST]))[unit]
        assert np.array_equal(G.keep_mask(r, LONGEST, 0.5, cfg, thresholds=th), want)


# -------------------------------------------------------------------------------------- the toy pruner
@pytest.fixture(scope="module")
def standin():
    """The tiny Qwen2-VL stand-in (random weights, the stand-in tokenizer) and three benchmark examples."""
    from vskip_core.config import DataConfig
    from vskip_core.data.embedded import make_example
    from vskip_core.modeling.adapters import build_tiny
    from vskip_core.modeling.standins import tokenizer_texts

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only spin-waits on a shared machine
    model, tok, proc = build_tiny("qwen2_vl", tokenizer_texts())
    yield (
        SimpleNamespace(model=model, tokenizer=tok, processor=proc),
        [make_example(DataConfig(), "test", i) for i in range(3)],
    )
    torch.set_num_threads(n)


def test_toy_pruner_keeps_exactly_its_k_tokens_with_and_without_dstp(standin):
    from vskip_core.stages import pruning as stage

    loaded, exs = standin
    base = stage.generate_pruned(loaded, exs, P.PruneSpec(STRIDE, 0.333), 8, batch_size=3)
    spec = P.PruneSpec(STRIDE, 0.333, dstp=True, dstp_interval=1)
    assert spec.pre_lm and not spec.uses_prompt and not spec.ranks_in_lm and spec.name == "stride+dstp"
    dstp = stage.generate_pruned(loaded, exs, spec, 8, batch_size=3)
    for b, d in zip(base, dstp):
        n = b["n_visual"]
        k = P.kept_count(0.333, n)
        assert b["kept"] == d["kept"] == list(range(0, n, n // k))[:k]
        assert b["visual_tokens"] == d["visual_tokens"] == k  # every layer sees only the k (pre-LM)
        assert b["reselections"] == 0 and d["reselections"] == len(d["host_rvis"]) > 0  # fires every step
        assert d["swapped_in"] == 0 and set(d["host_rvis"]) == {1.0}  # the host rule re-selects the same set
        assert d["token_ids"] == b["token_ids"]  # DSTP that never changes the set decodes the same
    assert P.host_reselect(STRIDE, torch.rand(12), 4, torch.rand(12, 8)).tolist() == [0, 3, 6, 9]


def test_stage_07s_exactness_check_covers_the_toy_pruner(standin):
    from vskip_core.stages import pruning as stage

    loaded, exs = standin
    cfg = load_params("params/smoke.yaml")
    res = stage.exactness_check(loaded, exs[:2], cfg, max_new_tokens=6)
    res.pop("generation_config")
    assert {f"{STRIDE}{d} ({v})" for d in ("", "+dstp") for v in P.VARIANTS} <= set(res)
    assert all(res.values()), res


# ------------------------------------------------------------------------------------ display, errors
def test_toys_have_their_label_and_colour_in_tables_and_figures():
    from vskip_core import plots

    assert registry.display(LONGEST) == registry.Display("longest words", "#123456")
    assert registry.display(STRIDE) == registry.Display("every n-th token", "#654321")
    assert plots._colour(LONGEST) == "#123456" and plots._label(STRIDE) == "every n-th token"


def test_unknown_names_and_bad_entries_fail_clearly(rows):
    cfg, rs = rows
    with pytest.raises(
        registry.UnknownName, match=r"unknown gate method 'longest_wrds'; did you mean 'longest_words'"
    ):
        registry.GATES.get("longest_wrds")
    with pytest.raises(
        ValueError, match=r"unknown gate method 'longest_wrds'.*Registered: \[.*'longest_words'\]"
    ):
        G.keep_mask(rs[0], "longest_wrds", 0.5, cfg)
    with pytest.raises(ValueError, match=r"unknown pruning method 'strid'.*did you mean 'stride'"):
        P.PruneSpec("strid", 0.5)
    with pytest.raises(ValueError, match="already registered"):
        G.register_gate(LONGEST, "again", "#000000", rule="rank", unit_scores=_longest)
    with pytest.raises(ValueError, match="already registered"):
        P.register_pruner(STRIDE, "again", "#000000", "pre_lm", _stride, _stride_again)
    with pytest.raises(ValueError, match="rule must be one of"):
        G.register_gate("toy_bad", "bad", "#000000", rule="vote", unit_scores=_longest)
    with pytest.raises(ValueError, match="reads two paths named text and visual"):
        G.register_gate("toy_bad", "bad", "#000000", [("text", "surprisal")], rule="union")
    with pytest.raises(ValueError, match="needs a word rule"):
        G.register_gate("toy_bad", "bad", "#000000", [("text", "my_column")])
    with pytest.raises(ValueError, match="where must be one of"):
        P.register_pruner("toy_bad", "bad", "#000000", "post_lm", _stride, _stride_again)
    with pytest.raises(ValueError, match="unpruned control"):
        P.register_pruner("none", "bad", "#000000", "pre_lm", _stride, _stride_again)
    assert "toy_bad" not in registry.GATES and "toy_bad" not in registry.PRUNERS


def test_a_new_score_column_is_read_with_its_word_rule_and_fix(rows):
    cfg, rs = rows
    G.register_gate("toy_column", "toy column", "#abcdef", [("text", "toy_score")], word_rules={"toy_score": "max"},
                    fix={"toy_score": "write it yourself"})  # fmt: skip
    try:
        r = rs[1]
        with pytest.raises(G.GateError, match="no 'toy_score' scores; write it yourself"):
            G.keep_mask(r, "toy_column", 0.5, cfg)
        vals = np.random.default_rng(1).random(len(r["offsets"]))
        keep = G.keep_mask({**r, "toy_score": vals.tolist()}, "toy_column", 0.5, cfg)
        word_max = G.gate_values({**r, "toy_score": vals.tolist()}, "toy_score", cfg)
        assert np.array_equal(
            keep, G.keep_mask({**r, "anchoring": word_max.tolist()}, "visual_only", 0.5, cfg)
        )
    finally:
        G.unregister_gate("toy_column")
    assert "toy_score" not in G.score_columns()


def test_every_builtin_is_registered_with_its_rule_label_and_colour():
    assert set(GATE_BUILTINS) <= set(registry.GATES) and {"fastv", "divprune", "zspaprune"} <= set(
        registry.PRUNERS
    )
    rules = {n: registry.GATES.get(n).rule for n in GATE_BUILTINS}
    assert {n for n, r in rules.items() if r == "union"} == {"vskip", "vskip_delta", "vskip_gain"}
    assert rules["intersection"] == "intersection" and rules["weighted"] == rules["random"] == "rank"
    assert [n for n in GATE_BUILTINS if not registry.GATES.get(n).default] == ["llmlingua2"]
    names = (*GATE_BUILTINS, "fastv", "divprune", "zspaprune")
    for n in names:
        d = registry.DISPLAY[n]  # registered, not the fallback
        assert d.label and re.fullmatch(r"#[0-9a-f]{6}", d.colour), n
    assert len({registry.display(n).colour for n in GATE_BUILTINS}) == len(
        GATE_BUILTINS
    )  # figures tell them apart
    assert registry.display("zspaprune").label == "prompt-aware"  # stage 07's name for it
    assert [P.PruneSpec(m).pre_lm for m in ("none", "fastv", "divprune", "zspaprune")] == [
        False,
        False,
        True,
        True,
    ]
    assert [P.PruneSpec(m).uses_prompt for m in ("fastv", "divprune", "zspaprune")] == [False, False, True]
    assert tuple(P.METHODS)[:4] == ("none", "fastv", "divprune", "zspaprune")


# ------------------------------------------------------------------------------ through the public API
def test_the_toy_gate_and_pruner_run_through_the_public_api(tiny_teacher, tmp_path):
    """Registered in this file alone: `Compressor.compress` keeps gamma with the toy gate (the longest words
    first), `generate_pruned` decodes with the toy pruner (+DSTP) on the stand-in Qwen2-VL."""
    import dataclasses

    from vskip_core import Compressor, generate_pruned, load_vlm
    from vskip_core.data.real import example_at

    cfg = tiny_teacher[0]
    cfg = dataclasses.replace(cfg, scoring=dataclasses.replace(cfg.scoring, layer_select="band"))
    ex = example_at(cfg, "train", 0)
    comp = Compressor.from_pretrained("embedded", cfg)
    out = comp.compress(ex["image"], ex["question"], ex["rationale"], 0.5, LONGEST, ex["options"])
    body = out.scores.answer_start
    assert abs(out.kept_ratio - 0.5) <= 1.5 / body
    kept_chars = [len(t.strip()) for t, k in zip(out.scores.tokens[:body], out.keep[:body]) if k]
    dropped_chars = [len(t.strip()) for t, k in zip(out.scores.tokens[:body], out.keep[:body]) if not k]
    assert np.mean(kept_chars) > np.mean(dropped_chars)

    std = load_params("params/standin/qwen2vl_7b.yaml", {"runtime.cache_dir": str(tmp_path / "cache")})
    vlm = load_vlm("standin:qwen2_vl", std)
    rec = generate_pruned(vlm, ex["image"], ex["question"], STRIDE, 0.25, True, 8, std, return_record=True)
    n = rec["n_visual"]
    k = max(1, round(0.25 * n))
    assert rec["visual_tokens"] == k and rec["kept"] == list(range(0, n, n // k))[:k]
    assert rec["reselections"] > 0 and rec["swapped_in"] == 0  # DSTP fired, the host rule kept the same set
