"""The distilled students, as every stage after 04 reads them: their names, the ratio prompt they answer, where
their adapters are, and how one is loaded (stage 04 trains them; 05-08 and the library load them)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from vskip_core.config import Config
from vskip_core.modeling.loading import Loaded, load_model
from vskip_core.modeling.prompts import RATIO_TEMPLATE
from vskip_core.runtime import resolve_device, resolve_path

STAGE = "04_qlora_distillation"
CONTROL = "full"  # the full-rationale control student: ratio always 1.0, no compression


class DistillError(ValueError):
    """Bad input to distillation (empty training set, bad ratios, target modules that match nothing)."""


# --------------------------------------------------------------------------------------------- the prompt
def check_ratios(ratios) -> list[float]:
    """Every ratio must lie in (0, 1]; 1.0 means the full rationale."""
    ratios = list(ratios)
    bad = [r for r in ratios if isinstance(r, bool) or not (isinstance(r, int | float) and 0 < r <= 1)]
    if bad or not ratios:
        raise DistillError(
            f"ratios must be a non-empty set of values in (0, 1] (1.0 = the full rationale); got {ratios} "
            f"(bad: {bad}). Fix distill.ratios, e.g. [1.0, 0.9, 0.7, 0.5, 0.3]"
        )
    return [float(r) for r in ratios]


def format_ratio(ratio: float) -> str:
    """1.0 -> '1.0', 0.5 -> '0.5', 0.333 -> '0.33' (two decimals at most, trailing zeros dropped)."""
    s = f"{ratio:.2f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def ratio_prompt(cfg: Config, ratio: float, position: str | None = None) -> dict[str, str]:
    """The `prefix`, `instruction` and `assistant_prefill` that ask for a rationale compressed to `ratio`
    (`Keep 0.5 of the reasoning.`), placed by `distill.ratio_position`: after the question, options and
    `generation.instruction` (question_end), before the question (turn_start), or as the first line of the
    assistant turn (answer_start: a prefill the student reads, never writes). Pass them on as
    `generate(..., **ratio_prompt(cfg, r))` or `encode(...)`; 1.0 asks for the full rationale."""
    check_ratios([ratio])
    sentence = RATIO_TEMPLATE.format(ratio=format_ratio(ratio))
    instruction = cfg.generation.instruction
    where = position or cfg.distill.ratio_position
    if where == "turn_start":
        return {"prefix": sentence + "\n", "instruction": instruction, "assistant_prefill": ""}
    if where == "answer_start":
        return {"prefix": "", "instruction": instruction, "assistant_prefill": sentence + "\n"}
    ins = f"{instruction}\n{sentence}" if instruction else sentence
    return {"prefix": "", "instruction": ins, "assistant_prefill": ""}


# ------------------------------------------------------------------------------------------------ names
def student_name(method: str, ratio: float | None = None) -> str:
    """A student's name (its adapter folder, its key in 04's metrics): the method for a ratio-conditioned
    student and for the control, `method@ratio` for a student trained at one ratio (`distill.student_per_ratio`)."""
    return method if ratio is None or method == CONTROL else f"{method}@{format_ratio(ratio)}"


def parse_student(name: str) -> tuple[str, float | None]:
    """(method, ratio or None) of a `student_name`."""
    method, _, ratio = name.partition("@")
    return method, float(ratio) if ratio else None


def students_at(adapters: dict[str, str], ratio: float) -> dict[str, str]:
    """{method: adapter} of the students that answer at `ratio`: each method's student of that ratio, else its
    ratio-conditioned one; the control `full` always (it answers at 1.0)."""
    out: dict[str, str] = {}
    for name in adapters:
        method, r = parse_student(name)
        if method == CONTROL or (r is None and method not in out):
            out[method] = adapters[name]
        elif r is not None and abs(r - ratio) < 1e-9:
            out[method] = adapters[name]
    return out


# ----------------------------------------------------------------------------------------- model loading
def run_device(cfg: Config) -> str:
    """The run's device; under `accelerate launch` / torchrun each process takes its own GPU."""

    device = resolve_device(cfg.runtime.device)
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def load_base(
    cfg: Config,
    student: str | None = None,
    quantization: str | None = None,
    device=None,
    attn_implementation: str | None = None,
) -> Loaded:
    """The student's base model in training mode: `distill.student` (embedded = the teacher's weights),
    4-bit nf4 when `distill.quantization` says so (QLoRA; the family adapter keeps the vision tower and
    lm_head out of 4-bit), language-model attention `distill.attn_implementation` (sdpa: training needs no
    attention maps). `model.train()` comes first: a no-grad eval forward would repack 4-bit weights for CPU
    inference, after which LoRA gets zero gradients (bitsandbytes 0.50 on CPU)."""

    student = student or cfg.distill.student
    quantization = quantization or cfg.distill.quantization
    attn = attn_implementation or cfg.distill.attn_implementation
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attn_implementation=attn))
    loaded = load_model(cfg, student, device=device or run_device(cfg), quantization=quantization)
    loaded.model.train()
    return loaded


def student_adapters(stage04: str | Path) -> dict[str, str]:
    """{student name: adapter dir} from 04's metrics.json (`student_name`s, the control `full` included); the
    paths there are relative to the run folder (older runs: absolute)."""
    m = json.loads((Path(stage04) / "metrics.json").read_text())["methods"]
    run_dir = Path(stage04).parent
    return {k: str(resolve_path(v["adapter"], run_dir)) for k, v in m.items() if v.get("adapter")}


def load_student(cfg: Config, adapter_dir: str | Path, merge: bool | None = None, device=None) -> Loaded:
    """A trained student for evaluation: its base (as recorded in the adapter's params.json: student and
    quantization) + the LoRA adapter, in eval mode. `merge` (default: when the base is not 4-bit) folds the
    adapter into the weights with `merge_and_unload`, so generation costs what the base model costs.
    Attention is `model.attn_implementation` (eager by default: the stages that read attention maps)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"{adapter_dir} holds no LoRA adapter (adapter_config.json); train it in {STAGE}"
        )
    saved = json.loads((adapter_dir / "params.json").read_text())["distill"]
    info = json.loads((adapter_dir / "metrics.json").read_text())
    student = saved["student"]
    base_path = info.get("base_path") and resolve_path(info["base_path"], cfg.path(cfg.runtime.cache_dir))
    if student == "embedded" and base_path and base_path.exists():
        student = str(base_path)  # the exact teacher the adapter was trained on
    base = load_base(cfg, student, saved["quantization"], device, cfg.model.attn_implementation)
    model = PeftModel.from_pretrained(base.model, str(adapter_dir))
    if saved["quantization"] == "none" if merge is None else merge:
        model = model.merge_and_unload()
    model.eval()
    return Loaded(
        model=model,
        tokenizer=base.tokenizer,
        processor=base.processor,
        family=base.family,
        path=str(adapter_dir),
    )
