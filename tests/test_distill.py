"""Distillation: ratio prompts, datasets, LoRA / QLoRA training, resume, save / load / merge, bad input."""

import dataclasses
import json
from collections import Counter

import pytest
import torch

from vskip_core.config import ParamsError, load_params
from vskip_core.data.embedded import make_example
from vskip_core.modeling.loading import encode, load_model, prompt_text
from vskip_core.stages.distillation import (
    CONTROL,
    Collator,
    DistillError,
    EncodedDataset,
    GateCompressor,
    apply_lora,
    build_datasets,
    data_card,
    draw_ratios,
    in_run,
    load_base,
    load_datasets,
    load_student,
    make_target,
    parse_student,
    ratio_prompt,
    save_datasets,
    split_answer,
    student_name,
    students_at,
    train_student,
    train_students,
)

RATIOS = [1.0, 0.9, 0.7, 0.5, 0.3]


def _rows(cfg, n, wrong_every=0):
    rows = []
    for i in range(n):
        ex = make_example(cfg, "train", i)
        correct = not (wrong_every and i % wrong_every == 0)
        rows.append({"id": ex["id"], "family": ex["family"], "text": ex["rationale"], "correct": correct})
    return rows


def _compress(row, method, ratio):
    """A stand-in gate: keeps a prefix (text_only) or every other word (random) of the body up to the ratio,
    and the answer line whole (as the real gate does with `gate.force_keep_answer`)."""
    body, sep, answer = split_answer(row["text"])
    words = body.split(" ")
    k = max(1, min(len(words) - 1, round(ratio * len(words))))
    picked = words[:k] if method != "random" else (words[::2] + words[1::2])[:k]
    return " ".join(picked) + sep + answer


def _cfg(tiny_teacher, **distill):
    cfg, _ = tiny_teacher
    d = {"max_steps": 6, "batch_size": 4, "logging_steps": 1, "save_steps": 100, "warmup_steps": 0, **distill}
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, **d))


def _lora_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


# --------------------------------------------------------------------------------------------- prompt
def test_ratio_prompt_format_and_place(tiny_teacher):
    cfg, _ = tiny_teacher
    assert ratio_prompt(cfg, 1.0) == {
        "prefix": "",
        "instruction": "Keep 1.0 of the reasoning.",
        "assistant_prefill": "",
    }
    assert ratio_prompt(cfg, 0.5)["instruction"] == "Keep 0.5 of the reasoning."
    assert ratio_prompt(cfg, 0.333)["instruction"] == "Keep 0.33 of the reasoning."
    start = ratio_prompt(cfg, 0.5, "turn_start")
    assert start == {
        "prefix": "Keep 0.5 of the reasoning.\n",
        "instruction": cfg.generation.instruction,
        "assistant_prefill": "",
    }
    lead = ratio_prompt(cfg, 0.5, "answer_start")
    assert lead == {
        "prefix": "",
        "instruction": cfg.generation.instruction,
        "assistant_prefill": "Keep 0.5 of the reasoning.\n",
    }
    hub = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, instruction="Think."))
    assert ratio_prompt(hub, 0.5)["instruction"] == "Think.\nKeep 0.5 of the reasoning."
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(DistillError, match=r"\(0, 1\]"):
            ratio_prompt(cfg, bad)
    tok = load_model(cfg).tokenizer
    ex = make_example(cfg, "test", 0)
    user = prompt_text(ex, tok, **ratio_prompt(cfg, 0.7)).split("<|im_start|>user\n", 1)[1]
    user = user.split("<|im_end|>", 1)[0].split("<|vision_end|>", 1)[1]
    assert user.startswith(ex["question"]) and user.endswith("\nKeep 0.7 of the reasoning.")
    user = prompt_text(ex, tok, **ratio_prompt(cfg, 0.7, "turn_start")).split("<|vision_end|>", 1)[1]
    assert user.startswith("Keep 0.7 of the reasoning.\n" + ex["question"])
    text = prompt_text(ex, tok, **ratio_prompt(cfg, 0.7, "answer_start"))
    assert text.endswith("<|im_start|>assistant\nKeep 0.7 of the reasoning.\n")


def test_answer_start_prefill_is_prompt_not_target(tiny_teacher):
    """With the ratio as the assistant turn's first line, training encodes it before the target without labels,
    and generation's prompt ends with the same tokens."""
    cfg, _ = tiny_teacher
    loaded = load_model(cfg)
    tok, proc = loaded.tokenizer, loaded.processor
    ex = make_example(cfg, "test", 0)
    p = ratio_prompt(cfg, 0.5, "answer_start")
    gen = encode(ex, tok, proc, **p)
    train = encode(ex, tok, proc, target="The circle is red. Answer: A", **p)
    n = len(gen["input_ids"])
    assert train["target_start"] == n
    assert train["input_ids"][:n].tolist() == gen["input_ids"][:n].tolist()
    target = tok.decode(train["input_ids"][n:], skip_special_tokens=True)
    assert target == "The circle is red. Answer: A"


# ------------------------------------------------------------------------------------------- datasets
def test_datasets_share_examples_and_ratio_draws(tiny_teacher, tmp_path):
    cfg, _ = tiny_teacher
    tok = load_model(cfg).tokenizer
    rows = _rows(cfg, 60, wrong_every=6)  # 10 incorrect rationales are filtered out
    dss, report = build_datasets(cfg, rows, ["text_only", "random"], RATIOS, _compress, tok, seed=3)
    assert set(dss) == {"text_only", "random", CONTROL}
    assert report["rows_in"] == 60 and report["kept"] == 50
    ref = dss["text_only"]
    for m, ds in dss.items():
        assert ds["id"] == ref["id"] and len(ds) == 50
        assert all(x == m for x in ds["method"])
        for r, full in zip(ds, rows_by_id(rows, ds["id"])):
            body, sep, answer = split_answer(full["text"])
            assert r["target"].endswith(sep + answer) and r["target"].count("Answer:") == 1
            assert {k: r[k] for k in ratio_prompt(cfg, 1.0)} == ratio_prompt(cfg, r["ratio"])
            if r["ratio"] == 1.0:
                assert r["target"] == full["text"]
            else:
                assert r["target_tokens"] < r["full_tokens"]
    assert dss["random"]["ratio"] == ref["ratio"]  # the same draws for every method
    assert dss["random"]["target"] != ref["target"]  # ... and different compressions
    assert set(dss[CONTROL]["ratio"]) == {1.0}
    # balanced within each family: counts per ratio differ by at most one
    for fam in set(ref["family"]):
        c = Counter(r for r, f in zip(ref["ratio"], ref["family"]) if f == fam)
        assert set(c) <= set(RATIOS) and max(c.values()) - min(c.values()) <= 1
    # the data card counts what is there; saved datasets load back identical
    card = data_card(ref)
    assert sum(v["n"] for v in card["per_ratio"].values()) == 50 == sum(card["per_family"].values())
    assert card["empty_targets"] == 0
    assert card["per_ratio"]["0.3"]["act_ratio"] < card["per_ratio"]["0.9"]["act_ratio"] < 1
    save_datasets(dss, tmp_path / "ds", report)
    back = load_datasets(tmp_path / "ds")
    assert set(back) == set(dss) and back["random"]["target"] == dss["random"]["target"]
    assert json.loads((tmp_path / "ds" / "random" / "data_card.json").read_text())["filters"]["kept"] == 50


def test_a_student_per_ratio_trains_each_method_at_each_ratio_alone(tiny_teacher):
    """`distill.student_per_ratio`: one dataset per (method, ratio) holding every kept rationale at that ratio,
    named `method@ratio`; `students_at` answers each ratio with its own student, the control at 1.0."""
    cfg = _cfg(tiny_teacher, student_per_ratio=True)
    tok = load_model(cfg).tokenizer
    dss, _ = build_datasets(cfg, _rows(cfg, 20), ["vskip", "text_only"], RATIOS, _compress, tok, seed=3)
    assert set(dss) == {f"{m}@{r:g}" for m in ("vskip", "text_only") for r in RATIOS if r < 1} | {CONTROL}
    for name, ds in dss.items():
        method, ratio = parse_student(name)
        assert len(ds) == 20 and set(ds["method"]) == {method}
        assert set(ds["ratio"]) == {1.0 if method == CONTROL else ratio}
    adapters = {name: f"/a/{name}" for name in dss}
    assert students_at(adapters, 0.5) == {
        "vskip": "/a/vskip@0.5",
        "text_only": "/a/text_only@0.5",
        CONTROL: "/a/full",
    }
    assert students_at({"vskip": "/a/v", CONTROL: "/a/f"}, 0.3) == {"vskip": "/a/v", CONTROL: "/a/f"}
    assert student_name("vskip", 0.333) == "vskip@0.33" and student_name(CONTROL, 1.0) == CONTROL


def rows_by_id(rows, ids):
    by = {r["id"]: r for r in rows}
    return [by[i] for i in ids]


def test_ratio_draws_depend_on_ids_and_seed_only():
    rows = [{"id": f"train-{i:06d}", "family": "abcd"[i % 4]} for i in range(40)]
    a = draw_ratios(rows, RATIOS, seed=0)
    assert draw_ratios(list(reversed(rows)), RATIOS, seed=0) == a
    assert draw_ratios(rows, RATIOS, seed=1) != a
    assert Counter(a.values()) == {r: 8 for r in RATIOS}


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_fails_before_training(tiny_teacher, tmp_path):
    cfg, _ = tiny_teacher
    tok = load_model(cfg).tokenizer
    with pytest.raises(
        DistillError, match=r"empty training set after filtering \(12 rows in; kept: non_empty 12, correct 0"
    ):
        build_datasets(cfg, _rows(cfg, 12, wrong_every=1), ["vskip"], RATIOS, _compress, tok)
    with pytest.raises(DistillError, match=r"in \(0, 1\].*bad: \[1.5\]"):
        build_datasets(cfg, _rows(cfg, 12), ["vskip"], [1.0, 1.5], _compress, tok)
    with pytest.raises(ParamsError, match="distill.ratios"):
        load_params("params/smoke.yaml", {"distill.ratios": "[0.0, 0.5]"})
    dss, _ = build_datasets(cfg, _rows(cfg, 8), ["text_only"], RATIOS, _compress, tok)
    bad = _cfg(tiny_teacher, target_modules=["q_proj", "qkv_proj"])
    with pytest.raises(DistillError, match=r"\['qkv_proj'\] match no linear layer.*'q_proj'"):
        train_students(bad, dss, tmp_path / "stage", progress=False)
    assert not (tmp_path / "stage").exists()  # nothing was trained or written
    with pytest.raises(DistillError, match="empty training set"):
        train_students(_cfg(tiny_teacher), {"vskip": dss["text_only"].select([])}, tmp_path, progress=False)


# ------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def trained(tiny_teacher, tmp_path_factory):
    """A LoRA student fitting 8 examples for 16 full-batch steps (the 40-step tiny teacher sits near loss 3.1;
    its attention-only LoRA lowers it slowly but steadily; lr 1e-2 is unstable on it)."""
    attention_lora = {
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "lora_r": 16,
        "lora_alpha": 32,
    }
    cfg = _cfg(tiny_teacher, max_steps=16, lr=3e-3, batch_size=8, lora_dropout=0.0, **attention_lora)
    tok = load_model(cfg).tokenizer
    dss, _ = build_datasets(cfg, _rows(cfg, 8), ["text_only"], RATIOS, _compress, tok)
    out = tmp_path_factory.mktemp("distill")
    metrics = train_student(cfg, dss["text_only"], "text_only", out, progress=False)
    return cfg, dss, metrics


def test_lora_loss_falls(trained):
    cfg, _, m = trained
    hist = [h["loss"] for h in json.loads(open(m["adapter"] + "/history.json").read()) if "loss" in h]
    assert len(hist) == 16 and m["first_loss"] == hist[0] and m["last_loss"] == hist[-1]
    assert sum(hist[-3:]) / 3 < sum(hist[:3]) / 3 - 0.02
    assert sum(b < a for a, b in zip(hist, hist[1:])) >= 10  # falls at most steps, not by one lucky batch
    assert 0 < m["trainable_params"] < 0.2 * m["total_params"] and m["train_size"] == 8


def test_adapter_loads_with_peft_and_merges(trained):
    from peft import PeftModel

    cfg, dss, m = trained
    base = load_base(cfg, attn_implementation=cfg.model.attn_implementation)  # as load_student
    ed = EncodedDataset(dss["text_only"], cfg, base.tokenizer, base.processor)
    batch = Collator(base.tokenizer.pad_token_id, base.adapter.input_keys)([ed[i] for i in range(4)])
    batch.pop("labels")
    base.model.eval()
    with torch.no_grad():
        plain = base.model(**batch).logits
        peft = PeftModel.from_pretrained(base.model, m["adapter"]).eval()
        adapted = peft(**batch).logits
        merged = load_student(cfg, m["adapter"], merge=True).model
        unmerged = load_student(cfg, m["adapter"], merge=False).model
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        assert (adapted - plain).abs().max() > 1e-3  # the adapter does something
        torch.testing.assert_close(unmerged(**batch).logits, adapted, atol=1e-5, rtol=0)
        torch.testing.assert_close(merged(**batch).logits, adapted, atol=1e-5, rtol=0)
    for name in ("adapter_config.json", "params.json", "metrics.json", "history.json", "README.md"):
        assert (m["adapter"] + "/" + name) and __import__("os").path.exists(m["adapter"] + "/" + name)
    saved = json.loads(open(m["adapter"] + "/metrics.json").read())  # no absolute path of this machine
    assert saved["adapter"] == in_run(m["adapter"]) and not saved["adapter"].startswith("/")
    assert not saved["base_path"].startswith(str(cfg.path(cfg.runtime.cache_dir)))


class _Kill(RuntimeError):
    pass


def test_resume_after_kill_matches_uninterrupted_run(tiny_teacher, tmp_path):
    from transformers import TrainerCallback

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 5:
                raise _Kill("simulated kill at step 5")

    cfg = _cfg(tiny_teacher, max_steps=8, save_steps=2, lr=5e-3)
    tok = load_model(cfg).tokenizer
    ds = build_datasets(cfg, _rows(cfg, 12), ["text_only"], RATIOS, _compress, tok)[0]["text_only"]
    with pytest.raises(_Kill):
        train_student(cfg, ds, "text_only", tmp_path / "a", progress=False, callbacks=[KillAt()])
    ckpts = sorted(p.name for p in (tmp_path / "a" / "checkpoints" / "text_only").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2", "checkpoint-4"]
    resumed = train_student(cfg, ds, "text_only", tmp_path / "a", progress=False)
    assert resumed["resumed_from_step"] == 4
    assert not (tmp_path / "a" / "checkpoints").exists()  # cleaned once the adapter is saved
    again = train_student(cfg, ds, "text_only", tmp_path / "a", progress=False)
    assert again["reused"] is True  # a finished student is not retrained
    ref = train_student(cfg, ds, "text_only", tmp_path / "b", progress=False)
    assert ref["resumed_from_step"] == 0
    ha = [h["loss"] for h in json.loads(open(resumed["adapter"] + "/history.json").read()) if "loss" in h]
    hb = [h["loss"] for h in json.loads(open(ref["adapter"] + "/history.json").read()) if "loss" in h]
    assert ha == pytest.approx(hb, abs=1e-5) and len(hb) == 8
    from safetensors.torch import load_file

    wa = load_file(resumed["adapter"] + "/adapter_model.safetensors")
    wb = load_file(ref["adapter"] + "/adapter_model.safetensors")
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------- 4-bit (QLoRA)
def test_qlora_nf4_loss_moves_on_cpu(tiny_teacher, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = _cfg(tiny_teacher, quantization="nf4", max_steps=8, lr=3e-3, lora_dropout=0.0, batch_size=8)
    base = load_base(cfg)
    assert base.model.is_loaded_in_4bit
    assert any(type(mod).__name__ == "Linear4bit" for mod in base.model.modules())
    ds = build_datasets(cfg, _rows(cfg, 8), ["text_only"], RATIOS, _compress, base.tokenizer)[0]["text_only"]
    m = train_student(cfg, ds, "text_only", tmp_path, progress=False, base=base)
    hist = [h["loss"] for h in json.loads(open(m["adapter"] + "/history.json").read()) if "loss" in h]
    assert len(hist) == 8 and max(hist) - min(hist) > 1e-3  # the trap would leave it constant
    assert hist[-1] < hist[0]
    from safetensors.torch import load_file

    w = load_file(m["adapter"] + "/adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in w.items())  # B starts at zero


def test_4bit_repacked_by_inference_is_refused(tiny_teacher):
    bnb = pytest.importorskip("bitsandbytes")
    cfg = _cfg(tiny_teacher, quantization="nf4")
    base = load_base(cfg)
    layer = base.model.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    if not getattr(layer, "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU has no avx512-bf16 path: bitsandbytes never repacks here")
    base.model.eval()
    with torch.no_grad():  # what generate() does to every 4-bit layer
        layer(torch.randn(1, 3, layer.in_features))
    with pytest.raises(DistillError, match="repacked for CPU inference"):
        apply_lora(base, cfg)


# ------------------------------------------------------------------------------------ targets and gating
def test_make_target_replaces_whatever_the_gate_kept_of_the_answer_line():
    body, sep, answer = split_answer("The square is red.\nAnswer: red")
    assert (body, sep, answer) == ("The square is red.", "\n", "Answer: red")
    assert make_target(" square red. Answer: red", answer, sep) == " square red.\nAnswer: red"
    assert make_target(" square red. Answer:", answer, sep) == " square red.\nAnswer: red"
    assert make_target("Answer: red", answer, sep) == "Answer: red"
    assert split_answer("no answer here") == ("no answer here", "", "")
    assert make_target("no answer", "", "") == "no answer"


def test_keep_policy_all_keeps_rationales_without_answer_line(tiny_teacher):
    cfg, _ = tiny_teacher
    tok = load_model(cfg).tokenizer
    rows = [
        {"id": f"train-{i:06d}", "family": "attribute", "text": "....", "correct": False} for i in range(6)
    ]
    with pytest.raises(DistillError, match="empty training set"):
        build_datasets(cfg, rows, ["random"], RATIOS, _compress, tok, keep="answered")
    dss, report = build_datasets(cfg, rows, ["random"], RATIOS, _compress, tok, keep="all")
    assert report["kept"] == 6 and len(dss["random"]) == 6
    assert all(t.strip() for t in dss["random"]["target"])


def _scores_row(tok, ex, rng):
    """A scores.parquet-like row for a gold rationale, with random surprisal and anchoring."""
    enc = tok(ex["rationale"], add_special_tokens=False, return_offsets_mapping=True)
    offsets = [list(o) for o in enc["offset_mapping"]]
    n = len(offsets)
    answer_at = ex["rationale"].rfind("Answer:")
    words, w = [], -1
    for j, (s, _) in enumerate(offsets):
        w += j == 0 or ex["rationale"][s : s + 1].isspace() or ex["rationale"][s - 1 : s].isspace()
        words.append(w)
    return {
        "id": ex["id"],
        "family": ex["family"],
        "text": ex["rationale"],
        "offsets": offsets,
        "surprisal": rng.random(n).tolist(),
        "anchoring": rng.random(n).tolist(),
        "word_ids": words,
        "answer_start": next(j for j, (s, e) in enumerate(offsets) if e > answer_at),
    }


def test_gate_compressor_hits_the_ratio_and_keeps_the_answer(tiny_teacher):
    import numpy as np

    cfg, _ = tiny_teacher
    tok = load_model(cfg).tokenizer
    rng = np.random.default_rng(0)
    rows = [_scores_row(tok, make_example(cfg, "train", i), rng) for i in range(12)]
    gate = GateCompressor(cfg)
    dss, _ = build_datasets(cfg, rows, ["vskip", "text_only", "visual_only", "random"], RATIOS, gate, tok)
    for m in ("vskip", "text_only", "visual_only", "random"):
        for r in dss[m]:
            _, sep, answer = split_answer(r["full_rationale"])
            assert r["target"].endswith(sep + answer)
            if r["ratio"] < 1:
                assert abs(r["actual_ratio"] - r["ratio"]) < 0.15, (m, r["ratio"], r["actual_ratio"])
    assert dss["vskip"]["target"] != dss["text_only"]["target"] != dss["visual_only"]["target"]
    # a row whose answer line alone exceeds the budget keeps just the answer line, counted
    tiny = {**rows[0], "id": "train-999999", "answer_start": 2}  # ids are cached: a new one
    answer_only = gate(tiny, "vskip", 0.05)
    assert answer_only.strip() == rows[0]["text"][rows[0]["offsets"][2][0] :].strip()
    assert gate.events["budget"] >= 1


def test_external_columns_are_taken_from_stage03_outputs(tiny_teacher, tmp_path):
    import pandas as pd

    from vskip_core.stages.distillation import external_columns, with_external_columns

    cfg, _ = tiny_teacher
    rows = [{"id": f"train-{i:06d}", "text": "a b", "offsets": [[0, 1], [1, 3]]} for i in range(3)]
    d03 = tmp_path / "03_gate_ablations"
    d03.mkdir()
    pd.DataFrame({"id": ["x"], "other": [1]}).to_parquet(d03 / "a_unrelated.parquet")
    table = {
        "id": [r["id"] for r in rows],
        "surprisal_external": [[0.5, float(i)] for i in range(3)],
        "keep_prob_llmlingua2": [[0.25, 0.75]] * 3,
    }
    pd.DataFrame(table).to_parquet(d03 / "scores_external.parquet")
    columns = external_columns(["vskip", "external_lm", "llmlingua2"])
    assert columns == ["keep_prob_llmlingua2", "surprisal_external"] and not external_columns(["vskip"])
    out, sources = with_external_columns(cfg, rows, columns, search_dirs=[d03])
    assert all(s.endswith("scores_external.parquet") for s in sources.values()) and len(sources) == 2
    assert [list(r["surprisal_external"]) for r in out] == table["surprisal_external"]
    assert [list(r["keep_prob_llmlingua2"]) for r in out] == table["keep_prob_llmlingua2"]
    assert with_external_columns(cfg, out, columns)[1] == dict.fromkeys(columns, "scores")  # nothing to do


def test_students_side_by_side_equal_students_one_after_another(tiny_teacher, tmp_path):
    """`distill.workers`: students trained two at a time, each in its own process, are the students trained one
    after another (same seed, same data, one torch thread each)."""
    from safetensors.torch import load_file

    cfg = _cfg(tiny_teacher, max_steps=2, batch_size=4)
    tok = load_model(cfg).tokenizer
    dss, _ = build_datasets(cfg, _rows(cfg, 8), ["text_only"], RATIOS, _compress, tok)
    apart = train_students(dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, workers=2)), dss,
                           tmp_path / "two", progress=False)  # fmt: skip
    alone = train_students(dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, workers=1)), dss,
                           tmp_path / "one", progress=False)  # fmt: skip
    assert list(apart) == list(dss) == list(alone)
    for name in dss:
        a = load_file(f"{apart[name]['adapter']}/adapter_model.safetensors")
        b = load_file(f"{alone[name]['adapter']}/adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
