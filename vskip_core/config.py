"""Typed parameters for every stage, loaded from YAML with `extends:`, dotted overrides and loud validation.

Order of precedence: dataclass defaults < YAML file (and the files it extends) < overrides.
Unknown keys, wrong types and out-of-range values raise `ParamsError`, which names the key and, for a
misspelling, the nearest valid key. Nothing is silently ignored.

    cfg = load_params("params/default.yaml", {"gate.gamma": 0.5})
    cfg.gate.gamma  # 0.5
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS = "params/default.yaml"
# nbval executes the committed notebooks as they are; these variables redirect a notebook that still has
# its default `params_file` / `run` (papermill runs always pass both explicitly).
ENV_PARAMS = "VSKIP_PARAMS"
ENV_RUN = "VSKIP_RUN"

FAMILIES = ("attribute", "existence", "reading", "multistep")


class ParamsError(ValueError):
    """A parameter file or override is invalid; the message names the key and the fix."""


@dataclass
class DataConfig:
    seed: int = 20260122  # base seed; each split derives its own seed from it, so splits are disjoint
    image_size: int = 112  # square image side in pixels; a multiple of 28 (patch 14 x merge 2)
    grid: int = 2  # scenes are grid x grid cells, at most one object per cell
    min_objects: int = 2  # fewest objects in a scene
    max_objects: int = 4  # most objects in a scene (capped at grid * grid)
    families: list[str] = field(default_factory=lambda: list(FAMILIES))  # task families, in rotation
    n_train: int = 4000  # examples in the train split (rationale generation + distillation)
    n_val: int = 400  # examples in the validation split
    n_test: int = 800  # examples in the test split (all evaluation)

    def validate(self) -> None:
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
        for f in self.families:
            _check(f in FAMILIES, "data.families", f"unknown family {f!r}; valid: {list(FAMILIES)}")
        _check(len(self.families) > 0, "data.families", "must name at least one family")
        for k in ("n_train", "n_val", "n_test"):
            _check(getattr(self, k) >= 0, f"data.{k}", f"must be >= 0, got {getattr(self, k)}")


@dataclass
class ModelConfig:
    teacher: str = "embedded"  # "embedded" (built in-repo) or a hub id / local model directory
    family: str = "auto"  # model adapter: auto (from the checkpoint's config), qwen2_vl, qwen2_5_vl, mllama
    dtype: str = "auto"  # auto (bf16 if supported, else fp16 on GPU, fp32 on CPU), float32, bfloat16, float16
    quantization: str = "none"  # none or nf4 (4-bit through bitsandbytes)
    attn_implementation: str = "eager"  # eager exposes attention weights; sdpa is faster but returns none

    def validate(self) -> None:
        _check(
            self.family in ("auto", "qwen2_vl", "qwen2_5_vl", "mllama"),
            "model.family",
            f"unknown family {self.family!r}",
        )
        _check(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            "model.dtype",
            f"unknown dtype {self.dtype!r}",
        )
        _check(
            self.quantization in ("none", "nf4"),
            "model.quantization",
            f"must be none or nf4, got {self.quantization!r}",
        )
        _check(
            self.attn_implementation in ("eager", "sdpa"),
            "model.attn_implementation",
            f"must be eager or sdpa, got {self.attn_implementation!r}",
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
    pretrain_steps: int = 300  # vision-tower pretraining steps on dense per-token scene labels
    pretrain_lr: float = 2e-3  # learning rate of the vision pretraining
    train_steps: int = 1500  # end-to-end steps on question + rationale + answer
    batch_size: int = 16  # examples per step
    lr: float = 1.5e-3  # peak learning rate of the language side (cosine decay, warm-up below)
    warmup_steps: int = 60  # linear warm-up steps
    vision_lr_mult: float = 0.1  # vision-tower lr as a fraction of lr during end-to-end training
    anchor_weight: float = 3.0  # loss weight on tokens inside visual-anchor spans and the answer
    eval_per_family: int = 200  # held-out test examples per family for the teacher's report

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
        ):
            _check(getattr(self, k) > 0, f"embedded.{k}", f"must be > 0, got {getattr(self, k)}")
        for k in ("pretrain_steps", "train_steps", "warmup_steps", "eval_per_family"):
            _check(getattr(self, k) >= 0, f"embedded.{k}", f"must be >= 0, got {getattr(self, k)}")
        _check(self.hidden_size % self.text_heads == 0, "embedded.text_heads", "must divide hidden_size")
        _check(
            (self.hidden_size // self.text_heads) % 4 == 0,
            "embedded.text_heads",
            "head_dim must be a multiple of 4 (3D rotary sections)",
        )
        _check(self.text_heads % self.kv_heads == 0, "embedded.kv_heads", "must divide text_heads")
        _check(self.vision_dim % self.vision_heads == 0, "embedded.vision_heads", "must divide vision_dim")
        _check(self.lr > 0 and self.pretrain_lr > 0, "embedded.lr", "learning rates must be > 0")
        _check(self.vocab_size >= 300, "embedded.vocab_size", "must be >= 300 (byte alphabet + specials)")


@dataclass
class GenerationConfig:
    """How the frozen teacher writes rationales (vskip_core.generation)."""

    split: str = "train"  # which split gets teacher rationales (distillation data)
    n_examples: int = 0  # rationales to generate; 0 = the whole split
    max_new_tokens: int = 192  # cap on rationale + answer tokens
    batch_size: int = 32  # examples per generate() call
    do_sample: bool = False  # greedy by default; sampling uses temperature / top_p
    temperature: float = 0.7  # sampling temperature (do_sample only)
    top_p: float = 0.95  # nucleus sampling (do_sample only)
    instruction: str = (
        ""  # appended to the user turn; hub models want e.g. "Think step by step ... Answer: X"
    )
    shard_size: int = 256  # examples per written shard (a killed run resumes at the next shard)
    keep: str = (
        "correct"  # which rationales go on to scoring/distillation: correct, answered (has a line), all
    )

    def validate(self) -> None:
        _check(self.split in ("train", "val", "test"), "generation.split", f"unknown split {self.split!r}")
        for k in ("n_examples",):
            _check(getattr(self, k) >= 0, f"generation.{k}", f"must be >= 0, got {getattr(self, k)}")
        for k in ("max_new_tokens", "batch_size", "shard_size"):
            _check(getattr(self, k) > 0, f"generation.{k}", f"must be > 0, got {getattr(self, k)}")
        _check(self.temperature > 0, "generation.temperature", "must be > 0")
        _check(
            self.keep in ("correct", "answered", "all"),
            "generation.keep",
            f"must be correct, answered or all, got {self.keep!r}",
        )
        _check(0 < self.top_p <= 1, "generation.top_p", "must be in (0, 1]")


@dataclass
class ScoringConfig:
    """Dual scoring of rationale tokens (vskip_core.scoring)."""

    key_layers: list[int] = field(
        default_factory=list
    )  # explicit decoder layer indices; empty = use layer_band
    layer_band: list[float] = field(
        default_factory=lambda: [0.25, 0.75]
    )  # depth-fraction range [lo, hi] of layers
    head_reduce: str = "max"  # reduce heads by max (paper) or mean
    surprisal_without_image: bool = False  # also score surprisal with a blank image (analysis only)
    batch_size: int = 8  # sequences per teacher-forced pass
    word_level: bool = True  # aggregate scores to words so a word's tokens share one decision

    def validate(self) -> None:
        _check(
            self.head_reduce in ("max", "mean"),
            "scoring.head_reduce",
            f"must be max or mean, got {self.head_reduce!r}",
        )
        _check(
            len(self.layer_band) == 2 and 0 <= self.layer_band[0] <= self.layer_band[1] <= 1,
            "scoring.layer_band",
            f"must be [lo, hi] with 0 <= lo <= hi <= 1, got {self.layer_band}",
        )
        _check(all(i >= 0 for i in self.key_layers), "scoring.key_layers", "layer indices must be >= 0")
        _check(self.batch_size > 0, "scoring.batch_size", f"must be > 0, got {self.batch_size}")


@dataclass
class GateConfig:
    """The union-of-saliency gate and the baselines that share its interface (vskip_core.gating)."""

    gamma: float = 0.5  # target retention ratio: fraction of rationale tokens kept, in (0, 1]
    threshold_mode: str = "example"  # example (a quantile per rationale) or corpus (one quantile overall)
    text_share: float = 0.5  # share of the keep budget filled by the text path before the union
    force_keep_answer: bool = True  # always keep the final answer line
    force_keep_digits: bool = False  # always keep digit tokens

    def validate(self) -> None:
        _check(0 < self.gamma <= 1, "gate.gamma", f"must be in (0, 1], got {self.gamma}")
        _check(
            self.threshold_mode in ("example", "corpus"),
            "gate.threshold_mode",
            f"must be example or corpus, got {self.threshold_mode!r}",
        )
        _check(0 <= self.text_share <= 1, "gate.text_share", f"must be in [0, 1], got {self.text_share}")


@dataclass
class DistillConfig:
    """LoRA / QLoRA distillation of compressed rationales into a student (vskip_core.distill)."""

    student: str = "embedded"  # student base model: embedded (the teacher's weights) or a hub id / local dir
    methods: list[str] = field(
        default_factory=lambda: ["vskip", "text_only", "external_lm", "visual_only", "random"]
    )
    ratios: list[float] = field(default_factory=lambda: [1.0, 0.9, 0.7, 0.5, 0.3])  # one drawn per example
    quantization: str = "none"  # none or nf4 (QLoRA through bitsandbytes)
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling numerator
    lora_dropout: float = 0.05  # LoRA dropout
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lr: float = 1e-3  # learning rate
    epochs: float = 2.0  # passes over the training set
    batch_size: int = 16  # per-device batch size
    grad_accum: int = 1  # gradient accumulation steps
    max_steps: int = 0  # > 0 caps the steps (overrides epochs)

    def validate(self) -> None:
        _check(
            len(self.ratios) > 0 and all(0 < r <= 1 for r in self.ratios),
            "distill.ratios",
            f"every ratio must be in (0, 1], got {self.ratios}",
        )
        _check(
            self.quantization in ("none", "nf4"),
            "distill.quantization",
            f"must be none or nf4, got {self.quantization!r}",
        )
        for k in ("lora_r", "lora_alpha", "batch_size", "grad_accum"):
            _check(getattr(self, k) > 0, f"distill.{k}", f"must be > 0, got {getattr(self, k)}")
        _check(
            self.lr > 0 and self.epochs > 0 and self.max_steps >= 0, "distill.lr", "lr, epochs must be > 0"
        )
        _check(len(self.target_modules) > 0, "distill.target_modules", "must name at least one module")


@dataclass
class EvalConfig:
    """Evaluation of teacher, baselines and students (vskip_core.evaluation)."""

    split: str = "test"  # evaluation split
    n_examples: int = 400  # examples evaluated (families rotate, so n/4 each); 0 = the whole split
    ratios: list[float] = field(default_factory=lambda: [0.9, 0.7, 0.5, 0.3])  # student ratios evaluated
    latency_examples: int = 20  # examples timed at batch 1 (after one warm-up) for latency
    batch_size: int = 32  # generation batch for accuracy runs
    seed: int = 0  # seed of the MMMU random-choice fallback

    def validate(self) -> None:
        _check(self.split in ("train", "val", "test"), "eval.split", f"unknown split {self.split!r}")
        _check(self.n_examples >= 0 and self.latency_examples >= 0, "eval.n_examples", "must be >= 0")
        _check(
            all(0 < r <= 1 for r in self.ratios),
            "eval.ratios",
            f"every ratio must be in (0, 1], got {self.ratios}",
        )


@dataclass
class PruneConfig:
    """Visual-token pruning: FastV, DivPrune, prompt-aware relevance + diversity, and DSTP (vskip_core.visual_tokens)."""

    methods: list[str] = field(default_factory=lambda: ["fastv", "divprune", "zspaprune"])
    retentions: list[float] = field(
        default_factory=lambda: [0.666, 0.333, 0.111]
    )  # fraction of visual tokens kept
    fastv_layer: int = 2  # FastV: prune after this decoder layer (K)
    core_fraction: float = 0.6  # prompt-aware: share of the budget chosen by relevance (rest by diversity)
    dstp_interval: int = 8  # DSTP: re-select visual tokens every this many decoding steps
    dstp_shift_threshold: float = 0.5  # DSTP: also re-select when top-k Jaccard overlap drops below this
    n_examples: int = 200  # evaluation examples
    image_size: int = 0  # > 0 renders benchmark images at this size for the timing benchmark

    def validate(self) -> None:
        _check(
            all(0 < r <= 1 for r in self.retentions),
            "prune.retentions",
            f"must be in (0, 1], got {self.retentions}",
        )
        _check(
            0 <= self.core_fraction <= 1,
            "prune.core_fraction",
            f"must be in [0, 1], got {self.core_fraction}",
        )
        _check(
            self.fastv_layer >= 0 and self.dstp_interval > 0,
            "prune.fastv_layer",
            "must be >= 0 (interval > 0)",
        )


@dataclass
class RuntimeConfig:
    seed: int = 0  # seed for torch / numpy / random through vskip_core.runtime.seed_everything
    device: str = "auto"  # auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:N, mps
    num_threads: int = 0  # torch CPU threads; 0 keeps torch's default
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
                v.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self, *sections: str) -> str:
        """Short stable hash of the given sections (all when none), used to key caches and resume."""
        d = self.to_dict()
        d.pop("source", None)
        if sections:
            d = {k: d[k] for k in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def path(self, p: str | os.PathLike) -> Path:
        """Resolve a path from params relative to the repository root (never the current directory)."""
        p = Path(p)
        return p if p.is_absolute() else REPO_ROOT / p


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ParamsError(f"{key}: {msg}")


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
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ParamsError(
        f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r} ({type(value).__name__})"
    )


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
            if k not in valid:
                raise ParamsError(f"unknown key {sname}.{k}{_nearest(k, valid)}")
            setattr(section, k, _coerce(v, hints[k], f"{sname}.{k}"))
    cfg.validate()
    return cfg
