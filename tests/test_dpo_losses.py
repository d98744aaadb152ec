"""DPO-family losses (rlhf.core.dpo): values by hand, cDPO against torch's binary cross-entropy, gradients by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf.core.dpo import DPO_LOSSES, PairLogps, margin, pair_metrics


def pairs(pc, pr, rc, rr, requires_grad=False):
    t = [torch.tensor(v, dtype=torch.float64, requires_grad=requires_grad) for v in (pc, pr, rc, rr)]
    return PairLogps(*t)


# Pair 0: policy chosen -1, rejected -3, reference -2 and -2: h = (-1 + 2) - (-3 + 2) = 2.
# Pair 1: policy -4 / -2, reference -3 / -3: h = (-4 + 3) - (-2 + 3) = -2.
LOGPS = pairs([-1.0, -4.0], [-3.0, -2.0], [-2.0, -3.0], [-2.0, -3.0])
BETA = 0.1


def test_margin_by_hand():
    assert margin(LOGPS).tolist() == [2.0, -2.0]


def test_sigmoid_is_dpo():
    # -log sigmoid(z) = log(1 + e^-z), z = beta h = 0.2 and -0.2
    loss = DPO_LOSSES.get("sigmoid")(LOGPS, BETA)
    assert loss.tolist() == pytest.approx([math.log1p(math.exp(-0.2)), math.log1p(math.exp(0.2))], abs=1e-12)


def test_conservative_dpo_is_cross_entropy_against_smoothed_labels():
    eps = 0.1
    loss = DPO_LOSSES.get("sigmoid")(LOGPS, BETA, label_smoothing=eps)
    # by hand for pair 0: 0.9 log(1 + e^-0.2) + 0.1 log(1 + e^0.2)
    assert loss[0].item() == pytest.approx(0.9 * math.log1p(math.exp(-0.2)) + 0.1 * math.log1p(math.exp(0.2)))
    # reference: torch's BCE of the logit beta * h against the label 1 - eps
    ref = F.binary_cross_entropy_with_logits(BETA * margin(LOGPS), torch.full((2,), 1 - eps, dtype=torch.float64),
                                             reduction="none")
    torch.testing.assert_close(loss, ref)


def test_hinge_and_ipo_by_hand():
    # hinge: max(0, 1 - 0.1 * 2) = 0.8, max(0, 1 + 0.2) = 1.2; and 0 once beta h >= 1 (h = 20 here)
    assert DPO_LOSSES.get("hinge")(LOGPS, BETA).tolist() == pytest.approx([0.8, 1.2])
    assert DPO_LOSSES.get("hinge")(pairs([9.0], [-11.0], [0.0], [0.0]), BETA).item() == 0.0
    # ipo: (h - 1 / (2 * 0.1))^2 = (2 - 5)^2 = 9 and (-2 - 5)^2 = 49; its minimum is at h = 5, not at infinity
    assert DPO_LOSSES.get("ipo")(LOGPS, BETA).tolist() == pytest.approx([9.0, 49.0])
    assert DPO_LOSSES.get("ipo")(pairs([5.0], [0.0], [0.0], [0.0]), BETA).item() == 0.0


def test_gradients_by_hand():
    # d/d log pi(y_w) of -log sigmoid(beta h) is -beta * sigmoid(-beta h); of log pi(y_l) the opposite;
    # the reference gets none (it is a constant of the loss: its tensors do not require grad)
    logps = pairs([-1.0], [-3.0], [-2.0], [-2.0], requires_grad=False)
    pc, pr = logps.policy_chosen.clone().requires_grad_(), logps.policy_rejected.clone().requires_grad_()
    loss = DPO_LOSSES.get("sigmoid")(logps._replace(policy_chosen=pc, policy_rejected=pr), BETA).sum()
    loss.backward()
    s = 1 / (1 + math.exp(0.2))  # sigmoid(-0.2)
    assert pc.grad.item() == pytest.approx(-BETA * s) and pr.grad.item() == pytest.approx(BETA * s)
    # ipo: d/d log pi(y_w) of (h - 5)^2 = 2 (h - 5) = -6 at h = 2
    pc.grad = None
    DPO_LOSSES.get("ipo")(logps._replace(policy_chosen=pc), BETA).sum().backward()
    assert pc.grad.item() == pytest.approx(-6.0)


def test_metrics_by_hand():
    m = pair_metrics(LOGPS, BETA)
    # implicit rewards 0.1 * (policy - reference): chosen 0.1, -0.1; rejected -0.1, 0.1
    assert m["rewards/chosen"] == pytest.approx(0.0) and m["rewards/rejected"] == pytest.approx(0.0)
    assert m["rewards/margin"] == pytest.approx(0.0)  # margins +0.2 and -0.2
    assert m["rewards/accuracy"] == 0.5  # pair 0 right, pair 1 wrong
    assert m["logps/chosen"] == -2.5 and m["logps/rejected"] == -2.5
    # a tie (h = 0) is not counted as right
    assert pair_metrics(pairs([-1.0], [-1.0], [-1.0], [-1.0]), BETA)["rewards/accuracy"] == 0.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPO_LOSSES.get("sigmoid")(LOGPS, 0.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        DPO_LOSSES.get("sigmoid")(LOGPS, BETA, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing applies to the sigmoid loss only"):
        DPO_LOSSES.get("ipo")(LOGPS, BETA, label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"ref_rejected must be \(batch,\)"):
        DPO_LOSSES.get("hinge")(LOGPS._replace(ref_rejected=torch.zeros(3, dtype=torch.float64)), BETA)
    with pytest.raises(KeyError, match="unknown DPO loss 'kto'; valid names: hinge, ipo, sigmoid"):
        DPO_LOSSES.get("kto")
