"""The rule that turns reward sources into one score per response, and the reward-model forward.

    total = sum over sources, in order, of weight * score   (starting from zeros)
            + missing_eos_penalty for responses cut without EOS
            then clipped to [-clip, clip]

The sources themselves (reward models, reward functions, reward servers) are rlhf.rewards.sources; score_responses
is the older entry point (one reward model, one function), kept as a thin wrapper over it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.models import sequence_scores
from rlhf.rollout.batch import has_eos
from rlhf.rollout.forward import concat


def reward_model_scores(reward_model: PreTrainedModel, policy_tokenizer: PreTrainedTokenizerBase,
                        reward_tokenizer: PreTrainedTokenizerBase | None, query_ids, query_mask, response_ids,
                        response_mask, prompts: list[str] | None = None,
                        completions: list[str] | None = None) -> torch.Tensor:
    """``(N,)`` reward-model score at the last real token of prompt + response.

    With the policy's tokenizer the token ids are reused; with a different one the text is decoded and
    re-tokenized (right-padded, so the last real token is the last 1 of its attention mask).
    """
    if reward_tokenizer is None:
        ids, mask = concat(query_ids, query_mask, response_ids, response_mask)
        return sequence_scores(reward_model, ids, mask)
    texts = [p + " " + c if c else p for p, c in zip(prompts, completions)]
    eos = reward_tokenizer.eos_token or ""
    enc = reward_tokenizer([t + eos for t in texts], return_tensors="pt", padding=True,
                           padding_side="right", add_special_tokens=True)
    device = query_ids.device
    return sequence_scores(reward_model, enc["input_ids"].to(device), enc["attention_mask"].to(device))


def total_score(weighted: Sequence[tuple[float, torch.Tensor]], response_ids: torch.Tensor,
                response_mask: torch.Tensor, eos_token_id, missing_eos_penalty: float | None = None,
                clip: float | None = None) -> torch.Tensor:
    """``(N,)`` float32 total on the rows' device: zeros, plus ``weight * score`` for each ``(weight, (N,) score)``
    in order, plus ``missing_eos_penalty`` for each row without EOS (``response_ids``, ``response_mask`` ``(N, R)``),
    then clipped to ``[-clip, clip]``. ``None`` turns the penalty or the clip off.

    Always these float operations in this order, so a config scores bit-identically from release to release.
    """
    scores = torch.zeros(response_ids.shape[0], device=response_ids.device)
    for weight, s in weighted:
        scores = scores + weight * s
    if missing_eos_penalty is not None:
        ended = has_eos(response_ids, response_mask, eos_token_id)
        scores = scores + torch.where(ended, 0.0, missing_eos_penalty)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


def score_responses(reward_model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase,
                    reward_tokenizer: PreTrainedTokenizerBase | None, reward_cfg, reward_fn: Callable | None,
                    gold_fn: Callable | None, prompts: list[str], query_ids: torch.Tensor, query_mask: torch.Tensor,
                    response_ids: torch.Tensor, response_mask: torch.Tensor, autocast=None):
    """The total score of one reward model and one reward function (the shorthands ``model.reward`` and
    ``reward.function``; ``reward.sources`` is not read: use rlhf.rewards.sources.RewardSources for it):
    ``model_weight * reward model + function_weight * reward function``, plus ``missing_eos_penalty`` for responses
    cut without EOS, clipped to ``[-clip, clip]``. ``reward_cfg`` is the ``reward`` section of a policy config;
    ``prompts`` has one entry per row; ``autocast`` is a context manager for the reward-model forward, or None.

    Returns ``scores (N,)`` on the rows' device, ``gold (N,)`` from ``gold_fn`` (or None), and the decoded
    completions.
    """
    from rlhf.rewards.sources import FunctionSource, ModelSource, RewardSources

    # reward.timeout_s (seconds, None = no limit) bounds each call of reward.function and reward.gold; a reward
    # section without the field (an older or hand-built config) means no limit.
    timeout_s = getattr(reward_cfg, "timeout_s", None)
    sources = []
    if reward_model is not None:
        sources.append(ModelSource("model", reward_cfg.model_weight, reward_model, reward_tokenizer))
    if reward_fn is not None:
        sources.append(FunctionSource("function", reward_cfg.function_weight, reward_fn, reward_cfg.function,
                                      timeout_s))
    scored = RewardSources(sources, tokenizer, missing_eos_penalty=reward_cfg.missing_eos_penalty,
                           clip=reward_cfg.clip, gold_fn=gold_fn, gold_name=getattr(reward_cfg, "gold", None),
                           timeout_s=timeout_s).score(
        prompts, query_ids, query_mask, response_ids, response_mask,
        autocast=None if autocast is None else lambda: autocast)
    return scored.total, scored.gold, scored.completions
