"""Loss aggregation modes (trainer.loss_agg) and GSPO (algorithm.policy_loss=gspo | gspo-token).

Each aggregation mode against a plain-loop formula, and under the trainer's rescaling (loss_units +
micro_batch_share): accumulated micro-batches, and two simulated processes whose scaled losses are averaged (what
DDP does to gradients), give the loss and gradient of the whole minibatch. GSPO against hand values.
"""

import math

import pytest
import torch

from rlhf.config import ConfigError, validate_policy_config
from rlhf.core.objectives import AGGREGATION_MODES, POLICY_LOSSES, aggregate
from rlhf.core.rl_loss import LossSettings, rl_loss
from rlhf.runtime.backend import micro_batch_share
from rlhf.trainers.policy_update import loss_units
from tests.conftest import compose_policy

NAN = float("nan")
NORM = 5  # the Dr. GRPO constant (rollout.max_new_tokens) of these examples: >= the longest response (5)
MODES = [*AGGREGATION_MODES, "seq-mean"]


def _ragged():
    # Row lengths 3, 1, 2; padding holds 100 and nan, which must not count.
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, NAN], [5.0, 7.0, NAN]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    return loss, mask


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", 22 / 6),                       # (1+2+3 + 4 + 5+7) / 6 tokens
    ("seq-mean-token-mean", 4.0),                 # mean(6/3, 4/1, 12/2) = mean(2, 4, 6)
    ("seq-mean", 4.0),                            # the old name of seq-mean-token-mean
    ("seq-mean-token-sum", 22 / 3),               # mean(6, 4, 12)
    ("seq-mean-token-sum-norm", 22 / 3 / NORM),   # mean(6/5, 4/5, 12/5) = 22/15
])
def test_each_mode_by_hand_on_a_ragged_batch(mode, expected):
    loss, mask = _ragged()
    assert aggregate(loss, mask, mode, norm_len=NORM).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", 6.0), ("seq-mean-token-mean", 3.0), ("seq-mean", 3.0), ("seq-mean-token-sum", 3.0),
    ("seq-mean-token-sum-norm", 3.0 * NORM)])
def test_loss_units_is_what_each_mode_divides_by(mode, expected):
    _, mask = _ragged()  # 6 real tokens in 3 sequences
    assert loss_units(mask, mode, agg_norm=NORM).item() == expected


def test_loss_units_and_rl_loss_need_the_dr_grpo_constant():
    _, mask = _ragged()
    with pytest.raises(ValueError, match="agg_norm"):
        loss_units(mask, "seq-mean-token-sum-norm")
    x = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="agg_norm"):
        rl_loss(POLICY_LOSSES.get("ppo"), x, x, x, mask, LossSettings(agg="seq-mean-token-sum-norm"))
    with pytest.raises(ValueError, match="aggregation mode"):
        loss_units(mask, "median")


# ----------------------------------------------------------------------------------- accumulation and processes
def _minibatch(n=8, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = dict(generator=g, dtype=torch.float64)
    logp = torch.randn(n, length, **f) - 2
    old = logp + 0.2 * torch.randn(n, length, **f)
    ref = logp + 0.3 * torch.randn(n, length, **f)
    adv = torch.randn(n, length, **f)
    values, old_values, returns = (torch.randn(n, length, **f) for _ in range(3))
    lengths = torch.tensor([6, 1, 3, 5, 2, 6, 4, 1])[:n]
    mask = (torch.arange(length) < lengths[:, None]).long()
    return logp, old, ref, adv, mask, values, old_values, returns


def _reference(mode, per_token, mask):
    """The aggregation by plain Python loops over sequences and tokens."""
    rows = [[per_token[i][t] for t in range(len(mask[i])) if mask[i][t]] for i in range(len(mask))]
    if mode == "token-mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if mode in ("seq-mean-token-mean", "seq-mean"):
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / len(rows)
    return sum(sum(r) / NORM for r in rows) / len(rows)


def _terms(name, logp, old, ref, adv, mask, values, old_values, returns, mode, beta=0.1):
    s = LossSettings(clip_low=0.1, clip_high=0.15, agg=mode, agg_norm=NORM, kl_estimator="k3", value_clip=0.2,
                     value_loss="mse", value_coef=0.5)
    if name.startswith("gspo"):
        s = LossSettings(clip_low=0.02, clip_high=0.03, agg=mode, agg_norm=NORM, kl_estimator="k3",
                         value_clip=0.2, value_loss="mse", value_coef=0.5)
    return rl_loss(POLICY_LOSSES.get(name), logp, old, adv, mask, s, ref_logp=ref, kl_coef=beta, values=values,
                   old_values=old_values, returns=returns)[0]


def _scaled_sum(name, mode, batch, idx_parts, denom, processes):
    """One process's summed micro-batch losses, each scaled as PolicyTrainer._micro_loss does (width trimmed)."""
    total = 0.0
    for idx in idx_parts:
        mask = batch[4][idx]
        width = int(mask.sum(-1).max())
        parts = [x[idx, :width] for x in batch]
        loss = _terms(name, *parts, mode)
        _, scale = micro_batch_share(loss_units(parts[4], mode, agg_norm=NORM), denom, processes)
        total = total + loss * scale
    return total


@pytest.mark.parametrize("name", ["ppo", "gspo"])
@pytest.mark.parametrize("mode", MODES)
def test_accumulation_and_two_processes_give_the_whole_minibatch_loss(mode, name):
    batch = list(_minibatch())
    logp = batch[0].clone().requires_grad_()
    batch[0] = logp
    whole = _terms(name, *batch, mode)
    (g_whole,) = torch.autograd.grad(whole, logp)

    # The whole-minibatch policy term by plain loops (ppo only: its per-token loss has a closed form here).
    if name == "ppo":
        ratio = (batch[0] - batch[1]).detach().exp()
        adv = batch[3]
        per_tok = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.9, 1.15)).tolist()
        pg = _reference(mode, per_tok, batch[4].tolist())
        s = LossSettings(clip_low=0.1, clip_high=0.15, agg=mode, agg_norm=NORM)
        got = rl_loss(POLICY_LOSSES.get("ppo"), *batch[:2], batch[3], batch[4], s)[0]
        assert got.item() == pytest.approx(pg, rel=1e-12)

    # One process, 4 accumulated micro-batches of 2 rows.
    # float64 denominators: the shares are then exact to float64 (int64 / int64 would be float32).
    denom = loss_units(batch[4], mode, agg_norm=NORM).double()
    micro = [torch.arange(i, i + 2) for i in range(0, 8, 2)]
    acc = _scaled_sum(name, mode, batch, micro, denom, 1)
    assert acc.item() == pytest.approx(whole.item(), rel=1e-10)
    (g_acc,) = torch.autograd.grad(acc, logp)
    torch.testing.assert_close(g_acc, g_whole)

    # Two processes of 4 rows, 2 micro-batches each: global denominator = both processes' units; DDP averages.
    procs = [[torch.arange(0, 2), torch.arange(2, 4)], [torch.arange(4, 6), torch.arange(6, 8)]]
    denom = sum(loss_units(batch[4][torch.cat(p)], mode, agg_norm=NORM).double() for p in procs)
    averaged = sum(_scaled_sum(name, mode, batch, p, denom, 2) for p in procs) / 2
    assert averaged.item() == pytest.approx(whole.item(), rel=1e-10)
    (g_ddp,) = torch.autograd.grad(averaged, logp)
    torch.testing.assert_close(g_ddp, g_whole)


def test_modes_differ_on_a_ragged_batch():
    """The four modes are four different numbers here (so the tests above cannot pass by accident)."""
    loss, mask = _ragged()
    values = {round(aggregate(loss, mask, m, norm_len=NORM).item(), 9) for m in AGGREGATION_MODES}
    assert len(values) == 4


def test_seq_mean_alias_is_seq_mean_token_mean_in_rl_loss():
    logp, old, ref, adv, mask, values, old_values, returns = _minibatch()
    a = _terms("ppo", logp, old, ref, adv, mask, values, old_values, returns, "seq-mean")
    b = _terms("ppo", logp, old, ref, adv, mask, values, old_values, returns, "seq-mean-token-mean")
    assert torch.equal(a, b)


def test_dr_grpo_mode_is_token_sum_over_the_constant_for_every_term():
    logp, old, ref, adv, mask, values, old_values, returns = _minibatch()
    norm = _terms("ppo", logp, old, ref, adv, mask, values, old_values, returns, "seq-mean-token-sum-norm")
    tsum = _terms("ppo", logp, old, ref, adv, mask, values, old_values, returns, "seq-mean-token-sum")
    assert norm.item() == pytest.approx(tsum.item() / NORM, rel=1e-12)


# ----------------------------------------------------------------------------------------------------- GSPO
def _gspo_example(signs=(1.0, -1.0, 2.0)):
    # Row 0: log-ratios (0.3, -0.1) -> s0 = exp(0.1) = 1.105171; row 1: (-0.2) -> s1 = exp(-0.2) = 0.818731;
    # row 2: (0, 0, 0) -> s2 = 1. Padding holds a log-ratio of 1000 (exp overflows) and nan advantages.
    log_ratio = torch.tensor([[0.3, -0.1, 1000.0], [-0.2, 1000.0, 1000.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    old = torch.full((3, 3), -1.5, dtype=torch.float64)
    logp = (old + log_ratio).requires_grad_(True)
    a0, a1, a2 = signs
    adv = torch.tensor([[a0, a0, NAN], [a1, NAN, NAN], [a2, a2, a2]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    return logp, old, adv, mask


S0, S1 = math.exp(0.1), math.exp(-0.2)


@pytest.mark.parametrize("name", ["gspo", "gspo-token"])
def test_gspo_clips_the_sequence_ratio_on_both_sides(name):
    logp, old, adv, mask = _gspo_example((1.0, -1.0, 2.0))
    # clip range [0.95, 1.1]. Per sequence -min(s A, clip(s) A):
    #   row 0, A=+1: -min(1.105171, 1.1) = -1.1 (clipped above)
    #   row 1, A=-1: -min(-0.818731, -0.95) = 0.95 (clipped below)
    #   row 2, A=+2: s = 1 -> -2 (inside)
    loss, stats = POLICY_LOSSES.get(name)(logp, old, adv, mask, clip_low=0.05, clip_high=0.1,
                                          agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx((-1.1 + 0.95 - 2.0) / 3)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["ratio_mean"].item() == pytest.approx((S0 + S1 + 1.0) / 3)
    # token-mean puts each sequence's loss on its tokens: (2 * -1.1 + 0.95 + 3 * -2) / 6
    tm, _ = POLICY_LOSSES.get(name)(logp, old, adv, mask, clip_low=0.05, clip_high=0.1, agg="token-mean")
    assert tm.item() == pytest.approx((2 * -1.1 + 0.95 - 6.0) / 6)
    (grad,) = torch.autograd.grad(loss, logp)
    # The clipped rows get no gradient; row 2: -2 * s * (1/3 per token) * (1/3 per sequence) = -2/9 per token.
    expected = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-2 / 9] * 3], dtype=torch.float64)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("name", ["gspo", "gspo-token"])
def test_gspo_does_not_clip_when_the_advantage_sign_makes_the_ratio_harmless(name):
    logp, old, adv, mask = _gspo_example((-1.0, 1.0, 2.0))
    # row 0, A=-1: -min(-1.105171, -1.1) = 1.105171 (unclipped: a ratio above the range with A < 0 is not clipped)
    # row 1, A=+1: -min(0.818731, 0.95) = -0.818731 (unclipped)
    loss, stats = POLICY_LOSSES.get(name)(logp, old, adv, mask, clip_low=0.05, clip_high=0.1,
                                          agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx((S0 - S1 - 2.0) / 3)
    assert stats["clipfrac"].item() == 0.0
    (grad,) = torch.autograd.grad(loss, logp)
    # d s_i / d logp_t = s_i / |y_i|; each sequence weighs 1/3:
    #   row 0: loss = s0 -> s0 / 2 / 3; row 1: loss = -s1 -> -s1 / 3; row 2: -2/9 per token; padding 0.
    expected = torch.tensor([[S0 / 6, S0 / 6, 0.0], [-S1 / 3, 0.0, 0.0], [-2 / 9] * 3], dtype=torch.float64)
    torch.testing.assert_close(grad, expected)
    # approxkl is the token-level k3 over the 6 real tokens, as for "ppo"
    lr = [0.3, -0.1, -0.2, 0.0, 0.0, 0.0]
    assert stats["approxkl"].item() == pytest.approx(sum(math.exp(x) - 1 - x for x in lr) / 6)


@pytest.mark.parametrize("mode", MODES)
def test_gspo_and_gspo_token_have_equal_loss_and_gradient_for_constant_advantages(mode):
    g = torch.Generator().manual_seed(1)
    logp = (torch.randn(5, 7, generator=g, dtype=torch.float64) - 2).requires_grad_()
    old = logp.detach() + 0.01 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    mask = (torch.arange(7) < torch.tensor([7, 1, 4, 2, 6])[:, None]).long()
    adv = torch.randn(5, 1, generator=g, dtype=torch.float64).expand(5, 7).clone()
    out = {}
    s = LossSettings(clip_low=3e-3, clip_high=4e-3, agg=mode, agg_norm=NORM)  # through rl_loss: it holds the constant
    for name in ("gspo", "gspo-token"):
        loss, stats = rl_loss(POLICY_LOSSES.get(name), logp, old, adv, mask, s)
        (grad,) = torch.autograd.grad(loss, logp)
        out[name] = (loss, grad, stats["policy/clipfrac"])
    assert 0 < out["gspo"][2].item() < 1  # some sequences clip, some do not
    torch.testing.assert_close(out["gspo"][0], out["gspo-token"][0])
    torch.testing.assert_close(out["gspo"][1], out["gspo-token"][1])
    torch.testing.assert_close(out["gspo"][2], out["gspo-token"][2])
    assert out["gspo"][1][mask == 0].abs().sum() == 0


def test_gspo_token_uses_each_tokens_advantage():
    # One sequence, log-ratios (0, 0): s = 1, unclipped. Token advantages (1, 3).
    logp = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    old, mask = torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2)
    adv = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    grads = {}
    for name in ("gspo", "gspo-token"):
        loss, _ = POLICY_LOSSES.get(name)(logp, old, adv, mask, clip_low=3e-4, clip_high=4e-4, agg="token-mean")
        assert loss.item() == pytest.approx(-2.0)  # both: -(1 + 3)/2 in value
        (grads[name],) = torch.autograd.grad(loss, logp)
    # gspo: -A_seq * ∇s with A_seq = 2 and ∂s/∂logp_t = 1/2 -> (-1, -1); gspo-token: -A_t / 2 -> (-0.5, -1.5)
    torch.testing.assert_close(grads["gspo"], torch.tensor([[-1.0, -1.0]], dtype=torch.float64))
    torch.testing.assert_close(grads["gspo-token"], torch.tensor([[-0.5, -1.5]], dtype=torch.float64))


def test_gspo_ignores_padding_values():
    logp, old, adv, mask = _gspo_example()
    a, _ = POLICY_LOSSES.get("gspo")(logp, old, adv, mask, clip_low=0.05, clip_high=0.1, agg="token-mean")
    logp2 = torch.where(mask.bool(), logp.detach(), torch.tensor(-50.0, dtype=torch.float64))
    adv2 = torch.where(mask.bool(), adv, torch.tensor(123.0, dtype=torch.float64))
    b, _ = POLICY_LOSSES.get("gspo")(logp2, old, adv2, mask, clip_low=0.05, clip_high=0.1, agg="token-mean")
    assert torch.isfinite(a) and a.item() == b.item()


# ----------------------------------------------------------------------------------------------------- config
def test_config_accepts_the_new_modes_and_the_alias(tmp_path):
    for mode in MODES:
        cfg = validate_policy_config(compose_policy([f"trainer.loss_agg={mode}"], run_dir=str(tmp_path)))
        assert cfg.trainer.loss_agg == mode


def test_config_refuses_a_ppo_sized_clip_for_gspo(tmp_path):
    with pytest.raises(ConfigError) as e:
        validate_policy_config(compose_policy(["algorithm.policy_loss=gspo"], run_dir=str(tmp_path)))
    assert str(e.value).startswith("trainer.clip_low: algorithm.policy_loss=gspo clips a sequence-level ratio")
    for name in ("gspo", "gspo-token"):
        cfg = validate_policy_config(compose_policy([f"algorithm.policy_loss={name}", "trainer.clip_low=3e-4",
                                                     "trainer.clip_high=4e-4"], run_dir=str(tmp_path)))
        assert (cfg.trainer.clip_low, cfg.trainer.clip_high) == (3e-4, 4e-4)


@pytest.mark.parametrize("preset, loss, agg, std", [("gspo", "gspo", "seq-mean-token-mean", True),
                                                    ("dr_grpo", "ppo", "seq-mean-token-sum-norm", False)])
def test_recipe_presets_compose_and_train_two_steps(policy_cfg, preset, loss, agg, std):
    """algorithm=gspo / dr_grpo set the switches their papers name, and a run with them trains."""
    from rlhf.trainers.policy import PolicyTrainer

    cfg = policy_cfg(f"algorithm={preset}", "trainer.max_steps=2")
    assert (cfg.algorithm.policy_loss, cfg.trainer.loss_agg, cfg.algorithm.std_normalize) == (loss, agg, std)
    history = PolicyTrainer(cfg).train()
    assert [m["step"] for m in history] == [0, 1]
    assert all(math.isfinite(m["policy/loss"]) and m["policy/skipped_updates"] == 0 for m in history)
    assert history[1]["kl"] > 0  # the first update moved the policy
