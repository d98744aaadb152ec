"""Reward sources: Python reward functions (called with a time limit and checked), reward models, and the rule that
sums them into one score per response.

    functions.py  call_reward_function: a user's fn(prompts, completions) -> list[float], checked
    scoring.py    score_responses: reward model + functions (+ penalties, clipping) -> scores, gold
"""
