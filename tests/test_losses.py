import math

import pytest
import torch
import torch.nn.functional as F

from rlhf.core.losses import (
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    cross_entropy,
    huber,
    kl_divergence,
    lm_loss,
    mae,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    mse,
    perplexity,
    rmse,
)

# The seed's regression example. errors = y_pred - y_true = [0.1, 0.3, -0.2, 0.5, -0.1]
Y_TRUE = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
Y_PRED = torch.tensor([1.1, 2.3, 2.8, 4.5, 4.9], dtype=torch.float64)

# The seed's 4x3 classification example.
CE_LOGITS = torch.tensor(
    [[2.0, 1.0, 0.1], [0.1, 3.0, 0.2], [0.1, 0.1, 3.5], [1.5, 0.5, 0.5]], dtype=torch.float64
)
CE_LABELS = torch.tensor([0, 1, 2, 0])
# Per-row -log softmax(z)[y] = log(sum_c e^{z_c}) - z_y:
CE_ROWS = [
    math.log(math.exp(2.0) + math.exp(1.0) + math.exp(0.1)) - 2.0,  # ~0.4170
    math.log(math.exp(0.1) + math.exp(3.0) + math.exp(0.2)) - 3.0,  # ~0.1096
    math.log(2 * math.exp(0.1) + math.exp(3.5)) - 3.5,  # ~0.0646
    math.log(math.exp(1.5) + 2 * math.exp(0.5)) - 1.5,  # ~0.5514
]


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- regression


def test_mse_seed_example():
    # squares [0.01, 0.09, 0.04, 0.25, 0.01] sum to 0.40; mean 0.40 / 5 = 0.08 (the seed prints 0.0920: wrong)
    torch.testing.assert_close(mse(Y_PRED, Y_TRUE), torch.tensor(0.08, dtype=torch.float64))
    torch.testing.assert_close(mse(Y_PRED, Y_TRUE, reduction="sum"), torch.tensor(0.40, dtype=torch.float64))
    expected = torch.tensor([0.01, 0.09, 0.04, 0.25, 0.01], dtype=torch.float64)
    torch.testing.assert_close(mse(Y_PRED, Y_TRUE, reduction="none"), expected)


def test_rmse_seed_example():
    # sqrt(0.08) = 0.28284 (the seed prints 0.3033: wrong)
    torch.testing.assert_close(rmse(Y_PRED, Y_TRUE), torch.tensor(math.sqrt(0.08), dtype=torch.float64))


def test_mae_seed_example():
    # |errors| [0.1, 0.3, 0.2, 0.5, 0.1] sum to 1.2; mean 0.24 (the seed prints 0.2600: wrong)
    torch.testing.assert_close(mae(Y_PRED, Y_TRUE), torch.tensor(0.24, dtype=torch.float64))
    torch.testing.assert_close(mae(Y_PRED, Y_TRUE, reduction="sum"), torch.tensor(1.2, dtype=torch.float64))
    expected = torch.tensor([0.1, 0.3, 0.2, 0.5, 0.1], dtype=torch.float64)
    torch.testing.assert_close(mae(Y_PRED, Y_TRUE, reduction="none"), expected)


def test_huber_seed_example():
    # delta = 1: every |e| <= 1, so huber = 0.5 * e^2 -> 0.5 * mse = 0.04 (the seed prints 0.0460: wrong)
    torch.testing.assert_close(huber(Y_PRED, Y_TRUE), torch.tensor(0.04, dtype=torch.float64))
    # delta = 0.25: |e| 0.1, 0.2, 0.1 are quadratic -> 0.005, 0.02, 0.005;
    # |e| 0.3 -> 0.25 * (0.3 - 0.125) = 0.04375; |e| 0.5 -> 0.25 * (0.5 - 0.125) = 0.09375
    per_item = torch.tensor([0.005, 0.04375, 0.02, 0.09375, 0.005], dtype=torch.float64)
    torch.testing.assert_close(huber(Y_PRED, Y_TRUE, delta=0.25, reduction="none"), per_item)
    # sum 0.1675, mean 0.0335
    torch.testing.assert_close(huber(Y_PRED, Y_TRUE, delta=0.25), torch.tensor(0.0335, dtype=torch.float64))
    torch.testing.assert_close(
        huber(Y_PRED, Y_TRUE, delta=0.25, reduction="sum"), torch.tensor(0.1675, dtype=torch.float64)
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_regression_losses_match_torch(reduction):
    x, y = _rand(4, 7, seed=1) * 3, _rand(4, 7, seed=2)
    torch.testing.assert_close(mse(x, y, reduction), F.mse_loss(x, y, reduction=reduction))
    torch.testing.assert_close(mae(x, y, reduction), F.l1_loss(x, y, reduction=reduction))
    for delta in (0.3, 1.0, 2.5):
        torch.testing.assert_close(
            huber(x, y, delta, reduction), F.huber_loss(x, y, reduction=reduction, delta=delta)
        )
    torch.testing.assert_close(rmse(x, y), torch.sqrt(F.mse_loss(x, y)))


def test_half_precision_is_computed_and_returned_in_float32():
    x, y = _rand(64, seed=3), _rand(64, seed=4)
    out = mse(x.bfloat16(), y.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.mse_loss(x.bfloat16().float(), y.bfloat16().float()))


# ---------------------------------------------------------------- binary cross-entropy

BCE_Y = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
BCE_P = torch.tensor([0.9, 0.1, 0.8, 0.3, 0.7], dtype=torch.float64)
# -[ln .9 + ln(1-.1) + ln .8 + ln .3 + ln(1-.7)] / 5 = -(2 ln .9 + ln .8 + 2 ln .3) / 5 ~ 0.5684
# (the seed prints 0.3790: wrong)
BCE_EXPECTED = -(2 * math.log(0.9) + math.log(0.8) + 2 * math.log(0.3)) / 5


def test_bce_seed_example():
    torch.testing.assert_close(
        binary_cross_entropy(BCE_P, BCE_Y), torch.tensor(BCE_EXPECTED, dtype=torch.float64)
    )
    per_item = -torch.log(torch.tensor([0.9, 0.9, 0.8, 0.3, 0.3], dtype=torch.float64))
    torch.testing.assert_close(binary_cross_entropy(BCE_P, BCE_Y, reduction="none"), per_item)
    torch.testing.assert_close(binary_cross_entropy(BCE_P, BCE_Y, reduction="sum"), per_item.sum())


def test_bce_clamps_probabilities():
    # p=0 with y=1 and p=1 with y=0 are both clamped to an error of -ln(eps) = -ln(1e-7) ~ 16.12, not inf
    p = torch.tensor([0.0, 1.0], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0], dtype=torch.float64)
    out = binary_cross_entropy(p, y, reduction="none")
    torch.testing.assert_close(out, torch.full((2,), -math.log(1e-7), dtype=torch.float64))
    out = binary_cross_entropy(p, y, eps=1e-3, reduction="none")
    torch.testing.assert_close(out, torch.full((2,), -math.log(1e-3), dtype=torch.float64))


def test_bce_with_logits_seed_example():
    # logit(p) = ln(p / (1 - p)) gives back the same probabilities, so the same loss
    logits = torch.log(BCE_P / (1 - BCE_P))
    out = binary_cross_entropy_with_logits(logits, BCE_Y)
    torch.testing.assert_close(out, torch.tensor(BCE_EXPECTED, dtype=torch.float64))


def test_bce_with_logits_is_stable_for_large_logits():
    # Confidently wrong: z=+100 with y=0 costs softplus(100) ~ 100; z=-100 with y=1 the same.
    # Confidently right: z=+100 with y=1 costs softplus(-100) = e^-100 ~ 0. A sigmoid-then-log would give inf.
    z = torch.tensor([100.0, -100.0, 100.0])
    y = torch.tensor([0.0, 1.0, 1.0])
    out = binary_cross_entropy_with_logits(z, y, reduction="none")
    torch.testing.assert_close(out, torch.tensor([100.0, 100.0, 0.0]))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_matches_torch(reduction):
    z = _rand(3, 8, seed=5) * 4
    y = torch.rand(3, 8, generator=torch.Generator().manual_seed(6))  # soft labels
    ref = F.binary_cross_entropy_with_logits(z, y, reduction=reduction)
    torch.testing.assert_close(binary_cross_entropy_with_logits(z, y, reduction), ref)
    p = torch.sigmoid(z.double())
    ref = F.binary_cross_entropy(p, y.double(), reduction=reduction)
    torch.testing.assert_close(binary_cross_entropy(p, y.double(), reduction=reduction), ref)


# ---------------------------------------------------------------- cross-entropy


def test_cross_entropy_seed_example():
    # mean of CE_ROWS ~ (0.4170 + 0.1096 + 0.0646 + 0.5514) / 4 = 0.2857 (the seed prints ~0.2012: wrong)
    expected = torch.tensor(sum(CE_ROWS) / 4, dtype=torch.float64)
    torch.testing.assert_close(cross_entropy(CE_LOGITS, CE_LABELS), expected)
    torch.testing.assert_close(
        cross_entropy(CE_LOGITS, CE_LABELS, reduction="none"), torch.tensor(CE_ROWS).double()
    )
    torch.testing.assert_close(
        cross_entropy(CE_LOGITS, CE_LABELS, reduction="sum"), torch.tensor(sum(CE_ROWS), dtype=torch.float64)
    )


def test_cross_entropy_ignore_index():
    labels = torch.tensor([0, -100, 2, -100])
    # only rows 0 and 2 count: mean (CE_ROWS[0] + CE_ROWS[2]) / 2, not divided by 4
    expected = torch.tensor((CE_ROWS[0] + CE_ROWS[2]) / 2, dtype=torch.float64)
    torch.testing.assert_close(cross_entropy(CE_LOGITS, labels), expected)
    none = cross_entropy(CE_LOGITS, labels, reduction="none")
    torch.testing.assert_close(none, torch.tensor([CE_ROWS[0], 0.0, CE_ROWS[2], 0.0], dtype=torch.float64))
    # custom ignore_index: 1 drops row 1 only
    expected = torch.tensor((CE_ROWS[0] + CE_ROWS[2] + CE_ROWS[3]) / 3, dtype=torch.float64)
    torch.testing.assert_close(cross_entropy(CE_LOGITS, CE_LABELS, ignore_index=1), expected)


def test_cross_entropy_all_ignored_is_zero_not_nan():
    out = cross_entropy(CE_LOGITS, torch.full((4,), -100))
    assert out.item() == 0.0


def test_cross_entropy_ignored_rows_may_hold_nan_logits():
    logits = CE_LOGITS.clone()
    logits[1] = math.nan
    out = cross_entropy(logits, torch.tensor([0, -100, 2, 0]))
    expected = torch.tensor((CE_ROWS[0] + CE_ROWS[2] + CE_ROWS[3]) / 3, dtype=torch.float64)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch_on_nd_input(reduction):
    logits = _rand(2, 5, 9, seed=7) * 2
    target = torch.randint(0, 9, (2, 5), generator=torch.Generator().manual_seed(8))
    target[0, 1] = target[1, 3] = -100
    ref = F.cross_entropy(logits.reshape(-1, 9), target.reshape(-1), reduction=reduction)
    out = cross_entropy(logits, target, reduction=reduction)
    torch.testing.assert_close(out, ref if reduction != "none" else ref.reshape(2, 5))


def test_cross_entropy_gradient_matches_torch():
    logits = _rand(6, 5, seed=9)
    target = torch.tensor([0, 4, -100, 2, 1, 3])
    a = logits.clone().requires_grad_()
    cross_entropy(a, target).backward()
    b = logits.clone().requires_grad_()
    F.cross_entropy(b, target).backward()
    torch.testing.assert_close(a.grad, b.grad)


# ---------------------------------------------------------------- language-model loss

# vocab 3, input_ids [0, 1, 2]. logits[:, 0] = [0, 0, 0] predicts x_1 = 1 with p = 1/3;
# logits[:, 1] = [0, 0, ln 2] predicts x_2 = 2 with p = 2/4 = 1/2; logits[:, 2] predicts nothing, so its 100
# (which would dominate if it were used) must be ignored. Per-token losses: [ln 3, ln 2].
LM_LOGITS = torch.tensor(
    [[[0.0, 0.0, 0.0], [0.0, 0.0, math.log(2.0)], [100.0, 0.0, 0.0]]], dtype=torch.float64
)
LM_IDS = torch.tensor([[0, 1, 2]])


def test_lm_loss_hand_example():
    ln2, ln3 = math.log(2.0), math.log(3.0)
    torch.testing.assert_close(lm_loss(LM_LOGITS, LM_IDS), torch.tensor((ln3 + ln2) / 2, dtype=torch.float64))
    torch.testing.assert_close(lm_loss(LM_LOGITS, LM_IDS, reduction="sum"), torch.tensor(ln3 + ln2).double())
    torch.testing.assert_close(
        lm_loss(LM_LOGITS, LM_IDS, reduction="none"), torch.tensor([[ln3, ln2]]).double()
    )
    # perplexity = exp((ln 3 + ln 2) / 2) = sqrt(6)
    assert perplexity(lm_loss(LM_LOGITS, LM_IDS)).item() == pytest.approx(math.sqrt(6.0))


def test_lm_loss_mask_selects_target_positions():
    ln2, ln3 = math.log(2.0), math.log(3.0)
    # mask[:, 0] is never a target, so it must not matter; mask[:, 2] = 0 drops the ln 2 token
    for first in (0, 1):
        mask = torch.tensor([[first, 1, 0]])
        torch.testing.assert_close(lm_loss(LM_LOGITS, LM_IDS, mask), torch.tensor(ln3, dtype=torch.float64))
        none = lm_loss(LM_LOGITS, LM_IDS, mask, reduction="none")
        torch.testing.assert_close(none, torch.tensor([[ln3, 0.0]], dtype=torch.float64))
    mask = torch.tensor([[True, False, True]])
    torch.testing.assert_close(lm_loss(LM_LOGITS, LM_IDS, mask), torch.tensor(ln2, dtype=torch.float64))
    # no counted token -> 0, not NaN
    assert lm_loss(LM_LOGITS, LM_IDS, torch.tensor([[1, 0, 0]])).item() == 0.0


def test_lm_loss_ignores_padding_logits_exactly():
    # logits[:, 1] predict target position 2, which is masked out: NaN or 1e6 there must change nothing
    mask = torch.tensor([[1, 1, 0]])
    for junk in (math.nan, 1e6):
        logits = LM_LOGITS.clone()
        logits[0, 1] = junk
        torch.testing.assert_close(
            lm_loss(logits, LM_IDS, mask), torch.tensor(math.log(3.0), dtype=torch.float64)
        )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_lm_loss_matches_torch(reduction):
    batch, seq_len, vocab = 3, 6, 11
    logits = _rand(batch, seq_len, vocab, seed=10) * 2
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(11))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), targets.reshape(-1), reduction=reduction)
    out = lm_loss(logits, ids, mask.float(), reduction=reduction, chunk_size=4)
    torch.testing.assert_close(out, ref if reduction != "none" else ref.reshape(batch, seq_len - 1))


def test_lm_loss_gradient_matches_torch():
    logits = _rand(2, 5, 7, seed=12)
    ids = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(13))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    a = logits.clone().requires_grad_()
    lm_loss(a, ids, mask, chunk_size=3).backward()
    b = logits.clone().requires_grad_()
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    F.cross_entropy(b[:, :-1].reshape(-1, 7), targets.reshape(-1)).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_perplexity():
    # e^0 = 1 (a certain model); e^(ln 20) = 20
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(20.0)) == pytest.approx(20.0)
    out = perplexity(torch.tensor([0.0, math.log(9.0)]))
    torch.testing.assert_close(out, torch.tensor([1.0, 9.0]))
    with pytest.raises(TypeError, match="loss"):
        perplexity("2.0")


# ---------------------------------------------------------------- KL divergence


def test_kl_hand_example():
    # P = [1/2, 1/2], Q = [1/4, 3/4]:
    # KL(P||Q) = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) ~ 0.1438
    # KL(Q||P) = 1/4 ln(1/4 / 1/2) + 3/4 ln(3/4 / 1/2) = -1/4 ln 2 + 3/4 ln(3/2) ~ 0.1308 (asymmetric)
    p = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    q = torch.log(torch.tensor([0.25, 0.75], dtype=torch.float64)) + 7.0  # logits are shift invariant
    torch.testing.assert_close(kl_divergence(p, q), torch.tensor(0.5 * math.log(4 / 3), dtype=torch.float64))
    expected = -0.25 * math.log(2) + 0.75 * math.log(1.5)
    torch.testing.assert_close(kl_divergence(q, p), torch.tensor(expected, dtype=torch.float64))
    assert kl_divergence(p, p).item() == 0.0


def test_kl_reductions_and_impossible_classes():
    # row 0: P = [1, 0] (logit -inf), Q = [1/2, 1/2] -> 1 * ln(1 / (1/2)) = ln 2, and no 0 * -inf NaN
    # row 1: identical -> 0
    p = torch.tensor([[0.0, -math.inf], [1.0, 2.0]])
    q = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    torch.testing.assert_close(kl_divergence(p, q, reduction="none"), torch.tensor([math.log(2.0), 0.0]))
    torch.testing.assert_close(kl_divergence(p, q, reduction="sum"), torch.tensor(math.log(2.0)))
    torch.testing.assert_close(kl_divergence(p, q), torch.tensor(math.log(2.0) / 2))


def test_kl_matches_torch():
    p, q = _rand(2, 4, 10, seed=14) * 2, _rand(2, 4, 10, seed=15) * 2
    ref = F.kl_div(torch.log_softmax(q, -1), torch.log_softmax(p, -1), reduction="none", log_target=True).sum(
        -1
    )
    torch.testing.assert_close(kl_divergence(p, q, reduction="none"), ref)
    torch.testing.assert_close(kl_divergence(p, q), ref.mean())


# ---------------------------------------------------------------- masked reductions

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])  # keeps 1, 2, 4


def test_masked_sum_and_mean():
    # kept 1 + 2 + 4 = 7 -> mean 7/3
    torch.testing.assert_close(masked_sum(X, M), torch.tensor(7.0))
    torch.testing.assert_close(masked_mean(X, M), torch.tensor(7.0 / 3))
    # per row: [1 + 2, 4] -> means [1.5, 4]
    torch.testing.assert_close(masked_sum(X, M, dim=1), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(masked_mean(X, M, dim=1), torch.tensor([1.5, 4.0]))
    # per column: [1 + 4, 2, nothing] -> means [2.5, 2, 0] (empty column is 0, not NaN)
    torch.testing.assert_close(masked_sum(X, M, dim=0), torch.tensor([5.0, 2.0, 0.0]))
    torch.testing.assert_close(masked_mean(X, M, dim=0), torch.tensor([2.5, 2.0, 0.0]))


def test_masked_var():
    # kept [1, 2, 4], mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9
    # unbiased: (42/9) / 2 = 7/3; biased: (42/9) / 3 = 14/9
    torch.testing.assert_close(masked_var(X, M), torch.tensor(7.0 / 3))
    torch.testing.assert_close(masked_var(X, M, unbiased=False), torch.tensor(14.0 / 9))
    torch.testing.assert_close(masked_var(X, M), torch.tensor([1.0, 2.0, 4.0]).var())


def test_masked_whiten():
    # (x - 7/3) / sqrt(7/3) at kept positions: [-4/3, -1/3, 5/3] / sqrt(7/3); masked-out positions are 0
    s = math.sqrt(7.0 / 3)
    expected = torch.tensor([[-4 / 3 / s, -1 / 3 / s, 0.0], [5 / 3 / s, 0.0, 0.0]])
    torch.testing.assert_close(masked_whiten(X, M), expected)
    # without the shift the mean 7/3 is added back at kept positions only
    expected_noshift = expected + (7.0 / 3) * M
    torch.testing.assert_close(masked_whiten(X, M, shift_mean=False), expected_noshift)


def test_masked_whiten_random_has_unit_stats():
    x = _rand(4, 9, seed=16) * 5 + 3
    mask = torch.rand(4, 9, generator=torch.Generator().manual_seed(17)) > 0.4
    w = masked_whiten(x, mask)
    torch.testing.assert_close(masked_mean(w, mask), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(masked_var(w, mask), torch.tensor(1.0), atol=1e-5, rtol=1e-5)
    assert (w[~mask] == 0).all()


@pytest.mark.parametrize("junk", [math.nan, 1e6, -math.inf])
def test_masked_functions_ignore_values_at_masked_positions(junk):
    noisy = X.masked_fill(M == 0, junk)
    torch.testing.assert_close(masked_sum(noisy, M), masked_sum(X, M))
    torch.testing.assert_close(masked_sum(noisy, M, dim=0), masked_sum(X, M, dim=0))
    torch.testing.assert_close(masked_mean(noisy, M), masked_mean(X, M))
    torch.testing.assert_close(masked_mean(noisy, M, dim=1), masked_mean(X, M, dim=1))
    torch.testing.assert_close(masked_var(noisy, M), masked_var(X, M))
    torch.testing.assert_close(masked_whiten(noisy, M), masked_whiten(X, M))


def test_masked_mean_gradient_does_not_leak_nan():
    x = X.masked_fill(M == 0, math.nan).requires_grad_()
    masked_mean(x, M).backward()
    # d mean / d x_i = 1/3 at the 3 kept positions, exactly 0 (not NaN) elsewhere
    torch.testing.assert_close(x.grad, M / 3.0)


def test_mask_dtypes_are_equivalent():
    for mask in (M.bool(), M.float(), M.long(), M.to(torch.uint8)):
        torch.testing.assert_close(masked_mean(X, mask), torch.tensor(7.0 / 3))


def test_empty_and_single_element_masks():
    empty = torch.zeros_like(M)
    assert masked_sum(X, empty).item() == 0.0
    assert masked_mean(X, empty).item() == 0.0
    assert masked_var(X, empty).item() == 0.0
    assert (masked_whiten(X, empty) == 0).all()
    one = torch.tensor([[0, 1, 0], [0, 0, 0]])
    # n = 1: the unbiased variance is undefined -> 0; the biased one is 0 (no spread)
    assert masked_var(X, one).item() == 0.0
    assert masked_var(X, one, unbiased=False).item() == 0.0


# ---------------------------------------------------------------- input validation

FLOAT = torch.zeros(3)
INT = torch.zeros(3, dtype=torch.long)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: mse(INT, FLOAT), TypeError, "input"),
        (lambda: mse(FLOAT, INT), TypeError, "target"),
        (lambda: mse(FLOAT, torch.zeros(3, 1)), ValueError, "target"),
        (lambda: mse([0.0, 1.0], FLOAT), TypeError, "input"),
        (lambda: mse(FLOAT, FLOAT, reduction="avg"), ValueError, "reduction"),
        (lambda: rmse(INT, FLOAT), TypeError, "input"),
        (lambda: mae(FLOAT, torch.zeros(4)), ValueError, "target"),
        (lambda: huber(FLOAT, FLOAT, delta=0.0), ValueError, "delta"),
        (lambda: huber(FLOAT, FLOAT, delta=-1.0), ValueError, "delta"),
        (lambda: binary_cross_entropy(torch.tensor([0.5, 1.5]), torch.zeros(2)), ValueError, "probs"),
        (lambda: binary_cross_entropy(FLOAT, INT), TypeError, "target"),
        (lambda: binary_cross_entropy(FLOAT, FLOAT, eps=0.0), ValueError, "eps"),
        (lambda: binary_cross_entropy_with_logits(FLOAT, torch.zeros(2)), ValueError, "target"),
        (lambda: cross_entropy(CE_LOGITS, CE_LABELS.float()), TypeError, "target"),
        (lambda: cross_entropy(CE_LOGITS.long(), CE_LABELS), TypeError, "logits"),
        (lambda: cross_entropy(CE_LOGITS, CE_LABELS[:3]), ValueError, "target"),
        (lambda: cross_entropy(CE_LOGITS, torch.tensor([0, 1, 3, 0])), ValueError, "target"),
        (lambda: lm_loss(LM_LOGITS, LM_IDS.float()), TypeError, "input_ids"),
        (lambda: lm_loss(LM_LOGITS[0], LM_IDS), ValueError, "logits"),
        (lambda: lm_loss(LM_LOGITS, LM_IDS[:, :2]), ValueError, "input_ids"),
        (lambda: lm_loss(LM_LOGITS[:, :1], LM_IDS[:, :1]), ValueError, "seq_len"),
        (lambda: lm_loss(LM_LOGITS, torch.tensor([[0, 1, 3]])), ValueError, "input_ids"),
        (lambda: lm_loss(LM_LOGITS, LM_IDS, torch.ones(1, 2)), ValueError, "mask"),
        (lambda: kl_divergence(FLOAT, torch.zeros(4)), ValueError, "q_logits"),
        (lambda: kl_divergence(INT, FLOAT), TypeError, "p_logits"),
        (lambda: masked_mean(X.long(), M), TypeError, "x"),
        (lambda: masked_mean(X, M[:, :2]), ValueError, "mask"),
        (lambda: masked_mean(X, M * 0.5), ValueError, "mask"),
        (lambda: masked_sum(X, M.tolist()), TypeError, "mask"),
        (lambda: masked_whiten(X, M, eps=0.0), ValueError, "eps"),
    ],
)
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()
