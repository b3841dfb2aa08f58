"""Decoding: one explicit decoding config for every decode in the package, and `generate` (left-padded batches,
each family's inputs through its adapter)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import torch

from vskip_core.modeling.adapters import adapter_for_tokenizer
from vskip_core.modeling.loading import collate, encode, model_inputs
from vskip_core.runtime import progress as tqdm


# ------------------------------------------------------------------------------------------ decoding config
def decoding_config(max_new_tokens: int, repetition_penalty: float = 1.0) -> dict[str, Any]:
    """The one decoding config every decode in the package runs under, as a plain dict (runs record it):
    greedy, with the repetition penalty of `generation.repetition_penalty`. Handed to transformers
    as an explicit GenerationConfig that also stands in for the model's own during the call, so a checkpoint's
    generation_config.json (the published Qwen-VL ones carry repetition_penalty 1.05, top_k 1, top_p 0.001,
    temperature 0.01, do_sample) cannot change it; the pruned decoder (visual_tokens) applies the same."""
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    out: dict[str, Any] = {
        "max_new_tokens": int(max_new_tokens),
        "do_sample": False,
        "num_beams": 1,
        "repetition_penalty": float(repetition_penalty),
    }
    return out


def params_decoding_config(cfg, max_new_tokens: int | None = None) -> dict[str, Any]:
    """`decoding_config` from `cfg.generation` (what stages 00/01/05/06/07 decode with)."""
    g = cfg.generation
    n = g.max_new_tokens if max_new_tokens is None else max_new_tokens
    return decoding_config(n, repetition_penalty=g.repetition_penalty)


def hf_generation_config(decoding: dict[str, Any], eos_token_id: int, pad_token_id: int):
    """`decoding` as a transformers GenerationConfig (use it under `_only_this_generation_config`)."""
    from transformers import GenerationConfig

    return GenerationConfig(**decoding, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


@contextmanager
def _only_this_generation_config(model, gc):
    """transformers fills every field a passed config leaves unset from `model.generation_config` (the
    checkpoint's): for the call, that is `gc` itself (a peft wrapper reads its base model's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = base.generation_config
    base.generation_config = gc
    try:
        yield
    finally:
        base.generation_config = saved


@torch.no_grad()
def generate(
    model,
    tok,
    proc,
    examples: list[dict[str, Any]],
    max_new_tokens: int = 192,
    batch_size: int = 32,
    instruction: str = "",
    prefix: str | list[str] = "",
    blank_images: list | None = None,
    progress: bool = False,
    desc: str = "generate",
    assistant_prefill: str = "",
    repetition_penalty: float = 1.0,
) -> list[dict[str, Any]]:
    """Generate one response per example (left-padded batches). Returns, per example, the text, the
    generated token ids (without the end token) and the batch's wall time divided by its size. Decodes under
    `decoding_config(...)` of these arguments only (never the checkpoint's generation_config.json)."""

    device = next(model.parameters()).device
    prefixes = prefix if isinstance(prefix, list) else [prefix] * len(examples)
    out: list[dict[str, Any]] = []

    eos = adapter_for_tokenizer(tok).end_token_id(tok)  # <|im_end|> (Qwen) or <|eot_id|> (Llama)
    dec = decoding_config(max_new_tokens, repetition_penalty)
    gc = hf_generation_config(dec, eos, tok.pad_token_id)
    bar = tqdm(total=len(examples), desc=desc, disable=not progress, leave=False)
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        items = [
            encode(
                ex,
                tok,
                proc,
                instruction=instruction,
                prefix=prefixes[s + j],
                image=None if blank_images is None else blank_images[s + j],
                assistant_prefill=assistant_prefill,  # e.g. "Answer:" = no rationale
            )
            for j, ex in enumerate(chunk)
        ]
        batch = collate(items, tok.pad_token_id, padding_side="left")
        t0 = time.perf_counter()
        with _only_this_generation_config(model, gc):
            gen = model.generate(**model_inputs(batch, device), generation_config=gc)
        dt = (time.perf_counter() - t0) / len(chunk)
        new = gen[:, batch["input_ids"].shape[1] :].cpu()
        for row in new:
            ids = row.tolist()
            if eos in ids:
                ids = ids[: ids.index(eos)]
            ids = [i for i in ids if i != tok.pad_token_id]
            out.append({"text": tok.decode(ids, skip_special_tokens=True), "token_ids": ids, "time_s": dt})
        bar.update(len(chunk))
    bar.close()
    return out
