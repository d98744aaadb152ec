"""Built-in tasks with a known gold reward, so the whole pipeline runs offline (see ``sentiment``)."""

from __future__ import annotations

BUILTIN_TASKS: dict[str, dict[str, str]] = {
    "sentiment": {"function": "rlhf.tasks.sentiment.reward_fn", "gold": "rlhf.tasks.sentiment.gold_fn"},
    # verifiable tasks (rlhf.tasks.verifiable): the reward adds a 0.1 format bonus, the gold is the accuracy
    "arithmetic": {"function": "rlhf.tasks.arithmetic.reward_fn", "gold": "rlhf.tasks.arithmetic.correct_fn"},
    "countdown": {"function": "rlhf.tasks.countdown.reward_fn", "gold": "rlhf.tasks.countdown.correct_fn"},
    "wordcount": {"function": "rlhf.tasks.wordcount.reward_fn", "gold": "rlhf.tasks.wordcount.correct_fn"},
}
"""Task name (``data.prompts=builtin:<name>``) -> the dotted paths that ``reward.function=auto`` and
``reward.gold=auto`` resolve to."""


def builtin_task(prompts: str | None) -> dict[str, str] | None:
    """The built-in task whose prompts ``prompts`` names (``builtin:sentiment``), or None for a user's data."""
    if not isinstance(prompts, str) or not prompts.startswith("builtin:"):
        return None
    return BUILTIN_TASKS.get(prompts.removeprefix("builtin:"))
