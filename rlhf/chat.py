"""Chat formatting of prompts: a plain prompt becomes the user turn of a conversation rendered by the tokenizer's chat
template, ending in the assistant's header, so a chat model answers it as it was trained to.

    format_prompts(tok, ["2 + 3 ="], mode="auto", system_prompt="Answer with a number.")
    -> ["<|im_start|>system\\nAnswer with a number.<|im_end|>\\n<|im_start|>user\\n2 + 3 =<|im_end|>\\n"
        "<|im_start|>assistant\\n"]                                                       (SmolLM2's template)

``data.chat_template`` picks the mode: true, false, or auto (on for a tokenizer with a chat template of its own).
Templated text already holds every special token the model expects (BOS included, where the template writes one),
so it is tokenized with ``add_special_tokens=False`` (:func:`add_special_tokens_for`): a second BOS in front of the
template's would put the prompt off the distribution the model was tuned on. Plain prompts keep the tokenizer's own
special tokens, as before.

Reward and correctness functions always get the plain prompt, never the rendered one.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from rlhf.config import ConfigError

CHAT_MODES = ("auto", True, False)
"""Values of ``data.chat_template`` (the strings "true" and "false" are read as the booleans)."""


def chat_mode(mode: str | bool) -> str | bool:
    """``mode`` as one of CHAT_MODES (checked before anything loads), or a one-line ConfigError naming
    data.chat_template."""
    if isinstance(mode, str) and mode.lower() in ("true", "false"):
        return mode.lower() == "true"
    if isinstance(mode, bool) or mode == "auto":
        return mode
    raise ConfigError(f"data.chat_template: {mode!r} is not one of auto, true, false")


def has_own_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the tokenizer has a chat template that is not the built-in word tokenizer's.

    The word tokenizer (``builtin:words``) carries :data:`rlhf.tokenizers.CHAT_TEMPLATE` so that SFT's ``messages``
    format runs offline, but the random-init models it drives learn the built-in tasks from plain prompts: turning
    chat formatting on for them by default would change every built-in run.
    """
    from rlhf.tokenizers import CHAT_TEMPLATE

    template = getattr(tokenizer, "chat_template", None)
    return bool(template) and template != CHAT_TEMPLATE


def chat_enabled(tokenizer: PreTrainedTokenizerBase, mode: str | bool = "auto") -> bool:
    """Resolve ``mode`` (``data.chat_template``: auto, true or false) for ``tokenizer``.

    auto: on when the tokenizer has a chat template of its own (:func:`has_own_chat_template`). true on a tokenizer
    without any chat template is a one-line ConfigError naming data.chat_template.
    """
    mode = chat_mode(mode)
    if mode == "auto":
        return has_own_chat_template(tokenizer)
    if mode and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"data.chat_template: true needs a tokenizer with a chat template, and "
                          f"{getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has none; "
                          "set data.chat_template=false (or auto)")
    return mode


def messages_for(prompt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The conversation of one prompt: ``[{"role": "system", ...}]`` when ``system_prompt``, then the user turn."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": prompt}]


def add_special_tokens_for(chat: bool) -> bool:
    """The ``add_special_tokens`` to tokenize formatted prompts with: False for chat-templated text (the template
    wrote the special tokens itself), True for plain prompts (the tokenizer's own BOS, as the trainer always did)."""
    return not chat


def format_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], mode: str | bool = "auto",
                   system_prompt: str | None = None) -> list[str]:
    """The text each prompt is tokenized from: the chat template's rendering of :func:`messages_for` with the
    generation prompt (the assistant's header) when chat formatting is on (:func:`chat_enabled`), else the prompt.

    A ``system_prompt`` needs chat formatting: there is no one right way to put a system turn into a plain prompt,
    so with chat formatting off it is a one-line ConfigError naming data.system_prompt rather than a guess.
    Tokenize the result with ``add_special_tokens=add_special_tokens_for(chat_enabled(tokenizer, mode))``.
    """
    if not chat_enabled(tokenizer, mode):
        if system_prompt:
            raise ConfigError(f"data.system_prompt: the prompts are not chat-formatted (data.chat_template="
                              f"{str(mode).lower()}), so a system turn has no place in them; remove it or set "
                              "data.chat_template=true with a tokenizer that has a chat template")
        return list(prompts)
    return [tokenizer.apply_chat_template(messages_for(p, system_prompt), tokenize=False, add_generation_prompt=True)
            for p in prompts]
