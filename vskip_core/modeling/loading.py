"""One loading layer for teachers and students, and one encoder from example to model inputs.

    model, tok, proc = load_model(cfg)                 # embedded teacher (built and cached) or a hub id
    batch = collate([encode(ex, tok, proc, target=ex["rationale"])], tok.pad_token_id)

`encode` builds exactly what Qwen2-VL's processor builds: the chat prompt from the tokenizer's own chat
template, `<|image_pad|>` expanded to prod(image_grid_thw) // merge_size**2 tokens, `mm_token_type_ids`
(1 at image-pad positions; required by transformers 5.x for the 3D rotary positions), `pixel_values` and
`image_grid_thw` from the image processor. It also returns what later stages need and the processor does
not: the image-token positions and the span of the target (rationale) tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vskip_core.config import Config
from vskip_core.data.embedded import GENERATOR_VERSION
from vskip_core.modeling.adapters import (
    ADAPTERS,
    adapter_for,
    adapter_for_item,
    adapter_for_tokenizer,
    detect_family,
    get_adapter,
)
from vskip_core.modeling.prompts import (  # noqa: F401  (re-exported: the embedded teacher's text side)
    ANSWER_PREFIX,
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    SPECIAL_TOKENS,
    n_image_tokens,
    train_tokenizer,
    user_text,
)
from vskip_core.modeling.standins import resolve


def prompt_text(
    ex: dict[str, Any], tok, instruction: str = "", prefix: str = "", assistant_prefill: str = ""
) -> str:
    """The chat prompt up to the assistant turn (and `assistant_prefill`, its first words); `prefix` is put in
    the user turn before the question. Built by the tokenizer's family adapter
    (`vskip_core.modeling.adapters`): images first, or in place of MMMU's `<image N>` placeholders."""

    return adapter_for_tokenizer(tok).prompt_text(ex, tok, instruction, prefix) + assistant_prefill


# ----------------------------------------------------------------------------------------------- encode
def image_processor_for(cfg: Config):
    """Qwen2-VL's PIL image processor pinned to the benchmark's image size (no resize on our images)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    px = cfg.data.image_size**2
    return Qwen2VLImageProcessorPil(min_pixels=px, max_pixels=px)


def encode(
    ex: dict[str, Any],
    tok,
    proc,
    target: str | None = None,
    instruction: str = "",
    prefix: str = "",
    image=None,
    assistant_prefill: str = "",
) -> dict[str, Any]:
    """One example -> model inputs. With `target`, the target tokens and the end-of-turn token are appended and
    `target_start` marks where they begin (labels = input_ids from there on). `assistant_prefill` starts the
    assistant turn as prompt (before the target, no labels). The family adapter of `proc` does the work
    (`vskip_core.modeling.adapters`): for Qwen2-VL / Qwen2.5-VL exactly what Qwen2VLProcessor builds plus
    `image_positions`; for Mllama what MllamaProcessor builds (cross_attention_mask, aspect ratios)."""

    ad = adapter_for(proc)
    if not assistant_prefill:
        return ad.encode(ex, tok, proc, target=target, instruction=instruction, prefix=prefix, image=image)
    pre = tok(assistant_prefill, add_special_tokens=False)["input_ids"]
    if target is None:
        item = ad.encode(ex, tok, proc, instruction=instruction, prefix=prefix, image=image)
        return ad.append_tokens(item, torch.tensor(pre, dtype=torch.long))
    item = ad.encode(
        ex, tok, proc, target=assistant_prefill + target, instruction=instruction, prefix=prefix, image=image
    )
    item["target_start"] += len(pre)
    return item


def collate(items: list[dict[str, Any]], pad_id: int, padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Pad a list of `encode` outputs. Left padding for generation, right for training. `offsets` is the
    shift each row got (add it to that row's positions)."""

    return adapter_for_item(items[0]).collate(items, pad_id, padding_side)


def model_inputs(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """The batch's model inputs (every registered family's `input_keys` it holds) on `device`."""
    keys = dict.fromkeys(k for ad in ADAPTERS.values() for k in ad.input_keys)
    return {k: batch[k].to(device) for k in keys if k in batch}


# ------------------------------------------------------------------------------------------ embedded model
def embedded_config(cfg: Config, tok):
    from transformers import Qwen2VLConfig

    e = cfg.embedded
    head_dim = e.hidden_size // e.text_heads
    q = head_dim // 4  # mrope sections (temporal, height, width) must sum to head_dim / 2
    text = {
        "vocab_size": len(tok),
        "hidden_size": e.hidden_size,
        "intermediate_size": e.intermediate_size,
        "num_hidden_layers": e.text_layers,
        "num_attention_heads": e.text_heads,
        "num_key_value_heads": e.kv_heads,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [head_dim // 2 - 2 * q, q, q],
        },
        "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tok.pad_token_id,
    }
    vision = {
        "depth": e.vision_depth,
        "embed_dim": e.vision_dim,
        "hidden_size": e.hidden_size,
        "num_heads": e.vision_heads,
        "mlp_ratio": 4,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    conf = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    conf._attn_implementation = cfg.model.attn_implementation
    return conf


def embedded_dir(cfg: Config) -> Path:
    """Cache folder of the embedded teacher, keyed by its architecture/recipe and the data params."""

    return cfg.path(cfg.runtime.cache_dir) / f"teacher-{cfg.hash('embedded', 'data')}-g{GENERATOR_VERSION}"


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    processor: Any
    family: str
    path: str

    @property
    def adapter(self):
        """The family adapter (`vskip_core.modeling.adapters`): prompts, encoding, key layers, image keys, LoRA targets."""

        return get_adapter(self.family)


def load_model(
    cfg: Config, name_or_path: str | None = None, device: str | None = None, quantization: str | None = None
) -> Loaded:
    """Load a teacher/student: 'embedded' (must already be built: `vskip_core.teacher.build_teacher`), a local
    directory, or a hub id, through its family adapter (`model.family`, or the checkpoint's model_type). Eager
    attention in the language model by default so attention maps exist; `quantization` (default
    `model.quantization`) "nf4" loads it in 4-bit."""

    name = name_or_path or cfg.model.teacher
    declared = cfg.model.family if name == cfg.model.teacher and name != "embedded" else "auto"
    name = resolve(cfg, name)
    path = embedded_dir(cfg) if name == "embedded" else Path(name)
    if name == "embedded" and not (path / "config.json").exists():
        raise FileNotFoundError(
            f"the embedded teacher is not built yet ({path}); run notebook "
            f"00_embedded_teacher or vskip_core.teacher.build_teacher(cfg)"
        )
    src = str(path) if path.exists() else name
    family = detect_family(src, declared)
    ad = get_adapter(family)
    model, tok = ad.load(cfg, src, device=device, quantization=quantization)
    proc = image_processor_for(cfg) if name == "embedded" else ad.image_processor(src, cfg)
    return Loaded(model=model, tokenizer=tok, processor=proc, family=family, path=src)


def _hub_image_processor(src: str, cfg: Config | None = None):
    """The image processor of a checkpoint, through its family adapter (`cfg` caps Qwen's image tokens)."""

    return get_adapter(detect_family(src)).image_processor(src, cfg)


def save_model(model, tok, proc, path: Path, extra: dict[str, Any] | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    proc.save_pretrained(path)
    if extra:
        (path / "vskip_build.json").write_text(json.dumps(extra, indent=2))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
