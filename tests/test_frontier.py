"""rlhf.analysis.frontier: where a policy sits on the gold-vs-KL frontier, from its own samples. The summed k1 against
hand values, means and standard errors over prompts, exactly 0 KL for policy == reference, the gold score of the
decoded samples, samples that do not depend on how the prompts are split, and the KL estimate against the exact
one-token KL computed from the logits."""

import math

import pytest
import torch

from rlhf.analysis.frontier import FRONTIER_STREAM, frontier_metrics, prompt_means, sequence_kl
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.rollout.batch import decode_responses
from rlhf.rollout.hf import sample
from rlhf.rollout.sampling import row_keys
from rlhf.rollout.spec import SamplingSpec
from rlhf.tasks.sentiment import gold_fn, make_prompts

SPEC = SamplingSpec(temperature=1.0, max_new_tokens=6, sampler="counter")


def test_sequence_kl_sums_the_masked_differences_only():
    logp = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-0.5, -1.0, -2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # row 0: (-1 + 1.5) + (-2 + 1) = -0.5, the -inf at the masked position counts for nothing
    # row 1: 0 + 0.5 + 1.5 = 2.0
    assert sequence_kl(logp, ref, mask).tolist() == [-0.5, 2.0]
    with pytest.raises(ValueError, match="must be"):
        sequence_kl(logp, ref[:, :2], mask)


def test_frontier_metrics_are_means_and_standard_errors_over_prompts():
    per_prompt = torch.tensor([[1.0, 0.5, 4.0], [3.0, -0.5, 6.0], [5.0, 0.0, 8.0]])
    m = frontier_metrics(per_prompt)
    # kl: mean 3, sample std of (1, 3, 5) = 2, se = 2 / sqrt(3); gold: mean 0, std 0.5, se = 0.5 / sqrt(3)
    assert m["frontier/kl"] == pytest.approx(3.0) and m["frontier/kl_se"] == pytest.approx(2 / math.sqrt(3))
    assert m["frontier/gold_score"] == pytest.approx(0.0, abs=1e-12)
    assert m["frontier/gold_se"] == pytest.approx(0.5 / math.sqrt(3))
    assert m["frontier/length"] == pytest.approx(6.0)
    no_gold = frontier_metrics(torch.tensor([[1.0, math.nan, 2.0], [2.0, math.nan, 2.0]]))
    assert "frontier/gold_score" not in no_gold and no_gold["frontier/kl"] == pytest.approx(1.5)


@pytest.fixture(scope="module")
def models():
    tok = load_tokenizer("builtin:words")
    policy = load_causal_lm("builtin:tiny", tok, seed=0).eval()
    other = load_causal_lm("builtin:tiny", tok, seed=1).eval()
    return tok, policy, other


def test_policy_equal_to_reference_has_exactly_zero_kl_and_the_gold_of_its_samples(models):
    tok, policy, _ = models
    prompts = make_prompts(4, seed=0, split="test")
    got = prompt_means(policy, policy, tok, prompts, list(range(4)), SPEC, samples=3, seed=7, gold_fn=gold_fn)
    assert got[:, 0].tolist() == [0.0] * 4  # every k1 term is log p - log p of the same bits
    # The gold and lengths by hand: the same rows, keyed (seed, FRONTIER_STREAM, prompt * 3 + j), scored one by one
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    q_ids, q_mask = enc["input_ids"].repeat_interleave(3, 0), enc["attention_mask"].repeat_interleave(3, 0)
    r_ids, r_mask, _ = sample(policy, q_ids, q_mask, tok, SPEC, row_keys=row_keys(7, FRONTIER_STREAM,
                                                                                   torch.arange(12)))
    texts = decode_responses(tok, r_ids, r_mask)
    for i in range(4):
        golds = [gold_fn([prompts[i]], [texts[3 * i + j]])[0] for j in range(3)]
        assert got[i, 1].item() == pytest.approx(sum(golds) / 3, abs=1e-6)
        assert got[i, 2].item() == pytest.approx(float(r_mask[3 * i:3 * i + 3].sum()) / 3)
    assert any(len(t.split()) > 0 for t in texts)


def test_samples_do_not_depend_on_how_the_prompts_are_split(models):
    """A process measuring every other prompt (ids 0, 2, 4 / 1, 3, 5) draws what one process measuring all draws."""
    tok, policy, other = models
    prompts = make_prompts(6, seed=1, split="test")
    whole = prompt_means(policy, other, tok, prompts, list(range(6)), SPEC, samples=2, seed=3, gold_fn=gold_fn,
                         batch_size=4)
    for rank in (0, 1):
        ids = list(range(rank, 6, 2))
        part = prompt_means(policy, other, tok, [prompts[i] for i in ids], ids, SPEC, samples=2, seed=3,
                            gold_fn=gold_fn, batch_size=2)
        torch.testing.assert_close(part, whole[ids], rtol=1e-5, atol=1e-5)


def test_mean_summed_k1_estimates_the_exact_kl_of_one_token(models):
    """With one new token, the summed k1 of a sample is log pi(y) - log pi_ref(y) of that token, so its mean over n
    samples estimates KL(pi || pi_ref) = sum_y pi(y) (log pi(y) - log pi_ref(y)) of the next-token distributions,
    computed here from the two models' logits at the sampling temperature (0.25: two random-init models are near
    uniform, and tempering sharpens them into a KL worth estimating). 4000 samples: within 5 standard errors."""
    tok, policy, other = models
    spec = SamplingSpec(temperature=0.25, max_new_tokens=1, sampler="counter")
    prompt = make_prompts(1, seed=2, split="test")
    n = 4000
    got = prompt_means(policy, other, tok, prompt * n, list(range(n)), spec, samples=1, seed=0, gold_fn=None,
                       batch_size=1000)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(policy(ids).logits[0, -1].double() / 0.25, -1)
        logq = torch.log_softmax(other(ids).logits[0, -1].double() / 0.25, -1)
    exact = float((logp.exp() * (logp - logq)).sum())
    per_sample = got[:, 0].double()
    se = float(per_sample.std() / math.sqrt(n))
    assert exact > 0.2  # a KL worth estimating
    assert abs(float(per_sample.mean()) - exact) < 5 * se, (float(per_sample.mean()), exact, se)
    assert torch.isnan(got[:, 1]).all()  # no gold function: nan, and frontier_metrics leaves gold out
