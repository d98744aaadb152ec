"""What the policy trainer needs before its first step, as functions: the checkpoint to resume, the prompts and their
length check, the models of the run, the optimizer and the rollout engine.

Each problem a user can fix is found here with a one-line error, and data problems before any weights load.
"""

from __future__ import annotations

import copy
import os

import torch
from omegaconf import DictConfig

from rlhf.config import ConfigError
from rlhf.lora import AdapterDisabled
from rlhf.models import (
    BUILTIN_ARCHS,
    BUILTIN_PREFIX,
    Models,
    autocast_weights,
    check_tokenizer_fits,
    checkpoint_activations,
    freeze,
    is_builtin,
    load_causal_lm,
    load_score_model,
    load_tokenizer,
    value_model_from_policy,
)
from rlhf.rewards.sources import RewardSources, score_model_loader


def context_length(spec: str) -> int | None:
    """The policy's context in tokens, read from its config without loading weights; None when it has no limit."""
    if is_builtin(spec) and spec[len(BUILTIN_PREFIX):] in BUILTIN_ARCHS:
        return BUILTIN_ARCHS[spec[len(BUILTIN_PREFIX):]].get("max_position_embeddings")
    from transformers import AutoConfig

    from rlhf.models import resolve_spec

    return getattr(AutoConfig.from_pretrained(os.path.expanduser(resolve_spec(spec))), "max_position_embeddings",
                   None)


def load_prompts(cfg: DictConfig) -> list[str]:
    from omegaconf import OmegaConf

    from rlhf.data import load_prompts as load

    d = cfg.data
    options = OmegaConf.to_container(d.options) if d.get("options") is not None else None
    return load(d.prompts, column=d.prompt_column, split=d.split, n=d.num_prompts, seed=cfg.seed, options=options)


def check_prompt_lengths(cfg: DictConfig, prompts: list[str], tok, add_special_tokens: bool = True) -> None:
    """Prompts longer than data.max_prompt_length are refused, not truncated (a cut prompt is silently another
    task), and the longest allowed prompt plus the response must fit the policy's context."""
    from rlhf.data import DataError

    d, new_tokens = cfg.data, cfg.rollout.max_new_tokens
    limit = d.max_prompt_length
    ctx = context_length(cfg.model.policy)
    if ctx is not None and limit + new_tokens > ctx:
        raise ConfigError(f"data.max_prompt_length: {limit} + rollout.max_new_tokens {new_tokens} exceeds the "
                          f"policy's context of {ctx} tokens; lower one of them")
    lengths = [len(ids) for ids in tok(prompts, add_special_tokens=add_special_tokens)["input_ids"]]
    for i, n in enumerate(lengths):
        if n > limit:
            raise DataError(f"data.max_prompt_length: prompt {i} (0-based) of {d.prompts!r} has {n} tokens > "
                            f"{limit}; prompts are refused, not truncated: shorten or drop it, or raise "
                            "data.max_prompt_length")


def load_policy_tokenizer(cfg: DictConfig):
    """The tokenizer of the policy (``model.tokenizer``, else the policy's own), checked against the policy."""
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.policy)
    check_tokenizer_fits(tokenizer, cfg.model.policy, cfg.model.tokenizer)
    return tokenizer


def load_models(cfg: DictConfig, tok, resume_from: str | None, zero_stage: int | None
                ) -> tuple[Models, RewardSources]:
    """Policy, frozen reference (when a KL is measured), the reward sources (reward models on the CPU until the
    trainer places them), critic (PPO). ``Models.reward`` / ``reward_tokenizer`` are the ``model.reward``
    shorthand's. With ``model.lora`` the policy is the base wrapped in LoRA adapters (from the checkpoint when
    resuming) and the reference is the same module with its adapters disabled: one copy of the base weights."""
    m = cfg.model
    lora = m.get("lora") is not None
    if lora and zero_stage == 3:
        raise ConfigError("model.lora: ZeRO-3 partitions the base weights that the reference view shares with the "
                          "policy; use ZeRO-2, FSDP2 or DDP with LoRA")
    policy_spec = os.path.join(resume_from, "policy") if resume_from and not lora else m.policy
    policy = load_causal_lm(policy_spec, tok, m.dtype, seed=cfg.seed)
    needs_reference = cfg.kl.beta > 0 or cfg.kl.log_at_zero_beta or cfg.kl.controller == "adaptive"
    reference = None
    if needs_reference and not lora:
        # The reference is the starting policy, also when the policy itself comes from a checkpoint. Under
        # ZeRO-3 transformers builds models already partitioned (zero.Init), and those cannot be deep-copied.
        copyable = not resume_from and zero_stage != 3
        reference = freeze(copy.deepcopy(policy) if copyable
                           else load_causal_lm(m.policy, tok, m.dtype, seed=cfg.seed))
        if cfg.trainer.mixed_precision == "bf16" and zero_stage != 3:  # it only runs under autocast
            reference = autocast_weights(reference)  # same products as the policy's autocast forward, half the bytes
    rewards = RewardSources.from_config(cfg, tok, score_model_loader(m.dtype, cfg.seed))
    reward, reward_tok = rewards.reward_model()
    value = None
    if cfg.algorithm.critic:
        # Before the adapters go on: a critic from the policy copies the plain base (a model of its own, see README)
        value = load_critic(cfg, tok, policy, reward, reward_tok, resume_from)
        value.train()
    if cfg.trainer.gradient_checkpointing:  # after the copies above: the frozen reference has no backward
        checkpoint_activations(policy)
        if value is not None:
            checkpoint_activations(value)
    if lora:
        policy = lora_policy(cfg, policy, resume_from)
        reference = AdapterDisabled(policy) if needs_reference else None
    policy.train()
    return Models(policy, reference, reward, value, tok, reward_tok), rewards


def lora_policy(cfg: DictConfig, base, resume_from: str | None):
    """``base`` (the model ``model.policy`` names) in LoRA adapters: fresh ones (B = 0: the policy starts as the
    base), or the checkpoint's when resuming. Only the adapters (and model.lora.modules_to_save) train."""
    from rlhf.lora import add_lora, load_adapter

    if resume_from:
        return load_adapter(base, os.path.join(resume_from, "policy"), True, cfg.model.policy, cfg.seed)
    return add_lora(base, cfg.model.lora, cfg.model.policy, cfg.seed)


def load_critic(cfg: DictConfig, tok, policy, reward, reward_tok, resume_from: str | None):
    """PPO's critic: from the checkpoint when resuming; else ``model.value``; else a copy of the reward model when
    it shares the policy's tokenizer; else the policy's backbone with a zero scalar head."""
    m = cfg.model
    if resume_from:
        return load_score_model(os.path.join(resume_from, "value"), tok, m.dtype, key="trainer.resume")
    if m.value is not None and m.value != "policy":
        return load_score_model(m.value, tok, m.dtype, seed=cfg.seed, key="model.value")
    if m.value is None and reward is not None and reward_tok is None:
        return copy.deepcopy(reward).requires_grad_(True)
    return value_model_from_policy(policy, tok)


def build_optimizer(cfg: DictConfig, policy, critic) -> torch.optim.Optimizer:
    """One AdamW: the policy's trainable parameters at ``trainer.lr``, then the critic's at ``trainer.value_lr``."""
    t = cfg.trainer
    groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": t.lr}]
    if critic is not None:
        groups.append({"params": [p for p in critic.parameters() if p.requires_grad], "lr": t.value_lr})
    return torch.optim.AdamW(groups, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
