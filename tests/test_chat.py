"""rlhf.chat: prompts rendered by a chat template, tokenized without a second BOS.

The tokenizer here is a word tokenizer built in memory (no download, no cache folder) whose post-processor adds BOS,
as Llama's and Gemma's do, and whose template writes BOS itself: the case where tokenizing templated text with the
tokenizer's own special tokens would put two BOS in front of the prompt.
"""

import pytest
from tokenizers import processors

from rlhf.chat import (
    add_special_tokens_for,
    chat_enabled,
    format_prompts,
    has_own_chat_template,
    messages_for,
)
from rlhf.config import ConfigError
from rlhf.models import load_tokenizer
from rlhf.tokenizers import build_word_tokenizer

TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} </s> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
WORDS = ["the", "food", "was", "be", "brief"]  # ids 4..8; then <|system|> 9, <|user|> 10, <|assistant|> 11


def bos_tokenizer(template=TEMPLATE):
    tok = build_word_tokenizer(WORDS)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.chat_template = template
    return tok


def test_messages_for_puts_the_system_turn_first():
    assert messages_for("hi") == [{"role": "user", "content": "hi"}]
    assert messages_for("hi", "be brief") == [{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": "hi"}]


def test_chat_renders_user_and_system_turns_and_the_assistant_header():
    tok = bos_tokenizer()
    assert format_prompts(tok, ["the food was"], True) == ["<s><|user|> the food was </s> <|assistant|> "]
    assert format_prompts(tok, ["the food was"], "true", system_prompt="be brief") == [
        "<s><|system|> be brief </s> <|user|> the food was </s> <|assistant|> "]


def test_templated_text_tokenizes_to_the_templates_own_ids_with_one_bos():
    tok = bos_tokenizer()
    messages = messages_for("the food was", "be brief")
    (text,) = format_prompts(tok, ["the food was"], True, system_prompt="be brief")
    ids = tok(text, add_special_tokens=add_special_tokens_for(True))["input_ids"]
    expected = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    # <s> <|system|> be brief </s> <|user|> the food was </s> <|assistant|>
    assert ids == expected == [1, 9, 7, 8, 2, 10, 4, 5, 6, 2, 11]
    # what add_special_tokens=True would have done: the post-processor's BOS in front of the template's
    assert tok(text)["input_ids"][:2] == [1, 1]


def test_plain_prompts_keep_the_tokenizers_own_bos():
    tok = bos_tokenizer()
    (text,) = format_prompts(tok, ["the food was"], False)
    assert text == "the food was"
    assert tok(text, add_special_tokens=add_special_tokens_for(False))["input_ids"] == [1, 4, 5, 6]


def test_auto_is_on_for_a_tokenizer_with_its_own_template_only():
    assert chat_enabled(bos_tokenizer(), "auto")
    no_template = bos_tokenizer(template=None)
    assert not chat_enabled(no_template, "auto")
    assert format_prompts(no_template, ["the food was"]) == ["the food was"]
    # the built-in word tokenizer's template is there for SFT's messages format: built-in runs stay plain
    words = load_tokenizer("builtin:words")
    assert words.chat_template and not has_own_chat_template(words)
    assert format_prompts(words, ["the food was"]) == ["the food was"]
    assert format_prompts(words, ["the food was"], True) == ["<|user|> the food was </s> <|assistant|> "]


def test_true_without_a_template_is_one_line_naming_data_chat_template():
    with pytest.raises(ConfigError, match=r"^data\.chat_template: true needs a tokenizer with a chat template") as e:
        format_prompts(bos_tokenizer(template=None), ["the food was"], True)
    assert "\n" not in str(e.value)


def test_a_system_prompt_without_chat_formatting_is_refused():
    with pytest.raises(ConfigError, match=r"^data\.system_prompt: the prompts are not chat-formatted"):
        format_prompts(bos_tokenizer(), ["the food was"], False, system_prompt="be brief")
    with pytest.raises(ConfigError, match=r"^data\.system_prompt:"):  # auto, resolved off
        format_prompts(bos_tokenizer(template=None), ["the food was"], "auto", system_prompt="be brief")


@pytest.mark.parametrize("mode", ["yes", 1, None])
def test_an_unknown_mode_is_refused(mode):
    with pytest.raises(ConfigError, match=r"^data\.chat_template: .* is not one of auto, true, false"):
        chat_enabled(bos_tokenizer(), mode)
