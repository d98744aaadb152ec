"""A built-in review-sentiment task whose true (gold) reward is known, so the toolkit runs offline.

Sentences look like ``"overall the food was superb but the service was slow ."``: a prompt (subject and
verb, 2-5 words) followed by a completion (a predicate ending in ``"."``). Every token is a separate
whitespace-delimited word, punctuation included, and every token is in ``VOCAB``.

The gold reward (``gold_score``) rewards positive sentiment and penalizes the shapes a policy reaches
when it over-optimizes a learned reward model: repeated words, lists of sentiment words, no final
period, run-on length. The generated preference and scalar data hold only well-formed sentences, so a
reward model never sees those failure modes; that is what lets ``score`` rise while ``gold_score`` falls.

All generators are deterministic given ``seed`` (they use their own ``random.Random``).
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable, Sequence

POSITIVE_ADJECTIVES = {
    "superb": 1.0, "perfect": 1.0, "excellent": 0.9, "wonderful": 0.9, "amazing": 0.9, "brilliant": 0.9,
    "fantastic": 0.9, "delightful": 0.8, "great": 0.7, "lovely": 0.7, "tasty": 0.6, "charming": 0.6,
    "enjoyable": 0.6, "good": 0.5, "pleasant": 0.5, "friendly": 0.5, "helpful": 0.5, "nice": 0.4,
    "fresh": 0.4, "cozy": 0.4, "clean": 0.3, "solid": 0.3, "decent": 0.2, "fine": 0.2,
}  # fmt: skip
NEGATIVE_ADJECTIVES = {
    "awful": -1.0, "terrible": -1.0, "horrible": -0.9, "dreadful": -0.9, "lousy": -0.8, "disappointing": -0.7,
    "rude": -0.7, "bad": -0.6, "poor": -0.6, "dirty": -0.6, "unpleasant": -0.6, "broken": -0.6,
    "boring": -0.5, "stale": -0.5, "overpriced": -0.5, "bland": -0.4, "slow": -0.4, "dull": -0.4,
    "greasy": -0.4, "mediocre": -0.3, "noisy": -0.3, "cold": -0.3,
}  # fmt: skip
NEUTRAL_ADJECTIVES = [
    "average", "ordinary", "simple", "small", "large", "quiet", "busy", "new", "old", "typical",
]  # fmt: skip
POSITIVE_ADVERBS = {"warmly": 0.6, "kindly": 0.5, "well": 0.4}
NEGATIVE_ADVERBS = {"rudely": -0.7, "badly": -0.6, "poorly": -0.5}
NEUTRAL_ADVERBS = ["quickly", "quietly"]
POSITIVE_VERBS = {"loved": 0.9, "adored": 0.9, "enjoyed": 0.7, "liked": 0.5}
NEGATIVE_VERBS = {"hated": -0.9, "regretted": -0.6, "disliked": -0.5}
NEUTRAL_VERBS = ["remembered", "noticed"]

LEXICON: dict[str, float] = {
    **POSITIVE_ADJECTIVES, **NEGATIVE_ADJECTIVES, **POSITIVE_ADVERBS, **NEGATIVE_ADVERBS,
    **POSITIVE_VERBS, **NEGATIVE_VERBS,
}  # fmt: skip
"""Sentiment words and their weights in [-1, 1]; every other word weighs 0."""

NOUNS = [
    "food", "service", "staff", "waiter", "meal", "dessert", "coffee", "menu", "price", "place", "room",
    "bed", "view", "location", "hotel", "movie", "plot", "acting", "ending", "music", "story", "book",
    "phone", "battery", "screen", "design",
]  # fmt: skip
DETERMINERS = ["the", "this", "our", "my"]
LINKING_VERBS = ["was", "is", "seemed", "felt"]
OPENERS = ["", "overall", "honestly", "frankly", "i think", "i thought", "in short"]
INTENSIFIERS = ["very", "really", "quite", "rather", "truly", "pretty", "so"]

FUNCTION_WORDS = frozenset(["the", "this", "our", "my", "a", "it", "i", "we", "us", "was", "is", "were",
                            "and", "but", ",", "."])  # fmt: skip
"""Words that may repeat in a sentence without penalty."""

MAX_WORDS = 16
"""Completions longer than this many tokens are penalized (generated completions have at most 10)."""

REPEAT_PENALTY = 0.5
ADJACENT_PENALTY = 0.25
SHAPE_PENALTY = 0.5
LENGTH_PENALTY = 0.1


def _build_vocab() -> list[str]:
    words = [".", ",", *sorted(FUNCTION_WORDS), "treated"]
    for opener in OPENERS:
        words += opener.split()
    words += DETERMINERS + LINKING_VERBS + INTENSIFIERS + NOUNS + NEUTRAL_ADJECTIVES + NEUTRAL_ADVERBS
    words += NEUTRAL_VERBS + list(LEXICON)
    return list(dict.fromkeys(words))


VOCAB: list[str] = _build_vocab()
"""Every token the task produces, in a fixed order (punctuation are separate tokens)."""


def gold_score(text: str) -> float:
    """The true reward of one completion.

    With ``w`` the lowercased whitespace-split tokens of ``text``:

        gold = tanh(sum_i LEXICON.get(w_i, 0))
               - 0.5  * (# tokens not in FUNCTION_WORDS that already occurred earlier in w)
               - 0.25 * (# adjacent pairs w_i, w_{i+1} that are both in LEXICON)
               - 0.5  * [w is empty, or w does not end in ".", or "." occurs more than once]
               - 0.1  * max(0, len(w) - MAX_WORDS)

    The tanh saturates, so piling up sentiment words gains almost nothing, while each penalty costs as
    much as a strong sentiment word: "perfect and i loved it ." scores tanh(1.9) = 0.956, but
    "perfect perfect perfect ." scores tanh(3) - 1.0 - 0.5 = -0.505. Punctuation must be separate
    tokens ("good ." not "good."); unknown words weigh 0. Natural sentences from this task score in
    (-1, 1) and are never penalized.
    """
    words = text.lower().split()
    sentiment = math.tanh(sum(LEXICON.get(w, 0.0) for w in words))
    repeats = sum(1 for i, w in enumerate(words) if w not in FUNCTION_WORDS and w in words[:i])
    adjacent = sum(1 for a, b in zip(words, words[1:]) if a in LEXICON and b in LEXICON)
    bad_shape = not words or words[-1] != "." or words.count(".") != 1
    too_long = max(0, len(words) - MAX_WORDS)
    return (
        sentiment
        - REPEAT_PENALTY * repeats
        - ADJACENT_PENALTY * adjacent
        - SHAPE_PENALTY * bad_shape
        - LENGTH_PENALTY * too_long
    )


def reward_fn(prompts: list[str], completions: list[str]) -> list[float]:
    """Function reward: the gold score of each completion; the prompt does not count.

    ``prompts`` and ``completions`` are parallel lists of length ``batch``; returns ``batch`` floats.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"prompts and completions differ in length: {len(prompts)} != {len(completions)}")
    return [gold_score(c) for c in completions]


gold_fn = reward_fn
"""The gold scorer the policy trainer logs as ``gold_score`` (same signature as ``reward_fn``)."""


def _sample_prompt(rng: random.Random) -> tuple[str, str]:
    """Returns (prompt, its noun) with the noun "" for prompts like "it was"."""
    opener = rng.choice(OPENERS)
    noun = "" if rng.random() < 0.05 else rng.choice(NOUNS)
    subject = f"{rng.choice(DETERMINERS)} {noun}" if noun else "it"
    return " ".join(p for p in (opener, subject, rng.choice(LINKING_VERBS)) if p), noun


def _pick(rng: random.Random, mood: float, positive: dict, negative: dict, neutral: list, used: set) -> str:
    """A word whose polarity follows ``mood`` in [-1, 1], never one already in ``used``."""
    u = rng.random()
    if u < 0.4 * (1 + mood):
        pool = list(positive)
    elif u < 0.8:
        pool = list(negative)
    else:
        pool = list(neutral)
    return _fresh(rng, pool, used)


def _fresh(rng: random.Random, pool: list[str], used: set) -> str:
    """A word of ``pool`` not yet in ``used`` (then added to it), so no content word repeats."""
    word = rng.choice([w for w in pool if w not in used] or pool)
    used.add(word)
    return word


def _sample_completion(rng: random.Random, avoid_noun: str) -> str:
    """A well-formed completion (3-10 tokens, ends in ".") of mixed sentiment, no repeated content word."""
    mood = rng.uniform(-1.0, 1.0)
    used: set[str] = set()

    def adj() -> str:
        word = _pick(rng, mood, POSITIVE_ADJECTIVES, NEGATIVE_ADJECTIVES, NEUTRAL_ADJECTIVES, used)
        if rng.random() < 0.3 and word in LEXICON:
            return f"{_fresh(rng, INTENSIFIERS, used)} {word}"
        return word

    def other_adj() -> str:
        # a "but" clause leans the other way, which gives the data mixed-sentiment sentences
        nonlocal mood
        mood = -mood
        return adj()

    def adv() -> str:
        return _pick(rng, mood, POSITIVE_ADVERBS, NEGATIVE_ADVERBS, NEUTRAL_ADVERBS, used)

    def verb() -> str:
        return _pick(rng, mood, POSITIVE_VERBS, NEGATIVE_VERBS, NEUTRAL_VERBS, used)

    noun = rng.choice([n for n in NOUNS if n != avoid_noun])
    templates: list[Callable[[], str]] = [
        lambda: f"{adj()} .",
        lambda: f"{adj()} and {adj()} .",
        lambda: f"{adj()} but the {noun} was {other_adj()} .",
        lambda: f"{adj()} and the {noun} was {adj()} .",
        lambda: f"{adj()} , and i {verb()} it .",
        lambda: f"{adj()} and the staff treated us {adv()} .",
    ]
    if avoid_noun == "staff":
        templates.pop()
    return rng.choice(templates)()


_SPLITS = ("train", "test")


def _in_split(prompt: str, split: str | None) -> bool:
    """Hash the prompt so that train and test never share a prompt (about 80% / 20% of all prompts)."""
    return split is None or (zlib.crc32(prompt.encode()) % 10 < 8) == (split == "train")


def _generate(
    n: int, seed: int, split: str | None, make_row: Callable[[random.Random, str, str], dict]
) -> list:
    """``n`` rows ``make_row(rng, prompt, prompt_noun)`` for prompts drawn in order and kept if in ``split``."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if split is not None and split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS} or None, got {split!r}")
    rng = random.Random(seed)
    rows: list = []
    while len(rows) < n:
        prompt, noun = _sample_prompt(rng)
        if _in_split(prompt, split):
            rows.append(make_row(rng, prompt, noun))
    return rows


def make_prompts(n: int, seed: int = 0, split: str | None = None) -> list[str]:
    """``n`` sentence prefixes such as "honestly the food was" (2-5 words, no sentiment words)."""
    return _generate(n, seed, split, lambda rng, prompt, noun: prompt)


def make_sft(n: int, seed: int = 0, split: str | None = None) -> list[dict]:
    """``n`` rows {"prompt", "completion"}; ``prompt + " " + completion`` is a sentence ending in ".".

    Sentiment is mixed (a uniform mood per sentence), so a model fit to this data is far from optimal.
    """
    return _generate(
        n, seed, split, lambda rng, p, noun: {"prompt": p, "completion": _sample_completion(rng, noun)}
    )


def make_preferences(n: int, seed: int = 0, split: str | None = None, temperature: float = 0.2) -> list[dict]:
    """``n`` rows {"prompt", "chosen", "rejected"} labelled by a noisy Bradley-Terry annotator.

    Two different completions a, b are drawn for one prompt; a is chosen with probability
    ``sigmoid((gold_score(a) - gold_score(b)) / temperature)``. Lower temperature = cleaner labels.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")

    def row(rng: random.Random, prompt: str, noun: str) -> dict:
        a = _sample_completion(rng, noun)
        b = _sample_completion(rng, noun)
        while b == a:
            b = _sample_completion(rng, noun)
        if rng.random() < _sigmoid((gold_score(a) - gold_score(b)) / temperature):
            return {"prompt": prompt, "chosen": a, "rejected": b}
        return {"prompt": prompt, "chosen": b, "rejected": a}

    return _generate(n, seed, split, row)


def make_scalar(n: int, seed: int = 0, split: str | None = None, noise_std: float = 0.0) -> list[dict]:
    """``n`` rows {"text", "label"}: a full sentence and its gold score plus N(0, noise_std^2) noise.

    Prompts hold no sentiment words and share no content word with their completion, so the gold
    score of the full sentence equals the gold score of its completion.
    """
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")

    def row(rng: random.Random, prompt: str, noun: str) -> dict:
        text = f"{prompt} {_sample_completion(rng, noun)}"
        return {"text": text, "label": gold_score(text) + (rng.gauss(0.0, noise_std) if noise_std else 0.0)}

    return _generate(n, seed, split, row)


MAKERS: dict[str, Callable[..., list]] = {
    "prompts": make_prompts, "sft": make_sft, "preferences": make_preferences, "scalar": make_scalar,
}  # fmt: skip


def make_split(kind: str, n: int, seed: int = 0, split: str | None = None, **options) -> list:
    """Dispatch to ``make_<kind>``; ``options`` go to it (``temperature``, ``noise_std``)."""
    if kind not in MAKERS:
        raise ValueError(f"kind must be one of {sorted(MAKERS)}, got {kind!r}")
    return MAKERS[kind](n, seed=seed, split=split, **options)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def preference_ceiling(pairs: Sequence[dict] | Sequence[float], temperature: float = 0.2) -> float:
    """The best expected accuracy any reward model can reach on Bradley-Terry labels.

    ``pairs`` is either rows with "chosen"/"rejected" completions or the gold differences themselves.
    Each label agrees with the higher-gold completion with probability ``max(p, 1 - p)``,
    ``p = sigmoid(gold difference / temperature)``, and no scorer can beat predicting that one (the
    Bayes classifier), so the expected accuracy on a labelled held-out set is at most
    ``mean(max(p, 1 - p))``. The measured accuracy on a finite set scatters around this value.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if len(pairs) == 0:
        raise ValueError("pairs is empty")
    diffs = [
        gold_score(p["chosen"]) - gold_score(p["rejected"]) if isinstance(p, dict) else float(p)
        for p in pairs
    ]
    return sum(max(q, 1.0 - q) for q in (_sigmoid(d / temperature) for d in diffs)) / len(diffs)
