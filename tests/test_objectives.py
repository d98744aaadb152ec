import math

import pytest
import torch

from rlhf.core.objectives import (
    AGGREGATION_MODES,
    POLICY_LOSSES,
    aggregate,
    bradley_terry_loss,
    explained_variance,
    kl_loss,
    preference_accuracy,
    value_loss,
)

NAN = float("nan")
E_HALF, E_MINUS_HALF = math.exp(0.5), math.exp(-0.5)  # 1.648721, 0.606531


def test_aggregate_modes_hand_values():
    # Padding holds 100 and nan: it must not count.
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # token-mean: (1 + 2 + 3 + 4) / 4 = 2.5
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(2.5)
    # seq-mean-token-mean: mean(6/3, 4/1) = mean(2, 4) = 3; "seq-mean" is its old name, same number
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)
    assert aggregate(loss, mask, "seq-mean").item() == pytest.approx(3.0)
    # seq-mean-token-sum: mean(6, 4) = 5
    assert aggregate(loss, mask, "seq-mean-token-sum").item() == pytest.approx(5.0)
    # seq-mean-token-sum-norm with the constant 4: mean(6/4, 4/4) = mean(1.5, 1) = 1.25
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", norm_len=4).item() == pytest.approx(1.25)


def test_aggregate_rejects_bad_input():
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm"):
        aggregate(torch.zeros(2, 3), torch.ones(2, 3), "mean")
    with pytest.raises(ValueError, match="needs norm_len"):
        aggregate(torch.zeros(2, 3), torch.ones(2, 3), "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="mask"):
        aggregate(torch.zeros(2, 3), torch.ones(3, 2), "token-mean")
    with pytest.raises(ValueError, match="loss"):
        aggregate(torch.zeros(6), torch.ones(6), "token-mean")
    assert AGGREGATION_MODES == ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _ppo_example():
    # ratio ρ = [e^0.5, 1, e^-0.5] on both rows; row 0 has A = +1, row 1 has A = -1; column 3 is padding.
    # The padding log-ratio 1000 would overflow exp() to inf if it reached the arithmetic.
    log_ratio = torch.tensor([[0.5, 0.0, -0.5, 1000.0], [0.5, 0.0, -0.5, 1000.0]], dtype=torch.float64)
    old_logp = torch.full((2, 4), -2.0, dtype=torch.float64)
    logp = (old_logp + log_ratio).requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0, 1.0, NAN], [-1.0, -1.0, -1.0, NAN]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    return logp, old_logp, advantages, mask


def test_ppo_loss_clipfrac_and_gradient_hand_example():
    logp, old_logp, advantages, mask = _ppo_example()
    loss, stats = POLICY_LOSSES.get("ppo")(
        logp, old_logp, advantages, mask, clip_low=0.2, clip_high=None, agg="token-mean"
    )
    # clip at 0.2 -> ρ clipped to [0.8, 1.2]. Per token -min(ρA, clip(ρ)A):
    #   A=+1: ρ=e^.5: -min(1.6487, 1.2) = -1.2 (clipped)   ρ=1: -1   ρ=e^-.5: -min(0.6065, 0.8) = -0.6065
    #   A=-1: ρ=e^.5: -min(-1.6487, -1.2) = 1.6487         ρ=1: 1    ρ=e^-.5: -min(-0.6065, -0.8) = 0.8 (clipped)
    expected = (-1.2 - 1.0 - E_MINUS_HALF + E_HALF + 1.0 + 0.8) / 6  # = 0.107026
    assert loss.item() == pytest.approx(expected)
    # clip active on 2 of the 6 real tokens
    assert stats["clipfrac"].item() == pytest.approx(2 / 6)
    loss.backward()
    # d(-ρA)/dlogp = -ρA on unclipped tokens, 0 where the clip is active, all / 6 tokens:
    #   A=+1: [0, -1, -e^-.5]/6 (negative: descent raises logp of good tokens)
    #   A=-1: [e^.5, 1, 0]/6    (positive: descent lowers logp of bad tokens); padding 0
    expected_grad = (
        torch.tensor([[0.0, -1.0, -E_MINUS_HALF, 0.0], [E_HALF, 1.0, 0.0, 0.0]], dtype=torch.float64) / 6
    )
    torch.testing.assert_close(logp.grad, expected_grad)


def test_ppo_stats_hand_values_and_are_detached_tensors():
    logp, old_logp, advantages, mask = _ppo_example()
    _, stats = POLICY_LOSSES.get("ppo")(
        logp, old_logp, advantages, mask, clip_low=0.2, clip_high=None, agg="token-mean"
    )
    # (ρ - 1) - log ρ: e^.5 - 1.5 = 0.148721, 0, e^-.5 - 0.5 = 0.106531; both rows alike
    assert stats["approxkl"].item() == pytest.approx((E_HALF - 1.5 + E_MINUS_HALF - 0.5) / 3)
    # mean ρ = (1.648721 + 1 + 0.606531) / 3 = 1.085084
    assert stats["ratio_mean"].item() == pytest.approx((E_HALF + 1 + E_MINUS_HALF) / 3)
    for name, value in stats.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, name


def test_ppo_asymmetric_clip_higher():
    logp, old_logp, advantages, mask = _ppo_example()
    loss, stats = POLICY_LOSSES.get("ppo")(
        logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.28, agg="token-mean"
    )
    # only the A=+1, ρ=e^.5 token changes: clipped at 1.28 instead of 1.2 -> -1.28
    expected = (-1.28 - 1.0 - E_MINUS_HALF + E_HALF + 1.0 + 0.8) / 6
    assert loss.item() == pytest.approx(expected)
    assert stats["clipfrac"].item() == pytest.approx(2 / 6)
    # with clip_high = 1.0 the upper clip (2.0) is above e^.5, so only the A=-1, ρ=e^-.5 token clips
    _, wide = POLICY_LOSSES.get("ppo")(
        logp, old_logp, advantages, mask, clip_low=0.2, clip_high=1.0, agg="token-mean"
    )
    assert wide["clipfrac"].item() == pytest.approx(1 / 6)


def test_vanilla_loss_and_gradient_are_unclipped():
    logp, old_logp, advantages, mask = _ppo_example()
    loss, stats = POLICY_LOSSES.get("vanilla")(
        logp, old_logp, advantages, mask, clip_low=0.2, clip_high=None, agg="token-mean"
    )
    # -ρA summed: row 0 -(e^.5 + 1 + e^-.5), row 1 +(e^.5 + 1 + e^-.5): total 0
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert stats["clipfrac"].item() == 0.0
    loss.backward()
    # d(-ρA)/dlogp = -ρA / 6 on every real token
    ratios = [E_HALF, 1.0, E_MINUS_HALF]
    expected_grad = torch.tensor([[-r for r in ratios] + [0.0], ratios + [0.0]], dtype=torch.float64) / 6
    torch.testing.assert_close(logp.grad, expected_grad)


def test_on_policy_ppo_gradient_equals_reinforce_gradient():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 5, generator=gen, dtype=torch.float64).requires_grad_(True)
    advantages = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    mask = (torch.arange(5) < torch.tensor([5, 3, 1])[:, None]).long()
    grads = {}
    for name in ("ppo", "vanilla"):
        loss, stats = POLICY_LOSSES.get(name)(
            logp, logp.detach(), advantages, mask, clip_low=0.2, clip_high=None, agg="token-mean"
        )
        (grads[name],) = torch.autograd.grad(loss, logp)
        # ρ = 1 everywhere: nothing clips, approxkl is 0
        assert stats["clipfrac"].item() == 0.0 and stats["approxkl"].item() == 0.0
    # ρ = 1: ∇(-ρA) = -A ∇logp, averaged over the 9 real tokens
    torch.testing.assert_close(grads["ppo"], -advantages * mask / 9)
    torch.testing.assert_close(grads["vanilla"], -advantages * mask / 9)


@pytest.mark.parametrize("name", ["ppo", "vanilla", "gspo", "gspo-token"])
def test_policy_losses_reject_bad_shapes(name):
    fn = POLICY_LOSSES.get(name)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="old_logp"):
        fn(x, torch.zeros(2, 4), x, torch.ones(2, 3), clip_low=0.2, clip_high=None, agg="token-mean")
    with pytest.raises(ValueError, match="advantages"):
        fn(x, x, torch.zeros(2), torch.ones(2, 3), clip_low=0.2, clip_high=None, agg="token-mean")
    with pytest.raises(ValueError, match="mask"):
        fn(x, x, x, torch.ones(3, 2), clip_low=0.2, clip_high=None, agg="token-mean")
    with pytest.raises(ValueError, match="aggregation mode"):
        fn(x, x, x, torch.ones(2, 3), clip_low=0.2, clip_high=None, agg="sum")


def test_ppo_rejects_bad_clip():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="clip_low"):
        POLICY_LOSSES.get("ppo")(x, x, x, torch.ones(2, 3), clip_low=1.5, clip_high=None, agg="token-mean")
    with pytest.raises(ValueError, match="clip_high"):
        POLICY_LOSSES.get("ppo")(x, x, x, torch.ones(2, 3), clip_low=0.2, clip_high=-0.1, agg="token-mean")


def _value_example():
    # column 3 is padding with garbage
    values = torch.tensor([[2.0, 0.0, 1.1, 9.0]], dtype=torch.float64)
    old_values = torch.tensor([[1.5, 0.5, 1.0, NAN]], dtype=torch.float64)
    returns = torch.tensor([[3.0, 1.0, 2.0, NAN]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    return values, old_values, returns, mask


def test_value_loss_mse_clipped_hand_values():
    values, old_values, returns, mask = _value_example()
    loss, stats = value_loss(values, old_values, returns, mask, clip_range=0.2)
    # token 0: v - old = 0.5 -> clamp 0.2 -> v_c = 1.7; (2-3)² = 1, (1.7-3)² = 1.69 -> 1.69 (clip active)
    # token 1: v - old = -0.5 -> v_c = 0.3; (0-1)² = 1, (0.3-1)² = 0.49 -> 1
    # token 2: v - old = 0.1 inside the range, v_c = v; (1.1-2)² = 0.81
    assert loss.item() == pytest.approx((1.69 + 1.0 + 0.81) / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)


def test_value_loss_without_clipping():
    values, old_values, returns, mask = _value_example()
    loss, stats = value_loss(values, old_values, returns, mask, clip_range=None)
    # (1 + 1 + 0.81) / 3 = 0.936667
    assert loss.item() == pytest.approx(2.81 / 3)
    assert stats["clipfrac"].item() == 0.0


def test_value_loss_huber_hand_values():
    values, old_values, returns, mask = _value_example()
    loss, _ = value_loss(values, old_values, returns, mask, clip_range=0.2, loss="huber", delta=1.0)
    # huber(e) = ½e² if |e| <= 1 else |e| - ½
    # token 0: e = -1 -> 0.5; e_c = -1.3 -> 0.8; max 0.8
    # token 1: e = -1 -> 0.5; e_c = -0.7 -> 0.245; max 0.5
    # token 2: e = -0.9 -> 0.405
    assert loss.item() == pytest.approx((0.8 + 0.5 + 0.405) / 3)


def test_value_loss_gradient_skips_clipped_tokens():
    values, old_values, returns, mask = _value_example()
    values.requires_grad_(True)
    loss, _ = value_loss(values, old_values, returns, mask, clip_range=0.2)
    loss.backward()
    # token 0 takes the clipped branch (v_c = old + 0.2 does not depend on v): grad 0
    # token 1: 2(v - R)/3 = 2(0 - 1)/3 = -2/3; token 2: 2(1.1 - 2)/3 = -0.6; padding 0
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -2 / 3, -0.6, 0.0]], dtype=torch.float64))


def test_value_loss_rejects_bad_input():
    values, old_values, returns, mask = _value_example()
    with pytest.raises(ValueError, match="mse, huber"):
        value_loss(values, old_values, returns, mask, clip_range=0.2, loss="l1")
    with pytest.raises(ValueError, match="clip_range"):
        value_loss(values, old_values, returns, mask, clip_range=0.0)
    with pytest.raises(ValueError, match="returns"):
        value_loss(values, old_values, returns[:, :3], mask, clip_range=0.2)


def test_bradley_terry_hand_values():
    chosen = torch.tensor([2.0, 0.0], dtype=torch.float64)
    rejected = torch.tensor([1.0, 1.0], dtype=torch.float64)
    # diffs [1, -1]: -log σ(d) = log(1 + e^{-d}) = [0.313262, 1.313262]
    per_pair = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(1.0))]
    torch.testing.assert_close(
        bradley_terry_loss(chosen, rejected, reduction="none"), torch.tensor(per_pair, dtype=torch.float64)
    )
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(sum(per_pair) / 2)
    assert bradley_terry_loss(chosen, rejected, reduction="sum").item() == pytest.approx(sum(per_pair))
    # margin 0.5: diffs [0.5, -1.5] -> log(1 + e^-0.5) + log(1 + e^1.5) = 0.474077 + 1.701413
    with_margin = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.5))) / 2
    assert bradley_terry_loss(chosen, rejected, margin=0.5).item() == pytest.approx(with_margin)
    # per-pair margins [0, 1]: diffs [1, -2] -> log(1 + e^-1) + log(1 + e^2) = 0.313262 + 2.126928
    per_pair_margin = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0))) / 2
    margin = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert bradley_terry_loss(chosen, rejected, margin=margin).item() == pytest.approx(per_pair_margin)


def test_bradley_terry_is_finite_for_large_gaps():
    # -log σ(-100) = 100 + log(1 + e^-100) ≈ 100; log(sigmoid(-100)) in float32 would be -inf
    loss = bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(100.0)


def test_bradley_terry_rejects_bad_input():
    with pytest.raises(ValueError, match="rejected"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="chosen"):
        bradley_terry_loss(torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(3), margin=torch.zeros(2))
    with pytest.raises(ValueError, match="reduction"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(3), reduction="max")


def test_preference_accuracy():
    # only pair 0 has chosen strictly above rejected; the tie in pair 2 counts as wrong -> 1/3
    accuracy = preference_accuracy(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0]))
    assert accuracy.item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="rejected"):
        preference_accuracy(torch.zeros(3), torch.zeros(2))


def test_kl_loss_hand_values():
    # π = [0.5, 0.25], π_ref = [0.25, 0.5] on the real tokens; column 2 is padding
    logp = torch.tensor([[math.log(0.5), math.log(0.25), 0.0]], dtype=torch.float64)
    ref_logp = torch.tensor([[math.log(0.25), math.log(0.5), -80.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    # k3 per token: (0.5 - 1 + ln2) + (2 - 1 - ln2) = 0.5 in total over the 2 real tokens
    assert kl_loss(logp, ref_logp, mask, "k3", "token-mean").item() == pytest.approx(0.25)
    assert kl_loss(logp, ref_logp, mask, "k3", "seq-mean-token-sum").item() == pytest.approx(0.5)
    # k1: ln2 - ln2 = 0
    assert kl_loss(logp, ref_logp, mask, "k1", "token-mean").item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(KeyError, match="k1, k2, k3"):
        kl_loss(logp, ref_logp, mask, "k9", "token-mean")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_loss_gradient_is_zero_at_padding_with_garbage_log_probs(estimator):
    # float32 padding with log r = 0 - (-200): exp(200) overflows to inf if it is ever computed
    logp = torch.tensor([[math.log(0.5), math.log(0.25), 0.0]]).requires_grad_(True)
    ref_logp = torch.tensor([[math.log(0.25), math.log(0.5), -200.0]])
    kl_loss(logp, ref_logp, torch.tensor([[1, 1, 0]]), estimator, "token-mean").backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[0, 2].item() == 0.0


def test_explained_variance_hand_values():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, NAN]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    # perfect critic: residual 0 -> 1
    assert explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1.0)
    # constant critic: Var[R - c] = Var[R] -> 0
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask).item() == pytest.approx(0.0)
    # residuals [-0.5, 0.5, -0.5, 0.5]: Var = 0.25; Var[R] = 1.25 (both over n) -> 1 - 0.2 = 0.8
    values = torch.tensor([[1.5, 1.5, 3.5, 3.5, 7.0]], dtype=torch.float64)
    assert explained_variance(values, returns, mask).item() == pytest.approx(0.8)


def test_explained_variance_is_nan_for_constant_returns():
    returns = torch.full((1, 3), 2.0)
    assert math.isnan(explained_variance(torch.zeros(1, 3), returns, torch.ones(1, 3)).item())
