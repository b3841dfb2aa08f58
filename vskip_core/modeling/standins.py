"""Model stand-ins: tiny random-weight checkpoints of the real model classes, saved like hub checkpoints (with
the published generation configs), and `resolve`, which turns any `standin:<name>` into its built folder. What
stand-ins are and how params files name them: `vskip_core.data.standins`."""

from __future__ import annotations

from pathlib import Path

from vskip_core.config import DataConfig
from vskip_core.data.embedded import make_example
from vskip_core.data.standins import (
    MODELS,
    PREFIX,
    SCORERS,
    build_once,
    is_standin,
    mmmu_rows,
    resolve_dataset,
    standin_dir,
)
from vskip_core.modeling.adapters import build_tiny, get_adapter

# ------------------------------------------------------------------------------------------- resolving
GENERATION_CONFIGS = {
    # the sampling fields of the published Qwen2-VL / Qwen2.5-VL Instruct checkpoints
    "qwen": {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.01, "top_p": 0.001, "top_k": 1},
    # meta-llama/Llama-3.2-11B-Vision-Instruct
    "mllama": {"do_sample": True, "temperature": 0.6, "top_p": 0.9},
}


def resolve(cfg, name: str) -> str:
    """The folder of stand-in `name` (a model or a dataset, built on first use), or `name` unchanged if it is
    not a stand-in."""
    if not is_standin(name):
        return name
    path = standin_dir(cfg.path(cfg.runtime.cache_dir), name)  # an unknown name raises, naming the valid ones
    key = name[len(PREFIX) :]
    if key in SCORERS:
        return str(build_once(path, name, build_llmlingua2))
    if key not in MODELS:
        return resolve_dataset(cfg, name)
    return str(build_once(path, name, lambda tmp: build_model(key, tmp)))


def tokenizer_texts() -> list[str]:
    """Text the stand-in tokenizers are trained on: embedded questions and rationales, and the datasets' words."""

    exs = [make_example(DataConfig(), "train", i) for i in range(160)]
    words = [r["question"] + " " + r["options"] for r in mmmu_rows("Art", "validation", 8)]
    words += ["What is the total amount on the invoice? Is there a dining table in the image? yes no"]
    return [e["question"] + " " + e["rationale"] for e in exs] + words * 10


def build_model(family: str, path: Path) -> Path:
    """A tiny random-weight checkpoint of `family`'s real class, saved like a hub checkpoint."""
    from transformers import GenerationConfig

    ad = get_adapter(family)
    model, tok, _ = build_tiny(family, tokenizer_texts(), path=path, seed=0)
    if not tok.chat_template:
        tok.chat_template = ad.chat_template
        tok.save_pretrained(path)
    ids = model.config.text_config
    eos = [ids.eos_token_id] if isinstance(ids.eos_token_id, int) else list(ids.eos_token_id)
    gen = GenerationConfig(
        bos_token_id=ids.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
        **GENERATION_CONFIGS["mllama" if family == "mllama" else "qwen"],
    )
    gen.save_pretrained(path)
    return path


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
