"""Stand-ins for the model hub: tiny random-weight checkpoints of the real model classes and small local copies of
the hub benchmarks in their exact schemas, so the real-model path (params/colab_*.yaml, qwen*_7b.yaml,
llama32_*.yaml) runs end to end on a CPU with no hub access.

A params file names a stand-in where it would name a hub id, and it builds itself on first use (cached under
`<runtime.cache_dir>/standins/`), as the embedded teacher does:

    model.teacher: standin:qwen2_vl      # also standin:qwen2_5_vl, standin:mllama (distill.student likewise)
    data.mmmu_id: standin:mmmu           # also standin:docvqa, standin:pope

Checkpoints are saved like hub ones: `save_pretrained` model, tokenizer with the family's chat template and
special tokens, image-processor config, and a `generation_config.json` carrying the published checkpoints'
sampling fields (Qwen-VL: repetition_penalty 1.05, top_k 1, top_p 0.001; Llama-3.2-Vision: temperature 0.6,
top_p 0.9), so code that lets a checkpoint's generation config leak into greedy decoding is caught on CPU.

Datasets are written by `datasets.Dataset.to_parquet` (image bytes and features embedded, as on the hub):
- MMMU/MMMU: one config per subject, `<Subject>/<split>-00000-of-00001.parquet`; columns id, question, options
  (a *string* holding a Python list), explanation, image_1 .. image_7 (Image, mostly None), img_type, answer,
  topic_difficulty, question_type, subfield. The test split's answers are hidden ("?"). Rows include
  out-of-order, repeated and unreferenced `<image N>` references.
- DocVQA: config DocVQA, `DocVQA/<split>-00000-of-00001.parquet`; questionId (string), question, question_types
  (list of string), image, docId (int64), ucsf_document_id, ucsf_document_page_no, answers (list of string;
  None on the test split), data_split.
- POPE: default config, `data/test-00000-of-00001.parquet`; id, question_id, question, answer (yes/no),
  image_source, image, category (adversarial / popular / random), each category with its own positives.
"""

from __future__ import annotations

from pathlib import Path

from vskip_core.config import DataConfig
from vskip_core.data.embedded import make_example
from vskip_core.data.standins import (
    MODELS,
    PREFIX,
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
    if name[len(PREFIX) :] not in MODELS:
        return resolve_dataset(cfg, name)
    return str(build_once(path, name, lambda tmp: build_model(name[len(PREFIX) :], tmp)))


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
