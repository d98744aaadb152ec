"""What the verifiable-reward tasks (``arithmetic``, ``countdown``, ``wordcount``) share.

Each task generates problems from a seed, writes each as a plain-text prompt the checker can read back
(``parse_prompt``), and scores a completion against the problem parsed from its prompt, so the reward
needs nothing but ``(prompts, completions)``.

- **Splits.** A problem belongs to ``train`` or ``test`` by a stable hash (SHA-256) of its canonical
  string (``split_of``: about 80% / 20%), never by the order it was drawn in. Problems are drawn by
  rejection (a draw of the other split is dropped), so no seed and no size can put one problem in both.
  The test split holds distinct problems; the train split is drawn with replacement, as an RL sampler
  would draw prompts from the task's distribution.
- **Answers.** The answer text is the content of the last complete ``<answer>...</answer>`` in the
  completion (``answer_tag``); each task says what it falls back to when there is none.
- **Rewards.** ``reward = correct + FORMAT_BONUS * formatted``: 1.0 for a correct answer, plus 0.1 for a
  well-formed ``<answer>`` tag, so one completion scores 0.0, 0.1, 1.0 or 1.1. ``correct_fn`` (the gold,
  logged as accuracy) is the correctness alone. A malformed or empty completion scores 0 and never raises.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

FORMAT_BONUS = 0.1
"""Added to the reward of a completion whose ``<answer>`` tag is well formed, correct or not: small, so a
policy learns the format early without it ever outweighing a correct answer."""

TEST_SHARE = 20
"""Percent of all problems (by hash) that belong to the test split."""

MAX_MISSES = 20_000
"""Consecutive draws that bring no new problem of the split after which the problem space counts as spent."""

SPLITS = ("train", "test")

ANSWER_INSTRUCTION = "Put the final answer in <answer></answer> tags."
"""The sentence that ends every prompt: the tag is what ``format_fn`` rewards."""

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)

NUMBER = r"(?:(?<![\w.)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
"""A number in text: thousands commas ("1,234"), decimals ("3.0") and a minus sign count, but a "-" right
after a digit, letter or ")" is a subtraction ("10-3" is 10 and 3), and a trailing "." ends a sentence."""

_NUMBER = re.compile(NUMBER)
_LONE_NUMBER = re.compile(rf"\s*=?\s*\$?\s*({NUMBER})\s*\.?\s*")


def split_of(canonical: str) -> str:
    """``"test"`` for about TEST_SHARE percent of canonical problem strings, else ``"train"``; stable
    across runs, machines and Python versions (not the salted ``hash()``)."""
    digest = hashlib.sha256(canonical.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 100 < TEST_SHARE else "train"


def generate(
    n: int,
    seed: int,
    split: str | None,
    draw: Callable[[random.Random], tuple[str, str]],
    task: str,
    knob: str,
) -> list[str]:
    """``n`` prompts of ``split`` ("train", "test", or None for both), drawn by ``draw(rng) -> (canonical,
    prompt)`` from ``random.Random(seed)`` and kept when ``split_of(canonical)`` is ``split``.

    Test prompts are distinct. Raises ValueError when MAX_MISSES draws in a row bring nothing new: the
    problem space at this difficulty is too small, and ``knob`` says which option widens it.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    rng = random.Random(seed)
    prompts: list[str] = []
    seen: set[str] = set()
    misses = 0
    while len(prompts) < n:
        canonical, prompt = draw(rng)
        if (split is None or split_of(canonical) == split) and not (split == "test" and canonical in seen):
            seen.add(canonical)
            prompts.append(prompt)
            misses = 0
        else:
            misses += 1
            if misses >= MAX_MISSES:
                raise ValueError(
                    f"builtin:{task} has only {len(seen)} distinct {split or 'any'} problems at "
                    f"this difficulty, fewer than the {n} asked; raise {knob} or ask for fewer"
                )
    return prompts


def check_options(task: str, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` updated by ``options``; an unknown key raises a one-line ValueError naming it."""
    for key in options:
        if key not in defaults:
            raise ValueError(
                f"data.options.{key}: unknown option of builtin:{task}; valid: {', '.join(sorted(defaults))}"
            )
    return {**defaults, **options}


def check_int(options: Mapping[str, Any], key: str, low: int, high: int | None = None) -> int:
    """``options[key]`` if it is an int in ``[low, high]``, else a one-line ValueError naming the key."""
    value = options[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"data.options.{key}: must be an int {bound}, got {value!r}")
    return value


def check_kind(kind: str) -> None:
    if kind != "prompts":
        raise ValueError(f"kind must be 'prompts' (a verifiable task has no {kind!r} data), got {kind!r}")


def answer_tag(completion: str) -> str | None:
    """The content of the last complete ``<answer>...</answer>`` (any case), or None when there is none."""
    found = _ANSWER_TAG.findall(completion)
    return found[-1] if found else None


def last_number(text: str) -> Fraction | None:
    """The last number in ``text`` (see NUMBER), exactly, or None: ``"so 1,234.50."`` gives 2469/2."""
    found = _NUMBER.findall(text)
    return Fraction(found[-1].replace(",", "")) if found else None


def lone_number(text: str) -> Fraction | None:
    """``text`` as one number, allowing spaces, a leading "=" or "$" and a trailing "."; else None."""
    match = _LONE_NUMBER.fullmatch(text)
    return Fraction(match.group(1).replace(",", "")) if match else None


_BINARY_OPS: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}
"""The only operators an expression may hold; no unary minus, no powers, no calls, no names."""

_EXPRESSION_CHARS = re.compile(r"[0-9+\-*/()\s]*[0-9][0-9+\-*/()\s]*")
"""Only digits, operators, parentheses and spaces reach the parser: no names, strings or dots."""

MAX_EXPRESSION_CHARS = 200
"""Longer expressions are refused before parsing (Python's parser recurses on nesting)."""


def parse_expression(text: str) -> ast.expr | None:
    """The syntax tree of an arithmetic expression of non-negative integers, ``+ - * /`` and parentheses,
    or None for anything else (including ``**``, unary minus, names, calls, floats, and "x"/"×"/"÷" that
    were not turned into ``*``/``/`` first). Never evaluates anything."""
    if len(text) > MAX_EXPRESSION_CHARS or not _EXPRESSION_CHARS.fullmatch(text):
        return None
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    for node in ast.walk(tree):
        ok = (
            (isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS)
            or isinstance(node, ast.operator)
            or (isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0)
        )
        if not ok:
            return None
    return tree


def constants(tree: ast.expr) -> list[int]:
    """The integer literals of a parsed expression, left to right."""
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)]


def evaluate(tree: ast.expr) -> Fraction | None:
    """The exact value of a tree from ``parse_expression``, or None on a division by zero."""
    if isinstance(tree, ast.Constant):
        return Fraction(tree.value)
    left, right = evaluate(tree.left), evaluate(tree.right)
    if left is None or right is None or (isinstance(tree.op, ast.Div) and right == 0):
        return None
    return _BINARY_OPS[type(tree.op)](left, right)


def score(
    prompts: list[str],
    completions: list[str],
    check: Callable[[str, str], tuple[bool, bool]],
    correct_weight: float,
    format_weight: float,
) -> list[float]:
    """``correct_weight * correct + format_weight * formatted`` per pair, ``check(prompt, completion) ->
    (correct, formatted)``; a completion that is not a string counts as "".

    ``prompts`` and ``completions`` are parallel lists of length ``batch``; returns ``batch`` floats.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"prompts and completions differ in length: {len(prompts)} != {len(completions)}")
    scores = []
    for prompt, completion in zip(prompts, completions):
        correct, formatted = check(prompt, completion if isinstance(completion, str) else "")
        scores.append(correct_weight * correct + format_weight * formatted)
    return scores
