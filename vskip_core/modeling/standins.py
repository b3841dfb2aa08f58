"""Model stand-ins: tiny checkpoints of the real model classes, saved like hub checkpoints (with the published
generation configs), and `resolve`, which turns any `standin:<name>` into its built folder. What stand-ins are
and how params files name them: `vskip_core.data.standins`.

A stand-in starts from random weights, then a short supervised fit (`fit_rationale`) teaches it to answer every
prompt of the pipeline (any stand-in example, with or without the CoT instruction and a ratio sentence) with
one fixed rationale, `RATIONALE`: colour, shape and COCO object words and an answer line, so the metrics that
read a rationale's words have something to read. The image does not change what it writes."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch

from vskip_core.config import DataConfig
from vskip_core.data.embedded import make_example
from vskip_core.data.real import normalize_docvqa, normalize_mmmu, normalize_pope
from vskip_core.data.standins import (
    PREFIX,
    SCORERS,
    build_once,
    docvqa_rows,
    is_standin,
    mmmu_quirk_rows,
    mmmu_rows,
    model_names,
    pope_rows,
    resolve_dataset,
    standin_dir,
)
from vskip_core.modeling.adapters import build_tiny, get_adapter
from vskip_core.modeling.prompts import RATIO_TEMPLATE

RATIONALE = "I see a red square, one blue circle and two dogs by the dining table. Answer: A"
# the hub params files' generation.instruction: the prompts the fit covers (with none, and with ratio sentences)
COT_INSTRUCTION = (
    "Think step by step about the image, then give the final answer on the last line as 'Answer: <answer>'."
)
# AdamW on the whole model but Mllama's gates; a higher lr made Qwen2.5-VL's fit diverge
FIT = {"steps": 60, "batch": 8, "lr": 1e-3}

# ------------------------------------------------------------------------------------------- resolving


def resolve(cfg, name: str) -> str:
    """The folder of stand-in `name` (a model or a dataset, built on first use), or `name` unchanged if it is
    not a stand-in."""
    if not is_standin(name):
        return name
    path = standin_dir(cfg.path(cfg.runtime.cache_dir), name)  # an unknown name raises, naming the valid ones
    key = name[len(PREFIX) :]
    if key in SCORERS:
        return str(build_once(path, name, build_llmlingua2))
    if key not in model_names():
        return resolve_dataset(cfg, name)
    return str(build_once(path, name, lambda tmp: build_model(key, tmp)))


def tokenizer_texts() -> list[str]:
    """Text the stand-in tokenizers are trained on: embedded questions and rationales, and the datasets' words."""

    exs = [make_example(DataConfig(), "train", i) for i in range(160)]
    words = [r["question"] + " " + r["options"] for r in mmmu_rows("Art", "validation", 8)]
    words += ["What is the total amount on the invoice? Is there a dining table in the image? yes no"]
    return [e["question"] + " " + e["rationale"] for e in exs] + words * 10 + [RATIONALE] * 100


def build_model(family: str, path: Path) -> Path:
    """A tiny checkpoint of `family`'s real class that writes `RATIONALE`, saved like a hub checkpoint."""
    from transformers import GenerationConfig

    ad = get_adapter(family)
    model, tok, proc = build_tiny(family, tokenizer_texts(), seed=0)
    if not tok.chat_template:
        tok.chat_template = ad.chat_template
    fit_rationale(model, tok, proc, family)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    proc.save_pretrained(path)
    ids = model.config.text_config
    eos = [ids.eos_token_id] if isinstance(ids.eos_token_id, int) else list(ids.eos_token_id)
    gen = GenerationConfig(
        bos_token_id=ids.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
        **ad.standin_generation,
    )
    gen.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------ the fit
def fit_examples() -> list[dict[str, Any]]:
    """Records of every stand-in source, as the hub loaders normalize them (MMMU with interleaved and repeated
    `<image N>`, DocVQA, POPE), and embedded examples: one to several images, with and without options."""
    mmmu = mmmu_rows("Art", "validation", 8) + mmmu_quirk_rows("Math", "validation")
    docvqa = [{**r, "answers": ["$1.00"]} for r in docvqa_rows("validation", 4)]
    recs = [normalize_mmmu(r) for r in mmmu] + [normalize_docvqa(r) for r in docvqa]
    recs += [normalize_pope(r) for r in pope_rows(2)]
    return recs + [make_example(DataConfig(), "train", i) for i in range(8)]


def fit_prompts() -> list[dict[str, str]]:
    """The prompt shapes the pipeline uses: no instruction, the CoT instruction, a ratio sentence after it
    or before the question."""
    out = [{"prefix": "", "instruction": ""}, {"prefix": "", "instruction": COT_INSTRUCTION}]
    for r in ("0.3", "0.5", "0.7", "0.9", "1.0"):
        ratio = RATIO_TEMPLATE.format(ratio=r)
        out += [
            {"prefix": "", "instruction": f"{COT_INSTRUCTION}\n{ratio}"},
            {"prefix": ratio + "\n", "instruction": COT_INSTRUCTION},
        ]
    return out


def fit_rationale(model, tok, proc, family: str, seed: int = 0) -> float:
    """Teach `model` to write `RATIONALE` (then its end token) after any prompt: `FIT["steps"]` AdamW steps on
    every fit example under every prompt shape, through the family's own `encode` / `collate`. Seeded; the
    Mllama cross-attention gates are not trained. Returns the seconds it took."""
    t0 = time.perf_counter()
    ad = get_adapter(family)
    rng = random.Random(seed)
    prompts = fit_prompts()
    items = [
        ad.encode(ex, tok, proc, target=RATIONALE, **prompts[rng.randrange(len(prompts))])
        for ex in fit_examples()
        for _ in range(3)
    ]
    rng.shuffle(items)
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=FIT["lr"], weight_decay=0)
    model.train()
    for step in range(FIT["steps"]):
        start = step * FIT["batch"] % len(items)
        chunk = (items + items)[start : start + FIT["batch"]]
        batch = ad.collate(chunk, tok.pad_token_id, padding_side="right")
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        for j, it in enumerate(chunk):
            labels[j, : it["target_start"]] = -100
        loss = model(**ad.model_inputs(batch, "cpu"), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return time.perf_counter() - t0


def build_llmlingua2(path: Path) -> Path:
    """LLMLingua-2's format in miniature: an XLMRobertaForTokenClassification (2 labels, 1 = keep; seeded random
    weights) and an XLM-R fast tokenizer (Unigram, Metaspace "▁", `<s> $A </s>`) trained on `tokenizer_texts`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaConfig, XLMRobertaForTokenClassification, XLMRobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0-3 as in XLM-R
    raw = Tokenizer(models.Unigram())
    raw.normalizer = normalizers.Replace("\n", " ")  # XLM-R's normalizer turns newlines into spaces too
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=1000, special_tokens=specials, unk_token="<unk>")
    raw.train_from_iterator(tokenizer_texts(), trainer)
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", raw.token_to_id("<s>")), ("</s>", raw.token_to_id("</s>"))],
    )
    tok = XLMRobertaTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", cls_token="<s>", sep_token="</s>",
    )  # fmt: skip
    conf = XLMRobertaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=514, type_vocab_size=1, num_labels=2, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    XLMRobertaForTokenClassification(conf).save_pretrained(path)
    tok.save_pretrained(path)
    return path
