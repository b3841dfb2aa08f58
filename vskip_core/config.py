"""Typed parameters for every stage, loaded from YAML with `extends:`, dotted overrides and loud validation.

Order of precedence: dataclass defaults < YAML file (and the files it extends) < overrides. The dataclass
defaults are the default run (params/default.yaml sets nothing). Unknown keys, wrong types, values outside a
field's `Literal[...]` choices, names no registry holds (gate methods, pruners: `vskip_core.registry`) and
out-of-range values raise `ParamsError`, which names the key and, for a misspelling, the nearest valid key or
value. Nothing is silently ignored.

    cfg = load_params("params/default.yaml", {"gate.gamma": 0.5})
    cfg.gate.gamma  # 0.5
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

import vskip_core.registry as registry

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS = "params/default.yaml"
# nbval executes the committed notebooks as they are; these variables redirect a notebook that still has
# its default `params_file` / `run` (papermill runs always pass both explicitly).
ENV_PARAMS = "VSKIP_PARAMS"
ENV_RUN = "VSKIP_RUN"

# Enumerated choices: a field annotated with one of these accepts only its values (checked in `_coerce`).
Family = Literal["attribute", "existence", "reading", "multistep"]  # task families of the embedded benchmark
FAMILIES = typing.get_args(Family)
Source = Literal["embedded", "mmmu", "docvqa", "pope"]
PopeCategory = Literal["adversarial", "popular", "random"]
Split = Literal["train", "val", "test"]
# multi-step rationale designs of the embedded benchmark (data.multistep_rationale; docs/TEACHER.md)
MultistepDesign = Literal["list", "local", "scan", "image", "pick", "rank", "verify"]
RANK_DESIGNS = ("image", "pick", "rank", "verify")  # designs whose vision tower also learns each price rank
ModelFamily = str  # "auto" or a name in registry.FAMILIES (checked in ModelConfig.validate)
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["none", "nf4"]
Attention = Literal["eager", "sdpa"]
Reduce = Literal["sum", "mean", "max"]
# Gate methods and pruners are names in `vskip_core.registry` (GATES, PRUNERS), checked by `_check_registered`.
# Why a choice is limited, added to the error for a value outside it.
_CHOICE_NOTES = {"data.mmmu_split": "test answers are hidden"}
# Fields removed from the params (issue 16: knobs nobody set, duplicates, benchmark-only settings) and what
# replaces each; a params file or override that still sets one is refused with this note.
REMOVED_KEYS = {
    "generation.do_sample": "nothing: every decode is greedy (modeling.decoding.decoding_config)",
    "generation.temperature": "nothing: every decode is greedy (modeling.decoding.decoding_config)",
    "generation.top_p": "nothing: every decode is greedy (modeling.decoding.decoding_config)",
    "scoring.word_anchoring": "nothing: a word's anchoring is the max over its tokens (method.gating._WORD_RULE)",
    "scoring.store_all_layers": "nothing: stage 02 always stores every candidate layer's anchoring",
    "gate.external_batch_size": "common.external.EXTERNAL_BATCH_SIZE (32)",
    "eval.seed": "runtime.seed (seeds the MMMU random-choice fallback)",
    "prune.num_threads": "runtime.num_threads (benchmarks/bench_visual_tokens.py --threads)",
    "prune.student_adapter": "nothing: stage 07 combines the vskip student (stages.pruning.STUDENT_ADAPTER)",
    "prune.image_size": "benchmarks/bench_visual_tokens.py --size",
    "prune.bench_repeats": "benchmarks/bench_visual_tokens.py --repeats",
    "prune.bench_new_tokens": "benchmarks/bench_visual_tokens.py --new-tokens",
}
# The pipeline's stages: one numbered notebook each in notebooks/, run in this order.
STAGES = (
    "00_embedded_teacher",
    "01_rationale_generation",
    "02_dual_scoring",
    "03_gate_ablations",
    "04_qlora_distillation",
    "05_evaluation",
    "06_hallucination_analysis",
    "07_visual_token_pruning",
    "08_pruned_student",
)
# The stages each stage reads (the pipeline waits for them and reruns a stage when one of them ran); a stage not
# listed reads every stage before it. 01 needs 00's teacher only, which the pipeline makes ready before any stage
# starts (the teacher's params are in every stage's fingerprint); 04 reads 03's external scores.
STAGE_READS: dict[str, tuple[str, ...]] = {
    "00_embedded_teacher": (),
    "01_rationale_generation": (),
    "02_dual_scoring": ("01_rationale_generation",),
    "03_gate_ablations": ("02_dual_scoring",),
    "04_qlora_distillation": ("03_gate_ablations",),
    "05_evaluation": ("04_qlora_distillation",),
    "06_hallucination_analysis": ("05_evaluation",),
    "07_visual_token_pruning": ("02_dual_scoring",),
    "08_pruned_student": ("04_qlora_distillation", "07_visual_token_pruning"),
}
# The embedded teacher's build phases in order (vskip_core.teacher, docs/TEACHER.md), each with the tag its rows
# carry in the build's history.json (the tags of the first builds, so every cached history reads the same).
TEACHER_PHASES = {
    "vision_pretraining": "vision",
    "lookup_drills": "drill",
    "end_to_end": "lm",
    "verdict": "verdict",
}


class ParamsError(ValueError):
    """A parameter file or override is invalid; the message names the key and the fix."""


@dataclass
class DataConfig:
    seed: int = 20260122  # base seed; each split derives its own seed from it, so splits are disjoint
    image_size: int = 112  # square image side in pixels; a multiple of 28 (patch 14 x merge 2)
    grid: int = 2  # scenes are grid x grid cells, at most one object per cell
    min_objects: int = 2  # fewest objects in a scene
    max_objects: int = 4  # most objects in a scene (capped at grid * grid)
    families: list[Family] = field(default_factory=lambda: list(FAMILIES))  # task families, in rotation
    n_train: int = 4000  # examples in the train split (rationale generation + distillation)
    n_val: int = 400  # examples in the validation split
    n_test: int = 800  # examples in the test split (all evaluation)
    # multi-step rationale design: list (each option's price, then the extreme one), local (each option
    # checked like an existence question, a running leader by two-digit comparisons), scan (the same checks,
    # then the dollar digits scanned from the extreme end to the first price written), image (the extreme object
    # read off the image, whose vision tower learns each object's price rank, then its letter) or pick (that
    # object, then the options in order until one is it) or rank (each option checked like an existence
    # question, then asked whether its own image tokens say it is the extreme one) or verify (pick's object,
    # then rank's option checks, each present option compared with that object named beside it); docs/TEACHER.md
    multistep_rationale: MultistepDesign = "verify"
    # Real benchmarks (vskip_core.data.real): n_train / n_val / n_test are then disjoint seeded subsets of each
    # benchmark's answered split, and examples rotate between the listed sources as families do here.
    source: list[Source] = field(
        default_factory=lambda: ["embedded"]
    )  # embedded, or any of mmmu, docvqa, pope
    mmmu_id: str = "MMMU/MMMU"  # hub id, or a local path (save_to_disk folder or a folder of parquet files)
    mmmu_split: Literal["validation", "dev"] = (
        "validation"  # an MMMU split with answers: validation (900) or dev (150)
    )
    mmmu_subjects: list[str] = field(default_factory=list)  # MMMU subjects (hub configs); empty = all 30
    docvqa_id: str = "lmms-lab-encoder/DocVQA"  # hub id (falls back to lmms-lab/DocVQA) or local path
    docvqa_split: str = "validation"  # a DocVQA split with answers (test answers are hidden)
    pope_id: str = "lmms-lab-encoder/POPE"  # hub id (falls back to lmms-lab/POPE) or local path
    pope_categories: list[PopeCategory] = field(
        default_factory=lambda: ["adversarial", "popular", "random"]
    )  # POPE negative samplers kept
    max_images: int = 0  # > 0 drops examples with more images (Llama-3.2-Vision is trained on one); 0 = keep

    def validate(self) -> None:
        real = ("mmmu", "docvqa", "pope")
        _check(
            len(self.source) > 0, "data.source", "must name embedded or at least one of mmmu, docvqa, pope"
        )
        _check(
            self.source == ["embedded"] or all(s in real for s in self.source),
            "data.source",
            f"must be [embedded] or a list of {list(real)}, got {self.source}",
        )
        _check(
            len(set(self.source)) == len(self.source), "data.source", f"duplicate entries in {self.source}"
        )
        _check(len(self.pope_categories) > 0, "data.pope_categories", "must keep at least one category")
        _check(self.max_images >= 0, "data.max_images", f"must be >= 0, got {self.max_images}")
        _check(
            self.image_size % 28 == 0 and self.image_size >= 56,
            "data.image_size",
            f"must be a multiple of 28 and >= 56, got {self.image_size}",
        )
        _check(1 <= self.grid <= 4, "data.grid", f"must be in 1..4, got {self.grid}")
        _check(
            self.image_size // self.grid >= 40,
            "data.grid",
            f"cells of {self.image_size // self.grid} px are too small; use a larger data.image_size",
        )
        _check(
            1 <= self.min_objects <= self.max_objects,
            "data.min_objects",
            f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}",
        )
        _check(
            self.max_objects <= min(self.grid**2, 4),
            "data.max_objects",
            f"at most min(grid*grid, 4) objects (one per cell, distinct shapes), got {self.max_objects}",
        )
        _check(len(self.families) > 0, "data.families", "must name at least one family")
        for k in ("n_train", "n_val", "n_test"):
            _check(getattr(self, k) >= 0, f"data.{k}", f"must be >= 0, got {getattr(self, k)}")


@dataclass
class ModelConfig:
    teacher: str = "embedded"  # "embedded" (built in-repo) or a hub id / local model directory
    family: ModelFamily = "auto"  # model adapter: auto (from the checkpoint's config) or a registered family
    dtype: Dtype = (
        "auto"  # auto (bf16 if supported, else fp16 on GPU, fp32 on CPU), float32, bfloat16, float16
    )
    quantization: Quantization = "none"  # none or nf4 (4-bit through bitsandbytes)
    attn_implementation: Attention = (
        "eager"  # eager exposes attention weights; sdpa is faster but returns none
    )
    max_image_tokens: int = (
        1280  # Qwen: visual tokens per image at most (max_pixels = this x 28 x 28); mllama: fixed 4 tiles
    )

    def validate(self) -> None:
        _check(
            self.max_image_tokens >= 4, "model.max_image_tokens", f"must be >= 4, got {self.max_image_tokens}"
        )
        # the registry fills when vskip_core.modeling is imported; before that any name passes here
        if len(registry.FAMILIES) and self.family != "auto" and self.family not in registry.FAMILIES:
            raise ParamsError(
                f"model.family: must be 'auto' or a registered family; {registry.FAMILIES.unknown(self.family)}"
            )


@dataclass
class EmbeddedConfig:
    """Architecture and training recipe of the embedded teacher (a tiny Qwen2VLForConditionalGeneration)."""

    vision_depth: int = 4  # vision transformer blocks
    vision_dim: int = 128  # vision embedding width
    vision_heads: int = 4  # vision attention heads
    hidden_size: int = 256  # language-model width
    text_layers: int = 4  # language-model decoder layers
    text_heads: int = 8  # language-model attention heads (head_dim = hidden_size / text_heads)
    kv_heads: int = 4  # key/value heads (grouped-query attention, as in Qwen2-VL)
    intermediate_size: int = 768  # MLP width of the language model
    vocab_size: int = 640  # BPE vocabulary size of the tokenizer trained on benchmark text
    pretrain_steps: int = 800  # vision_pretraining steps (dense per-token scene labels; docs/TEACHER.md)
    pretrain_lr: float = 2e-3  # peak learning rate of vision_pretraining
    drill_steps: int = 300  # lookup_drills steps ("Describe the triangle."), before end_to_end
    drill_batch_size: int = 32  # drills per step (a drill is a third of a full example's length)
    train_steps: int = 500  # end_to_end steps on question -> rationale + answer
    # verdict phase, after end_to_end: each step `verdict_compare` colour-comparison drills
    # (`data.make_compare_drill`, loss on "same" / "different" only; on blank images, or on unrelated scenes
    # with `verdict_blank: false`) + `verdict_full` full examples; language model only, peak lr `verdict_lr`
    # decaying (cosine) to a tenth. 0 steps = no verdict phase.
    verdict_steps: int = 150
    verdict_compare: int = 16
    verdict_full: int = 16
    verdict_lr: float = 5e-4
    verdict_blank: bool = True
    verdict_reasoning: int = 12  # + this many multi-step reasoning drills a step (data.make_reasoning_drill)
    reasoning_presence: bool = False  # the drills' option presence words ("there is no") carry loss too
    # relative share of each family (in data.families order) in the full-example stream; [] = equal shares.
    # Twice the share for existence and multi-step (attribute and reading saturate first; docs/TEACHER.md).
    family_weights: list[float] = field(default_factory=lambda: [1.0, 2.0, 1.0, 2.0])
    batch_size: int = 16  # examples per vision_pretraining and end_to_end step
    lr: float = 1.5e-3  # peak lr of lookup_drills + end_to_end (one warm-up, one cosine over both)
    warmup_steps: int = 60  # linear warm-up steps
    vision_lr_mult: float = 0.1  # vision-tower lr as a fraction of lr in lookup_drills and end_to_end
    anchor_weight: float = 3.0  # loss weight on tokens inside visual-anchor spans and the answer
    decision_weight: float = 6.0  # loss weight on the words where a rationale branches ("same"/"different")
    probe_weight: float = 0.5  # lookup_drills, end_to_end: weight of the auxiliary probe loss (0 = off)
    probe_tied: bool = True  # colour/shape/size probe heads tied to the LM's word embeddings
    eval_per_family: int = 200  # held-out test examples per family for the teacher's report
    # instruction-tuned behaviour (issue 32; 0 and 0 = the teacher before it; docs/TEACHER.md):
    direct_share: float = (
        0.25  # share of full examples (end_to_end, verdict) whose target is `Answer: X` alone
    )
    direct_weight: float = (
        3.0  # loss weight on a direct answer's tokens (a rationale's answer line: anchor_weight)
    )
    instruct_share: float = 0.3  # share of drills and full examples with one data.TRAIN_INSTRUCTIONS sentence
    instruct_after: float = 0.5  # of those, the share with the sentence after the question (else before it)
    instruct_reasoning: bool = False  # verdict's reasoning drills get sentences too (at instruct_share)

    def validate(self) -> None:
        for k in (
            "vision_depth",
            "vision_dim",
            "vision_heads",
            "hidden_size",
            "text_layers",
            "text_heads",
            "kv_heads",
            "intermediate_size",
            "vocab_size",
            "batch_size",
            "drill_batch_size",
        ):
            _check(getattr(self, k) > 0, f"embedded.{k}", f"must be > 0, got {getattr(self, k)}")
        for k in ("pretrain_steps", "drill_steps", "train_steps", "warmup_steps", "eval_per_family"):
            _check(getattr(self, k) >= 0, f"embedded.{k}", f"must be >= 0, got {getattr(self, k)}")
        _check(
            all(w >= 0 for w in self.family_weights)
            and (not self.family_weights or sum(self.family_weights) > 0),
            "embedded.family_weights",
            f"must be non-negative with a positive sum, got {self.family_weights}",
        )
        for k in ("verdict_steps", "verdict_compare", "verdict_full", "verdict_reasoning"):
            _check(getattr(self, k) >= 0, f"embedded.{k}", f"must be >= 0, got {getattr(self, k)}")
        _check(
            self.verdict_steps == 0 or self.verdict_compare + self.verdict_full + self.verdict_reasoning > 0,
            "embedded.verdict_compare",
            "a verdict phase needs verdict_compare + verdict_full > 0 examples per step",
        )
        _check(self.verdict_lr > 0, "embedded.verdict_lr", f"must be > 0, got {self.verdict_lr}")
        _check(self.hidden_size % self.text_heads == 0, "embedded.text_heads", "must divide hidden_size")
        _check(
            (self.hidden_size // self.text_heads) % 4 == 0,
            "embedded.text_heads",
            "head_dim must be a multiple of 4 (3D rotary sections)",
        )
        _check(self.text_heads % self.kv_heads == 0, "embedded.kv_heads", "must divide text_heads")
        _check(self.vision_dim % self.vision_heads == 0, "embedded.vision_heads", "must divide vision_dim")
        _check(self.lr > 0 and self.pretrain_lr > 0, "embedded.lr", "learning rates must be > 0")
        for k in ("direct_share", "instruct_share", "instruct_after"):
            v = getattr(self, k)
            _check(0.0 <= v <= 1.0, f"embedded.{k}", f"must be a share in [0, 1], got {v}")
        _check(self.direct_weight > 0, "embedded.direct_weight", f"must be > 0, got {self.direct_weight}")
        _check(self.vocab_size >= 300, "embedded.vocab_size", "must be >= 300 (byte alphabet + specials)")


@dataclass
class GenerationConfig:
    """How the frozen teacher writes rationales (vskip_core.stages.generation)."""

    split: Split = "train"  # which split gets teacher rationales (distillation data)
    n_examples: int = (
        2000  # rationales to generate (the first N of the split; <= 1280 are distilled); 0 = all
    )
    max_new_tokens: int = 192  # cap on rationale + answer tokens
    batch_size: int = 32  # examples per generate() call
    repetition_penalty: float = (
        1.0  # every decode (also pruned, vLLM); never the checkpoint's generation_config
    )
    instruction: str = (
        ""  # appended to the user turn; hub models want e.g. "Think step by step ... Answer: X"
    )
    shard_size: int = 256  # examples per written shard (a killed run resumes at the next shard)
    keep: Literal["correct", "answered", "all"] = (
        "correct"  # which rationales go on to scoring/distillation: correct, answered (has a line), all
    )

    def validate(self) -> None:
        for k in ("n_examples",):
            _check(getattr(self, k) >= 0, f"generation.{k}", f"must be >= 0, got {getattr(self, k)}")
        for k in ("max_new_tokens", "batch_size", "shard_size"):
            _check(getattr(self, k) > 0, f"generation.{k}", f"must be > 0, got {getattr(self, k)}")
        _check(self.repetition_penalty > 0, "generation.repetition_penalty", "must be > 0 (1.0 = off)")


@dataclass
class ScoringConfig:
    """Dual scoring of rationale tokens (vskip_core.method.scoring; the key-layer default is argued there)."""

    key_layers: list[int] = field(
        default_factory=list
    )  # explicit decoder layer indices (override layer_select)
    # how the key layers are found when key_layers is empty: auto (chosen on held-out rationales by how well
    # their anchoring separates visual-attribute words, method.scoring.choose_key_layers) or band (layer_band)
    layer_select: Literal["auto", "band"] = "auto"
    select_share: float = (
        0.25  # auto: share of stage 02's rationales held out to choose layers (03 reports the rest)
    )
    layer_band: list[float] = field(
        default_factory=lambda: [0.25, 0.75]
    )  # [lo, hi] range of layer centre depth (i + 0.5) / n_layers: the band rule, and auto's fallback
    head_reduce: Literal["auto", "max", "mean"] = (
        "auto"  # max (paper) or mean over heads; auto: chosen with the layers by layer_select auto, else max
    )
    query_position: Literal["predict", "self"] = (
        "predict"  # attention row of token t: predict (the row that writes t) or self
    )
    # also score every rationale on a blank image (surprisal and anchoring): the position-free variants
    # (vskip_delta, vskip_gain) and the position analysis of notebook 02
    blank_image: bool = True
    batch_size: int = 8  # sequences per teacher-forced pass
    word_level: bool = True  # the gate uses word values (a word's tokens share one decision)
    word_surprisal: Reduce = (
        "sum"  # word surprisal from its tokens: sum (= -log p(word), chain rule), mean, max
    )
    shard_size: int = 256  # rationales per written shard (a killed run resumes at the next shard)

    def validate(self) -> None:
        _check(
            len(self.layer_band) == 2 and 0 <= self.layer_band[0] <= self.layer_band[1] <= 1,
            "scoring.layer_band",
            f"must be [lo, hi] with 0 <= lo <= hi <= 1, got {self.layer_band}",
        )
        _check(
            0 < self.select_share < 1, "scoring.select_share", f"must be in (0, 1), got {self.select_share}"
        )
        _check(all(i >= 0 for i in self.key_layers), "scoring.key_layers", "layer indices must be >= 0")
        for k in ("batch_size", "shard_size"):
            _check(getattr(self, k) > 0, f"scoring.{k}", f"must be > 0, got {getattr(self, k)}")


@dataclass
class GateConfig:
    """The union-of-saliency gate and the baselines that share its interface (vskip_core.method.gating)."""

    gamma: float = 0.5  # target retention ratio: fraction of rationale tokens kept, in (0, 1]
    threshold_mode: Literal["example", "corpus"] = (
        "example"  # example (each rationale keeps gamma) or corpus (one threshold per path)
    )
    text_share: float = 0.5  # share of the free budget the text path fills first (0 visual_only, 1 text_only)
    # how vskip's budget reaches the two thresholds: share (text_share of it to the text path first, then the
    # visual path) or symmetric (one shared percentile on both paths, lowered until gamma); method.gating
    split: Literal["share", "symmetric"] = "share"
    force_keep_answer: bool = True  # always keep the final answer line
    force_keep_digits: bool = False  # always keep digit tokens
    # gate methods notebook 03 compares: the registry's default ones (method.gating.default_methods). The hub
    # params add llmlingua2 (LLMLingua-2, a 2.2 GB download); vskip_delta, vskip_gain vary V-Skip's visual path
    methods: list[str] = field(
        default_factory=lambda: [
            "vskip",
            "text_only",
            "external_lm",
            "visual_only",
            "intersection",
            "weighted",
            "random",
            "vskip_delta",
            "vskip_gain",
        ]
    )
    gammas: list[float] = field(
        default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7, 0.9]
    )  # retention ratios of the gamma sweep
    external_dtype: Dtype = (
        "bfloat16"  # SmolLM2 scorer: 1.7x fp32 on AMX CPUs (corr 0.9998); fp32 on CPUs without bf16
    )
    # torch threads while the external scorers run (large matmuls: 1.64x at 2 threads on an idle 2-core VM with
    # OMP_WAIT_POLICY=PASSIVE, benchmarks/bench_external.py); 0 = runtime.num_threads
    external_threads: int = 2
    llmlingua2_path: str = ""  # local LLMLingua-2 folder; empty = <runtime.cache_dir>/llmlingua-2 if present
    # LLMLingua-2 when llmlingua2_path is empty and the cache holds none: a hub id, or standin:llmlingua2
    llmlingua2_model: str = "microsoft/llmlingua-2-xlm-roberta-large-meetingbank"

    def validate(self) -> None:
        _check_registered(self.methods, registry.GATES, "gate.methods")
        _check(0 < self.gamma <= 1, "gate.gamma", f"must be in (0, 1], got {self.gamma}")
        _check(0 <= self.text_share <= 1, "gate.text_share", f"must be in [0, 1], got {self.text_share}")
        _check(
            self.external_threads >= 0, "gate.external_threads", f"must be >= 0, got {self.external_threads}"
        )
        _check(
            len(self.gammas) > 0 and all(0 < g <= 1 for g in self.gammas),
            "gate.gammas",
            f"every gamma must be in (0, 1], got {self.gammas}",
        )


@dataclass
class DistillConfig:
    """LoRA / QLoRA distillation of compressed rationales into a student (vskip_core.stages.distillation).

    Defaults are for the embedded 4.9 M-parameter student on 2 CPU cores; why these values and what they were
    measured against: docs/RESULTS.md ("Distillation recipe on the embedded student")."""

    student: str = "embedded"  # student base model: embedded (the teacher's weights) or a hub id / local dir
    methods: list[str] = field(
        default_factory=lambda: ["vskip", "text_only", "external_lm"]
    )  # gate methods, one student each (the full-rationale control `full` is always added); also e.g.
    # visual_only, random (stage 03 compares every method at the gate level)
    ratios: list[float] = field(
        default_factory=lambda: [0.9, 0.7, 0.5, 0.3]
    )  # one drawn per example; 1.0 (the full rationale) is the `full` control's (hub params add it back)
    # where `Keep <r> of the reasoning.` goes: after the question (TokenSkip), before it, or as the assistant
    # turn's first line (answer_start: a prefill the student reads and never writes)
    ratio_position: Literal["question_end", "turn_start", "answer_start"] = "question_end"
    student_per_ratio: bool = True  # one student per (method, ratio), trained at that ratio alone (the 4.8 M
    # student follows a ratio only so: docs/RESULTS.md, issue 33); false = one ratio-conditioned student per
    # method, the ratio drawn per example (TokenSkip; the hub params, whose models condition on it)
    ratios_per_example: int = 1  # each kept rationale is a target at this many of `ratios` (its draw and the
    # next ones; >= len(ratios) = all): the same example at several lengths
    max_examples: int = 0  # > 0 caps the training set (the first N kept rationales, by id); 0 = all
    quantization: Quantization = "none"  # none or nf4 (QLoRA: student base in 4-bit through bitsandbytes)
    lora_r: int = 32  # LoRA rank
    lora_alpha: int = 64  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.0  # LoRA dropout (none: under one epoch per student, and 10% faster on CPU)
    target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"]
    )  # linear layers of the language model's decoder layers, by name; ["all-linear"] = all of them (the
    # embedded 4.8 M student needs the MLPs too; hub params keep the paper's q/k/v/o)
    lr: float = 5e-3  # peak learning rate (linear warm-up, cosine decay)
    warmup_steps: int = 10  # linear warm-up steps
    epochs: float = 2.0  # passes over the training set (when max_steps is 0)
    batch_size: int = 8  # per-device batch size (8: a student of one ratio follows it at half the cost of 16)
    grad_accum: int = 1  # gradient accumulation steps
    max_steps: int = 160  # > 0 fixes the optimizer steps per student (the shared budget); 0 = use epochs
    workers: int = 2  # students trained side by side on CPU, one process each (a GPU trains one at a time)
    logging_steps: int = 5  # loss logged every N steps (and at step 1)
    save_steps: int = 20  # checkpoint every N steps (a killed run resumes from the last one)
    gradient_checkpointing: bool = False  # recompute activations in backward (on for 2B+ models on a T4)
    attn_implementation: Attention = (
        "sdpa"  # language-model attention in training (sdpa: no maps needed, faster)
    )

    def validate(self) -> None:
        _check(len(self.methods) > 0, "distill.methods", "must name at least one gate method")
        _check_registered(self.methods, registry.GATES, "distill.methods")
        _check(
            len(self.ratios) > 0 and all(0 < r <= 1 for r in self.ratios),
            "distill.ratios",
            f"every ratio must be in (0, 1] (1.0 = the full rationale), got {self.ratios}",
        )
        for k in (
            "lora_r",
            "lora_alpha",
            "batch_size",
            "grad_accum",
            "logging_steps",
            "save_steps",
            "workers",
        ):
            _check(getattr(self, k) > 0, f"distill.{k}", f"must be > 0, got {getattr(self, k)}")
        for k in ("max_examples", "max_steps", "warmup_steps"):
            _check(getattr(self, k) >= 0, f"distill.{k}", f"must be >= 0, got {getattr(self, k)}")
        _check(
            self.ratios_per_example >= 1, "distill.ratios_per_example", "must be >= 1 (1 = one ratio each)"
        )
        _check(
            0 <= self.lora_dropout < 1, "distill.lora_dropout", f"must be in [0, 1), got {self.lora_dropout}"
        )
        _check(self.lr > 0, "distill.lr", f"must be > 0, got {self.lr}")
        _check(self.epochs > 0, "distill.epochs", f"must be > 0, got {self.epochs}")
        _check(len(self.target_modules) > 0, "distill.target_modules", "must name at least one module")


@dataclass
class EvalConfig:
    """Evaluation of teacher, baselines and students (vskip_core.stages.evaluation)."""

    split: Split = "test"  # evaluation split
    n_examples: int = 416  # examples of the main rows (families rotate: 104 each, one < 0.01); 0 = the split
    ratios: list[float] = field(default_factory=lambda: [0.9, 0.7, 0.5, 0.3])  # student ratios evaluated
    main_ratio: float = 0.5  # the students' ratio evaluated on all n_examples (the claims' rows)
    sweep_examples: int = 240  # the other ratios: the first N of the same examples (paired); 0 = all
    latency_examples: int = 10  # examples timed at batch 1 (after one warm-up) for latency
    batch_size: int = 32  # generation batch for accuracy runs

    def validate(self) -> None:
        _check(self.n_examples >= 0 and self.latency_examples >= 0, "eval.n_examples", "must be >= 0")
        _check(
            all(0 < r <= 1 for r in self.ratios),
            "eval.ratios",
            f"every ratio must be in (0, 1], got {self.ratios}",
        )
        _check(self.sweep_examples >= 0, "eval.sweep_examples", f"must be >= 0, got {self.sweep_examples}")
        _check(
            self.main_ratio in self.ratios,
            "eval.main_ratio",
            f"must be one of eval.ratios {self.ratios}, got {self.main_ratio}",
        )


@dataclass
class PruneConfig:
    """Visual-token pruning: FastV, DivPrune, prompt-aware relevance + diversity, and DSTP (vskip_core.method.pruning).

    The exact rules (and which layers each prunes) are in the vskip_core.method.pruning docstring."""

    methods: list[str] = field(
        default_factory=lambda: ["fastv", "divprune", "zspaprune"]
    )  # base pruners compared (registry.PRUNERS), each also with +dstp
    retentions: list[float] = field(
        default_factory=lambda: [0.666, 0.333, 0.111]
    )  # fraction of visual tokens kept: k = max(1, round(retention * n_visual))
    fastv_layer: int = 2  # FastV's K: layers < K see every visual token, layer K-1's attention ranks them
    # DSTP / RVIS: the layer whose attention ranks visual tokens while decoding; -1 = as score_from says:
    # key_layers = stage 02's best single layer on its held-out rationales (chosen from data, so it follows the
    # model's depth), or fastv = FastV's K - 1 (its ranking layer)
    score_layer: int = -1
    score_from: Literal["key_layers", "fastv"] = "key_layers"
    core_fraction: float = 0.6  # prompt-aware: share of the budget chosen by relevance (rest by diversity)
    dstp_interval: int = 4  # DSTP: re-select visual tokens every this many decoding steps (docs/RESULTS.md)
    dstp_shift_threshold: float = 0.0  # DSTP: also re-select when the host's new set overlaps the one in use
    # by less than this (0: never; periodic re-selection every 4 steps matched every trigger tried, at a quarter
    # of the re-selections of every step: benchmarks/probe_dstp_trigger.py)
    dstp_window: int = 4  # DSTP, prompt-aware host: the last N decoded tokens' embeddings are the state
    dstp_state: Literal["decoded", "prompt+decoded"] = (
        "prompt+decoded"  # DSTP, prompt-aware host: the decoded tokens alone, or averaged with the prompt
    )
    variant: Literal["drop", "mask"] = (
        "drop"  # drop (sequence and KV cache really shorten) or mask (full length, keys masked)
    )
    n_examples: int = 416  # teacher grid's examples (families rotate: 104 each); 0 = the whole eval.split
    student_examples: int = 120  # the V-Skip student's grid: the first N of them (0 = all n_examples)
    batch_size: int = 32  # examples per pruned greedy-decoding batch (accuracy runs)
    latency_examples: int = 4  # examples timed at batch 1 (after one warm-up) per method and retention
    student_ratio: float = 0.5  # the compression ratio the student is asked for (distill.ratio_prompt)

    def validate(self) -> None:
        _check_registered(self.methods, registry.PRUNERS, "prune.methods")
        _check(
            len(self.retentions) > 0 and all(0 < r <= 1 for r in self.retentions),
            "prune.retentions",
            f"every retention must be in (0, 1] (fraction of visual tokens kept), got {self.retentions}",
        )
        _check(
            0 <= self.core_fraction <= 1,
            "prune.core_fraction",
            f"must be in [0, 1], got {self.core_fraction}",
        )
        _check(
            self.fastv_layer >= 1,
            "prune.fastv_layer",
            f"must be >= 1 (layer K-1 ranks the visual tokens), got {self.fastv_layer}",
        )
        _check(self.score_layer >= -1, "prune.score_layer", f"must be >= -1, got {self.score_layer}")
        _check(self.dstp_interval > 0, "prune.dstp_interval", f"must be > 0, got {self.dstp_interval}")
        _check(self.dstp_window > 0, "prune.dstp_window", f"must be > 0, got {self.dstp_window}")
        _check(
            0 <= self.dstp_shift_threshold <= 1,
            "prune.dstp_shift_threshold",
            f"must be in [0, 1] (a Jaccard overlap), got {self.dstp_shift_threshold}",
        )
        for k in ("n_examples", "student_examples", "latency_examples"):
            _check(getattr(self, k) >= 0, f"prune.{k}", f"must be >= 0, got {getattr(self, k)}")
        _check(self.batch_size > 0, "prune.batch_size", f"must be > 0, got {self.batch_size}")
        _check(
            0 < self.student_ratio <= 1, "prune.student_ratio", f"must be in (0, 1], got {self.student_ratio}"
        )


@dataclass
class RuntimeConfig:
    seed: int = 0  # seed for torch / numpy / random through vskip_core.runtime.seed_everything
    device: str = "auto"  # auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:N, mps
    # torch CPU threads; 0 keeps torch's default. 1: on small shared CPUs (2 vCPUs, CI, Colab's CPU runtime) a
    # second OpenMP thread spin-waits against other processes (docs/TEACHER.md); set 0 on a workstation.
    num_threads: int = 1
    results_dir: str = "results"  # run outputs: results/<run>/<stage>/ (relative to the repository root)
    cache_dir: str = ".cache"  # trained teachers and generated datasets, keyed by a hash of their params

    def validate(self) -> None:
        _check(self.num_threads >= 0, "runtime.num_threads", f"must be >= 0, got {self.num_threads}")
        _check(
            self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
            "runtime.device",
            f"unknown device {self.device!r}",
        )


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    source: str = ""  # the params file this config was read from (set by load_params)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(v):
                _check_choices(v, f.name)
                v.validate()
        fw = self.embedded.family_weights
        _check(
            not fw or len(fw) == len(self.data.families),
            "embedded.family_weights",
            f"needs one weight per family in data.families {self.data.families}, got {fw}",
        )
        _check(
            self.embedded.verdict_reasoning == 0 or self.data.multistep_rationale != "list",
            "embedded.verdict_reasoning",
            "reasoning drills train the decisions of a multi-step design, and `list` has none; set "
            f"data.multistep_rationale: {', '.join(d for d in typing.get_args(MultistepDesign) if d != 'list')}, "
            "or embedded.verdict_reasoning: 0",
        )
        g = self.generation
        split_size = self.split_size(g.split)
        _check(
            g.n_examples <= split_size,
            "generation.n_examples",
            f"asks for {g.n_examples} rationales but the {g.split} split (data.n_{g.split}) has {split_size} "
            f"examples; lower generation.n_examples, or set it to 0 for the whole split",
        )

    def split_size(self, split: str) -> int:
        """Examples in a split of the configured benchmark (data.n_train / n_val / n_test)."""
        return {"train": self.data.n_train, "val": self.data.n_val, "test": self.data.n_test}[split]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self, *sections: str) -> str:
        """Short stable hash of the given sections (all when none), used to key caches and resume."""
        d = self.to_dict()
        d.pop("source", None)
        for (section, key), neutral in HASH_NEUTRAL.items():
            if d[section][key] == neutral:
                del d[section][key]
        if sections:
            d = {k: d[k] for k in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def path(self, p: str | os.PathLike) -> Path:
        """Resolve a path from params relative to the repository root (never the current directory)."""
        p = Path(p)
        return p if p.is_absolute() else REPO_ROOT / p


# Fields added after caches were keyed on their sections: at these values they change nothing, so they are
# left out of `Config.hash` and the teachers and datasets already built stay valid.
HASH_NEUTRAL: dict[tuple[str, str], Any] = {
    ("data", "multistep_rationale"): "list",
    ("embedded", "verdict_reasoning"): 0,
    ("embedded", "reasoning_presence"): True,
    ("embedded", "direct_share"): 0.0,
    ("embedded", "direct_weight"): 3.0,
    ("embedded", "instruct_share"): 0.0,
    ("embedded", "instruct_after"): 0.5,
    ("embedded", "instruct_reasoning"): False,
}


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ParamsError(f"{key}: {msg}")


def _check_registered(names: list[str], reg: registry.Registry, key: str) -> None:
    """Every name is registered in `reg`. Checked once the registry holds entries: the built-ins register when
    `vskip_core.method.gating` / `.pruning` is imported, which every stage and the pipeline do first."""
    if not len(reg):
        return
    valid = list(reg.names())
    for i, name in enumerate(names):
        if name not in reg:
            near = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ParamsError(
                f"{key}[{i}]: must be one of the registered {reg.kind}s {valid}, got {name!r}{hint} "
                f"(to add one: {reg.how_to_add})"
            )


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats. Raise ParamsError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, key)
            except ParamsError as e:
                errors.append(str(e))
        raise ParamsError(f"{key}: expected {tp}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        valid = list(typing.get_args(tp))
        if isinstance(value, str) and value in valid:
            return value
        why = f" ({_CHOICE_NOTES[key]})" if key in _CHOICE_NOTES else ""
        near = difflib.get_close_matches(str(value), valid, n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ParamsError(f"{key}: must be one of {valid}{why}, got {value!r}{hint}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (
        tp is float
        and isinstance(value, str)
        and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", value.strip())
    ):
        return float(value)  # YAML 1.1 reads 1e-2 (no dot) as a string
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ParamsError(
        f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r} ({type(value).__name__})"
    )


def _check_choices(section: Any, name: str) -> None:
    """The `Literal[...]` fields of a section (also inside lists) hold one of their values, however the config
    was built (load_params checks them on the way in; a config built in code is checked here)."""
    for k, tp in _section_types(type(section)).items():
        if Literal in (typing.get_origin(tp), *map(typing.get_origin, typing.get_args(tp))):
            _coerce(getattr(section, k), tp, f"{name}.{k}")


def _nearest(name: str, valid: list[str]) -> str:
    m = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f"; did you mean {m[0]!r}?" if m else f"; valid keys: {sorted(valid)}"


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.exists():
        raise ParamsError(f"params file {path} does not exist; pass one of {sorted(_params_files())}")
    if path in seen:
        raise ParamsError(f"params file {path}: circular `extends:` chain {[str(p) for p in seen]}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"params file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"params file {path} must hold a mapping of sections, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    ppath = Path(parent)
    if not ppath.is_absolute():
        ppath = (path.parent / ppath) if (path.parent / ppath).exists() else REPO_ROOT / ppath
    return _deep_merge(_read_yaml(ppath.resolve(), seen + (path,)), raw)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _params_files() -> list[str]:
    d = REPO_ROOT / "params"
    return [str(p.relative_to(REPO_ROOT)) for p in d.glob("*.yaml")] if d.exists() else []


def _parse_override_value(v: Any) -> Any:
    """`--set key=value` strings are parsed as YAML scalars/lists; non-strings pass through."""
    if isinstance(v, str):
        try:
            return yaml.safe_load(v)
        except yaml.YAMLError:
            return v
    return v


def resolve_notebook_args(params_file: str, run: str) -> tuple[str, str]:
    """Apply VSKIP_PARAMS / VSKIP_RUN when a notebook still carries its defaults (how nbval runs smoke)."""
    if params_file == DEFAULT_PARAMS and os.environ.get(ENV_PARAMS):
        params_file = os.environ[ENV_PARAMS]
    if run == "default" and os.environ.get(ENV_RUN):
        run = os.environ[ENV_RUN]
    return params_file, run


def load_params(path: str | os.PathLike = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Config:
    """Read a params YAML (following `extends:`), apply dotted overrides, type-check and validate."""
    p = Path(path)
    p = p if p.is_absolute() else REPO_ROOT / p
    tree = _read_yaml(p.resolve())
    tree.pop("source", None)  # a run's params.json (Config.to_dict) names the file it was read from
    for key, value in (overrides or {}).items():
        parts = key.split(".")
        if len(parts) != 2:
            raise ParamsError(f"override {key!r}: use section.field, for example 'gate.gamma'")
        tree.setdefault(parts[0], {})
        if not isinstance(tree[parts[0]], dict):
            raise ParamsError(f"{parts[0]}: must be a mapping")
        tree[parts[0]][parts[1]] = _parse_override_value(value)

    sections = {f.name: f for f in dataclasses.fields(Config) if f.name != "source"}
    cfg = Config(source=str(path))
    for sname, body in tree.items():
        if sname not in sections:
            raise ParamsError(f"unknown section {sname!r}{_nearest(sname, list(sections))}")
        if not isinstance(body, dict):
            raise ParamsError(f"{sname}: must be a mapping of fields, got {body!r}")
        section = getattr(cfg, sname)
        hints = _section_types(type(section))
        valid = [f.name for f in dataclasses.fields(section)]
        for k, v in body.items():
            if f"{sname}.{k}" in REMOVED_KEYS:
                raise ParamsError(f"{sname}.{k} was removed; use {REMOVED_KEYS[f'{sname}.{k}']}")
            if k not in valid:
                raise ParamsError(f"unknown key {sname}.{k}{_nearest(k, valid)}")
            setattr(section, k, _coerce(v, hints[k], f"{sname}.{k}"))
    cfg.validate()
    return cfg
