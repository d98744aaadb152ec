import io
import json
import math

import pytest
import torch

from rlhf.core.kl import (
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    build_kl_controller,
    last_token_index,
    per_token_kl,
    shape_rewards,
)

LN2 = math.log(2.0)


def _halves():
    # π(y) = [0.5, 0.25], π_ref(y) = [0.25, 0.5]  ->  log r = [ln 2, -ln 2]
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=torch.float64)
    ref_logp = torch.tensor([[math.log(0.25), math.log(0.5)]], dtype=torch.float64)
    return logp, ref_logp


def test_registry_names():
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]
    assert KL_CONTROLLERS.names() == ["adaptive", "fixed"]


def test_k1_hand_values():
    logp, ref_logp = _halves()
    # k1 = log r = [ln 2, -ln 2]
    torch.testing.assert_close(
        per_token_kl(logp, ref_logp, "k1"), torch.tensor([[LN2, -LN2]], dtype=torch.float64)
    )


def test_k2_hand_values():
    logp, ref_logp = _halves()
    # k2 = ½ (±ln 2)² = ½ · 0.480453 = 0.240227 on both tokens
    expected = 0.5 * LN2**2
    torch.testing.assert_close(
        per_token_kl(logp, ref_logp, "k2"), torch.tensor([[expected, expected]], dtype=torch.float64)
    )


def test_k3_hand_values_use_ref_over_policy_ratio():
    logp, ref_logp = _halves()
    # k3 = exp(-log r) - 1 + log r:
    #   log r = ln 2:  0.5 - 1 + 0.693147 = 0.193147
    #   log r = -ln 2: 2   - 1 - 0.693147 = 0.306853
    # (the biased r - 1 - log r would swap these two values)
    expected = torch.tensor([[0.5 - 1 + LN2, 2 - 1 - LN2]], dtype=torch.float64)
    torch.testing.assert_close(per_token_kl(logp, ref_logp, "k3"), expected)


def test_default_estimator_is_k1():
    logp, ref_logp = _halves()
    torch.testing.assert_close(per_token_kl(logp, ref_logp), logp - ref_logp)


def test_unknown_estimator_lists_valid_names():
    logp, ref_logp = _halves()
    with pytest.raises(KeyError, match="k1, k2, k3"):
        per_token_kl(logp, ref_logp, "k4")


def test_k3_is_non_negative_everywhere():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(64, 50, generator=gen) * 5
    ref_logp = torch.randn(64, 50, generator=gen) * 5
    # e^{-x} - 1 + x >= 0 for every real x (convexity of e^{-x}, tangent at 0)
    assert (per_token_kl(logp, ref_logp, "k3") >= 0).all()
    assert (per_token_kl(logp, ref_logp, "k2") >= 0).all()
    zero = torch.zeros(2, 3)
    assert torch.equal(per_token_kl(zero, zero, "k3"), torch.zeros(2, 3))


def test_k3_is_precise_for_tiny_log_ratios():
    # log r = 1e-4: e^{-x} - 1 + x = x²/2 - x³/6 + ... ≈ 5.0e-9. In float32, exp(-x) - 1 loses
    # everything below ~6e-8 to rounding, so only an expm1 form gets within 1%.
    logp = torch.full((1, 1), 1e-4)
    ref_logp = torch.zeros(1, 1)
    torch.testing.assert_close(
        per_token_kl(logp, ref_logp, "k3"), torch.full((1, 1), 5.0e-9), rtol=1e-2, atol=0
    )


def test_k1_and_k3_sample_means_approach_true_kl():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    # KL(p ‖ q) = 0.5 ln(2.5) + 0.3 ln(1) + 0.2 ln(0.4) = 0.3 ln(2.5) = 0.274887
    true_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=gen).view(100, 2000)
    logp, ref_logp = p.log()[tokens], q.log()[tokens]
    # Std of k1 is ~0.72, so the standard error of a 200k-sample mean is ~0.0016; k3's is smaller.
    assert abs(per_token_kl(logp, ref_logp, "k1").mean().item() - true_kl) < 0.01
    assert abs(per_token_kl(logp, ref_logp, "k3").mean().item() - true_kl) < 0.01
    # The wrong-way k3 (r - 1 - log r) has mean 0.5·0.584 + 0.2·0.316 = 0.355, far outside 0.01.
    # k2 is biased: its mean is ½ E_p[(log r)²] = ½ (0.7 · ln(2.5)²) = 0.293855, not the KL.
    k2_mean = 0.5 * sum(pi * math.log(pi / qi) ** 2 for pi, qi in zip(p.tolist(), q.tolist()))
    assert abs(per_token_kl(logp, ref_logp, "k2").mean().item() - k2_mean) < 0.01
    assert abs(k2_mean - true_kl) > 0.015


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_estimators_reject_bad_inputs(name):
    fn = KL_ESTIMATORS.get(name)
    with pytest.raises(ValueError, match="ref_logp"):
        fn(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="logp"):
        fn(torch.zeros(6), torch.zeros(6))
    with pytest.raises(TypeError, match="ref_logp"):
        fn(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    # last 1 of each row: columns 2, 0, 3
    assert torch.equal(last_token_index(mask), torch.tensor([2, 0, 3]))
    assert last_token_index(mask).dtype == torch.long
    assert torch.equal(last_token_index(mask.bool()), torch.tensor([2, 0, 3]))


def test_last_token_index_rejects_empty_row():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))


def test_shape_rewards_hand_built_batch_with_padding():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    # Padding holds inf and nan, as padded log-probs can: none of it may leak into the rewards.
    kl = torch.tensor([[0.2, 0.4, 0.6, float("inf")], [1.0, float("nan"), 5.0, 5.0], [0.0, 0.0, 0.0, 2.0]])
    scores = torch.tensor([1.0, -2.0, 3.0])
    rewards = shape_rewards(scores, kl, mask, beta=0.5)
    # row 0: -0.5·[0.2, 0.4, 0.6] = [-0.1, -0.2, -0.3], score 1 added at index 2 -> 0.7; padding 0
    # row 1: -0.5·1.0 - 2 = -2.5 at index 0; padding 0
    # row 2: -0.5·[0, 0, 0, 2] = [0, 0, 0, -1], score 3 added at index 3 -> 2
    expected = torch.tensor([[-0.1, -0.2, 0.7, 0.0], [-2.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    torch.testing.assert_close(rewards, expected)


def test_shape_rewards_beta_zero_is_score_only():
    mask = torch.tensor([[1, 1, 0]])
    rewards = shape_rewards(torch.tensor([4.0]), torch.tensor([[3.0, 3.0, 3.0]]), mask, beta=0.0)
    # no KL penalty: the score 4 sits at the last real index 1
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 4.0, 0.0]]))


def test_shape_rewards_rejects_bad_input():
    kl, mask, scores = torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2)
    with pytest.raises(ValueError, match="no real response token"):
        shape_rewards(scores, kl, torch.tensor([[1, 1, 0], [0, 0, 0]]), beta=0.1)
    with pytest.raises(ValueError, match="scores"):
        shape_rewards(torch.zeros(2, 1), kl, mask, beta=0.1)
    with pytest.raises(ValueError, match="mask"):
        shape_rewards(scores, kl, torch.ones(2, 4), beta=0.1)
    with pytest.raises(ValueError, match="mask"):
        shape_rewards(scores, kl, torch.full((2, 3), 0.5), beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        shape_rewards(scores, kl, mask, beta=-0.1)
    with pytest.raises(ValueError, match="kl"):
        shape_rewards(scores, torch.zeros(2, 3, dtype=torch.long), mask, beta=0.1)


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=512)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_controller_hand_values():
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=6.6, n_steps=256)
    # e = 6.6/6 - 1 = 0.1 (inside the clip); β = 0.1 · (1 + 0.1 · 256/10000) = 0.1 · 1.00256
    assert ctl.value == pytest.approx(0.100256)
    ctl.update(current_kl=6.0, n_steps=256)
    # on target: e = 0, β unchanged
    assert ctl.value == pytest.approx(0.100256)


def test_adaptive_controller_moves_beta_toward_target_and_is_bounded_by_the_clip():
    above = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10_000)
    above.update(current_kl=1e6, n_steps=256)
    # KL far above target: e clipped to +0.2, β = 0.1 · (1 + 0.2 · 0.0256) = 0.100512
    assert above.value == pytest.approx(0.100512)
    below = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10_000)
    below.update(current_kl=0.0, n_steps=256)
    # KL far below target: e = 0/6 - 1 = -1, clipped to -0.2, β = 0.1 · (1 - 0.00512) = 0.099488
    assert below.value == pytest.approx(0.099488)
    betas = [above.value]
    for _ in range(5):
        above.update(current_kl=12.0, n_steps=256)
        betas.append(above.value)
    assert all(b2 > b1 for b1, b2 in zip(betas, betas[1:]))


def test_adaptive_controller_state_round_trips_through_json_and_torch_save():
    ctl = AdaptiveKLController(init_beta=0.2, target=3.0, horizon=1000)
    ctl.update(current_kl=4.0, n_steps=64)
    state = ctl.state_dict()
    assert all(type(v) is float for v in state.values())

    from_json = AdaptiveKLController(init_beta=1.0, target=1.0, horizon=1.0)
    from_json.load_state_dict(json.loads(json.dumps(state)))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    from_torch = AdaptiveKLController(init_beta=1.0, target=1.0, horizon=1.0)
    from_torch.load_state_dict(torch.load(buf, weights_only=True))

    for restored in (from_json, from_torch):
        assert restored.state_dict() == state
        restored.update(current_kl=1.0, n_steps=64)
    ctl.update(current_kl=1.0, n_steps=64)
    assert from_json.value == ctl.value == from_torch.value


def test_controller_validation():
    with pytest.raises(ValueError, match="beta"):
        FixedKLController(-1.0)
    with pytest.raises(ValueError, match="init_beta"):
        AdaptiveKLController(-0.1, target=1.0, horizon=10)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, target=1.0, horizon=-5)
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=10)
    with pytest.raises(ValueError, match="current_kl"):
        ctl.update(float("nan"), n_steps=1)
    with pytest.raises(ValueError, match="n_steps"):
        ctl.update(2.0, n_steps=-1)
    # e = -0.2 and n/h = 6: β would be multiplied by 1 - 1.2 < 0
    with pytest.raises(ValueError, match="n_steps"):
        ctl.update(0.0, n_steps=60)
    with pytest.raises(ValueError, match="horizon"):
        ctl.load_state_dict({"value": 0.1, "target": 1.0})


def test_build_kl_controller():
    fixed = build_kl_controller("fixed", 0.05, target=6.0, horizon=100)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.05
    adaptive = build_kl_controller("adaptive", 0.05, target=6.0, horizon=100)
    assert isinstance(adaptive, AdaptiveKLController)
    assert adaptive.state_dict() == {"value": 0.05, "target": 6.0, "horizon": 100.0}
    with pytest.raises(ValueError, match="target"):
        build_kl_controller("adaptive", 0.05, horizon=100)
    with pytest.raises(KeyError, match="adaptive, fixed"):
        build_kl_controller("pid", 0.05)
