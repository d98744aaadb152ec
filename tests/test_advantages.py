import math

import pytest
import torch

from rlhf.core.advantages import ADVANTAGE_ESTIMATORS

NAN = float("nan")


def _call(name, rewards, mask, values=None, *, group_size=1, gamma=1.0, lam=1.0, std_normalize=True):
    fn = ADVANTAGE_ESTIMATORS.get(name)
    return fn(rewards, mask, values, group_size=group_size, gamma=gamma, lam=lam, std_normalize=std_normalize)


def _gae_reference(rewards, values, length, gamma, lam):
    """Textbook GAE on one row's first `length` tokens, with plain Python floats."""
    advantages = [0.0] * length
    running = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages


def test_registry_names():
    assert ADVANTAGE_ESTIMATORS.names() == ["gae", "grpo", "reinforce_pp", "rloo"]


def test_gae_hand_values_with_padding():
    # Row 1's padding holds reward 99 and value 7: neither may reach the real tokens.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.5, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = _call("gae", rewards, mask, values, gamma=0.9, lam=0.8)
    # γλ = 0.72
    # row 0: δ2 = 1 - 0.5 = 0.5 (terminal), δ1 = 0.9·0.5 - 0.5 = -0.05, δ0 = -0.05
    #        A2 = 0.5, A1 = -0.05 + 0.72·0.5 = 0.31, A0 = -0.05 + 0.72·0.31 = 0.1732
    # row 1: δ1 = 2 - 0.5 = 1.5 (terminal), δ0 = 0.9·0.5 - 1 = -0.55
    #        A1 = 1.5, A0 = -0.55 + 0.72·1.5 = 0.53, A2 = 0 (padding)
    expected_adv = torch.tensor([[0.1732, 0.31, 0.5], [0.53, 1.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(adv, expected_adv)
    # returns = A + V on real tokens: [0.6732, 0.81, 1.0], [1.53, 2.0, 0]
    torch.testing.assert_close(
        ret, torch.tensor([[0.6732, 0.81, 1.0], [1.53, 2.0, 0.0]], dtype=torch.float64)
    )


def test_gae_with_gamma_lambda_one_is_monte_carlo_return_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    values = torch.tensor([[4.0, 1.0, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = _call("gae", rewards, mask, values, gamma=1.0, lam=1.0)
    # reward-to-go [6, 5, 3], minus V [4, 1, 1] -> [2, 4, 2]; returns = reward-to-go
    torch.testing.assert_close(adv, torch.tensor([[2.0, 4.0, 2.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[6.0, 5.0, 3.0, 0.0]]))


def test_gae_vectorised_matches_plain_loop_on_ragged_masks():
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 1, 3, 5, 2, 6]
    batch, width = len(lengths), 7
    rewards = torch.randn(batch, width, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, width, generator=gen, dtype=torch.float64)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    rewards[mask == 0] = NAN  # garbage in the padding must stay out
    values[mask == 0] = 1e6
    gamma, lam = 0.95, 0.9
    adv, ret = _call("gae", rewards, mask, values, gamma=gamma, lam=lam)
    for i, length in enumerate(lengths):
        ref = _gae_reference(rewards[i].tolist(), values[i].tolist(), length, gamma, lam)
        expected = torch.tensor(ref + [0.0] * (width - length), dtype=torch.float64)
        torch.testing.assert_close(adv[i], expected)
        expected_ret = torch.tensor(
            [a + v for a, v in zip(ref, values[i].tolist())] + [0.0] * (width - length)
        )
        torch.testing.assert_close(ret[i], expected_ret.to(torch.float64))


def test_gae_rejects_bad_input():
    rewards, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="values"):
        _call("gae", rewards, mask, None)
    with pytest.raises(ValueError, match="values"):
        _call("gae", rewards, mask, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="gamma"):
        _call("gae", rewards, mask, torch.zeros(2, 3), gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        _call("gae", rewards, mask, torch.zeros(2, 3), lam=-0.1)


def _sequences(totals, width=3, length=None):
    """Rewards (B, width) whose real tokens sum to `totals`, with nan padding after `length` tokens."""
    length = length or [width] * len(totals)
    rewards = torch.full((len(totals), width), NAN, dtype=torch.float64)
    mask = torch.zeros(len(totals), width, dtype=torch.long)
    for i, (total, n) in enumerate(zip(totals, length)):
        rewards[i, :n] = 0.0
        rewards[i, n - 1] = total
        mask[i, :n] = 1
    return rewards, mask


def test_rloo_hand_values():
    rewards, mask = _sequences([1.0, 2.0, 6.0, 0.0, 0.0, 3.0], length=[3, 2, 1, 3, 3, 2])
    adv, ret = _call("rloo", rewards, mask, group_size=3)
    # group 0, R = [1, 2, 6]: leave-one-out baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5
    #   -> A = [-3, -1.5, 4.5]
    # group 1, R = [0, 0, 3]: baselines 1.5, 1.5, 0 -> A = [-1.5, -1.5, 3]
    per_seq = torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0], dtype=torch.float64)
    torch.testing.assert_close(adv, per_seq[:, None] * mask)
    totals = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(ret, totals[:, None] * mask)


def test_rloo_ignores_gamma():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    mask = torch.ones(2, 2)
    adv, ret = _call("rloo", rewards, mask, group_size=2, gamma=0.5)
    # R = [2, 0] undiscounted; A = [2 - 0, 0 - 2] = [2, -2]
    torch.testing.assert_close(adv, torch.tensor([[2.0, 2.0], [-2.0, -2.0]]))
    torch.testing.assert_close(ret, torch.tensor([[2.0, 2.0], [0.0, 0.0]]))


def test_rloo_properties_on_random_groups():
    gen = torch.Generator().manual_seed(1)
    k = 4
    rewards = torch.randn(8 * k, 5, generator=gen, dtype=torch.float64)
    mask = torch.ones(8 * k, 5)
    adv, _ = _call("rloo", rewards, mask, group_size=k)
    per_seq = adv[:, 0].view(-1, k)
    # Σ_i (R_i - (S - R_i)/(K-1)) = S - (K S - S)/(K-1) = 0
    torch.testing.assert_close(per_seq.sum(dim=1), torch.zeros(8, dtype=torch.float64))
    # R_i - (S - R_i)/(K-1) = K/(K-1) · (R_i - S/K): RLOO is the scaled mean-centred return
    totals = rewards.sum(dim=1).view(-1, k)
    torch.testing.assert_close(per_seq, k / (k - 1) * (totals - totals.mean(dim=1, keepdim=True)))


def test_grpo_hand_values_use_unbiased_std():
    rewards, mask = _sequences([1.0, 2.0, 6.0], length=[3, 1, 2])
    adv, ret = _call("grpo", rewards, mask, group_size=3, std_normalize=True)
    # R = [1, 2, 6], mean 3, deviations [-2, -1, 3]; unbiased var = (4 + 1 + 9)/2 = 7
    # A = [-2, -1, 3] / √7 = [-0.755929, -0.377964, 1.133893] (the biased √(14/3) would give ±0.93, ...)
    per_seq = torch.tensor([-2.0, -1.0, 3.0], dtype=torch.float64) / math.sqrt(7.0)
    torch.testing.assert_close(adv, per_seq[:, None] * mask)
    torch.testing.assert_close(ret, torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)[:, None] * mask)


def test_grpo_without_std_normalisation_is_mean_centred():
    rewards, mask = _sequences([1.0, 2.0, 6.0, 4.0, 4.0, 4.0])
    adv, _ = _call("grpo", rewards, mask, group_size=3, std_normalize=False)
    # group 0: R - 3 = [-2, -1, 3]; group 1: all 4 -> 0
    torch.testing.assert_close(adv[:, 0], torch.tensor([-2.0, -1.0, 3.0, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_grpo_constant_group_gives_zero_not_nan():
    rewards, mask = _sequences([5.0, 5.0])
    adv, _ = _call("grpo", rewards, mask, group_size=2, std_normalize=True)
    # deviations 0, std 0: 0 / (0 + eps) = 0
    assert torch.equal(adv, torch.zeros_like(adv))


@pytest.mark.parametrize("name", ["rloo", "grpo"])
def test_group_estimators_reject_bad_group_size(name):
    rewards, mask = torch.zeros(5, 3), torch.ones(5, 3)
    with pytest.raises(ValueError, match="not divisible by group_size 2"):
        _call(name, rewards, mask, group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        _call(name, rewards[:4], mask[:4], group_size=1)


def test_reinforce_pp_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 4.0], [2.0, 2.0, 50.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = _call("reinforce_pp", rewards, mask, gamma=0.5)
    # row 0: G2 = 4, G1 = 0 + 0.5·4 = 2, G0 = 1 + 0.5·2 = 2
    # row 1: G1 = 2, G0 = 2 + 0.5·2 = 3 (the 50 is padding)
    torch.testing.assert_close(ret, torch.tensor([[2.0, 2.0, 4.0], [3.0, 2.0, 0.0]], dtype=torch.float64))
    # real G = [2, 2, 4, 3, 2]: mean 2.6, deviations [-0.6, -0.6, 1.4, 0.4, -0.6],
    # unbiased var = (0.36·3 + 1.96 + 0.16)/4 = 0.8, std = 0.894427
    std = math.sqrt(0.8)
    expected = torch.tensor([[-0.6, -0.6, 1.4], [0.4, -0.6, 0.0]], dtype=torch.float64) / std
    torch.testing.assert_close(adv, expected)


def test_reinforce_pp_whitens_over_the_whole_batch():
    gen = torch.Generator().manual_seed(2)
    rewards = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    mask = (torch.arange(5) < torch.tensor([5, 4, 3, 5, 1, 2])[:, None]).long()
    adv, _ = _call("reinforce_pp", rewards, mask, gamma=1.0)
    real = adv[mask.bool()]
    # whitened over all 20 real tokens together (not per row): mean 0, unbiased std 1
    assert abs(real.mean().item()) < 1e-12
    assert real.std().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(adv[~mask.bool()], torch.zeros(10, dtype=torch.float64))


def test_every_estimator_takes_the_same_arguments_and_zeroes_padding():
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randn(4, 6, generator=gen)
    values = torch.randn(4, 6, generator=gen)
    mask = (torch.arange(6) < torch.tensor([6, 2, 4, 1])[:, None]).float()
    for name in ADVANTAGE_ESTIMATORS.names():
        adv, ret = ADVANTAGE_ESTIMATORS.get(name)(
            rewards, mask, values, group_size=2, gamma=0.99, lam=0.95, std_normalize=True, eps=1e-6
        )
        assert adv.shape == ret.shape == (4, 6), name
        # 0 + 4 + 2 + 5 = 11 padding positions
        assert torch.equal(adv[mask == 0], torch.zeros(11)), name
        assert torch.equal(ret[mask == 0], torch.zeros(11)), name


@pytest.mark.parametrize("name", ["gae", "rloo", "grpo", "reinforce_pp"])
def test_estimators_reject_bad_shapes_and_masks(name):
    values = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="mask"):
        _call(name, torch.zeros(2, 3), torch.ones(2, 4), values, group_size=2)
    with pytest.raises(ValueError, match="rewards"):
        _call(name, torch.zeros(6), torch.ones(6), values, group_size=2)
    with pytest.raises(TypeError, match="rewards"):
        _call(name, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), values, group_size=2)
    with pytest.raises(ValueError, match="0 and 1"):
        _call(name, torch.zeros(2, 3), torch.full((2, 3), 0.5), values, group_size=2)
