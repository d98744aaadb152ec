"""Forward passes over a rollout: response log-probs (policy, reference), critic values, and the module that holds
the policy and critic together.

Which distribution each log-prob is under (``spec``: the run's rlhf.rollout.spec.SamplingSpec):

    policy (old, at sampling time, and new, in the update): :func:`policy_logprobs` with ``spec``: the sampling
        distribution itself: ``scores / temperature``, then min_new_tokens, top-k, top-p and min-p masking
        (renormalised over the kept tokens), by the same processor classes the sampler runs. The log-prob of a
        rollout token is its log-prob under the distribution that drew it, so the PPO ratio pi_new(y) / pi_old(y) is
        an importance weight between the distributions that really sample, whatever the knobs. The scored token is
        kept in the top-k/top-p/min-p support (``keep_token``, rlhf.rollout.spec.sampling_logprobs): that changes
        nothing for a token inside it, and gives a finite value instead of -inf for a drawn token that a bf16
        forward puts just outside a boundary by rounding (about 1 token in 200 in a toy model under autocast) or that
        left the support as the weights moved during the update.
    reference: :func:`reference_logprobs`: the reference's softmax of ``scores / temperature`` over the whole
        vocabulary, no truncation. With y drawn from pi_sample, ``k1 = log pi_sample(y) - log pi_ref(y)`` is then an
        unbiased estimate of KL(pi_sample || pi_ref), the KL of what the policy really generates from the reference
        model at the sampling temperature; pi_ref > 0 everywhere, so it is always finite. (A top-k mask on the
        reference would give -inf for any sampled token outside the reference's own top k, and KL = inf.) With
        truncation on, this KL is not 0 at step 0: it is -E[log(mass the truncation keeps)], the price of sampling
        a truncated distribution.

With the default knobs (temperature 1, top_k 0, top_p 1, min_p 0, min_new_tokens 0) both are the full softmax and
the ops are exactly those of ``policy_logprobs(..., temperature=1.0)``: the same bits.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from rlhf.models import position_ids_from_mask, token_scores
from rlhf.rollout.spec import SamplingSpec, sampling_logprobs


def concat(query_ids, query_mask, response_ids, response_mask):
    return torch.cat([query_ids, response_ids], 1), torch.cat([query_mask, response_mask], 1)


def response_logits(model: torch.nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor,
                    response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``(N, R, V)`` logits predicting the response tokens: ``[:, t]`` predicts ``response_ids[:, t]``."""
    ids, mask = concat(query_ids, query_mask, response_ids, response_mask)
    r = response_ids.shape[1]
    # Only the R positions that predict response tokens need logits: logits[t] predicts ids[t + 1].
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                 use_cache=False, logits_to_keep=r + 1).logits[:, :-1]


def policy_logprobs(model: torch.nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor,
                    response_ids: torch.Tensor, response_mask: torch.Tensor, *, spec: SamplingSpec | None = None,
                    temperature: float | None = None, chunk_size: int | None = None, with_entropy: bool = False,
                    keep_token: bool = True):
    """Log-probs of the response tokens under ``model``'s sampling distribution.

    Shapes: query ``(N, Q)``, response ``(N, R)``. Returns ``logprobs (N, R)`` and, if asked, ``entropy (N, R)`` of
    the same next-token distribution (no gradient). Gradients flow when called outside no_grad.

    spec: the SamplingSpec the tokens were drawn with: log-probs under the distribution that drew them (temperature,
    min_new_tokens, top-k, top-p, min-p; see rlhf.rollout.spec.sampling_logprobs; positions where ``response_mask``
    is 0 hold 0 when the spec truncates; keep_token: the scored token stays in the top-k/top-p/min-p support, False
    for the exact -inf outside it). temperature: the older call, the full softmax at that temperature (the same as a
    spec with only a temperature); give one of the two (neither: temperature 1).
    """
    if spec is None:
        spec = SamplingSpec(temperature=1.0 if temperature is None else temperature)
    elif temperature is not None and temperature != spec.temperature:
        raise ValueError(f"policy_logprobs: temperature={temperature} disagrees with spec.temperature="
                         f"{spec.temperature}; pass the spec only")
    logits = response_logits(model, query_ids, query_mask, response_ids, response_mask)
    return sampling_logprobs(logits, response_ids, spec, response_mask=response_mask, chunk_size=chunk_size,
                             with_entropy=with_entropy, keep_token=keep_token)


def reference_logprobs(model: torch.nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor,
                       response_ids: torch.Tensor, response_mask: torch.Tensor, *, spec: SamplingSpec,
                       chunk_size: int | None = None) -> torch.Tensor:
    """``(N, R)`` log-probs of the response tokens under the reference's softmax of ``logits / spec.temperature``
    over the whole vocabulary: top-k, top-p, min-p and min_new_tokens are not applied (see this module's docstring:
    the KL is then that of the sampling distribution from the tempered reference, finite by construction)."""
    logprobs, _ = policy_logprobs(model, query_ids, query_mask, response_ids, response_mask,
                                  temperature=spec.temperature, chunk_size=chunk_size)
    return logprobs


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


def rollout_forwards(ro, policy: torch.nn.Module, critic: torch.nn.Module | None, reference: torch.nn.Module | None,
                     spec: SamplingSpec, chunk_size: int | None, keep_graph: bool, autocast):
    """The forwards over a sampled rollout (rlhf.rollout.batch.Rollout): policy log-probs and entropy, critic values,
    reference log-probs, filled into the rollout. ``keep_graph`` (the trainer's fused path: one epoch, one minibatch)
    runs the policy and critic forwards with their graphs and also returns ``(logprobs, values)`` with them, for the
    update to reuse; otherwise everything runs under no_grad and the second value is None. ``autocast``: a callable
    returning the mixed-precision context."""
    args = (ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask)
    live = None
    if keep_graph:
        with autocast():
            live_logp, entropy = policy_logprobs(policy, *args, spec=spec, chunk_size=chunk_size, with_entropy=True)
            live_values = response_values(critic, *args) if critic is not None else None
        live = (live_logp, live_values)
        logprobs = live_logp.detach()
        values = live_values.detach() if live_values is not None else None
    with torch.no_grad(), autocast():
        if not keep_graph:
            logprobs, entropy = policy_logprobs(policy, *args, spec=spec, chunk_size=chunk_size, with_entropy=True)
            values = response_values(critic, *args) if critic is not None else None
        ref_logprobs = None
        if reference is not None:
            ref_logprobs = reference_logprobs(reference, *args, spec=spec, chunk_size=chunk_size)
    return ro._replace(logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, entropy=entropy), live
