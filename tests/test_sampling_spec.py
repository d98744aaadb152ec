"""SamplingSpec (rlhf.rollout.spec): the log-prob of a sampled token is its log-prob under the distribution that drew
it (temperature, min_new_tokens, top-k, top-p, min-p), for both samplers; the default spec is today's numerics bit
for bit; min_p is explicit, whatever a model's generation_config says."""

import copy
import dataclasses
import math

import pytest
import torch

from rlhf.config import ConfigError
from rlhf.core.logprobs import entropy_from_logits, selective_log_softmax
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.rollout.forward import concat, policy_logprobs, reference_logprobs
from rlhf.rollout.hf import HFEngine, generate, sample
from rlhf.rollout.sampling import row_keys
from rlhf.rollout.spec import SamplingSpec, sampling_logprobs

LN = math.log
NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def tiny():
    tok = load_tokenizer("builtin:words")
    return tok, load_causal_lm("builtin:tiny", tok, seed=0).eval()


PROMPTS = ["the movie was", "i think that this film is really", "bad",
           "a very long prompt about the movie that was good and fun", "the food", "it", "we saw a play", "great"]


def _prompts(tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    return enc["input_ids"], enc["attention_mask"]


# ---------------------------------------------------------------------------------------------- the spec itself
def test_spec_from_config_and_one_line_errors(policy_cfg):
    cfg = policy_cfg("rollout.top_k=5", "rollout.min_p=0.1", "rollout.temperature=0.7")
    spec = SamplingSpec.from_config(cfg.rollout, eos_token_id=2)
    assert spec == SamplingSpec(temperature=0.7, top_k=5, top_p=1.0, min_p=0.1, min_new_tokens=0, max_new_tokens=6,
                                sampler="counter", eos_token_id=2)
    assert spec.truncates and not SamplingSpec(temperature=0.5).truncates
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.top_k = 3
    for kw, message in [({"temperature": 0.0}, "rollout.temperature: must be > 0"),
                        ({"top_k": -1}, "rollout.top_k: must be >= 0"),
                        ({"top_p": 0.0}, "rollout.top_p: must be in (0, 1]"),
                        ({"min_p": 1.5}, "rollout.min_p: must be in [0, 1]"),
                        ({"sampler": "gumbel"}, "rollout.sampler: 'gumbel' is not one of counter, torch"),
                        ({"min_new_tokens": 5, "max_new_tokens": 4}, "rollout.min_new_tokens: must be in [0, "
                                                                      "rollout.max_new_tokens=4]")]:
        with pytest.raises(ConfigError) as e:
            SamplingSpec(**kw)
        assert str(e.value) == message
    # The config validation runs the same checks: rollout.min_p is now checked.
    with pytest.raises(ConfigError, match=r"^rollout.min_p: must be in \[0, 1\]$"):
        policy_cfg("rollout.min_p=1.5")


# ---------------------------------------------------------------------------------------------- log-probs by hand
# One position's logits ln(4, 3, 2, 1): probabilities (0.4, 0.3, 0.2, 0.1).
ROW = [LN(4), LN(3), LN(2), LN(1)]


def _lp(spec, tokens, keep_token=False):
    """sampling_logprobs of ``tokens`` (one row, one position each, every position's logits ROW)."""
    logits = torch.tensor([[ROW] * len(tokens)], dtype=torch.float64)
    out, _ = sampling_logprobs(logits, torch.tensor([tokens]), spec, keep_token=keep_token)
    return out[0].tolist()


def test_truncated_logprobs_renormalise_by_hand():
    # top_k=2 keeps (0.4, 0.3): renormalised 4/7 and 3/7; tokens 2 and 3 are outside: -inf.
    assert _lp(SamplingSpec(top_k=2), [0, 1, 2, 3]) == pytest.approx([LN(4 / 7), LN(3 / 7), NEG_INF, NEG_INF])
    # top_p=0.75: ascending cumulative mass (0.1, 0.3, 0.6, 1.0); tokens with cumulative mass <= 0.25 go: only token 3.
    # Kept (0.4, 0.3, 0.2) -> 4/9, 3/9, 2/9.
    assert _lp(SamplingSpec(top_p=0.75), [0, 1, 2, 3]) == pytest.approx([LN(4 / 9), LN(3 / 9), LN(2 / 9), NEG_INF])
    # min_p=0.6: threshold 0.6 * 0.4 = 0.24, so 0.4 and 0.3 stay: 4/7, 3/7.
    assert _lp(SamplingSpec(min_p=0.6), [0, 1, 2]) == pytest.approx([LN(4 / 7), LN(3 / 7), NEG_INF])
    # temperature 0.5 squares the odds (16, 9, 4, 1), then top_k=2: 16/25, 9/25.
    assert _lp(SamplingSpec(temperature=0.5, top_k=2), [0, 1]) == pytest.approx([LN(16 / 25), LN(9 / 25)])
    # No truncation: the plain softmax.
    assert _lp(SamplingSpec(), [0, 3]) == pytest.approx([LN(0.4), LN(0.1)])


def test_keep_token_changes_only_the_tokens_outside_the_support():
    """keep_token (the default): the scored token joins the support. Inside it nothing changes; outside, top_k=2
    scores token 2 over (0.4, 0.3, 0.2): 2/9, and token 3 over (0.4, 0.3, 0.1): 1/8, instead of -inf."""
    spec = SamplingSpec(top_k=2)
    assert _lp(spec, [0, 1, 2, 3], keep_token=True) == pytest.approx([LN(4 / 7), LN(3 / 7), LN(2 / 9), LN(1 / 8)])
    # top_p=0.75 drops only token 3: scored with it kept, (0.4, 0.3, 0.2, 0.1) all stay: 0.1.
    assert _lp(SamplingSpec(top_p=0.75), [0, 3], keep_token=True) == pytest.approx([LN(4 / 9), LN(0.1)])
    # EOS before min_new_tokens stays -inf: that exclusion is exact (the sampler never draws it there).
    spec = SamplingSpec(min_new_tokens=1, top_k=2, eos_token_id=0)
    assert _lp(spec, [0, 0], keep_token=True) == pytest.approx([NEG_INF, LN(4 / 7)])
    assert _lp(spec, [3], keep_token=True) == pytest.approx([LN(1 / 6)])  # over (0.3, 0.2) + itself (0.1)


def test_min_new_tokens_masks_eos_before_top_k_as_the_sampler_does():
    # EOS = token 0, the most likely (0.4). min_new_tokens=1: at position 0 EOS is -inf and the rest renormalise
    # (3/6, 2/6, 1/6); at position 1 the full softmax again.
    spec = SamplingSpec(min_new_tokens=1, eos_token_id=0)
    assert _lp(spec, [0, 1]) == pytest.approx([NEG_INF, LN(0.3)])
    assert _lp(spec, [1, 0]) == pytest.approx([LN(3 / 6), LN(0.4)])
    # With top_k=2 the order matters. transformers masks EOS first, then takes the top 2 of the rest: (0.3, 0.2) ->
    # 3/5, 2/5. (Top-k first would keep (EOS, token 1) and then only token 1: log 1 = 0.)
    spec = SamplingSpec(min_new_tokens=1, top_k=2, eos_token_id=0)
    assert _lp(spec, [1, 0]) == pytest.approx([LN(3 / 5), LN(0.4 / 0.7)])
    assert _lp(spec, [2]) == pytest.approx([LN(2 / 5)])
    with pytest.raises(ValueError, match="needs eos_token_id"):
        _lp(SamplingSpec(min_new_tokens=1), [1])


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
def test_truncated_logprobs_and_gradient_match_a_masked_log_softmax(chunk_size):
    """Against autograd through ``log_softmax(logits masked to the support)``, the support found by the same warpers;
    chunk sizes cover both tiling branches. Positions where response_mask is 0 hold 0 (and get no gradient)."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    spec = SamplingSpec(temperature=0.8, top_k=6, top_p=0.9, min_new_tokens=2, eos_token_id=(1, 4))
    with torch.no_grad():  # the support, by hand, in the sampler's order
        s = logits / 0.8
        s[:, :2, [1, 4]] = NEG_INF                                               # min_new_tokens=2, EOS ids 1, 4
        s = s.masked_fill(s < s.topk(6, -1).values[..., -1:], NEG_INF)           # top_k=6
        probs = s.softmax(-1)
        order = probs.argsort(-1)                                                # ascending, as TopPLogitsWarper
        drop = probs.gather(-1, order).cumsum(-1) <= 1 - 0.9                     # top_p=0.9
        support = ~torch.isneginf(s.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), NEG_INF))
        # Tokens drawn from the support, so every log-prob is finite.
        index = torch.multinomial(s.masked_fill(~support, NEG_INF).softmax(-1).reshape(-1, 11), 1,
                                  generator=g).reshape(3, 5)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, -1] = 0
    got, ent = sampling_logprobs(logits, index, spec, response_mask=mask, chunk_size=chunk_size, with_entropy=True)
    ref_logp = (logits / 0.8).masked_fill(~support, NEG_INF).log_softmax(-1)
    ref = ref_logp.gather(-1, index.unsqueeze(-1)).squeeze(-1) * mask
    torch.testing.assert_close(got, ref)
    assert torch.isfinite(got).all()
    p = ref_logp.exp()
    torch.testing.assert_close(ent, -(p * ref_logp.nan_to_num(neginf=0.0)).sum(-1))
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((got * w).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), logits)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("chunk_size", [2, 100])
def test_keep_token_logprobs_and_gradient_match_a_masked_log_softmax(chunk_size):
    """Tokens drawn uniformly (many outside the support): keep_token scores each over its position's support plus
    itself, except EOS before min_new_tokens (still -inf, gradient 0); against autograd by hand."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 6, 9, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    spec = SamplingSpec(top_k=3, min_p=0.2, min_new_tokens=2, eos_token_id=5)
    index = torch.randint(0, 9, (2, 6), generator=g)
    index[:, :2][index[:, :2] == 5] = 6
    index[0, 0] = 5  # the only EOS before min_new_tokens
    with torch.no_grad():
        s = logits.clone()
        s[:, :2, 5] = NEG_INF
        s = s.masked_fill(s < s.topk(3, -1).values[..., -1:], NEG_INF)
        p = s.softmax(-1)
        support = ~torch.isneginf(s) & ~(p < 0.2 * p.amax(-1, keepdim=True))
        support |= torch.nn.functional.one_hot(index, 9).bool()
        support[:, :2, 5] = False
    got, _ = sampling_logprobs(logits, index, spec, chunk_size=chunk_size)
    ref = logits.masked_fill(~support, NEG_INF).log_softmax(-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, ref)
    assert got[0, 0].item() == NEG_INF and torch.isfinite(got.flatten()[1:]).all()
    w = torch.randn(2, 6, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((got.nan_to_num(neginf=0.0) * w).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref.nan_to_num(neginf=0.0) * w).sum(), logits)
    torch.testing.assert_close(grad, ref_grad)


def test_a_token_outside_the_support_is_minus_inf_with_zero_gradient_when_exact():
    logits = torch.tensor([[ROW, ROW]], requires_grad=True)
    out, _ = sampling_logprobs(logits, torch.tensor([[3, 0]]), SamplingSpec(top_k=2), keep_token=False)
    assert out[0, 0].item() == NEG_INF and math.isfinite(out[0, 1].item())
    (grad,) = torch.autograd.grad(out[0, 1] + out[0, 0].clamp(min=-100.0), logits)
    assert torch.isfinite(grad).all() and grad[0, 0].abs().sum() == 0
    # keep_token: finite, and its gradient is that of log_softmax over the support plus the token (tokens 0, 1, 3).
    out, _ = sampling_logprobs(logits, torch.tensor([[3, 0]]), SamplingSpec(top_k=2))
    (grad,) = torch.autograd.grad(out[0, 0], logits)
    # d/dz of z_3 - logsumexp(z_0, z_1, z_3) with p = (4, 3, 1) / 8: (-1/2, -3/8, 0, 1 - 1/8).
    torch.testing.assert_close(grad[0, 0], torch.tensor([-0.5, -0.375, 0.0, 0.875]))
    assert grad[0, 1].abs().sum() == 0


# ---------------------------------------------------------------------------------------------- bit for bit
def _todays_policy_logprobs(model, q, qm, resp, rmask, temperature, chunk_size=1024):
    """The ops policy_logprobs ran before SamplingSpec, written out."""
    from rlhf.models import position_ids_from_mask

    ids, mask = concat(q, qm, resp, rmask)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False,
                   logits_to_keep=resp.shape[1] + 1).logits[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    return (selective_log_softmax(logits, resp, chunk_size=chunk_size),
            entropy_from_logits(logits.detach(), chunk_size=chunk_size))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_default_spec_logprobs_are_todays_bit_for_bit(tiny, temperature):
    """The default spec (and a temperature-only one) runs exactly the old ops: log-probs, entropy and the policy's
    gradients are equal bit for bit (torch.equal), so the default run's metrics do not change."""
    tok, model = tiny
    model = copy.deepcopy(model).train()
    q, qm = _prompts(tok, PROMPTS)
    resp, rmask = generate(model, q, qm, tok, max_new_tokens=8, sampler="counter",
                           row_keys=row_keys(0, 0, torch.arange(len(PROMPTS))))
    results = []
    for run in ("old", "spec", "temperature"):
        model.zero_grad()
        if run == "old":
            logp, ent = _todays_policy_logprobs(model, q, qm, resp, rmask, temperature)
        elif run == "spec":
            logp, ent = policy_logprobs(model, q, qm, resp, rmask, spec=SamplingSpec(temperature=temperature),
                                        with_entropy=True)
        else:
            logp, ent = policy_logprobs(model, q, qm, resp, rmask, temperature=temperature, with_entropy=True)
        (logp * rmask).sum().backward()
        results.append((logp, ent, [p.grad.clone() for p in model.parameters()]))
    (a, ea, ga), *others = results
    for b, eb, gb in others:
        assert torch.equal(a, b) and torch.equal(ea, eb)
        assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    with torch.no_grad():
        ref = reference_logprobs(model, q, qm, resp, rmask, spec=SamplingSpec(temperature=temperature, top_k=3))
    assert torch.equal(ref, a.detach())  # the reference: the tempered full softmax, whatever the truncation


# ---------------------------------------------------------------------------------------------- sampler == scorer
SPECS = [
    dict(top_k=5),
    dict(top_p=0.3, temperature=0.8),
    dict(min_p=0.6),
    dict(top_k=20, top_p=0.5, min_p=0.3, temperature=1.3),
    dict(min_new_tokens=4, top_k=10),
]


@pytest.mark.parametrize("sampler", ["counter", "torch"])
@pytest.mark.parametrize("knobs", SPECS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_sampler_logprobs_equal_policy_logprobs_under_the_spec(tiny, sampler, knobs):
    """The engine's own log-probs of the drawn tokens (from the processed scores it drew from, KV-cached decode)
    equal policy_logprobs(spec=...) of the same tokens (one full forward), to float tolerance; padding holds 0."""
    tok, model = tiny
    n = 32
    texts = (PROMPTS * 4)[:n]
    q, qm = _prompts(tok, texts)
    spec = SamplingSpec(max_new_tokens=8, sampler=sampler, eos_token_id=tok.eos_token_id, **knobs)
    torch.manual_seed(0)
    ids, mask, sampler_lp = HFEngine(model, tok, spec).generate(q, qm, spec, row_keys(2, 5, torch.arange(n)))
    with torch.no_grad():
        logp, ent = policy_logprobs(model, q, qm, ids, mask, spec=spec, with_entropy=True)
    assert sampler_lp.dtype == torch.float32 and sampler_lp.shape == ids.shape
    torch.testing.assert_close(sampler_lp, logp, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert (sampler_lp[mask == 0] == 0).all() and (logp[mask == 0] == 0).all()
    assert (sampler_lp[mask == 1] < 0).all()
    # Truncation raises the drawn tokens' log-probs above the full softmax's (the kept mass is renormalised).
    with torch.no_grad():
        full, _ = policy_logprobs(model, q, qm, ids, mask, temperature=spec.temperature)
    assert (logp[mask == 1] >= full[mask == 1] - 1e-6).all() and (logp[mask == 1] > full[mask == 1]).any()


@pytest.mark.parametrize("sampler", ["counter", "torch"])
def test_top_k_draws_only_the_k_most_likely(tiny, sampler):
    """With top_k=3 every drawn token is among the 3 largest logits at its position (scored by a full forward), and
    its log-prob is finite: log(p / mass of those 3)."""
    tok, model = tiny
    n, k = 64, 3
    q, qm = _prompts(tok, ["the food was"] * n)
    spec = SamplingSpec(top_k=k, max_new_tokens=4, sampler=sampler, eos_token_id=tok.eos_token_id)
    torch.manual_seed(1)
    ids, mask, lp = HFEngine(model, tok, spec).generate(q, qm, row_keys=row_keys(0, 1, torch.arange(n)))
    from rlhf.models import position_ids_from_mask

    full_ids, full_mask = concat(q, qm, ids, mask)
    with torch.no_grad():
        logits = model(input_ids=full_ids, attention_mask=full_mask,
                       position_ids=position_ids_from_mask(full_mask)).logits[:, q.shape[1] - 1:-1]
    top = logits.topk(k, -1).indices                                      # (n, R, k)
    inside = (top == ids.unsqueeze(-1)).any(-1)
    assert inside[mask == 1].all()
    assert len(set(ids[:, 0].tolist())) > 1  # it does sample, among the k
    expected = logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) \
        - logits.log_softmax(-1).gather(-1, top).logsumexp(-1)             # log(p / mass of the top k)
    torch.testing.assert_close(lp[mask == 1], expected[mask == 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["counter", "torch"])
def test_no_eos_before_min_new_tokens_and_its_logprob_there_is_minus_inf(tiny, sampler):
    """EOS made likely (+4 on its logit, p ~ 0.28 at every step): without min_new_tokens some responses end in the
    first 3 tokens; with min_new_tokens=3 none does, the drawn tokens' log-probs are finite, and an EOS placed at
    position 1 scores -inf under the spec (finite under the full softmax)."""
    tok, model = tiny
    model = copy.deepcopy(model)
    eos = tok.eos_token_id

    def boost(module, inputs, out):
        out = out.clone()
        out[..., eos] += 4.0
        return out

    model.lm_head.register_forward_hook(boost)
    n = 64
    q, qm = _prompts(tok, ["the movie was"] * n)
    keys = row_keys(4, 0, torch.arange(n))
    free = SamplingSpec(max_new_tokens=6, sampler=sampler, eos_token_id=eos)
    torch.manual_seed(2)
    ids, _, _ = sample(model, q, qm, tok, free, row_keys=keys)
    assert (ids[:, :3] == eos).any()  # the control: EOS is drawn early when allowed
    spec = SamplingSpec(max_new_tokens=6, min_new_tokens=3, sampler=sampler, eos_token_id=eos)
    torch.manual_seed(2)
    ids, mask, lp = sample(model, q, qm, tok, spec, row_keys=keys)
    assert not (ids[:, :3] == eos).any()
    assert (ids[:, 3] == eos).any()  # and it is drawn from position 3 on
    with torch.no_grad():
        logp, _ = policy_logprobs(model, q, qm, ids, mask, spec=spec)
    torch.testing.assert_close(lp, logp, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(logp).all()
    forced = ids.clone()
    forced[:, 1] = eos
    forced_mask = torch.ones_like(forced)
    with torch.no_grad():
        masked, _ = policy_logprobs(model, q, qm, forced, forced_mask, spec=spec)
        full, _ = policy_logprobs(model, q, qm, forced, forced_mask)
    assert (masked[:, 1] == NEG_INF).all() and torch.isfinite(full[:, 1]).all()
    assert torch.isfinite(masked[:, [0, 2]]).all()


# ---------------------------------------------------------------------------------------------- min_p explicit
@pytest.mark.parametrize("sampler", ["counter", "torch"])
def test_a_models_generation_config_min_p_has_no_effect(tiny, sampler):
    """model.generation_config.min_p = 0.5 (as a generation_config.json could set) changes nothing with min_p=0;
    the spec's own min_p=0.5 does change the draws (so the check is not vacuous)."""
    tok, model = tiny
    model = copy.deepcopy(model)
    n = 32
    q, qm = _prompts(tok, ["the food was"] * n)
    keys = row_keys(6, 0, torch.arange(n))

    def draw(min_p):
        torch.manual_seed(3)
        return generate(model, q, qm, tok, max_new_tokens=5, sampler=sampler, row_keys=keys, min_p=min_p)[0]

    plain = draw(0.0)
    model.generation_config.min_p = 0.5
    assert torch.equal(draw(0.0), plain)
    model.generation_config.min_p = None
    assert not torch.equal(draw(0.5), plain)
