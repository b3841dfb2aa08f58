"""In-repo stand-ins for the hub (vskip_core.data.standins) and the load-time checks the real params files need."""

import json

import pytest

from vskip_core.config import ParamsError, load_params
from vskip_core.data import standins
from vskip_core.modeling.standins import resolve


def _cfg(tmp_path, name="params/smoke.yaml", **over):
    o = {"runtime.cache_dir": str(tmp_path / "cache"), "runtime.results_dir": str(tmp_path / "results")}
    return load_params(name, {**o, **over})


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    """One cache for the model stand-ins of this module (each builds once, in about ten seconds)."""
    return tmp_path_factory.mktemp("models")


@pytest.mark.parametrize("family", standins.MODELS)
def test_model_standin_is_saved_like_a_hub_checkpoint(model_cache, family):
    from vskip_core.modeling.loading import load_model

    tmp_path = model_cache
    cfg = _cfg(tmp_path)
    path = resolve(cfg, f"standin:{family}")
    files = {
        p.name for p in standins.standin_dir(cfg.path(cfg.runtime.cache_dir), f"standin:{family}").iterdir()
    }
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    gen = json.loads(
        (
            tmp_path / "cache" / "standins" / f"{family}-v{standins.VERSION}" / "generation_config.json"
        ).read_text()
    )
    if family == "mllama":
        assert gen["temperature"] == 0.6 and gen["top_p"] == 0.9 and gen["do_sample"]
    else:  # the published Qwen-VL sampling fields, which greedy decoding must not inherit
        assert gen["repetition_penalty"] == 1.05 and gen["top_k"] == 1 and gen["do_sample"]
    loaded = load_model(cfg, f"standin:{family}")
    assert loaded.family == family and loaded.path == path
    assert loaded.tokenizer.chat_template  # the family's template travels with the tokenizer
    assert resolve(cfg, f"standin:{family}") == path  # cached: built once


@pytest.mark.parametrize("family", standins.MODELS)
def test_model_standin_writes_a_rationale_with_visual_words_and_an_answer_line(model_cache, family):
    """Greedy decoding (the project's own `generate`) on stand-in examples, under the prompts the pipeline uses
    (the CoT instruction, a ratio sentence after it or before the question): colour, shape and COCO object
    words, and an answer line, within the stand-in params' 24 new tokens."""
    import torch

    from vskip_core.data.real import find_real_anchors, normalize_pope
    from vskip_core.modeling.decoding import generate
    from vskip_core.modeling.loading import load_model
    from vskip_core.modeling.prompts import answer_line_start
    from vskip_core.stages.distillation import ratio_prompt

    torch.set_num_threads(1)
    cfg = _cfg(model_cache, "params/standin/qwen25vl_7b.yaml")
    loaded = load_model(cfg, f"standin:{family}")
    exs = [normalize_pope(r) for r in standins.pope_rows(3)[4:6]]
    exs.append(normalize_pope({**standins.pope_rows(1)[0], "question": "What is the total amount?"}))
    prompts = [{"instruction": cfg.generation.instruction}, ratio_prompt(cfg, 0.3, "question_end")]
    prompts.append(ratio_prompt(cfg, 0.6, "turn_start"))
    for p in prompts:
        outs = generate(
            loaded.model, loaded.tokenizer, loaded.processor, exs, cfg.generation.max_new_tokens, **p
        )
        for o, ex in zip(outs, exs):
            kinds = {a["type"] for a in find_real_anchors(o["text"], ex)}
            assert {"colour", "shape", "object"} <= kinds, (p, o["text"])
            assert answer_line_start(o["text"]) is not None, (p, o["text"])


def test_dataset_standins_load_through_the_hub_loaders(tmp_path):
    from vskip_core.data import real as B

    cfg = _cfg(
        tmp_path,
        **{
            "data.source": ["mmmu", "docvqa", "pope"],
            "data.mmmu_id": "standin:mmmu",
            "data.docvqa_id": "standin:docvqa",
            "data.pope_id": "standin:pope",
            "data.n_train": 6,
            "data.n_val": 0,
            "data.n_test": 6,
        },
    )
    recs = B.examples(cfg, "train") + B.examples(cfg, "test")
    assert [r["source"] for r in recs[:3]] == ["mmmu", "docvqa", "pope"] and len(recs) == 12
    assert (tmp_path / "cache" / "standins" / f"mmmu-v{standins.VERSION}" / ".complete").exists()
    quirks = [r for r in standins.mmmu_quirk_rows("Art", "validation")]
    assert "<image 2>, then at <image 1>" in quirks[0]["question"]  # out of order
    assert quirks[1]["question"].count("<image 1>") == 2  # repeated
    assert "<image 2>" not in quirks[2]["question"] and quirks[2]["image_2"] is not None  # unreferenced


def test_unknown_standin_names_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="standin:qwen2_vl"):
        resolve(_cfg(tmp_path), "standin:qwen3")


def test_embedded_benchmark_with_an_empty_split_builds_and_reloads(tmp_path):
    """Regression (issue 15, finding 1): `data.n_val: 0` made build_benchmark save an empty split that datasets
    cannot reload (IndexError on every rerun)."""
    from vskip_core.data.embedded import build_benchmark

    cfg = _cfg(tmp_path, **{"data.n_val": 0})
    dd, path = build_benchmark(cfg)
    assert "val" not in dd and len(dd["train"]) == cfg.data.n_train
    again, path2 = build_benchmark(cfg)  # from the cache
    assert path2 == path and len(again["test"]) == cfg.data.n_test


def test_more_rationales_than_the_split_is_a_load_time_error(tmp_path):
    """Regression (issue 15, finding 2): real files inherited generation.n_examples 2000 for a 180-example split
    and stage 01 failed at index 180."""
    with pytest.raises(ParamsError, match=r"asks for 2000 rationales but the train split .* has 180"):
        load_params("params/colab_qwen2vl_2b.yaml", {"generation.n_examples": 2000})
    cfg = load_params("params/colab_qwen2vl_2b.yaml")
    assert cfg.generation.n_examples == 0 and cfg.split_size("train") == 180


@pytest.mark.parametrize("family", ["qwen2_vl", "mllama"])
def test_attention_picture_of_a_hub_teacher_under_sdpa(tmp_path, family):
    """Notebook 00's attention picture for a hub teacher: its own rationale's anchors, through the hooked capture
    under sdpa (which returns no attention maps), equal to the eager reference (Qwen: the first image's tokens;
    Mllama: the first tile's patches)."""
    import torch
    from PIL import Image

    from vskip_core.method.scoring import anchor_attention_maps, naive_image_attention
    from vskip_core.modeling.loading import load_model

    ex = {
        "id": "pope-1",
        "source": "pope",
        "family": "existence",
        "question": "Is there a dog in the image?",
        "options": [],
        "answer": "yes",
        "answers": ["yes"],
        "image": Image.new("RGB", (96, 72), (200, 40, 40)),
        "images": [Image.new("RGB", (96, 72), (200, 40, 40))],
    }
    text = "The dog is red and small. Answer: yes"
    sdpa = load_model(_cfg(tmp_path, **{"model.attn_implementation": "sdpa"}), f"standin:{family}")
    items = anchor_attention_maps(sdpa, [ex], texts=[text], types=("colour",))
    assert len(items) == 1 and "'red'" in items[0]["title"]
    w = items[0]["weights"]
    h, wd = items[0]["grid"]
    assert w.shape == (h * wd,) and (w >= 0).all() and w.sum() <= 1.0 + 1e-5
    if family == "qwen2_vl":  # eager reference: all layers, heads max, first image's columns
        eager = load_model(_cfg(tmp_path), f"standin:{family}")
        ad, tok = eager.adapter, eager.tokenizer
        enc = ad.encode(ex, tok, eager.processor, target=text)
        batch = ad.collate([enc], tok.pad_token_id, padding_side="right")
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        at = text.index("red")
        j = next(i for i, (s, e) in enumerate(offsets) if s <= at < e)
        ref = naive_image_attention(
            eager.model,
            ad.model_inputs(batch, "cpu"),
            enc["image_positions"],
            torch.tensor([enc["target_start"] + j - 1]),
        )
        assert torch.allclose(torch.from_numpy(w), ref.mean(0).amax(0)[0], atol=1e-5)


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_lora_with_gradient_checkpointing_on_llama_vision(tmp_path, quantization):
    """Regression: with reentrant gradient checkpointing the Mllama student's backward went through the shared
    cross-attention states twice ("Trying to backward through the graph a second time"), so stage 04 failed
    on params/llama32_11b_vision.yaml (QLoRA, gradient_checkpointing: true)."""
    from vskip_core.data.embedded import make_example
    from vskip_core.stages import distillation as distill

    cfg = _cfg(
        tmp_path, **{"distill.gradient_checkpointing": True, "distill.target_modules": ["q_proj", "v_proj"]}
    )
    loaded = distill.load_base(cfg, "standin:mllama", quantization=quantization)
    model = distill.apply_lora(loaded, cfg)
    ad, tok = loaded.adapter, loaded.tokenizer
    exs = [make_example(cfg, "train", i) for i in range(2)]
    items = [ad.encode(e, tok, loaded.processor, target=e["rationale"][:60]) for e in exs]
    batch = ad.collate(items, tok.pad_token_id, "right")
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for b, it in enumerate(items):
        labels[b, : it["target_start"]] = -100
    loss = model(**ad.model_inputs(batch, "cpu"), labels=labels).loss
    loss.backward()
    grads = [p.grad.abs().sum().item() for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and max(grads) > 0
