"""Load prompts, SFT, preference and scalar-label data from the built-in task, local files or the hub.

A ``source`` is one of:

- ``"builtin:sentiment"``: generated in memory by ``rlhf.tasks.sentiment``; ``kind`` picks the generator
  and ``split`` ("train" or "test") picks a disjoint set of prompts.
- a local file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``): the whole file is the split, so
  ``split`` is ignored; give the test set as its own file.
- anything else is a hub dataset name, loaded with ``datasets.load_dataset(name, split=split)``.

Every loader returns columns under fixed names (``prompt``, ``completion``, ``chosen``, ...) whatever
the source calls them, and every problem with the data raises a one-line ``DataError``.
"""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path

import datasets
import pyarrow.parquet
import torch

from rlhf.tasks import arithmetic, countdown, sentiment, wordcount

BUILTIN_TASKS = {
    "sentiment": sentiment.make_split,
    "arithmetic": arithmetic.make_split,
    "countdown": countdown.make_split,
    "wordcount": wordcount.make_split,
}
BUILTIN_SIZES = {"train": 2048, "test": 256}
"""Rows generated for a built-in source when ``n`` is None."""

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_OTHER_FILE_SUFFIXES = {".txt", ".tsv", ".arrow", ".xlsx", ".gz", ".zip", ".pkl", ".yaml", ".yml", ".npy"}


class DataError(ValueError):
    """The data cannot be used as asked; the message names the source, split, column or row."""


def load_table(
    source: str, kind: str, split: str = "train", n: int | None = None, seed: int = 0, **options
) -> datasets.Dataset:
    """The raw table of ``source``, at most ``n`` rows (the first ``n`` of a file or hub split).

    ``kind`` ("prompts", "sft", "preferences", "scalar") only matters for built-in sources, where
    ``options`` (e.g. ``temperature``, ``noise_std``) go to the generator and ``seed`` seeds it.
    """
    if n is not None and (not isinstance(n, int) or n < 1):
        raise DataError(f"n must be a positive int or None, got {n!r}")
    if source.startswith("builtin:"):
        table = _load_builtin(source, kind, split, n, seed, options)
    elif _looks_like_file(source):
        table = _load_file(source)
    else:
        table = _load_hub(source, split)
    if n is not None and len(table) > n:
        table = table.select(range(n))
    if len(table) == 0:
        raise DataError(f"{source!r} split {split!r} is empty")
    return table


def _load_builtin(
    source: str, kind: str, split: str, n: int | None, seed: int, options: dict
) -> datasets.Dataset:
    name = source.removeprefix("builtin:")
    if name not in BUILTIN_TASKS:
        raise DataError(
            f"unknown built-in task {name!r} in {source!r}; valid: {', '.join(sorted(BUILTIN_TASKS))}"
        )
    if split not in BUILTIN_SIZES:
        raise DataError(f"{source!r} has no split {split!r}; valid: {', '.join(BUILTIN_SIZES)}")
    rows = BUILTIN_TASKS[name](
        kind, BUILTIN_SIZES[split] if n is None else n, seed=seed, split=split, **options
    )
    if kind == "prompts":
        rows = [{"prompt": p} for p in rows]
    return datasets.Dataset.from_list(rows)


def _looks_like_file(source: str) -> bool:
    suffix = Path(source).suffix.lower()
    return (
        suffix in FILE_BUILDERS
        or suffix in _OTHER_FILE_SUFFIXES
        or source.startswith(("/", ".", "~"))
        or Path(source).exists()
    )


def _load_file(source: str) -> datasets.Dataset:
    path = Path(source).expanduser()
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"unsupported file type {path.suffix!r} for {source!r}; use one of {', '.join(FILE_BUILDERS)}"
        )
    if not path.is_file():
        raise DataError(f"data file not found: {source}")
    if _file_has_no_rows(path, builder):
        return datasets.Dataset.from_dict({})
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # parse errors come wrapped in several datasets/pyarrow types
        raise DataError(f"cannot read {source}: {_first_line(err)}") from err


def _file_has_no_rows(path: Path, builder: str) -> bool:
    """The loaders fail with unrelated messages on empty files, so empty files are caught first."""
    if builder == "parquet":
        return pyarrow.parquet.read_metadata(path).num_rows == 0
    with open(path) as f:
        # a header, or "[" and "]", and one more line: the first three non-blank lines decide
        head = list(itertools.islice((line.strip() for line in f if line.strip()), 3))
    if builder == "csv":
        return len(head) <= 1
    return "".join(head) in ("", "[]")


def _load_hub(source: str, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as err:  # the hub raises many unrelated types; all mean "cannot use this source"
        raise DataError(f"cannot load hub dataset {source!r} split {split!r}: {_first_line(err)}") from err


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _require_columns(table: datasets.Dataset, source: str, columns: list[str]) -> None:
    for column in columns:
        if column not in table.column_names:
            raise DataError(
                f"{source!r} has no column {column!r}; available columns: {', '.join(table.column_names)}"
            )


def _check_strings(table: datasets.Dataset, source: str, column: str) -> None:
    for row, value in enumerate(table[column]):
        if not isinstance(value, str) or not value.strip():
            raise DataError(
                f"{source!r} column {column!r} row {row} (0-based): expected a non-empty string, got {value!r}"
            )


def _check_numbers(table: datasets.Dataset, source: str, column: str) -> list[float]:
    """The column as floats; numeric strings (a CSV column with one bad cell is all strings) are accepted."""
    numbers = []
    for row, value in enumerate(table[column]):
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        numbers.append(number)
        if not math.isfinite(number):
            raise DataError(
                f"{source!r} column {column!r} row {row} (0-based): expected a finite number, got {value!r}"
            )
    return numbers


def _normalize(table: datasets.Dataset, mapping: dict[str, str]) -> datasets.Dataset:
    """Keep the columns ``mapping`` names and rename them, ``{source name: normalized name}``."""
    table = table.select_columns(list(mapping))
    return table.rename_columns({k: v for k, v in mapping.items() if k != v})


def load_prompts(
    source: str,
    column: str = "prompt",
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    options: dict | None = None,
) -> list[str]:
    """The prompts of ``source`` as a list of ``n`` (or all) non-empty strings.

    ``options`` (``data.options``) go to a built-in task's generator (e.g. ``digits`` for
    ``builtin:arithmetic``); any other source takes none.
    """
    options = dict(options or {})
    if options and not source.startswith("builtin:"):
        raise DataError(
            f"data.options: only a built-in task takes options, {source!r} is not one; "
            f"got {', '.join(sorted(options))}"
        )
    if options and source.removeprefix("builtin:") in BUILTIN_TASKS:
        _check_builtin_options(source, options)
    table = load_table(source, "prompts", split, n, seed, **options)
    _require_columns(table, source, [column])
    _check_strings(table, source, column)
    return list(table[column])


def _check_builtin_options(source: str, options: dict) -> None:
    """A built-in task whose prompt generator takes no options of its own (the sentiment task's) refuses any,
    naming them; a task with options checks their names and values itself (rlhf.tasks.verifiable.check_options)."""
    import inspect

    module = {"sentiment": sentiment, "arithmetic": arithmetic, "countdown": countdown,
              "wordcount": wordcount}[source.removeprefix("builtin:")]
    params = inspect.signature(module.make_prompts).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise DataError(f"data.options: {source} takes no options; got {', '.join(sorted(options))} "
                        "(options are for builtin:arithmetic, countdown and wordcount)")


def load_sft(
    source: str,
    format: str = "prompt_completion",
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    text_column: str = "text",
    messages_column: str = "messages",
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
) -> datasets.Dataset:
    """SFT rows with normalized columns: ``prompt``/``completion``, ``text`` or ``messages`` per ``format``.

    ``messages`` rows are lists of ``{"role": str, "content": str}``.
    """
    table = load_table(source, "sft", split, n, seed)
    if format == "prompt_completion":
        _require_columns(table, source, [prompt_column, completion_column])
        _check_strings(table, source, prompt_column)
        _check_strings(table, source, completion_column)
        return _normalize(table, {prompt_column: "prompt", completion_column: "completion"})
    if format == "text":
        _require_columns(table, source, [text_column])
        _check_strings(table, source, text_column)
        return _normalize(table, {text_column: "text"})
    if format == "messages":
        _require_columns(table, source, [messages_column])
        _check_messages(table, source, messages_column)
        return _normalize(table, {messages_column: "messages"})
    raise DataError(f"format must be 'prompt_completion', 'text' or 'messages', got {format!r}")


def _check_messages(table: datasets.Dataset, source: str, column: str) -> None:
    for row, messages in enumerate(table[column]):
        ok = (
            isinstance(messages, list)
            and len(messages) > 0
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        )
        if not ok:
            raise DataError(
                f"{source!r} column {column!r} row {row} (0-based): expected a non-empty list of "
                f"{{'role': str, 'content': str}}, got {messages!r}"
            )


def load_preferences(
    source: str,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    margin_column: str | None = None,
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    **options,
) -> datasets.Dataset:
    """Preference pairs with columns ``prompt``, ``chosen``, ``rejected`` (+ ``margin`` if asked).

    Either every cell is a non-empty string, or every cell is a conversation (TRL's conversational format): the
    prompt a list of ``{"role": str, "content": str}`` messages (a system turn, a user turn, earlier turns), chosen
    and rejected each the list of the assistant turn(s) that follow it. Row 0 of the prompt column decides which;
    a cell of the other kind is a DataError naming its column and row. ``render_conversational`` turns
    conversational pairs into strings with a tokenizer's chat template. ``options`` go to a built-in generator
    (e.g. ``temperature``).
    """
    table = load_table(source, "preferences", split, n, seed, **options)
    mapping = {prompt_column: "prompt", chosen_column: "chosen", rejected_column: "rejected"}
    if margin_column is not None:
        mapping[margin_column] = "margin"
    _require_columns(table, source, list(mapping))
    conversational = isinstance(table[prompt_column][0], list)
    for column in (prompt_column, chosen_column, rejected_column):
        _check_pair_cells(table, source, column, conversational, prompt_column)
    if margin_column is None:
        return _normalize(table, mapping)
    margins = _check_numbers(table, source, margin_column)
    del mapping[margin_column]
    return _normalize(table, mapping).add_column("margin", margins, feature=datasets.Value("float64"))


def _check_pair_cells(table: datasets.Dataset, source: str, column: str, conversational: bool,
                      prompt_column: str) -> None:
    """Every cell of ``column`` a non-empty string, or with ``conversational`` a non-empty list of messages; a cell of
    the other kind says that the pairs mix the two formats."""
    kind = "a list of messages" if conversational else "a string"
    for row, value in enumerate(table[column]):
        if isinstance(value, list) != conversational and isinstance(value, (list, str)):
            raise DataError(f"{source!r} column {column!r} row {row} (0-based): expected {kind} as row 0 of column "
                            f"{prompt_column!r} holds, got {value!r}; give every prompt, chosen and rejected as "
                            "strings, or every one as a list of messages")
        if not conversational and (not isinstance(value, str) or not value.strip()):
            raise DataError(f"{source!r} column {column!r} row {row} (0-based): expected a non-empty string, got "
                            f"{value!r}")
        if conversational and not _is_messages(value):
            raise DataError(f"{source!r} column {column!r} row {row} (0-based): expected a non-empty list of "
                            f"{{'role': str, 'content': str}}, got {value!r}")


def _is_messages(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def is_conversational(table: datasets.Dataset) -> bool:
    """True for pairs of ``load_preferences`` given as lists of messages (their prompt column holds lists)."""
    return len(table) > 0 and isinstance(table["prompt"][0], list)


def render_conversational(table: datasets.Dataset, tokenizer, source: str) -> datasets.Dataset:
    """Conversational pairs (``load_preferences``) as strings, rendered by the tokenizer's chat template as TRL does.

    ``prompt``: the prompt messages with the generation prompt (the assistant's header), the text a policy is
    sampled from (rlhf.chat.format_prompts renders plain prompts the same way). ``chosen`` / ``rejected``: the
    whole conversation (prompt + that side's turns) rendered, minus the rendered prompt: the assistant's text and the
    template's end-of-turn. Tokenize them with ``tokenize_sft(..., chat=True)``. A template that does not render
    the prompt as a prefix of the conversation, or a tokenizer without a template, is a one-line DataError.
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"{source!r} holds conversational pairs (lists of messages), but the tokenizer {name} has no "
                        "chat template to render them; set model.tokenizer to one that has, or give the pairs as "
                        "strings")
    out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    for row, example in enumerate(table):
        prompt = _render(tokenizer, example["prompt"], True)
        out["prompt"].append(prompt)
        for side in ("chosen", "rejected"):
            whole = _render(tokenizer, example["prompt"] + example[side], False)
            if not whole.startswith(prompt):
                raise DataError(f"{source!r} row {row} (0-based): the chat template renders prompt + {side} as "
                                f"{whole!r}, which does not start with the prompt it renders with the generation "
                                f"prompt, {prompt!r}; the {side} completion cannot be cut from it")
            out[side].append(whole[len(prompt):])
    if "margin" in table.column_names:
        out["margin"] = list(table["margin"])
    return datasets.Dataset.from_dict(out, features=datasets.Features(
        {name: datasets.Value("float64" if name == "margin" else "string") for name in out}))


def check_distinct_pairs(table: datasets.Dataset, source: str, chosen_column: str = "chosen",
                         rejected_column: str = "rejected") -> None:
    """A DataError naming the first row whose two completions are the same text (such a pair says nothing about
    which is preferred, and its DPO margin is 0 whatever the model). ``table`` has normalized columns."""
    for row, (chosen, rejected) in enumerate(zip(table["chosen"], table["rejected"])):
        if _stripped(chosen) == _stripped(rejected):
            raise DataError(f"{source!r} row {row} (0-based): columns {chosen_column!r} and {rejected_column!r} hold "
                            f"the same text {chosen!r}; a pair needs two different completions")


def _stripped(completion: str | list[dict]) -> str | list[tuple[str, str]]:
    """A completion compared without its surrounding whitespace (a string, or each message's content)."""
    if isinstance(completion, str):
        return completion.strip()
    return [(m["role"], m["content"].strip()) for m in completion]


def load_scalar(
    source: str,
    text_column: str = "text",
    label_column: str = "label",
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    **options,
) -> datasets.Dataset:
    """Texts with a real-valued label, columns ``text`` and ``label`` (float).

    ``options`` go to a built-in generator (e.g. ``noise_std``).
    """
    table = load_table(source, "scalar", split, n, seed, **options)
    _require_columns(table, source, [text_column, label_column])
    _check_strings(table, source, text_column)
    labels = _check_numbers(table, source, label_column)
    table = _normalize(table, {text_column: "text"})
    return table.add_column("label", labels, feature=datasets.Value("float64"))


def tokenize_sft(
    dataset: datasets.Dataset, tokenizer, max_length: int, completion_only: bool = True, add_eos: bool = True,
    chat: bool = False,
) -> dict[str, torch.Tensor]:
    """Token ids and masks for SFT, right-padded to the longest row (at most ``max_length``).

    Returns ``input_ids``, ``attention_mask`` and ``loss_mask``, each ``(rows, seq_len)`` int64.
    ``loss_mask[i, t] = 1`` when token ``t`` is a training target (the caller shifts for next-token
    prediction); it is 0 on padding and, with ``completion_only``, on everything but the completion:
    the prompt of ``prompt``/``completion`` rows, and all but the assistant turns of ``messages`` rows
    (role headers included). ``text`` rows are trained on every token.

    The prompt is tokenized alone (with the tokenizer's own special tokens, as at generation time) and
    the completion alone, joined by a space unless one side already has whitespace there; ``add_eos``
    appends EOS to ``prompt``/``completion`` and ``text`` rows so the model learns to stop (chat
    templates end each turn themselves). Rows are cut at ``max_length``; rows left with no target
    token are dropped with a warning.

    ``chat``: ``prompt``/``completion`` rows rendered by a chat template (``render_conversational``). The
    prompt is then tokenized without the tokenizer's special tokens (the template wrote its own, as
    rlhf.chat does for sampling), the completion follows it as it is (the generation prompt ends exactly
    where the assistant's text starts: a joining space would be a token the model never sees there) and
    no EOS is added (the completion ends with the template's end-of-turn).
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; set tokenizer.pad_token")
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    columns = dataset.column_names
    rows = []
    for example in dataset:
        if "messages" in columns:
            ids, mask = _tokenize_messages(example["messages"], tokenizer)
        elif "prompt" in columns and "completion" in columns and chat:
            ids, mask = _tokenize_rendered(example["prompt"], example["completion"], tokenizer)
        elif "prompt" in columns and "completion" in columns:
            ids, mask = _tokenize_prompt_completion(example["prompt"], example["completion"], tokenizer)
            ids, mask = ids + eos, mask + [1] * len(eos)
        elif "text" in columns:
            ids = tokenizer(example["text"])["input_ids"] + eos
            mask = [1] * len(ids)
        else:
            raise ValueError(
                f"dataset needs 'prompt'/'completion', 'text' or 'messages' columns, has {columns}"
            )
        if not completion_only:
            mask = [1] * len(ids)
        rows.append((ids[:max_length], mask[:max_length]))
    kept = [r for r in rows if any(r[1])]
    if len(kept) < len(rows):
        warnings.warn(
            f"dropped {len(rows) - len(kept)} SFT rows with no target token within max_length={max_length}",
            stacklevel=2,
        )
    if not kept:
        raise DataError("no SFT row has a target token within max_length")
    return _right_pad(kept, tokenizer.pad_token_id)


def _tokenize_prompt_completion(prompt: str, completion: str, tokenizer) -> tuple[list[int], list[int]]:
    sep = "" if prompt[-1:].isspace() or completion[:1].isspace() else " "
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(sep + completion, add_special_tokens=False)["input_ids"]
    return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


def _tokenize_rendered(prompt: str, completion: str, tokenizer) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


def _tokenize_messages(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Render growing prefixes of the conversation; the text each assistant message adds is a target.

    The role header that ``add_generation_prompt`` renders is not a target, since at generation time
    it is part of the prompt.
    """
    ids: list[int] = []
    mask: list[int] = []
    rendered = ""
    for k, message in enumerate(messages):
        is_assistant = message["role"] == "assistant"
        pieces = []
        if is_assistant:
            pieces.append((_render(tokenizer, messages[:k], True), 0))
        pieces.append((_render(tokenizer, messages[: k + 1], False), int(is_assistant)))
        for text, target in pieces:
            if not text.startswith(rendered):
                raise DataError(
                    "the chat template does not render a conversation as a prefix of its extension"
                )
            new = tokenizer(text[len(rendered) :], add_special_tokens=False)["input_ids"]
            ids += new
            mask += [target] * len(new)
            rendered = text
    return ids, mask


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages and not add_generation_prompt:
        return ""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _right_pad(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding: a training forward pass needs no left padding, and positions then start at 0."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        loss_mask[i, : len(ids)] = torch.tensor(mask, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
