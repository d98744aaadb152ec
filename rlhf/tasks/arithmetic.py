"""A built-in verifiable task: evaluate an integer expression such as ``47 + 8 * 6``.

Prompt: ``"Calculate 47 + 8 * 6. Put the final answer in <answer></answer> tags."`` The usual precedence
holds (``*`` and ``/`` before ``+`` and ``-``, left to right). Every result is a non-negative integer:
a division is exact by construction (the first operand of a ``*``/``/`` run is multiplied by every
divisor in the run, so "a / b" reads "(a*b) / b" and a dividend has more than ``digits`` digits), and a
problem with a negative result is drawn again.

Answer extraction: the last number in the content of the last ``<answer>...</answer>`` when the
completion has one (then nothing outside it counts), else the last number anywhere in the completion.
A number may carry thousands commas ("1,234"), a minus sign ("-7", but "10-3" is two numbers) and a
fraction part that must be zero to be right ("42.0" is 42); a trailing period or "=" around it is fine.

Rewards (``rlhf.tasks.verifiable``): ``correct_fn`` is 1.0 when the extracted number equals the result,
else 0.0; ``format_fn`` is 1.0 when the completion has an ``<answer>`` tag holding one number and nothing
else (spaces, a leading "=" or "$", a trailing "." allowed); ``reward_fn = correct + 0.1 * format``.

Options (``data.options``): ``digits`` per operand, ``operations`` per problem (operands - 1) and
``ops``, the operators to draw from ("+-*/" or a subset).
"""

from __future__ import annotations

import random
import re
from typing import Any, NamedTuple

from rlhf.tasks.verifiable import (
    ANSWER_INSTRUCTION,
    FORMAT_BONUS,
    answer_tag,
    check_int,
    check_kind,
    check_options,
    evaluate,
    generate,
    last_number,
    lone_number,
    parse_expression,
    score,
)

DEFAULTS: dict[str, Any] = {"digits": 2, "operations": 1, "ops": "+-"}
"""Option defaults; configs/data/arithmetic.yaml repeats them with the reason for each."""

OPERATORS = "+-*/"

_PROMPT = re.compile(r"Calculate ([0-9+\-*/ ]+)\. " + re.escape(ANSWER_INSTRUCTION))


class Problem(NamedTuple):
    expression: str  # operands and operators separated by single spaces: the canonical form
    answer: int


def make_prompt(expression: str) -> str:
    return f"Calculate {expression}. {ANSWER_INSTRUCTION}"


def parse_prompt(prompt: str) -> Problem:
    """The problem a prompt of this task states; ValueError (naming the prompt) for any other text."""
    match = _PROMPT.search(prompt)
    tree = parse_expression(match.group(1)) if match else None
    value = evaluate(tree) if tree is not None else None
    if value is None or value.denominator != 1:
        raise ValueError(f"not a builtin:arithmetic prompt: {prompt[:80]!r}")
    return Problem(match.group(1), int(value))


def _ops(value: Any) -> str:
    """The operators of the ``ops`` option ("+-", or a list such as ["+", "-"]) in a fixed order."""
    chosen = list(value) if isinstance(value, (str, list, tuple)) else None
    if not chosen or any(op not in OPERATORS for op in chosen):
        raise ValueError(
            f"data.options.ops: must be a non-empty string of operators from {OPERATORS!r}, got {value!r}"
        )
    return "".join(op for op in OPERATORS if op in chosen)


def draw(rng: random.Random, digits: int, operations: int, ops: str) -> Problem:
    """One problem with ``operations + 1`` operands of ``digits`` digits (a dividend has more)."""
    low, high = 10 ** (digits - 1), 10**digits - 1
    while True:
        operands = [rng.randint(low, high) for _ in range(operations + 1)]
        chosen = [rng.choice(ops) for _ in range(operations)]
        first = 0  # index of the first operand of the current * / run
        for i, op in enumerate(chosen):
            if op in "+-":
                first = i + 1
            elif op == "/":
                operands[first] *= operands[i + 1]
        tokens = [str(operands[0])]
        for op, operand in zip(chosen, operands[1:]):
            tokens += [op, str(operand)]
        expression = " ".join(tokens)
        value = evaluate(parse_expression(expression))
        if value >= 0:
            return Problem(expression, int(value))


def make_prompts(n: int, seed: int = 0, split: str | None = None, **options) -> list[str]:
    """``n`` prompts; the test split's are distinct. Options as in the module docstring."""
    o = check_options("arithmetic", options, DEFAULTS)
    digits, operations = check_int(o, "digits", 1, 9), check_int(o, "operations", 1, 8)
    ops = _ops(o["ops"])

    def one(rng: random.Random) -> tuple[str, str]:
        problem = draw(rng, digits, operations, ops)
        return problem.expression, make_prompt(problem.expression)

    return generate(n, seed, split, one, "arithmetic", "data.options.digits or data.options.operations")


def make_split(kind: str, n: int, seed: int = 0, split: str | None = "train", **options) -> list[str]:
    """``n`` prompts of ``split``; ``kind`` must be "prompts" (the task has no SFT or preference data)."""
    check_kind(kind)
    return make_prompts(n, seed=seed, split=split, **options)


def check(prompt: str, completion: str) -> tuple[bool, bool]:
    """(correct, well-formed) for one completion, by the rules of the module docstring."""
    problem = parse_prompt(prompt)
    tag = answer_tag(completion)
    answer = last_number(completion if tag is None else tag)
    return answer == problem.answer, tag is not None and lone_number(tag) is not None


def reward_fn(prompts: list[str], completions: list[str]) -> list[float]:
    """``correct + 0.1 * well-formed`` per completion: 0.0, 0.1, 1.0 or 1.1. Lists of length ``batch``."""
    return score(prompts, completions, check, 1.0, FORMAT_BONUS)


def correct_fn(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 for a correct answer, else 0.0: the gold scorer, whose mean is the accuracy."""
    return score(prompts, completions, check, 1.0, 0.0)


def format_fn(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 for a well-formed ``<answer>`` tag (one number), else 0.0, right or wrong."""
    return score(prompts, completions, check, 0.0, 1.0)
