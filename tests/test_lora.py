"""LoRA through peft (model.lora, rlhf.lora): config errors, one copy of the base weights, the reference as the policy
with its adapters disabled, checkpoints of adapters that resume exactly, merged exports, and the SFT and reward
stages. Real tiny models throughout; every trainer run is a few steps of 4 prompts x 2 samples."""

import json
import os
import shutil
import sys
import textwrap

import pytest
import torch

from rlhf.config import ConfigError, validate_policy_config, validate_reward_config, validate_sft_config
from tests.conftest import FAST, compose_config, compose_policy, run_script

LORA = ["model.lora.r=4", "algorithm=rloo", "trainer.torch_threads=1"]
# One epoch, one minibatch: the update reuses the rollout's forward, so the first step's ratio is exactly 1.
ONE_PASS = ["trainer.ppo_epochs=1", "trainer.minibatches=1"]


def _trainer(tmp_path, *overrides, name="run"):
    from rlhf.trainers.policy import PolicyTrainer

    return PolicyTrainer(validate_policy_config(compose_policy([*FAST, *LORA, *overrides],
                                                               run_dir=str(tmp_path / name))))


def _storages(*modules) -> dict[int, int]:
    """data_ptr -> bytes of every distinct parameter storage of ``modules``."""
    out = {}
    for m in modules:
        for p in m.parameters():
            out[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return out


def _logprobs(model, ids):
    """``(1, T - 1)`` log-probs of each next token of ``ids`` under ``model``."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


IDS = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 4]])


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, message", [
    (["model.lora.r=0"], "model.lora.r: rank must be an integer > 0, not 0"),
    (["model.lora.r=-2"], "model.lora.r: rank must be an integer > 0, not -2"),
    (["model.lora.r=4", "model.lora.target_modules=[q_proj,qkv]"],
     "model.lora.target_modules: 'qkv' is not a module of the model"),
    (["model.lora.r=4", "model.lora.modules_to_save=[head]"],
     "model.lora.modules_to_save: 'head' is not a module of the model"),
    (["model.lora.r=4", "model.lora.target_modules=attention"], "model.lora.target_modules: 'attention': give"),
    (["model.lora.r=4", "model.lora.dropout=0.1"], "model.lora.dropout: the policy trainer runs without dropout"),
])
def test_bad_lora_settings_are_one_line_errors_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate_policy_config(compose_policy([*FAST, *overrides], run_dir="unused"))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("stage, validate", [("sft", validate_sft_config), ("reward", validate_reward_config)])
def test_stages_check_the_same_lora_settings(stage, validate):
    with pytest.raises(ConfigError, match=r"^model\.lora\.r: rank must be an integer > 0"):
        validate(compose_config(stage, ["model.lora.r=0"], run_dir="unused"))
    with pytest.raises(ConfigError, match=r"^model\.lora\.target_modules: 'wq' is not a module"):
        validate(compose_config(stage, ["model.lora.r=2", "model.lora.target_modules=[wq]"], run_dir="unused"))
    # The reward model's score head is a module of its own (peft trains it in full), not the causal LM's lm_head.
    if stage == "reward":
        validate(compose_config(stage, ["model.lora.r=2", "model.lora.modules_to_save=[score]"], run_dir="unused"))


def test_rank_null_is_full_fine_tuning():
    for overrides in ([], ["model.lora=null"], ["model.lora.alpha=8"]):
        assert validate_policy_config(compose_policy([*FAST, *overrides], run_dir="unused")).model.lora is None


def test_missing_peft_is_one_line_error_saying_pip_install_peft(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` meets when it is not installed
    with pytest.raises(ConfigError) as e:
        validate_policy_config(compose_policy([*FAST, "model.lora.r=4"], run_dir="unused"))
    assert str(e.value) == "model.lora: LoRA needs the peft package, which is not installed: pip install peft"
    # A run without LoRA never imports it.
    validate_policy_config(compose_policy(FAST, run_dir="unused"))


# ---------------------------------------------------------------------------------------------- policy trainer
def test_one_copy_of_the_base_weights_and_only_adapters_train(tmp_path):
    """The reference shares every storage with the policy: the run holds the base once, plus the adapters."""
    from rlhf.models import load_causal_lm

    trainer = _trainer(tmp_path)
    policy, reference = trainer.models.policy, trainer.models.reference
    base = load_causal_lm("builtin:tiny", trainer.models.tokenizer, seed=0)
    held = _storages(policy, reference)
    assert held == _storages(policy)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    adapter_bytes = sum(p.numel() * p.element_size() for p in policy.parameters() if p.requires_grad)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    assert sum(held.values()) == base_bytes + adapter_bytes
    # all-linear: 7 projections x 2 layers, each with A and B; the optimizer holds exactly those.
    assert len(trainable) == 28
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == 28


def test_adapters_start_at_zero_kl_is_0_and_ratio_is_1(tmp_path):
    """B = 0: the policy is its base, so the first step's log-probs equal the reference's bit for bit (KL exactly
    0), and the update's first ratio is exactly 1 (no clipping, approx KL 0)."""
    trainer = _trainer(tmp_path, *ONE_PASS, "trainer.max_steps=2", "trainer.warmup_steps=0")
    b_weights = [p for n, p in trainer.models.policy.named_parameters() if ".lora_B." in n]
    assert all(bool((p == 0).all()) for p in b_weights)
    history = trainer.train()
    first = history[0]
    assert first["kl"] == 0.0
    assert first["policy/approxkl"] == 0.0 and first["policy/clipfrac"] == 0.0
    assert first["policy/grad_norm"] > 0
    assert any(bool((p != 0).any()) for p in b_weights)  # the update moved the adapters
    assert history[1]["kl"] != 0.0


def test_reference_is_the_base_model_with_adapters_disabled(tmp_path):
    """After two updates the policy differs from its base, and the reference's log-probs are those of a freshly
    loaded base model, exactly."""
    from rlhf.models import load_causal_lm

    trainer = _trainer(tmp_path, "trainer.max_steps=2")
    trainer.train()
    base = load_causal_lm("builtin:tiny", trainer.models.tokenizer, seed=0).eval()
    policy = trainer.models.policy.eval()
    expected = _logprobs(base, IDS)
    assert torch.equal(_logprobs(trainer.models.reference, IDS), expected)
    assert not torch.allclose(_logprobs(policy, IDS), expected, atol=1e-4)
    # disable_adapter is a context: the adapters are on again outside the reference's forward
    assert not torch.equal(_logprobs(policy, IDS), _logprobs(trainer.models.reference, IDS))


def test_checkpoint_holds_adapters_and_resume_continues_exactly(tmp_path):
    """4 steps with a checkpoint at step 2; resumed from it, steps 2 and 3 log the same metrics. The checkpoint
    holds the adapters (no full weights) and AdamW's state of the trained parameters only."""
    common = ["trainer.max_steps=4", "trainer.save_every=2", "trainer.keep_last=5"]
    full = _trainer(tmp_path, *common).train()
    step2 = tmp_path / "run" / "checkpoints" / "step_2"
    files = set(os.listdir(step2 / "policy"))
    assert {"adapter_config.json", "adapter_model.safetensors", "rlhf_base.json", "config.json"} <= files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files)
    state = torch.load(step2 / "trainer_state.pt", weights_only=False)
    assert len(state["optimizer"]["state"]) == 28  # the LoRA A and B matrices, nothing of the base
    (tmp_path / "other" / "checkpoints").mkdir(parents=True)
    shutil.copytree(step2, tmp_path / "other" / "checkpoints" / "step_2")
    resumed = _trainer(tmp_path, *common, "trainer.resume=auto", name="other")
    assert resumed.start_step == 2
    tail = resumed.train()
    assert [m["step"] for m in tail] == [2, 3]
    for a, b in zip(full[2:], tail):
        for key in a:
            if not key.startswith("time/"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_merged_export_equals_the_adapter_model_and_loads_without_peft(tmp_path):
    """scripts/export.py folds the adapters into the weights: the merged folder loads with AutoModelForCausalLM in a
    process where peft cannot be imported, and gives the adapter model's logits."""
    trainer = _trainer(tmp_path, "trainer.max_steps=2")
    trainer.train()
    policy = trainer.models.policy.eval()
    with torch.no_grad():
        expected = policy(input_ids=IDS).logits
    checkpoint = tmp_path / "run" / "checkpoints" / "step_2"
    out = tmp_path / "merged"
    proc = run_script(["scripts/export.py", str(checkpoint), str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / "adapter_config.json").exists()
    probe = textwrap.dedent(f"""
        import sys
        sys.modules["peft"] = None  # peft not installed
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
        with torch.no_grad():
            torch.save(model(input_ids=torch.tensor({IDS.tolist()})).logits, {str(tmp_path / 'logits.pt')!r})
    """)
    proc = run_script(["-c", probe], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(tmp_path / "logits.pt")
    # W + s * B @ A computed once instead of W x + s * B (A x): float32 rounding only.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, trainer.models.reference(input_ids=IDS).logits, atol=1e-4)


def test_ppo_with_lora_keeps_a_separate_full_critic(tmp_path):
    """PPO's critic stays a model of its own (the policy backbone's copy + a zero head, all of it trained); the
    policy's base is still shared with the reference."""
    trainer = _trainer(tmp_path, "algorithm=ppo", "trainer.max_steps=1", "trainer.value_lr=1e-3")
    value = trainer.models.value
    assert all(p.requires_grad for p in value.parameters())
    assert not set(_storages(value)) & set(_storages(trainer.models.policy))
    history = trainer.train()
    assert history[0]["kl"] == 0.0 and "value/loss" in history[0]


# ---------------------------------------------------------------------------------------------- stages
def _stage(name, tmp_path, *overrides):
    from rlhf.trainers.reward import train_reward
    from rlhf.trainers.sft import train_sft

    validate = {"sft": validate_sft_config, "reward": validate_reward_config}[name]
    quick = ["trainer.max_steps=3", "trainer.warmup_steps=0", "trainer.batch_size=8", "data.num_train=32",
             "data.num_eval=8", "logging.progress=false", "logging.tensorboard=false", "trainer.torch_threads=1"]
    cfg = validate(compose_config(name, [*quick, "model.lora.r=4", *overrides], run_dir=str(tmp_path / name)))
    return cfg, (train_sft if name == "sft" else train_reward)(cfg)


def test_sft_with_lora_writes_merged_final_and_adapters_both_usable_as_the_policy(tmp_path):
    """SFT with LoRA: final/ is the merged model, adapter/ the adapters; the policy trainer takes either as
    model.policy and starts from the same weights (pipeline.sh hands one or the other on)."""
    from rlhf.models import load_causal_lm, load_tokenizer

    _stage("sft", tmp_path)
    final, adapter = tmp_path / "sft" / "final", tmp_path / "sft" / "adapter"
    assert (final / "model.safetensors").exists() and not (final / "adapter_config.json").exists()
    assert json.loads((adapter / "rlhf_base.json").read_text()) == {"spec": "builtin:tiny", "seed": 0,
                                                                    "head": "causal_lm"}
    tok = load_tokenizer(str(final))
    a, b = load_causal_lm(str(final), tok).eval(), load_causal_lm(str(adapter), tok).eval()
    torch.testing.assert_close(_logprobs(b, IDS), _logprobs(a, IDS), rtol=0, atol=0)
    base = load_causal_lm("builtin:tiny", tok).eval()
    assert not torch.allclose(_logprobs(base, IDS), _logprobs(a, IDS), atol=1e-4)  # SFT moved it
    trainer = _trainer(tmp_path, f"model.policy={adapter}", "trainer.max_steps=1")
    assert torch.equal(_logprobs(trainer.models.reference, IDS), _logprobs(a, IDS))


def test_reward_with_lora_trains_the_score_head_in_full(tmp_path):
    from rlhf.models import load_score_model, load_tokenizer, score_head, sequence_scores

    _stage("reward", tmp_path)
    final = tmp_path / "reward" / "final"
    tok = load_tokenizer(str(final))
    initial = load_score_model("builtin:tiny", tok, seed=0)
    trained = load_score_model(str(final), tok)
    assert not torch.equal(score_head(trained).weight, score_head(initial).weight)
    from_adapter = load_score_model(str(tmp_path / "reward" / "adapter"), tok)
    mask = torch.ones_like(IDS)
    torch.testing.assert_close(sequence_scores(from_adapter, IDS, mask), sequence_scores(trained, IDS, mask))


# ---------------------------------------------------------------------------------------------- distributed
# tests/test_distributed.py's 4-step trajectory with LoRA: 1 process at batch 8 against 2 gloo DDP processes at
# batch 4, each in 2 accumulated micro-batches; a checkpoint after step 2.
LORA_TRAJECTORY = [*FAST, *LORA, "trainer.ppo_epochs=2", "trainer.max_steps=4", "trainer.save_every=2",
                   "trainer.keep_last=5", "trainer.sample_every=0", "trainer.warmup_steps=0"]


@pytest.mark.slow
def test_lora_two_ddp_processes_follow_the_one_process_trajectory_and_resume_either_way(tmp_path):
    """DDP reduces the adapters' gradients only (the base is frozen on every process); the 2-process run follows the
    1-process one within test_distributed's tolerance, and each run's step-2 adapter checkpoint resumed with the
    other process count continues the same trajectory."""
    from tests.test_distributed import (
        _assert_same_trajectory,
        _copy_checkpoint,
        _train_one_process,
        _train_two_processes,
    )

    one = _train_one_process(tmp_path / "one", *LORA_TRAJECTORY)
    two = _train_two_processes(tmp_path / "two", *LORA_TRAJECTORY, "trainer.grad_accum=2")
    assert one[0]["kl"] == 0.0 and two[0]["kl"] == 0.0
    assert one[-1]["kl"] != pytest.approx(0.0, abs=1e-6)  # the adapters moved: the comparison is not trivial
    _assert_same_trajectory(one, two)
    _copy_checkpoint(tmp_path / "two", tmp_path / "two_to_one", 2)
    _assert_same_trajectory(one[2:], _train_one_process(tmp_path / "two_to_one", *LORA_TRAJECTORY,
                                                        "trainer.resume=auto"))
    _copy_checkpoint(tmp_path / "one", tmp_path / "one_to_two", 2)
    _assert_same_trajectory(one[2:], _train_two_processes(tmp_path / "one_to_two", *LORA_TRAJECTORY,
                                                          "trainer.resume=auto", "trainer.grad_accum=2"))


@pytest.mark.slow
def test_lora_under_fsdp2_follows_the_one_process_trajectory_and_resumes_with_one_process(tmp_path):
    """Two FSDP2 gloo processes (tests/fsdp2_worker.py) shard the frozen base and the adapters alike: the same
    trajectory as one plain process, and its step-2 adapter checkpoint (AdamW state by name, adapters only) resumed by
    one plain process continues it. Decoding runs through peft's inner model, never the FSDP root's forward
    (rlhf.runtime.distributed.gathered_for_generation initialises the root first)."""
    from tests.test_distributed import (
        _assert_same_trajectory,
        _copy_checkpoint,
        _train_fsdp2,
        _train_one_process,
    )

    one = _train_one_process(tmp_path / "one", *LORA_TRAJECTORY)
    two = _train_fsdp2(tmp_path / "fsdp2", *LORA_TRAJECTORY, "trainer.grad_accum=2")
    assert one[-1]["kl"] != pytest.approx(0.0, abs=1e-6)
    _assert_same_trajectory(one, two)
    state = torch.load(tmp_path / "fsdp2" / "checkpoints" / "step_2" / "trainer_state.pt", weights_only=False)
    assert len(state["optimizer"]["by_name"]["state"]) == 28 and all(
        ".lora_A." in k or ".lora_B." in k for k in state["optimizer"]["by_name"]["state"])
    _copy_checkpoint(tmp_path / "fsdp2", tmp_path / "fsdp2_to_one", 2)
    _assert_same_trajectory(one[2:], _train_one_process(tmp_path / "fsdp2_to_one", *LORA_TRAJECTORY,
                                                        "trainer.resume=auto"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_lora_policy_decodes_through_a_plain_merged_copy(dtype):
    """rollout.hf.dtype set (the policy's own float32 included): the engine decodes with a plain transformers model
    holding W + alpha / r * B @ A, no peft wrappers, whose logits are the peft policy's (float32: to rounding; bf16:
    the merged weights rounded once), and each sync_weights refreshes it in place after the adapters move."""
    from omegaconf import OmegaConf

    from rlhf.lora import add_lora, is_peft_model
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.rollout.hf import HFEngine

    tok = load_tokenizer("builtin:words")
    lora = OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear",
                             "modules_to_save": None})
    policy = add_lora(load_causal_lm("builtin:tiny", tok), lora, "builtin:tiny", seed=0).eval()
    engine = HFEngine(policy, tok, dtype=dtype)
    copy = engine.policy
    assert not is_peft_model(copy) and type(copy) is type(policy.get_base_model())
    assert {p.dtype for p in copy.parameters()} == {dtype} and not any(p.requires_grad for p in copy.parameters())
    # bf16: the whole forward runs in bf16 (8-bit mantissa), so single logits move by up to ~0.1, the mean far less
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.15}
    for _ in range(2):  # fresh adapters (B = 0), then adapters that moved
        with torch.no_grad():
            expected = policy(input_ids=IDS).logits
            got = copy(input_ids=IDS).logits.float()
        torch.testing.assert_close(got, expected, **tol)
        assert (got - expected).abs().mean() < (1e-6 if dtype == torch.float32 else 0.01)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.5)
        engine.sync_weights(policy)
        assert engine.policy is copy  # refreshed in place, not rebuilt
    with torch.no_grad():
        moved = (copy(input_ids=IDS).logits.float() - load_causal_lm("builtin:tiny", tok)(input_ids=IDS).logits)
    assert moved.abs().max() > 0.1  # the adapters' change reached the copy
