"""Qwen2-VL (`qwen2_vl`): the image as `<|image_pad|>` tokens inside the sequence, prod(grid_thw) / 4 per image,
read by self-attention; Qwen's chat template and PIL image processor."""

from __future__ import annotations

from typing import Any

import torch

from vskip_core.config import Config
from vskip_core.modeling.adapters import Adapter, ImageKeys, register_family
from vskip_core.modeling.prompts import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    SPECIAL_TOKENS,
    n_image_tokens,
    train_tokenizer,
)


@register_family
class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_type = "qwen2_vl"
    model_class = "Qwen2VLForConditionalGeneration"
    config_class = "Qwen2VLConfig"
    processor_prefix = "Qwen2VL"
    item_keys = ("mm_token_type_ids", "image_grid_thw")
    # the sampling fields of the published Qwen2-VL / Qwen2.5-VL Instruct checkpoints
    standin_generation = {
        "do_sample": True,
        "repetition_penalty": 1.05,
        "temperature": 0.01,
        "top_p": 0.001,
        "top_k": 1,
    }
    image_token = IMAGE_TOKEN
    end_token = "<|im_end|>"
    pad_token = "<|endoftext|>"
    special_tokens = tuple(SPECIAL_TOKENS)
    chat_template = CHAT_TEMPLATE
    image_in = "sequence"
    vision_module = "visual"
    input_keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")

    def image_processor(self, src: str | None = None, cfg: Config | None = None):
        """Qwen2-VL's PIL image processor (the same on every machine; the torchvision one differs slightly),
        with at most `model.max_image_tokens` visual tokens per image (max_pixels = tokens x 28 x 28)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        kw = self.image_cap(cfg) if cfg is not None else {}
        if src is None:
            return Qwen2VLImageProcessorPil(**kw)
        return Qwen2VLImageProcessorPil.from_pretrained(src, **kw)

    def image_cap(self, cfg: Config) -> dict[str, Any]:
        """max_pixels = model.max_image_tokens x 28 x 28 (one visual token per 28x28 pixels after merging)."""
        n = cfg.model.max_image_tokens
        return {"max_pixels": n * 28 * 28} if n > 0 else {}

    def encode(self, ex, tok, proc, target=None, instruction="", prefix="", image=None) -> dict[str, Any]:
        """One example -> model inputs, exactly as Qwen2VLProcessor builds them (one or several images, each
        `<|image_pad|>` expanded to prod(image_grid_thw) // merge_size**2), plus `image_positions` (the image
        columns) and `target_start` (first target token; labels = input_ids from there on)."""
        text, images = self.chat_text(tok, ex, instruction, prefix, image)
        vis = proc(images=[im.convert("RGB") for im in images], return_tensors="pt")
        counts = [n_image_tokens(g, proc.merge_size) for g in vis["image_grid_thw"]]
        pieces = text.split(self.image_token)
        text = pieces[0] + "".join(self.image_token * n + p for n, p in zip(counts, pieces[1:]))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        target_start = len(ids)
        ids = ids + self._target_ids(tok, target)
        input_ids = torch.tensor(ids, dtype=torch.long)
        mm = (input_ids == tok.convert_tokens_to_ids(self.image_token)).long()
        image_positions = torch.nonzero(mm, as_tuple=False).flatten()
        if len(image_positions) != sum(counts):
            raise ValueError(
                f"example {ex.get('id')}: {len(image_positions)} image tokens in the text, {sum(counts)} "
                f"expected; the question text must not contain {self.image_token}"
            )
        return {
            "input_ids": input_ids,
            "mm_token_type_ids": mm,
            "pixel_values": vis["pixel_values"],
            "image_grid_thw": vis["image_grid_thw"],
            "image_positions": image_positions,
            "target_start": target_start,
        }

    def collate(self, items, pad_id: int, padding_side: str = "left") -> dict[str, torch.Tensor]:
        """Pad `encode` outputs. Left padding for generation, right for training and scoring. `offsets` is the
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

    def append_tokens(self, item: dict[str, Any], ids: torch.Tensor) -> dict[str, Any]:
        """Text tokens are not image tokens: `mm_token_type_ids` grows with zeros."""
        mm = torch.cat([item["mm_token_type_ids"], torch.zeros_like(ids)])
        return {**super().append_tokens(item, ids), "mm_token_type_ids": mm}

    def attention_module(self, model, layer: int):
        return self.decoder_layers(model)[layer].self_attn

    def image_keys(self, model, batch: dict[str, torch.Tensor]) -> ImageKeys:
        key = batch["mm_token_type_ids"].bool()
        real = batch["attention_mask"].bool()
        first = torch.where(
            key.any(1), key.float().argmax(1), torch.full_like(key[:, 0], key.shape[1]).long()
        )
        after = torch.arange(key.shape[1])[None, :].to(key.device) > first[:, None]
        return ImageKeys(
            kind="self", key_mask=key, query_mask=real & after & ~key, layers=self.image_layers(model)
        )

    def vision_tokens_per_image(self, spec, images: list[float], image_tokens: list[float]) -> float:
        """4 patches per visual token (the 2 x 2 merger), averaged over the images of the mix."""
        return 4 * sum(i * tm for i, tm in zip(images, image_tokens, strict=True)) / sum(images)

    def tiny_tokenizer(self, texts: list[str], vocab_size: int = 400):
        return train_tokenizer(texts, vocab_size)

    def tiny_config(self, tok, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2, **kw):
        from transformers import Qwen2VLConfig

        head_dim = hidden // heads
        q = head_dim // 4  # mrope sections (temporal, height, width) sum to head_dim / 2
        return Qwen2VLConfig(
            text_config=self._tiny_text(tok, hidden, layers, heads, kv_heads, [head_dim // 2 - 2 * q, q, q]),
            vision_config={
                "depth": kw.get("vision_depth", 2),
                "embed_dim": kw.get("vision_dim", 32),
                "hidden_size": hidden,
                "num_heads": 2,
                "mlp_ratio": 2,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
            },
            **self._tiny_ids(tok),
            tie_word_embeddings=False,
        )

    @staticmethod
    def _tiny_text(tok, hidden, layers, heads, kv_heads, mrope):
        return {
            **Adapter.tiny_text_config(tok, hidden, layers, heads, kv_heads),
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
        }

    @staticmethod
    def _tiny_ids(tok) -> dict[str, int]:
        return {
            "image_token_id": tok.convert_tokens_to_ids(IMAGE_TOKEN),
            "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
            "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
            "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
        }

    def tiny_image_processor(self):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
