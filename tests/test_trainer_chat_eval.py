"""The policy trainer with chat-formatted prompts (data.chat_template) and held-out evaluation in the loop (eval.every).

The chat tokenizer is the built-in word tokenizer with a template of our own, written in words of its vocabulary, so
the tiny random-init policy can read it: "<s>" + (system text) + prompt + " quietly" as the assistant's header.
"""

import json

import pytest
import torch

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}quietly {% endif %}")


def chat_tokenizer_folder(tmp_path):
    from rlhf.models import load_tokenizer

    tok = load_tokenizer("builtin:words")
    tok.chat_template = TEMPLATE
    folder = tmp_path / "chat_tok"
    tok.save_pretrained(folder)
    return folder


def prompt_length_reward(prompts, completions):
    """The number of words of the prompt the function was given: tells the plain prompt from the rendered one."""
    return [float(len(p.split())) for p in prompts]


def test_prompts_are_rendered_for_the_policy_and_plain_for_the_rewards(policy_cfg, tmp_path):
    from rlhf.trainers.policy import PolicyTrainer

    folder = chat_tokenizer_folder(tmp_path)
    trainer = PolicyTrainer(policy_cfg(f"model.tokenizer={folder}", "data.system_prompt=be brief",
                                       "reward.function=tests.test_trainer_chat_eval.prompt_length_reward",
                                       "reward.gold=null", "trainer.max_steps=1"))
    assert trainer.chat  # auto: the tokenizer has a template of its own
    prompts = trainer.prompt_batch(0)
    ro = trainer.generate(prompts, 0, 0)[0]
    tok = trainer.models.tokenizer
    k = trainer.cfg.rollout.samples_per_prompt
    for i, p in enumerate(prompts):
        ids = ro.query_ids[i * k][ro.query_mask[i * k].bool()].tolist()
        # one BOS (the template's; none added by the tokenizer), the system turn, the prompt, the header
        assert ids == tok(f"<s>be brief {p} quietly ", add_special_tokens=False)["input_ids"]
        assert ids.count(tok.bos_token_id) == 1
    scored = trainer.score(prompts, ro)
    assert scored.total.tolist() == [float(len(p.split())) for p in prompts for _ in range(k)]


def test_plain_prompts_stay_as_they_were(policy_cfg):
    """builtin:words' own template (for SFT's messages) does not switch auto on: the default run is unchanged."""
    from rlhf.trainers.policy import PolicyTrainer

    trainer = PolicyTrainer(policy_cfg("trainer.max_steps=1"))
    assert not trainer.chat
    prompts = trainer.prompt_batch(0)
    ro = trainer.generate(prompts, 0, 0)[0]
    row = ro.query_ids[0][ro.query_mask[0].bool()].tolist()
    assert row == trainer.models.tokenizer(prompts[0])["input_ids"]


def test_chat_template_true_without_a_template_and_system_prompt_without_chat_are_errors(policy_cfg, tmp_path):
    from rlhf.config import ConfigError
    from rlhf.models import load_tokenizer
    from rlhf.trainers.policy import PolicyTrainer

    tok = load_tokenizer("builtin:words")
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "plain")
    with pytest.raises(ConfigError, match="data.chat_template: true needs a tokenizer with a chat template"):
        PolicyTrainer(policy_cfg(f"model.tokenizer={tmp_path / 'plain'}", "data.chat_template=true"))
    with pytest.raises(ConfigError, match="data.system_prompt"):
        PolicyTrainer(policy_cfg("data.system_prompt=hello"))


def test_eval_every_logs_held_out_metrics_of_the_policy_each_step_starts_from(policy_cfg):
    """eval.every=2 over 4 steps: eval/* in the lines of steps 0 and 2 and in a line of its own at step 4, the final
    policy. Step 0's numbers are the initial policy's: the same as evaluating a freshly built trainer's policy."""
    from rlhf.trainers.policy import PolicyTrainer

    over = ("eval.every=2", "eval.num_prompts=6", "eval.samples=2", "trainer.max_steps=4")
    fresh = PolicyTrainer(policy_cfg(*over))
    expected = fresh.held_out.run(fresh.backend.unwrap(fresh.policy))
    hist = PolicyTrainer(policy_cfg(*over)).train()
    assert [m["step"] for m in hist if "eval/accuracy" in m] == [0, 2, 4]
    assert [m["step"] for m in hist] == [0, 1, 2, 3, 4] and "score" not in hist[-1]
    assert {k: hist[0][k] for k in expected} == expected
    assert set(expected) >= {"eval/accuracy", "eval/reward", "eval/gold", "eval/pass@1", "eval/pass@2",
                             "eval/length", "eval/sample_reward"}
    # the held-out prompts are the test split: none of them is a training prompt
    assert not set(fresh.held_out.prompts) & set(fresh.prompts)


def test_eval_on_a_file_source_needs_eval_prompts(policy_cfg, tmp_path):
    from rlhf.config import ConfigError
    from rlhf.trainers.policy import PolicyTrainer

    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"the food was {w}"}) for w in ("good", "bad")) + "\n")
    with pytest.raises(ConfigError, match="eval.prompts: data.prompts="):
        PolicyTrainer(policy_cfg(f"data.prompts={path}", "reward.function=rlhf.tasks.sentiment.reward_fn",
                                 "eval.every=1"))


@pytest.mark.slow
def test_scripts_evaluate_reproduces_the_in_loop_numbers(policy_cfg, tmp_path):
    """The trainer's evaluations of the initial policy (step 0) and of the trained one (step 2) and scripts/evaluate.py
    on the initial model and on checkpoints/step_2, with the same prompts and settings, give the same metrics: one
    evaluation code path (rlhf.analysis.evaluate), and eval/* at step N is checkpoint step_N's."""
    from rlhf.trainers.policy import PolicyTrainer
    from tests.conftest import run_script

    run_dir = tmp_path / "run"  # policy_cfg's
    hist = PolicyTrainer(policy_cfg("eval.every=2", "eval.num_prompts=8", "eval.samples=2", "trainer.max_steps=2",
                                    "trainer.lr=3e-3")).train()
    in_loop = {m["step"]: {k: v for k, v in m.items() if k.startswith("eval/")} for m in hist if "eval/gold" in m}
    assert sorted(in_loop) == [0, 2] and in_loop[0] != in_loop[2]  # the update changed the policy's completions
    for step, policy in ((0, "builtin:tiny"), (2, run_dir / "checkpoints" / "step_2")):
        out = tmp_path / f"eval_{step}.json"
        # the trainer's test-split prompts and sampling: rollout.max_new_tokens=6 (FAST) and temperature 1
        proc = run_script(["scripts/evaluate.py", f"model.policy={policy}", "data.num_prompts=8", "eval.samples=2",
                           "eval.max_new_tokens=6", "eval.batch_size=16", "eval.progress=false", f"eval.output={out}",
                           f"hydra.run.dir={tmp_path / f'ev{step}'}"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        metrics = json.loads(out.read_text())["metrics"]
        for key, value in in_loop[step].items():
            assert metrics[key.removeprefix("eval/")] == pytest.approx(value, abs=1e-9), (step, key)
        assert torch.isfinite(torch.tensor(list(in_loop[step].values()))).all()
