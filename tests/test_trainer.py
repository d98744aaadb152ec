"""End-to-end behaviour of the policy trainer on the tiny offline model."""

import json
import math
import os

import pytest
import torch

from rlhf.trainers.policy import PolicyTrainer

ALGORITHMS = ["ppo", "rloo", "grpo", "reinforce_pp"]


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_algorithm_runs_two_steps_and_changes_every_trainable_parameter(policy_cfg, algorithm):
    cfg = policy_cfg(f"algorithm={algorithm}", "trainer.max_steps=2", "trainer.warmup_steps=0")
    trainer = PolicyTrainer(cfg)
    before = _params(trainer.policy)
    critic_before = _params(trainer.critic) if trainer.critic is not None else {}
    history = trainer.train()
    assert [m["step"] for m in history] == [0, 1]
    after = _params(trainer.policy)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"{algorithm}: parameters not updated: {unchanged[:5]}"
    assert (trainer.critic is not None) == (algorithm == "ppo")
    if trainer.critic is not None:
        critic_after = _params(trainer.critic)
        assert not [n for n in critic_before if torch.equal(critic_before[n], critic_after[n])]
    for m in history:
        for key in ("score", "kl", "beta", "reward", "entropy", "response_length", "policy/clipfrac",
                    "policy/approxkl", "time/step_s", "time/generate_s", "time/score_s", "time/update_s"):
            assert math.isfinite(m[key]), (key, m[key])
        # reward = score - beta * kl, by definition of the logged keys
        assert m["reward"] == pytest.approx(m["score"] - m["beta"] * m["kl"], abs=1e-6)
    if algorithm == "ppo":
        assert "value/loss" in history[0] and "value/explained_variance" in history[0]


def test_kl_is_zero_at_step_zero(policy_cfg):
    # The reference is a copy of the initial policy, and step 0 samples before any update.
    history = PolicyTrainer(policy_cfg("trainer.max_steps=1")).train()
    assert abs(history[0]["kl"]) < 1e-6


def test_zero_beta_loads_no_reference(policy_cfg):
    trainer = PolicyTrainer(policy_cfg("kl.beta=0", "trainer.max_steps=1"))
    assert trainer.models.reference is None
    (m,) = trainer.train()
    assert math.isnan(m["kl"]) and m["reward"] == m["score"]
    # A beta sweep needs the beta = 0 point's KL: log_at_zero_beta loads the reference only to measure it.
    trainer = PolicyTrainer(policy_cfg("kl.beta=0", "kl.log_at_zero_beta=true", "trainer.max_steps=1"))
    assert trainer.models.reference is not None
    assert abs(trainer.train()[0]["kl"]) < 1e-6


def test_kl_as_loss_term_changes_the_update(policy_cfg):
    """GRPO puts beta * k3 in the loss. With one epoch, step 0 updates from policy == reference (KL loss 0);
    after that update the policy has drifted, so step 1 logs a KL loss > 0."""
    history = PolicyTrainer(policy_cfg("algorithm=grpo", "trainer.max_steps=2", "kl.beta=0.1", "trainer.ppo_epochs=1",
                                       "trainer.warmup_steps=0")).train()
    assert history[0]["policy/kl_loss"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 0
    assert history[1]["policy/kl_loss"] > 0


def test_metrics_and_samples_files(policy_cfg, tmp_path):
    cfg = policy_cfg("trainer.max_steps=3", "trainer.sample_every=2", "logging.tensorboard=true")
    PolicyTrainer(cfg).train()
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert {"score", "kl", "beta", "reward", "gold_score"} <= set(rows[0])
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 2}
    assert {"prompt", "completion", "score"} <= set(samples[0])
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run / "tensorboard"))


def test_checkpoint_loads_with_from_pretrained(policy_cfg, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    trainer = PolicyTrainer(policy_cfg("trainer.max_steps=2"))
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoints" / "step_2"
    policy = AutoModelForCausalLM.from_pretrained(ckpt / "policy")
    for (name, a), b in zip(trainer.policy.named_parameters(), policy.parameters()):
        assert torch.equal(a.detach(), b), name
    value = AutoModelForSequenceClassification.from_pretrained(ckpt / "value")
    assert value.config.num_labels == 1
    assert (ckpt / "trainer_state.pt").exists() and (ckpt / "COMPLETE").exists()


def test_resume_continues_exactly(policy_cfg, tmp_path):
    """Run 4 steps with a checkpoint at step 2; a second run resumed from that checkpoint must log the same
    metrics for steps 2 and 3 (sampling is re-seeded per step; optimizer, scheduler and KL controller are
    restored)."""
    import shutil

    from rlhf.config import validate_policy_config
    from tests.conftest import FAST, compose_policy

    common = ["trainer.max_steps=4", "trainer.save_every=2", "kl.controller=adaptive", "kl.target=0.5",
              "kl.horizon=100", "trainer.scheduler=linear", "trainer.warmup_steps=1", "trainer.keep_last=5"]
    full = PolicyTrainer(policy_cfg(*common)).train()
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step_2", other / "checkpoints" / "step_2")
    cfg = validate_policy_config(compose_policy([*FAST, *common, "trainer.resume=auto"], run_dir=str(other)))
    resumed = PolicyTrainer(cfg)
    assert resumed.start_step == 2
    tail = resumed.train()
    assert [m["step"] for m in tail] == [2, 3]
    for a, b in zip(full[2:], tail):
        for key in a:
            if not key.startswith("time/"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_reward_model_with_another_tokenizer_is_retokenized(policy_cfg, tmp_path):
    """A reward model whose tokenizer orders the words differently must see the decoded text re-tokenized; it
    also initialises the PPO critic only when the tokenizers agree (here they do not: critic from the policy)."""
    from rlhf.models import load_score_model, sequence_scores
    from rlhf.tasks.sentiment import VOCAB
    from rlhf.tokenizers import build_word_tokenizer

    rm_tok = build_word_tokenizer(list(reversed(VOCAB)), padding_side="right")
    rm = load_score_model("builtin:tiny", rm_tok, seed=3)
    folder = tmp_path / "rm"
    rm.save_pretrained(folder)
    rm_tok.save_pretrained(folder)
    trainer = PolicyTrainer(policy_cfg(f"model.reward={folder}", "reward.function=null", "trainer.max_steps=1"))
    assert trainer.models.reward_tokenizer is not None
    prompts = trainer.prompt_batch(0)
    ro = trainer.generate(prompts, 0, 0)[0]
    scores, _, _, completions = trainer.score(prompts, ro)  # Scored(total, by_source, gold, completions)
    # Reference: score each full text alone with the reward model's own tokenizer (+ its EOS).
    k = trainer.cfg.rollout.samples_per_prompt
    texts = [prompts[i // k] + " " + c if c else prompts[i // k] for i, c in enumerate(completions)]
    expected = []
    for t in texts:
        enc = rm_tok(t + rm_tok.eos_token, return_tensors="pt")
        expected.append(sequence_scores(trainer.models.reward, enc["input_ids"], enc["attention_mask"]).item())
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_reward_model_and_function_are_weighted(policy_cfg, tmp_path):
    from rlhf.models import load_score_model, load_tokenizer
    from rlhf.rewards.scoring import reward_model_scores
    from rlhf.tasks.sentiment import reward_fn

    tok = load_tokenizer("builtin:words")
    folder = tmp_path / "rm"
    load_score_model("builtin:tiny", tok, seed=5).save_pretrained(folder)
    tok.save_pretrained(folder)
    trainer = PolicyTrainer(policy_cfg(f"model.reward={folder}", "reward.model_weight=0.5",
                                       "reward.function_weight=2.0", "trainer.max_steps=1"))
    assert trainer.models.reward_tokenizer is None  # same vocabulary: token ids are reused
    # With a same-tokenizer reward model, PPO's critic starts as a copy of it.
    for a, b in zip(trainer.models.value.parameters(), trainer.models.reward.parameters()):
        assert torch.equal(a, b)
    prompts = trainer.prompt_batch(0)
    ro = trainer.generate(prompts, 0, 0)[0]
    scores, _, _, completions = trainer.score(prompts, ro)  # Scored(total, by_source, gold, completions)
    rm = reward_model_scores(trainer.models.reward, tok, None, ro.query_ids, ro.query_mask, ro.response_ids,
                             ro.response_mask)
    fn = torch.tensor(reward_fn([""] * len(completions), completions))
    torch.testing.assert_close(scores, 0.5 * rm + 2.0 * fn)


def test_min_new_tokens_and_missing_eos_penalty(policy_cfg):
    trainer = PolicyTrainer(policy_cfg("rollout.min_new_tokens=6", "rollout.max_new_tokens=6",
                                       "reward.missing_eos_penalty=-10", "trainer.max_steps=1"))
    prompts = trainer.prompt_batch(0)
    ro = trainer.generate(prompts, 0, 0)[0]
    # EOS is suppressed for 6 tokens and at most 6 are generated: every response is cut, none has EOS.
    assert ro.response_mask.sum(-1).tolist() == [6] * ro.response_mask.shape[0]
    scores, _, gold, completions = trainer.score(prompts, ro)
    torch.testing.assert_close(scores, gold - 10.0)


@pytest.mark.slow
def test_default_run_raises_the_score(tmp_path):
    """The default config (no overrides but the run folder and a shorter run) improves the mean score."""
    from rlhf.config import validate_policy_config
    from tests.conftest import compose_policy

    cfg = validate_policy_config(compose_policy(["trainer.max_steps=60", "logging.progress=false"],
                                                run_dir=str(tmp_path / "run")))
    history = PolicyTrainer(cfg).train()
    first = sum(m["score"] for m in history[:10]) / 10
    last = sum(m["score"] for m in history[-10:]) / 10
    assert last > first + 0.5, (first, last)


@pytest.mark.parametrize("algorithm", ["ppo", "rloo"])
def test_fused_rollout_forward_gives_the_same_update(policy_cfg, algorithm):
    """With 1 epoch x 1 minibatch the rollout's forward is reused for the update. The weights after two steps must
    equal those of the plain path, which runs a no-grad forward in the rollout and a second one in the update."""
    cfg = policy_cfg(f"algorithm={algorithm}", "trainer.max_steps=2", "trainer.ppo_epochs=1",
                     "trainer.warmup_steps=0")
    fused, plain = PolicyTrainer(cfg), PolicyTrainer(cfg)
    assert fused.fused
    plain.fused = False
    fused_hist, plain_hist = fused.train(), plain.train()
    for (name, a), b in zip(fused.policy.named_parameters(), plain.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    if algorithm == "ppo":
        for a, b in zip(fused.critic.parameters(), plain.critic.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for key in ("score", "kl", "policy/loss"):
        assert fused_hist[-1][key] == pytest.approx(plain_hist[-1][key], rel=1e-4, abs=1e-6)


def test_value_model_from_the_policy_backbone_on_request(policy_cfg, tmp_path):
    """model.value=policy: the critic starts from the policy's backbone even when a reward model is configured."""
    from rlhf.models import load_score_model, load_tokenizer

    tok = load_tokenizer("builtin:words")
    load_score_model("builtin:tiny", tok, seed=5).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    trainer = PolicyTrainer(policy_cfg(f"model.reward={tmp_path / 'rm'}", "model.value=policy",
                                       "trainer.max_steps=1"))
    for (name, p), q in zip(trainer.models.policy.base_model.named_parameters(),
                            trainer.models.value.base_model.parameters()):
        assert torch.equal(p, q), name
    head = trainer.models.value.score.weight
    assert torch.count_nonzero(head) == 0
