"""Issue 16's switches beside the loss modes and GSPO: mismatch correction (algorithm.is_correction), the importance-
weighted KL loss (kl.loss_correction), DAPO's dynamic sampling (rollout.max_resample_rounds) and overlong shaping
(reward.overlong_buffer), the HF engine decoding in another dtype (rollout.hf.dtype), and the dapo preset."""

import math
import zlib

import pytest
import torch

from rlhf.core.correction import mismatch_weights
from rlhf.core.objectives import POLICY_LOSSES, kl_loss
from rlhf.rollout.dynamic import (
    concat_rollouts,
    fill_groups,
    informative_groups,
    overlong_buffer_tokens,
    overlong_penalty,
    select_rows,
)

E = math.e


# ---------------------------------------------------------------- mismatch weights
def _row():
    # log r = old - sampler = [1, 0, -1] on the real tokens; the 4th is padding (garbage log-probs).
    old = torch.tensor([[0.0, -1.0, -2.0, 5.0]])
    sampler = torch.tensor([[-1.0, -1.0, -1.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    return old, sampler, mask


@pytest.mark.parametrize("mode, expected, share", [
    # r = [e, 1, 1/e], C = 2
    ("none", [1.0, 1.0, 1.0, 0.0], 0.0),
    ("tis", [2.0, 1.0, 1 / E, 0.0], 1 / 3),           # min(r, 2): only e is truncated
    ("mis", [0.0, 1.0, 0.0, 0.0], 2 / 3),             # e > 2 and 1/e < 1/2 leave [1/2, 2]: dropped
    ("seq-tis", [1.0, 1.0, 1.0, 0.0], 0.0),           # geometric mean exp((1 + 0 - 1) / 3) = 1 on every token
    ("seq-mis", [1.0, 1.0, 1.0, 0.0], 0.0),
])
def test_mismatch_weights_by_hand(mode, expected, share):
    w, stats = mismatch_weights(*_row(), mode, cap=2.0)
    assert w.tolist()[0] == pytest.approx(expected)
    assert stats["share_corrected"].item() == pytest.approx(share)
    assert stats["weight_mean"].item() == pytest.approx(sum(expected) / 3)
    assert not w.requires_grad


def test_sequence_weights_use_the_geometric_mean():
    """log r = [1, 1] (2 tokens): the product e^2 = 7.39 would be far above C = 2, the geometric mean e = 2.718 is
    just above it: seq-tis gives min(e, 2) = 2 on both tokens, seq-mis drops the sequence; a sequence of log r = [0.5]
    (g = 1.65, inside [1/2, 2]) keeps its weight g under both."""
    old = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    sampler = torch.tensor([[-1.0, -1.0], [-0.5, 3.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    tis, _ = mismatch_weights(old, sampler, mask, "seq-tis", 2.0)
    mis, stats = mismatch_weights(old, sampler, mask, "seq-mis", 2.0)
    g = math.exp(0.5)
    torch.testing.assert_close(tis, torch.tensor([[2.0, 2.0], [g, 0.0]]))
    torch.testing.assert_close(mis, torch.tensor([[0.0, 0.0], [g, 0.0]]))
    assert stats["share_corrected"].item() == pytest.approx(2 / 3)  # 2 of the 3 real tokens dropped


def test_bad_modes_and_caps_are_refused():
    with pytest.raises(ValueError, match="unknown is_correction 'icepop'"):
        mismatch_weights(*_row(), "icepop", 2.0)
    with pytest.raises(ValueError, match="is_cap must be > 1"):
        mismatch_weights(*_row(), "tis", 1.0)


def test_scaling_advantages_is_weighting_each_tokens_ppo_loss():
    """The trainer applies the weights to the advantages; for the clipped surrogate with w >= 0 that is the per-token
    loss times w: max(-A w r, -A w clip(r)) = w max(-A r, -A clip(r)). Reference: the formula in a plain loop."""
    g = torch.Generator().manual_seed(0)
    logp, old = torch.randn(3, 5, generator=g) * 0.3, torch.randn(3, 5, generator=g) * 0.3
    adv = torch.randn(3, 5, generator=g)
    w = torch.rand(3, 5, generator=g) * 2
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    loss, _ = POLICY_LOSSES.get("ppo")(logp, old, adv * w, mask, clip_low=0.2, clip_high=0.2, agg="token-mean")
    total = 0.0
    for i in range(3):
        for t in range(5):
            if mask[i, t]:
                r = math.exp(logp[i, t] - old[i, t])
                a = adv[i, t].item()
                total += w[i, t].item() * max(-a * r, -a * min(max(r, 0.8), 1.2))
    assert loss.item() == pytest.approx(total / mask.sum().item(), rel=1e-5)


# ---------------------------------------------------------------- importance-weighted KL loss
def _categorical():
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(6, generator=g, dtype=torch.float64).requires_grad_()
    old = torch.randn(6, generator=g, dtype=torch.float64).log_softmax(-1)  # pi_old != pi: mid-step, off-policy
    ref = torch.randn(6, generator=g, dtype=torch.float64).log_softmax(-1)
    return theta, old, ref


def _expected_grad(theta, old, ref, estimator, correct):
    """E_{x ~ pi_old}[grad loss(x)], exactly: every token x of the vocabulary as a one-token response, weighted by
    pi_old(x) (no sampling)."""
    logp = theta.log_softmax(-1)
    total = 0.0
    for x in range(theta.numel()):
        row = lambda v, x=x: v[x].reshape(1, 1)  # noqa: E731
        loss = kl_loss(row(logp), row(ref), torch.ones(1, 1), estimator, "token-mean",
                       old_logp=row(old) if correct else None)
        total = total + old[x].exp() * loss
    (grad,) = torch.autograd.grad(total, theta)
    return grad


def _true_kl_grad(theta, ref, reverse=False):
    """The gradient of the exact KL(pi || ref) = sum pi (log pi - log ref), or of KL(ref || pi) with reverse."""
    logp = theta.log_softmax(-1)
    kl = (ref.exp() * (ref - logp)).sum() if reverse else (logp.exp() * (logp - ref)).sum()
    (grad,) = torch.autograd.grad(kl, theta)
    return grad


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_importance_weighted_kl_loss_has_the_exact_kl_gradient(estimator):
    theta, old, ref = _categorical()
    exact = _true_kl_grad(theta, ref)
    torch.testing.assert_close(_expected_grad(theta, old, ref, estimator, correct=True), exact)
    # Uncorrected, the same samples from pi_old give another gradient: the bias the correction removes.
    assert (_expected_grad(theta, old, ref, estimator, correct=False) - exact).abs().max() > 1e-2


def test_plain_k3_loss_on_policy_follows_the_reverse_kl():
    """With pi_old = pi (the first minibatch of a step), plain k3's expected gradient is that of KL(ref || pi), not of
    KL(pi || ref): grad k3 = (1 - ref/pi) grad log pi, and E_pi of that is -sum ref grad log pi."""
    theta, _, ref = _categorical()
    on_policy = theta.detach().log_softmax(-1)
    torch.testing.assert_close(_expected_grad(theta, on_policy, ref, "k3", correct=False),
                               _true_kl_grad(theta, ref, reverse=True))
    torch.testing.assert_close(_expected_grad(theta, on_policy, ref, "k3", correct=True), _true_kl_grad(theta, ref))


def test_importance_weighted_k2_is_refused():
    theta, old, ref = _categorical()
    with pytest.raises(ValueError, match="needs kl.estimator k1 or k3"):
        _expected_grad(theta, old, ref, "k2", correct=True)


# ---------------------------------------------------------------- dynamic sampling and overlong shaping
def test_informative_groups_and_fill_order():
    # K = 2: groups (1, 1) equal, (0, 1) differ, (2, 2) equal
    flags = informative_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), 2)
    assert flags.tolist() == [False, True, False]
    # round 0: [F, T, F], round 1: [T, F]; target 3 -> informative 1, 3 first, then the first filler 0
    groups, fillers = fill_groups([flags, torch.tensor([True, False])], 3)
    assert groups.tolist() == [0, 1, 3] and fillers == 1
    groups, fillers = fill_groups([flags, torch.tensor([True, True])], 3)
    assert groups.tolist() == [1, 3, 4] and fillers == 0
    with pytest.raises(ValueError, match="fewer than the 6"):
        fill_groups([flags], 6)


def test_concat_and_select_keep_rows_aligned():
    from rlhf.rollout.batch import Rollout

    def part(q_len, r_len, base):
        q = torch.full((2, q_len), base)
        r = torch.full((2, r_len), base + 1)
        ones = lambda x: torch.ones_like(x)  # noqa: E731
        return Rollout(q, ones(q), r, ones(r), None, None, None, torch.tensor([base, base + 0.5]), None, r.float())

    ro = concat_rollouts([part(2, 3, 10), part(3, 1, 20)], pad_token_id=0)
    assert ro.query_ids.tolist() == [[0, 10, 10], [0, 10, 10], [20, 20, 20], [20, 20, 20]]  # left-padded
    assert ro.response_mask.tolist() == [[1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 0, 0]]     # right-padded
    assert ro.scores.tolist() == [10, 10.5, 20, 20.5] and ro.logprobs is None
    sel = select_rows(ro, torch.tensor([2, 3]))
    assert sel.response_ids.tolist() == [[21], [21]] and sel.query_ids.shape == (2, 3)
    assert sel.sampler_logprobs.tolist() == [[21.0], [21.0]] and sel.scores.tolist() == [20, 20.5]


def test_overlong_penalty_by_hand():
    # cap 10, buffer 4: no penalty up to length 6, then (6 - L) / 4: L = 8 -> -0.5, L = 10 -> -1; factor 2 doubles
    lengths = torch.tensor([3, 6, 7, 8, 10])
    assert overlong_penalty(lengths, 10, 4).tolist() == pytest.approx([0, 0, -0.25, -0.5, -1.0])
    assert overlong_penalty(lengths, 10, 4, factor=2.0).tolist() == pytest.approx([0, 0, -0.5, -1.0, -2.0])
    assert overlong_penalty(lengths, 10, 0).tolist() == [0.0] * 5
    # a share rounds to tokens (0.2 of 12 = 2.4 -> 2), an int is tokens, and nonsense is refused
    assert [overlong_buffer_tokens(b, 12) for b in (None, 0, 0.2, 3)] == [0, 0, 2, 3]
    for bad in (13, 1.5, -1):
        with pytest.raises(ValueError, match="reward.overlong_buffer"):
            overlong_buffer_tokens(bad, 12)


def half_constant_reward(prompts, completions):
    """Half the prompts (by a stable hash) score 0 whatever the completion: their groups are uninformative. The others
    score the completion's length in characters, which differs between samples."""
    return [0.0 if zlib.crc32(p.encode()) % 2 else float(len(c)) for p, c in zip(prompts, completions)]


def constant_reward(prompts, completions):
    return [1.0] * len(completions)


def test_dynamic_sampling_fills_the_batch_with_informative_groups(policy_cfg):
    from rlhf.trainers.policy import PolicyTrainer

    trainer = PolicyTrainer(policy_cfg("reward.function=tests.test_po_options.half_constant_reward",
                                       "rollout.max_resample_rounds=4", "rollout.prompts_per_step=8",
                                       "trainer.max_steps=1"))
    prompts, ro, scored, sampled = trainer.sample(0)
    k = trainer.cfg.rollout.samples_per_prompt
    assert len(prompts) == 8 and ro.response_ids.shape[0] == 8 * k and len(scored.completions) == 8 * k
    assert informative_groups(scored.total, k).all()
    # The rows stay together: each score is the reward of its own prompt and completion.
    expected = half_constant_reward([p for p in prompts for _ in range(k)], scored.completions)
    assert scored.total.tolist() == pytest.approx(expected)
    assert torch.equal(ro.scores, torch.zeros(8 * k))  # the trainer puts the scores in after
    d = sampled.drawn
    assert d["dynamic/filler_groups"] == 0 and d["dynamic/rounds"] >= 2
    assert 0 < d["dynamic/uninformative_first"] < 1
    assert d["dynamic/generations"] == d["dynamic/rounds"] * 8 * k
    (m,) = trainer.train()
    assert m["dynamic/filler_groups"] == 0 and math.isfinite(m["policy/loss"])


def test_dynamic_sampling_with_nothing_to_learn_fills_and_says_so(policy_cfg):
    from rlhf.trainers.policy import PolicyTrainer

    trainer = PolicyTrainer(policy_cfg("reward.function=tests.test_po_options.constant_reward",
                                       "rollout.max_resample_rounds=2", "trainer.max_steps=1"))
    (m,) = trainer.train()
    # 3 rounds of 4 prompts, all uninformative: 4 fill the batch, 8 were dropped
    assert (m["dynamic/rounds"], m["dynamic/filler_groups"], m["dynamic/dropped_groups"]) == (3, 4, 8)
    assert m["dynamic/uninformative_first"] == 1.0 and m["dynamic/generations"] == 3 * 4 * 2


# ---------------------------------------------------------------- the trainer with each switch
def test_bf16_sampler_beside_float32_trainer_shows_and_corrects_a_mismatch(policy_cfg):
    """rollout.hf.dtype=bfloat16 decodes with a bf16 copy of the float32 policy: the engine's log-probs of its own
    samples differ from the trainer's by the rounding, so the logged mismatch KL is not 0; tis trains on it."""
    from rlhf.trainers.policy import PolicyTrainer

    trainer = PolicyTrainer(policy_cfg("rollout.hf.dtype=bfloat16", "algorithm.is_correction=tis",
                                       "algorithm.is_cap=1.001", "trainer.max_steps=2"))
    assert next(trainer.engine.policy.parameters()).dtype == torch.bfloat16
    hist = trainer.train()
    for m in hist:
        assert m["mismatch/kl_k3"] > 1e-9 and m["mismatch/ratio_max"] > 1.0001
        assert 0 < m["mismatch/is_weight_mean"] and math.isfinite(m["policy/loss"])
    # Each step's sync copies the trained float32 weights into the same bf16 copy (made once).
    copy = trainer.engine.policy
    trainer.engine.sync_weights(trainer.policy)
    assert trainer.engine.policy is copy
    for mine, theirs in zip(copy.parameters(), trainer.policy.parameters()):
        torch.testing.assert_close(mine.float(), theirs.detach().to(torch.bfloat16).float())


def test_hf_dtype_copy_is_refused_where_weights_are_sharded():
    from rlhf.config import ConfigError
    from rlhf.rollout.engines import check_backend

    check_backend("hf", "ddp", {"dtype": torch.bfloat16})
    with pytest.raises(ConfigError, match="rollout.hf.dtype: .* fsdp2 shards"):
        check_backend("hf", "fsdp2", {"dtype": torch.bfloat16})


def test_kl_loss_correction_changes_only_the_kl_term(policy_cfg):
    """algorithm=grpo (KL as a k3 loss) with and without kl.loss_correction=is: the same samples and scores at step 0
    (the correction acts in the update), and a KL loss that differs once the policy moved (ppo_epochs=2)."""
    from rlhf.trainers.policy import PolicyTrainer

    runs = [PolicyTrainer(policy_cfg("algorithm=grpo", "trainer.ppo_epochs=2", f"kl.loss_correction={c}",
                                     "trainer.max_steps=2")).train() for c in ("none", "is")]
    assert runs[0][0]["score"] == runs[1][0]["score"]
    assert runs[0][1]["policy/kl_loss"] != runs[1][1]["policy/kl_loss"]


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.is_correction=icepop"], "algorithm.is_correction"),
    (["algorithm.is_cap=1"], "algorithm.is_cap: must be > 1"),
    (["kl.loss_correction=is"], "kl.loss_correction: corrects the KL loss term"),
    (["algorithm=grpo", "kl.loss_correction=is", "kl.estimator=k2"], "kl.loss_correction: =is needs kl.estimator"),
    (["rollout.max_resample_rounds=-1"], "rollout.max_resample_rounds: must be >= 0"),
    (["rollout.max_resample_rounds=2", "rollout.samples_per_prompt=1", "algorithm=reinforce_pp"],
     "rollout.max_resample_rounds: dynamic sampling"),
    (["reward.overlong_buffer=100"], "reward.overlong_buffer"),
    (["rollout.hf.dtype=float8"], "rollout.hf.dtype"),
])
def test_bad_switches_are_one_line_errors(policy_cfg, overrides, message):
    from rlhf.config import ConfigError

    with pytest.raises(ConfigError, match=message) as e:
        policy_cfg(*overrides)
    assert "\n" not in str(e.value)


def test_dapo_preset_composes_and_trains(policy_cfg):
    from rlhf.trainers.policy import PolicyTrainer

    cfg = policy_cfg("algorithm=dapo", "trainer.max_steps=2")
    assert (cfg.trainer.clip_high, cfg.trainer.loss_agg, cfg.kl.beta) == (0.28, "token-mean", 0.0)
    trainer = PolicyTrainer(cfg)
    assert trainer.models.reference is None and trainer.overlong_buffer == 1  # 0.2 x 6 tokens = 1.2 -> 1
    hist = trainer.train()
    assert len(hist) == 2 and all(math.isfinite(m["policy/loss"]) for m in hist)
    assert {"dynamic/rounds", "score/overlong"} <= set(hist[0])
