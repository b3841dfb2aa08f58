"""Model-family adapters on tiny random-weight models of each class (Qwen2-VL, Qwen2.5-VL, Mllama), and the
--plan report. No GPU, no hub: tokenizers are trained here, models are built from small configs."""

import re

import pytest
import torch
from PIL import Image

from vskip_core.config import load_params
from vskip_core.data.embedded import make_example
from vskip_core.modeling import adapters as A

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "mllama")


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
    for fam in FAMILIES:
        d = tmp_path_factory.mktemp(fam)
        model, tok, proc = A.build_tiny(fam, texts, path=d)
        out[fam] = (model, tok, proc, d)
    return out


def _examples(cfg, n=3):
    return [make_example(cfg, "test", i) for i in range(n)]


def _two_image_example(cfg):
    ex = make_example(cfg, "test", 5)
    wide = Image.new("RGB", (112, 56), (200, 30, 30))
    return dict(
        ex, question="Compare <image 2> with <image 1>. Which has more objects?", images=[ex["image"], wide]
    )


# ------------------------------------------------------------------------------------ prompts and encoding
def test_interleave_orders_images_by_placeholder(cfg):
    ex = _two_image_example(cfg)
    parts, images = A.interleave(ex, instruction="Think.")
    kinds = [p["type"] for p in parts]
    assert kinds == ["text", "image", "text", "image", "text"]
    assert images[0] is ex["images"][1] and images[1] is ex["images"][0]  # <image 2> comes first
    assert parts[-1]["text"].endswith("Think.")
    plain = make_example(cfg, "test", 0)  # no placeholders: the image first, then the text
    parts, images = A.interleave(plain)
    assert [p["type"] for p in parts] == ["image", "text"] and images == [plain["image"]]
    with pytest.raises(ValueError, match="<image 3>"):
        A.interleave(dict(ex, question="Look at <image 3>."))


def test_interleave_inserts_each_referenced_image_once(cfg, tiny):
    """`<image 2> ... <image 1> ... <image 2>`: image 2 goes in at its first reference only (lmms-eval feeds
    each referenced image once; data.max_images counts distinct references); the later reference stays as
    words, and the Qwen encoding carries exactly two images' worth of image-pad tokens."""
    ex = dict(
        _two_image_example(cfg),
        question="Is <image 2> brighter than <image 1>? Look again at <image 2> before answering.",
    )
    parts, images = A.interleave(ex)
    assert [p["type"] for p in parts] == ["text", "image", "text", "image", "text"]
    assert len(images) == 2 and images[0] is ex["images"][1] and images[1] is ex["images"][0]
    assert parts[2]["text"] == " brighter than "
    assert parts[4]["text"].startswith("? Look again at image 2 before answering.")
    assert "<image" not in "".join(p.get("text", "") for p in parts)
    _, tok, proc, _ = tiny["qwen2_vl"]
    enc = A.get_adapter("qwen2_vl").encode(ex, tok, proc)
    merge = proc.merge_size**2
    assert enc["image_grid_thw"].shape[0] == 2
    want = sum(int(g.prod()) // merge for g in enc["image_grid_thw"])
    pad = tok.convert_tokens_to_ids(A.get_adapter("qwen2_vl").image_token)
    assert int((enc["input_ids"] == pad).sum()) == want == int(enc["mm_token_type_ids"].sum())
    ref_grids = [proc(images=[im], return_tensors="pt")["image_grid_thw"][0] for im in ex["images"][::-1]]
    assert [g.tolist() for g in enc["image_grid_thw"]] == [g.tolist() for g in ref_grids]


def _real_qwen2vl_processor(proc, tok):
    """Qwen2VLProcessor minus its video-processor type check (torchvision is absent here)."""
    import transformers.processing_utils as pu
    from transformers import Qwen2VLProcessor

    orig = pu.ProcessorMixin.check_argument_for_proper_class

    def check(self, name, arg):
        return None if name == "video_processor" and arg is None else orig(self, name, arg)

    pu.ProcessorMixin.check_argument_for_proper_class = check
    try:
        return Qwen2VLProcessor(
            image_processor=proc, tokenizer=tok, chat_template=tok.chat_template, video_processor=None
        )
    finally:
        pu.ProcessorMixin.check_argument_for_proper_class = orig


def test_qwen_multi_image_encode_equals_real_processor(cfg, tiny):
    _, tok, proc, _ = tiny["qwen2_vl"]
    ad = A.get_adapter("qwen2_vl")
    real = _real_qwen2vl_processor(proc, tok)
    for ex in (_two_image_example(cfg), make_example(cfg, "test", 1)):
        _, images = ad.messages(ex)
        ref = real(images=images, text=[ad.prompt_text(ex, tok)], return_tensors="pt")
        mine = ad.encode(ex, tok, proc)
        for k in ("input_ids", "mm_token_type_ids"):
            assert torch.equal(ref[k][0], mine[k]), k
        assert torch.equal(ref["pixel_values"], mine["pixel_values"])
        assert torch.equal(ref["image_grid_thw"], mine["image_grid_thw"])
        assert len(mine["image_positions"]) == int(mine["mm_token_type_ids"].sum())


def test_mllama_encode_equals_real_processor(cfg, tiny):
    from transformers import MllamaProcessor

    _, tok, proc, _ = tiny["mllama"]
    ad = A.get_adapter("mllama")
    real = MllamaProcessor(image_processor=proc, tokenizer=tok, chat_template=tok.chat_template)
    for ex in (_two_image_example(cfg), make_example(cfg, "test", 1)):
        _, images = ad.messages(ex)
        ref = real(images=[images], text=[ad.prompt_text(ex, tok)], return_tensors="pt")
        mine = ad.encode(ex, tok, proc, target="It is red. Answer: red")
        n = mine["target_start"]
        assert torch.equal(ref["input_ids"][0], mine["input_ids"][:n])
        assert torch.equal(ref["cross_attention_mask"][0], mine["cross_attention_mask"][:n])
        for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
            assert torch.equal(ref[k], mine[k]), k
        assert mine["input_ids"][-1] == tok.convert_tokens_to_ids("<|eot_id|>")
        assert mine["cross_attention_mask"][n:].all(-1).any(-1).all()  # the rationale sees the last image


def test_models_encode_routes_by_processor(cfg, tiny):
    from vskip_core.modeling.loading import collate, encode, model_inputs, prompt_text

    for fam in FAMILIES:
        model, tok, proc, _ = tiny[fam]
        ex = make_example(cfg, "test", 2)
        enc = encode(ex, tok, proc, target="Answer: yes")
        assert torch.equal(
            enc["input_ids"], A.get_adapter(fam).encode(ex, tok, proc, target="Answer: yes")["input_ids"]
        )
        assert A.get_adapter(fam).image_token in prompt_text(ex, tok)
        batch = collate([enc], tok.pad_token_id)
        with torch.no_grad():
            assert model(**model_inputs(batch, "cpu")).logits.shape[1] == len(enc["input_ids"])


# ------------------------------------------------------------------------------------ forward and generation
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_does_not_change_logits(cfg, tiny, family):
    """Batched, left-padded rows give the logits each row gets alone (positions come from the mask)."""
    model, tok, proc, _ = tiny[family]
    ad = A.get_adapter(family)
    items = [ad.encode(e, tok, proc) for e in _examples(cfg, 3)]
    assert len({len(it["input_ids"]) for it in items}) > 1  # padding really happens
    batch = ad.collate(items, tok.pad_token_id, "left")
    with torch.no_grad():
        together = model(**ad.model_inputs(batch, "cpu")).logits[:, -1]
        alone = [
            model(**ad.model_inputs(ad.collate([it], tok.pad_token_id), "cpu")).logits[0, -1] for it in items
        ]
    torch.testing.assert_close(together, torch.stack(alone), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_and_image_matters(cfg, tiny, family):
    model, tok, proc, _ = tiny[family]
    ad = A.get_adapter(family)
    exs = _examples(cfg, 2)
    batch = ad.collate([ad.encode(e, tok, proc) for e in exs], tok.pad_token_id, "left")
    with torch.no_grad():
        out = model.generate(
            **ad.model_inputs(batch, "cpu"),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=ad.end_token_id(tok),
        )
    assert out.shape[0] == 2 and 1 <= out.shape[1] - batch["input_ids"].shape[1] <= 4
    ex = exs[0]
    blank = Image.new("RGB", ex["image"].size, (255, 255, 255))
    with torch.no_grad():
        a = model(**ad.model_inputs(ad.collate([ad.encode(ex, tok, proc)], tok.pad_token_id), "cpu")).logits
        b = model(
            **ad.model_inputs(ad.collate([ad.encode(ex, tok, proc, image=blank)], tok.pad_token_id), "cpu")
        ).logits
    assert (a[0, -1] - b[0, -1]).abs().max() > 1e-4  # the image reaches the output


# ------------------------------------------------------------------------------------ where the image lives
def test_image_keys_qwen_are_the_image_pad_columns(cfg, tiny):
    model, tok, proc, _ = tiny["qwen2_vl"]
    ad = A.get_adapter("qwen2_vl")
    items = [ad.encode(e, tok, proc, target=e["rationale"][:40]) for e in _examples(cfg, 2)]
    batch = ad.collate(items, tok.pad_token_id, "left")
    keys = ad.image_keys(model, batch)
    assert keys.kind == "self" and keys.layers == list(range(model.config.text_config.num_hidden_layers))
    for b, it in enumerate(items):
        cols = torch.nonzero(keys.key_mask[b]).flatten()
        assert torch.equal(cols, it["image_positions"] + batch["offsets"][b])
        assert keys.query_mask[b, -1] and not keys.query_mask[b, : cols[0] + 1].any()


def test_image_keys_mllama_cross_attention(cfg, tiny):
    """Eager cross-attention maps: rows before the image lose their mask (the model zeroes a fully masked row's
    bias), so they spread mass over every column, padding tiles included: query_mask drops them. Rows after the
    image give padding tiles zero mass; key_mask excludes each tile's CLS."""
    model, tok, proc, _ = tiny["mllama"]
    ad = A.get_adapter("mllama")
    ex = make_example(cfg, "test", 0)
    wide = Image.new("RGB", (112, 56), (30, 30, 200))  # 2 of 4 tiles used
    enc = ad.encode(ex, tok, proc, target="The square is blue. Answer: blue", image=wide)
    assert enc["num_tiles"] == [2]
    batch = ad.collate([enc], tok.pad_token_id, "right")
    keys = ad.image_keys(model, batch)
    P = keys.tokens_per_tile
    assert keys.kind == "cross" and keys.layers == [1, 3] and P == (56 // 14) ** 2 + 1
    assert keys.key_mask.shape == (1, 4 * P) and int(keys.key_mask.sum()) == 2 * (P - 1)
    assert not keys.key_mask[0, 0] and not keys.key_mask[0, P]  # CLS of tiles 0 and 1
    with torch.no_grad():
        att = model(**ad.model_inputs(batch, "cpu"), output_attentions=True).attentions
    first_image = int(enc["image_token_positions"][0])
    for layer in keys.layers:
        a = att[layer][0].float()  # (heads, L, K)
        assert a.shape[-1] == 4 * P
        before = a[:, :first_image]
        assert (before[..., 2 * P :].sum(-1) > 0.05).all()  # meaningless mass on the padding tiles
        assert not keys.query_mask[0, :first_image].any() and keys.query_mask[0, first_image:].all()
        seen = a[:, keys.query_mask[0]]
        torch.testing.assert_close(seen.sum(-1), torch.ones_like(seen.sum(-1)))
        assert seen[..., 2 * P :].abs().max() == 0  # padding tiles
        mass = seen[..., keys.key_mask[0]].sum(-1)
        assert (mass > 0).all() and (mass < 1).all()  # 1 - CLS mass: a real signal
    assert ad.attention_module(model, 3) is model.model.language_model.layers[3].cross_attn
    with pytest.raises(ValueError, match="not a cross-attention layer"):
        ad.attention_module(model, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_hooked_scoring_equals_naive_attention_on_adapter_keys(cfg, tiny, family):
    """scoring.teacher_forced_scores (hooked capture) on adapter-built, left-padded batches with images of
    different sizes equals the mass read from output_attentions on the adapter's image keys and query rows."""
    from vskip_core.method.scoring import teacher_forced_scores

    model, tok, proc, _ = tiny[family]
    ad = A.get_adapter(family)
    wide = Image.new("RGB", (112, 56), (9, 9, 200))
    exs = _examples(cfg, 3)
    items = [
        ad.encode(e, tok, proc, target=e["rationale"][:50], image=wide if i == 1 else None)
        for i, e in enumerate(exs)
    ]
    batch = ad.collate(items, tok.pad_token_id, "left")
    inputs = ad.model_inputs(batch, "cpu")
    spans = [
        (int(off) + it["target_start"], len(it["input_ids"]) - it["target_start"] - 1)
        for it, off in zip(items, batch["offsets"])
    ]
    layers = ad.key_layers(model, cfg)
    keys = ad.image_keys(model, batch)
    with torch.no_grad():
        hooked = teacher_forced_scores(model, inputs, spans, layers).mass
        att = model(**inputs, output_attentions=True).attentions
    for layer in layers:
        for b, (start, n) in enumerate(spans):
            rows = torch.arange(start - 1, start - 1 + n)  # the row that predicts each rationale token
            assert keys.query_mask[b, rows].all()
            naive = att[layer][b][:, rows][..., keys.key_mask[b]].sum(-1)
            torch.testing.assert_close(hooked[layer][b, :, :n].float(), naive.float(), atol=1e-5, rtol=1e-4)


def test_key_layers_defaults_and_errors(cfg, tiny):
    qwen, mll = tiny["qwen2_vl"][0], tiny["mllama"][0]
    assert A.get_adapter("qwen2_vl").key_layers(qwen, cfg) == [1, 2]  # centre depths 0.375, 0.625 of 4
    assert A.get_adapter("mllama").key_layers(mll, cfg) == [1]  # the cross layer in the band
    bad = load_params("params/smoke.yaml", {"scoring.key_layers": [2]})
    with pytest.raises(ValueError, match=r"reached in layers \[1, 3\]"):
        A.get_adapter("mllama").key_layers(mll, bad)
    # real depths (documented in vskip_core.method.scoring): 28-layer Qwen2-VL-7B, Llama-3.2-11B's cross layers
    assert A.layers_in_band(list(range(28)), 28, [0.25, 0.75]) == list(range(7, 21))
    assert A.layers_in_band([3, 8, 13, 18, 23, 28, 33, 38], 40, [0.25, 0.75]) == [13, 18, 23, 28]
    assert A.layers_in_band([3, 8, 13], 40, [0.5, 0.5]) == [13]  # nothing inside: the nearest


def test_family_detection(tiny):
    for fam in FAMILIES:
        d = tiny[fam][3]
        assert A.detect_family(str(d)) == fam
        assert A.adapter_for(tiny[fam][0]).family == fam
    with pytest.raises(ValueError, match="model.family"):
        A.detect_family(str(tiny["mllama"][3]), "qwen2_vl")
    assert A.adapter_for_tokenizer(tiny["mllama"][1]).family == "mllama"


def test_plan_reads_a_local_config(tiny):
    from vskip_core.infra.plan import make_plan

    d = str(tiny["mllama"][3])
    p = make_plan(load_params("params/smoke.yaml", {"model.teacher": d, "distill.student": d}), gpu="T4")
    assert p.teacher.origin.startswith("local config") and p.teacher.family == "mllama"
    assert p.teacher.params == sum(x.numel() for x in tiny["mllama"][0].parameters())
    assert p.teacher.cross_layers == [1, 3] and p.teacher.tokens_per_tile == 17


def test_load_model_through_adapters(cfg, tiny):
    from vskip_core.modeling.loading import load_model

    for fam in ("qwen2_5_vl", "mllama"):
        loaded = load_model(cfg, str(tiny[fam][3]))
        assert loaded.family == fam and loaded.adapter.family == fam
        assert type(loaded.model).__name__ == A.get_adapter(fam).model_class
        assert loaded.model.config.text_config._attn_implementation == "eager"
        assert type(loaded.processor).__name__.endswith("ImageProcessorPil")
        ex = make_example(cfg, "test", 0)
        ref = tiny[fam][0]
        enc = loaded.adapter.collate([loaded.adapter.encode(ex, loaded.tokenizer, loaded.processor)], 0)
        with torch.no_grad():
            torch.testing.assert_close(
                loaded.model(**loaded.adapter.model_inputs(enc, "cpu")).logits,
                ref(**loaded.adapter.model_inputs(enc, "cpu")).logits,
            )
    half = load_model(load_params("params/smoke.yaml", {"model.dtype": "bfloat16"}), str(tiny["mllama"][3]))
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------ LoRA and 4-bit
def _train_batch(cfg, ad, tok, proc):
    items = [ad.encode(e, tok, proc, target=e["rationale"][:60]) for e in _examples(cfg, 2)]
    batch = ad.collate(items, tok.pad_token_id, "right")
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for b, it in enumerate(items):
        labels[b, : it["target_start"]] = -100
    return {**ad.model_inputs(batch, "cpu"), "labels": labels}


def _three_steps(model, batch) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_language_model_only(cfg, texts, family):
    from peft import LoraConfig, get_peft_model

    model, tok, proc = A.build_tiny(family, texts, seed=1)
    ad = A.get_adapter(family)
    names = ["all-linear"] if family == "qwen2_5_vl" else ["q_proj", "v_proj"]
    regex = ad.lora_target_modules(model, names)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=regex))
    wrapped = [
        n
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict)
    ]
    assert wrapped and all(".language_model.layers." in n for n in wrapped)
    assert not any(re.search(r"visual|vision_model|multi_modal_projector|lm_head", n) for n in wrapped)
    if family == "mllama":
        assert any(".cross_attn." in n for n in wrapped) and any(".self_attn." in n for n in wrapped)
    if family == "qwen2_5_vl":  # its vision MLP has gate/up/down_proj too; none of them is wrapped
        assert any(n.endswith("mlp.gate_proj") for n in wrapped)
        assert any(n.endswith("mlp.gate_proj") and "visual" in n for n, _ in model.named_modules())
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    peft_model.train()
    losses = _three_steps(peft_model, _train_batch(cfg, ad, tok, proc))
    assert losses[-1] < losses[0] - 1e-3
    with pytest.raises(ValueError, match="valid names"):
        ad.lora_target_modules(model, ["qkv"])  # the Qwen vision tower's fused projection is not a target


@pytest.mark.parametrize("family", ["qwen2_vl", "mllama"])
def test_qlora_4bit_on_cpu(cfg, tiny, family):
    """4-bit (nf4) load of a saved tiny model through models.load_model, LoRA, 3 steps: the loss moves.
    model.train() comes before any forward: an eval no-grad forward repacks the 4-bit weights for CPU inference
    and LoRA then gets exactly zero gradients (bitsandbytes 0.50 on CPU)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from vskip_core.modeling.loading import load_model

    _, tok, proc, d = tiny[family]
    loaded = load_model(cfg, str(d), quantization="nf4")
    model = loaded.model
    q4 = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert q4 and all(".language_model." in n for n in q4)  # vision tower, projector, lm_head stay in fp32
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    model.train()
    ad = loaded.adapter
    peft_model = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, target_modules=ad.lora_target_modules(model, ["q_proj", "v_proj"])),
    )
    peft_model.train()
    batch = _train_batch(cfg, ad, loaded.tokenizer, loaded.processor)
    loss = peft_model(**batch).loss
    loss.backward()
    grads = [p.grad.abs().sum().item() for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and max(grads) > 0  # the zero-gradient trap did not fire
    peft_model.zero_grad()
    losses = _three_steps(peft_model, batch)
    assert losses[-1] < losses[0] - 1e-3
    peft_model.eval()
    enc = ad.collate(
        [ad.encode(make_example(cfg, "test", 0), loaded.tokenizer, loaded.processor)], tok.pad_token_id
    )
    with torch.no_grad():
        out = peft_model.generate(
            **ad.model_inputs(enc, "cpu"), max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id
        )
    assert out.shape[1] > enc["input_ids"].shape[1]


# ------------------------------------------------------------------------------------ the --plan report
PARAMS = ("default", "smoke", "colab_qwen2vl_2b", "qwen2vl_7b", "qwen25vl_7b", "llama32_11b_vision")


def test_known_configs_give_published_sizes():
    from vskip_core.infra.plan import model_spec

    cfg = load_params("params/smoke.yaml")
    published = {  # total parameters (billions) on the model cards
        "Qwen/Qwen2-VL-2B-Instruct": 2.21,
        "Qwen/Qwen2-VL-7B-Instruct": 8.29,
        "Qwen/Qwen2.5-VL-3B-Instruct": 3.75,
        "Qwen/Qwen2.5-VL-7B-Instruct": 8.29,
        "meta-llama/Llama-3.2-11B-Vision-Instruct": 10.67,
    }
    for name, billions in published.items():
        spec = model_spec(name, cfg)
        assert abs(spec.params / 1e9 - billions) < 0.01, name
        assert 0.6e9 < spec.vision_params < 0.95e9
    assert model_spec("meta-llama/Llama-3.2-11B-Vision-Instruct", cfg).tokens_per_tile == 1601


@pytest.mark.parametrize("name", PARAMS)
def test_plan_every_params_file(name, capsys):
    from vskip_core import pipeline

    assert pipeline.main(["--params", f"params/{name}.yaml", "--plan"]) == 0
    out = capsys.readouterr().out
    for stage in (
        "00_embedded_teacher",
        "01_rationale_generation",
        "02_dual_scoring",
        "04_qlora_distillation",
    ):
        assert stage in out
    assert "fits" in out and "DOES NOT FIT" not in out  # each file fits the device it is sized for


def test_plan_numbers_and_check_fits():
    from vskip_core.infra.plan import check_fits, make_plan

    colab = load_params("params/colab_qwen2vl_2b.yaml")
    p = make_plan(colab, gpu="T4")
    assert p.fits and p.device.name == "T4"
    by = {s.stage: s for s in p.stages}
    # stage 00 loads (downloads) the teacher for its sanity evaluation, after the three datasets
    teacher_gb = 2.21e9 * 2 / 1024**3
    assert by["00_embedded_teacher"].download_gb == pytest.approx(0.35 + 2.50 + 0.26 + teacher_gb, rel=0.01)
    assert by["01_rationale_generation"].download_gb == 0 and by["00_embedded_teacher"].peak_gb > 2
    # 4-bit students need less memory than the same student in fp16
    fp16 = make_plan(load_params("params/colab_qwen2vl_2b.yaml", {"distill.quantization": "none"}), gpu="T4")
    assert {s.stage: s for s in fp16.stages}["04_qlora_distillation"].peak_gb > by[
        "04_qlora_distillation"
    ].peak_gb
    big = load_params("params/qwen2vl_7b.yaml")
    with pytest.warns(UserWarning, match="needs ~"):
        res = check_fits(big, gpu="T4", verbose=False)
    assert not res["fits"] and any("quantization" in w for w in res["warnings"])
    assert check_fits(load_params("params/smoke.yaml"), gpu="cpu", verbose=False)["fits"]


def test_plan_colab_file_leaves_a_margin_on_a_t4():
    """The Colab file's every stage leaves >= 2 GiB of a T4's 15 (QLoRA at batch 2 planned 13.5 GiB: too close
    for allocator fragmentation and Colab's own use); the effective batch stays 16."""
    from vskip_core.infra.plan import make_plan

    colab = load_params("params/colab_qwen2vl_2b.yaml")
    p = make_plan(colab, gpu="T4")
    assert p.device.name == "T4"
    worst = max(p.stages, key=lambda s: s.peak_gb)
    assert p.device.memory_gb - worst.peak_gb >= 2.0, f"{worst.stage} peaks at {worst.peak_gb:.1f} GiB"
    assert colab.distill.batch_size * colab.distill.grad_accum == 16


def test_plan_bad_input(capsys):
    from vskip_core import pipeline

    assert (
        pipeline.main(["--params", "params/smoke.yaml", "--plan", "--set", "model.teacher=nobody/unknown-vl"])
        == 2
    )
    assert "cannot size model" in capsys.readouterr().err
    assert pipeline.main(["--params", "params/smoke.yaml", "--plan", "--gpu", "TPU"]) == 2
    assert "unknown GPU" in capsys.readouterr().err
