"""Forward passes over a rollout: response log-probs (policy, reference), critic values, and the module that holds
the policy and critic together."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from rlhf.core.logprobs import entropy_from_logits, selective_log_softmax
from rlhf.models import position_ids_from_mask, token_scores


def concat(query_ids, query_mask, response_ids, response_mask):
    return torch.cat([query_ids, response_ids], 1), torch.cat([query_mask, response_mask], 1)

def policy_logprobs(model: torch.nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor,
                    response_ids: torch.Tensor, response_mask: torch.Tensor, *, temperature: float = 1.0,
                    chunk_size: int = 1024, with_entropy: bool = False):
    """Log-probs of the response tokens under ``model``, at the sampling temperature.

    Shapes: query ``(N, Q)``, response ``(N, R)``. Returns ``logprobs (N, R)`` and, if asked, ``entropy (N, R)``
    of the full next-token distribution. Gradients flow when called outside no_grad.
    """
    ids, mask = concat(query_ids, query_mask, response_ids, response_mask)
    r = response_ids.shape[1]
    # Only the R positions that predict response tokens need logits: logits[t] predicts ids[t + 1].
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                   use_cache=False, logits_to_keep=r + 1).logits[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = selective_log_softmax(logits, response_ids, chunk_size=chunk_size)
    entropy = entropy_from_logits(logits.detach(), chunk_size=chunk_size) if with_entropy else None
    return logprobs, entropy

class TokenValues(torch.nn.Module):
    """Wraps a one-label sequence-classification model as a critic: ``(N, S) -> (N, S)`` values per position.

    A module of its own so that DDP/FSDP wrap the path the gradients really take.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return token_scores(self.model, input_ids, attention_mask)

class PolicyAndValue(torch.nn.Module):
    """The policy and the critic as one module, for the optimizer's parameter names and for FSDP2.

    accelerate prepares one model per ``prepare`` call under FSDP2, and PPO trains two with one optimizer. Prepared
    together as this module, each becomes its own ``fully_shard`` unit (both classes are listed in
    ``_no_split_modules``, beside their decoder layers). Its own forward is never called: the trainer calls
    ``.policy`` and ``.critic`` directly. Its parameter names (``policy.*`` then ``critic.*``) are those of the
    optimizer's two groups, in order.
    """

    def __init__(self, policy: PreTrainedModel, critic: TokenValues):
        super().__init__()
        self.policy = policy
        self.critic = critic
        layers = set(getattr(policy, "_no_split_modules", None) or [])
        layers |= set(getattr(critic.model, "_no_split_modules", None) or [])
        self._no_split_modules = sorted(layers | {type(policy).__name__, type(critic).__name__})

def response_values(critic: torch.nn.Module, query_ids, query_mask, response_ids, response_mask) -> torch.Tensor:
    """Critic values of the states before each response token: ``(N, R)``, aligned with the log-probs."""
    ids, mask = concat(query_ids, query_mask, response_ids, response_mask)
    q, r = query_ids.shape[1], response_ids.shape[1]
    return critic(ids, mask)[:, q - 1:q + r - 1]
