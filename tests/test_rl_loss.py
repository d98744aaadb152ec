"""The assembled RL loss of a micro-batch (rlhf.core.rl_loss), against its terms composed by hand."""

import math

import pytest
import torch

from rlhf.core.objectives import POLICY_LOSSES, kl_loss, value_loss
from rlhf.core.rl_loss import LossSettings, rl_loss


def _batch():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 4, generator=g) - 2
    old = logp + 0.1 * torch.randn(3, 4, generator=g)
    ref = logp + 0.3 * torch.randn(3, 4, generator=g)
    adv = torch.randn(3, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    values, old_values, returns = (torch.randn(3, 4, generator=g) for _ in range(3))
    return logp, old, ref, adv, mask, values, old_values, returns


def test_policy_loss_alone_is_the_registered_loss():
    logp, old, _, adv, mask, *_ = _batch()
    s = LossSettings(clip_low=0.2, clip_high=0.28, agg="token-mean")
    loss, stats = rl_loss(POLICY_LOSSES.get("ppo"), logp, old, adv, mask, s)
    expected, pstats = POLICY_LOSSES.get("ppo")(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, agg="token-mean")
    assert torch.equal(loss, expected)
    assert set(stats) == {"policy/loss", "policy/clipfrac", "policy/approxkl"}
    assert torch.equal(stats["policy/clipfrac"], pstats["clipfrac"])


def test_all_three_terms_add_with_their_coefficients():
    """loss = pg + beta * KL + value_coef * value: with beta = 0.05 and value_coef = 0.5, each term computed alone
    by its own function."""
    logp, old, ref, adv, mask, values, old_values, returns = _batch()
    s = LossSettings(agg="seq-mean-token-sum", kl_estimator="k3", value_clip=0.2, value_loss="huber", value_coef=0.5)
    loss, stats = rl_loss(POLICY_LOSSES.get("vanilla"), logp, old, adv, mask, s, ref_logp=ref, kl_coef=0.05,
                          values=values, old_values=old_values, returns=returns)
    pg, _ = POLICY_LOSSES.get("vanilla")(logp, old, adv, mask, clip_low=0.2, clip_high=None, agg="seq-mean-token-sum")
    kl = kl_loss(logp, ref, mask, "k3", "seq-mean-token-sum")
    v, _ = value_loss(values, old_values, returns, mask, clip_range=0.2, loss="huber", agg="seq-mean-token-sum")
    assert loss.item() == pytest.approx((pg + 0.05 * kl + 0.5 * v).item(), rel=1e-6)
    assert stats["policy/kl_loss"].item() == pytest.approx(kl.item())
    assert stats["value/loss"].item() == pytest.approx(v.item())
    assert not math.isclose(kl.item(), 0.0) and not math.isclose(v.item(), 0.0)  # both terms really contribute


def test_gradients_flow_to_the_log_probs_and_values_only_through_the_loss():
    logp, old, ref, adv, mask, values, old_values, returns = _batch()
    logp, values = logp.clone().requires_grad_(), values.clone().requires_grad_()
    loss, stats = rl_loss(POLICY_LOSSES.get("ppo"), logp, old, adv, mask, LossSettings(), ref_logp=ref, kl_coef=0.1,
                          values=values, old_values=old_values, returns=returns)
    loss.backward()
    assert logp.grad is not None and values.grad is not None
    assert logp.grad[2, 1:].abs().sum() == 0 and values.grad[1, 2:].abs().sum() == 0  # padding gets no gradient
    assert all(not v.requires_grad for v in stats.values())  # statistics are detached
