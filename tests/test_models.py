import pytest
import torch

from vskip_core.data.embedded import make_example
from vskip_core.modeling.loading import (
    CHAT_TEMPLATE,
    encode,
    image_processor_for,
    load_model,
    prompt_text,
    save_model,
)
from vskip_core.teacher import history


def _real_qwen2vl_processor(proc, tok):
    """Qwen2VLProcessor cannot be built without torchvision only because of its video-processor type
    check; skip that check (video_processor=None) and everything else is the real processor's code."""
    import transformers.processing_utils as pu
    from transformers import Qwen2VLProcessor

    orig = pu.ProcessorMixin.check_argument_for_proper_class

    def check(self, name, arg):
        return None if name == "video_processor" and arg is None else orig(self, name, arg)

    pu.ProcessorMixin.check_argument_for_proper_class = check
    try:
        return Qwen2VLProcessor(
            image_processor=proc, tokenizer=tok, chat_template=CHAT_TEMPLATE, video_processor=None
        )
    finally:
        pu.ProcessorMixin.check_argument_for_proper_class = orig


def test_encode_equals_qwen2vl_processor(tiny_teacher):
    cfg, _ = tiny_teacher
    loaded = load_model(cfg)
    tok, proc = loaded.tokenizer, image_processor_for(cfg)
    real = _real_qwen2vl_processor(proc, tok)
    for i in range(6):
        ex = make_example(cfg, "test", i)
        ref = real(images=[ex["image"]], text=[prompt_text(ex, tok)], return_tensors="pt")
        mine = encode(ex, tok, proc)
        for k in ("input_ids", "mm_token_type_ids"):
            assert torch.equal(ref[k][0], mine[k]), k
        assert torch.equal(ref["pixel_values"], mine["pixel_values"])
        assert torch.equal(ref["image_grid_thw"], mine["image_grid_thw"])
        assert torch.equal(
            mine["input_ids"][mine["image_positions"]],
            torch.full_like(mine["image_positions"], loaded.model.config.image_token_id),
        )


def test_tiny_teacher_loss_falls(tiny_teacher):
    _, path = tiny_teacher
    lm = [h["loss"] for h in history(path) if h["phase"] == "lm"]
    assert len(lm) == 40
    assert sum(lm[-5:]) / 5 < 0.7 * sum(lm[:5]) / 5
    vis = [h["loss"] for h in history(path) if h["phase"] == "vision"]
    assert vis[-1] < vis[0]


def test_saved_teacher_reloads_and_generates_identically(tiny_teacher, tmp_path):
    from vskip_core.modeling.decoding import generate

    cfg, _ = tiny_teacher
    a = load_model(cfg)
    exs = [make_example(cfg, "test", i) for i in range(4)]
    ga = generate(a.model, a.tokenizer, a.processor, exs, max_new_tokens=12)
    save_model(a.model, a.tokenizer, a.processor, tmp_path / "copy")
    b = load_model(cfg, str(tmp_path / "copy"))
    gb = generate(b.model, b.tokenizer, b.processor, exs, max_new_tokens=12)
    assert [g["token_ids"] for g in ga] == [g["token_ids"] for g in gb]
    assert all(len(g["token_ids"]) > 0 for g in ga)


def test_batched_generation_matches_single(tiny_teacher):
    """Left padding must not change greedy outputs (3D rotary positions use the attention mask)."""
    from vskip_core.modeling.decoding import generate

    cfg, _ = tiny_teacher
    a = load_model(cfg)
    exs = [make_example(cfg, "test", i) for i in range(4)]
    batched = generate(a.model, a.tokenizer, a.processor, exs, max_new_tokens=10, batch_size=4)
    single = generate(a.model, a.tokenizer, a.processor, exs, max_new_tokens=10, batch_size=1)
    assert [g["token_ids"] for g in batched] == [g["token_ids"] for g in single]


def test_missing_embedded_teacher_has_clear_error(smoke_cfg):
    with pytest.raises(FileNotFoundError, match="00_embedded_teacher"):
        load_model(smoke_cfg)


def test_probe_words_name_each_class_in_the_rationales_tokens(tiny_teacher):
    from vskip_core.data.embedded import COLOURS, SHAPES, SIZES
    from vskip_core.teacher import probe_words

    cfg, _ = tiny_teacher
    tok = load_model(cfg).tokenizer
    words = probe_words(tok)
    assert [tok.decode(ids) for ids in words["colour"]] == [" " + c for c in COLOURS]
    assert [tok.decode(ids) for ids in words["shape"]] == [" " + s for s in SHAPES]
    assert [tok.decode(ids) for ids in words["size"]] == [" " + s for s in SIZES]
    assert set(words) == {"colour", "shape", "size"}  # the digit heads are linear, not tied to words
    # the words are tokenized as the rationale tokenizes them ("... a small purple diamond marked $3.14")
    text_ids = tok(" small purple diamond $3.14", add_special_tokens=False)["input_ids"]
    diamond = words["shape"][SHAPES.index("diamond")]
    for ids in (words["size"][0], words["colour"][list(COLOURS).index("purple")], diamond):
        assert all(i in text_ids for i in ids)


def test_tied_probe_reads_visual_tokens_in_word_space():
    """A tied head's class k is the word embedding of k: a visual token equal to the embedding of " red"
    is classified red, and the probe loss trains the word embeddings (the language model's own input)."""
    from torch import nn

    from vskip_core.teacher import VisionProbe

    torch.manual_seed(0)
    emb = nn.Embedding(40, 32)
    sizes = {"colour": 6, "shape": 4, "size": 2, "d0": 10, "d1": 10, "d2": 10}
    words = {k: [[(1 + 10 * j + c) % 40] for c in range(n)] for j, (k, n) in enumerate(sizes.items())}
    probe = VisionProbe(32, 4, emb, words)
    assert not any(p is emb.weight for p in probe.parameters())  # the embedding stays the model's own
    feats = emb.weight[[w[0] for w in words["colour"]]].detach()  # one visual token per colour word
    logits = probe(feats)
    assert logits["colour"].shape == (6, 7) and logits["cell"].shape == (6, 4)
    # the digit slots are separate linear heads: one visual token can read $4.57, not 4 in every slot
    assert logits["d0"].shape == (6, 11) and {"d0", "d1", "d2"} <= set(probe.heads)
    assert torch.equal(logits["colour"].argmax(-1), torch.arange(1, 7))  # class 0 is 'none'
    torch.nn.functional.cross_entropy(logits["colour"], torch.arange(1, 7)).backward()
    assert emb.weight.grad is not None and emb.weight.grad[words["colour"][0][0]].abs().sum() > 0


def test_length_buckets_give_the_whole_batch_loss(tiny_teacher):
    """Two micro-batches cut by length, each divided by the whole batch's weight, sum to the one-batch loss
    (so bucketing saves the padding compute and changes nothing else)."""
    from vskip_core.teacher import LM_INPUTS, length_buckets, lm_batch, weighted_lm_loss

    cfg, _ = tiny_teacher
    m = load_model(cfg)
    exs = [make_example(cfg, "test", i) for i in range(8)]  # two of each family: multistep is the long one
    parts = length_buckets(exs, m.tokenizer, m.processor, 3.0)
    assert len(parts) == 2 and sorted(x["id"] for p, _ in parts for x in p) == sorted(x["id"] for x in exs)
    assert {x["family"] for x in parts[1][0]} == {"multistep"}
    full = lm_batch(exs, m.tokenizer, m.processor, 3.0)
    padded = sum(b["input_ids"].numel() for _, b in parts)
    assert padded < 0.85 * full["input_ids"].numel()

    def loss(b, denom=None):
        with torch.no_grad():
            logits = m.model(**{k: b[k] for k in LM_INPUTS}).logits
        return weighted_lm_loss(logits, b["labels"], b["weights"], denom)

    denom = sum(b["weights"][:, 1:].sum() for _, b in parts)
    assert torch.allclose(sum(loss(b, denom) for _, b in parts), loss(full), atol=1e-5)


def test_tiny_teacher_runs_the_four_phases_in_order(tiny_teacher):
    from vskip_core.config import TEACHER_PHASES

    cfg, path = tiny_teacher
    tags = [h["phase"] for h in history(path)]
    e = cfg.embedded
    assert e.verdict_steps > 0  # smoke.yaml runs a short verdict phase, so the test covers it
    steps = [e.pretrain_steps, e.drill_steps, e.train_steps, e.verdict_steps]
    assert tags == [t for t, n in zip(TEACHER_PHASES.values(), steps) for _ in range(n)]
    assert list(TEACHER_PHASES) == ["vision_pretraining", "lookup_drills", "end_to_end", "verdict"]
    # lookup_drills and end_to_end share one lr schedule: one warm-up, then one cosine over both
    lr = [h["lr"] for h in history(path) if h["phase"] in ("drill", "lm")]
    assert lr[: e.warmup_steps] == sorted(lr[: e.warmup_steps]) and lr[-1] < lr[e.warmup_steps]


def test_family_weights_shape_the_teachers_stream():
    import collections
    import random

    from vskip_core.config import ParamsError, load_params
    from vskip_core.teacher import family_for

    unweighted = load_params("params/smoke.yaml", {"embedded.family_weights": []})
    assert family_for(unweighted, 7) is None  # no weights: the benchmark's own rotation
    cfg = load_params("params/smoke.yaml", {"embedded.family_weights": [1, 3, 0, 0]})
    counts = collections.Counter(family_for(cfg, i) for i in range(2000))
    assert set(counts) == {"attribute", "existence"} and 2.5 < counts["existence"] / counts["attribute"] < 3.5
    # a pure function of i (a resumed build sees the same stream), not of Python's global random state
    first = [family_for(cfg, i) for i in range(50)]
    random.seed(123)
    assert [family_for(cfg, i) for i in range(50)] == first
    with pytest.raises(ParamsError, match="one weight per family"):
        load_params("params/smoke.yaml", {"embedded.family_weights": [1, 2]})


def test_decision_words_get_their_own_loss_weight(tiny_teacher):
    from vskip_core.teacher import target_weights

    cfg, _ = tiny_teacher
    tok = load_model(cfg).tokenizer
    ex = next(x for i in range(40) if (x := make_example(cfg, "test", i, "existence"))["decisions"])
    w = target_weights(tok, ex, anchor_weight=3.0, decision_weight=7.0)
    enc = tok(ex["rationale"], add_special_tokens=False, return_offsets_mapping=True)
    d = ex["decisions"][0]
    hit = [j for j, (s, e) in enumerate(enc["offset_mapping"]) if s < d["end"] and e > d["start"]]
    assert hit and all(w[j] == 7.0 for j in hit)
    assert set(w.tolist()) == {1.0, 3.0, 7.0}


def test_direct_answers_and_added_sentences_reach_the_training_batch(tiny_teacher):
    """A direct answer is `Answer: X` alone, weighted `direct_weight`; an added sentence is in the prompt, not
    in the target; the prefill `Answer:` tokenizes as the direct target's first tokens (what stage 05 decodes)."""
    import dataclasses

    from vskip_core.data.answers import ANSWER_PREFIX
    from vskip_core.data.embedded import TRAIN_INSTRUCTIONS
    from vskip_core.teacher import full_batch, tokenizer_corpus

    cfg, _ = tiny_teacher
    m = load_model(cfg)
    on = dataclasses.replace(
        cfg,
        embedded=dataclasses.replace(cfg.embedded, direct_share=0.5, instruct_share=0.5, direct_weight=5.0),
    )
    b = type("B", (), {"cfg": on, "tok": m.tokenizer, "proc": m.processor})()
    exs, parts = full_batch(b, on.embedded.drill_steps)
    direct = [x for x in exs if x.get("direct")]
    assert direct and len(direct) < len(exs)
    tok = m.tokenizer
    prefill = tok(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    for part, batch in parts:
        for row, x in enumerate(part):
            ids = batch["input_ids"][row][batch["labels"][row] != -100].tolist()
            text = tok.decode(ids, skip_special_tokens=True)
            prompt = tok.decode(batch["input_ids"][row][batch["labels"][row] == -100].tolist())
            if x.get("direct"):
                assert text == f"{ANSWER_PREFIX} {x['answer']}" and ids[: len(prefill)] == prefill
                w = batch["weights"][row][batch["labels"][row] != -100]
                # the prefilled `Answer:` carries no loss (else greedy decoding would start every turn with it)
                assert w[: len(prefill)].tolist() == [0.0] * len(prefill) and set(
                    w[len(prefill) : -1].tolist()
                ) == {5.0}
            added = x.get("instruction") or x.get("prefix", "").strip()
            if added:
                assert added in prompt and added not in text
    assert set(TRAIN_INSTRUCTIONS) <= set(tokenizer_corpus(on, n=5))
    assert not set(TRAIN_INSTRUCTIONS) & set(tokenizer_corpus(cfg, n=5))


def test_compare_drills_put_their_loss_on_the_verdict_only(tiny_teacher):
    from vskip_core.data.embedded import make_compare_drill
    from vskip_core.teacher import target_weights

    cfg, _ = tiny_teacher
    tok = load_model(cfg).tokenizer
    d = make_compare_drill(cfg, "teacher", 3)
    w = target_weights(tok, d, anchor_weight=3.0, decision_weight=7.0)
    enc = tok(d["rationale"], add_special_tokens=False, return_offsets_mapping=True)
    v = d["decisions"][0]
    hit = [j for j, (s, e) in enumerate(enc["offset_mapping"]) if s < v["end"] and e > v["start"]]
    assert hit and all(w[j] == 7.0 for j in hit)
    assert sum(w > 0).item() == len(hit)  # the colours, copied from nowhere, carry no loss


def test_reasoning_drills_are_blank_and_carry_loss_on_their_decisions_only(tiny_teacher):
    import dataclasses

    from vskip_core.data.embedded import BACKGROUND, make_reasoning_drill
    from vskip_core.teacher import target_weights

    cfg, _ = tiny_teacher
    tok = load_model(cfg).tokenizer
    local = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, multistep_rationale="local"))
    d = make_reasoning_drill(local, "teacher", 5)
    assert set(d["image"].getdata()) == {BACKGROUND}  # nothing to see: each decision follows from the text
    w = target_weights(tok, d, anchor_weight=3.0, decision_weight=7.0)
    enc = tok(d["rationale"], add_special_tokens=False, return_offsets_mapping=True)
    hit = {
        j
        for v in d["decisions"]
        for j, (s, e) in enumerate(enc["offset_mapping"])
        if s < v["end"] and e > v["start"]
    }
    assert hit and {j for j in range(len(enc["input_ids"])) if w[j] > 0} == hit
    assert len(d["decisions"]) >= 4  # verdicts, leaders and the final letter at least


def test_reasoning_drills_leave_an_options_presence_without_loss():
    """A blank image cannot say whether an option is there: "there is no" carries loss only when asked for."""
    from vskip_core.config import load_params
    from vskip_core.data.embedded import OPTION_ABSENT, make_reasoning_drill

    cfg = load_params("params/default.yaml", {"data.multistep_rationale": "verify"})
    off = [make_reasoning_drill(cfg, "teacher", i) for i in range(40)]
    on = [make_reasoning_drill(cfg, "teacher", i, presence=True) for i in range(40)]
    assert all(OPTION_ABSENT not in [d["value"] for d in x["decisions"]] for x in off)
    assert sum(OPTION_ABSENT in [d["value"] for d in x["decisions"]] for x in on) >= 5
    assert all(
        OPTION_ABSENT in x["rationale"]
        for x in off
        if OPTION_ABSENT in [d["value"] for d in next(y for y in on if y["id"] == x["id"])["decisions"]]
    )  # the words stay, only the loss goes
    for a, b in zip(off, on):
        assert [d for d in b["decisions"] if d["value"] != OPTION_ABSENT] == a["decisions"]


def test_torch_threads_restores_the_count():
    import torch

    from vskip_core.runtime import torch_threads

    before = torch.get_num_threads()
    with torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with torch_threads(0):  # 0 leaves the count alone
        assert torch.get_num_threads() == before


def test_teacher_build_resumes_after_a_kill_in_the_verdict_phase(tiny_teacher, tmp_path, monkeypatch):
    """A build killed mid-way (here: in the verdict phase) resumes from its last checkpoint to the same weights as the
    uninterrupted build of the `tiny_teacher` fixture."""
    import dataclasses

    from safetensors.torch import load_file

    import vskip_core.teacher as teacher

    cfg, ref = tiny_teacher
    cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, cache_dir=str(tmp_path)))
    monkeypatch.setattr(teacher, "CKPT_EVERY", 1)
    real, calls = teacher.make_compare_drill, {"n": 0}

    def dies_once(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # the second verdict step of smoke.yaml (4 drills a step)
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(teacher, "make_compare_drill", dies_once)
    with pytest.raises(KeyboardInterrupt):
        teacher.build_teacher(cfg, progress=False)
    building = next(tmp_path.glob("*.building"))
    assert torch.load(building / "ckpt.pt", weights_only=False)["state"]["verdict_step"] == 1
    out = teacher.build_teacher(cfg, progress=False)
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["phase"] for h in history(out)] == [h["phase"] for h in history(ref)]
