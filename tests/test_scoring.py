"""Dual scoring: the hooked capture equals the output_attentions reference (Qwen2-VL, Qwen2.5-VL, Mllama;
batched, padded, eager and sdpa), surprisal equals a manual cross-entropy, words (vskip_core.method.scoring);
the stage's frame, resume after a kill, bad input (vskip_core.stages.scoring)."""

import numpy as np
import pytest
import torch

from vskip_core.config import load_params
from vskip_core.data.embedded import make_example
from vskip_core.method import scoring as S
from vskip_core.modeling.loading import (
    Loaded,
    collate,
    embedded_config,
    encode,
    image_processor_for,
    model_inputs,
)
from vskip_core.stages import scoring as ST


# ------------------------------------------------------------------------------------------ tiny models
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Smoke params, a BPE tokenizer trained on 60 benchmark texts, the image processor, 6 examples."""
    from vskip_core.modeling.loading import train_tokenizer

    cfg = load_params("params/smoke.yaml", {"runtime.cache_dir": str(tmp_path_factory.mktemp("cache"))})
    exs = [make_example(cfg, "train", i) for i in range(60)]
    tok = train_tokenizer([e["question"] + "\n" + e["rationale"] for e in exs], 400)
    return cfg, tok, image_processor_for(cfg), exs[:6]


def _qwen2vl(cfg, tok, impl="eager"):
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    m = Qwen2VLForConditionalGeneration(embedded_config(cfg, tok)).eval()
    m.set_attn_implementation(impl)
    return m


def _qwen25vl(cfg, tok, impl="eager"):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    base = embedded_config(cfg, tok)
    text = base.text_config.to_dict()
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": text["hidden_size"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    }
    conf = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=base.image_token_id,
        video_token_id=base.video_token_id,
        vision_start_token_id=base.vision_start_token_id,
        vision_end_token_id=base.vision_end_token_id,
    )
    torch.manual_seed(1)
    m = Qwen2_5_VLForConditionalGeneration(conf).eval()
    m.set_attn_implementation(impl)
    return m


def _qwen_batch(tok, proc, exs, cut=(40, 75, 110)):
    """Rationales cut to different lengths, left-padded: rows differ in length and padding."""
    items = [encode(e, tok, proc, target=e["rationale"][:c]) for e, c in zip(exs, cut)]
    batch = collate(items, tok.pad_token_id, padding_side="left")
    spans = [
        (off + it["target_start"], len(it["input_ids"]) - it["target_start"] - 1)
        for off, it in zip(batch["offsets"].tolist(), items)
    ]
    return model_inputs(batch, "cpu"), spans


MLLAMA_VOCAB = 120


def _mllama(impl="eager"):
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    conf = MllamaConfig(
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_global_layers": 1,
            "attention_heads": 2,
            "intermediate_size": 64,
            "vision_output_dim": 64,
            "image_size": 28,
            "patch_size": 14,
            "max_num_tiles": 2,
            "intermediate_layers_indices": [0],
            "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]],
        },
        text_config={
            "vocab_size": MLLAMA_VOCAB,
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 64,
            "cross_attention_layers": [1, 3],
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        },
        image_token_index=MLLAMA_VOCAB,
    )
    torch.manual_seed(2)
    m = MllamaForConditionalGeneration(conf).eval()
    with torch.no_grad():  # the gates start at zero: the image would have no effect at all
        for i in conf.text_config.cross_attention_layers:
            m.model.language_model.layers[i].cross_attn_attn_gate.fill_(0.7)
            m.model.language_model.layers[i].cross_attn_mlp_gate.fill_(0.5)
    m.set_attn_implementation(impl)
    return m


def _mllama_batch():
    """Two left-padded rows; row 0's image has one tile (aspect 1x1: tile 2 is outside it), row 1's two."""
    g = torch.Generator().manual_seed(3)
    B, T, lens = 2, 22, (22, 16)
    ids = torch.zeros(B, T, dtype=torch.long)
    att = torch.zeros(B, T, dtype=torch.long)
    cross = torch.zeros(B, T, 1, 2, dtype=torch.long)
    arm = torch.tensor([[[1, 0]], [[1, 1]]])
    for b, n in enumerate(lens):
        off = T - n
        ids[b, off:] = torch.randint(3, MLLAMA_VOCAB, (n,), generator=g)
        ids[b, off + 1] = MLLAMA_VOCAB  # <|image|>
        att[b, off:] = 1
        cross[b, off + 1 :, 0, :] = arm[b, 0]
    inputs = {
        "input_ids": ids,
        "attention_mask": att,
        "pixel_values": torch.randn(B, 1, 2, 3, 28, 28, generator=g),
        "aspect_ratio_ids": torch.tensor([[1], [2]]),
        "aspect_ratio_mask": arm,
        "cross_attention_mask": cross,
    }
    spans = [(T - n + 5, n - 5) for n in lens]
    return inputs, spans


def _check_hooked_equals_naive(model, inputs, spans, eager_model=None):
    layers = S.candidate_layers(model)
    qi, qv = S.query_rows(spans)
    ki, kv = S.image_key_columns(model, inputs)
    with torch.no_grad():
        plain = model(**inputs).logits
        with S.capture_image_attention(model, layers, qi, qv, ki, kv, keep_columns=True, chunk=5) as cap:
            hooked = model(**inputs).logits
    ref = S.naive_anchor_maps(eager_model or model, inputs, qi, ki, kv, layers)
    valid = inputs["attention_mask"].bool()
    assert torch.equal(plain[valid], hooked[valid]), "the capture must not change the model's output"
    for i in layers:
        want = ref[i] * qv[:, None, :, None]
        assert cap.maps[i].shape == want.shape
        assert torch.allclose(cap.maps[i], want, atol=1e-5, rtol=0), f"layer {i}"
        assert torch.allclose(cap.mass[i], want.sum(-1), atol=1e-5, rtol=0)
    assert float(cap.mass[layers[0]].max()) > 0.05  # real attention mass, not zeros
    for h in ("max", "mean"):
        naive = S.reduce_anchoring({i: ref[i].sum(-1) for i in layers}, layers, h) * qv
        assert torch.allclose(S.reduce_anchoring(cap.mass, layers, h), naive, atol=1e-5)
    return cap


# ------------------------------------------------------------------------------------------ hooked == naive
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hooked_equals_naive_qwen2vl_batched_padded(setup, impl):
    cfg, tok, proc, exs = setup
    inputs, spans = _qwen_batch(tok, proc, exs[:3])
    assert len({n for _, n in spans}) == 3 and inputs["attention_mask"].min() == 0  # padded, ragged
    _check_hooked_equals_naive(_qwen2vl(cfg, tok, impl), inputs, spans, _qwen2vl(cfg, tok, "eager"))


def test_hooked_equals_naive_sdpa_unpadded_causal_fast_path(setup, monkeypatch):
    """One unpadded row on sdpa: the model passes no mask at all (is_causal); the capture builds it."""
    cfg, tok, proc, exs = setup
    inputs, spans = _qwen_batch(tok, proc, exs[1:2], cut=(120,))
    assert inputs["attention_mask"].min() == 1
    seen = []
    record = S._Capture.record
    monkeypatch.setattr(S._Capture, "record", lambda self, *a: seen.append(a[-2]) or record(self, *a))
    _check_hooked_equals_naive(_qwen2vl(cfg, tok, "sdpa"), inputs, spans, _qwen2vl(cfg, tok, "eager"))
    assert seen and all(m is None for m in seen)


@pytest.mark.parametrize("masked", [False, True])
def test_hooked_capture_in_float16_does_not_overflow(masked):
    """fp16 query/key rows whose products exceed 65504 (Qwen2-family activations on a T4): the captured
    softmax rows are computed in float32, finite and equal to the float32 reference, under sdpa's causal fast
    path (no mask) and under an additive fp16 causal mask (eager, padded)."""
    import types

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, d = 2, 4, 2, 7, 8
    q = (300 * torch.sign(torch.randn(B, H, T, d, generator=g))).half()
    k = (
        300 * torch.rand(B, Hkv, T, d, generator=g) * torch.sign(torch.randn(B, Hkv, T, d, generator=g))
    ).half()
    scaling = d**-0.5
    assert not torch.isfinite(torch.matmul(q[:, ::2], k.transpose(2, 3))).all()  # fp16 overflows here
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = None
    if masked:
        mask = torch.zeros(B, 1, T, T, dtype=torch.float16)
        mask.masked_fill_(~causal, torch.finfo(torch.float16).min)
    qi, qv = S.query_rows([(4, 3), (3, 4)])
    ki = torch.tensor([[1, 2], [1, 2]])
    kv = torch.ones_like(ki, dtype=torch.bool)
    cap = S._Capture(qi, qv, ki, kv, "sdpa", keep_columns=True, chunk=2)
    cap.record(0, types.SimpleNamespace(is_causal=True), q, k, mask, scaling)
    # float32 reference: the same fp16 values, upcast before the product
    kf = k.float().repeat_interleave(H // Hkv, dim=1)
    logits = torch.matmul(q.float(), kf.transpose(2, 3)) * scaling
    p = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    for b in range(B):
        rows = qi[b][qv[b]]
        want = p[b][:, rows][..., ki[b]]
        got = cap.maps[0][b][:, : len(rows)]
        assert torch.isfinite(got).all() and torch.isfinite(cap.mass[0]).all()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cap.mass[0][b][:, : len(rows)], want.sum(-1), atol=1e-5, rtol=1e-4)


def test_hooked_equals_naive_single_matches_notebook00_reference(setup):
    """Batch of one against the original `naive_image_attention` (every layer, all heads)."""
    cfg, tok, proc, exs = setup
    m = _qwen2vl(cfg, tok)
    enc = encode(exs[0], tok, proc, target=exs[0]["rationale"])
    inputs = model_inputs(collate([enc], tok.pad_token_id), "cpu")
    n = len(enc["input_ids"]) - enc["target_start"] - 1
    spans = [(enc["target_start"], n)]
    qi, qv = S.query_rows(spans)
    ki, kv = S.image_key_columns(m, inputs)
    assert torch.equal(ki[0], enc["image_positions"])
    with torch.no_grad(), S.capture_image_attention(m, [0, 1], qi, qv, ki, kv, keep_columns=True) as cap:
        m(**inputs)
    ref = S.naive_image_attention(m, inputs, enc["image_positions"], qi[0])
    for i in (0, 1):
        assert torch.allclose(cap.maps[i][0], ref[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hooked_equals_naive_qwen25vl(setup, impl):
    cfg, tok, proc, exs = setup
    inputs, spans = _qwen_batch(tok, proc, exs[3:6], cut=(90, 30, 60))
    _check_hooked_equals_naive(_qwen25vl(cfg, tok, impl), inputs, spans, _qwen25vl(cfg, tok, "eager"))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hooked_equals_naive_mllama_cross_attention(impl):
    inputs, spans = _mllama_batch()
    m = _mllama(impl)
    assert S.candidate_layers(m) == [1, 3]
    ki, kv = S.image_key_columns(m, inputs)
    # 5 vision tokens per tile (CLS + 4 patches): row 0 keeps tile 0's patches only, row 1 both tiles'
    assert ki[0][kv[0]].tolist() == [1, 2, 3, 4]
    assert ki[1][kv[1]].tolist() == [1, 2, 3, 4, 6, 7, 8, 9]
    cap = _check_hooked_equals_naive(m, inputs, spans, _mllama("eager"))
    assert float(cap.mass[1].max()) < 1.0  # CLS columns carry mass that is not counted


def test_mllama_image_keys_drop_padding_images():
    """A batch padded to two images per row: the padding image (aspect_ratio_id 0, tile 0 unmasked as the
    processor pads) contributes no key columns."""
    m = _mllama()
    inputs = {
        "pixel_values": torch.zeros(1, 2, 2, 3, 28, 28),
        "aspect_ratio_ids": torch.tensor([[2, 0]]),
        "aspect_ratio_mask": torch.tensor([[[1, 1], [1, 0]]]),
        "attention_mask": torch.ones(1, 3, dtype=torch.long),
        "cross_attention_mask": torch.ones(1, 3, 2, 2, dtype=torch.long),
    }
    ki, kv = S.image_key_columns(m, inputs)
    assert ki[0][kv[0]].tolist() == [1, 2, 3, 4, 6, 7, 8, 9]


def test_mllama_image_affects_text_only_through_nonzero_gates():
    inputs, spans = _mllama_batch()
    m = _mllama()
    with torch.no_grad():
        a = m(**inputs).logits
        inputs2 = dict(inputs, pixel_values=inputs["pixel_values"] * -1.0)
        b = m(**inputs2).logits
    assert (a - b).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ surprisal
def test_surprisal_equals_manual_cross_entropy(setup):
    cfg, tok, proc, exs = setup
    m = _qwen2vl(cfg, tok, "sdpa")
    inputs, spans = _qwen_batch(tok, proc, exs[:3])
    ps = S.teacher_forced_scores(m, inputs, spans, [1])
    with torch.no_grad():
        logits = m(**inputs).logits
    for b, (start, n) in enumerate(spans):
        ce = torch.nn.functional.cross_entropy(
            logits[b, start - 1 : start + n - 1], inputs["input_ids"][b, start : start + n], reduction="none"
        )
        assert ps.surprisal[b].shape == (n,)
        assert np.allclose(ps.surprisal[b], ce.numpy(), atol=1e-5)
    assert len(ps.anchoring([1])[2]) == spans[2][1]


# ------------------------------------------------------------------------------------------ words
def test_word_ids_follow_whitespace_words():
    text = "A red  circle costs $4.57.\nAnswer: red"
    offsets = [(0, 1), (1, 5), (5, 6), (6, 10), (10, 13), (13, 19), (19, 21), (21, 22), (22, 23), (23, 24)]
    offsets += [(24, 25), (25, 26), (26, 27), (27, 33), (33, 34), (34, 38)]
    # words: A | red | circle | costs | $4.57. | Answer: | red ; " " (5,6) is whitespace -> next word
    assert S.word_ids(text, offsets) == [0, 1, 2, 2, 2, 3, 4, 4, 4, 4, 4, 4, 5, 5, 5, 6]


def test_aggregate_words_sum_mean_max():
    v = [1.0, 2.0, 3.0, 10.0, 0.5]
    w = [0, 0, 0, 1, 2]
    assert S.aggregate_words(v, w, "sum").tolist() == [6, 6, 6, 10, 0.5]
    assert S.aggregate_words(v, w, "mean").tolist() == [2, 2, 2, 10, 0.5]
    assert S.aggregate_words(v, w, "max").tolist() == [3, 3, 3, 10, 0.5]
    with pytest.raises(ValueError, match="word aggregation"):
        S.aggregate_words(v, w, "median")


def test_answer_start_and_anchor_types(setup):
    _, tok, _, exs = setup
    ex = exs[0]
    enc = tok(ex["rationale"], add_special_tokens=False, return_offsets_mapping=True)
    off = enc["offset_mapping"]
    j = S.answer_token_start(ex["rationale"], off)
    assert ex["rationale"][off[j][0] : off[j][1]].strip().startswith("Answer")
    assert S.answer_token_start("no final line here", off) is None
    types = S.token_anchor_types(off, ex["anchors"])
    for a in ex["anchors"]:
        hit = [t for (s, e), t in zip(off, types) if s < a["end"] and e > a["start"]]
        assert hit and all(t == a["type"] for t in hit)
    assert types.count("") > 0


# ------------------------------------------------------------------------------------------ key layers
def test_resolve_key_layers(setup):
    cfg, tok, _, _ = setup
    m4 = _qwen2vl(
        load_params("params/default.yaml", {"embedded.hidden_size": 64, "embedded.text_heads": 4}), tok
    )
    sc = load_params("params/default.yaml").scoring
    assert S.resolve_key_layers(m4, sc) == [1, 2]  # centre depths 0.375, 0.625 of 4 layers
    sc.layer_band = [0.0, 0.2]
    assert S.resolve_key_layers(m4, sc) == [0]  # nothing inside: the nearest to the band's centre
    sc.key_layers = [3, 0]
    assert S.resolve_key_layers(m4, sc) == [0, 3]
    sc.key_layers = [7]
    with pytest.raises(ValueError, match="reached in layers \\[0, 1, 2, 3\\]"):
        S.resolve_key_layers(m4, sc)
    ml = _mllama()
    sc.key_layers = [0]
    with pytest.raises(ValueError, match="reached in layers \\[1, 3\\]"):
        S.resolve_key_layers(ml, sc)
    sc.key_layers, sc.layer_band = [], [0.25, 0.75]
    assert S.resolve_key_layers(ml, sc) == [1]  # of cross layers 1 (0.375) and 3 (0.875)


# ------------------------------------------------------------------------------------------ the stage
def _loaded(cfg, tok, proc, impl="sdpa"):
    return Loaded(_qwen2vl(cfg, tok, impl), tok, proc, "qwen2_vl", "random-tiny")


def _records(exs):
    return [
        {
            "id": e["id"],
            "family": e["family"],
            "rationale": e["rationale"],
            "anchors": e["anchors"],
            "index": i,
        }
        for i, e in enumerate(exs)
    ]


def test_score_rationales_frame_and_roundtrip(setup, tmp_path):
    cfg, tok, proc, exs = setup
    cfg = load_params("params/smoke.yaml", {"scoring.batch_size": 4, "scoring.blank_image": True})
    loaded = _loaded(cfg, tok, proc)
    df = ST.score_rationales(loaded, cfg, _records(exs), exs, progress=False)
    assert list(df.id) == [e["id"] for e in exs]
    for c in ST.CONTRACT_COLUMNS:
        assert c in df.columns
    for r in df.itertuples():
        n = len(r.token_ids)
        assert n == len(r.offsets) == len(r.surprisal) == len(r.anchoring) == len(r.word_ids)
        assert len(r.surprisal_noimg) == n and not np.allclose(r.surprisal_noimg, r.surprisal)
        assert r.text[r.offsets[r.answer_start][0] :].lstrip().startswith("Answer:")
        assert all(s >= 0 for s in r.surprisal) and all(0 <= a <= 1 for a in r.anchoring)
        assert len(r.anchoring_by_layer_max) == len(r.all_layers) == 2
        assert np.allclose(S.anchoring_for_layers(r._asdict(), r.key_layers, "max"), r.anchoring, atol=1e-6)
        assert r.generated_ids_match
    # batch composition must not matter (padding, sorting): score one rationale alone
    alone = ST.score_rationales(loaded, cfg, _records(exs)[2:3], exs[2:3], progress=False)
    assert np.allclose(alone.surprisal[0], df.surprisal[2], atol=1e-4)
    for c in ("anchoring_by_layer_max", "anchoring_self_by_layer_mean", "anchoring_blank_by_layer_max"):
        assert np.allclose(alone[c][0], df[c][2], atol=1e-5), c  # per layer: the key-layer choice may differ

    # the key-layer columns follow from the stored per-layer values and the blank-image pass
    for r in df.itertuples():
        assert np.allclose(r.anchoring_delta, np.subtract(r.anchoring, r.anchoring_blank))
        assert np.allclose(r.surprisal_gain, np.subtract(r.surprisal_noimg, r.surprisal))
        assert r.anchoring_predict == r.anchoring and len(r.anchoring_self) == len(r.anchoring)
    choice = df.attrs["layer_choice"]
    assert choice["n_held_out"] == int(df.held_out.sum()) and choice["n_held_out"] + choice[
        "n_reported"
    ] == len(df)
    if not choice["rule"].startswith("auto"):  # nothing chosen from data: nothing held out from stage 03
        assert choice["n_held_out"] == 0
    assert len(choice["table"]) == 2 * 3  # 2 candidate layers: runs [0], [1], [0, 1]; max and mean over heads
    assert list(df.key_layers[0]) == choice["layers"] and df.head_reduce[0] == choice["head_reduce"]
    # with most rows held out, gold rationales (anchors marked) give the data's choice, measured
    most = load_params("params/smoke.yaml", {"scoring.batch_size": 4, "scoring.select_share": 0.9})
    chosen = ST.score_rationales(loaded, most, _records(exs), exs, progress=False).attrs["layer_choice"]
    assert chosen["rule"].startswith("auto"), chosen["rule"]
    assert chosen["n_held_out"] == int(S.held_out_mask([e["id"] for e in exs], 0.9).sum()) >= 3
    # the band rule chooses nothing from data: the table is still measured, nothing is held out
    band = load_params("params/smoke.yaml", {"scoring.select_share": 0.9, "scoring.layer_select": "band"})
    banded = ST.score_rationales(loaded, band, _records(exs), exs, progress=False)
    assert banded.attrs["layer_choice"]["rule"].startswith("band") and not banded.held_out.any()
    assert banded.attrs["layer_choice"]["table"] == chosen["table"]
    assert all(0 <= t["auc_within"] <= 1 for t in chosen["table"]) and chosen["score_layer"] in (0, 1)

    tokens = ST.token_table(df)
    assert len(tokens) == sum(len(t) for t in df.token_ids)
    assert tokens.is_anchor.sum() == sum(t != "" for ts in df.anchor_type for t in ts) > 0
    summary = ST.anchor_detection_summary(tokens)
    assert 0 <= summary["anchoring"]["auc_anchor"] <= 1 and "colour" in summary["anchoring"]["auc_by_type"]
    profile = ST.layer_profile(df)
    assert len(profile) == 4 and profile.key_layer.sum() == 2 * len(df.key_layers[0])
    page = ST.token_heat_html(df.iloc[0])
    assert page.count("<i>surprisal</i>") == 1 and page.count("<i>anchoring</i>") == 1
    assert page.count("border-bottom") == 2 * sum(t != "" for t in df.anchor_type[0])

    ST.save_scores(tmp_path, df)
    back = ST.load_scores(tmp_path)
    assert list(back.columns) == list(df.columns)
    for c in ("token_ids", "offsets", "surprisal", "anchoring", "word_ids", "anchoring_by_layer_mean"):
        assert back[c].tolist() == df[c].tolist(), c
        assert isinstance(back[c][0], list)
    assert back.answer_start.tolist() == df.answer_start.tolist()
    with pytest.raises(FileNotFoundError, match="02_dual_scoring"):
        ST.load_scores(tmp_path / "nowhere")


def test_scoring_resumes_after_a_kill_without_duplicates(setup, tmp_path, capsys):
    cfg, tok, proc, exs = setup
    cfg = load_params("params/smoke.yaml", {"scoring.batch_size": 2, "scoring.shard_size": 2})
    loaded = _loaded(cfg, tok, proc)
    recs = _records(exs)
    full = ST.score_rationales(loaded, cfg, recs, exs, progress=False)

    calls = {"n": 0}
    forward = loaded.model.forward

    def dying_forward(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # two forwards per batch (the image, then the blank image)
            raise KeyboardInterrupt("killed")
        return forward(*a, **k)

    loaded.model.forward = dying_forward
    with pytest.raises(KeyboardInterrupt):
        ST.score_rationales(loaded, cfg, recs, exs, progress=False, out_dir=tmp_path)
    shards = sorted((tmp_path / ST.SHARD_DIR).glob("shard-*.parquet"))
    assert len(shards) == 2  # three shards of one batch each: two finished, the third died in its forward
    loaded.model.forward = forward

    calls["n"] = 0
    resumed = ST.score_rationales(loaded, cfg, recs, exs, progress=False, out_dir=tmp_path)
    assert list(resumed.id) == [r["id"] for r in recs]  # all, once, in order
    assert len(sorted((tmp_path / ST.SHARD_DIR).glob("shard-*.parquet"))) == 3
    for a, b in zip(resumed.anchoring, full.anchoring):
        assert np.allclose(a, b, atol=1e-5)
    # a third call finds everything done and scores nothing
    loaded.model.forward = dying_forward
    calls["n"] = -100
    again = ST.score_rationales(loaded, cfg, recs, exs, progress=False, out_dir=tmp_path)
    assert calls["n"] == -100 and list(again.id) == list(resumed.id)
    # the key-layer choice's params read the stored rows again: no forward at all
    choice = load_params(
        "params/smoke.yaml", {"scoring.batch_size": 2, "scoring.shard_size": 2, "scoring.head_reduce": "mean"}
    )
    calls["n"] = -100
    rechosen = ST.score_rationales(loaded, choice, recs, exs, progress=False, out_dir=tmp_path)
    assert calls["n"] == -100 and set(rechosen.head_reduce) == {"mean"}
    # params that change a row: the old shards are discarded, not mixed in
    loaded.model.forward = forward
    cfg2 = load_params(
        "params/smoke.yaml",
        {"scoring.batch_size": 2, "scoring.shard_size": 2, "scoring.query_position": "self"},
    )
    other = ST.score_rationales(loaded, cfg2, recs[:2], exs[:2], progress=False, out_dir=tmp_path)
    assert "discarded 3 shards" in capsys.readouterr().out  # the note says how many and why
    assert len(other) == 2 and len(sorted((tmp_path / ST.SHARD_DIR).glob("shard-*.parquet"))) == 1
    # same params, new text under an old id (01 re-run): re-scored, not taken from the old shard
    changed = [dict(recs[0], rationale=recs[0]["rationale"].replace("I", "we", 1)), recs[1]]
    fresh = ST.score_rationales(loaded, cfg2, changed, exs[:2], progress=False, out_dir=tmp_path)
    assert fresh.text.tolist() == [r["rationale"] for r in changed]
    assert isinstance(resumed.surprisal[0], list) and isinstance(resumed.offsets[0][0], list)


def test_scoring_workers_split_the_work_and_the_merge_reads_their_shards(setup, tmp_path):
    cfg, tok, proc, exs = setup
    cfg = load_params("params/smoke.yaml", {"scoring.batch_size": 2, "scoring.shard_size": 2})
    loaded = _loaded(cfg, tok, proc)
    recs = _records(exs)
    full = ST.score_rationales(loaded, cfg, recs, exs, progress=False)
    parts = [
        ST.score_rationales(loaded, cfg, recs, exs, progress=False, out_dir=tmp_path, worker=(i, 2))
        for i in (0, 1)
    ]
    assert [list(p.id) for p in parts] == [[r["id"] for r in recs][i::2] for i in (0, 1)]
    names = sorted(f.name for f in (tmp_path / ST.SHARD_DIR).glob("shard-*.parquet"))
    assert names and all(n.startswith(("shard-w0of2-", "shard-w1of2-")) for n in names)
    forward = loaded.model.forward
    loaded.model.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("the merge must not score"))
    merged = ST.score_rationales(loaded, cfg, recs, exs, progress=False, out_dir=tmp_path)
    loaded.model.forward = forward
    assert list(merged.id) == [r["id"] for r in recs] and merged.attrs["resumed"] == len(recs)
    for a, b in zip(merged.anchoring, full.anchoring):
        assert np.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="worker"):
        ST.score_rationales(loaded, cfg, recs, exs, progress=False, worker=(2, 2))


# ------------------------------------------------------------------------------------------ bad input
def test_bad_rationales_are_skipped_and_counted(setup):
    cfg, tok, proc, exs = setup
    loaded = _loaded(cfg, tok, proc)
    recs = _records(exs[:4])
    recs[0]["rationale"] = ""
    recs[1]["rationale"] = "The circle is red and there is no final line"
    exs = [dict(e) for e in exs[:4]]
    exs[2]["image"] = None
    df = ST.score_rationales(loaded, cfg, recs, exs, progress=False)
    assert df.attrs["skipped"] == {"empty_rationale": 1, "no_answer_line": 1, "no_image": 1}
    assert list(df.id) == [recs[3]["id"]]
    kept = ST.score_rationales(loaded, cfg, recs, exs, progress=False, require_answer_line=False)
    assert kept.attrs["skipped"]["no_answer_line_kept"] == 1 and len(kept) == 2
    no_line = kept[kept.id == recs[1]["id"]].iloc[0]
    assert no_line.answer_start == len(no_line.token_ids)
    with pytest.raises(ValueError, match="aligned"):
        ST.score_rationales(loaded, cfg, recs[:2], exs[1:3], progress=False)


def test_inputs_without_image_tokens_have_a_clear_error(setup):
    cfg, tok, proc, exs = setup
    m = _qwen2vl(cfg, tok)
    ids = torch.tensor([tok("What colour is the circle? Answer: red", add_special_tokens=False)["input_ids"]])
    with pytest.raises(ValueError, match="no image tokens"):
        S.teacher_forced_scores(m, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, [(3, 4)], [0])
    with pytest.raises(ValueError, match="empty or outside"):
        S.teacher_forced_scores(m, {"input_ids": ids}, [(3, 0)], None)
    with pytest.raises(ValueError, match="supported"):
        S.candidate_layers(type("M", (), {"config": type("C", (), {"model_type": "llava"})()})())


# ------------------------------------------------------------------------------------------ analysis
def test_auc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=60), 1)  # ties on purpose
    y = rng.random(60) < 0.3
    pos, neg = s[y], s[~y]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert abs(ST.auc(s, y) - pairs) < 1e-12
    assert ST.auc([1, 2, 3], [0, 1, 1]) == 1.0 and np.isnan(ST.auc([1, 2], [0, 0]))


def test_score_rationales_on_mllama_through_the_family_adapter(setup):
    """Mllama end to end: inputs from vskip_core.modeling.adapters (encode / collate), cross-attention key layers,
    batch composition does not change the scores."""
    from transformers import MllamaForConditionalGeneration

    from vskip_core.modeling import adapters

    cfg, _, _, exs = setup
    ad = adapters.get_adapter("mllama")
    tok = ad.tiny_tokenizer([e["question"] + "\n" + e["rationale"] for e in exs * 5])
    conf = ad.tiny_config(tok)
    torch.manual_seed(0)
    m = MllamaForConditionalGeneration(conf).eval()
    with torch.no_grad():
        for i in conf.text_config.cross_attention_layers:
            m.model.language_model.layers[i].cross_attn_attn_gate.fill_(0.7)
    loaded = Loaded(m, tok, ad.tiny_image_processor(), "mllama", "tiny")
    cfg = load_params("params/smoke.yaml", {"scoring.batch_size": 3})
    df = ST.score_rationales(loaded, cfg, _records(exs[:4]), exs[:4], progress=False)
    assert df.all_layers[0] == sorted(conf.text_config.cross_attention_layers)
    assert set(df.key_layers[0]) <= set(df.all_layers[0])
    assert all(0 < a < 1 for r in df.anchoring for a in r)  # patch mass, CLS excluded
    alone = ST.score_rationales(loaded, cfg, _records(exs[1:2]), exs[1:2], progress=False)
    for c in ("anchoring_by_layer_max", "anchoring_blank_by_layer_mean"):  # per layer: the choice may differ
        assert np.allclose(alone[c][0], df[c][1], atol=1e-5), c
    assert np.allclose(alone.surprisal[0], df.surprisal[1], atol=1e-4)


def test_both_query_rows_give_the_predict_and_self_readings(setup):
    """Stage 02 captures `both` (one row more per rationale); each reading equals a capture of that mode alone,
    and `self` is `predict` shifted by one token."""
    cfg, tok, proc, exs = setup
    m = _qwen2vl(cfg, tok, "sdpa")
    inputs, spans = _qwen_batch(tok, proc, exs[:3])
    layers = S.candidate_layers(m)
    both = S.teacher_forced_scores(m, inputs, spans, layers, "both")
    for mode in ("predict", "self"):
        one = S.teacher_forced_scores(m, inputs, spans, layers, mode)
        for got, want, (_, n) in zip(both.anchoring(layers, "max", mode), one.anchoring(layers), spans):
            assert len(got) == n
            np.testing.assert_allclose(got, want, atol=1e-6)
    pred, self_ = both.anchoring(layers, "max", "predict"), both.anchoring(layers, "max", "self")
    assert all(not np.allclose(p, s) for p, s in zip(pred, self_))
    with pytest.raises(ValueError, match="needs query_mode='both'"):
        one.anchoring(layers, "max", "predict")


def _selection_rows(n_rows=60, seed=0):
    """Synthetic held-out rationales over 3 layers: layer 0 tracks position only, layer 1 is noise, layer 2
    is higher on visual-attribute tokens (and also drifts with position)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        n = int(rng.integers(20, 40))
        attr = rng.random(n) < 0.2
        pos = np.arange(n) / n
        layers = np.stack([1 - pos, rng.random(n), 0.3 * (1 - pos) + 0.5 * attr + 0.2 * rng.random(n)])
        by = {"max": layers, "mean": layers * 0.5 + 0.5 * rng.random((3, n))}
        include = np.ones(n, dtype=bool)
        include[-3:] = False  # the answer line
        rows.append(S.SelectionRow(by, attr, None, include))
    return rows


def test_key_layer_choice_finds_the_layer_that_separates_attributes():
    table = S.key_layer_table(_selection_rows(), [0, 1, 2])
    assert len(table) == 2 * 6  # runs of 3 layers: [0] [0,1] [0,1,2] [1] [1,2] [2]; two head reductions
    best = S.choose_key_layers(table)
    assert best["layers"] == [2] and best["head_reduce"] == "max", best
    by = {(tuple(t["layers"]), t["head_reduce"]): t for t in table}
    assert by[(2,), "max"]["auc_within"] > 0.9 and abs(by[(1,), "max"]["auc_within"] - 0.5) < 0.1
    assert S.choose_key_layers(table, ("mean",))["head_reduce"] == "mean"
    # ties go to max over heads, then to fewer layers
    tie = [
        {"layers": [1, 2], "head_reduce": "max", "auc_within": 0.8},
        {"layers": [2], "head_reduce": "mean", "auc_within": 0.8},
        {"layers": [2], "head_reduce": "max", "auc_within": 0.8},
    ]
    assert S.choose_key_layers(tie) == tie[2]
    # no attribute token at all: nothing to choose from (stage 02 then falls back to the band)
    blank = [
        S.SelectionRow(r.by_layer, np.zeros_like(r.attribute), None, r.include) for r in _selection_rows(5)
    ]
    assert S.choose_key_layers(S.key_layer_table(blank, [0, 1, 2])) is None


def test_key_layer_choice_works_on_word_units():
    """With word ids the unit is the word (max over its tokens); an attribute word's tokens all count."""
    row = S.SelectionRow(
        {"max": np.array([[0.1, 0.9, 0.2, 0.3, 0.1, 0.0]])},
        np.array([False, True, False, False, False, False]),
        np.array([0, 0, 1, 2, 2, 3]),  # words: (0 1) (2) (3 4) (5: the answer line)
        np.array([True, True, True, True, True, False]),
    )
    (t,) = S.key_layer_table([row], [4])
    assert t["auc_within"] == 1.0 and t["n_rationales"] == 1  # word 0 (0.9) above words 1 (0.2) and 2 (0.3)


def test_held_out_mask_fixed_share_independent_of_order():
    ids = [f"train-{i:05d}" for i in range(4000)]
    sel = S.held_out_mask(ids, 0.25)
    assert abs(sel.mean() - 0.25) < 0.03
    back = S.held_out_mask(ids[::-1], 0.25)[::-1]
    assert (sel == back).all()


def test_position_share_reads_position_only():
    pos = np.tile(np.arange(50), 40)
    assert ST.position_share(pos / 50.0, pos) > 0.999
    noise = np.random.default_rng(0).random(len(pos))
    assert ST.position_share(noise, pos) < 0.05


def test_token_plots_draw_real_data_object_anchors(tmp_path):
    """Real rationales mention COCO objects (anchor type `object`, not in the embedded scenes): the per-class
    plots of stage 02 draw them (they failed on a missing palette key)."""
    import pandas as pd

    rng = np.random.default_rng(0)
    cls = ["colour", "shape", "object", "other"] * 5
    tokens = pd.DataFrame({"token_class": cls, "anchoring": rng.random(20), "surprisal": rng.random(20)})
    tokens["is_anchor"] = tokens.token_class != "other"
    ST.plot_score_distributions(tokens, tmp_path / "a.png")
    ST.plot_surprisal_vs_anchoring(tokens, tmp_path / "b.png")
    assert (tmp_path / "a.png").exists() and (tmp_path / "b.png").exists()
