"""Direct alignment losses on preference pairs (issue 19): DPO and its variants, selected by name from ``DPO_LOSSES``.

Every loss takes the summed response log-probs of the chosen and the rejected completion under the policy and under
the frozen reference, each ``(B,)``, and the KL coefficient ``beta``. With the log-ratio margin

    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))

- ``sigmoid`` (DPO, Rafailov et al. 2023): ``-log sigmoid(beta * h)``; with ``label_smoothing`` eps > 0 it is
  conservative DPO (Mitchell 2023, cDPO): ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``, the binary
  cross-entropy of ``beta * h`` against the label ``1 - eps``, for labels that are wrong with probability eps;
- ``hinge`` (SLiC, Zhao et al. 2023): ``max(0, 1 - beta * h)``;
- ``ipo`` (Azar et al. 2023): ``(h - 1 / (2 beta))^2``, a squared loss that does not push h to infinity on
  deterministic preferences. The paper's h is of sequence log-likelihoods; TRL feeds it per-token means instead. We
  take whatever the caller passes (the trainer passes sums, as for the other losses).

The implicit rewards are ``beta * (log pi(y) - log pi_ref(y))`` of each completion: their difference is beta * h,
and the logged reward accuracy is the share of pairs where the chosen one's is larger.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from rlhf.core.registry import Registry

DPO_LOSSES = Registry("DPO loss")


class PairLogps(NamedTuple):
    """Summed response log-probs of a batch of pairs, each ``(B,)``."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor


def _check(logps: PairLogps, beta: float) -> None:
    shape = logps.policy_chosen.shape
    for name, x in zip(PairLogps._fields, logps):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        if x.dim() != 1 or x.shape != shape:
            raise ValueError(f"{name} must be (batch,) like policy_chosen {tuple(shape)}, got {tuple(x.shape)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def margin(logps: PairLogps) -> torch.Tensor:
    """``(B,)`` h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)), in float32 or wider."""
    p = [x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in logps]
    return (p[0] - p[2]) - (p[1] - p[3])


@DPO_LOSSES.register("sigmoid")
def sigmoid_loss(logps: PairLogps, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """``(B,)`` DPO: ``-log sigmoid(beta h)``; conservative DPO with ``label_smoothing`` eps in [0, 0.5)."""
    _check(logps, beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    z = beta * margin(logps)
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


@DPO_LOSSES.register("hinge")
def hinge_loss(logps: PairLogps, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """``(B,)`` SLiC's hinge: ``max(0, 1 - beta h)``; label smoothing does not apply (must be 0)."""
    _check(logps, beta)
    if label_smoothing:
        raise ValueError(f"label_smoothing applies to the sigmoid loss only, got {label_smoothing} with hinge")
    return torch.relu(1.0 - beta * margin(logps))


@DPO_LOSSES.register("ipo")
def ipo_loss(logps: PairLogps, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """``(B,)`` IPO: ``(h - 1 / (2 beta))^2``; label smoothing does not apply (must be 0)."""
    _check(logps, beta)
    if label_smoothing:
        raise ValueError(f"label_smoothing applies to the sigmoid loss only, got {label_smoothing} with ipo")
    return (margin(logps) - 1.0 / (2.0 * beta)) ** 2


def implicit_rewards(logps: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B,)`` each: ``beta * (log pi - log pi_ref)`` of the chosen and of the rejected completion (no gradient)."""
    with torch.no_grad():
        return (beta * (logps.policy_chosen - logps.ref_chosen).float(),
                beta * (logps.policy_rejected - logps.ref_rejected).float())


def pair_metrics(logps: PairLogps, beta: float) -> dict[str, float]:
    """Batch means: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin`` (their difference),
    ``rewards/accuracy`` (share of pairs with the chosen reward strictly larger; a tie counts as wrong),
    ``logps/chosen`` and ``logps/rejected`` (the policy's)."""
    chosen, rejected = implicit_rewards(logps, beta)
    return {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
            "rewards/margin": (chosen - rejected).mean().item(),
            "rewards/accuracy": (chosen > rejected).float().mean().item(),
            "logps/chosen": logps.policy_chosen.detach().float().mean().item(),
            "logps/rejected": logps.policy_rejected.detach().float().mean().item()}
