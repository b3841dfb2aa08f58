"""The text side shared by every model: the embedded teacher's special tokens and chat template, the user turn,
the answer line, and the one byte-level BPE tokenizer trainer (the embedded teacher and the tiny stand-ins)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# the answer line has one definition (data.answers); re-exported for the prompt side
from vskip_core.data.answers import ANSWER_PREFIX, ANSWER_RE, answer_line_start  # noqa: F401

if TYPE_CHECKING:
    import torch

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


# ------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(
    texts: list[str],
    vocab_size: int,
    specials: list[str] | None = None,
    chat_template: str | None = None,
    **named,
):
    """Byte-level BPE trained on `texts`, digits split into single tokens. By default the Qwen special tokens
    and chat template (the embedded teacher); another family passes its own `specials`, template and named
    tokens (bos/eos/pad/extra_special_tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if specials is None:
        specials, chat_template = SPECIAL_TOKENS, chat_template or CHAT_TEMPLATE
        named = {
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "extra_special_tokens": {"image_token": IMAGE_TOKEN},
            **named,
        }
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
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **named)
    if chat_template:
        tok.chat_template = chat_template
    tok.padding_side = "left"
    return tok


# ----------------------------------------------------------------------------------------------- prompts
RATIO_TEMPLATE = (
    "Keep {ratio} of the reasoning."  # a student's compression ratio (common.students.ratio_prompt)
)


def user_text(ex: dict[str, Any], instruction: str = "") -> str:
    text = ex["question"]
    if ex.get("options"):
        text += "\n" + "\n".join(f"({L}) {o}" for L, o in zip("ABCDEFGHIJ", ex["options"]))
    if instruction:
        text += "\n" + instruction
    return text


def n_image_tokens(image_grid_thw: torch.Tensor, merge_size: int) -> int:
    return int(image_grid_thw.prod()) // merge_size**2
