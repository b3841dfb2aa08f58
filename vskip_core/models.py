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

from .config import Config

IMAGE_TOKEN = "<|image_pad|>"
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    IMAGE_TOKEN,
    "<|video_pad|>",
]
# Qwen2-VL's chat template, without the default system turn (it would cost the tiny model ~10 tokens of
# nothing per example). Hub models use their own template through the same code.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ANSWER_PREFIX = "Answer:"


# ------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on benchmark text; digits split into single tokens; Qwen special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


# ----------------------------------------------------------------------------------------------- prompts
def user_text(ex: dict[str, Any], instruction: str = "") -> str:
    text = ex["question"]
    if ex.get("options"):
        text += "\n" + "\n".join(f"({L}) {o}" for L, o in zip("ABCDEFGHIJ", ex["options"]))
    if instruction:
        text += "\n" + instruction
    return text


def prompt_text(ex: dict[str, Any], tok, instruction: str = "", prefix: str = "") -> str:
    """The chat prompt up to the assistant turn; `prefix` is put in the user turn before the question
    (distillation writes the target ratio there)."""
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": prefix + user_text(ex, instruction)}],
        }
    ]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ----------------------------------------------------------------------------------------------- encode
def image_processor_for(cfg: Config):
    """Qwen2-VL's PIL image processor pinned to the benchmark's image size (no resize on our images)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    px = cfg.data.image_size**2
    return Qwen2VLImageProcessorPil(min_pixels=px, max_pixels=px)


def n_image_tokens(image_grid_thw: torch.Tensor, merge_size: int) -> int:
    return int(image_grid_thw.prod()) // merge_size**2


def encode(
    ex: dict[str, Any],
    tok,
    proc,
    target: str | None = None,
    instruction: str = "",
    prefix: str = "",
    image=None,
) -> dict[str, Any]:
    """One example -> model inputs. With `target`, the target tokens and `<|im_end|>` are appended and
    `target_start` marks where they begin (labels = input_ids from there on)."""
    img = ex["image"] if image is None else image
    vis = proc(images=[img.convert("RGB")], return_tensors="pt")
    n_img = n_image_tokens(vis["image_grid_thw"][0], proc.merge_size)
    text = prompt_text(ex, tok, instruction, prefix)
    if text.count(IMAGE_TOKEN) != 1:
        raise ValueError(
            f"example {ex.get('id')}: the chat template produced {text.count(IMAGE_TOKEN)} image "
            f"placeholders; expected exactly 1"
        )
    text = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * n_img)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    target_start = len(ids)
    if target is not None:
        ids = (
            ids
            + tok(target, add_special_tokens=False)["input_ids"]
            + [tok.convert_tokens_to_ids("<|im_end|>")]
        )
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    input_ids = torch.tensor(ids, dtype=torch.long)
    mm = (input_ids == image_id).long()
    image_positions = torch.nonzero(mm, as_tuple=False).flatten()
    if len(image_positions) != n_img:
        raise ValueError(
            f"example {ex.get('id')}: {len(image_positions)} image tokens in the text, {n_img} "
            f"expected; the question text must not contain {IMAGE_TOKEN}"
        )
    return {
        "input_ids": input_ids,
        "mm_token_type_ids": mm,
        "pixel_values": vis["pixel_values"],
        "image_grid_thw": vis["image_grid_thw"],
        "image_positions": image_positions,
        "target_start": target_start,
    }


def collate(items: list[dict[str, Any]], pad_id: int, padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Pad a list of `encode` outputs. Left padding for generation, right for training. `offsets` is the
    shift each row got (add it to that row's positions)."""
    L = max(len(it["input_ids"]) for it in items)
    B = len(items)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    mm = torch.zeros((B, L), dtype=torch.long)
    offsets = []
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        off = L - n if padding_side == "left" else 0
        input_ids[b, off : off + n] = it["input_ids"]
        attn[b, off : off + n] = 1
        mm[b, off : off + n] = it["mm_token_type_ids"]
        offsets.append(off)
    return {
        "input_ids": input_ids,
        "attention_mask": attn,
        "mm_token_type_ids": mm,
        "pixel_values": torch.cat([it["pixel_values"] for it in items]),
        "image_grid_thw": torch.cat([it["image_grid_thw"] for it in items]),
        "offsets": torch.tensor(offsets),
    }


MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def model_inputs(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: batch[k].to(device) for k in MODEL_INPUT_KEYS if k in batch}


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
    return cfg.path(cfg.runtime.cache_dir) / f"teacher-{cfg.hash('embedded', 'data')}"


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    processor: Any
    family: str
    path: str


def load_model(cfg: Config, name_or_path: str | None = None, device: str | None = None) -> Loaded:
    """Load a teacher/student: 'embedded' (must already be built: `vskip_core.teacher.build_teacher`), a local
    directory, or a hub id. Eager attention by default so attention maps exist."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from .runtime import resolve_device, resolve_dtype

    name = name_or_path or cfg.model.teacher
    path = embedded_dir(cfg) if name == "embedded" else Path(name)
    if name == "embedded" and not (path / "config.json").exists():
        raise FileNotFoundError(
            f"the embedded teacher is not built yet ({path}); run notebook "
            f"00_embedded_teacher or vskip_core.teacher.build_teacher(cfg)"
        )
    src = str(path) if path.exists() else name
    device = device or resolve_device(cfg.runtime.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": cfg.model.attn_implementation}
    if cfg.model.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    model = AutoModelForImageTextToText.from_pretrained(src, **kwargs)
    if cfg.model.quantization != "nf4":
        model.to(device)
    model.eval()
    tok = AutoTokenizer.from_pretrained(src)
    tok.padding_side = "left"
    proc = image_processor_for(cfg) if name == "embedded" else _hub_image_processor(src)
    family = model.config.model_type
    return Loaded(model=model, tokenizer=tok, processor=proc, family=family, path=src)


def _hub_image_processor(src: str):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(src)


def save_model(model, tok, proc, path: Path, extra: dict[str, Any] | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    proc.save_pretrained(path)
    if extra:
        (path / "vskip_build.json").write_text(json.dumps(extra, indent=2))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
