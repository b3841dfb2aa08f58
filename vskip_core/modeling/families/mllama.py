"""Llama-3.2-Vision (`mllama`): one `<|image|>` token per image in the sequence; the image's tiles are read by
cross-attention layers (visual anchoring for it: vskip_core.modeling.adapters' module docstring)."""

from __future__ import annotations

from typing import Any

import torch

from vskip_core.config import Config
from vskip_core.modeling.adapters import Adapter, ImageKeys, _text_config, _unwrap, register_family
from vskip_core.modeling.prompts import train_tokenizer

MLLAMA_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]
# Llama-3.2-Vision-Instruct's template for image prompts (no system turn, as the real one does with images).
MLLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|image|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@register_family
class MllamaAdapter(Adapter):
    family = "mllama"
    model_type = "mllama"
    model_class = "MllamaForConditionalGeneration"
    config_class = "MllamaConfig"
    processor_prefix = "Mllama"
    item_keys = ("cross_attention_mask",)
    pruned_decoding_unsupported = (
        "Mllama reads its image through cross-attention (see vskip_core.modeling.pruned_decoding)"
    )
    standin_generation = {
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
    }  # Llama-3.2-11B-Vision-Instruct
    image_token = "<|image|>"
    end_token = "<|eot_id|>"
    pad_token = "<|finetune_right_pad_id|>"
    special_tokens = tuple(MLLAMA_SPECIAL_TOKENS)
    chat_template = MLLAMA_CHAT_TEMPLATE
    image_in = "cross_attention"
    vision_module = "vision_model"
    projector_module = "multi_modal_projector"
    not_in_vllm = "current vLLM serves no encoder-decoder model but Whisper, and Llama-3.2-Vision is one"
    input_keys = (
        "input_ids",
        "attention_mask",
        "position_ids",
        "pixel_values",
        "aspect_ratio_ids",
        "aspect_ratio_mask",
        "cross_attention_mask",
    )

    def image_processor(self, src: str | None = None, cfg: Config | None = None):
        """Mllama's PIL image processor: each image resized into up to 4 tiles of the checkpoint's tile size."""
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

        if src is None:
            return MllamaImageProcessorPil()
        return MllamaImageProcessorPil.from_pretrained(src)

    def encode(self, ex, tok, proc, target=None, instruction="", prefix="", image=None) -> dict[str, Any]:
        """One example -> model inputs, as MllamaProcessor builds them: input_ids with one `<|image|>` per image,
        pixel_values (1, n_images, tiles, 3, H, W), aspect_ratio_ids/mask, and the (L, n_images, tiles)
        cross-attention mask from the processor's own helpers (each image is seen from its `<|image|>` token
        on; text before it sees no image). Also `image_token_positions` and `target_start`."""
        from transformers.models.mllama.processing_mllama import (
            convert_sparse_cross_attention_mask_to_dense,
            get_cross_attention_token_mask,
        )

        text, images = self.chat_text(tok, ex, instruction, prefix, image)
        vis = proc(images=[[im.convert("RGB") for im in images]], return_tensors="pt")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        target_start = len(ids)
        ids = ids + self._target_ids(tok, target)
        image_id = tok.convert_tokens_to_ids(self.image_token)
        positions = [i for i, t in enumerate(ids) if t == image_id]
        if len(positions) != len(images):
            raise ValueError(
                f"example {ex.get('id')}: {len(positions)} {self.image_token} tokens for {len(images)} images; "
                f"the question text must not contain {self.image_token}"
            )
        dense = convert_sparse_cross_attention_mask_to_dense(
            [get_cross_attention_token_mask(ids, image_id)],
            num_tiles=vis["num_tiles"],
            max_num_tiles=proc.max_image_tiles,
            length=len(ids),
        )
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "pixel_values": vis["pixel_values"],
            "aspect_ratio_ids": vis["aspect_ratio_ids"],
            "aspect_ratio_mask": vis["aspect_ratio_mask"],
            "cross_attention_mask": torch.from_numpy(dense[0]),
            "image_token_positions": torch.tensor(positions, dtype=torch.long),
            "num_tiles": list(vis["num_tiles"][0]),
            "target_start": target_start,
        }

    def collate(self, items, pad_id: int, padding_side: str = "left") -> dict[str, torch.Tensor]:
        """Pad `encode` outputs: text as for Qwen, images to the batch's most images (padding images get
        aspect_ratio_id 0 and only their first tile unmasked, as the image processor pads). `position_ids`
        count real tokens only, so a left-padded row gets the positions it would get alone."""
        L = max(len(it["input_ids"]) for it in items)
        B = len(items)
        N = max(it["pixel_values"].shape[1] for it in items)
        _, _, T, C, H, W = items[0]["pixel_values"].shape
        input_ids = torch.full((B, L), pad_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        cross = torch.zeros((B, L, N, T), dtype=torch.long)
        pixels = torch.zeros((B, N, T, C, H, W), dtype=items[0]["pixel_values"].dtype)
        ar_ids = torch.zeros((B, N), dtype=torch.long)
        ar_mask = torch.zeros((B, N, T), dtype=torch.long)
        ar_mask[:, :, 0] = 1
        offsets = []
        for b, it in enumerate(items):
            n, k = len(it["input_ids"]), it["pixel_values"].shape[1]
            off = L - n if padding_side == "left" else 0
            input_ids[b, off : off + n] = it["input_ids"]
            attn[b, off : off + n] = 1
            cross[b, off : off + n, :k] = it["cross_attention_mask"]
            pixels[b, :k] = it["pixel_values"][0]
            ar_ids[b, :k] = it["aspect_ratio_ids"][0]
            ar_mask[b, :k] = it["aspect_ratio_mask"][0]
            offsets.append(off)
        return {
            "input_ids": input_ids,
            "attention_mask": attn,
            "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
            "pixel_values": pixels,
            "aspect_ratio_ids": ar_ids,
            "aspect_ratio_mask": ar_mask,
            "cross_attention_mask": cross,
            "offsets": torch.tensor(offsets),
        }

    def append_tokens(self, item: dict[str, Any], ids: torch.Tensor) -> dict[str, Any]:
        """The (L, n_images, tiles) cross-attention mask grows by copies of its last row (the new tokens see
        the images the last prompt token sees), as MllamaForConditionalGeneration.generate grows it."""
        cam = item["cross_attention_mask"]
        cam = torch.cat([cam, cam[-1:].expand(len(ids), *cam.shape[1:])])
        return {**super().append_tokens(item, ids), "cross_attention_mask": cam}

    def image_layers(self, model_or_config) -> list[int]:
        return sorted(int(i) for i in _text_config(model_or_config).cross_attention_layers)

    def attention_module(self, model, layer: int):
        if layer not in self.image_layers(_unwrap(model)):
            raise ValueError(
                f"layer {layer} is not a cross-attention layer: {self.image_layers(_unwrap(model))}"
            )
        return self.decoder_layers(model)[layer].cross_attn

    @staticmethod
    def tokens_per_tile(model_or_config) -> int:
        conf = getattr(model_or_config, "config", model_or_config)
        vc = conf.vision_config
        return (vc.image_size // vc.patch_size) ** 2 + 1

    def image_keys(self, model, batch: dict[str, torch.Tensor]) -> ImageKeys:
        P = self.tokens_per_tile(_unwrap(model))
        B, N, T = batch["aspect_ratio_mask"].shape
        tile_ok = batch["aspect_ratio_mask"].bool() & (batch["aspect_ratio_ids"] > 0)[:, :, None]
        patch = torch.ones(P, dtype=torch.bool, device=tile_ok.device)
        patch[0] = False  # CLS of each tile
        key = (tile_ok[:, :, :, None] & patch).reshape(B, N * T * P)
        query = batch["cross_attention_mask"].bool().flatten(2).any(-1) & batch["attention_mask"].bool()
        return ImageKeys(
            kind="cross", key_mask=key, query_mask=query, layers=self.image_layers(model), tokens_per_tile=P
        )

    # ---- the plan: one `<|image|>` token per image; the image's tiles are cross-attended
    def plan_vision_facts(self, conf) -> dict[str, int]:
        return {"tokens_per_tile": self.tokens_per_tile(conf), "max_tiles": conf.vision_config.max_num_tiles}

    def lm_tokens_per_image(self, image_tokens: float) -> float:
        return 1

    def vision_tokens_per_image(self, spec, images: list[float], image_tokens: list[float]) -> float:
        return spec.max_tiles * spec.tokens_per_tile

    def cross_attention_flops(self, spec, seq, tokens: float) -> float:
        """Text rows attend to every vision token of their images in the cross layers."""
        return (
            4 * len(spec.cross_layers) * spec.hidden * tokens * seq.vision_tokens_per_image * seq.images_mean
        )

    def cross_attention_bytes(self, spec, seq, batch, query_len, dtype_bytes, eager) -> tuple[float, float]:
        cross = 2 * len(spec.cross_layers) * spec.kv_heads * spec.head_dim * dtype_bytes
        cross *= batch * seq.images_peak * seq.vision_tokens_per_image
        vcols = seq.vision_tokens_per_image * seq.images_peak if eager else 256
        return cross, batch * spec.heads * query_len * vcols * (dtype_bytes + 4)

    def hub_access_note(self, name: str) -> str:
        if "meta-llama" not in name:
            return ""
        return "meta-llama checkpoints are gated: accept the licence on the hub and `huggingface-cli login`"

    def tiny_init(self, model) -> None:
        """Cross-attention gates to 1 (a random init leaves them 0: the image would not change the output)."""
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                    p.fill_(1.0)

    def tiny_tokenizer(self, texts: list[str], vocab_size: int = 400):
        return train_tokenizer(
            texts,
            vocab_size,
            MLLAMA_SPECIAL_TOKENS,
            chat_template=self.chat_template,
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            pad_token=self.pad_token,
            extra_special_tokens={"image_token": self.image_token},
        )

    def tiny_config(self, tok, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2, **kw):
        from transformers import MllamaConfig

        vdim = kw.get("vision_dim", 32)
        return MllamaConfig(
            text_config={
                **self.tiny_text_config(tok, hidden, layers, heads, kv_heads),
                "cross_attention_layers": kw.get("cross_layers", [1, layers - 1]),
                "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
                "bos_token_id": tok.convert_tokens_to_ids("<|begin_of_text|>"),
                "eos_token_id": tok.convert_tokens_to_ids("<|eot_id|>"),
            },
            vision_config={
                "hidden_size": vdim,
                "num_hidden_layers": 2,
                "num_global_layers": 1,
                "attention_heads": 2,
                "intermediate_size": 2 * vdim,
                "intermediate_layers_indices": [0, 1],
                "vision_output_dim": 3 * vdim,  # last hidden state + the two intermediate layers
                "image_size": 56,
                "patch_size": 14,
                "max_num_tiles": 4,
            },
            image_token_index=tok.convert_tokens_to_ids(self.image_token),
        )

    def tiny_image_processor(self):
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

        return MllamaImageProcessorPil(size={"height": 56, "width": 56}, max_image_tiles=4)
