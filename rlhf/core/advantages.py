"""Advantage estimators: GAE, RLOO, GRPO and REINFORCE++, selected by name from `ADVANTAGE_ESTIMATORS`.

Every entry has the same signature

    fn(rewards, mask, values, *, group_size, gamma, lam, std_normalize, eps=1e-8) -> (advantages, returns)

with `rewards`, `mask`, `values`, `advantages`, `returns` all (batch, response_len), and ignores the
arguments it does not use (the trainer passes None for an `algorithm.*` field the estimator does not read).
Each entry declares what it needs from the rest of the config (`AdvantageInfo`, read with
`ADVANTAGE_ESTIMATORS.info(name)`): config validation checks those declarations, not the names.
`rewards` are the per-token shaped rewards (KL penalty on every real token, score on the last one;
see `rlhf.core.kl.shape_rewards`). `mask` is 1 on real response tokens up to and including EOS and 0 after;
outputs are 0 where it is 0. The group estimators (RLOO, GRPO) expect the `group_size` rollouts of one
prompt in contiguous rows: rows [i*K, (i+1)*K) share prompt i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.core.losses import masked_sum, masked_whiten
from rlhf.core.registry import Registry

HYPERPARAMETERS = ("gamma", "lam", "std_normalize")
"""The estimator keyword arguments that come from ``algorithm.*``. An estimator reads some of them
(``AdvantageInfo.reads``); the config leaves the others unset (None) and refuses them when a user sets one."""


@dataclass(frozen=True)
class AdvantageInfo:
    """What an advantage estimator needs from the config; every entry of ADVANTAGE_ESTIMATORS declares all of it."""

    needs_critic: bool
    """It reads `values`: the run must train a critic (``algorithm.critic=true``)."""
    needs_group: bool
    """Its baseline is the other samples of the same prompt: ``rollout.samples_per_prompt`` K >= 2."""
    reads: frozenset[str]
    """The HYPERPARAMETERS it reads; each must be set, and the others unset."""
    summary: str
    """How it scores a sample, as "it ...": the reason given when a declaration refuses a config."""

    def __post_init__(self):
        object.__setattr__(self, "reads", frozenset(self.reads))
        unknown = sorted(self.reads - set(HYPERPARAMETERS))
        if unknown:
            raise ValueError(f"reads {unknown}: an estimator reads only {', '.join(HYPERPARAMETERS)}")


ADVANTAGE_ESTIMATORS = Registry("advantage estimator", info=AdvantageInfo)


def _check_inputs(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Validate `rewards` and `mask` and return the mask as a bool tensor."""
    if not isinstance(rewards, torch.Tensor) or not rewards.is_floating_point():
        raise TypeError(
            f"rewards must be a floating-point tensor, got {getattr(rewards, 'dtype', type(rewards))}"
        )
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (batch, response_len), got shape {tuple(rewards.shape)}")
    if not isinstance(mask, torch.Tensor) or mask.is_complex():
        raise TypeError(
            f"mask must be a bool, integer or float tensor, got {getattr(mask, 'dtype', type(mask))}"
        )
    if mask.shape != rewards.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match rewards shape {tuple(rewards.shape)}"
        )
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("mask must contain only 0 and 1 (or be bool)")
    return mask != 0


def _check_discount(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _grouped(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """(batch,) -> (batch // group_size, group_size), checking that the groups are well formed."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 for a group baseline, got {group_size!r}")
    if returns.shape[0] % group_size != 0:
        raise ValueError(f"batch size {returns.shape[0]} is not divisible by group_size {group_size}")
    return returns.view(-1, group_size)


def _discounted_sum(x: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """y_t = x_t + discount * y_{t+1}, with y = 0 after the last real token. (batch, T) -> (batch, T)."""
    running = torch.zeros_like(x[:, 0])
    outputs = []
    # A reverse scan over time: each step is vectorised over the batch.
    for t in reversed(range(x.shape[1])):
        running = torch.where(mask[:, t], x[:, t] + discount * running, torch.zeros_like(running))
        outputs.append(running)
    return torch.stack(outputs[::-1], dim=1)


def _broadcast(per_sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch,) -> (batch, T): the same value on every real token, 0 at padding."""
    return torch.where(mask, per_sequence.unsqueeze(1), per_sequence.new_zeros(()))


@ADVANTAGE_ESTIMATORS.register(
    "gae", needs_critic=True, needs_group=False, reads={"gamma", "lam"},
    summary="it bootstraps per-token advantages from the critic's values")
def gae(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None,
    *,
    group_size: int,
    gamma: float,
    lam: float,
    std_normalize: bool,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, GAE(γ, λ) (Schulman et al., 2016), over the masked response.

    δ_t = r_t + γ V_{t+1} - V_t with V = 0 after the last real token (the episode ends there), and
    A_t = δ_t + γλ A_{t+1}. `values`: (batch, response_len), required. Returns A and A + V, each
    (batch, response_len). Ignores `group_size`, `std_normalize`, `eps` (whitening, if wanted, is the
    trainer's choice, done per minibatch or per batch).
    """
    bmask = _check_inputs(rewards, mask)
    if values is None:
        raise ValueError("values are required by the 'gae' advantage estimator (got None)")
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise TypeError(
            f"values must be a floating-point tensor, got {getattr(values, 'dtype', type(values))}"
        )
    if values.shape != rewards.shape:
        raise ValueError(
            f"values shape {tuple(values.shape)} does not match rewards shape {tuple(rewards.shape)}"
        )
    gamma, lam = _check_discount(gamma, "gamma"), _check_discount(lam, "lam")
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    rewards = torch.where(bmask, rewards, zero)
    values = torch.where(bmask, values.to(rewards.dtype), zero)
    # The next state's value; padding after the last real token reads as V = 0, the terminal value.
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = rewards + gamma * next_values - values
    advantages = _discounted_sum(deltas, bmask, gamma * lam)
    returns = torch.where(bmask, advantages + values, zero)
    return advantages, returns


@ADVANTAGE_ESTIMATORS.register(
    "rloo", needs_critic=False, needs_group=True, reads=set(),
    summary="it scores whole sequences against the mean of the other samples of their prompt")
def rloo(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None,
    *,
    group_size: int,
    gamma: float,
    lam: float,
    std_normalize: bool,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out (Kool et al., 2019; Ahmadian et al., 2024).

    R_i = Σ_t r_{i,t} (undiscounted), baseline_i = mean of R over the other K - 1 rollouts of the same
    prompt, A_i = R_i - baseline_i on every real token. Returns (A, R), each (batch, response_len).
    Needs group_size K >= 2. Ignores `values`, `gamma`, `lam`, `std_normalize`, `eps`.
    """
    bmask = _check_inputs(rewards, mask)
    seq_returns = masked_sum(rewards, bmask, dim=1)
    groups = _grouped(seq_returns, group_size)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    advantages = (groups - baseline).reshape(-1)
    return _broadcast(advantages, bmask), _broadcast(seq_returns, bmask)


@ADVANTAGE_ESTIMATORS.register(
    "grpo", needs_critic=False, needs_group=True, reads={"std_normalize"},
    summary="it scores whole sequences against the mean of their prompt's group")
def grpo(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None,
    *,
    group_size: int,
    gamma: float,
    lam: float,
    std_normalize: bool,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages of GRPO (Shao et al., 2024).

    R_i = Σ_t r_{i,t}; A_i = (R_i - mean_group R) / (std_group R + eps) if `std_normalize`, else
    R_i - mean_group R, on every real token. The std is the unbiased one (divides by K - 1), as in the
    GRPO reference implementations (torch.std's default). Returns (A, R), each (batch, response_len).
    Needs group_size K >= 2. Ignores `values`, `gamma`, `lam`.
    """
    bmask = _check_inputs(rewards, mask)
    seq_returns = masked_sum(rewards, bmask, dim=1)
    groups = _grouped(seq_returns, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if std_normalize:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return _broadcast(centred.reshape(-1), bmask), _broadcast(seq_returns, bmask)


@ADVANTAGE_ESTIMATORS.register(
    "reinforce_pp", needs_critic=False, needs_group=False, reads={"gamma"},
    summary="it scores each token's discounted return-to-go against the whole batch")
def reinforce_pp(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None,
    *,
    group_size: int,
    gamma: float,
    lam: float,
    std_normalize: bool,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu, 2025): per-token return-to-go, whitened over the whole batch.

    G_t = Σ_{s>=t} γ^{s-t} r_s over the real tokens; A = (G - mean) / sqrt(var + eps), the mean and the
    unbiased variance taken over every real token of the batch (`rlhf.core.losses.masked_whiten`): the batch
    statistics are REINFORCE++'s baseline, in place of a critic or a group. Returns (A, G), each
    (batch, response_len). Ignores `values`, `group_size`, `lam`, `std_normalize`.
    """
    bmask = _check_inputs(rewards, mask)
    gamma = _check_discount(gamma, "gamma")
    returns = _discounted_sum(rewards, bmask, gamma)
    advantages = masked_whiten(returns, bmask, shift_mean=True, eps=eps)
    return advantages, returns
