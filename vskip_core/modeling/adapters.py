"""Model-family adapters: everything that differs between Qwen2-VL, Qwen2.5-VL and Llama-3.2-Vision, behind one
interface, so generation, scoring, distillation and evaluation never branch on the family.

    ad = get_adapter("mllama")                    # or adapter_for(model), adapter_for(loaded)
    enc = ad.encode(ex, tok, proc, target=ex["rationale"])
    batch = ad.collate([enc], tok.pad_token_id, padding_side="right")
    out = model(**ad.model_inputs(batch, device), output_attentions=True)
    keys = ad.image_keys(model, batch)          # where the image lives, for visual anchoring
    layers = ad.key_layers(model, cfg)          # scoring.key_layers, else the layer_band rule (stage 02 may choose others)

Each adapter knows:

| | qwen2_vl, qwen2_5_vl | mllama |
|---|---|---|
| prompt | the tokenizer's chat template, `<|vision_start|><|image_pad|><|vision_end|>` per image | the chat template, one `<|image|>` per image |
| image in the model | `<|image_pad|>` tokens inside the sequence, prod(grid_thw) / 4 per image | cross-attention layers over n_images x 4 tiles x (1 CLS + patches) vision tokens |
| encode by hand | pixel_values, image_grid_thw, mm_token_type_ids (required by transformers 5.x) | pixel_values, aspect_ratio_ids/mask, cross_attention_mask (the processor's own helpers) |
| visual anchoring keys | self-attention columns of the image-pad positions | cross-attention columns of the patch tokens of real tiles (no CLS, no padding tile) |
| key-layer candidates | every decoder layer | `text_config.cross_attention_layers` |
| LoRA targets | `language_model.layers.*.{names}` (vision blocks use fused qkv/proj, but Qwen2.5-VL's vision MLP has gate/up/down_proj: a regex keeps LoRA off the tower) | `language_model.layers.*.{names}` (the vision tower has its own q/k/v/o_proj) |

Visual anchoring for Mllama. Cross-attention normalizes over the vision tokens only, so the total mass on "the
image" is 1 for every text row and carries no signal. What varies is how much mass goes to the patch tokens
rather than to each tile's CLS token (position 0 of every tile block), which acts as the no-op sink; padding
tiles outside the aspect ratio get exactly zero mass from the cross-attention mask. So `image_keys` marks the
patch tokens of real tiles as the anchoring columns (mass = 1 - CLS mass), and marks as query rows only the text
rows the cross-attention mask lets see an image: rows before the first `<|image|>` are fully masked, and the model
then zeroes their whole bias row (to avoid an all -inf softmax), so they attend over every column, padding tiles
included; that mass means nothing and must be dropped (tests/test_adapters.py shows both). This is
one defensible reading of "attention mass onto the image" for a cross-attention model, not the paper's (the
paper reports Llama results without saying how); the limit is that a model may use CLS as information, not
only as a sink.

Device and dtype only through `vskip_core.runtime.resolve_device / resolve_dtype`; 4-bit (nf4) loading through
bitsandbytes when `model.quantization: nf4`, keeping the vision tower and lm_head in the compute dtype. Mind the
CPU trap of bitsandbytes 0.50: an eval-mode no-grad forward on a 4-bit model repacks its weights and later
LoRA training gets zero gradients (call `model.train()` before any inference, or reload).

Adding a family = subclassing `Adapter` (prompt, encode, collate, layers, image keys, tiny config) and adding it
to `ADAPTERS`.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vskip_core.config import Config
from vskip_core.modeling.prompts import CHAT_TEMPLATE as QWEN_CHAT_TEMPLATE
from vskip_core.modeling.prompts import IMAGE_TOKEN as QWEN_IMAGE_TOKEN
from vskip_core.modeling.prompts import SPECIAL_TOKENS as QWEN_SPECIAL_TOKENS
from vskip_core.modeling.prompts import n_image_tokens, train_tokenizer, user_text
from vskip_core.runtime import resolve_device, resolve_dtype

IMAGE_REF = re.compile(r"<image (\d+)>")  # MMMU's interleaved image placeholders, `<image 1>` .. `<image 7>`
VISION_ATTENTION = "sdpa"  # vision towers' maps are never read; eager there costs O(patches^2) per head


# -------------------------------------------------------------------------------------------- prompts
def example_images(ex: dict[str, Any]) -> list:
    """The images of a normalized record: `images` (real benchmarks, in `<image N>` order) or `[image]`."""
    imgs = ex.get("images")
    if imgs:
        return list(imgs)
    if ex.get("image") is None:
        raise ValueError(f"example {ex.get('id')}: no image (neither `images` nor `image` is set)")
    return [ex["image"]]


def interleave(
    ex: dict[str, Any], instruction: str = "", prefix: str = "", image=None
) -> tuple[list[dict[str, Any]], list]:
    """User-turn content parts and the images in the order they appear.

    The user text is `prefix + question + options + instruction`. The first `<image N>` placeholder of each N
    in it (MMMU puts them in the question and sometimes in options) is replaced by image N at that spot; a
    later reference to the same image stays as words ("image N"), so each referenced image is fed once, as
    lmms-eval does and as `data.max_images` counts (distinct references). Without placeholders the images come
    first, then the text (the embedded benchmark's layout). Images never referenced by a placeholder are left
    out, as MMMU's official evaluation does. `image` replaces the example's images (one PIL
    image or a list of the same length), e.g. blank images for the grounding control."""
    imgs = example_images(ex)
    if image is not None:
        repl = list(image) if isinstance(image, list | tuple) else [image] * len(imgs)
        if len(repl) != len(imgs):
            raise ValueError(f"example {ex.get('id')}: {len(repl)} replacement images for {len(imgs)} images")
        imgs = repl
    text = prefix + user_text(ex, instruction)
    refs = list(IMAGE_REF.finditer(text))
    if not refs:
        return [{"type": "image"} for _ in imgs] + [{"type": "text", "text": text}], imgs
    parts: list[dict[str, Any]] = []
    order, seen, pos, pending = [], set(), 0, ""
    for m in refs:
        k = int(m.group(1))
        if not 1 <= k <= len(imgs):
            raise ValueError(
                f"example {ex.get('id')}: the text refers to <image {k}> but the example has {len(imgs)} images"
            )
        if k in seen:  # already fed at its first reference: the words stay, the image does not repeat
            pending += text[pos : m.start()] + f"image {k}"
            pos = m.end()
            continue
        seen.add(k)
        if pending + text[pos : m.start()]:
            parts.append({"type": "text", "text": pending + text[pos : m.start()]})
        pending = ""
        parts.append({"type": "image"})
        order.append(imgs[k - 1])
        pos = m.end()
    if pending + text[pos:]:
        parts.append({"type": "text", "text": pending + text[pos:]})
    return parts, order


def _text_config(obj):
    """The language-model config of a model, a config, or a text config."""
    conf = getattr(obj, "config", obj)
    return getattr(conf, "text_config", None) or conf


def _unwrap(model):
    """The transformers model under a peft wrapper (module names and layers are looked up there)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def layers_in_band(
    candidates: list[int], n_layers: int, band: list[float] | tuple[float, float]
) -> list[int]:
    """Candidate layers whose centre depth (i + 0.5) / n_layers lies in [lo, hi] (the definition
    `vskip_core.method.scoring` argues for); if none does, the candidate nearest the band's centre (a band narrower than
    the spacing of Mllama's cross-attention layers still gets one)."""
    lo, hi = band
    inside = [i for i in candidates if lo <= (i + 0.5) / n_layers <= hi]
    if inside or not candidates:
        return inside
    centre = (lo + hi) / 2
    return [min(candidates, key=lambda i: (abs((i + 0.5) / n_layers - centre), i))]


@dataclass
class ImageKeys:
    """Where visual anchoring reads attention, for one collated batch.

    kind: "self" (image tokens inside the sequence; columns index the sequence) or "cross" (cross-attention over
    vision tokens; columns index n_images x tiles x tokens_per_tile).
    key_mask: (B, K) bool, the columns whose attention mass is visual anchoring.
    query_mask: (B, L) bool, the rows that can see an image (real tokens after the first image).
    layers: the layers whose attention carries the image (every layer for "self", the cross layers for "cross").
    tokens_per_tile: 1 CLS + patches per tile ("cross" only)."""

    kind: str
    key_mask: torch.Tensor
    query_mask: torch.Tensor
    layers: list[int]
    tokens_per_tile: int | None = None


# --------------------------------------------------------------------------------------------- base
class Adapter:
    family = ""
    model_type = ""  # config.model_type of the checkpoints this adapter serves
    model_class = ""  # transformers class name
    image_token = ""
    end_token = ""  # end of the assistant turn: generation stops here; appended after training targets
    pad_token = ""
    special_tokens: tuple[str, ...] = ()
    chat_template = ""  # used only when a checkpoint carries none (tiny test tokenizers)
    image_in = ""  # "sequence" or "cross_attention"
    vision_module = ""  # name of the vision tower inside `model.model` (kept out of LoRA and 4-bit)
    input_keys: tuple[str, ...] = ()
    not_in_vllm = ""  # why vLLM cannot serve this family ("" = it can: stage 01's --backend vllm)

    # ---- prompts
    def messages(self, ex, instruction: str = "", prefix: str = "", image=None):
        parts, images = interleave(ex, instruction, prefix, image)
        return [{"role": "user", "content": parts}], images

    def prompt_text(self, ex: dict[str, Any], tok, instruction: str = "", prefix: str = "") -> str:
        """The chat prompt up to the assistant turn, from the tokenizer's own chat template."""
        messages, _ = self.messages(ex, instruction, prefix)
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def end_token_id(self, tok) -> int:
        i = tok.convert_tokens_to_ids(self.end_token)
        if i is None or i == tok.unk_token_id:
            raise ValueError(f"tokenizer has no {self.end_token!r} token: is it a {self.family} tokenizer?")
        return i

    # ---- processors and encoding (per family)
    def image_processor(self, src: str | None = None, cfg: Config | None = None):
        raise NotImplementedError

    def image_cap(self, cfg: Config) -> dict[str, Any]:
        """Image-processor kwargs capping the visual tokens per image (`model.max_image_tokens`); the HF image
        processor and vLLM's (`mm_processor_kwargs`) get the same. {} = no cap."""
        return {}

    def encode(self, ex, tok, proc, target=None, instruction="", prefix="", image=None) -> dict[str, Any]:
        raise NotImplementedError

    def collate(self, items, pad_id: int, padding_side: str = "left") -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def model_inputs(self, batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
        return {k: batch[k].to(device) for k in self.input_keys if k in batch}

    def append_tokens(self, item: dict[str, Any], ids: torch.Tensor) -> dict[str, Any]:
        """An `encode` output with text tokens `ids` appended (e.g. an assistant prefill), every per-token input
        grown with them as transformers' generate grows it for generated tokens. Returns a new dict."""
        return {**item, "input_ids": torch.cat([item["input_ids"], ids])}

    def _target_ids(self, tok, target: str | None) -> list[int]:
        if target is None:
            return []
        return tok(target, add_special_tokens=False)["input_ids"] + [self.end_token_id(tok)]

    # ---- where the image lives
    def language_model(self, model):
        return _unwrap(model).model.language_model

    def decoder_layers(self, model):
        return self.language_model(model).layers

    def num_layers(self, model_or_config) -> int:
        return int(_text_config(model_or_config).num_hidden_layers)

    def image_layers(self, model_or_config) -> list[int]:
        """Layers whose attention reaches the image: the key-layer candidates."""
        return list(range(self.num_layers(model_or_config)))

    def key_layers(self, model_or_config, cfg) -> list[int]:
        """`scoring.key_layers` if given (checked against the candidates), else the candidates inside
        `scoring.layer_band` (centre depth (i + 0.5) / n_layers). `cfg`: the Config or its scoring section.
        Stage 02 by default chooses the key layers from data instead (`method.scoring`, Key layers)."""
        sc = getattr(cfg, "scoring", cfg)
        cands = self.image_layers(model_or_config)
        if sc.key_layers:
            bad = [i for i in sc.key_layers if i not in cands]
            if bad:
                raise ValueError(
                    f"scoring.key_layers {bad} cannot carry visual anchoring for {self.family}: the image is "
                    f"reached in layers {cands}; pick among them or leave key_layers empty to use layer_band"
                )
            return sorted(set(sc.key_layers))
        return layers_in_band(cands, self.num_layers(model_or_config), sc.layer_band)

    def attention_module(self, model, layer: int):
        """The attention module of `layer` whose weights are visual anchoring (self- or cross-attention)."""
        raise NotImplementedError

    def image_keys(self, model, batch: dict[str, torch.Tensor]) -> ImageKeys:
        raise NotImplementedError

    # ---- training and loading
    def lora_target_modules(self, model, names: list[str]) -> str:
        """A peft `target_modules` regex matching the named linear layers inside the language model's decoder
        layers only. `names` like ["q_proj", "v_proj"]; ["all-linear"] means every linear layer there. Raises,
        naming the valid names, when nothing matches."""
        base = _unwrap(model)
        lm = re.compile(r"^(?:.*\.)?language_model\.layers\.\d+\.(?:.*\.)?([^.]+)$")
        leaves = sorted(
            {
                m.group(1)
                for n, mod in base.named_modules()
                if isinstance(mod, torch.nn.Linear) and (m := lm.match(n))
            }
        )
        wanted = leaves if list(names) == ["all-linear"] else list(names)
        missing = [n for n in wanted if n not in leaves]
        if missing or not wanted:
            raise ValueError(
                f"LoRA target modules {missing or wanted} match no linear layer of the {self.family} language "
                f"model; valid names: {leaves} (or ['all-linear'])"
            )
        alt = "|".join(re.escape(n) for n in wanted)
        return rf"^(?:.*\.)?language_model\.layers\.\d+\.(?:.*\.)?(?:{alt})$"

    def quantization_config(self, quantization: str, dtype):
        """bitsandbytes config for `quantization` ("none" -> None). The vision tower, the projector and lm_head
        stay in the compute dtype (4-bit vision features cost accuracy for little memory)."""
        if quantization == "none":
            return None
        if quantization != "nf4":
            raise ValueError(f"unknown quantization {quantization!r}; use none or nf4")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ImportError(
                "model.quantization=nf4 needs bitsandbytes: pip install bitsandbytes==0.50.2 "
                "(the `gpu` extra of this package)"
            ) from None
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=self.quant_skip_modules(),
        )

    def quant_skip_modules(self) -> list[str]:
        """Module-name patterns kept out of 4-bit (transformers matches them from the start of the name, as
        regexes, or as suffixes)."""
        return [rf"(?:.*\.)?{self.vision_module}", "lm_head"]

    def load(self, cfg: Config, src: str, device: str | None = None, quantization: str | None = None):
        """(model, tokenizer) from a local directory or hub id, eager attention in the language model (attention
        maps exist), `cfg.model.dtype` through resolve_dtype, 4-bit when `quantization` (default
        `cfg.model.quantization`) is nf4. The model is in eval mode."""
        import transformers
        from transformers import AutoTokenizer

        device = device or resolve_device(cfg.runtime.device)
        dtype = resolve_dtype(cfg.model.dtype, device)
        quantization = quantization or cfg.model.quantization
        attn = cfg.model.attn_implementation
        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "attn_implementation": {"": attn, "text_config": attn, "vision_config": VISION_ATTENTION},
        }
        qconf = self.quantization_config(quantization, dtype)
        if qconf is not None:
            kwargs["quantization_config"] = qconf
            kwargs["device_map"] = {"": device}
        cls = getattr(transformers, self.model_class)
        model = cls.from_pretrained(src, **kwargs)
        if qconf is None:
            model.to(device)
        model.eval()
        tok = AutoTokenizer.from_pretrained(src)
        tok.padding_side = "left"
        if not tok.chat_template:
            saved = _checkpoint_chat_template(src)
            if saved is None:
                warnings.warn(
                    f"{src} carries no chat template; using vskip's minimal {self.family} template",
                    stacklevel=2,
                )
            tok.chat_template = saved or self.chat_template
        if tok.pad_token is None:
            tok.pad_token = self.pad_token
        return model, tok

    # ---- tiny random-weight models (tests, dry runs)
    def tiny_tokenizer(self, texts: list[str], vocab_size: int = 400):
        raise NotImplementedError

    def tiny_config(self, tok, **sizes):
        raise NotImplementedError

    def tiny_image_processor(self):
        raise NotImplementedError


def _checkpoint_chat_template(src: str) -> str | None:
    """A processor-level chat template saved beside the checkpoint (chat_template.jinja / .json)."""
    d = Path(src)
    if (d / "chat_template.jinja").exists():
        return (d / "chat_template.jinja").read_text()
    if (d / "chat_template.json").exists():
        return json.loads((d / "chat_template.json").read_text()).get("chat_template")
    return None


# --------------------------------------------------------------------------------------------- Qwen
class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_type = "qwen2_vl"
    model_class = "Qwen2VLForConditionalGeneration"
    image_token = QWEN_IMAGE_TOKEN
    end_token = "<|im_end|>"
    pad_token = "<|endoftext|>"
    special_tokens = tuple(QWEN_SPECIAL_TOKENS)
    chat_template = QWEN_CHAT_TEMPLATE
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
        messages, images = self.messages(ex, instruction, prefix, image)
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(self.image_token) != len(images):
            raise ValueError(
                f"example {ex.get('id')}: the chat template produced {text.count(self.image_token)} image "
                f"placeholders; expected exactly {len(images)}"
            )
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
            "vocab_size": len(tok),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tok.pad_token_id,
        }

    @staticmethod
    def _tiny_ids(tok) -> dict[str, int]:
        return {
            "image_token_id": tok.convert_tokens_to_ids(QWEN_IMAGE_TOKEN),
            "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
            "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
            "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
        }

    def tiny_image_processor(self):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)


class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: the same prompt, image tokens and processor as Qwen2-VL; a windowed-attention vision tower
    with a gated MLP (gate/up/down_proj: the LoRA regex keeps it out)."""

    family = "qwen2_5_vl"
    model_type = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"

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


# --------------------------------------------------------------------------------------------- Mllama
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


class MllamaAdapter(Adapter):
    family = "mllama"
    model_type = "mllama"
    model_class = "MllamaForConditionalGeneration"
    image_token = "<|image|>"
    end_token = "<|eot_id|>"
    pad_token = "<|finetune_right_pad_id|>"
    special_tokens = tuple(MLLAMA_SPECIAL_TOKENS)
    chat_template = MLLAMA_CHAT_TEMPLATE
    image_in = "cross_attention"
    vision_module = "vision_model"
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

    def quant_skip_modules(self) -> list[str]:
        return [*super().quant_skip_modules(), r"(?:.*\.)?multi_modal_projector"]

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

        messages, images = self.messages(ex, instruction, prefix, image)
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(self.image_token) != len(images):
            raise ValueError(
                f"example {ex.get('id')}: the chat template produced {text.count(self.image_token)} image "
                f"tokens; expected exactly {len(images)}"
            )
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
                "vocab_size": len(tok),
                "hidden_size": hidden,
                "intermediate_size": 2 * hidden,
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "num_key_value_heads": kv_heads,
                "cross_attention_layers": kw.get("cross_layers", [1, layers - 1]),
                "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
                "max_position_embeddings": 2048,
                "bos_token_id": tok.convert_tokens_to_ids("<|begin_of_text|>"),
                "eos_token_id": tok.convert_tokens_to_ids("<|eot_id|>"),
                "pad_token_id": tok.pad_token_id,
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


ADAPTERS: dict[str, Adapter] = {a.family: a for a in (Qwen2VLAdapter(), Qwen25VLAdapter(), MllamaAdapter())}


def get_adapter(family: str) -> Adapter:
    if family not in ADAPTERS:
        raise ValueError(f"no adapter for model family {family!r}; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[family]


def adapter_for(obj) -> Adapter:
    """The adapter of a model, a config, a `models.Loaded`, a family name, or an image processor."""
    if isinstance(obj, str):
        return get_adapter(obj)
    if hasattr(obj, "family") and isinstance(obj.family, str) and obj.family in ADAPTERS:
        return ADAPTERS[obj.family]
    name = type(obj).__name__
    if name.startswith("Mllama") and "ImageProcessor" in name:
        return ADAPTERS["mllama"]
    if name.startswith("Qwen2VL") and "ImageProcessor" in name:
        return ADAPTERS["qwen2_vl"]  # Qwen2.5-VL encodes with the same processor and tokens
    conf = getattr(_unwrap(obj), "config", obj)
    model_type = getattr(conf, "model_type", None)
    for a in ADAPTERS.values():
        if a.model_type == model_type:
            return a
    raise ValueError(
        f"cannot tell the model family of {name} (model_type={model_type!r}); supported: {sorted(ADAPTERS)}"
    )


def adapter_for_tokenizer(tok) -> Adapter:
    """The adapter whose image token the tokenizer knows (Qwen's `<|image_pad|>`, Llama's `<|image|>`)."""
    vocab = tok.get_vocab()
    for a in ADAPTERS.values():
        if a.image_token in vocab:
            return a
    raise ValueError(
        f"{type(tok).__name__} knows none of the image tokens {[a.image_token for a in ADAPTERS.values()]}; "
        f"is it the tokenizer of a supported vision-language model ({sorted(ADAPTERS)})?"
    )


def detect_family(src: str, declared: str = "auto") -> str:
    """Family of a checkpoint: its config.json's model_type (local dir, or the hub config through AutoConfig).
    A declared family (`model.family`) must agree with the checkpoint."""
    p = Path(src)
    if (p / "config.json").exists():
        model_type = json.loads((p / "config.json").read_text()).get("model_type")
    elif declared != "auto":
        return get_adapter(declared).family
    else:
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(src).model_type
        except OSError as e:
            raise OSError(
                f"cannot read the config of {src!r} ({e}); offline? pass a local model directory, or set "
                f"model.family to one of {sorted(ADAPTERS)}"
            ) from None
    fam = next((a.family for a in ADAPTERS.values() if a.model_type == model_type), None)
    if fam is None:
        raise ValueError(f"{src}: model_type {model_type!r} has no adapter; supported: {sorted(ADAPTERS)}")
    if declared not in ("auto", fam):
        raise ValueError(f"model.family={declared!r} but {src} is a {fam} checkpoint; set model.family: auto")
    return fam


def build_tiny(family: str, texts: list[str], path: str | Path | None = None, seed: int = 0, **sizes):
    """A tiny random-weight model of `family` with a BPE tokenizer trained on `texts` and a small image
    processor: (model, tokenizer, processor), saved to `path` when given (so `models.load_model` and 4-bit
    loading can read it back). Mllama's cross-attention gates are set to 1 so the image changes the output."""
    import transformers

    ad = get_adapter(family)
    tok = ad.tiny_tokenizer(texts)
    conf = ad.tiny_config(tok, **sizes)
    conf._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, ad.model_class)(conf)
    if family == "mllama":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                    p.fill_(1.0)
    model.eval()
    proc = ad.tiny_image_processor()
    if path is not None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        proc.save_pretrained(path)
    return model, tok, proc
