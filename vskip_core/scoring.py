"""Dual scoring of rationale tokens: linguistic surprisal and visual anchoring.

Visual anchoring of rationale token t = attention mass from t onto the image-token positions, averaged
over key layers and reduced over heads (max by default), as in V-Skip.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def naive_image_attention(
    model, inputs: dict[str, torch.Tensor], image_positions: torch.Tensor, query_positions: torch.Tensor
) -> torch.Tensor:
    """Reference path: one forward with `output_attentions=True` (eager attention, every layer, full maps).
    Returns (layers, heads, n_query, n_image) attention weights of one example (batch of 1)."""
    out = model(**inputs, output_attentions=True)
    if not out.attentions:
        raise RuntimeError("the model returned no attention maps; load it with attn_implementation='eager'")
    att = torch.stack([a[0] for a in out.attentions])  # (L, H, T, T)
    return att[:, :, query_positions][:, :, :, image_positions].float()


def token_index_for_anchor(offsets: list[tuple[int, int]], text: str, anchor: dict) -> int:
    """Index of the first target token overlapping an anchor span (for prices: its first digit)."""
    for j, (s, e) in enumerate(offsets):
        if (
            s < anchor["end"]
            and e > anchor["start"]
            and (anchor["type"] != "text" or text[s:e].strip().isdigit())
        ):
            return j
    raise ValueError(f"no token overlaps anchor {anchor}")


def anchor_attention_maps(
    loaded, examples: list[dict], types=("colour", "text"), per_example: int = 2, limit: int = 8
) -> list[dict]:
    """For anchor tokens not given away by the question: attention from the position that predicts the
    token onto the image tokens (teacher-forced, mean over layers, max over heads), as a heat grid."""
    from .models import collate, encode, model_inputs

    tok, items = loaded.tokenizer, []
    for ex in examples:
        enc = encode(ex, tok, loaded.processor, target=ex["rationale"])
        batch = model_inputs(collate([enc], tok.pad_token_id), loaded.model.device)
        offsets = tok(ex["rationale"], add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        wanted = [a for a in ex["anchors"] if a["type"] in types and not a["in_question"]][:per_example]
        g = enc["image_grid_thw"][0]
        for a in wanted:
            j = token_index_for_anchor(offsets, ex["rationale"], a)
            q = torch.tensor([enc["target_start"] + j - 1])
            w = naive_image_attention(loaded.model, batch, enc["image_positions"], q).mean(0).amax(0)[0]
            piece = ex["rationale"][offsets[j][0] : offsets[j][1]].strip()
            items.append(
                {
                    "image": ex["image"],
                    "grid": (int(g[1]) // 2, int(g[2]) // 2),
                    "weights": w.cpu().numpy(),
                    "title": f"{a['type']} token '{piece}' of '{a['value']}'",
                }
            )
        if len(items) >= limit:
            break
    return items[:limit]
