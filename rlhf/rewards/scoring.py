"""One score per response: the reward model and the reward function, weighted, with an optional penalty for
responses cut without EOS and clipping; and the gold score, logged only."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.models import sequence_scores
from rlhf.rewards.functions import call_reward_function
from rlhf.rollout.batch import decode_responses, has_eos
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

def score_responses(reward_model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase,
                    reward_tokenizer: PreTrainedTokenizerBase | None, reward_cfg, reward_fn: Callable | None,
                    gold_fn: Callable | None, prompts: list[str], query_ids: torch.Tensor, query_mask: torch.Tensor,
                    response_ids: torch.Tensor, response_mask: torch.Tensor, autocast=None):
    """The total score of each response, by one rule for every script: ``model_weight * reward model +
    function_weight * reward function``, plus ``missing_eos_penalty`` for responses cut without EOS, clipped to
    ``[-clip, clip]``. ``reward_cfg`` is the ``reward`` section of a policy config; ``prompts`` has one entry per row.

    Returns ``scores (N,)`` on the rows' device, ``gold (N,)`` from ``gold_fn`` (or None), and the decoded
    completions.
    """
    import contextlib

    dev = response_ids.device
    # reward.timeout_s (seconds, None = no limit) bounds each call of reward.function and reward.gold; a reward
    # section without the field (an older or hand-built config) means no limit.
    timeout_s = getattr(reward_cfg, "timeout_s", None)
    completions = decode_responses(tokenizer, response_ids, response_mask)
    scores = torch.zeros(len(completions), device=dev)
    if reward_model is not None:
        with torch.no_grad(), (autocast or contextlib.nullcontext()):
            rm = reward_model_scores(reward_model, tokenizer, reward_tokenizer, query_ids, query_mask, response_ids,
                                     response_mask, prompts, completions)
        scores = scores + reward_cfg.model_weight * rm.float()
    if reward_fn is not None:
        fn_scores = call_reward_function(reward_fn, reward_cfg.function, prompts, completions, timeout_s,
                                         key="reward.function")
        scores = scores + reward_cfg.function_weight * fn_scores.to(dev)
    if reward_cfg.missing_eos_penalty is not None:
        ended = has_eos(response_ids, response_mask, tokenizer.eos_token_id)
        scores = scores + torch.where(ended, 0.0, reward_cfg.missing_eos_penalty)
    if reward_cfg.clip is not None:
        scores = scores.clamp(-reward_cfg.clip, reward_cfg.clip)
    gold = None
    if gold_fn is not None:
        gold = call_reward_function(gold_fn, reward_cfg.gold, prompts, completions, timeout_s,
                                    key="reward.gold").to(dev)
    return scores, gold, completions
