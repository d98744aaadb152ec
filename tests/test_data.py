import csv
import json

import datasets
import pytest
import torch

from rlhf import data
from rlhf.data import (
    DataError,
    load_preferences,
    load_prompts,
    load_scalar,
    load_sft,
    load_table,
    tokenize_sft,
)
from rlhf.tasks import sentiment
from rlhf.tokenizers import builtin_tokenizer

BUILTIN = "builtin:sentiment"


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def write_parquet(path, rows):
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# --- built-in source ---


def test_builtin_tables_follow_the_task_generators():
    table = load_table(BUILTIN, "sft", split="train", n=20, seed=3)
    assert table.to_list() == sentiment.make_sft(20, seed=3, split="train")
    assert load_prompts(BUILTIN, split="test", n=7, seed=1) == sentiment.make_prompts(7, seed=1, split="test")


def test_builtin_train_and_test_prompts_are_disjoint():
    train = set(load_prompts(BUILTIN, split="train", n=1000))
    test = set(load_prompts(BUILTIN, split="test", n=300))
    assert train and test and not train & test


def test_builtin_default_sizes():
    assert len(load_table(BUILTIN, "prompts", split="test")) == data.BUILTIN_SIZES["test"]


def test_builtin_options_reach_the_generator():
    rows = load_scalar(BUILTIN, n=50, noise_std=0.0)
    assert rows["label"] == pytest.approx([sentiment.gold_score(t) for t in rows["text"]])
    pairs = load_preferences(BUILTIN, n=5, seed=2, temperature=0.3)
    assert pairs.to_list() == sentiment.make_preferences(5, seed=2, split="train", temperature=0.3)


def test_options_for_a_task_without_options_are_one_line_errors():
    """builtin:sentiment's prompt generator takes no options: data.options is refused by name, not with a TypeError
    from deep inside the generator."""
    with pytest.raises(DataError, match=r"^data\.options: builtin:sentiment takes no options; got digits, ops \("):
        load_prompts(BUILTIN, options={"ops": "+", "digits": 3})
    # a task with options still takes them: one-digit problems
    assert all(len(t) == 1 for p in load_prompts("builtin:arithmetic", n=5, options={"digits": 1})
               for t in p.removeprefix("Calculate ").split(".")[0].split(" ")[::2])


def test_builtin_errors():
    with pytest.raises(DataError, match="unknown built-in task 'nope'.*sentiment"):
        load_prompts("builtin:nope")
    with pytest.raises(DataError, match="no split 'validation'"):
        load_prompts(BUILTIN, split="validation")
    with pytest.raises(DataError, match="n must be"):
        load_prompts(BUILTIN, n=0)


# --- local files ---


PC_ROWS = [
    {"q": "the food was", "a": "good .", "extra": 1},
    {"q": "it was", "a": "awful .", "extra": 2},
    {"q": "the movie was", "a": "dull .", "extra": 3},
]


@pytest.mark.parametrize(
    "writer, suffix", [(write_jsonl, "jsonl"), (write_csv, "csv"), (write_parquet, "parquet")]
)
def test_sft_from_each_file_format_with_renamed_columns(tmp_path, writer, suffix):
    path = writer(tmp_path / f"sft.{suffix}", PC_ROWS)
    table = load_sft(path, prompt_column="q", completion_column="a")
    assert table.column_names == ["prompt", "completion"]
    assert table["prompt"] == ["the food was", "it was", "the movie was"]
    assert table["completion"] == ["good .", "awful .", "dull ."]


def test_json_array_file_and_n_takes_the_first_rows(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": f"p{i}"} for i in range(5)]))
    assert load_prompts(str(path), n=2) == ["p0", "p1"]


def test_text_and_messages_formats(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "the food was good ."}])
    assert load_sft(path, format="text", text_column="body").to_list() == [{"text": "the food was good ."}]
    chat = [{"role": "user", "content": "it was"}, {"role": "assistant", "content": "fine ."}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"conv": chat}])
    assert load_sft(path, format="messages", messages_column="conv")["messages"] == [chat]


def test_preferences_with_margin_and_scalar_from_csv(tmp_path):
    rows = [
        {"x": "it was", "good": "fine .", "bad": "awful .", "m": 0.5},
        {"x": "a", "good": "b", "bad": "c", "m": 2},
    ]
    table = load_preferences(
        write_csv(tmp_path / "p.csv", rows),
        prompt_column="x",
        chosen_column="good",
        rejected_column="bad",
        margin_column="m",
    )
    assert table.column_names == ["prompt", "chosen", "rejected", "margin"]
    assert table["margin"] == [0.5, 2.0]
    scalar = load_scalar(
        write_csv(tmp_path / "s.csv", [{"t": "a .", "y": 1}, {"t": "b .", "y": -0.25}]), "t", "y"
    )
    assert scalar.to_list() == [{"text": "a .", "label": 1.0}, {"text": "b .", "label": -0.25}]


def test_hub_source_calls_load_dataset_with_name_and_split(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"question": "it was"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_prompts("org/name", column="question", split="validation") == ["it was"]
    assert calls == [("org/name", "validation")]


def test_hub_failure_becomes_a_one_line_data_error(monkeypatch):
    def failing_load_dataset(name, split):
        raise ConnectionError("no network\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(DataError, match=r"^cannot load hub dataset 'org/name' split 'train': no network$"):
        load_prompts("org/name")


# --- errors ---


def test_missing_file_names_the_file(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=f"not found: {missing}"):
        load_prompts(missing)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'.*\.jsonl"):
        load_prompts(str(path))


@pytest.mark.parametrize(
    "name, content", [("e.jsonl", ""), ("e.csv", "prompt,completion\n"), ("e.json", "[]")]
)
def test_empty_file_names_source_and_split(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=f"'{path}' split 'train' is empty"):
        load_prompts(str(path))


def test_empty_parquet(tmp_path):
    path = tmp_path / "e.parquet"
    datasets.Dataset.from_dict({"prompt": []}).to_parquet(str(path))
    with pytest.raises(DataError, match="is empty"):
        load_prompts(str(path))


def test_missing_column_lists_available_columns(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "a", "id": 1}])
    with pytest.raises(DataError, match=r"has no column 'prompt'; available columns: question, id$"):
        load_prompts(path)
    with pytest.raises(DataError, match="no column 'rejected'"):
        load_preferences(write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a", "chosen": "b"}]))


@pytest.mark.parametrize(
    "rows, row",
    [
        ([{"prompt": "a"}, {"prompt": 5}], 1),
        ([{"prompt": "a"}, {"prompt": "b"}, {"prompt": ""}], 2),
        ([{"prompt": "  "}], 0),
        ([{"prompt": "a"}, {"prompt": None}], 1),
    ],
)
def test_bad_prompt_values_name_column_and_row(tmp_path, rows, row):
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match=f"column 'prompt' row {row} "):
        load_prompts(path)


def test_bad_label_names_column_and_row(tmp_path):
    path = write_csv(tmp_path / "s.csv", [{"text": "a", "label": 1}, {"text": "b", "label": "high"}])
    with pytest.raises(DataError, match="column 'label' row 1 .*'high'"):
        load_scalar(path)


def test_bad_messages_and_format(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(DataError, match="column 'messages' row 0"):
        load_sft(path, format="messages")
    with pytest.raises(DataError, match="format must be"):
        load_sft(path, format="chat")


def test_errors_are_value_errors():
    assert issubclass(DataError, ValueError)


# --- tokenize_sft ---


def test_tokenize_prompt_completion_masks_prompt_and_padding(tok):
    table = datasets.Dataset.from_list(
        [{"prompt": "the food was", "completion": "good ."}, {"prompt": "it was", "completion": "bad ."}]
    )
    out = tokenize_sft(table, tok, max_length=16)
    eos = tok.eos_token_id
    # row 0: 3 prompt + 2 completion + EOS = 6 tokens; row 1: 2 + 2 + 1 = 5, then one right pad (id 0)
    assert out["input_ids"].tolist() == [
        ids(tok, "the food was good .") + [eos],
        ids(tok, "it was bad .") + [eos, 0],
    ]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    assert out["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0]]
    assert out["input_ids"].dtype == torch.long


def test_tokenize_without_completion_only_trains_on_all_real_tokens(tok):
    table = datasets.Dataset.from_list(
        [{"prompt": "the food was", "completion": "good ."}, {"prompt": "it was", "completion": "bad ."}]
    )
    out = tokenize_sft(table, tok, max_length=16, completion_only=False)
    assert torch.equal(out["loss_mask"], out["attention_mask"])


def test_tokenize_truncates_and_drops_rows_without_targets(tok):
    table = datasets.Dataset.from_list(
        [
            {"prompt": "the food was", "completion": "good ."},
            {"prompt": "honestly the food was", "completion": "ok"},
        ]
    )
    with pytest.warns(UserWarning, match="dropped 1"):
        out = tokenize_sft(table, tok, max_length=4)
    # row 0 cut to its first 4 tokens: 3 prompt tokens then "good"; row 1 has 4 prompt tokens -> dropped
    assert out["input_ids"].tolist() == [ids(tok, "the food was good")]
    assert out["loss_mask"].tolist() == [[0, 0, 0, 1]]


def test_tokenize_text_format_trains_on_everything(tok):
    table = datasets.Dataset.from_list([{"text": "it was fine ."}])
    out = tokenize_sft(table, tok, max_length=8, add_eos=False)
    assert out["input_ids"].tolist() == [ids(tok, "it was fine .")]
    assert out["loss_mask"].tolist() == [[1, 1, 1, 1]]


def test_tokenize_messages_masks_all_but_assistant_turns(tok):
    chat = [
        {"role": "user", "content": "the food was"},
        {"role": "assistant", "content": "good ."},
        {"role": "user", "content": "and"},
        {"role": "assistant", "content": "the staff was rude ."},
    ]
    out = tokenize_sft(datasets.Dataset.from_list([{"messages": chat}]), tok, max_length=64)
    tokens = tok.convert_ids_to_tokens(out["input_ids"][0].tolist())
    assert " ".join(tokens) == tok.apply_chat_template(chat, tokenize=False).strip()
    targets = [t for t, m in zip(tokens, out["loss_mask"][0].tolist()) if m]
    # assistant contents and the </s> closing each assistant turn; no role header, no user text
    assert targets == ["good", ".", "</s>", "the", "staff", "was", "rude", ".", "</s>"]


def test_tokenize_validates_arguments(tok):
    table = datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}])
    with pytest.raises(ValueError, match="max_length"):
        tokenize_sft(table, tok, max_length=0)
    with pytest.raises(ValueError, match="columns"):
        tokenize_sft(datasets.Dataset.from_list([{"x": "a"}]), tok, max_length=8)
