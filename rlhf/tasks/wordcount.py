"""A built-in verifiable task of instruction following: one sentence on a topic in a given number of words.

Prompt: ``"Write one sentence about rain in exactly 6 words. Put the sentence in <answer></answer>
tags."``, or with ``slack`` > 0 a range, ``"... about rain in 6 to 9 words. ..."``. The problem is the
triple (topic, low, high), with ``high = low + slack``.

Answer extraction: the sentence is the content of the last ``<answer>...</answer>`` when the completion
has one, else the last non-empty line of the completion. Its words are its whitespace-separated tokens
that hold a letter or a digit (so "—" or a lone "-" is no word, "well-known" and "rain," are one each).
It is correct when it has low to high words (both included) and one of them, lowercased with its
letters alone kept, starts with the topic ("Rain," and "raindrops" mention rain). The topic rule keeps
"a a a a a a" from being right; a policy can still repeat the topic, a known way to game this task.

Rewards (``rlhf.tasks.verifiable``): ``correct_fn`` 1.0 / 0.0 by the rule above; ``format_fn`` 1.0 when
the completion has an ``<answer>`` tag holding at least one word; ``reward_fn = correct + 0.1 * format``.

Options (``data.options``): ``min_words``..``max_words``, the range ``low`` is drawn from; ``slack``, the
width of the allowed range (0 = exactly ``low`` words); and ``topics``, a list of single lowercase words
(null = the built-in TOPICS). The problem space is ``len(topics) * (max_words - min_words + 1)``
problems, a fifth of them in the test split.
"""

from __future__ import annotations

import random
import re
from typing import Any, NamedTuple

from rlhf.tasks.verifiable import (
    FORMAT_BONUS,
    answer_tag,
    check_int,
    check_kind,
    check_options,
    generate,
    score,
)

TOPICS = (
    "apple", "autumn", "baby", "bakery", "ball", "balloon", "banana", "beach", "bear", "bee", "bicycle",
    "bird", "birthday", "blanket", "boat", "book", "bread", "breakfast", "bridge", "brother", "bus",
    "butterfly", "cake", "camera", "camp", "candle", "car", "castle", "cat", "cheese", "chess", "city",
    "cloud", "coffee", "computer", "cookie", "cow", "desert", "dinner", "doctor", "dog", "dolphin",
    "door", "dragon", "dream", "drum", "duck", "eagle", "earth", "egg", "elephant", "farm", "father",
    "field", "fire", "fish", "flower", "fog", "football", "forest", "fox", "friend", "frog", "garden",
    "ghost", "gift", "giraffe", "glass", "gold", "grandmother", "grass", "guitar", "hammer", "harbor",
    "hat", "holiday", "honey", "horse", "hospital", "house", "ice", "island", "jacket", "jungle",
    "kettle", "key", "kitchen", "kite", "ladder", "lake", "lamp", "lemon", "library", "lion", "map",
    "market", "milk", "mirror", "money", "monkey", "moon", "morning", "mother", "mountain", "mouse",
    "movie", "museum", "music", "night", "ocean", "orange", "owl", "painting", "paper", "park", "party",
    "pencil", "penguin", "phone", "piano", "picnic", "pizza", "planet", "plant", "pond", "potato",
    "rabbit", "rain", "river", "road", "robot", "rocket", "roof", "rose", "salt", "sand", "school",
    "sea", "shadow", "sheep", "ship", "shoe", "sister", "sky", "snow", "soap", "soccer", "soup",
    "spider", "spoon", "spring", "star", "station", "storm", "street", "student", "sugar", "summer",
    "sun", "swimming", "table", "tea", "teacher", "tent", "thunder", "tiger", "time", "tomato", "tower",
    "toy", "train", "tree", "truck", "turtle", "umbrella", "valley", "village", "violin", "volcano",
    "wall", "watch", "water", "wave", "whale", "wind", "window", "winter", "wolf", "wood", "zebra",
)  # fmt: skip
"""The default topics: concrete, common one-word nouns (190) a small model has seen often."""

DEFAULTS: dict[str, Any] = {"min_words": 8, "max_words": 16, "slack": 4, "topics": None}
"""Option defaults; configs/data/wordcount.yaml repeats them with the reason for each."""

INSTRUCTION = "Put the sentence in <answer></answer> tags."

_PROMPT = re.compile(r"Write one sentence about ([a-z]+) in (?:exactly (\d+)|(\d+) to (\d+)) words\.")
_WORD = re.compile(r"[^\W_]")
_LETTERS = re.compile(r"[^a-z]")


class Problem(NamedTuple):
    topic: str
    low: int  # fewest words allowed
    high: int  # most words allowed; == low for "exactly"


def make_prompt(problem: Problem) -> str:
    length = f"exactly {problem.low}" if problem.low == problem.high else f"{problem.low} to {problem.high}"
    return f"Write one sentence about {problem.topic} in {length} words. {INSTRUCTION}"


def parse_prompt(prompt: str) -> Problem:
    """The problem a prompt of this task states; ValueError (naming the prompt) for any other text."""
    match = _PROMPT.search(prompt)
    if match is None:
        raise ValueError(f"not a builtin:wordcount prompt: {prompt[:80]!r}")
    topic, exactly, low, high = match.groups()
    return Problem(topic, int(exactly), int(exactly)) if exactly else Problem(topic, int(low), int(high))


def _topics(value: Any) -> tuple[str, ...]:
    if value is None:
        return TOPICS
    ok = (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(t, str) and t.isalpha() and t.islower() and t.isascii() for t in value)
    )
    if not ok:
        raise ValueError(
            f"data.options.topics: must be null or a non-empty list of lowercase one-word topics "
            f"(a-z), got {value!r}"
        )
    return tuple(dict.fromkeys(value))


def make_prompts(n: int, seed: int = 0, split: str | None = None, **options) -> list[str]:
    """``n`` prompts; the test split's are distinct problems."""
    o = check_options("wordcount", options, DEFAULTS)
    shortest, topics = check_int(o, "min_words", 1), _topics(o["topics"])
    longest, slack = check_int(o, "max_words", shortest), check_int(o, "slack", 0)

    def one(rng: random.Random) -> tuple[str, str]:
        topic, low = rng.choice(topics), rng.randint(shortest, longest)
        problem = Problem(topic, low, low + slack)
        return canonical(problem), make_prompt(problem)

    return generate(n, seed, split, one, "wordcount", "data.options.max_words or add data.options.topics")


def canonical(problem: Problem) -> str:
    """``"rain:6-9"``: the string whose hash picks the problem's split."""
    return f"{problem.topic}:{problem.low}-{problem.high}"


def make_split(kind: str, n: int, seed: int = 0, split: str | None = "train", **options) -> list[str]:
    """``n`` prompts of ``split``; ``kind`` must be "prompts" (the task has no SFT or preference data)."""
    check_kind(kind)
    return make_prompts(n, seed=seed, split=split, **options)


def sentence(completion: str) -> str:
    """The answer text by the extraction rule: the last ``<answer>`` tag's content, else the last
    non-empty line."""
    tag = answer_tag(completion)
    if tag is not None:
        return tag
    lines = [line for line in completion.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def words(text: str) -> list[str]:
    """The whitespace-separated tokens of ``text`` that hold a letter or a digit."""
    return [token for token in text.split() if _WORD.search(token)]


def check(prompt: str, completion: str) -> tuple[bool, bool]:
    """(correct, well-formed) for one completion, by the rules of the module docstring."""
    problem = parse_prompt(prompt)
    found = words(sentence(completion))
    on_topic = any(_LETTERS.sub("", w.lower()).startswith(problem.topic) for w in found)
    tag = answer_tag(completion)
    return problem.low <= len(found) <= problem.high and on_topic, tag is not None and bool(words(tag))


def reward_fn(prompts: list[str], completions: list[str]) -> list[float]:
    """``correct + 0.1 * well-formed`` per completion: 0.0, 0.1, 1.0 or 1.1. Lists of length ``batch``."""
    return score(prompts, completions, check, 1.0, FORMAT_BONUS)


def correct_fn(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 for a sentence of low to high words that mentions the topic, else 0.0: the gold scorer."""
    return score(prompts, completions, check, 1.0, 0.0)


def format_fn(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 for an ``<answer>`` tag holding at least one word, else 0.0, right or wrong."""
    return score(prompts, completions, check, 0.0, 1.0)
