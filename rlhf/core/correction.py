"""Corrections for off-policy samples: rollout-vs-trainer mismatch weights, and the importance-weighted KL loss.

**Mismatch.** The engine that samples (vLLM, or the HF engine in another precision) is not numerically the trainer:
the tokens come from ``pi_sampler`` while the PPO ratio assumes they came from ``pi_old`` (the trainer's policy at
sampling time). The per-token importance ratio ``r_t = pi_old(y_t) / pi_sampler(y_t)`` (from the two log-probs of the
same sampled tokens) corrects for that (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy
RL training"). ``algorithm.is_correction`` picks how the ratio becomes a weight ``w`` on each token's policy loss,
with ``C = algorithm.is_cap``:

    none      w = 1
    tis       w_t = min(r_t, C)                                truncated IS, token level (Yao et al.)
    mis       w_t = r_t if 1/C <= r_t <= C else 0              masked IS, token level (IcePop): drop the token
    seq-tis   w = min(g, C) on every token of the sequence     g = exp(mean_t log r_t), the geometric mean
    seq-mis   w = g if 1/C <= g <= C else 0                    drop the whole sequence

The sequence variants use the geometric mean of the token ratios, not their product, so a long sequence's weight does
not explode or vanish with its length. The weights are constants (no gradient). Where we differ from others: TRL's and
ms-swift's ``*_mask`` modes drop only ratios above the cap and their sequence modes use the product of the token
ratios; we mask both tails ([1/C, C], IcePop's two-sided band) and use the geometric mean, as the issue asked.
Dropped tokens keep their place in the loss's denominator (weight 0), so how many were dropped does not rescale the
others.

For a policy loss of the PPO family, weighting the per-token loss by ``w >= 0`` equals scaling the advantages by
``w``: ``max(-A w r, -A w clip(r)) = w max(-A r, -A clip(r))``. The trainer applies the weights that way, so every
registered policy loss composes with every correction.

**KL loss.** With ``kl.in_reward=false`` the KL is a loss term estimated on samples from ``pi_old``. Its gradient is
not that of KL(pi || pi_ref): on-policy, the k3 loss's expected gradient is that of the reverse KL(pi_ref || pi), and
once pi moves off pi_old within a step the samples are off-policy as well. ``kl.loss_correction=is`` weights each
token's estimator by ``pi / pi_old`` (with its gradient): ``E_{pi_old}[(pi/pi_old) k] = E_pi[k]``, which for k1 and k3
is KL(pi || pi_ref) itself at every pi, so the gradient is exact for a single-token (categorical) policy, and for
sequences it is the per-token version that DeepSeek-V3.2 uses (each token's context was still drawn from pi_old).
"""

from __future__ import annotations

import torch

IS_CORRECTIONS = ("none", "tis", "mis", "seq-tis", "seq-mis")
KL_LOSS_CORRECTIONS = ("none", "is")


def _check(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> None:
    for name, x in (("old_logp", old_logp), ("sampler_logp", sampler_logp), ("mask", mask)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"{name} must be a (batch, response_len) tensor, got {getattr(x, 'shape', type(x))}")
        if x.shape != old_logp.shape:
            raise ValueError(f"{name} shape {tuple(x.shape)} does not match old_logp {tuple(old_logp.shape)}")


def mismatch_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                     cap: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token importance weights ``(batch, response_len)`` correcting samples drawn by the engine for the trainer.

    old_logp: the trainer's log-probs of the sampled tokens at sampling time; sampler_logp: the engine's; mask: 1 on
    real tokens. ``mode`` in IS_CORRECTIONS, ``cap`` = C > 1 (see the module docstring). Returns the detached float32
    weights (0 at padding) and statistics: ``weight_mean`` (over real tokens) and ``share_corrected``, the share of
    real tokens whose weight was truncated (tis, seq-tis) or zeroed (mis, seq-mis); both ``()``.
    """
    if mode not in IS_CORRECTIONS:
        raise ValueError(f"unknown is_correction {mode!r}; valid: {', '.join(IS_CORRECTIONS)}")
    if not cap > 1:
        raise ValueError(f"is_cap must be > 1, got {cap}")
    _check(old_logp, sampler_logp, mask)
    real = mask.bool()
    log_r = torch.where(real, old_logp.detach().float() - sampler_logp.detach().float(), 0.0)
    if mode.startswith("seq-"):  # the geometric mean of the sequence's token ratios, on each of its tokens
        count = real.sum(-1, keepdim=True).clamp(min=1)
        log_r = (log_r.sum(-1, keepdim=True) / count).expand_as(log_r)
    ratio = log_r.exp()
    log_cap = torch.tensor(float(cap)).log()
    if mode == "none":
        w, changed = torch.ones_like(ratio), torch.zeros_like(real)
    elif mode.endswith("tis"):
        changed = log_r > log_cap
        w = ratio.clamp(max=float(cap))
    else:  # mis, seq-mis: outside [1/C, C] the token (sequence) is dropped
        changed = log_r.abs() > log_cap
        w = torch.where(changed, 0.0, ratio)
    w = torch.where(real, w, 0.0)
    n = real.sum().clamp(min=1)
    stats = {"weight_mean": w.sum() / n, "share_corrected": (changed & real).sum() / n}
    return w, stats


def importance_weighted_kl(kl_tok: torch.Tensor, logp: torch.Tensor, old_logp: torch.Tensor,
                           estimator: str) -> torch.Tensor:
    """``(batch, response_len)`` per-token KL estimates weighted by ``pi / pi_old = exp(logp - old_logp)``, with the
    gradient through the weight (``kl.loss_correction=is``; see the module docstring). ``old_logp`` is detached.

    Only for k1 and k3, whose expectation under pi is KL(pi || pi_ref); the importance-weighted k2 would estimate
    E_pi[(log r)^2 / 2] instead, a different quantity, so it is refused.
    """
    if estimator not in ("k1", "k3"):
        raise ValueError(f"kl.loss_correction=is needs kl.estimator k1 or k3, got {estimator!r} (the importance-"
                         "weighted k2 estimates E[(log r)^2 / 2], not the KL)")
    return (logp - old_logp.detach()).exp() * kl_tok
