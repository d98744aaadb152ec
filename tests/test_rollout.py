import math

import pytest
import torch

from rlhf.core.kl import shape_rewards
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.rewards.functions import RewardFunctionError, call_reward_function
from rlhf.rollout.batch import decode_responses, has_eos, response_mask_from_ids
from rlhf.rollout.forward import policy_logprobs

EOS, PAD = 2, 0


def test_response_mask_keeps_first_eos_and_drops_after():
    # row 0: EOS at index 2 -> [1,1,1,0,0]; row 1: no EOS (cut at max_new_tokens) -> all ones;
    # row 2: EOS first -> [1,0,0,0,0]; row 3: two EOS, only the first counts -> [1,1,0,0,0]
    ids = torch.tensor([[7, 8, EOS, PAD, PAD], [7, 8, 9, 10, 11], [EOS, PAD, PAD, PAD, PAD], [5, EOS, 6, EOS, PAD]])
    mask = response_mask_from_ids(ids, EOS)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert has_eos(ids, mask, EOS).tolist() == [True, False, True, True]


def test_pad_equal_to_eos_is_not_ambiguous():
    # Tokenizers whose pad is their EOS: the tokens after the first EOS look like EOS too, and are still masked.
    ids = torch.tensor([[7, EOS, EOS, EOS]])
    assert response_mask_from_ids(ids, EOS).tolist() == [[1, 1, 0, 0]]


def test_shaping_on_a_generated_batch_with_padding_and_eos():
    # Hand-built rollout: row 0 ends with EOS at index 2, row 1 is cut at max_new_tokens (no EOS).
    ids = torch.tensor([[7, 8, EOS, PAD], [7, 8, 9, 10]])
    mask = response_mask_from_ids(ids, EOS)
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.4, 0.0, -0.2, 0.5]])
    scores = torch.tensor([1.0, -2.0])
    rewards = shape_rewards(scores, kl * mask, mask, beta=0.5)
    # row 0: -0.5*[0.1, 0.2, 0.3] = [-0.05, -0.1, -0.15]; score 1.0 lands on the EOS token: -0.15 + 1 = 0.85;
    #        the pad position gets 0 (its kl of 9.0 is ignored).
    # row 1: -0.5*[0.4, 0, -0.2, 0.5] = [-0.2, 0, 0.1, -0.25]; score -2 on the last token: -2.25.
    expected = torch.tensor([[-0.05, -0.1, 0.85, 0.0], [-0.2, 0.0, 0.1, -2.25]])
    torch.testing.assert_close(rewards, expected)


@pytest.fixture(scope="module")
def tiny():
    tok = load_tokenizer("builtin:words")
    return tok, load_causal_lm("builtin:tiny", tok, seed=0).eval()


def test_left_padded_logprobs_equal_unpadded(tiny):
    """Position ids follow the attention mask, so a left-padded query scores its response exactly as alone."""
    tok, model = tiny
    short = tok(["the food was"], return_tensors="pt")
    long = tok(["the food was", "i think the service was really"], return_tensors="pt", padding=True,
               padding_side="left")
    resp = tok(["great and the staff"], return_tensors="pt")["input_ids"]
    rmask = torch.ones_like(resp)
    with torch.no_grad():
        alone, _ = policy_logprobs(model, short["input_ids"], short["attention_mask"], resp, rmask)
        padded, _ = policy_logprobs(model, long["input_ids"][:1], long["attention_mask"][:1], resp, rmask)
        # Reference: plain full forward on the unpadded sequence, log_softmax, gather.
        ids = torch.cat([short["input_ids"], resp], 1)
        logits = model(ids).logits[:, short["input_ids"].shape[1] - 1:-1]
        ref = torch.log_softmax(logits, -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
    assert long["attention_mask"][0, 0] == 0  # the first row really is padded
    torch.testing.assert_close(alone, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded, ref, atol=1e-5, rtol=1e-5)


def test_temperature_scales_logits(tiny):
    tok, model = tiny
    q = tok(["the food was"], return_tensors="pt")
    resp = tok(["great ."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got, ent = policy_logprobs(model, q["input_ids"], q["attention_mask"], resp, torch.ones_like(resp),
                                   temperature=2.0, with_entropy=True)
        logits = model(torch.cat([q["input_ids"], resp], 1)).logits[:, q["input_ids"].shape[1] - 1:-1] / 2.0
        logp_all = torch.log_softmax(logits, -1)
    torch.testing.assert_close(got, logp_all.gather(-1, resp.unsqueeze(-1)).squeeze(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, -(logp_all.exp() * logp_all).sum(-1), atol=1e-5, rtol=1e-5)


def test_decode_stops_at_eos(tiny):
    tok, _ = tiny
    ids = tok(["great and fresh"], return_tensors="pt")["input_ids"]
    ids = torch.cat([ids, torch.tensor([[tok.eos_token_id, tok.convert_tokens_to_ids("awful")]])], 1)
    mask = response_mask_from_ids(ids, tok.eos_token_id)
    assert decode_responses(tok, ids, mask) == ["great and fresh"]


def good(prompts, completions):
    return [float(len(c)) for c in completions]


@pytest.mark.parametrize(
    "fn, fragment",
    [
        (lambda p, c: 1 / 0, "raised ZeroDivisionError"),
        (lambda p, c: [float("nan")] * len(c), "non-finite"),
        (lambda p, c: [math.inf] * len(c), "non-finite"),
        (lambda p, c: [1.0], "returned 1 scores for 2"),
        (lambda p, c: ["a", "b"], "returned a str"),
        (lambda p, c: 3.0, "returned float"),
    ],
)
def test_bad_reward_function_names_the_function(fn, fragment):
    with pytest.raises(RewardFunctionError, match=fragment) as e:
        call_reward_function(fn, "my.module.fn", ["p", "q"], ["a", "bb"])
    assert "my.module.fn" in str(e.value)
    assert "\n" not in str(e.value)


def test_reward_function_values():
    out = call_reward_function(good, "good", ["p", "q"], ["a", "bbb"])
    assert out.tolist() == [1.0, 3.0]


def test_sampling_is_from_the_full_softmax(tiny):
    """rollout.top_k=0 means no top-k: tokens outside the 50 most likely ones must be drawn (transformers fills an
    unset top_k with 50). The untrained model's next-token distribution is close to uniform over ~140 tokens, so
    ~60% of 512 draws fall outside its top 50; with a hidden top-50 filter none would."""
    from rlhf.rollout.hf import generate

    tok, model = tiny
    q = tok(["the food was"] * 512, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    ids, _ = generate(model, q["input_ids"], q["attention_mask"], tok, max_new_tokens=1, min_new_tokens=1)
    with torch.no_grad():
        top50 = model(q["input_ids"][:1]).logits[0, -1].topk(50).indices
    outside = (~torch.isin(ids[:, 0], top50)).float().mean().item()
    assert outside > 0.3, outside
