"""Decoding on tiny random-weight models of the real classes (Qwen2-VL, Mllama): the assistant prefill of the
direct-answer baseline (stage 05) and the explicit decoding config every generate() runs under."""

import pytest
import torch

from vskip_core import adapters as A
from vskip_core.config import load_params
from vskip_core.data import make_example
from vskip_core.generation import generate


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
