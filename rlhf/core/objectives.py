"""RL objectives built from the shared losses: policy losses, the value loss, the KL loss, the
Bradley-Terry reward-model loss, and how per-token losses are reduced to a scalar.

Per-token tensors are (batch, response_len); `mask` is 1 on real response tokens and 0 on padding.
Policy losses are registered in `POLICY_LOSSES` with one signature and selected by name; each may declare facts
(`PolicyLossInfo`) that config validation reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf.core.correction import importance_weighted_kl
from rlhf.core.kl import per_token_kl
from rlhf.core.losses import huber, masked_mean, masked_sum, masked_var, mse
from rlhf.core.registry import Registry


@dataclass(frozen=True)
class PolicyLossInfo:
    """What a policy loss declares about itself (``POLICY_LOSSES.register(name, ...)``); every fact has a default, so
    a loss that declares nothing is a token-level one.

    max_clip: the largest trainer.clip_low / clip_high that still clips, or None for no limit. A sequence-level ratio
    (GSPO) is the geometric mean of its token ratios, so it stays far closer to 1 than a token ratio: a PPO-sized
    range (0.2) would never clip, and rlhf.config refuses a clip range above this.
    """

    max_clip: float | None = None


POLICY_LOSSES = Registry("policy loss", info=PolicyLossInfo)
# How per-token losses become one scalar, named as the papers name them (see `aggregate`).
AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# Old names still accepted, each the name of one of AGGREGATION_MODES (same numbers).
AGGREGATION_ALIASES = {"seq-mean": "seq-mean-token-mean"}
VALUE_LOSSES = ("mse", "huber")


def _check_tensor(x: torch.Tensor, name: str, shape: torch.Size | None = None) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if shape is None and x.dim() != 2:
        raise ValueError(f"{name} must be (batch, response_len), got shape {tuple(x.shape)}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} shape {tuple(x.shape)} does not match {tuple(shape)}")


def _bool_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Validate a 0/1 `mask` against `like` (batch, response_len) and return it as bool."""
    if not isinstance(mask, torch.Tensor) or mask.is_complex():
        raise TypeError(
            f"mask must be a bool, integer or float tensor, got {getattr(mask, 'dtype', type(mask))}"
        )
    if mask.shape != like.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match (batch, response_len) {tuple(like.shape)}"
        )
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("mask must contain only 0 and 1 (or be bool)")
    return mask != 0


def aggregation_mode(mode: str) -> str:
    """``mode``'s name in AGGREGATION_MODES (an alias resolved); ValueError naming the valid modes otherwise."""
    mode = AGGREGATION_ALIASES.get(mode, mode)
    if mode not in AGGREGATION_MODES:
        aliases = ", ".join(f"{a} = {m}" for a, m in AGGREGATION_ALIASES.items())
        raise ValueError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(AGGREGATION_MODES)} "
                         f"(alias: {aliases})")
    return mode


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str, norm_len: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss (batch, response_len) to a scalar over the real tokens.

    "token-mean" (DAPO): Σ loss over all real tokens of the batch / their count (long sequences weigh more);
    "seq-mean-token-mean" (GRPO paper; alias "seq-mean"): mean over sequences of each sequence's token mean (every
    sequence weighs the same);
    "seq-mean-token-sum": mean over sequences of each sequence's token sum (scales with length);
    "seq-mean-token-sum-norm" (Dr. GRPO): mean over sequences of each token sum / ``norm_len``, a constant (the
    trainer's rollout.max_new_tokens), so no length biases the per-token weight. ``norm_len`` is required for
    this mode and ignored by the others.
    """
    mode = aggregation_mode(mode)
    _check_tensor(loss, "loss")
    bmask = _bool_mask(mask, loss)
    if mode == "token-mean":
        return masked_mean(loss, bmask)
    if mode == "seq-mean-token-mean":
        return masked_mean(loss, bmask, dim=1).mean()
    if mode == "seq-mean-token-sum":
        return masked_sum(loss, bmask, dim=1).mean()
    if norm_len is None or not norm_len > 0:
        raise ValueError(f"aggregation {mode!r} needs norm_len > 0 (rollout.max_new_tokens), got {norm_len}")
    return masked_sum(loss, bmask, dim=1).mean() / norm_len


def _check_policy_inputs(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    _check_tensor(logp, "logp")
    _check_tensor(old_logp, "old_logp", logp.shape)
    _check_tensor(advantages, "advantages", logp.shape)
    return _bool_mask(mask, logp)


def _log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, bmask: torch.Tensor) -> torch.Tensor:
    # Zero at padding, where log-probs may be garbage and exp() could overflow to inf (inf * 0 = nan).
    return torch.where(bmask, logp - old_logp, torch.zeros_like(logp))


def _ratio_stats(log_ratio: torch.Tensor, bmask: torch.Tensor) -> dict[str, torch.Tensor]:
    log_ratio = log_ratio.detach()
    ratio = log_ratio.exp()
    return {
        # k3 with ρ = π/π_old on samples from π_old: an unbiased, non-negative estimate of KL(π_old ‖ π).
        "approxkl": masked_mean((ratio - 1) - log_ratio, bmask),
        "ratio_mean": masked_mean(ratio, bmask),
    }


def _check_clip(clip_low: float, clip_high: float | None) -> float:
    """Validate the ratio clip range; returns ``clip_high`` (``clip_low`` when None)."""
    clip_high = clip_low if clip_high is None else clip_high
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if not clip_high >= 0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    return clip_high


@POLICY_LOSSES.register("ppo")
def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float | None = None,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate: per token, -min(ρA, clip(ρ, 1 - clip_low, 1 + clip_high) A), ρ = exp(logp - old_logp).

    `logp`, `old_logp`, `advantages`, `mask`: (batch, response_len). `clip_high` defaults to `clip_low`
    (a larger `clip_high` is the asymmetric "clip-higher" of DAPO). Returns the loss reduced by `agg`
    and detached 0-dim stats: "clipfrac" (fraction of real tokens where the clipped term is the larger
    loss, so the clip zeroes the gradient), "approxkl", "ratio_mean".
    """
    bmask = _check_policy_inputs(logp, old_logp, advantages, mask)
    clip_high = _check_clip(clip_low, clip_high)
    log_ratio = _log_ratio(logp, old_logp, bmask)
    advantages = torch.where(bmask, advantages, torch.zeros_like(advantages))
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = aggregate(torch.maximum(unclipped, clipped), bmask, agg)
    stats = _ratio_stats(log_ratio, bmask)
    stats["clipfrac"] = masked_mean((clipped > unclipped).to(logp.dtype), bmask).detach()
    return loss, stats


@POLICY_LOSSES.register("vanilla")
def vanilla_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float | None = None,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Unclipped surrogate -ρA per token, ρ = exp(logp - old_logp).

    On-policy (logp == old_logp in value) its gradient is the REINFORCE gradient -A ∇logp.
    `logp`, `old_logp`, `advantages`, `mask`: (batch, response_len). Ignores `clip_low`, `clip_high`.
    Returns the loss reduced by `agg` and the stats of "ppo" ("clipfrac" is always 0).
    """
    bmask = _check_policy_inputs(logp, old_logp, advantages, mask)
    log_ratio = _log_ratio(logp, old_logp, bmask)
    advantages = torch.where(bmask, advantages, torch.zeros_like(advantages))
    loss = aggregate(-advantages * log_ratio.exp(), bmask, agg)
    stats = _ratio_stats(log_ratio, bmask)
    stats["clipfrac"] = torch.zeros((), dtype=logp.dtype, device=logp.device)
    return loss, stats


def _gspo(logp, old_logp, advantages, mask, clip_low, clip_high, agg, token_level: bool):
    bmask = _check_policy_inputs(logp, old_logp, advantages, mask)
    clip_high = _check_clip(clip_low, clip_high)
    log_ratio = _log_ratio(logp, old_logp, bmask)  # 0 at padding
    has_tokens = bmask.any(dim=1)
    # log s_i = mean over the sequence's real tokens of log(π/π_old): 0 (s_i = 1) for a row with none.
    log_s = masked_mean(log_ratio, bmask, dim=1).unsqueeze(1)  # (batch, 1)
    advantages = torch.where(bmask, advantages, torch.zeros_like(advantages))
    if token_level:
        # GSPO-token: s_i,t = sg[s_i] π_t / sg[π_t]; its value is s_i, its gradient s_i ∇log π_t per token.
        ratio = (log_s.detach() + log_ratio - log_ratio.detach()).exp()
    else:
        # GSPO: one ratio per sequence, times the sequence's advantage (the mean of its token advantages: equal to
        # each of them for the group estimators), broadcast over its tokens so `agg` weighs the sequences.
        ratio = log_s.exp().expand_as(log_ratio)
        advantages = masked_mean(advantages, bmask, dim=1).unsqueeze(1).expand_as(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = aggregate(torch.maximum(unclipped, clipped), bmask, agg)
    # Per sequence: the fraction of its real tokens where the clip binds (0 or 1 for GSPO, and for GSPO-token when
    # the advantage is constant over the sequence), averaged over the sequences that have tokens.
    seq_clipped = masked_mean((clipped > unclipped).to(logp.dtype), bmask, dim=1)
    stats = {
        "clipfrac": masked_mean(seq_clipped, has_tokens).detach(),
        "approxkl": _ratio_stats(log_ratio, bmask)["approxkl"],  # token-level k3, comparable with "ppo"
        "ratio_mean": masked_mean(log_s.detach().squeeze(1).exp(), has_tokens),  # mean of s_i
    }
    return loss, stats


@POLICY_LOSSES.register("gspo", max_clip=0.01)
def gspo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float | None = None,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): a sequence-level clipped surrogate.

    Per sequence i, s_i = exp(mean over its real tokens of (logp - old_logp)) (the length-normalised sequence
    likelihood ratio) and A_i the mean of its token advantages (each token carries the same one for GRPO / RLOO);
    loss_i = -min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i). The paper's range is tiny, about
    clip_low=3e-4, clip_high=4e-4 (trainer.clip_low / clip_high). loss_i is put on each real token of sequence i and
    reduced by `agg`: "seq-mean-token-mean" is the paper's mean over sequences; "token-mean" weighs a sequence by its
    length. `logp`, `old_logp`, `advantages`, `mask`: (batch, response_len). Detached 0-dim stats: "clipfrac"
    (fraction of sequences whose clip binds), "approxkl" (token-level, as "ppo"), "ratio_mean" (mean s_i).
    """
    return _gspo(logp, old_logp, advantages, mask, clip_low, clip_high, agg, token_level=False)


@POLICY_LOSSES.register("gspo-token", max_clip=0.01)
def gspo_token_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float | None = None,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO-token (Zheng et al. 2025): per token -min(s_it A_it, clip(s_it) A_it) with s_it = sg[s_i] π_t / sg[π_t].

    s_it equals the sequence ratio s_i of "gspo" in value (so the clip decision is the sequence's), its gradient is
    s_i ∇log π_t, and A_it is the token's own advantage. With an advantage constant over each sequence, its loss
    and gradient equal "gspo"'s for every `agg`. Same arguments, clip range and stats as "gspo" ("clipfrac": per
    sequence, the fraction of its tokens clipped, averaged over sequences).
    """
    return _gspo(logp, old_logp, advantages, mask, clip_low, clip_high, agg, token_level=True)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float | None,
    loss: str = "mse",
    delta: float = 1.0,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped value loss: per token max(L(v, R), L(v_clipped, R)), v_clipped = old + clamp(v - old, ±clip_range).

    `values`, `old_values`, `returns`, `mask`: (batch, response_len). L is the elementwise `mse` or
    `huber` (with `delta`) of `rlhf.core.losses`; `clip_range=None` uses L(v, R) alone. Returns the loss
    reduced by `agg` and {"clipfrac": fraction of real tokens where the clipped loss is the larger}.
    """
    _check_tensor(values, "values")
    _check_tensor(old_values, "old_values", values.shape)
    _check_tensor(returns, "returns", values.shape)
    bmask = _bool_mask(mask, values)
    if loss not in VALUE_LOSSES:
        raise ValueError(f"unknown value loss {loss!r}; valid: {', '.join(VALUE_LOSSES)}")
    if clip_range is not None and not clip_range > 0:
        raise ValueError(f"clip_range must be > 0 or None, got {clip_range}")

    def elementwise(v: torch.Tensor) -> torch.Tensor:
        if loss == "mse":
            return mse(v, returns, reduction="none")
        return huber(v, returns, delta=delta, reduction="none")

    # Padding may hold nan returns: zero it before the arithmetic, or nan * 0 reaches the gradient.
    zero = values.new_zeros(())
    values = torch.where(bmask, values, zero)
    old_values = torch.where(bmask, old_values, zero)
    returns = torch.where(bmask, returns, zero)
    unclipped = elementwise(values)
    if clip_range is None:
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
        return aggregate(unclipped, bmask, agg), {"clipfrac": clipfrac}
    v_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    clipped = elementwise(v_clipped)
    clipfrac = masked_mean((clipped > unclipped).to(values.dtype), bmask).detach()
    return aggregate(torch.maximum(unclipped, clipped), bmask, agg), {"clipfrac": clipfrac}


def _check_pair(chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    if isinstance(chosen, torch.Tensor) and chosen.dim() != 1:
        raise ValueError(f"chosen must be (batch,), got shape {tuple(chosen.shape)}")
    _check_tensor(chosen, "chosen", getattr(chosen, "shape", None))
    _check_tensor(rejected, "rejected", chosen.shape)


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Bradley-Terry reward-model loss -log σ(r_c - r_r - margin).

    `chosen`, `rejected`: (batch,) rewards; `margin`: None, a float or a (batch,) tensor (Llama 2's
    preference-strength margin). `reduction`: "mean" | "sum" -> scalar, "none" -> (batch,).
    """
    _check_pair(chosen, rejected)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; valid: mean, sum, none")
    diff = chosen - rejected
    if margin is not None:
        if isinstance(margin, torch.Tensor) and margin.dim() != 0 and margin.shape != chosen.shape:
            raise ValueError(
                f"margin shape {tuple(margin.shape)} does not match chosen shape {tuple(chosen.shape)}"
            )
        diff = diff - margin
    # logsigmoid, not log(sigmoid(.)): stays finite for large negative differences.
    losses = -F.logsigmoid(diff)
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def preference_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs with r_c > r_r (ties count as wrong). `chosen`, `rejected`: (batch,) -> 0-dim."""
    _check_pair(chosen, rejected)
    return (chosen > rejected).to(chosen.dtype).mean().detach()


def kl_loss(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str, agg: str,
    old_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(π ‖ π_ref) as a loss term: the per-token `estimator` ("k1", "k2", "k3") reduced by `agg`.

    `logp`, `ref_logp`, `mask`: (batch, response_len) -> scalar. The estimators differ as losses: for
    a token sampled on-policy, the expected gradient of k1 is 0, that of k2 is ∇KL(π ‖ π_ref), and
    that of k3 (GRPO's choice) is ∇KL(π_ref ‖ π). With `old_logp` (batch, response_len), the log-probs
    the samples were drawn with, each token's estimate is weighted by π / π_old
    (rlhf.core.correction.importance_weighted_kl, ``kl.loss_correction=is``): k1 and k3 then have the
    gradient of KL(π ‖ π_ref) itself, on-policy or not.
    """
    _check_tensor(logp, "logp")
    _check_tensor(ref_logp, "ref_logp", logp.shape)
    bmask = _bool_mask(mask, logp)
    # Padding log-probs can be garbage: give them log r = 0 so exp() cannot overflow into a nan gradient.
    zero = logp.new_zeros(())
    logp = torch.where(bmask, logp, zero)
    kl = per_token_kl(logp, torch.where(bmask, ref_logp, zero), estimator)
    if old_logp is not None:
        _check_tensor(old_logp, "old_logp", logp.shape)
        kl = importance_weighted_kl(kl, logp, torch.where(bmask, old_logp, zero), estimator)
    return aggregate(kl, bmask, agg)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - v] / Var[R] over the real tokens; nan when Var[R] = 0.

    `values`, `returns`, `mask`: (batch, response_len) -> detached 0-dim tensor. 1 is a perfect critic,
    0 no better than a constant, negative worse than a constant.
    """
    _check_tensor(values, "values")
    _check_tensor(returns, "returns", values.shape)
    bmask = _bool_mask(mask, values)
    values, returns = values.detach(), returns.detach()
    # The population variance: the n/(n-1) factors would cancel in the ratio anyway.
    var_returns = masked_var(returns, bmask, unbiased=False)
    var_residual = masked_var(returns - values, bmask, unbiased=False)
    return torch.where(
        var_returns == 0, torch.full_like(var_returns, float("nan")), 1 - var_residual / var_returns
    )
