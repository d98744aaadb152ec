import pytest
from transformers import AutoTokenizer

from rlhf.tasks.sentiment import VOCAB, make_sft
from rlhf.tokenizers import ROLE_TOKENS, build_word_tokenizer, builtin_tokenizer


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def test_special_token_ids_then_words_then_roles(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids(["<pad>", "<s>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    # word i has id 4 + i; the roles follow the last word
    assert tok.convert_tokens_to_ids(VOCAB[0]) == 4
    assert tok.convert_tokens_to_ids(VOCAB[-1]) == 4 + len(VOCAB) - 1
    assert tok.convert_tokens_to_ids(ROLE_TOKENS) == [4 + len(VOCAB) + i for i in range(3)]
    assert len(tok) == 4 + len(VOCAB) + 3


def test_encode_decode_round_trip_of_task_text(tok):
    for row in make_sft(100, seed=0):
        text = row["prompt"] + " " + row["completion"]
        ids = tok(text)["input_ids"]
        assert len(ids) == len(text.split())  # one id per word, no special tokens added
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_word_ids_follow_the_word_list():
    tok = build_word_tokenizer(["the", "food", "."])
    # ids: the=4, food=5, .=6, unknown -> <unk>=3
    assert tok("the food .")["input_ids"] == [4, 5, 6]
    assert tok("the pizza .")["input_ids"] == [4, 3, 6]
    # whitespace of any kind separates words
    assert tok("the\tfood \n .")["input_ids"] == [4, 5, 6]


def test_decode_skips_specials_when_asked(tok):
    ids = [tok.pad_token_id] + tok("the food was good .")["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "the food was good ."
    assert tok.decode(ids) == "<pad> the food was good . </s>"


def test_batch_left_padding(tok):
    batch = tok(["the food was", "it was"], padding=True, return_tensors="pt")
    it, was = tok.convert_tokens_to_ids(["it", "was"])
    # the shorter row is padded on the left with <pad> = 0
    assert batch["input_ids"][1].tolist() == [0, it, was]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]


def test_right_padding_is_configurable():
    tok = builtin_tokenizer(padding_side="right")
    batch = tok(["the food was", "it was"], padding=True)
    assert batch["input_ids"][1][-1] == 0
    assert batch["attention_mask"][1] == [1, 1, 0]


def test_chat_template_renders_and_encodes_roles(tok):
    messages = [{"role": "user", "content": "the food was"}, {"role": "assistant", "content": "good ."}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|user|> the food was </s> <|assistant|> good . </s> "
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|> the food was </s> <|assistant|> "
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|user|>")
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "the food was good ."


def test_save_and_auto_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "honestly the food was superb , and i loved it ."
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (0, 2, 1)
    assert loaded.padding_side == "left"
    messages = [{"role": "user", "content": "it was"}]
    assert loaded.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(
        messages, tokenize=False
    )


def test_model_max_length_is_set():
    assert build_word_tokenizer(["a"], model_max_length=32).model_max_length == 32


@pytest.mark.parametrize(
    "words, kwargs, match",
    [
        ([], {}, "empty"),
        (["a", "a"], {}, "duplicates"),
        (["a b"], {}, "whitespace"),
        ([""], {}, "whitespace"),
        (["<pad>"], {}, "reserved"),
        (["a"], {"padding_side": "middle"}, "padding_side"),
    ],
)
def test_build_rejects_bad_input(words, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_word_tokenizer(words, **kwargs)
