"""Model-family adapters: everything that differs between Qwen2-VL, Qwen2.5-VL and Llama-3.2-Vision, behind one
interface, so generation, scoring, distillation, evaluation and the plan never branch on the family.

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

The registry. Each family is one file that defines an `Adapter` subclass and registers it with
`@register_family` (an instance goes into `vskip_core.registry.FAMILIES`); the built-ins are
`vskip_core/modeling/families/` (qwen2_vl.py, qwen2_5_vl.py, mllama.py), imported by `vskip_core.modeling`, so
they are always registered. `ADAPTERS`, `get_adapter`, `adapter_for`, `detect_family` and the config's
`model.family` read the registry; loading, collate, the pruned decoder and the plan ask the adapter for every
fact that differs per family (the class attributes and methods of `Adapter`), never compare family names.
Adding a family in one file (import it before the params are loaded: a notebook cell, your package's init):

    from vskip_core.modeling.adapters import register_family
    from vskip_core.modeling.families.qwen2_vl import Qwen2VLAdapter

    @register_family
    class MyVLAdapter(Qwen2VLAdapter):        # image tokens in the sequence, encoded as Qwen2-VL's
        family = "my_vl"                      # model.family: my_vl (or auto: found by model_type)
        model_type = "my_vl"                  # config.json's model_type of its checkpoints
        model_class = "MyVLForConditionalGeneration"
        config_class = "MyVLConfig"
        pruned_decoding_unsupported = "its vision tower is not wired into modeling.pruned_decoding"

A family unlike both built-ins subclasses `Adapter` and writes encode, collate, image_keys, attention_module,
image_processor, the plan's facts and the tiny_* builders. `detect = False` keeps a family out of
auto-detection (chosen by `model.family` only), e.g. a variant of a built-in serving the same model_type.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import vskip_core.registry as registry
from vskip_core.config import Config
from vskip_core.modeling.prompts import user_text
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
    """One model family: how its prompts and images are encoded, where the image sits for visual anchoring,
    its key-layer candidates and LoRA targets, and the facts the loader, the pruned decoder and the plan ask
    for. Subclass it and decorate with `register_family` (the module docstring has an example)."""

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
    projector_module = ""  # the vision-to-text projector beside the tower, if separate ("" = inside it)
    input_keys: tuple[str, ...] = ()
    not_in_vllm = ""  # why vLLM cannot serve this family ("" = it can: stage 01's --backend vllm)
    # ---- how generic code finds the family
    config_class = ""  # transformers config class name (the plan builds hub configs with it)
    detect = True  # auto-detection may pick it (False: only `model.family` / `get_adapter` by name)
    processor_prefix = ""  # class-name prefix of its image processors ("Qwen2VL": Qwen2VLImageProcessorPil)
    item_keys: tuple[
        str, ...
    ] = ()  # keys only this family's `encode` outputs carry (collate tells them apart)
    # ---- facts other modules read
    pruned_decoding_unsupported = ""  # why modeling.pruned_decoding cannot run it ("" = it can)
    standin_generation: dict[str, Any] = {}  # sampling fields of the published checkpoints (stand-in builds)
    hub_configs: dict[str, dict[str, Any]] = {}  # hub id -> `config_class` kwargs: the plan sizes it offline

    # ---- detection
    def serves(self, model_type: str | None) -> bool:
        """Whether this adapter loads checkpoints of `model_type` (config.json's)."""
        return model_type == self.model_type

    def owns_processor(self, proc) -> bool:
        name = type(proc).__name__
        return (
            bool(self.processor_prefix)
            and name.startswith(self.processor_prefix)
            and "ImageProcessor" in name
        )

    def owns_item(self, item: dict[str, Any]) -> bool:
        """Whether an `encode` output is this family's (by the keys only its items carry)."""
        return bool(self.item_keys) and all(k in item for k in self.item_keys)

    # ---- prompts
    def messages(self, ex, instruction: str = "", prefix: str = "", image=None):
        parts, images = interleave(ex, instruction, prefix, image)
        return [{"role": "user", "content": parts}], images

    @staticmethod
    def tiny_text_config(tok, hidden: int, layers: int, heads: int, kv_heads: int) -> dict[str, Any]:
        """The text-model sizes every tiny stand-in shares; a family adds its rope and special tokens."""
        return {
            "vocab_size": len(tok),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_position_embeddings": 2048,
            "pad_token_id": tok.pad_token_id,
        }

    def chat_text(self, tok, ex, instruction: str = "", prefix: str = "", image=None) -> tuple[str, list]:
        """The chat template's text of one example's user turn and its images (one image token each)."""
        messages, images = self.messages(ex, instruction, prefix, image)
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(self.image_token) != len(images):
            raise ValueError(
                f"example {ex.get('id')}: the chat template produced {text.count(self.image_token)} image "
                f"tokens; expected exactly {len(images)}"
            )
        return text, images

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
        skip = [rf"(?:.*\.)?{self.vision_module}", "lm_head"]
        return skip + ([rf"(?:.*\.)?{self.projector_module}"] if self.projector_module else [])

    def vision_modules(self) -> tuple[str, ...]:
        """Names (under `model.model`) of the parameters the plan counts as vision: tower and projector."""
        return (self.vision_module, self.projector_module) if self.projector_module else (self.vision_module,)

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
        model.vskip_family = self.family  # adapter_for(model) finds a family chosen by name (detect = False)
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

    # ---- the plan's sizes (vskip_core.infra.plan), first order
    def plan_vision_facts(self, conf) -> dict[str, int]:
        """Extra `plan.ModelSpec` fields read from the model config (e.g. Mllama's tiles)."""
        return {}

    def lm_tokens_per_image(self, image_tokens: float) -> float:
        """Tokens an image occupies in the language model's sequence, for `image_tokens` visual tokens."""
        return image_tokens

    def vision_tokens_per_image(self, spec, images: list[float], image_tokens: list[float]) -> float:
        """Tokens the vision tower processes per image, from the per-source (images per example, visual
        tokens per image) of the benchmark mix."""
        raise NotImplementedError

    def cross_attention_flops(self, spec, seq, tokens: float) -> float:
        """Prefill FLOPs of text rows attending to vision tokens outside the sequence (0: none)."""
        return 0.0

    def cross_attention_bytes(self, spec, seq, batch, query_len, dtype_bytes, eager) -> tuple[float, float]:
        """(vision keys and values, one cross layer's attention scores) in bytes, for inference memory."""
        return 0.0, 0

    def hub_access_note(self, name: str) -> str:
        """A note for the plan when hub checkpoint `name` needs more than a download ("" = none)."""
        return ""

    # ---- tiny random-weight models (tests, dry runs)
    def tiny_tokenizer(self, texts: list[str], vocab_size: int = 400):
        raise NotImplementedError

    def tiny_config(self, tok, **sizes):
        raise NotImplementedError

    def tiny_image_processor(self):
        raise NotImplementedError

    def tiny_init(self, model) -> None:
        """Set weights a random init leaves inert (after seeding, before saving); default nothing."""


def _checkpoint_chat_template(src: str) -> str | None:
    """A processor-level chat template saved beside the checkpoint (chat_template.jinja / .json)."""
    d = Path(src)
    if (d / "chat_template.jinja").exists():
        return (d / "chat_template.jinja").read_text()
    if (d / "chat_template.json").exists():
        return json.loads((d / "chat_template.json").read_text()).get("chat_template")
    return None


# --------------------------------------------------------------------------------------------- the registry
def register_family(cls: type[Adapter] | None = None, *, replace: bool = False):
    """Class decorator: register an instance of an `Adapter` subclass under its `family` in
    `vskip_core.registry.FAMILIES`. `@register_family` or `@register_family(replace=True)`."""

    def deco(c: type[Adapter]) -> type[Adapter]:
        if not (isinstance(c, type) and issubclass(c, Adapter)):
            raise TypeError(f"register_family takes an Adapter subclass, got {c!r}")
        registry.FAMILIES.register(c.family, c(), replace=replace)
        return c

    return deco if cls is None else deco(cls)


class _Adapters(Mapping):
    """family -> Adapter, a live read-only view of `registry.FAMILIES` (in registration order)."""

    def __getitem__(self, family: str) -> Adapter:
        if family not in registry.FAMILIES:
            raise KeyError(family)
        return registry.FAMILIES.get(family)

    def __iter__(self) -> Iterator[str]:
        return iter(registry.FAMILIES)

    def __len__(self) -> int:
        return len(registry.FAMILIES)

    def __repr__(self) -> str:
        return f"ADAPTERS({list(self)})"


ADAPTERS: Mapping[str, Adapter] = _Adapters()


def _detectable() -> list[Adapter]:
    return [a for a in ADAPTERS.values() if a.detect]


def get_adapter(family: str) -> Adapter:
    """The registered adapter of `family`; an unknown name raises `registry.UnknownName` (a ValueError)
    listing the registered families and the nearest one."""
    return registry.FAMILIES.get(family)


def adapter_for(obj) -> Adapter:
    """The adapter of a model, a config, a `models.Loaded`, a family name, or an image processor."""
    if isinstance(obj, str):
        return get_adapter(obj)
    if hasattr(obj, "family") and isinstance(obj.family, str) and obj.family in ADAPTERS:
        return ADAPTERS[obj.family]
    family = getattr(_unwrap(obj), "vskip_family", None)  # set by Adapter.load
    if isinstance(family, str) and family in ADAPTERS:
        return ADAPTERS[family]
    name = type(obj).__name__
    for a in _detectable():  # Qwen2.5-VL encodes with Qwen2-VL's processor: the first registered wins
        if a.owns_processor(obj):
            return a
    conf = getattr(_unwrap(obj), "config", obj)
    model_type = getattr(conf, "model_type", None)
    for a in _detectable():
        if a.serves(model_type):
            return a
    raise ValueError(
        f"cannot tell the model family of {name} (model_type={model_type!r}); supported: {sorted(ADAPTERS)}"
    )


def adapter_for_item(item: dict[str, Any]) -> Adapter:
    """The adapter whose `encode` made `item` (by the keys only its family's items carry)."""
    for a in _detectable():
        if a.owns_item(item):
            return a
    raise ValueError(
        f"no registered family encodes items with keys {sorted(item)}; expected one of "
        f"{ {a.family: list(a.item_keys) for a in _detectable()} }"
    )


def adapter_for_tokenizer(tok) -> Adapter:
    """The adapter whose image token the tokenizer knows (Qwen's `<|image_pad|>`, Llama's `<|image|>`)."""
    vocab = tok.get_vocab()
    for a in _detectable():
        if a.image_token in vocab:
            return a
    raise ValueError(
        f"{type(tok).__name__} knows none of the image tokens {[a.image_token for a in _detectable()]}; "
        f"is it the tokenizer of a supported vision-language model ({sorted(ADAPTERS)})?"
    )


def family_of_model_type(model_type: str | None, declared: str = "auto", src: str = "") -> str:
    """The family serving checkpoints of `model_type`: the declared one (which must serve it), else the first
    registered detectable family that does."""
    fam = next((a.family for a in _detectable() if a.serves(model_type)), None)
    if declared != "auto":
        if get_adapter(declared).serves(model_type):
            return declared
        what = f"a {fam} checkpoint" if fam else f"a {model_type!r} checkpoint"
        raise ValueError(
            f"model.family={declared!r} but {src or 'the model'} is {what}; set model.family: auto"
        )
    if fam is None:
        raise ValueError(
            f"{src or 'the model'}: model_type {model_type!r} has no adapter; supported: {sorted(ADAPTERS)}"
        )
    return fam


def detect_family(src: str, declared: str = "auto") -> str:
    """Family of a checkpoint: its config.json's model_type (local dir, or the hub config through AutoConfig).
    A declared family (`model.family`) must serve the checkpoint's model_type."""
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
    return family_of_model_type(model_type, declared, src)


def build_tiny(family: str, texts: list[str], path: str | Path | None = None, seed: int = 0, **sizes):
    """A tiny random-weight model of `family` with a BPE tokenizer trained on `texts` and a small image
    processor: (model, tokenizer, processor), saved to `path` when given (so `models.load_model` and 4-bit
    loading can read it back). The adapter's `tiny_init` then sets what a random init leaves inert (Mllama's
    cross-attention gates to 1, so the image changes the output)."""
    import transformers

    ad = get_adapter(family)
    tok = ad.tiny_tokenizer(texts)
    conf = ad.tiny_config(tok, **sizes)
    conf._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, ad.model_class)(conf)
    ad.tiny_init(model)
    model.eval()
    proc = ad.tiny_image_processor()
    if path is not None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        proc.save_pretrained(path)
    return model, tok, proc
