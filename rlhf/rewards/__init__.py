"""Reward sources: reward models, Python reward functions and reward servers, selected by type from a registry, and
the rule that sums them into one score per response.

    sources.py    REWARD_SOURCES (model | function | remote), RewardSources: a config's sources -> total,
                  per-source and gold scores; check_reward_sources: their config checks
    scoring.py    total_score: weighted sum + missing-EOS penalty + clip; reward_model_scores; score_responses
                  (one reward model + one function, the older entry point)
    functions.py  call_reward_function: a user's fn(prompts, completions) -> list[float], time-limited and checked
    remote.py     remote_scores: POST {"prompts", "completions"} -> {"scores"}, batched, retried with backoff
"""
