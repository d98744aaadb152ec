"""The distributed backend's loss-scaling math, by hand, and its single-process behaviour.

The multi-process behaviour (DDP, FSDP2 on gloo) is exercised end to end in test_distributed.py; here the two pure
functions that make 2 processes train what 1 process trains are checked on numbers worked out in comments.
"""

import pytest
import torch
from accelerate import Accelerator

from rlhf.runtime.backend import DistributedBackend, micro_batch_share, process_weight


def test_micro_batch_share_rescales_a_local_mean_to_the_global_one():
    """Two processes, one minibatch of 10 tokens: rank 0 holds 4 tokens with losses summing to 8 (local mean 2),
    rank 1 holds 6 summing to 3 (local mean 0.5). The global mean is (8 + 3) / 10 = 1.1.
    Rank 0: share 4/10, scale 2 * 0.4 = 0.8, scaled loss 1.6; rank 1: share 0.6, scale 1.2, scaled loss 0.6.
    DDP averages: (1.6 + 0.6) / 2 = 1.1."""
    total = torch.tensor(10.0)
    share0, scale0 = micro_batch_share(torch.tensor(4), total, 2)
    share1, scale1 = micro_batch_share(torch.tensor(6), total, 2)
    assert (share0.item(), share1.item()) == pytest.approx((0.4, 0.6))
    assert (scale0.item(), scale1.item()) == pytest.approx((0.8, 1.2))
    assert ((2.0 * scale0 + 0.5 * scale1) / 2).item() == pytest.approx(1.1)


def test_micro_batch_share_sums_to_one_over_accumulated_micro_batches():
    """One process, a minibatch of 3 micro-batches with 2, 5 and 3 tokens: shares 0.2, 0.5, 0.3 add up to 1, so the
    summed gradient is that of the minibatch-wide mean."""
    total = torch.tensor(10.0)
    shares = [micro_batch_share(torch.tensor(n), total, 1)[0].item() for n in (2, 5, 3)]
    assert shares == pytest.approx([0.2, 0.5, 0.3]) and sum(shares) == pytest.approx(1.0)


def test_process_weight_makes_the_ddp_average_the_global_mean():
    """Rank 0 averaged its loss over 3 units (mean 1.0), rank 1 over 1 unit (mean 5.0); the mean over all 4 units
    is (3 * 1 + 1 * 5) / 4 = 2. Weights W * u / U: 2 * 3/4 = 1.5 and 2 * 1/4 = 0.5; (1.5 * 1 + 0.5 * 5) / 2 = 2."""
    total = torch.tensor(4.0)
    w0, w1 = process_weight(torch.tensor(3.0), total, 2), process_weight(torch.tensor(1.0), total, 2)
    assert (w0.item(), w1.item()) == (1.5, 0.5)
    assert ((w0 * 1.0 + w1 * 5.0) / 2).item() == 2.0
    assert process_weight(torch.tensor(0.0), torch.tensor(0.0), 2).item() == 0.0  # no units anywhere: no NaN


def test_one_process_is_the_identity_backend():
    b = DistributedBackend(Accelerator(cpu=True))
    assert (b.kind, b.num_processes, b.process_index, b.is_main) == ("single", 1, 0, True)
    assert b.is_fsdp2 is False and b.zero_stage is None and b.synced_gpus is None
    assert b.any(True) is True and b.any(False) is False
    assert b.from_main({"a": 1}) == {"a": 1}
    x = torch.arange(6.0).reshape(2, 3)
    assert b.gather_rows(x, 5) is x  # one process: nothing to pad or gather
    assert b.sum(x) is x and b.mean(x) is x
    assert b.global_count(torch.tensor(7)).item() == 7.0
    assert b.process_weight(torch.tensor(37.0)).item() == 1.0
    assert b.describe() == "NO"
