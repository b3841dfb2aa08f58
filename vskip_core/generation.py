"""Batched generation with the frozen teacher (or any student), and the resumable rationale writer."""

from __future__ import annotations

import time
from typing import Any

import torch

from .models import collate, encode, model_inputs


@torch.no_grad()
def generate(
    model,
    tok,
    proc,
    examples: list[dict[str, Any]],
    max_new_tokens: int = 192,
    batch_size: int = 32,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.95,
    instruction: str = "",
    prefix: str | list[str] = "",
    blank_images: list | None = None,
    progress: bool = False,
    desc: str = "generate",
) -> list[dict[str, Any]]:
    """Generate one response per example (left-padded batches). Returns, per example, the text, the
    generated token ids (without the end token) and the batch's wall time divided by its size."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    prefixes = prefix if isinstance(prefix, list) else [prefix] * len(examples)
    out: list[dict[str, Any]] = []
    eos = tok.convert_tokens_to_ids("<|im_end|>")
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
            )
            for j, ex in enumerate(chunk)
        ]
        batch = collate(items, tok.pad_token_id, padding_side="left")
        t0 = time.perf_counter()
        kw: dict[str, Any] = {"do_sample": do_sample}
        if do_sample:
            kw.update(temperature=temperature, top_p=top_p)
        gen = model.generate(
            **model_inputs(batch, device),
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=eos,
            **kw,
        )
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
