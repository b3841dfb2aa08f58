"""Decoding on tiny random-weight models of the real classes (Qwen2-VL, Mllama): the assistant prefill of the
direct-answer baseline (stage 05) and the explicit decoding config every generate() runs under."""

import json

import pytest
import torch

from vskip_core.config import load_params
from vskip_core.data.embedded import make_example
from vskip_core.modeling import adapters as A
from vskip_core.modeling.decoding import generate


@pytest.fixture(scope="module")
def cfg():
    return load_params("params/smoke.yaml")


@pytest.fixture(scope="module")
def texts(cfg):
    exs = [make_example(cfg, "train", i) for i in range(160)]
    return [e["question"] + " " + e["rationale"] for e in exs]


@pytest.fixture(scope="module")
def tiny(texts, tmp_path_factory):
    """family -> (model, tokenizer, processor, saved directory)."""
    out = {}
    for fam in ("qwen2_vl", "mllama"):
        d = tmp_path_factory.mktemp(fam)
        out[fam] = (*A.build_tiny(fam, texts, path=d), d)
    return out


def _greedy_by_hand(model, ad, item, pad_id, end_id, steps):
    """Greedy continuation by full forwards (no cache) on a hand-built input; generated tokens extend the
    model's extra per-token inputs as transformers' generate does (Mllama: the last cross-attention row)."""
    item = dict(item)
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(**ad.model_inputs(ad.collate([item], pad_id, "left"), "cpu")).logits[0, -1]
        nxt = int(logits.argmax())
        if nxt == end_id:
            break
        out.append(nxt)
        new = torch.tensor([nxt])
        item["input_ids"] = torch.cat([item["input_ids"], new])
        if "mm_token_type_ids" in item:
            item["mm_token_type_ids"] = torch.cat([item["mm_token_type_ids"], torch.zeros_like(new)])
        if "cross_attention_mask" in item:
            cam = item["cross_attention_mask"]
            item["cross_attention_mask"] = torch.cat([cam, cam[-1:]])
    return out


@pytest.mark.parametrize("family", ["qwen2_vl", "mllama"])
def test_assistant_prefill_continues_after_the_prefill(cfg, tiny, family):
    """Stage 05's direct-answer baseline (`assistant_prefill="Answer:"`) runs on every family, and what it
    generates is the greedy continuation of the prompt with the prefill encoded by hand (Mllama: the
    processor's own cross-attention mask over the longer sequence)."""
    model, tok, proc, _ = tiny[family]
    ad = A.get_adapter(family)
    end = ad.end_token_id(tok)
    exs = [make_example(cfg, "test", i) for i in range(2)]
    got = generate(model, tok, proc, exs, max_new_tokens=6, batch_size=2, assistant_prefill="Answer:")
    for ex, g in zip(exs, got):
        ref = ad.encode(ex, tok, proc, target="Answer:")  # prompt + "Answer:" + end token
        item = {
            k: v[:-1] if k in ("input_ids", "mm_token_type_ids", "cross_attention_mask") else v
            for k, v in ref.items()
        }
        want = _greedy_by_hand(model, ad, item, tok.pad_token_id, end, 6)
        assert g["token_ids"] == want
        assert g["text"] == tok.decode(want, skip_special_tokens=True)
    assert any(g["token_ids"] for g in got)  # something was generated after the prefill


# ---------------------------------------------------------------------- the checkpoint's generation_config
# Qwen2-VL-2B-Instruct's published generation_config.json (token ids are the tiny tokenizer's)
PUBLISHED = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.01, "top_k": 1, "top_p": 0.001}


@pytest.fixture(scope="module")
def published_qwen(cfg, tiny, tmp_path_factory):
    """The tiny Qwen2-VL saved with the published generation_config.json, loaded through load_model."""
    from vskip_core.modeling.loading import load_model

    model, tok, proc, _ = tiny["qwen2_vl"]
    d = tmp_path_factory.mktemp("published")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    proc.save_pretrained(d)
    ids = {"eos_token_id": [tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id]}
    conf = {**PUBLISHED, **ids, "bos_token_id": tok.pad_token_id, "pad_token_id": tok.pad_token_id}
    (d / "generation_config.json").write_text(json.dumps(conf))
    loaded = load_model(cfg, str(d))
    assert loaded.model.generation_config.repetition_penalty == 1.05  # the checkpoint's values are loaded
    return loaded


def _examples(cfg, n):
    return [make_example(cfg, "test", i) for i in range(n)]


def test_generate_ignores_the_checkpoints_generation_config(cfg, published_qwen):
    """generate() is plain argmax decoding although the checkpoint asks for repetition_penalty 1.05."""
    lo = published_qwen
    ad = A.get_adapter("qwen2_vl")
    end = ad.end_token_id(lo.tokenizer)
    exs = _examples(cfg, 4)
    got = generate(lo.model, lo.tokenizer, lo.processor, exs, max_new_tokens=12, batch_size=4)
    for ex, g in zip(exs, got):
        want = _greedy_by_hand(lo.model, ad, ad.encode(ex, lo.tokenizer, lo.processor), 0, end, 12)
        assert g["token_ids"] == want


def test_exactness_check_on_a_published_qwen_config(cfg, published_qwen):
    """Stage 07's retention-1.0 check holds on the published config, with the params' repetition_penalty
    at 1.0 (default) and at 1.05 (the pruned decoder applies it as transformers' generate does); the check
    reports the decoding config both sides ran under."""
    import dataclasses

    from vskip_core.stages import pruning as stage

    exs = _examples(cfg, 3)
    res = stage.exactness_check(published_qwen, exs, cfg, max_new_tokens=10)
    dec = res.pop("generation_config")
    assert dec["do_sample"] is False and dec["repetition_penalty"] == 1.0
    assert res and all(res.values()), res
    c2 = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, repetition_penalty=1.05))
    res2 = stage.exactness_check(published_qwen, exs, c2, max_new_tokens=10)
    assert res2.pop("generation_config")["repetition_penalty"] == 1.05
    assert res2 and all(res2.values()), res2
    lo = published_qwen
    plain, penalized = (
        generate(lo.model, lo.tokenizer, lo.processor, exs, 10, 3, repetition_penalty=rp)
        for rp in (1.0, 1.05)
    )
    assert [g["token_ids"] for g in plain] != [g["token_ids"] for g in penalized]  # the penalty bites
