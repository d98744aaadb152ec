"""A word-level tokenizer for the built-in task, so the default tiny policy needs nothing from the hub."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf.tasks import sentiment

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
"""Ids 0-3, in this order: pad, bos, eos, unk."""

ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
"""Chat role markers, placed after the words so that word ``i`` keeps id ``4 + i``."""

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
"""Renders ``<|user|> hi </s> <|assistant|> hello </s> ``; every piece is its own whitespace-split token."""


def build_word_tokenizer(
    words: list[str], model_max_length: int = 512, padding_side: str = "left"
) -> PreTrainedTokenizerFast:
    """A tokenizer that maps each whitespace-separated word to one id.

    Ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, then ``words`` in order, then the chat role
    tokens. Encoding adds no special tokens; ``decode`` joins tokens with single spaces, so
    ``decode(encode(text)) == " ".join(text.split())`` for in-vocabulary text. Left padding is the
    default because generation appends to the right end of the prompt.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not words:
        raise ValueError("words is empty")
    bad = [w for w in words if not isinstance(w, str) or not w or w != w.strip() or len(w.split()) != 1]
    if bad:
        raise ValueError(f"words must be non-empty strings without whitespace, got {bad[:3]!r}")
    reserved = set(SPECIAL_TOKENS + ROLE_TOKENS)
    clash = sorted(reserved.intersection(words))
    if clash:
        raise ValueError(f"words must not contain the reserved tokens {clash}")
    if len(set(words)) != len(words):
        raise ValueError("words contains duplicates")
    tokens = SPECIAL_TOKENS + list(words) + ROLE_TOKENS
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=ROLE_TOKENS,
        model_max_length=model_max_length,
        padding_side=padding_side,
        chat_template=CHAT_TEMPLATE,
        # the default clean-up glues " ." into ".", which would break the word round trip
        clean_up_tokenization_spaces=False,
    )


def builtin_tokenizer(model_max_length: int = 512, padding_side: str = "left") -> PreTrainedTokenizerFast:
    """The word tokenizer over the built-in sentiment task's vocabulary."""
    return build_word_tokenizer(sentiment.VOCAB, model_max_length=model_max_length, padding_side=padding_side)
