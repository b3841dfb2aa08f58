"""LLMLingua-2 as the `llmlingua` package runs it, on its in-repo stand-in: where the model comes from, chunks of at
most 510 subwords ending at "." (no truncation), word p(keep) = mean of its subwords, words onto teacher tokens,
and stages 03 / 04 adding the column when a method asks for it."""

import numpy as np
import pytest
import torch

from vskip_core.config import load_params
from vskip_core.method import external_lm as X
from vskip_core.modeling import external_lm as XM

STANDIN = {"gate.llmlingua2_model": "standin:llmlingua2"}


def _cfg(tmp_path, **over):
    return load_params("params/default.yaml", {"runtime.cache_dir": str(tmp_path / "cache"), **over})


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    return XM.load_llmlingua2(_cfg(tmp_path_factory.mktemp("ll2"), **STANDIN), "cpu")


def test_words_then_teacher_tokens_by_hand():
    """Text "ab cd": subwords ▁a (0.2) b (0.4) ▁cd (0.9) -> words ab = 0.3 over [0, 2) and cd = 0.9 over [2, 5) (a word
    owns the space before it); teacher tokens a | b c | d -> 0.3, (0.3 * 1 + 0.9 * 2) / 3 = 0.7, 0.9."""
    sub = XM.Subwords(["▁a", "b", "▁cd"], np.array([[0, 1], [1, 2], [3, 5]]), np.array([0.2, 0.4, 0.9]))
    probs, spans = X.words(sub, 5)
    assert probs == pytest.approx([0.3, 0.9]) and spans.tolist() == [[0, 2], [2, 5]]
    mapped = X.to_teacher_tokens(probs, spans, np.array([[0, 1], [1, 4], [4, 5]]), reduce="mean")
    assert mapped == pytest.approx([0.3, 0.7, 0.9])
    merged = X.to_teacher_tokens(probs, spans, np.array([[0, 5]]), reduce="mean")  # one token over both words
    assert merged == pytest.approx([(0.3 * 2 + 0.9 * 3) / 5])


def test_chunks_end_at_the_last_full_stop_before_the_limit():
    toks = ["▁a", "▁b", ".", "▁c", "▁d", "▁e", ".", "▁f", "▁g"]
    assert XM.chunk_spans(toks, 4) == [(0, 3), (3, 7), (7, 9)]  # cut after each "."
    assert XM.chunk_spans(["▁x"] * 9, 4) == [(0, 4), (4, 8), (8, 9)]  # none: cut at the limit
    assert XM.chunk_spans(toks, 510) == [(0, 9)]


def test_a_long_text_is_scored_completely_and_a_short_one_as_one_forward(clf):
    tok, model = clf.tokenizer, clf.model
    short = "The box is red. Answer: B"
    long = " ".join(f"Step {i}: the red box is left of the blue one." for i in range(120))
    n_long = len(tok(long, add_special_tokens=False)["input_ids"])
    assert n_long > 3 * 510
    subs = XM.token_keep_probs(clf, [short, long], batch_size=2)
    assert len(subs[1].probs) == n_long and ((subs[1].probs > 0) & (subs[1].probs < 1)).all()
    assert len(XM.chunk_spans(subs[1].tokens)) >= 4
    probs, spans = X.words(subs[1], len(long))  # the words tile the text: every character covered
    assert spans[0, 0] == 0 and spans[-1, 1] == len(long) and (spans[1:, 0] == spans[:-1, 1]).all()
    enc = tok(short, return_tensors="pt")  # one plain forward, as without chunking
    with torch.no_grad():
        direct = model(**enc).logits.softmax(-1)[0, 1:-1, 1].numpy()
    assert subs[0].probs == pytest.approx(direct, abs=1e-6)
    again = XM.token_keep_probs(clf, [long], max_len=64)  # other chunks: same subwords, each scored once
    assert again[0].tokens == subs[1].tokens and np.isfinite(again[0].probs).all()


def test_keep_probability_covers_every_teacher_token(clf):
    text = "The box is red.\nAnswer: B"
    teacher = [[0, 3], [3, 7], [7, 10], [10, 14], [14, 15], [15, 16], [16, 22], [22, 23], [23, 25], [25, 25]]
    p = X.keep_probability(clf, [text], [teacher])[0]
    assert p.shape == (10,) and np.isfinite(p).all()  # the newline and the zero-width token included
    assert p[9] == pytest.approx(p[8])  # a zero-width token takes the word it falls in


def test_where_llmlingua2_comes_from(tmp_path):
    ok, msg = XM.llmlingua2_status(_cfg(tmp_path))
    assert not ok and "from the model hub" in msg and "llmlingua-2-xlm-roberta-large-meetingbank" in msg
    ok, msg = XM.llmlingua2_status(_cfg(tmp_path, **STANDIN))
    assert ok and "stand-in" in msg
    missing = _cfg(tmp_path, **{"gate.llmlingua2_path": str(tmp_path / "nowhere")})
    ok, msg = XM.llmlingua2_status(missing)
    assert not ok and str(tmp_path / "nowhere") in msg
    with pytest.raises(XM.ExternalScorerUnavailable, match="nowhere"):
        XM.load_llmlingua2(missing)
    (tmp_path / "cache" / "llmlingua-2").mkdir(parents=True)
    (tmp_path / "cache" / "llmlingua-2" / "config.json").write_text("{}")
    assert XM.llmlingua2_source(_cfg(tmp_path)) == (str(tmp_path / "cache" / "llmlingua-2"), "cache")


def test_a_hub_id_without_network_fails_clearly(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network, minus the retries
    with pytest.raises(XM.ExternalScorerUnavailable) as err:
        XM.load_llmlingua2(_cfg(tmp_path), "cpu")
    msg = str(err.value)
    assert "microsoft/llmlingua-2-xlm-roberta-large-meetingbank" in msg and "gate.llmlingua2_path" in msg
    assert "network" in msg


def test_stage03_adds_the_column_when_asked_and_fails_when_it_cannot(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import pandas as pd

    from vskip_core.stages import gating as SG

    text = "The box is red. Answer: B"
    scores = pd.DataFrame([{"id": "train-000000", "text": text, "offsets": [[0, 3], [3, 7], [7, 25]]}])
    pd.DataFrame({"id": ["train-000000"], "surprisal_external": [[1.0, 2.0, 3.0]]}).to_parquet(
        tmp_path / "scores_external.parquet"
    )
    asked = {"distill.methods": ["vskip", "llmlingua2"]}
    out, info = SG.external_scores(_cfg(tmp_path, **STANDIN, **asked), scores, search_dirs=[tmp_path])
    assert len(out["keep_prob_llmlingua2"][0]) == 3 and "computed with LLMLingua-2" in info["llmlingua2"]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(XM.ExternalScorerUnavailable, match="gate.llmlingua2_path"):
        SG.external_scores(_cfg(tmp_path, **asked), scores, search_dirs=[tmp_path])
