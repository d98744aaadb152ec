"""Counter-based sampling (rlhf.rollout.sampling): a pure hash, exact inverse-CDF draws, and samples that do not depend on
how the batch is split, which is what makes 2 processes sample what 1 process samples."""

import pytest
import torch

from rlhf.rollout.sampling import (
    CounterSampler,
    counter_uniform,
    inverse_cdf_sample,
    minibatch_rows,
    mix32,
    row_keys,
)


def _mueller_by_hand(x: int) -> int:
    """Thomas Mueller's 32-bit finaliser, three multiply rounds, in plain Python integers."""
    x &= 0xFFFFFFFF
    for _ in range(3):
        x ^= x >> 16
        x = (x * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_mix32_is_the_reference_hash_without_overflow():
    # Includes the largest 32-bit value: (2**32 - 1) * 0x45d9f3b < 2**63, so int64 lanes never overflow.
    xs = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
    got = mix32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [_mueller_by_hand(x) for x in xs]
    assert all(0 <= g < 2 ** 32 for g in got)


def test_uniforms_are_uniform_and_distinct():
    keys = row_keys(0, 0, torch.arange(20_000))
    u = torch.cat([counter_uniform(keys, t) for t in range(5)])  # 100k values
    assert 0 < u.min() and u.max() < 1
    # Mean 1/2 and variance 1/12 of U(0,1); standard errors sqrt(1/12/1e5) ~ 9e-4 and ~ 2.7e-4.
    assert u.mean().item() == pytest.approx(0.5, abs=4e-3)
    assert u.var().item() == pytest.approx(1 / 12, abs=1.5e-3)
    # 53-bit values: any repeat among 1e5 would mean two (row, position) counters share a stream.
    assert u.unique().numel() == u.numel()
    # Neighbouring rows and positions are not correlated (|r| ~ 1/sqrt(n) = 0.007 by chance).
    a, b = counter_uniform(keys, 0), counter_uniform(keys, 1)
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.03
    assert abs(torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1].item()) < 0.03


def test_uniform_table_is_the_per_position_values_bit_for_bit():
    """The sampler hashes all positions up front as one (N, T) table; column t must be position t's uniforms."""
    keys = row_keys(5, 2, torch.arange(7))
    table = counter_uniform(keys, torch.arange(6))
    assert table.shape == (7, 6)
    for t in range(6):
        assert torch.equal(table[:, t], counter_uniform(keys, t))
    # The processor draws the same tokens with the table as without it, also past the table's end.
    scores = torch.randn(7, 11, generator=torch.Generator().manual_seed(0))
    with_table, without = CounterSampler(keys, 3, max_new_tokens=6), CounterSampler(keys, 3)
    for length in (3, 5, 8, 9, 12):  # positions 0, 2, 5, 6 (past the table), 9
        ids = torch.zeros(7, length, dtype=torch.long)
        assert torch.equal(with_table(ids, scores.clone()), without(ids, scores.clone()))


def test_keys_depend_on_seed_step_and_row_only():
    rows = torch.arange(8)
    assert torch.equal(row_keys(3, 7, rows), row_keys(3, 7, rows))
    assert torch.equal(row_keys(3, 7, rows)[4:], row_keys(3, 7, rows[4:]))  # a slice is the same rows' keys
    assert not torch.equal(row_keys(3, 7, rows), row_keys(4, 7, rows))
    assert not torch.equal(row_keys(3, 7, rows), row_keys(3, 8, rows))
    assert row_keys(3, 7, rows).unique(dim=0).shape[0] == 8
    with pytest.raises(ValueError, match="non-negative"):
        row_keys(-1, 0, rows)


def test_inverse_cdf_edges_by_hand():
    # probs (0.1, 0, 0.6, 0.3) -> cdf (0.1, 0.1, 0.7, 1.0): u < 0.1 -> 0, 0.1 <= u < 0.7 -> 2, u >= 0.7 -> 3.
    # Token 1 (probability 0) has an empty interval and is never drawn, also just past the 0.1 edge.
    scores = torch.tensor([0.1, 0.0, 0.6, 0.3]).log().expand(6, 4)
    u = torch.tensor([1e-12, 0.0999, 0.1001, 0.6999, 0.7001, 1 - 1e-12], dtype=torch.float64)
    assert inverse_cdf_sample(scores, u).tolist() == [0, 0, 2, 2, 3, 3]


def test_inverse_cdf_draws_follow_the_softmax():
    """Chi-square goodness of fit of 60k counter-based draws against softmax(logits), 9 degrees of freedom:
    the 99.9% quantile of chi2(9) is 27.9."""
    torch.manual_seed(0)
    logits = torch.randn(10) * 1.5
    p = logits.softmax(-1)
    n = 20_000
    keys = row_keys(11, 2, torch.arange(n))
    counts = torch.zeros(10)
    for t in range(3):
        counts += torch.bincount(inverse_cdf_sample(logits.expand(n, 10), counter_uniform(keys, t)), minlength=10)
    expected = p * 3 * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 27.9, (chi2, counts.tolist(), expected.tolist())


@pytest.fixture(scope="module")
def tiny():
    from rlhf.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer("builtin:words")
    return tok, load_causal_lm("builtin:tiny", tok)


PROMPTS = ["the movie was", "i think that this film is really", "bad",
           "a very long prompt about the movie that was good and fun", "the food", "it", "we saw a play", "great"]


def _generate(tok, model, prompts, keys, **kw):
    from rlhf.rollout.hf import generate

    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    ids, mask = generate(model, enc["input_ids"], enc["attention_mask"], tok, max_new_tokens=10, sampler="counter",
                         row_keys=keys, **kw)
    return ids, mask


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7, "top_k": 20}, {"top_p": 0.9}])
def test_a_row_samples_the_same_in_any_batch_split(tiny, kw):
    """Rows 0-3 and 4-7 generated as two batches (different left-padding widths, as two ranks would) match the
    same rows generated as one batch of 8; torch's sampler would give other tokens to the second half."""
    tok, model = tiny
    keys = row_keys(5, 3, torch.arange(8))
    whole, whole_mask = _generate(tok, model, PROMPTS, keys, **kw)
    for lo in (0, 4):
        part, part_mask = _generate(tok, model, PROMPTS[lo:lo + 4], keys[lo:lo + 4], **kw)
        r = part.shape[1]
        assert torch.equal(whole[lo:lo + 4, :r] * whole_mask[lo:lo + 4, :r], part * part_mask)
        assert whole_mask[lo:lo + 4, r:].sum() == 0  # the longer whole batch only adds padding
    other, _ = _generate(tok, model, PROMPTS, row_keys(5, 4, torch.arange(8)), **kw)
    assert not torch.equal(other[:, :4], whole[:, :4])  # another step draws other tokens


def test_counter_sampler_first_token_follows_the_model(tiny):
    """4096 first tokens for one prompt against the model's softmax, chi-square over the 12 most likely tokens plus
    one bin for the rest (12 dof; 99.9% quantile 32.9). Tokens outside the top 50 are drawn (no hidden top-k)."""
    tok, model = tiny
    n = 4096
    ids, _ = _generate(tok, model, ["the food was"] * n, row_keys(0, 0, torch.arange(n)))
    with torch.no_grad():
        q = tok(["the food was"], return_tensors="pt")
        p = model(**q).logits[0, -1].softmax(-1)
    top = p.topk(12).indices
    counts = torch.bincount(ids[:, 0], minlength=p.numel()).float()
    observed = torch.cat([counts[top], (n - counts[top].sum()).reshape(1)])
    expected = torch.cat([p[top], (1 - p[top].sum()).reshape(1)]) * n
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 32.9, chi2
    assert (~torch.isin(ids[:, 0], p.topk(50).indices)).float().mean() > 0.3


def test_top_k_and_low_temperature_are_respected(tiny):
    tok, model = tiny
    n = 256
    keys = row_keys(1, 1, torch.arange(n))
    q = tok(["the food was"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**q).logits[0, -1]
    ids, _ = _generate(tok, model, ["the food was"] * n, keys, top_k=3)
    assert set(ids[:, 0].tolist()) <= set(logits.topk(3).indices.tolist())
    assert len(set(ids[:, 0].tolist())) > 1
    # Temperature 1e-3 multiplies the logit gaps by 1000: every draw is the argmax.
    ids, _ = _generate(tok, model, ["the food was"] * 8, keys[:8], temperature=1e-3)
    assert ids[:, 0].tolist() == [logits.argmax().item()] * 8


def test_generate_refuses_counter_sampling_without_keys(tiny):
    from rlhf.rollout.hf import generate

    tok, model = tiny
    enc = tok(["a", "b"], return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match=r"row_keys of shape \(2, 2\)"):
        generate(model, enc["input_ids"], enc["attention_mask"], tok, max_new_tokens=2, sampler="counter")
    with pytest.raises(ValueError, match="rollout.sampler"):
        generate(model, enc["input_ids"], enc["attention_mask"], tok, max_new_tokens=2, sampler="numpy")


def test_bad_sampler_name_is_a_one_line_config_error(policy_cfg):
    from rlhf.config import ConfigError

    with pytest.raises(ConfigError, match="rollout.sampler") as e:
        policy_cfg("rollout.sampler=gumbel")
    assert "\n" not in str(e.value)


def test_global_minibatches_are_the_same_for_any_number_of_processes():
    """trainer.shuffle=global: 24 rows, 3 minibatches. One process holding all 24 rows, or 2 / 4 processes holding
    12 / 6 each, form the same minibatches: a process's local row i is global row rank * n + i."""
    total, m = 24, 3

    def global_minibatches(world):
        n = total // world
        per_rank = [minibatch_rows(n, m, world, r, torch.Generator().manual_seed(7)) for r in range(world)]
        return [sorted(int(i) + r * n for r in range(world) for i in per_rank[r][j]) for j in range(m)]

    one = global_minibatches(1)
    assert global_minibatches(2) == one
    assert global_minibatches(4) == one
    # A partition of the batch into equal minibatches, with one row of every block of 3 consecutive rows in each
    # minibatch (so each process gets exactly its share, n / m rows, of every minibatch).
    assert sorted(sum(one, [])) == list(range(total))
    for rows in one:
        assert len(rows) == total // m
        assert sorted(i // m for i in rows) == list(range(total // m))
    # The draw is random: another seed forms other minibatches, and the rows are not simply strided.
    other = [sorted(int(i) for i in mb) for mb in minibatch_rows(total, m, 1, 0, torch.Generator().manual_seed(8))]
    assert other != one
    assert any(len({i % m for i in rows}) > 1 for rows in one)
    with pytest.raises(ValueError, match="10 rows per process do not split into 3 minibatches"):
        minibatch_rows(10, 3, 1, 0, torch.Generator())


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7, "top_k": 20}, {"top_p": 0.9, "min_new_tokens": 3}])
def test_torch_sampler_draws_what_transformers_sampling_draws(tiny, kw):
    """sampler=torch runs greedy decoding over our processors and TorchSampler (transformers' own softmax +
    multinomial): from the same torch seed it draws the tokens transformers' do_sample=True draws with the same knobs,
    and leaves the global RNG in the same state."""
    from transformers import GenerationConfig

    from rlhf.rollout.hf import generate

    tok, model = tiny
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(9)
    ours, _ = generate(model, enc["input_ids"], enc["attention_mask"], tok, max_new_tokens=8, sampler="torch", **kw)
    after_ours = torch.rand(1)
    knobs = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_new_tokens": 0, **kw}
    cfg = GenerationConfig(do_sample=True, max_new_tokens=8, min_p=None, typical_p=1.0, repetition_penalty=1.0,
                           no_repeat_ngram_size=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                           **knobs)
    torch.manual_seed(9)
    with torch.inference_mode():
        theirs = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                generation_config=cfg)[:, enc["input_ids"].shape[1]:]
    assert torch.equal(ours, theirs)
    assert torch.equal(torch.rand(1), after_ours)
