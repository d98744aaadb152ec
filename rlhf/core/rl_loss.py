"""The RL loss of one micro-batch, assembled from its terms: the policy loss (+ beta * KL loss when the KL is not in
the reward) (+ value_coef * value loss with a critic). A pure function of tensors; the trainer scales it by the
micro-batch's share of the global count of the units its loss averages over (rlhf.trainers.policy_update.loss_units,
rlhf.runtime.backend.micro_batch_share)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf.core.objectives import aggregation_mode, kl_loss, value_loss


@dataclass(frozen=True)
class LossSettings:
    """The update's loss knobs (trainer.* and kl.*), fixed for a run."""

    clip_low: float = 0.2
    clip_high: float | None = None
    agg: str = "token-mean"
    agg_norm: float | None = None  # the constant of agg=seq-mean-token-sum-norm (Dr. GRPO): rollout.max_new_tokens
    kl_estimator: str = "k1"
    kl_correction: str = "none"  # kl.loss_correction: "is" weights the KL loss by pi / pi_old (rlhf.core.correction)
    value_clip: float | None = 0.2
    value_loss: str = "mse"
    value_coef: float = 0.5


def rl_loss(policy_loss: Callable, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
            mask: torch.Tensor, settings: LossSettings, *, ref_logp: torch.Tensor | None = None,
            kl_coef: float = 0.0, values: torch.Tensor | None = None, old_values: torch.Tensor | None = None,
            returns: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``()`` loss and its detached ``()`` statistics.

    logp, old_logp, advantages, mask: ``(batch, response_len)``; ``policy_loss`` a rlhf.core.objectives.POLICY_LOSSES
    entry. With ``ref_logp (batch, response_len)`` the loss adds ``kl_coef * kl_loss(logp, ref_logp)`` (the KL as a
    loss term, GRPO style); with ``values`` (and ``old_values``, ``returns``) it adds ``value_coef * value_loss``.
    Every term is aggregated over ``mask`` by ``settings.agg``. For "seq-mean-token-sum-norm" each term is aggregated
    by "seq-mean-token-sum" and divided by ``settings.agg_norm`` (the same number, as aggregation is linear), so a
    policy loss needs no argument beyond ``agg``.
    """
    s = settings
    agg, norm = s.agg, None
    if aggregation_mode(s.agg) == "seq-mean-token-sum-norm":
        if s.agg_norm is None or not s.agg_norm > 0:
            raise ValueError(f"agg=seq-mean-token-sum-norm needs agg_norm > 0 (rollout.max_new_tokens), got "
                             f"{s.agg_norm}")
        agg, norm = "seq-mean-token-sum", s.agg_norm

    def normed(x: torch.Tensor) -> torch.Tensor:
        return x if norm is None else x / norm

    pg_loss, pstats = policy_loss(logp, old_logp, advantages, mask, clip_low=s.clip_low, clip_high=s.clip_high,
                                  agg=agg)
    pg_loss = normed(pg_loss)
    loss = pg_loss
    stats = {"policy/loss": pg_loss.detach(), "policy/clipfrac": pstats["clipfrac"],
             "policy/approxkl": pstats["approxkl"]}
    if ref_logp is not None:
        kl_term = normed(kl_loss(logp, ref_logp, mask, s.kl_estimator, agg,
                                 old_logp=old_logp if s.kl_correction == "is" else None))
        loss = loss + kl_coef * kl_term
        stats["policy/kl_loss"] = kl_term.detach()
    if values is not None:
        v_loss, vstats = value_loss(values, old_values, returns, mask, clip_range=s.value_clip, loss=s.value_loss,
                                    agg=agg)
        v_loss = normed(v_loss)
        loss = loss + s.value_coef * v_loss
        stats["value/loss"] = v_loss.detach()
        stats["value/clipfrac"] = vstats["clipfrac"]
    return loss, stats
