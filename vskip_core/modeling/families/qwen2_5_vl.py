"""Qwen2.5-VL (`qwen2_5_vl`): Qwen2-VL's prompt, image tokens, processor and encoding, another vision tower."""

from __future__ import annotations

from vskip_core.modeling.adapters import register_family
from vskip_core.modeling.families.qwen2_vl import Qwen2VLAdapter


@register_family
class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: the same prompt, image tokens and processor as Qwen2-VL; a windowed-attention vision tower
    with a gated MLP (gate/up/down_proj: the LoRA regex keeps it out)."""

    family = "qwen2_5_vl"
    model_type = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    config_class = "Qwen2_5_VLConfig"

    def tiny_config(self, tok, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2, **kw):
        from transformers import Qwen2_5_VLConfig

        head_dim = hidden // heads
        q = head_dim // 4
        depth = kw.get("vision_depth", 2)
        return Qwen2_5_VLConfig(
            text_config=self._tiny_text(tok, hidden, layers, heads, kv_heads, [head_dim // 2 - 2 * q, q, q]),
            vision_config={
                "depth": depth,
                "hidden_size": kw.get("vision_dim", 32),
                "intermediate_size": 2 * kw.get("vision_dim", 32),
                "num_heads": 2,
                "out_hidden_size": hidden,
                "fullatt_block_indexes": [depth - 1],
                "window_size": 56,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
            },
            **self._tiny_ids(tok),
            tie_word_embeddings=False,
        )
