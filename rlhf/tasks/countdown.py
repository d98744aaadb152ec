"""A built-in verifiable task: the Countdown game of TinyZero, reach a target with given numbers.

Prompt: ``"Using the numbers [7, 3, 12], write an equation that equals 33. Use + - * / and each number
exactly once. Put the final answer in <answer></answer> tags."`` (TinyZero's prompt also shows an
example, ``<answer>(1 + 2) / 3</answer>``, which SmolLM2-135M-Instruct copies instead.) As in
TinyZero, every given number is used exactly once (a number given twice, twice). Every problem is
solvable: the target is the value of a random expression over all the numbers.

Answer extraction: the equation is the content of the last ``<answer>...</answer>`` when the completion
has one, else the last run of equation characters (digits, spaces, ``+ - * / ( ) =``, with "x", "×"
read as ``*`` and "÷" as ``/``) that holds a digit and an operator. An equation is an expression,
optionally with ``= <number>`` after it (or ``<number> =`` before it) and a final period. It is correct
when the expression uses exactly the given numbers (as a multiset), evaluates exactly (fractions
allowed on the way, no division by zero) to the target, and a stated number, if any, is the target.
The expression is parsed with ``ast`` against a whitelist (``+ - * /``, parentheses, non-negative
integer literals: no unary minus, powers, names or calls; only those characters reach the parser) and
evaluated by walking the tree; nothing is ``eval``'d.

Rewards (``rlhf.tasks.verifiable``): ``correct_fn`` 1.0 / 0.0 by the rule above; ``format_fn`` 1.0 when
the completion has an ``<answer>`` tag holding a whitelisted expression (right or wrong);
``reward_fn = correct + 0.1 * format``.

Options (``data.options``): ``count`` of numbers, ``max_number`` (numbers are drawn from 1..max_number)
and the target range ``target_min``..``target_max``.
"""

from __future__ import annotations

import operator
import random
import re
from collections import Counter
from fractions import Fraction
from typing import Any, NamedTuple

from rlhf.tasks.verifiable import (
    ANSWER_INSTRUCTION,
    FORMAT_BONUS,
    MAX_MISSES,
    answer_tag,
    check_int,
    check_kind,
    check_options,
    constants,
    evaluate,
    generate,
    lone_number,
    parse_expression,
    score,
)

DEFAULTS: dict[str, Any] = {"count": 3, "max_number": 20, "target_min": 1, "target_max": 100}
"""Option defaults; configs/data/countdown.yaml repeats them with the reason for each."""


_PROMPT = re.compile(r"Using the numbers \[([0-9, ]+)\], write an equation that equals (\d+)\.")
_TIMES = re.compile(r"(?<=[\d)\s])[xX×](?=[\s\d(])")
_EQUATION_RUN = re.compile(r"[0-9+\-*/()=\s]+")
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


class Problem(NamedTuple):
    numbers: tuple[int, ...]  # in the order the prompt lists them
    target: int


def canonical(problem: Problem) -> str:
    """The problem up to the order of its numbers: ``"3 7 12 -> 33"``."""
    return f"{' '.join(map(str, sorted(problem.numbers)))} -> {problem.target}"


def make_prompt(problem: Problem) -> str:
    return (
        f"Using the numbers [{', '.join(map(str, problem.numbers))}], write an equation that equals "
        f"{problem.target}. Use + - * / and each number exactly once. {ANSWER_INSTRUCTION}"
    )


def parse_prompt(prompt: str) -> Problem:
    """The problem a prompt of this task states; ValueError (naming the prompt) for any other text."""
    match = _PROMPT.search(prompt)
    try:
        numbers = tuple(int(x) for x in match.group(1).split(","))
    except (AttributeError, ValueError):
        raise ValueError(f"not a builtin:countdown prompt: {prompt[:80]!r}") from None
    return Problem(numbers, int(match.group(2)))


def draw(
    rng: random.Random, count: int, max_number: int, target_min: int, target_max: int
) -> tuple[Problem, str]:
    """One solvable problem and the expression it was made from: ``count`` numbers in 1..max_number
    joined pairwise in random order by random operators until one value is left, kept when that value
    is an integer in ``[target_min, target_max]``."""
    for _ in range(MAX_MISSES):
        numbers = tuple(rng.randint(1, max_number) for _ in range(count))
        items = [(str(x), Fraction(x)) for x in numbers]
        while len(items) > 1:
            i, j = rng.sample(range(len(items)), 2)
            (a, x), (b, y) = items[i], items[j]
            op = rng.choice("+-*/")
            if op == "/" and y == 0:
                break
            value = _APPLY[op](x, y)
            items = [item for k, item in enumerate(items) if k not in (i, j)] + [(f"({a} {op} {b})", value)]
        text, value = items[0]
        if len(items) == 1 and value.denominator == 1 and target_min <= value <= target_max:
            return Problem(numbers, int(value)), text[1:-1]
    raise ValueError(
        f"data.options.target_min: no target in [{target_min}, {target_max}] found for {count} "
        f"numbers up to {max_number}; widen the target range or change data.options.max_number"
    )


def make_prompts(n: int, seed: int = 0, split: str | None = None, **options) -> list[str]:
    """``n`` prompts; the test split's are distinct (up to the order of the numbers)."""
    o = check_options("countdown", options, DEFAULTS)
    count, max_number = check_int(o, "count", 2, 8), check_int(o, "max_number", 1)
    target_min, target_max = check_int(o, "target_min", 0), check_int(o, "target_max", 0)
    if target_max < target_min:
        raise ValueError(
            f"data.options.target_max: must be >= data.options.target_min ({target_min}), got {target_max}"
        )

    def one(rng: random.Random) -> tuple[str, str]:
        problem, _ = draw(rng, count, max_number, target_min, target_max)
        return canonical(problem), make_prompt(problem)

    return generate(n, seed, split, one, "countdown", "data.options.max_number or data.options.count")


def make_split(kind: str, n: int, seed: int = 0, split: str | None = "train", **options) -> list[str]:
    """``n`` prompts of ``split``; ``kind`` must be "prompts" (the task has no SFT or preference data)."""
    check_kind(kind)
    return make_prompts(n, seed=seed, split=split, **options)


def equation(completion: str) -> tuple[str | None, bool]:
    """(the equation text by the extraction rule, whether it came from an ``<answer>`` tag)."""
    tag = answer_tag(completion)
    if tag is not None:
        return _TIMES.sub("*", tag.replace("÷", "/")), True
    text = _TIMES.sub("*", completion.replace("÷", "/"))
    runs = [r for r in _EQUATION_RUN.findall(text) if re.search(r"\d", r) and re.search(r"[+\-*/]", r)]
    return (runs[-1] if runs else None), False


def parse_equation(text: str) -> tuple[object | None, Fraction | None]:
    """(the expression's syntax tree or None, the number stated after or before "=" or None); a
    trailing period is dropped."""
    sides = text.strip().rstrip(".").split("=")
    if len(sides) == 1:
        return parse_expression(sides[0]), None
    if len(sides) != 2:
        return None, None
    left, right = sides
    stated = lone_number(right)
    if stated is not None:
        return parse_expression(left), stated
    return parse_expression(right), lone_number(left)


def check(prompt: str, completion: str) -> tuple[bool, bool]:
    """(correct, well-formed) for one completion, by the rules of the module docstring."""
    problem = parse_prompt(prompt)
    text, tagged = equation(completion)
    tree, stated = parse_equation(text) if text is not None else (None, None)
    if tree is None:
        return False, False
    uses_all = Counter(constants(tree)) == Counter(problem.numbers)
    correct = uses_all and evaluate(tree) == problem.target and stated in (None, problem.target)
    return correct, tagged


def reward_fn(prompts: list[str], completions: list[str]) -> list[float]:
    """``correct + 0.1 * well-formed`` per completion: 0.0, 0.1, 1.0 or 1.1. Lists of length ``batch``."""
    return score(prompts, completions, check, 1.0, FORMAT_BONUS)


def correct_fn(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 for a correct equation, else 0.0: the gold scorer, whose mean is the accuracy."""
    return score(prompts, completions, check, 1.0, 0.0)


def format_fn(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 for an ``<answer>`` tag holding a whitelisted expression, else 0.0, right or wrong."""
    return score(prompts, completions, check, 0.0, 1.0)
