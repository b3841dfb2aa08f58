"""Visual-token pruning (rules in vskip_core.method.pruning, the decoder in vskip_core.modeling.pruned_decoding,
stage plumbing in vskip_core.stages.pruning): the selection rules on hand-built features, and the decoding engine
on tiny random Qwen2-VL / Qwen2.5-VL models against the model's own forward and generate."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from vskip_core.method import pruning as vt
from vskip_core.modeling import pruned_decoding as dec
from vskip_core.stages import pruning as stage

STEPS = 16


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run on one thread: two threads spin-wait against other jobs on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    from vskip_core.modeling.loading import train_tokenizer

    return train_tokenizer(["the red circle costs $4.20 Answer: yes no blue square left right"] * 20, 320)


def _tiny_model(tok, family: str, layers: int = 3, seed: int = 0):
    """A random model of the real class; init std 0.2 so greedy choices are decisive and the image matters."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    from vskip_core.modeling.adapters import get_adapter

    conf = get_adapter(family).tiny_config(tok, hidden=64, layers=layers, heads=4, kv_heads=2)
    conf.text_config.initializer_range = 0.2
    conf._attn_implementation = "eager"
    conf.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    cls = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    return cls(conf).eval()


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def model(request, tok):
    return _tiny_model(tok, request.param)


@pytest.fixture(scope="module")
def qwen2(tok):
    return _tiny_model(tok, "qwen2_vl")


def _inputs(model, tok, lens=(12, 7, 15), size=112, seed=0):
    """A left-padded batch built like `encode` + `collate`: text, <|vision_start|>, image pads, <|vision_end|>,
    text (rows of different lengths, so padding and per-row positions are exercised)."""
    from vskip_core.modeling.adapters import get_adapter

    proc = get_adapter("qwen2_vl").tiny_image_processor()
    proc.min_pixels = proc.max_pixels = size * size
    rng = np.random.default_rng(seed)
    imgs = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in lens]
    vis = proc(images=imgs, return_tensors="pt")
    n = int(vis["image_grid_thw"][0].prod()) // 4
    c = tok.convert_tokens_to_ids
    rows = []
    for n_text in lens:
        t = rng.integers(10, 300, n_text).tolist()
        rows.append(
            [c("<|im_start|>"), *t[:3], c("<|vision_start|>")]
            + [model.config.image_token_id] * n
            + [c("<|vision_end|>"), *t[3:], c("<|im_end|>")]
        )
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), tok.pad_token_id)
    attn = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, L - len(r) :] = torch.tensor(r)
        attn[b, L - len(r) :] = 1
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "mm_token_type_ids": (ids == model.config.image_token_id).long(),
        "pixel_values": vis["pixel_values"],
        "image_grid_thw": vis["image_grid_thw"],
    }


def _run(model, x, tok, spec, steps=STEPS, **kw):
    return dec.pruned_generate(model, x, spec, steps, None, tok.pad_token_id, **kw)


def _hf_greedy(model, x, tok, steps=STEPS):
    out = model.generate(
        **x, max_new_tokens=steps, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None
    )
    return out[:, x["input_ids"].shape[1] :]


# ----------------------------------------------------------------------------------------------- budget
@pytest.mark.parametrize("bad", [0, 0.0, -0.2, 1.01, 2, float("nan"), float("inf"), "0.5", None, True])
def test_bad_retention_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"retention must be .*\(0, 1\]"):
        vt.check_retention(bad)
    with pytest.raises(ValueError, match="retention"):
        vt.PruneSpec("fastv", bad)


def test_bad_retention_in_params_names_the_key():
    from vskip_core.config import ParamsError, load_params

    with pytest.raises(ParamsError, match=r"prune\.retentions"):
        load_params("params/smoke.yaml", {"prune.retentions": [0.5, 0.0]})
    with pytest.raises(ParamsError, match=r"prune\.methods"):
        load_params("params/smoke.yaml", {"prune.methods": ["fastvv"]})


def test_bad_method_and_variant_are_clear_errors():
    with pytest.raises(ValueError, match="unknown pruning method 'fastw'"):
        vt.PruneSpec("fastw", 0.5)
    with pytest.raises(ValueError, match="unknown variant"):
        vt.PruneSpec("fastv", 0.5, variant="zero")


@pytest.mark.parametrize("n", [1, 7, 16, 64, 256])
@pytest.mark.parametrize("r", [0.001, 0.111, 0.333, 0.5, 0.666, 1.0])
def test_kept_count_is_rounded_budget(n, r):
    assert vt.kept_count(r, n) == max(1, round(r * n))


@pytest.mark.parametrize("method", ["fastv", "divprune", "zspaprune"])
@pytest.mark.parametrize("r", [0.111, 0.333, 0.666])
def test_engine_keeps_the_budget(qwen2, tok, method, r):
    x = _inputs(qwen2, tok)
    n = int((x["input_ids"][0] == qwen2.config.image_token_id).sum())
    out = _run(qwen2, x, tok, vt.PruneSpec(method, r), steps=3)
    k = max(1, round(r * n))
    assert out.kept.shape == (3, k) and out.n_visual == n
    assert all(len(set(row.tolist())) == k for row in out.kept)
    n_layers = qwen2.config.text_config.num_hidden_layers
    pruned_layers = n_layers - 2 if method == "fastv" else n_layers  # FastV K=2: layers 2.. pruned
    assert out.visual_tokens == pytest.approx((pruned_layers * k + (n_layers - pruned_layers) * n) / n_layers)


# ---------------------------------------------------------------------------------------- selection rules
def test_fastv_select_takes_mean_over_heads():
    att = torch.tensor([[0.1, 0.5, 0.1, 0.2, 0.1], [0.3, 0.1, 0.1, 0.4, 0.1]])  # mean .2 .3 .1 .3 .1
    assert vt.fastv_select(att, 2).tolist() == [1, 3]
    assert vt.fastv_select(att, 1).tolist() == [1]  # tie between 1 and 3: lower index
    assert vt.fastv_select(att, 3).tolist() == [0, 1, 3]
    assert vt.fastv_select(att[1], 1).tolist() == [3]  # one head alone ranks differently


def _features():
    # f1 is almost f0, f4 almost f2; f3 stands apart (its nearest neighbour f4 is at cosine 0.14)
    return torch.tensor(
        [[1.0, 0.0, 0.0], [0.99, 0.14, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.99, 0.14]]
    )


def test_divprune_greedy_max_min():
    f = _features()
    assert vt.divprune_select(f, 1).tolist() == [3]  # the token whose nearest other token is farthest
    assert vt.divprune_select(f, 2).tolist() == [0, 3]  # then farthest from {3}: 0, 1, 2 tie -> 0
    assert vt.divprune_select(f, 3).tolist() == [0, 2, 3]  # never the near-duplicates 1 or 4
    assert vt.divprune_select(f, 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="k must be in 1..5"):
        vt.divprune_select(f, 6)


def test_prompt_aware_core_then_diversity():
    f = _features()
    prompt = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])  # mean-pooled: along f2
    rel = vt.prompt_relevance(f, prompt)
    assert rel.argmax().item() == 2 and rel[4] > rel[1] > rel[0]
    # core = round(0.67 * 3) = 2 most relevant {2, 4}; then farthest from them: f0 (1.0) over f3 (0.86)
    assert vt.prompt_aware_select(f, prompt, 3, 0.67).tolist() == [0, 2, 4]
    assert vt.prompt_aware_select(f, prompt, 3, 1.0).tolist() == [1, 2, 4]  # relevance only
    assert vt.prompt_aware_select(f, prompt, 3, 0.0).tolist() == vt.divprune_select(f, 3).tolist()
    # core {2}; then f0 (tie with f3: lower index), then f3: f1 and f4 duplicate what is chosen
    assert vt.prompt_aware_select(f, prompt, 3, 0.34).tolist() == [0, 2, 3]


def test_dstp_trigger_on_a_constructed_shift():
    active = torch.tensor([0, 1])
    same = torch.tensor([0.5, 0.4, 0.05, 0.03, 0.01, 0.01])
    shifted = torch.tensor([0.01, 0.02, 0.07, 0.1, 0.4, 0.4])  # the relevant region moved to tokens 4, 5
    half = torch.tensor([0.5, 0.02, 0.07, 0.1, 0.3, 0.01])  # top-2 {0, 4}: Jaccard 1/3 with {0, 1}

    def fastv(rel, step, threshold=0.5):
        return vt.dstp_update(vt.host_reselect("fastv", rel, 2), active, step, 8, threshold)

    a, fired, ov = fastv(same, 3)
    assert not fired and ov == 1.0 and a.tolist() == [0, 1]
    a, fired, ov = fastv(shifted, 3)
    assert fired and ov == 0.0 and a.tolist() == [4, 5]
    a, fired, ov = fastv(half, 3)
    assert fired and ov == pytest.approx(1 / 3) and a.tolist() == [0, 4]
    a, fired, _ = fastv(half, 3, threshold=0.3)  # overlap above threshold
    assert not fired and a.tolist() == [0, 1]
    a, fired, _ = fastv(half, 8, threshold=0.0)  # the interval fires
    assert fired and a.tolist() == [0, 4]


def test_each_host_reselects_toward_the_new_region_by_its_own_rule():
    """A scripted toy: 12 visual tokens in two regions (A: 0-5 on directions e0-e2, B: 6-11 on e3-e5), each
    direction twice (the second copy nudged off both regions); the decoding state (its attention and its
    embedding) moves from A to B. Each host re-selects toward B by its own rule: FastV takes the most
    attended (near-duplicates included), the prompt-aware core comes from B and its set has no duplicate
    pair, DivPrune starts from B's most attended token and stays diverse."""
    eye = torch.eye(7)
    feats = torch.stack([eye[d] + c * 0.05 * eye[6] for d in range(6) for c in (0, 1)])
    att_a = torch.tensor([0.2, 0.19, 0.15, 0.14, 0.1, 0.09] + [0.02] * 6)
    att_b = att_a.flip(0)  # the current token now attends to region B (token 11 most)
    state_a, state_b = eye[:3].sum(0)[None], eye[3:6].sum(0)[None]  # recent decoded tokens: about A, then B
    region_b = set(range(6, 12))

    def pick(method, att, state):
        return vt.host_reselect(method, att, 3, feats, state, core_fraction=0.67).tolist()

    def duplicates(sel):
        return any(i // 2 == j // 2 for i in sel for j in sel if i < j)

    assert pick("fastv", att_a, state_a) == [0, 1, 2] and pick("fastv", att_b, state_b) == [9, 10, 11]
    before, after = pick("zspaprune", att_a, state_a), pick("zspaprune", att_b, state_b)
    assert (
        len(set(before) - region_b) >= 2 and len(set(after) & region_b) >= 2
    )  # core from the state's region
    assert not duplicates(after)
    _, fired, ov = vt.dstp_update(
        torch.tensor(after), torch.tensor(before), step=3, interval=8, threshold=0.5
    )
    assert fired and ov < 0.5
    div_a, div_b = pick("divprune", att_a, state_a), pick("divprune", att_b, state_b)
    assert 0 in div_a and 11 in div_b and not duplicates(div_a) and not duplicates(div_b)
    with pytest.raises(ValueError, match="decoding state"):
        vt.host_reselect("zspaprune", att_b, 3, feats, None)


def test_random_jaccard_is_the_exact_expectation():
    # two random 2-subsets of 4: P(same) = 1/6 -> J = 1, P(one shared) = 4/6 -> J = 1/3, P(disjoint) -> 0
    assert vt.random_jaccard(4, 2) == pytest.approx(1 / 6 + 4 / 6 / 3)
    assert vt.random_jaccard(16, 16) == 1.0
    rng = np.random.default_rng(0)
    sims = [
        vt.jaccard(rng.permutation(16)[:5].tolist(), rng.permutation(16)[:5].tolist()) for _ in range(4000)
    ]
    assert vt.random_jaccard(16, 5) == pytest.approx(np.mean(sims), abs=0.01)


def test_rvis_overlaps_and_summary():
    r0 = torch.tensor([0.5, 0.4, 0.05, 0.05])
    trace = torch.stack([r0, r0, torch.tensor([0.05, 0.4, 0.5, 0.05]), torch.tensor([0.0, 0.1, 0.4, 0.5])])
    assert vt.rvis_overlaps(trace, 2) == [1.0, pytest.approx(1 / 3), 0.0]
    recs = [
        {"id": "a", "family": "attribute", "steps": 3, "score_layer": 1, "overlap": {"0.5": [1.0, 1.0, 1.0]}},
        {"id": "b", "family": "multistep", "steps": 3, "score_layer": 1, "overlap": {"0.5": [1.0, 0.5, 0.0]}},
    ]
    s = stage.rvis_summary(recs, n_bins=3, min_count=1)["by_retention"]["0.5"]
    assert s["simple"]["mean"] == 1.0 and s["reasoning"]["mean"] == 0.5 and "chance" not in s
    recs = [{**r, "n_visual": 4} for r in recs]
    summary = stage.rvis_summary(recs, n_bins=3, min_count=1)
    assert summary["by_retention"]["0.5"]["chance"] == pytest.approx(vt.random_jaccard(4, 2))
    assert stage.rvis_table(summary).loc["random top-k", "0.5"] == pytest.approx(vt.random_jaccard(4, 2))
    assert s["multistep"]["curve"] == [1.0, 0.5, 0.0] and s["reasoning"]["final_decile"] == 0.0


# ------------------------------------------------------------------------------------------------ engine
def test_retention_one_reproduces_generate_exactly(model, tok):
    x = _inputs(model, tok)
    ref = _hf_greedy(model, x, tok)
    for method in vt.METHODS:
        for dstp in (False, True):
            for variant in vt.VARIANTS:
                spec = vt.PruneSpec(method, 1.0, dstp=dstp, variant=variant, dstp_interval=2)
                out = _run(model, x, tok, spec)
                assert torch.equal(out.sequences, ref), (spec.name, variant)


def test_pruning_changes_outputs_and_variants_agree(model, tok):
    """The drop variant (shorter sequence and cache) and the mask variant (full length, masked keys) compute
    the same model; DSTP that never fires equals its base method."""
    x = _inputs(model, tok)
    ref = _hf_greedy(model, x, tok)
    for method in ("fastv", "divprune", "zspaprune"):
        base = _run(model, x, tok, vt.PruneSpec(method, 0.333))
        assert not torch.equal(base.sequences, ref), method  # pruning is real on this model
        for dstp in (False, True):
            for variant in vt.VARIANTS:
                spec = vt.PruneSpec(
                    method, 0.333, dstp=dstp, variant=variant, dstp_interval=10**6, dstp_shift_threshold=0.0
                )
                out = _run(model, x, tok, spec)
                assert torch.equal(out.sequences, base.sequences), (spec.name, variant)
                assert torch.equal(out.kept, base.kept)


def _reference_decode(model, embeds, pos3, attn, steps):
    """Greedy decoding through the model's own forward with explicit inputs_embeds and 3D position ids."""
    from transformers import DynamicCache

    inner = model.model
    cache = DynamicCache(config=model.config.text_config)
    out = model(
        inputs_embeds=embeds, position_ids=pos3, attention_mask=attn, past_key_values=cache, use_cache=True
    )
    toks = [out.logits[:, -1].argmax(-1)]
    nxt = pos3.amax(dim=(0, 2))
    for t in range(1, steps):
        e = inner.get_input_embeddings()(toks[-1][:, None])
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
        p = (nxt + t)[None, :, None].expand(3, -1, 1)
        out = model(
            inputs_embeds=e, position_ids=p, attention_mask=attn, past_key_values=cache, use_cache=True
        )
        toks.append(out.logits[:, -1].argmax(-1))
    return torch.stack(toks, 1)


def test_kept_tokens_keep_their_rotary_positions(model, tok):
    """Drop-variant DivPrune equals the model's own forward on the shortened sequence with each kept token's
    original 3D position ids (from get_rope_index on the full sequence), and not with renumbered ones."""
    x = _inputs(model, tok)
    out = _run(model, x, tok, vt.PruneSpec("divprune", 0.333))
    inner = model.model
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(x["input_ids"])
        feats = torch.cat(inner.get_image_features(x["pixel_values"], x["image_grid_thw"]).pooler_output)
        is_img = x["input_ids"] == model.config.image_token_id
        embeds = embeds.masked_scatter(is_img[..., None], feats)
        pos3, _ = inner.get_rope_index(
            x["input_ids"], x["mm_token_type_ids"], x["image_grid_thw"], attention_mask=x["attention_mask"]
        )
        B, L = x["input_ids"].shape
        vis_pos = torch.nonzero(is_img)[:, 1].view(B, -1)
        keep = torch.ones(B, L, dtype=torch.bool)
        keep.scatter_(1, vis_pos, False)
        keep.scatter_(1, vis_pos.gather(1, out.kept), True)
        idx = torch.nonzero(keep)[:, 1].view(B, -1)
        e = embeds.gather(1, idx[..., None].expand(-1, -1, embeds.shape[-1]))
        a = x["attention_mask"].gather(1, idx)
        kept_pos = pos3.gather(2, idx[None].expand(3, -1, -1))
        assert torch.equal(_reference_decode(model, e, kept_pos, a, STEPS), out.sequences)
        renumbered = ((a.cumsum(1) - 1).clamp_min(0))[None].expand(3, -1, -1)
        assert not torch.equal(_reference_decode(model, e, renumbered, a, STEPS), out.sequences)
        # and the kept visual tokens are those DivPrune picks on the projected features
        for b in range(B):
            assert (
                out.kept[b].tolist() == vt.divprune_select(embeds[b, vis_pos[b]], out.kept.shape[1]).tolist()
            )


def test_fastv_ranks_with_layer_k_minus_1_attention_of_last_prompt_token(qwen2, tok):
    x = _inputs(qwen2, tok)
    spec = vt.PruneSpec("fastv", 0.333, fastv_layer=2)
    out = _run(qwen2, x, tok, spec, steps=2)
    with torch.no_grad():
        att = qwen2(**x, output_attentions=True).attentions[1]  # layer K-1 = 1, (B, H, L, L)
    is_img = x["input_ids"] == qwen2.config.image_token_id
    for b in range(x["input_ids"].shape[0]):
        row = att[b, :, -1, is_img[b]]  # last prompt token -> image tokens, per head
        assert out.kept[b].tolist() == vt.fastv_select(row, out.kept.shape[1]).tolist()


def test_prompt_aware_uses_the_prompt_text_embeddings(qwen2, tok):
    x = _inputs(qwen2, tok)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    pm = vt.user_text_mask(x["input_ids"], qwen2.config.vision_end_token_id, end)
    assert pm.sum(1).tolist() == [12 - 3, 7 - 3, 15 - 3]  # the text between <|vision_end|> and <|im_end|>
    out = _run(qwen2, x, tok, vt.PruneSpec("zspaprune", 0.333, core_fraction=0.6), steps=2, prompt_mask=pm)
    inner = qwen2.model
    with torch.no_grad():
        feats = torch.cat(inner.get_image_features(x["pixel_values"], x["image_grid_thw"]).pooler_output)
        text = inner.get_input_embeddings()(x["input_ids"])
    n = feats.shape[0] // 3
    for b in range(3):
        want = vt.prompt_aware_select(feats[b * n : (b + 1) * n], text[b, pm[b]], out.kept.shape[1], 0.6)
        assert out.kept[b].tolist() == want.tolist()


def test_relevance_is_the_models_attention_over_the_full_visual_cache(qwen2, tok):
    """The score layer's relevance at prefill and at decoding step 1 equals the eager attention maps of the
    model's own forward on the full sequence (mean over heads, image columns)."""
    x = _inputs(qwen2, tok)
    S = 1
    out = _run(qwen2, x, tok, vt.PruneSpec("none", score_layer=S), steps=3, record_relevance=True)
    is_img = x["input_ids"] == qwen2.config.image_token_id
    ext = dict(x)
    ext["input_ids"] = torch.cat([x["input_ids"], out.sequences[:, :1]], 1)
    ext["attention_mask"] = torch.cat([x["attention_mask"], torch.ones(3, 1, dtype=torch.long)], 1)
    ext["mm_token_type_ids"] = torch.cat([x["mm_token_type_ids"], torch.zeros(3, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        att = qwen2(**ext, output_attentions=True).attentions[S]
    for b in range(3):
        prefill = att[b, :, -2, : x["input_ids"].shape[1]][:, is_img[b]].mean(0)
        step1 = att[b, :, -1, : x["input_ids"].shape[1]][:, is_img[b]].mean(0)
        torch.testing.assert_close(out.relevance[b][0], prefill, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.relevance[b][1], step1, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["fastv", "divprune", "zspaprune"])
def test_dstp_swaps_by_its_rule_and_the_swapped_tokens_are_used(qwen2, tok, method):
    x = _inputs(qwen2, tok)
    kw = {"dstp_interval": 5, "dstp_shift_threshold": 0.6}
    base = _run(qwen2, x, tok, vt.PruneSpec(method, 0.333))
    drop = _run(qwen2, x, tok, vt.PruneSpec(method, 0.333, dstp=True, **kw), record_relevance=True)
    mask = _run(qwen2, x, tok, vt.PruneSpec(method, 0.333, dstp=True, variant="mask", **kw))
    assert min(drop.swapped_in) > 0  # the relevant set shifts on this model and DSTP follows it
    assert torch.equal(drop.kept, base.kept)  # the prefill choice is the base method's
    assert torch.equal(drop.sequences, mask.sequences)  # swaps by re-gathering == swaps by re-masking
    assert torch.equal(drop.active, mask.active)
    assert not torch.equal(drop.sequences, base.sequences)  # the swapped-in tokens change what is read
    if method != "fastv":
        return  # the other hosts re-select on features and decoded embeddings too (their rules: the toy test)
    # replaying the rule over the recorded relevance gives the engine's re-selections and final set
    for b in range(3):
        active, n_fire, n_swap = drop.kept[b], 0, 0
        for t, rel in enumerate(drop.relevance[b][1:], start=1):
            cand = vt.host_reselect(method, rel, len(active))
            new, fired, _ = vt.dstp_update(cand, active, t, kw["dstp_interval"], kw["dstp_shift_threshold"])
            n_fire += fired
            n_swap += len(set(new.tolist()) - set(active.tolist()))
            active = new
        assert (n_fire, n_swap) == (drop.reselections[b], drop.swapped_in[b])
        assert active.tolist() == drop.active[b].tolist()


def test_sdpa_language_model_works_too(tok):
    """Ranking attention is computed from the layer's own projections, so an sdpa model gives the same
    guarantees: exact at retention 1.0, DSTP swaps by re-gathering == by re-masking."""
    m = _tiny_model(tok, "qwen2_vl")
    m.set_attn_implementation("sdpa")
    assert m.model.language_model.config._attn_implementation == "sdpa"
    x = _inputs(m, tok)
    ref = _hf_greedy(m, x, tok)
    for method in ("fastv", "zspaprune"):
        assert torch.equal(_run(m, x, tok, vt.PruneSpec(method, 1.0, dstp=True)).sequences, ref)
        kw = {"dstp": True, "dstp_interval": 3}
        drop = _run(m, x, tok, vt.PruneSpec(method, 0.333, **kw))
        mask = _run(m, x, tok, vt.PruneSpec(method, 0.333, variant="mask", **kw))
        assert min(drop.swapped_in) > 0 and torch.equal(drop.sequences, mask.sequences)


def test_score_layer_and_fastv_layer_resolution():
    assert vt.resolve_layers(vt.PruneSpec("fastv", 0.5, fastv_layer=2), 4) == (2, 1)
    assert vt.resolve_layers(vt.PruneSpec("divprune", 0.5, score_layer=3), 4) == (2, 3)
    with pytest.warns(UserWarning, match="using K=1"):
        assert vt.resolve_layers(vt.PruneSpec("fastv", 0.5, fastv_layer=2), 2) == (1, 0)
    with pytest.raises(ValueError, match="score_layer=5"):
        vt.resolve_layers(vt.PruneSpec("none", score_layer=5), 4)


def test_mllama_is_refused_with_the_reason():
    class Fake:
        config = type("C", (), {"model_type": "mllama"})()

    with pytest.raises(NotImplementedError, match="cross-attention"):
        dec._model_parts(Fake())


def test_generate_pruned_on_the_embedded_teacher_matches_generate(tiny_teacher):
    """The benchmark path (encode -> collate -> pruned decoding): retention 1.0 equals generation.generate."""
    from vskip_core.data.embedded import make_example
    from vskip_core.modeling.loading import load_model

    cfg, _ = tiny_teacher
    loaded = load_model(cfg)
    exs = [make_example(cfg, "test", i) for i in range(6)]
    res = stage.exactness_check(loaded, exs, cfg, max_new_tokens=12)
    assert res and all(res.values()), res
    gens = stage.generate_pruned(
        loaded, exs, vt.PruneSpec.from_config(cfg, "zspaprune", 0.333, dstp=True), 12, 3
    )
    n = gens[0]["n_visual"]
    assert all(len(g["kept"]) == round(0.333 * n) and not math.isnan(g["prefill_s"]) for g in gens)


# Recorded with the pre-refactor `pruned_generate` (commit 7962155) on the `tiny_teacher` fixture: per setting,
# each example's generated ids, then (kept at prefill | DSTP re-selections | DSTP swapped-in) per example.
_RECORDED = {
    "fastv": (
        [
            "452 364 451 349 265 304 20 324 32 280 20 324",
            "452 364 451 349 265 304 20 324 32 280 26 20",
            "452 364 451 349 265 304 20 324 32 280 20 324",
            "47 417 406 359 416 359 416 359 265 304 20 324",
            "452 364 451 349 265 304 20 324 32 280 26 20",
            "452 364 451 349 265 304 20 324 32 280 26 20",
        ],
        "11 12 13 14 15 / 8 12 13 14 15 / 10 11 12 13 14 / 0 1 2 3 14 / 2 3 11 14 15 / 4 6 7 9 12",
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ),
    "fastv+dstp": (
        [
            "452 364 451 349 265 304 20 324 32 280 26 20",
            "452 364 451 349 265 304 20 324 32 280 26 20",
            "452 364 451 349 265 304 20 324 32 280 20 324",
            "47 417 406 359 416 359 265 304 20 324 32 280",
            "452 364 451 349 265 304 20 324 32 280 26 20",
            "452 364 451 349 265 304 20 324 32 280 26 20",
        ],
        "11 12 13 14 15 / 8 12 13 14 15 / 10 11 12 13 14 / 0 1 2 3 14 / 2 3 11 14 15 / 4 6 7 9 12",
        [7, 7, 7, 8, 7, 9],
        [26, 31, 29, 30, 25, 39],
    ),
    "divprune": (
        [
            "402 341 313 181 540 324 32 280 23 20 324 32",
            "82 441 289 240 289 240 289 240 289 240 289 240",
            "452 364 451 349 265 304 20 324 32 280 23 20",
            "47 417 406 359 416 359 416 359 416 359 416 359",
            "82 441 441 528 267 527 546 188 546 546 546 546",
            "402 426 192 205 402 426 192 205 402 181 267 527",
        ],
        "0 2 3 6 11 / 2 3 4 5 9 / 0 5 10 11 12 / 0 4 5 6 12 / 7 8 10 11 15 / 2 3 8 12 15",
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ),
    "zspaprune": (
        [
            "402 341 313 181 530 173 410 51 89 316 240 93",
            "82 441 289 240 289 240 289 240 289 289 240 289",
            "452 364 451 349 265 304 20 324 32 280 23 20",
            "47 417 406 359 416 359 416 359 416 359 416 359",
            "82 441 441 289 240 188 546 546 546 546 546 546",
            "402 426 192 205 402 426 192 205 402 181 267 527",
        ],
        "0 2 6 10 11 / 1 2 3 4 5 / 0 5 10 11 13 / 0 4 5 6 11 / 8 10 11 14 15 / 2 3 10 12 15",
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ),
}


def test_pruned_decoder_is_deterministic_and_matches_the_pre_refactor_output(tiny_teacher):
    """FastV, DivPrune and prompt-aware, with and without DSTP, at retention 0.333 on the embedded teacher: two
    runs agree exactly, and both equal `_RECORDED` up to CPU rounding (below), the ids produced by the code
    before `pruned_generate` became `PrunedDecoder` (same fixture, 6 test examples, 12 tokens, batch 3,
    OMP_NUM_THREADS=1). The ids also pin the teacher's training: if that changes on purpose, re-record them
    with an unchanged decoder. DivPrune+DSTP and prompt-aware+DSTP re-select by their own rule since issue 19
    (no record: their rule is tested on a scripted toy above); they are checked for determinism here."""
    from vskip_core.data.embedded import make_example
    from vskip_core.modeling.loading import load_model

    cfg, _ = tiny_teacher
    loaded = load_model(cfg)
    exs = [make_example(cfg, "test", i) for i in range(6)]
    for name in ("fastv", "fastv+dstp", "divprune", "divprune+dstp", "zspaprune", "zspaprune+dstp"):
        method, dstp = name.removesuffix("+dstp"), name.endswith("+dstp")
        spec = vt.PruneSpec.from_config(cfg, method, 0.333, dstp=dstp)
        spec = replace(
            spec, dstp_interval=8, dstp_shift_threshold=0.5
        )  # the trigger the record was made with
        runs = [stage.generate_pruned(loaded, exs, spec, 12, 3) for _ in range(2)]
        assert [g["token_ids"] for g in runs[0]] == [g["token_ids"] for g in runs[1]], name
        if name not in _RECORDED:
            continue
        ids, kept, reselections, swapped_in = _RECORDED[name]
        gens = runs[0]
        # The fixture's teacher is trained in the session, so on another CPU its float rounding differs: a
        # max-min or relevance pick between identical flat-colour patches can move by one index (seen on a
        # second VM: 3 picks in 36), and once in 36 generations that changes the decoded ids. A decoder change
        # moves far more than that.
        same = [" ".join(map(str, g["token_ids"])) == want for g, want in zip(gens, ids)]
        assert sum(same) >= 5, (name, same)
        for g, want in zip(gens, kept.split(" / ")):
            got, want = set(g["kept"]), set(map(int, want.split()))
            assert len(got) == len(want) and len(got - want) <= 1, (name, sorted(got), sorted(want))
        for key, want in (("reselections", reselections), ("swapped_in", swapped_in)):
            assert [g[key] for g, ok in zip(gens, same) if ok] == [n for n, ok in zip(want, same) if ok], name


def test_dstp_records_how_much_of_the_host_selection_each_reselection_keeps(qwen2, tok):
    x = _inputs(qwen2, tok)
    out = _run(qwen2, x, tok, vt.PruneSpec("divprune", 0.333, dstp=True, dstp_interval=3))
    for b in range(3):
        assert len(out.host_overlap[b]) == out.reselections[b] > 0
        assert all(0.0 <= j <= 1.0 for j in out.host_overlap[b])
    none = _run(qwen2, x, tok, vt.PruneSpec("divprune", 0.333))
    assert none.host_overlap == [[], [], []]


def test_dstp_records_the_host_rule_shift_at_every_step(qwen2, tok):
    """`host_rvis`: one Jaccard(host's candidate, prefill selection) per step the trigger may fire (every step
    with a shift threshold, whether or not it fires; else every `dstp_interval` steps), every adopted set's
    overlap (`host_overlap`) is one of them; at retention 1.0 the host can only pick every token (1.0); nothing
    without DSTP."""
    x = _inputs(qwen2, tok)
    for method in ("fastv", "divprune", "zspaprune"):
        periodic = _run(qwen2, x, tok, vt.PruneSpec(method, 0.333, dstp=True, dstp_interval=3))
        assert [len(r) for r in periodic.host_rvis] == [len(range(3, STEPS, 3))] * 3  # t = 3, 6, ... only
        assert periodic.reselections == [len(range(3, STEPS, 3))] * 3
        out = _run(
            qwen2,
            x,
            tok,
            vt.PruneSpec(method, 0.333, dstp=True, dstp_interval=1000, dstp_shift_threshold=0.5),
        )
        for b in range(3):
            assert len(out.host_rvis[b]) == STEPS - 1, method  # steps t = 1 .. STEPS - 1 (no end token)
            assert all(0.0 <= j <= 1.0 for j in out.host_rvis[b])
            assert all(any(o == pytest.approx(j) for j in out.host_rvis[b]) for o in out.host_overlap[b])
        full = _run(qwen2, x, tok, vt.PruneSpec(method, 1.0, dstp=True))
        assert all(j == 1.0 for row in full.host_rvis for j in row) and full.host_rvis[0]
    assert _run(qwen2, x, tok, vt.PruneSpec("fastv", 0.333)).host_rvis == [[], [], []]


def _claim_records(delta_reasoning: float, n: int = 40) -> list[dict]:
    """Per-example records of a scripted grid: unpruned right everywhere; the host loses reasoning examples;
    host + DSTP wins back `delta_reasoning` of them (negative: loses more), simple untouched."""
    fams = ("attribute", "existence", "multistep", "reading")
    out = []
    for m, ret in (("unpruned", 1.0), ("fastv", 0.666), ("fastv", 0.333), ("fastv+dstp", 0.333)):
        for i in range(n):
            fam = fams[i % 4]
            right = True
            if m != "unpruned" and fam in ("multistep", "reading"):
                frac = 0.5 + (delta_reasoning if m.endswith("+dstp") else 0.0) + (0.3 if ret == 0.666 else 0)
                right = (i // 4) < frac * (n // 4)
            out.append({"id": f"e{i}", "family": fam, "method": m, "retention": ret, "correct": float(right),
                        "anls": float(right) if fam == "reading" else None,
                        "parsed": ("yes" if i % 8 == 1 else "no") if fam == "existence" else None,
                        "label": ("yes" if i % 8 == 1 else "no") if fam == "existence" else None,
                        "decode_s_per_token": 0.011 if m.endswith("+dstp") else 0.01,
                        "prefill_s": 0.03 if m.endswith("+dstp") else 0.02})  # fmt: skip
    return out


@pytest.mark.parametrize("delta,verdict", [(0.4, "agrees"), (0.0, "undecided"), (-0.4, "disagrees")])
def test_claims_judge_each_comparison_by_its_paired_interval(delta, verdict):
    found = stage.claims(_claim_records(delta), {}, [0.666, 0.333], batch_size=32, reps=300)
    by = {(c["claim"], c["retention"]): c for c in found}
    dstp = by[("DSTP limits the reasoning drop", "0.333")]
    assert dstp["verdict"] == verdict and dstp["n"] == 40 and dstp["value"] == pytest.approx(delta, abs=0.01)
    simple = by[
        ("DSTP gains on simple understanding", "0.333")
    ]  # untouched: a zero-width interval, undecided
    assert simple["value"] == 0.0 and simple["ci"] == [0.0, 0.0] and simple["verdict"] == "undecided"
    hurt = by[("pruning hurts reasoning more than simple understanding", "0.333")]
    assert hurt["value"] == pytest.approx(-0.5) and hurt["verdict"] == "agrees"
    beats = by[("DSTP at a third of the tokens beats FastV at two thirds", "0.333")]
    assert beats["value"] == pytest.approx((0.5 + delta - 0.8) / 2, abs=0.01)
    over = {
        c["comparison"].split(": ")[1].split(" (")[0]: c
        for c in found
        if c["claim"] == "DSTP's overhead is minimal"
    }
    assert (
        over["decode time per token"]["value"] == pytest.approx(1.1)
        and over["decode time per token"]["ci"] is None
    )
    assert (
        over["prefill time"]["value"] == pytest.approx(1.5) and over["prefill time"]["verdict"] == "disagrees"
    )
    assert stage.claims_table(found).shape[1] == 2  # one column per retention
    reading = {line.split(":")[0]: line for line in stage.claims_reading(found).splitlines()}
    limits = reading["- **DSTP limits the reasoning drop"]
    word = {"agrees": "agree", "disagrees": "disagree", "undecided": None}[verdict]
    assert limits.startswith(
        f"- **DSTP limits the reasoning drop: {verdict if word else 'mixed or undecided'}**"
    )
    if word:  # the comparison named by its system, retention and value
        assert f"; {word}: fastv+dstp at 33.3% {delta:+.1f}" in limits
    assert "disagree: fastv+dstp prefill at 33.3% 1.50x" in reading["- **DSTP's overhead is minimal"]
    # one retention only (the hub params): no "a third vs two thirds" row comparing 33.3% with itself
    only = stage.claims(
        [r for r in _claim_records(delta) if r["retention"] != 0.666], {}, [0.333], 32, reps=50
    )
    assert not [c for c in only if "two thirds" in c["claim"]]


def test_family_scores_match_the_reported_metrics():
    """The bootstrap's per-example scorer gives, on every example, what `family_metrics` / `headline` report."""
    from vskip_core.metrics import FAMILY_SCORE, FamilyScores, family_metrics, headline

    rng = np.random.default_rng(1)
    exs, scored = [], []
    for i in range(60):
        fam = ("attribute", "existence", "multistep", "reading")[i % 4]
        label, pred = rng.choice(["yes", "no"]), rng.choice(["yes", "no", None])
        exs.append({"id": str(i), "family": fam, "answer": label})
        scored.append({"id": str(i), "family": fam, "correct": float(rng.random() < 0.5), "anls": rng.random(),
                       "parsed": pred, "unparsed": pred is None})  # fmt: skip
    want = headline(family_metrics(exs, scored))
    recs = [s | {"label": e["answer"] if e["family"] == "existence" else None} for e, s in zip(exs, scored)]
    fs = FamilyScores(recs, [r["id"] for r in recs])
    for fam, key in FAMILY_SCORE.items():
        assert fs.score(np.arange(60), fam) == pytest.approx(want[fam][key]), fam


def test_host_rvis_of_a_rationale_shorter_than_one_interval_is_kept_empty():
    """A + DSTP run that ended before its first due step records no overlap: per-host RVIS keeps the example
    with an empty curve at that retention instead of failing or losing the retention."""
    recs = [{"method": "divprune+dstp", "id": "a", "family": "reading", "retention": 0.333, "n_visual": 16,
             "host_rvis": []},
            {"method": "divprune+dstp", "id": "a", "family": "reading", "retention": 0.111, "n_visual": 16,
             "host_rvis": [0.5, 0.4]},
            {"method": "divprune+dstp", "id": "b", "family": "attribute", "retention": 0.333, "n_visual": 16,
             "host_rvis": [1.0, 0.5]}]  # fmt: skip
    rows = stage.host_rvis_records(recs, 1)["divprune"]
    assert {r["id"]: sorted(r["overlap"]) for r in rows} == {"a": ["0.111", "0.333"], "b": ["0.333"]}
    summary = stage.rvis_summary(rows, n_bins=2, min_count=1)["by_retention"]
    assert summary["0.333"]["attribute"]["mean"] == 0.75 and "reading" not in summary["0.333"]
    assert summary["0.111"]["reading"]["mean"] == pytest.approx(0.45)


def test_rvis_shift_stats_read_the_direction_of_the_shift():
    """Reasoning examples overlap less with their prefill set than simple ones, and every example's overlap
    falls over the rationale: both stats come out on the claimed side with intervals away from 0."""
    rv = []
    for i in range(40):
        fam = ("attribute", "existence", "multistep", "reading")[i % 4]
        start = 0.8 if fam in ("attribute", "existence") else 0.5
        rv.append({"id": str(i), "family": fam, "overlap": {"0.333": [start - 0.02 * t for t in range(20)]}})
    st = stage.rvis_shift_stats(rv, "0.333", reps=300)
    assert st["simple_minus_reasoning"] == pytest.approx(0.3) and st["simple_minus_reasoning_ci"][0] > 0
    assert st["last_minus_first_tenth"] == pytest.approx(-0.36) and st["last_minus_first_tenth_ci"][1] < 0
    assert st["n"] == 40


def test_retention_label_is_the_one_shown_everywhere():
    assert [stage.retention_label(r) for r in (0.333, "0.666", 1, "decode vs unpruned")] == [
        "33.3%",
        "66.6%",
        "100.0%",
        "decode vs unpruned",
    ]


# ------------------------------------------------------------------------------- the prompt-aware text
@pytest.fixture(scope="module")
def hub_style():
    """A tiny Qwen2-VL stand-in (the stand-in tokenizer), the Colab instruction and the ratio sentence."""
    from vskip_core.config import load_params
    from vskip_core.modeling.adapters import build_tiny
    from vskip_core.modeling.standins import tokenizer_texts

    model, tok, proc = build_tiny("qwen2_vl", tokenizer_texts())
    return model, tok, proc, load_params("params/colab_qwen2vl_2b.yaml")


def _question_batch(hub_style, examples, prefix, instruction, assistant_prefill=""):
    from vskip_core.modeling.loading import collate, encode

    model, tok, proc, _ = hub_style
    items = [
        encode(ex, tok, proc, instruction=instruction, prefix=prefix, assistant_prefill=assistant_prefill)
        for ex in examples
    ]
    batch = collate(items, tok.pad_token_id, padding_side="left")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    mask = vt.question_mask(
        batch["input_ids"], tok, model.config.vision_end_token_id, end, prefix, instruction
    )
    return batch, mask


def _prompts(cfg):
    from vskip_core.stages.distillation import ratio_prompt

    return [
        {"prefix": "", "instruction": cfg.generation.instruction},
        ratio_prompt(cfg, 0.5, "question_end"),  # the ratio sentence after the instruction
        ratio_prompt(cfg, 0.5, "turn_start"),  # the ratio sentence as a prefix
        ratio_prompt(cfg, 0.5, "answer_start"),  # the ratio line starting the assistant turn
        {"prefix": "", "instruction": ""},
    ]


def test_question_mask_covers_exactly_the_question_and_options(hub_style):
    from vskip_core.config import DataConfig
    from vskip_core.data.embedded import make_example
    from vskip_core.modeling.prompts import user_text

    tok, cfg = hub_style[1], hub_style[3]
    mc = make_example(DataConfig(), "test", 3)  # a question with four options
    pope = {**mc, "question": "Is there a dog in the image?", "options": []}  # POPE's short question
    for prompt in _prompts(cfg):
        batch, mask = _question_batch(hub_style, [mc, pope], **prompt)
        for b, ex in enumerate((mc, pope)):
            assert tok.decode(batch["input_ids"][b, mask[b]]) == user_text(ex)


def test_question_relevance_follows_the_question_not_the_instruction(hub_style):
    """The prompt-aware relevance (and so DSTP's prompt+decoded state) changes with the question and not with
    the CoT instruction or the ratio sentence; pooling the whole user text (the old rule) changed with both."""
    from vskip_core.config import DataConfig
    from vskip_core.data.embedded import make_example

    model, tok, _, cfg = hub_style
    ex = make_example(DataConfig(), "test", 3)
    other = {**ex, "question": "Which object is the cheapest?"}
    end = tok.convert_tokens_to_ids("<|im_end|>")

    def relevance(example, prompt, rule="question"):
        batch, mask = _question_batch(hub_style, [example], **prompt)
        if rule == "user text":
            mask = vt.user_text_mask(batch["input_ids"], model.config.vision_end_token_id, end)
        with torch.no_grad():
            feats = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
            text = model.model.get_input_embeddings()(batch["input_ids"])[0, mask[0]]
        return vt.prompt_relevance(torch.cat(feats.pooler_output), text)

    prompts = _prompts(cfg)
    ref = relevance(ex, prompts[0])
    for p in prompts[1:]:
        assert torch.equal(relevance(ex, p), ref)
        if not p.get("assistant_prefill"):  # a ratio line in the assistant turn leaves the user text as it is
            assert not torch.allclose(relevance(ex, p, "user text"), relevance(ex, prompts[0], "user text"))
    assert not torch.allclose(relevance(other, prompts[0]), ref, atol=1e-4)
