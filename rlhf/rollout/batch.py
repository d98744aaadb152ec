"""The rollout batch and its masks.

Layout of one rollout batch (N = prompts x samples_per_prompt, samples of one prompt in consecutive rows):

    query_ids      (N, Q)  left-padded prompt tokens       query_mask     (N, Q)
    response_ids   (N, R)  right-padded after EOS          response_mask  (N, R)  1 up to and including EOS
    logprobs       (N, R)  policy log-probs at sampling time (no grad)
    ref_logprobs   (N, R)  reference log-probs, or None when no reference is loaded
    values         (N, R)  critic values, or None without a critic
    scores         (N,)    total sequence score (reward model and/or functions)
    entropy        (N, R)  entropy of the policy's next-token distribution

Every mask is explicit; nothing downstream infers positions from pad ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from transformers import PreTrainedTokenizerBase


class Rollout(NamedTuple):
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None
    values: torch.Tensor | None
    scores: torch.Tensor
    entropy: torch.Tensor
    sampler_logprobs: torch.Tensor | None = None  # (N, R) the engine's own log-probs of the drawn tokens, 0 at padding

def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: int | Sequence[int] | None) -> torch.Tensor:
    """``(N, R)`` generated ids -> ``(N, R)`` long mask: 1 up to and including the first EOS, 0 after.

    Rows without EOS (cut at max_new_tokens) are all ones.
    """
    if eos_token_id is None:
        return torch.ones_like(response_ids)
    eos_ids = torch.as_tensor(eos_token_id, device=response_ids.device).reshape(-1)
    is_eos = torch.isin(response_ids, eos_ids).long()
    # Tokens strictly after the first EOS have a cumulative EOS count that already counted it.
    seen_before = is_eos.cumsum(-1) - is_eos
    return (seen_before == 0).long()

def has_eos(response_ids: torch.Tensor, response_mask: torch.Tensor, eos_token_id) -> torch.Tensor:
    """``(N,)`` bool: the response ended with an EOS rather than being cut at max_new_tokens."""
    if eos_token_id is None:
        return torch.zeros(response_ids.shape[0], dtype=torch.bool, device=response_ids.device)
    eos_ids = torch.as_tensor(eos_token_id, device=response_ids.device).reshape(-1)
    return (torch.isin(response_ids, eos_ids) & response_mask.bool()).any(-1)

def decode_responses(tokenizer: PreTrainedTokenizerBase, response_ids: torch.Tensor,
                     response_mask: torch.Tensor) -> list[str]:
    """Response text up to (not including) EOS."""
    rows = [ids[m.bool()].tolist() for ids, m in zip(response_ids, response_mask)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)
