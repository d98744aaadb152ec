"""Sampler-vs-trainer mismatch: the rollout engine's own log-probs of the tokens it drew against the trainer's.

rlhf.core.kl.sampler_mismatch is checked by hand; then the trainer logs ``mismatch/*`` every step: with identical
numerics (the HF engine and the trainer both in float32) the KL is 0 to float precision, and with a real mismatch
(bf16 autocast in the trainer's forward while the engine decodes in float32) it is not.
"""

import math

import pytest
import torch

from rlhf.core.kl import sampler_mismatch


def test_mismatch_statistics_by_hand():
    """Token 1: log pi_trainer = -1, log pi_sampler = -1.5, so log r = 0.5: k1 = -0.5, ratio = e^0.5 = 1.6487,
    k3 = e^0.5 - 1 - 0.5 = 0.1487. Token 2 agrees (all 0, ratio 1). Token 3 is padding: 0 whatever its log-probs."""
    trainer = torch.tensor([[-1.0, -2.0, float("-inf")]])
    sampler = torch.tensor([[-1.5, -2.0, 3.0]])
    mask = torch.tensor([[1, 1, 0]])
    m = sampler_mismatch(trainer, sampler, mask)
    assert m["k1"].tolist()[0] == pytest.approx([-0.5, 0.0, 0.0])
    assert m["ratio"].tolist()[0] == pytest.approx([math.exp(0.5), 1.0, 0.0])
    assert m["k3"].tolist()[0] == pytest.approx([math.exp(0.5) - 1.5, 0.0, 0.0])
    assert all(torch.isfinite(v).all() for v in m.values())


def test_k3_is_never_negative_and_zero_only_when_the_two_agree():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = torch.ones(4, 6)
    assert (sampler_mismatch(a, b, mask)["k3"] > 0).all()
    assert sampler_mismatch(a, a, mask)["k3"].abs().max() == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_trainer_logs_the_mismatch_of_its_engine(policy_cfg, dtype):
    from rlhf.trainers.policy import PolicyTrainer

    (m,) = PolicyTrainer(policy_cfg("trainer.max_steps=1", f"model.dtype={dtype}", "rollout.prompts_per_step=16",
                                    "rollout.max_new_tokens=12")).train()
    assert {"mismatch/kl_k1", "mismatch/kl_k3", "mismatch/ratio_mean", "mismatch/ratio_max"} <= set(m)
    if dtype == "float32":  # the same float32 model scored twice: kernels differ, distributions do not
        assert abs(m["mismatch/kl_k1"]) < 1e-5 and m["mismatch/kl_k3"] < 1e-8
        assert m["mismatch/ratio_max"] == pytest.approx(1.0, abs=1e-4)
    else:  # bf16 rounding differs between the cached decode and the full forward: a real, measurable mismatch
        assert m["mismatch/kl_k3"] > 1e-9 and m["mismatch/ratio_max"] > 1.0001
