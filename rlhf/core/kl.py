"""Per-token KL estimators, KL-shaped rewards and KL coefficient controllers.

Convention. The response tokens are sampled from the policy π, and we only have the log-probs of those
sampled tokens under π (`logp`) and under the frozen reference π_ref (`ref_logp`). With

    log r = logp - ref_logp          (r = π / π_ref)

the true per-token KL is KL(π ‖ π_ref) = E_{y~π}[log r], and the three estimators of Schulman
("Approximating KL divergence", 2020) are

    k1 = log r                         unbiased, high variance, can be negative
    k2 = ½ (log r)²                    biased, low variance, >= 0
    k3 = ρ - 1 - log ρ,  ρ = π_ref/π   unbiased, low variance, >= 0
       = exp(-log r) - 1 + log r

k3 is unbiased because E_{y~π}[ρ] = Σ π_ref = 1, so E[k3] = 1 - 1 - E[log ρ] = E[log r]. The ratio inside
k3 must be π_ref / π, the ratio whose expectation under the sampling distribution is 1. Writing it as
r - 1 - log r with r = π / π_ref is biased: its expectation is E_π[r] - 1 - KL = χ²(π ‖ π_ref) - KL(π ‖ π_ref).
"""

from __future__ import annotations

import math

import torch

from rlhf.core.registry import Registry

KL_ESTIMATORS = Registry("KL estimator")
KL_CONTROLLERS = Registry("KL controller")


def _check_pair(logp: torch.Tensor, ref_logp: torch.Tensor) -> None:
    for name, t in (("logp", logp), ("ref_logp", ref_logp)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be (batch, response_len), got shape {tuple(t.shape)}")
    if logp.shape != ref_logp.shape:
        raise ValueError(
            f"ref_logp shape {tuple(ref_logp.shape)} does not match logp shape {tuple(logp.shape)}"
        )


def _check_mask(mask: torch.Tensor, shape: torch.Size) -> None:
    if not isinstance(mask, torch.Tensor) or mask.is_complex():
        raise TypeError(
            f"mask must be a bool, integer or float tensor, got {getattr(mask, 'dtype', type(mask))}"
        )
    if mask.shape != shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match (batch, response_len) {tuple(shape)}"
        )
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("mask must contain only 0 and 1 (or be bool)")


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log r. `logp`, `ref_logp`: (batch, response_len) -> (batch, response_len)."""
    _check_pair(logp, ref_logp)
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log r)². `logp`, `ref_logp`: (batch, response_len) -> (batch, response_len)."""
    _check_pair(logp, ref_logp)
    return 0.5 * (logp - ref_logp).square()


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(-log r) - 1 + log r. `logp`, `ref_logp`: (batch, response_len) -> (batch, response_len)."""
    _check_pair(logp, ref_logp)
    log_r = logp - ref_logp
    # expm1 keeps precision when π ≈ π_ref, where exp(-log r) - 1 would cancel to 0.
    return torch.expm1(-log_r) + log_r


def per_token_kl(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(π ‖ π_ref) by the named estimator ("k1", "k2", "k3").

    `logp`, `ref_logp`: (batch, response_len) log-probs of the sampled tokens -> (batch, response_len).
    """
    return KL_ESTIMATORS.get(estimator)(logp, ref_logp)


def sampler_mismatch(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """How far the rollout engine's distribution is from the trainer's on the tokens the engine drew.

    trainer_logp, sampler_logp, mask: ``(batch, response_len)``; the tokens were sampled from the engine, so with
    ``log r = log pi_trainer - log pi_sampler`` per token: ``k1 = -log r`` and ``k3 = r - 1 - log r`` both estimate
    KL(sampler || trainer), and ``ratio = r`` is the importance weight a correction would apply. Returns those three
    ``(batch, response_len)`` tensors, 0 at padding (where the log-probs may be anything).
    """
    _check_pair(trainer_logp, sampler_logp)
    _check_mask(mask, trainer_logp.shape)
    real = mask.bool()
    log_r = torch.where(real, trainer_logp.float() - sampler_logp.float(), 0.0)
    ratio = torch.where(real, log_r.exp(), 0.0)
    return {"k1": -log_r, "k3": torch.where(real, ratio - 1 - log_r, 0.0), "ratio": ratio}


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row. `mask`: (batch, response_len) -> (batch,) long.

    Raises ValueError if a row has no real token.
    """
    if not isinstance(mask, torch.Tensor) or mask.is_complex() or mask.dim() != 2:
        raise ValueError(
            f"mask must be a (batch, response_len) tensor, got {getattr(mask, 'shape', type(mask))}"
        )
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).amax(dim=1)
    if (last < 0).any():
        rows = torch.nonzero(last < 0).flatten().tolist()
        raise ValueError(f"mask rows {rows} have no real response token")
    return last


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards: -beta * kl_t on every real token, plus the score on the last real token.

    `scores`: (batch,) sequence scores; `kl`: (batch, response_len) per-token KL; `mask`: (batch,
    response_len). Returns (batch, response_len), 0 at padding.
    """
    if not isinstance(kl, torch.Tensor) or not kl.is_floating_point() or kl.dim() != 2:
        raise ValueError(
            f"kl must be a floating (batch, response_len) tensor, got {getattr(kl, 'shape', type(kl))}"
        )
    if not isinstance(scores, torch.Tensor) or scores.shape != kl.shape[:1]:
        raise ValueError(f"scores must be ({kl.shape[0]},), got {getattr(scores, 'shape', type(scores))}")
    _check_mask(mask, kl.shape)
    beta = float(beta)
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    last = last_token_index(mask)
    # where, not multiply: padding log-probs can be inf and inf * 0 is nan.
    rewards = torch.where(mask.bool(), -beta * kl, torch.zeros_like(kl))
    return rewards.scatter_add(1, last.unsqueeze(1), scores.to(kl.dtype).unsqueeze(1))


def _check_beta(beta: float, name: str) -> float:
    beta = float(beta)
    if not beta >= 0:
        raise ValueError(f"{name} must be >= 0, got {beta}")
    return beta


def _check_positive(value: float | None, name: str) -> float:
    if value is None:
        raise ValueError(f"{name} is required by the adaptive KL controller")
    value = float(value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _get(state: dict[str, float], key: str) -> float:
    if key not in state:
        raise ValueError(f"KL controller state has no {key!r} (keys: {sorted(state)})")
    return state[key]


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, beta: float):
        self.value = _check_beta(beta, "beta")

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: β stays fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = _check_beta(_get(state, "value"), "state['value']")


class AdaptiveKLController:
    """Proportional controller of Ziegler et al. (2019) that steers the measured KL toward `target`.

    After each batch, e = clip(current_kl / target - 1, -0.2, 0.2) and β <- β (1 + e n_steps / horizon),
    so β grows when the KL is above target and shrinks when below, by at most a factor
    1 ± 0.2 n_steps / horizon per update.
    """

    def __init__(self, init_beta: float, target: float, horizon: float):
        self.value = _check_beta(init_beta, "init_beta")
        self.target = _check_positive(target, "target")
        self.horizon = _check_positive(horizon, "horizon")

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move β after a batch of `n_steps` samples whose mean KL was `current_kl`."""
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl}")
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        factor = 1.0 + error * n_steps / self.horizon
        if factor <= 0:
            raise ValueError(
                f"n_steps={n_steps} is too large for horizon={self.horizon}: beta would become <= 0"
            )
        self.value *= factor

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = _check_beta(_get(state, "value"), "state['value']")
        self.target = _check_positive(_get(state, "target"), "state['target']")
        self.horizon = _check_positive(_get(state, "horizon"), "state['horizon']")


@KL_CONTROLLERS.register("fixed")
def _fixed(beta: float, target: float | None, horizon: float | None) -> FixedKLController:
    return FixedKLController(beta)


@KL_CONTROLLERS.register("adaptive")
def _adaptive(beta: float, target: float | None, horizon: float | None) -> AdaptiveKLController:
    return AdaptiveKLController(beta, _check_positive(target, "target"), _check_positive(horizon, "horizon"))


def build_kl_controller(
    name: str, beta: float, target: float | None = None, horizon: float | None = None
) -> FixedKLController | AdaptiveKLController:
    """Build the named KL controller ("fixed" or "adaptive"); "fixed" ignores `target` and `horizon`."""
    return KL_CONTROLLERS.get(name)(beta, target, horizon)
