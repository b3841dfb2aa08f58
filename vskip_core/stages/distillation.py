"""Distillation: LoRA / QLoRA students that write compressed rationales at a requested ratio.

The pruning policy moves into the weights (TokenSkip-style): each training example carries a target ratio in
its prompt and, as target, the teacher's rationale compressed to that ratio by one gate method, followed by
the answer line. At inference the student is asked for a ratio and writes a short rationale directly, with
no scoring at run time.

**Prompt format** (`ratio_prompt`): the sentence `Keep <ratio> of the reasoning.` ends the user turn, after
the question, its options and `generation.instruction` (`distill.ratio_position: question_end`, TokenSkip's
place), starts it (`turn_start`), or is the first line of the assistant turn (`answer_start`, a prefill the
student reads and never writes); the ratio is written with up to two decimals (`1.0`, `0.9`, `0.33`); 1.0
asks for the full rationale. A plain sentence uses only tokens every chat template already has. Evaluation and
visual-token pruning import `ratio_prompt`, so every stage writes the same prompt:

    generate(model, tok, proc, examples, **ratio_prompt(cfg, 0.5))

**Data** (`build_datasets`): from the teacher's rationales (those stage 01 kept: `generation.keep`), one
`datasets.Dataset` per student plus the control `full` (ratio always 1.0): per (method, ratio), named
`method@ratio` (`student_name`), with `distill.student_per_ratio`; else per method, each example at the
ratio drawn for it (`draw_ratios`: balanced per family, seeded by `runtime.seed`; `ratios_per_example` > 1
adds the next ratios too). Every method gets the same examples and draws, so the only difference between
students is the compression method. `students_at(adapters, r)` picks the student that answers at `r`. The compression is a callable
`compress(row, method, ratio) -> str`; notebook 04 passes `GateCompressor` (vskip_core.method.gating, per-example
budgets). Target = compressed rationale + the original answer line.

**Training** (`train_students`): Hugging Face `Trainer` + peft LoRA on the student's language model
(default student: the embedded teacher's weights); loss on target tokens only (prompt and image masked);
the same number of optimizer steps for every student; checkpoints every `save_steps`, and a killed run
resumes from the last one (bit-identical to an uninterrupted run on CPU, tested). `distill.quantization: nf4`
loads the base in 4-bit through bitsandbytes (QLoRA). Several GPUs, from the datasets notebook 04 saved:

    accelerate launch -m vskip_core.stages.distillation --params params/default.yaml --run default [--methods vskip,full]

**Embedded defaults**: one student per (method, ratio) (`distill.student_per_ratio`), each trained on every
kept rationale at its ratio: the 4.8 M student does not learn to condition on a ratio sentence when one
student sees them all (it writes ~0.84 of the teacher's length at every request), and one student per ratio
follows it. r 32 on every linear layer of the language model, alpha 64, no dropout, lr 5e-3, batch 8, 160
steps per student, ratios 0.9 / 0.7 / 0.5 / 0.3 (1.0 is the `full` control's), two students side by side on
CPU (`distill.workers`), sdpa attention while training. Hub params keep one ratio-conditioned student per
method (TokenSkip's mix with 1.0) and the paper's attention-only LoRA. The measurements behind these values:
docs/RESULTS.md ("Issue 33" and "Issue 18: the distillation recipe").

**QLoRA on a T4 (16 GB) for Qwen2-VL-2B** (`params/colab_qwen2vl_2b.yaml`: nf4, r 8 on q/k/v/o, batch 1 x
accumulation 16, gradient checkpointing, <= 640 visual tokens per image, <= 2 images, 256 new tokens).
Parameters (published config): 2.21 B = 1.31 B in the 28 decoder layers' linear weights (4-bit: 0.53 byte
each with double-quantized constants, 0.69 GB) + 0.67 B vision tower and merger + 0.23 B tied embedding,
kept out of 4-bit and upcast to fp32 by `prepare_model_for_kbit_training` (3.6 GB): 4.3 GB of weights.
LoRA: 28 layers x 8 x (3072 + 1792 + 1792 + 3072) = 2.2 M parameters x 16 bytes (fp32 weight,
gradient, two AdamW moments) = 0.03 GB. Sequences: ~715 prompt tokens on average, 1,506 + 256 = ~1,760 at
the peak (an MMMU question with two images at the cap). At batch 1 x 1,760 tokens: checkpointed layer
inputs 28 x 1,760 x 1,536 x 2 bytes = 0.15 GB, one recomputed layer (sdpa) ~0.15 GB, the logits path over a
151,936-token vocabulary (fp16 logits, their fp32 copy, log-softmax, gradient: 14 bytes each) 3.5 GB,
transient vision activations ~0.25 GB, CUDA context and allocator ~1 GB: about 9.4 GB at the peak sequence,
~7.5 GB at the average one, under the T4's 15 GiB usable. `python -m vskip_core.pipeline --params
params/colab_qwen2vl_2b.yaml --plan --gpu T4` computes the same budget from the checkpoint config (9.3 GiB).
Batch 2 x accumulation 8 (the same effective batch of 16) doubles the logits term: 13.5 GiB planned, too
close to the 15 for allocator fragmentation and a notebook's own tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vskip_core.arguments import parse_sets, stage_parser
from vskip_core.common.artifacts import example_for, example_ref, load_rationales, load_scores
from vskip_core.common.external import (  # noqa: F401  (re-exported: stage 03 and notebook 04 read them here)
    EXTERNAL_COLUMNS,
    external_columns,
    with_external_columns,
)
from vskip_core.common.students import (  # noqa: F401  (re-exported: the notebooks read them here)
    CONTROL,
    STAGE,
    DistillError,
    check_ratios,
    format_ratio,
    load_base,
    load_student,
    parse_student,
    ratio_prompt,
    run_device,
    student_adapters,
    student_name,
    students_at,
)
from vskip_core.config import Config, load_params
from vskip_core.method.gating import GateError, as_scored, forced_tokens, keep_mask
from vskip_core.metrics import act_ratio, body_tokens, compress_text
from vskip_core.modeling.decoding import generate
from vskip_core.modeling.loading import Loaded, collate, encode, load_model
from vskip_core.modeling.prompts import ANSWER_PREFIX, RATIO_TEMPLATE, answer_line_start
from vskip_core.plots import _save, plt
from vskip_core.runtime import (
    atomic_write_json,
    configure_threads,
    relative_path,
    resolve_dtype,
    results_dir,
    seed_everything,
)
from vskip_core.runtime import progress as tqdm

Compress = Callable[[dict[str, Any], str, float], str]


# ------------------------------------------------------------------------------------------ training data
def split_answer(text: str) -> tuple[str, str, str]:
    """(body, separator, answer line) of a rationale; the answer line is the text from the final answer
    statement on (`prompts.answer_line_start`: the last `Answer:` / `answer is`, as the metrics read it), the
    separator the whitespace before it. Without an answer line: (text, "", "")."""
    i = answer_line_start(text)
    if i is None:
        return text.rstrip(), "", ""
    body = text[:i].rstrip()
    return body, text[len(body) : i] or " ", text[i:].strip()


def make_target(compressed: str, answer_line: str, sep: str = " ") -> str:
    """Compressed rationale followed by the answer line. Whatever the gate kept of the answer line (all of
    it when `gate.force_keep_answer`) is replaced by the original line, so every target ends with it. The
    body keeps its leading space, if any: `metrics.compress_text` keeps the first kept token verbatim so that
    the student's tokens are the kept teacher tokens."""
    j = answer_line_start(compressed) if answer_line else None
    body = (compressed[:j] if j is not None else compressed).rstrip()
    if not body.strip():
        return answer_line
    return f"{body}{sep}{answer_line}" if answer_line else body


def _text(row: dict[str, Any]) -> str:
    t = row.get("text", row.get("rationale"))
    if not isinstance(t, str):
        raise DistillError(f"row {row.get('id')!r} has neither `text` (scores) nor `rationale` (01 records)")
    return t


def training_rows(rationales_dir: str | Path, scores_dir: str | Path) -> tuple[list[dict[str, Any]], dict]:
    """Stage 02's scored rationales with stage 01's `correct` flag (what distillation filters by), and counts:
    {"rationales", "correct", "scored", "matched"}."""
    records = {r["id"]: r for r in load_rationales(rationales_dir)}
    scores = load_scores(scores_dir, per_layer=False).to_dict("records")  # the gate reads no per-layer column
    rows = [{**r, "correct": records[r["id"]]["correct"]} for r in scores if r["id"] in records]
    counts = {
        "rationales": len(records),
        "correct": sum(bool(r["correct"]) for r in records.values()),
        "scored": len(scores),
        "matched": len(rows),
    }
    return rows, counts


def select_rows(rows, keep: str = "correct", max_examples: int = 0) -> tuple[list[dict[str, Any]], dict]:
    """The rows to distil from, by `generation.keep`: `correct` (rows marked correct=False dropped, and
    rows without an answer line), `answered` (rows without an answer line dropped), `all` (only empty
    rationales dropped: smoke runs). Sorted by id, capped at `max_examples` (> 0). Returns the rows and a
    report of what each filter kept; raises DistillError when nothing is left."""
    if keep not in ("correct", "answered", "all"):
        raise DistillError(f"keep must be correct, answered or all, got {keep!r}")
    if hasattr(rows, "to_dict"):
        rows = rows.to_dict("records")
    rows = list(rows)
    report: dict[str, Any] = {"rows_in": len(rows), "keep": keep}
    kept = [r for r in rows if _text(r).strip()]
    report["kept_non_empty"] = len(kept)
    if keep == "correct":
        kept = [r for r in kept if bool(r.get("correct", True))]
        report["kept_correct"] = len(kept)
    if keep != "all":
        kept = [r for r in kept if answer_line_start(_text(r)) is not None]
        report["kept_with_answer_line"] = len(kept)
    kept = sorted(kept, key=lambda r: str(r["id"]))
    if max_examples > 0:
        kept = kept[:max_examples]
        report["kept_after_cap"] = len(kept)
    report["kept"] = len(kept)
    report["kept_per_family"] = dict(sorted(Counter(str(r["family"]) for r in kept).items()))
    if not kept:
        steps = ", ".join(
            f"{k.removeprefix('kept_')} {v}" for k, v in report.items() if k.startswith("kept_")
        )
        raise DistillError(
            f"empty training set after filtering ({report['rows_in']} rows in; kept: {steps}). Distillation "
            f"needs the teacher's rationales with a final answer ('{ANSWER_PREFIX} ...' or '... answer is "
            f"...'): check stage 01's accuracy (rationales.jsonl `correct`), generation.max_new_tokens and "
            f"generation.keep"
        )
    return kept, report


def draw_ratios(rows: list[dict[str, Any]], ratios: list[float], seed: int) -> dict[str, float]:
    """One ratio per example id, balanced within each family (counts differ by at most one) and seeded:
    the same draws for every method, because they depend only on the ids, the ratio set and the seed."""
    ratios = check_ratios(ratios)
    by_family: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        by_family[str(r["family"])].append(str(r["id"]))
    out: dict[str, float] = {}
    for k, fam in enumerate(sorted(by_family)):
        ids = sorted(by_family[fam])
        slots = np.random.default_rng([seed, k]).permutation(len(ids))
        for i, s in zip(ids, slots):
            out[i] = ratios[(int(s) + k) % len(ratios)]
    return out


def ratio_sets(draws: dict[str, float], ratios: list[float], per_example: int) -> dict[str, list[float]]:
    """`per_example` ratios for each example id: its drawn ratio and the next ones of `ratios` (cyclically), so
    the same example is a target at several lengths (the student sees what the ratio changes); balanced
    like the draws. 1 = the draw alone; >= len(ratios) = every ratio."""
    k = max(1, min(per_example, len(ratios)))
    return {i: [ratios[(ratios.index(r) + j) % len(ratios)] for j in range(k)] for i, r in draws.items()}


def _row_ratios(rows, method: str, draws: dict[str, list[float]]):
    """(row, ratio) pairs of one method's data: the control `full` once at 1.0, every other method at each of
    the example's ratios (`draws`: the ratios per id)."""
    for row in rows:
        for ratio in [1.0] if method == CONTROL else draws[str(row["id"])]:
            yield row, float(ratio)


def build_dataset(
    cfg: Config,
    rows: list[dict[str, Any]],
    method: str,
    draws: dict[str, list[float]],
    compress,
    tokenizer,
):
    """Instruction data for one method: the ratio prompt (`ratio_prompt`) of the drawn ratio, target =
    compressed rationale + answer line. Ratio 1.0 (and the control `full`) keeps the full rationale without
    calling `compress`."""
    from datasets import Dataset

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    recs = []
    for row, ratio in _row_ratios(rows, method, draws):
        text = _text(row)
        _, sep, answer = split_answer(text)
        if ratio >= 1.0:
            target = text.strip()
        elif compress is None:
            raise DistillError(f"method {method!r} needs a compress(row, method, ratio) callable")
        else:
            target = make_target(compress(row, method, ratio), answer, sep)
        kept_body, full_body = body_tokens([target, text], tokenizer)
        split, index = example_ref(row)
        recs.append(
            {
                "id": str(row["id"]),
                "split": split,
                "index": index,
                "family": str(row["family"]),
                "method": method,
                "ratio": ratio,
                **ratio_prompt(cfg, ratio),
                "target": target,
                "full_rationale": text,
                "target_tokens": n_tokens(target),
                "full_tokens": n_tokens(text),
                "body_tokens": kept_body,
                "full_body_tokens": full_body,
                "actual_ratio": act_ratio([kept_body], [full_body]),  # per example; pooled in data_card
            }
        )
    return Dataset.from_list(recs)


def build_datasets(
    cfg: Config,
    rows,
    methods: list[str],
    ratios: list[float],
    compress: Compress | None,
    tokenizer,
    seed: int = 0,
    keep: str = "correct",
    max_examples: int = 0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One dataset per method plus the control `full`, all from the same kept rows and ratio draws.
    Returns (datasets by method, filter report). Raises DistillError on bad ratios or an empty set."""
    ratios = check_ratios(ratios)
    kept, report = select_rows(rows, keep, max_examples)
    draws = ratio_sets(draw_ratios(kept, ratios, seed), ratios, cfg.distill.ratios_per_example)
    if not cfg.distill.student_per_ratio:
        names = list(dict.fromkeys([*methods, CONTROL]))
        return {m: build_dataset(cfg, kept, m, draws, compress, tokenizer) for m in names}, report
    out = {}  # one student per (method, ratio), every kept rationale at that ratio; the control at 1.0
    for m in dict.fromkeys(methods):
        for r in sorted(r for r in ratios if r < 1.0):
            at = {str(row["id"]): [r] for row in kept}
            out[student_name(m, r)] = build_dataset(cfg, kept, m, at, compress, tokenizer)
    out[CONTROL] = build_dataset(cfg, kept, CONTROL, draws, compress, tokenizer)
    return out, report


def data_card(ds) -> dict[str, Any]:
    """Counts per ratio, per family and per (ratio, family); mean target / full tokens and ActRatio (`metrics.act_ratio`)."""
    df = ds.to_pandas()
    per_ratio = {
        format_ratio(r): {
            "n": int(len(g)),
            "mean_target_tokens": float(g.target_tokens.mean()),
            "mean_full_tokens": float(g.full_tokens.mean()),
            "act_ratio": act_ratio(g.body_tokens.tolist(), g.full_body_tokens.tolist()),
        }
        for r, g in df.groupby("ratio")
    }
    cross = df.groupby(["ratio", "family"]).size()
    return {
        "method": str(df.method.iloc[0]),
        "n": int(len(df)),
        "per_ratio": per_ratio,
        "per_family": {str(k): int(v) for k, v in df.family.value_counts().sort_index().items()},
        "per_ratio_family": {f"{format_ratio(r)}/{f}": int(n) for (r, f), n in cross.items()},
        "mean_target_tokens": float(df.target_tokens.mean()),
        "mean_full_tokens": float(df.full_tokens.mean()),
        "empty_targets": int((df.target.str.strip() == "").sum()),  # the student learns to write nothing
    }


def save_datasets(datasets: dict[str, Any], out_dir: str | Path, report: dict[str, Any]) -> dict[str, Any]:
    """Save each dataset to `out_dir/<method>/` beside `data_card.json` and a README; returns the cards."""
    out_dir = Path(out_dir)
    cards = {}
    for m, ds in datasets.items():
        d = out_dir / m
        if d.exists():
            shutil.rmtree(d)
        ds.save_to_disk(str(d))
        card = {**data_card(ds), "filters": report}
        atomic_write_json(d / "data_card.json", card)
        (d / "README.md").write_text(_dataset_readme(card))
        cards[m] = card
    return cards


def load_datasets(out_dir: str | Path, methods: list[str] | None = None) -> dict[str, Any]:
    """The datasets `save_datasets` wrote (all of them, or `methods`)."""
    from datasets import load_from_disk

    out_dir = Path(out_dir)
    found = sorted(p.parent.name for p in out_dir.glob("*/data_card.json"))
    missing = [m for m in (methods or []) if m not in found]
    if missing or not found:
        raise FileNotFoundError(
            f"no saved distillation dataset for {missing or 'any method'} in {out_dir} (found {found}); "
            f"run notebook {STAGE} first"
        )
    return {m: load_from_disk(str(out_dir / m)) for m in (methods or found)}


def _dataset_readme(card: dict[str, Any]) -> str:
    lines = [
        f"# Distillation data: method `{card['method']}`",
        "",
        f"{card['n']} examples. Prompt: question + `{RATIO_TEMPLATE}` "
        "(vskip_core.common.students.ratio_prompt); target: compressed teacher rationale + answer line.",
        "",
        "| ratio | n | mean target tokens | mean full tokens | actual ratio |",
        "|---|---|---|---|---|",
    ]
    for r, v in card["per_ratio"].items():
        lines.append(
            f"| {r} | {v['n']} | {v['mean_target_tokens']:.1f} | {v['mean_full_tokens']:.1f} | "
            f"{v['act_ratio']:.3f} |"
        )
    lines += ["", "Per family: " + ", ".join(f"{k} {v}" for k, v in card["per_family"].items()), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ gating as compress
class GateCompressor:
    """`compress(row, method, ratio)` through vskip_core.method.gating on a scores row: `keep_mask` with a
    per-example budget of round(ratio * n) tokens (every example has its own ratio, so per-corpus thresholds
    do not apply), then `compress_text`. Two cases are counted in `events` rather than raised:
    `no_answer_line` (only with generation.keep = all: gated with force_keep_answer off) and `budget` (the
    answer line alone exceeds the budget at a low ratio: the target keeps just the answer line). `empty`
    counts compressions that kept nothing (the data card counts the resulting empty targets)."""

    def __init__(self, cfg: Config) -> None:
        gate = dataclasses.replace(cfg.gate, threshold_mode="example")
        self.cfg = dataclasses.replace(cfg, gate=gate)
        self.free = dataclasses.replace(self.cfg, gate=dataclasses.replace(gate, force_keep_answer=False))
        self.seed = cfg.runtime.seed
        self.events: Counter = Counter()  # per call (a row is gated once per method at ratio < 1)
        self._scored: dict[str, Any] = {}  # each row converted and unit-split once, shared by the methods

    def __call__(self, row: dict[str, Any], method: str, ratio: float) -> str:

        key = str(row.get("id"))
        if key not in self._scored:
            self._scored[key] = as_scored(row)
        scored, cfg = self._scored[key], self.cfg
        if scored.answer_start is None:
            self.events["no_answer_line"] += 1
            cfg = self.free
        try:
            keep = keep_mask(scored, method, ratio, cfg, seed=self.seed)
        except GateError as e:
            if e.reason != "budget":
                raise
            self.events["budget"] += 1
            keep = forced_tokens(scored, cfg)
        text = compress_text(scored, keep)
        if not text.strip():
            self.events["empty"] += 1  # e.g. one long word over budget at word level (smoke rationales)
        return text


# ----------------------------------------------------------------------------------------- model loading
def lora_targets(loaded: Loaded, target_modules: list[str]) -> str:
    """peft `target_modules` (a regex over the language model's decoder layers, from the family adapter) for
    the configured names; raises DistillError naming the names that match nothing and the valid ones."""
    try:
        return loaded.adapter.lora_target_modules(loaded.model, list(target_modules))
    except ValueError as e:
        raise DistillError(f"distill.target_modules {list(target_modules)}: {e}") from None


def check_not_repacked(model) -> None:
    """Raise if a 4-bit layer was repacked for CPU inference (an eval no-grad forward before training):
    LoRA would then train on exactly zero gradients."""
    for name, m in model.named_modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None and getattr(qs, "packing_format_for_cpu", False):
            raise DistillError(
                f"4-bit layer {name} was repacked for CPU inference (a no-grad forward or generate() in eval "
                f"mode ran before training); LoRA would get zero gradients. Reload the student with "
                f"vskip_core.stages.distillation.load_base (it calls model.train() first) and train before any inference"
            )


def apply_lora(loaded: Loaded, cfg: Config):
    """Wrap the base in peft LoRA (with QLoRA preparation for a 4-bit base). Checks the targets first."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    d = cfg.distill
    targets = lora_targets(loaded, d.target_modules)
    model = loaded.model
    # non-reentrant checkpointing: the reentrant kind backpropagates twice through inputs shared by several
    # layers (Mllama's cross-attention states) and raises "Trying to backward through the graph a second time"
    ckpt = {"use_reentrant": False}
    if getattr(model, "is_loaded_in_4bit", False):
        check_not_repacked(model)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=d.gradient_checkpointing, gradient_checkpointing_kwargs=ckpt
        )
    elif d.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=d.lora_r,
        lora_alpha=d.lora_alpha,
        lora_dropout=d.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    pm = get_peft_model(model, lora)
    pm.train()
    return pm


# --------------------------------------------------------------------------------------------- training
class EncodedDataset(torch.utils.data.Dataset):
    """A distillation dataset as model inputs: the benchmark example (image, question) is rebuilt from its
    (split, index) on access (`generation.example_for`, ~2 ms for the embedded benchmark), so no images are
    stored with the data."""

    def __init__(self, ds, cfg: Config, tok, proc) -> None:
        self.rows = ds.to_list()
        self.cfg, self.tok, self.proc = cfg, tok, proc

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:

        r = self.rows[i]
        ex = example_for(self.cfg, {"id": r["id"], "split": r["split"], "index": int(r["index"])})
        return encode(
            ex,
            self.tok,
            self.proc,
            target=r["target"],
            instruction=r["instruction"],
            prefix=r["prefix"],
            assistant_prefill=r.get("assistant_prefill") or "",
        )


class Collator:
    """Right-padded batch of the family's model inputs with `labels`: -100 on the prompt, the image and the
    padding, so the loss covers only the target (compressed rationale + answer line + end token)."""

    def __init__(self, pad_id: int, input_keys: tuple[str, ...]) -> None:
        self.pad_id, self.input_keys = pad_id, input_keys

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        b = collate(items, self.pad_id, padding_side="right")
        labels = b["input_ids"].clone()
        labels[b["attention_mask"] == 0] = -100
        for j, it in enumerate(items):
            labels[j, : it["target_start"]] = -100
        return {**{k: b[k] for k in self.input_keys if k in b}, "labels": labels}


def check_gradients_flow(model, batch: dict[str, torch.Tensor]) -> float:
    """One forward/backward on a batch: the LoRA B matrices (zero at init) must get non-zero gradients.
    Catches the 4-bit CPU repacking trap and frozen graphs before any training step; returns the loss."""
    device = next(p for p in model.parameters() if p.requires_grad).device
    out = model(**{k: v.to(device) for k, v in batch.items()})
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n and p.requires_grad]
    norm = sum(float(g.abs().sum()) for g in grads if g is not None)
    model.zero_grad(set_to_none=True)
    if not grads or norm == 0.0 or not math.isfinite(norm):
        raise DistillError(
            f"LoRA gets no usable gradient (|grad lora_B| = {norm} over {len(grads)} matrices): the loss "
            f"cannot move. For a 4-bit student no inference may run before training (load it with load_base)"
        )
    return out.loss.item()


def fingerprint(cfg: Config, ds, method: str) -> str:
    """What a student depends on: distill/model/embedded/data/generation params, the seed and the data."""
    h = hashlib.sha256()
    h.update(cfg.hash("distill", "embedded", "data", "generation", "model").encode())
    h.update(f"{cfg.runtime.seed}/{method}".encode())
    h.update(
        json.dumps(list(zip(ds["id"], ds["ratio"], ds["prefix"], ds["instruction"], ds["target"]))).encode()
    )
    return h.hexdigest()[:16]


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def planned_steps(cfg: Config, n: int) -> int:
    """Optimizer steps per student: `distill.max_steps`, else `epochs` over n examples."""
    d = cfg.distill
    if d.max_steps > 0:
        return d.max_steps
    return max(1, math.ceil(d.epochs * math.ceil(n / (d.batch_size * d.grad_accum * _world()))))


def _step_bar(desc: str):
    """Training steps on `runtime.progress` (a widget in JupyterLab; under the pipeline a live terminal line and
    one final line in the notebook), instead of Trainer's notebook tables, which a saved notebook shows frozen
    at their first state. A Trainer callback; transformers is imported only when a student is trained."""
    from transformers import TrainerCallback

    class StepBar(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=desc)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return StepBar()


def train_student(
    cfg: Config,
    ds,
    method: str,
    out_root: str | Path,
    progress: bool = True,
    callbacks: list | None = None,
    base: Loaded | None = None,
) -> dict[str, Any]:
    """Train one LoRA student on `ds`; save the adapter to `out_root/adapters/<method>/` with params.json,
    metrics.json, history.json and a model card. Resumes from `out_root/checkpoints/<method>/` after a kill;
    a finished student with the same fingerprint is reused. Returns its metrics."""
    from transformers import PrinterCallback, Trainer
    from transformers.trainer_utils import get_last_checkpoint

    if len(ds) == 0:
        raise DistillError(f"method {method!r}: empty training set; nothing to distil")
    check_ratios(sorted(set(ds["ratio"])))
    out_root = Path(out_root)
    adapter_dir, ckpt_dir = out_root / "adapters" / method, out_root / "checkpoints" / method
    fp = fingerprint(cfg, ds, method)
    done = adapter_dir / "metrics.json"
    if done.exists() and json.loads(done.read_text()).get("fingerprint") == fp:
        return {**json.loads(done.read_text()), "reused": True, "adapter": str(adapter_dir)}
    stamp = ckpt_dir / "fingerprint.json"
    if ckpt_dir.exists() and (not stamp.exists() or json.loads(stamp.read_text()).get("fingerprint") != fp):
        shutil.rmtree(ckpt_dir)  # checkpoints of other params or data: start over

    seed_everything(cfg.runtime.seed)  # every student starts from the same LoRA initialisation
    base = base or load_base(cfg)
    model = apply_lora(base, cfg)
    train_ds = EncodedDataset(ds, cfg, base.tokenizer, base.processor)
    collator = Collator(base.tokenizer.pad_token_id, base.adapter.input_keys)
    check_gradients_flow(model, collator([train_ds[i] for i in range(min(2, len(train_ds)))]))
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stamp, {"fingerprint": fp})

    device = run_device(cfg)
    steps = planned_steps(cfg, len(ds))
    args = training_arguments(cfg, ckpt_dir, steps, device, progress=False)  # our bar below, not Trainer's
    bar = [_step_bar(f"train {method}")] if progress else []
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        data_collator=collator,
        callbacks=(callbacks or []) + bar,
    )
    trainer.remove_callback(PrinterCallback)  # no per-log print lines (the history is kept in history.json)
    last = get_last_checkpoint(str(ckpt_dir))
    resumed = int(last.rsplit("-", 1)[-1]) if last else 0
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train(resume_from_checkpoint=last)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0

    metrics = {
        **run_record(cfg, trainer, model, steps, resumed, seconds, cpu_seconds),
        "method": method,
        "train_size": len(ds),
        "adapter": str(adapter_dir),
        "base_path": base.path,
        "device": device,
        "fingerprint": fp,
    }
    if trainer.is_world_process_zero():
        save_adapter(trainer.model, cfg, adapter_dir, metrics, trainer.state.log_history, ds)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        if ckpt_dir.parent.exists() and not any(ckpt_dir.parent.iterdir()):
            ckpt_dir.parent.rmdir()
    return metrics


def training_arguments(cfg: Config, ckpt_dir: Path, steps: int, device: str, progress: bool):
    """The Trainer's arguments for one student: `distill.*`, cosine schedule, checkpoints every `save_steps`
    (two kept), the compute dtype of `model.dtype` on GPU."""
    from transformers import TrainingArguments

    d = cfg.distill
    dtype = resolve_dtype(cfg.model.dtype, device)
    return TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=d.batch_size,
        gradient_accumulation_steps=d.grad_accum,
        learning_rate=d.lr,
        lr_scheduler_type="cosine",
        warmup_steps=min(d.warmup_steps, max(steps - 1, 0)),
        weight_decay=0.0,
        max_steps=steps,
        logging_steps=d.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=d.save_steps,
        save_total_limit=2,
        report_to="none",
        seed=cfg.runtime.seed,
        optim="adamw_torch",
        remove_unused_columns=False,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        use_cpu=device == "cpu",
        bf16=dtype == torch.bfloat16 and device != "cpu",
        fp16=dtype == torch.float16,
    )


def run_record(cfg: Config, trainer, model, steps: int, resumed: int, seconds: float, cpu_seconds: float):
    """What one training run did: steps, examples seen, first/last loss, time per step (wall and process CPU:
    on a shared machine wall time depends on who else runs), threads, resumed step, parameter counts."""
    d = cfg.distill
    hist = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "steps": steps,
        "examples_seen": steps * d.batch_size * d.grad_accum * _world(),
        "first_loss": float(hist[0]["loss"]) if hist else float("nan"),
        "last_loss": float(hist[-1]["loss"]) if hist else float("nan"),
        "train_seconds": seconds,
        "seconds_per_step": seconds / max(steps - resumed, 1),
        "cpu_seconds_per_step": cpu_seconds / max(steps - resumed, 1),
        "threads": torch.get_num_threads(),
        "resumed_from_step": resumed,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "quantization": d.quantization,
        "student": d.student,
    }


def save_adapter(model, cfg: Config, adapter_dir: Path, metrics, log_history, ds) -> None:
    """Adapter weights + params.json (resolved params) + history.json + README.md; metrics.json last (it
    marks the student as finished)."""
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    model.save_pretrained(str(adapter_dir))
    atomic_write_json(adapter_dir / "params.json", cfg.to_dict())
    atomic_write_json(adapter_dir / "history.json", log_history)
    # no absolute paths of this machine: the adapter relative to the run folder, the base to runtime.cache_dir
    metrics = {
        **metrics,
        "adapter": in_run(metrics["adapter"]),
        "base_path": relative_path(metrics["base_path"], cfg.path(cfg.runtime.cache_dir)),
    }
    (adapter_dir / "README.md").write_text(_model_card(cfg, metrics, ds))
    atomic_write_json(adapter_dir / "metrics.json", metrics)


def in_run(adapter_dir: str | Path) -> str:
    """An adapter folder (`<run>/<stage>/adapters/<method>`) relative to its run folder, as metrics.json files
    store it (`evaluation.student_adapters` resolves it)."""
    p = Path(adapter_dir)
    return relative_path(p, p.parents[2]) if len(p.parents) > 2 else str(p)


def _model_card(cfg: Config, m: dict[str, Any], ds) -> str:
    d = cfg.distill
    ratios = sorted({format_ratio(r) for r in ds["ratio"]})
    return "\n".join(
        [
            f"# V-Skip student: `{m['method']}`",
            "",
            f"LoRA adapter (r {d.lora_r}, alpha {d.lora_alpha}, dropout {d.lora_dropout}, modules "
            f"{d.target_modules} of the language model) on `{d.student}` (base `{m['base_path']}`, "
            f"quantization {d.quantization}).",
            f"Trained {m['steps']} steps x batch {d.batch_size} x accumulation {d.grad_accum} at lr {d.lr} on "
            f"{m['train_size']} teacher rationales compressed by `{m['method']}` at ratios {ratios}; "
            f"loss on target tokens only.",
            f"Loss {m['first_loss']:.3f} -> {m['last_loss']:.3f} in {m['train_seconds']:.0f} s on {m['device']}.",
            "",
            f"Prompt: `vskip_core.common.students.ratio_prompt(cfg, r)` (`{RATIO_TEMPLATE}`, "
            f"{d.ratio_position}); 1.0 asks for the full rationale.",
            "",
            "```python",
            "from vskip_core.common.students import load_student, ratio_prompt",
            "from vskip_core.modeling.decoding import generate",
            "student = load_student(cfg, adapter_dir)  # base + adapter, merged unless the base is 4-bit",
            "out = generate(student.model, student.tokenizer, student.processor, examples, "
            "**ratio_prompt(cfg, 0.5))",
            "```",
            "",
        ]
    )


def check_inputs(cfg: Config, datasets: dict[str, Any], base: Loaded | None = None) -> None:
    """Everything that can be wrong before training, checked at once: non-empty datasets, ratios in (0, 1],
    target modules present in the real student."""
    for m, ds in datasets.items():
        if len(ds) == 0:
            raise DistillError(f"method {m!r}: empty training set; nothing to distil")
        check_ratios(sorted(set(ds["ratio"])))
    lora_targets(base or load_base(cfg), cfg.distill.target_modules)


def train_students(
    cfg: Config, datasets: dict[str, Any], out_root: str | Path, progress: bool = True
) -> dict[str, dict[str, Any]]:
    """Train every student on the same budget, after `check_inputs` (a bad setting fails before any
    training starts). Each student starts from a freshly loaded base and the same LoRA initialisation."""
    base = load_base(cfg)
    check_inputs(cfg, datasets, base)
    workers = min(cfg.distill.workers, len(datasets)) if run_device(cfg) == "cpu" else 1
    if workers > 1:
        return _train_side_by_side(cfg, datasets, out_root, workers, progress)
    out = {}
    for m, ds in datasets.items():  # the checked base serves the first student; the others reload it
        out[m] = train_student(cfg, ds, m, out_root, progress=progress, base=base)
        base = None
    return out


def _train_one(cfg: Config, ds, name: str, out_root: str) -> dict[str, Any]:
    """One student in a worker process, with the run's torch threads (results as in one process)."""
    configure_threads(cfg.runtime.num_threads)
    return train_student(cfg, ds, name, out_root, progress=False)


def _train_side_by_side(cfg: Config, datasets, out_root, workers: int, progress: bool) -> dict[str, dict]:
    """`distill.workers` students at a time on CPU, each in its own process with the run's threads: every
    student starts from the same seed and data, so a student is the same whatever trains beside it."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    out: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(datasets), desc=f"students ({workers} at a time)", disable=not progress)
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        jobs = {pool.submit(_train_one, cfg, ds, m, str(out_root)): m for m, ds in datasets.items()}
        for job in as_completed(jobs):
            out[jobs[job]] = job.result()
            bar.set_postfix_str(f"{jobs[job]} done")
            bar.update(1)
    bar.close()
    return {m: out[m] for m in datasets}


# ------------------------------------------------------------------------------------------ loading back
# ------------------------------------------------------------------------------------------ stage record
METRIC_KEYS = (
    "train_size",
    "steps",
    "first_loss",
    "last_loss",
    "train_seconds",
    "seconds_per_step",
    "cpu_seconds_per_step",
    "threads",
    "adapter",
    "trainable_params",
    "total_params",
    "quantization",
    "device",
    "resumed_from_step",
    "reused",
)


def stage_metrics(results, cards, report, gate_events, total_minutes: float) -> dict[str, Any]:
    """metrics.json of stage 04: `{"methods": {method: {train_size, first_loss, last_loss, adapter,
    train_seconds, ...}}, ...}` (the control is method `full`), plus the data cards and the filter report."""
    return {
        "methods": {
            m: {k: in_run(r[k]) if k == "adapter" else r[k] for k in METRIC_KEYS if k in r}
            for m, r in results.items()
        },
        "total_train_minutes": total_minutes,
        "datasets": {
            m: {k: c[k] for k in ("n", "per_ratio", "per_family", "mean_target_tokens", "empty_targets")}
            for m, c in cards.items()
        },
        "filters": report,
        "gate_fallbacks": dict(gate_events),
    }


# ----------------------------------------------------------------------------------------------- figures
def token_stats(datasets: dict[str, Any]):
    """Long table, one row per example: method, ratio, family, target and full tokens, body tokens of both
    (`metrics.act_ratio`'s unit) and the example's own ratio."""
    import pandas as pd

    cols = [
        "method",
        "ratio",
        "family",
        "target_tokens",
        "full_tokens",
        "body_tokens",
        "full_body_tokens",
        "actual_ratio",
    ]
    return pd.concat([ds.to_pandas()[cols] for ds in datasets.values()], ignore_index=True)


def plot_token_stats(stats, path=None):
    """Mean target tokens per drawn ratio and method."""
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(9, 3.6))
    sns.barplot(data=stats, x="ratio", y="target_tokens", hue="method", ax=ax, errorbar=None)
    ax.set_title("target tokens (compressed rationale + answer line) per drawn ratio")
    fig.tight_layout()
    return _save(fig, path)


def training_histories(metrics: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The Trainer's log history of each student, read back from its adapter folder."""
    return {m: json.loads((Path(v["adapter"]) / "history.json").read_text()) for m, v in metrics.items()}


def plot_training_curves(histories: dict[str, list[dict[str, Any]]], path=None):
    """Training loss per logged step, one line per student."""
    import pandas as pd
    import seaborn as sns

    rows = [
        {"method": m, "step": h["step"], "loss": h["loss"]}
        for m, hs in histories.items()
        for h in hs
        if "loss" in h
    ]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    sns.lineplot(data=pd.DataFrame(rows), x="step", y="loss", hue="method", ax=ax)
    ax.set_title("LoRA distillation: loss on target tokens (logged means)")
    fig.tight_layout()
    return _save(fig, path)


def student_gallery(cfg: Config, adapters: dict[str, str], examples, ratio: float = 0.5, teacher=None):
    """Per example: the teacher's full rationale and each student's output at `ratio` (greedy)."""
    import pandas as pd

    g = cfg.generation
    teacher = teacher or load_model(cfg)
    table = {"id": [x["id"] for x in examples], "question": [x["question"] for x in examples]}
    outs = generate(
        teacher.model,
        teacher.tokenizer,
        teacher.processor,
        examples,
        g.max_new_tokens,
        g.batch_size,
        instruction=g.instruction,
        repetition_penalty=g.repetition_penalty,
    )
    table["teacher (full)"] = [o["text"] for o in outs]
    for m, path in adapters.items():
        s = load_student(cfg, path)
        r = 1.0 if m == CONTROL else ratio
        outs = generate(
            s.model,
            s.tokenizer,
            s.processor,
            examples,
            g.max_new_tokens,
            g.batch_size,
            **ratio_prompt(cfg, r),
            repetition_penalty=g.repetition_penalty,
        )
        table[f"{m} @ {format_ratio(r)}"] = [o["text"] for o in outs]
    return pd.DataFrame(table)


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """Train students from the datasets notebook 04 saved (the multi-GPU path: `accelerate launch -m ...`)."""

    ap = stage_parser("stages.distillation", main.__doc__)
    ap.add_argument("--methods", default="", help="comma-separated; default: every saved dataset")
    a = ap.parse_args(argv)
    cfg = load_params(a.params, parse_sets(a.set))
    stage_dir = results_dir(cfg, a.run) / STAGE
    datasets = load_datasets(stage_dir / "datasets", [m for m in a.methods.split(",") if m] or None)
    metrics = train_students(cfg, datasets, stage_dir)
    keys = ("train_size", "first_loss", "last_loss", "adapter", "train_seconds")
    print(json.dumps({m: {k: v[k] for k in keys} for m, v in metrics.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
