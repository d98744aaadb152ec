"""The policy trainer's config schema and its validation.

The YAML files under ``configs/`` hold the defaults and a comment on every field; the dataclasses here hold the
types. ``validate_policy_config`` merges the two, so an unknown key or a value of the wrong type fails with one line
that names the key, and then checks the values that no type can express (beta >= 0, divisibility, ...). All of it
runs before any model loads.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config that cannot run. The message is one line and starts with the offending key."""


@dataclass
class ModelConfig:
    policy: str = MISSING
    tokenizer: str | None = None
    reward: str | None = None
    reward_tokenizer: str | None = None
    value: str | None = None
    dtype: str = "float32"


@dataclass
class AlgorithmConfig:
    name: str = MISSING
    advantage: str = MISSING
    policy_loss: str = MISSING
    critic: bool = MISSING
    gamma: float = 1.0
    lam: float = 1.0
    std_normalize: bool = False


@dataclass
class DataConfig:
    prompts: str = MISSING
    prompt_column: str = "prompt"
    split: str = "train"
    num_prompts: int = 2048
    max_prompt_length: int = 64


@dataclass
class RewardConfig:
    function: str | None = None
    function_weight: float = 1.0
    model_weight: float = 1.0
    gold: str | None = None
    missing_eos_penalty: float | None = None
    clip: float | None = None


@dataclass
class RolloutConfig:
    prompts_per_step: int = MISSING
    samples_per_prompt: int = MISSING
    max_new_tokens: int = MISSING
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    engine: str = "hf"
    logprob_chunk_size: int = 1024


@dataclass
class KLConfig:
    beta: float = MISSING
    in_reward: bool = True
    estimator: str = "k1"
    controller: str = "fixed"
    target: float = 6.0
    horizon: int = 10000
    log_at_zero_beta: bool = False


@dataclass
class TrainerConfig:
    max_steps: int = MISSING
    ppo_epochs: int = 1
    minibatches: int = 1
    grad_accum: int = 1
    lr: float = 1e-5
    value_lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    scheduler: str = "constant_with_warmup"
    max_grad_norm: float | None = 1.0
    clip_low: float = 0.2
    clip_high: float | None = None
    value_clip: float | None = 0.2
    value_coef: float = 0.5
    value_loss: str = "mse"
    loss_agg: str = "token-mean"
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    max_nonfinite_steps: int = 3
    log_every: int = 1
    sample_every: int = 10
    save_every: int = 0
    keep_last: int = 2
    resume: str | None = None
    cpu: bool = False
    mixed_precision: str = "no"
    torch_threads: int | None = None


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "rlhf"
    progress: bool = True


@dataclass
class PolicyConfig:
    seed: int = 0
    run_dir: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _typed(cfg: DictConfig, schema: type) -> DictConfig:
    """Merge ``cfg`` into the schema: unknown keys and wrong types become a one-line ConfigError."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{missing[0]}: required value is missing")
        OmegaConf.resolve(merged)
        return merged
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        msg = str(e).splitlines()[0]
        if "not in" in msg and "Key" in msg:
            msg = "unknown key"
        raise ConfigError(f"{key}: {msg}") from None


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _check_choice(value: Any, key: str, choices: list[str]) -> None:
    _check(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")


def import_function(path: str, key: str):
    """``pkg.module.fn`` (or ``pkg.module:fn``) -> the callable; a one-line error naming ``key`` otherwise."""
    mod_name, _, attr = path.replace(":", ".").rpartition(".")
    _check(bool(mod_name), key, f"{path!r} is not a dotted path like pkg.module.fn")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}: cannot import {path!r} ({e})") from None
    _check(callable(fn), key, f"{path!r} is not callable")
    return fn


def validate_policy_config(cfg: DictConfig, world_size: int = 1) -> DictConfig:
    """Type-check and value-check a composed policy config. Returns the typed, resolved config.

    Raises ConfigError with a message ``"<key>: <problem>"``.
    """
    from rlhf.advantages import ADVANTAGE_ESTIMATORS
    from rlhf.kl import KL_CONTROLLERS, KL_ESTIMATORS
    from rlhf.models import DTYPES, check_spec
    from rlhf.objectives import AGGREGATION_MODES, POLICY_LOSSES

    cfg = _typed(cfg, PolicyConfig)
    r, k, t, a = cfg.rollout, cfg.kl, cfg.trainer, cfg.algorithm

    _check(r.prompts_per_step > 0, "rollout.prompts_per_step", "must be > 0")
    _check(r.samples_per_prompt > 0, "rollout.samples_per_prompt", "must be > 0")
    _check(r.prompts_per_step % world_size == 0, "rollout.prompts_per_step",
           f"{r.prompts_per_step} prompts do not split over {world_size} processes")
    _check(r.max_new_tokens > 0, "rollout.max_new_tokens", "must be > 0")
    _check(0 <= r.min_new_tokens <= r.max_new_tokens, "rollout.min_new_tokens",
           f"must be in [0, rollout.max_new_tokens={r.max_new_tokens}]")
    _check(r.temperature > 0, "rollout.temperature", "must be > 0")
    _check(r.top_k >= 0, "rollout.top_k", "must be >= 0")
    _check(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    _check_choice(r.engine, "rollout.engine", ["hf"])
    _check(r.logprob_chunk_size > 0, "rollout.logprob_chunk_size", "must be > 0")

    _check(k.beta >= 0, "kl.beta", f"must be >= 0, got {k.beta}")
    _check_choice(k.estimator, "kl.estimator", KL_ESTIMATORS.names())
    _check_choice(k.controller, "kl.controller", KL_CONTROLLERS.names())
    _check(k.target > 0, "kl.target", f"must be > 0, got {k.target}")
    _check(k.horizon > 0, "kl.horizon", "must be > 0")
    _check(not (k.controller == "adaptive" and k.beta == 0), "kl.beta",
           "the adaptive controller cannot move a beta of 0; start it above 0")

    _check_choice(a.advantage, "algorithm.advantage", ADVANTAGE_ESTIMATORS.names())
    _check_choice(a.policy_loss, "algorithm.policy_loss", POLICY_LOSSES.names())
    _check(0 <= a.gamma <= 1, "algorithm.gamma", "must be in [0, 1]")
    _check(0 <= a.lam <= 1, "algorithm.lam", "must be in [0, 1]")
    _check(not (a.advantage == "gae" and not a.critic), "algorithm.critic", "gae needs a critic (critic=true)")
    _check(not (a.advantage in ("rloo", "grpo") and r.samples_per_prompt < 2), "rollout.samples_per_prompt",
           f"{a.advantage} needs at least 2 samples per prompt for its group baseline")

    n_rollouts = r.prompts_per_step * r.samples_per_prompt // world_size
    _check(t.max_steps > 0, "trainer.max_steps", "must be > 0")
    _check(t.ppo_epochs > 0, "trainer.ppo_epochs", "must be > 0")
    _check(t.minibatches > 0 and t.grad_accum > 0, "trainer.minibatches", "minibatches and grad_accum must be > 0")
    _check(n_rollouts % (t.minibatches * t.grad_accum) == 0, "trainer.minibatches",
           f"{n_rollouts} rollouts per process do not split into {t.minibatches} minibatches x "
           f"{t.grad_accum} micro-batches")
    _check(t.lr > 0 and t.value_lr > 0, "trainer.lr", "learning rates must be > 0")
    _check(t.clip_low > 0, "trainer.clip_low", "must be > 0")
    _check(t.clip_high is None or t.clip_high > 0, "trainer.clip_high", "must be > 0 or null")
    _check(t.max_grad_norm is None or t.max_grad_norm > 0, "trainer.max_grad_norm", "must be > 0 or null")
    _check_choice(t.value_loss, "trainer.value_loss", ["mse", "huber"])
    _check_choice(t.loss_agg, "trainer.loss_agg", list(AGGREGATION_MODES))
    _check_choice(t.scheduler, "trainer.scheduler", ["constant", "constant_with_warmup", "linear", "cosine"])
    _check_choice(t.mixed_precision, "trainer.mixed_precision", ["no", "bf16", "fp16"])
    _check(t.keep_last >= 1, "trainer.keep_last", "must be >= 1")
    _check(t.save_every >= 0 and t.sample_every >= 0 and t.log_every >= 1, "trainer.save_every",
           "save_every and sample_every must be >= 0, log_every >= 1")
    _check(t.max_nonfinite_steps >= 0, "trainer.max_nonfinite_steps", "must be >= 0")
    _check(len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas), "trainer.adam_betas",
           "must be two numbers in [0, 1)")

    _check_choice(cfg.model.dtype, "model.dtype", list(DTYPES))
    _check(cfg.model.reward is not None or cfg.reward.function is not None, "reward.function",
           "no reward: set model.reward or reward.function")
    _check(cfg.data.max_prompt_length > 0, "data.max_prompt_length", "must be > 0")
    for key in ("policy", "tokenizer", "reward", "reward_tokenizer", "value"):
        spec = cfg.model[key]
        if spec is not None:
            try:
                check_spec(spec, f"model.{key}")
            except ValueError as e:
                raise ConfigError(str(e)) from None
    for key in ("function", "gold"):
        if cfg.reward[key] is not None:
            import_function(cfg.reward[key], f"reward.{key}")
    return cfg
