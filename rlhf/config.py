"""The policy trainer's config schema and its validation.

The YAML files under ``configs/`` hold the defaults and a comment on every field; the dataclasses here hold the
types. ``validate_policy_config`` merges the two, so an unknown key or a value of the wrong type fails with one line
that names the key, and then checks the values that no type can express (beta >= 0, divisibility, ...). All of it
runs before any model loads.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config that cannot run. The message is one line and starts with the offending key."""


AUTO = "auto"
"""``reward.function`` / ``reward.gold`` value: the built-in task's function when the prompts are a built-in task's
(``data.prompts=builtin:<task>``), else none."""

# Learning rates that fields left null get (resolve_policy_defaults, resolve_stage_defaults). A random-init built-in
# model learns the built-in task only with a high rate; the same rate destroys a pretrained model in a few steps, which
# gets the rates that TRL, OpenRLHF and veRL use for RL (1e-6; a fresh critic head needs more) and for SFT / reward
# models (2e-5 / 1e-5).
RANDOM_INIT_LR = {"policy": 1e-3, "value": 1e-3, "sft": 3e-3, "reward": 1e-3, "dpo": 1e-3}
PRETRAINED_LR = {"policy": 1e-6, "value": 1e-5, "sft": 2e-5, "reward": 1e-5, "dpo": 1e-6}
# LoRA adapters of a pretrained model (model.lora) learn at about 10x the full-weight rate (Schulman et al. 2025,
# "LoRA without regret"; 2e-4 is the usual LoRA SFT rate): B starts at zero and alpha / r scales the update, so at
# 1e-6 an RL run barely moves. A random-init model's rates are already high and stay as they are; the critic, a full
# model, keeps its rate.
LORA_LR_SCALE = 10.0


def default_lr(random_init: bool, which: str, lora: Any) -> float:
    """The learning rate a null ``trainer.lr`` (``which`` "policy", "sft", "reward") or ``trainer.value_lr``
    ("value") gets: RANDOM_INIT_LR or PRETRAINED_LR, the latter times LORA_LR_SCALE for LoRA adapters."""
    from rlhf.lora import lora_enabled

    if random_init:
        return RANDOM_INIT_LR[which]
    return PRETRAINED_LR[which] * (LORA_LR_SCALE if which != "value" and lora_enabled(lora) else 1.0)


# The dataclasses below are schemas only: a field's type, and MISSING where a value would go. Every default lives in
# the YAML (configs/), next to the comment that explains it, so there is one value to change and nothing to drift
# (tests/test_config_schema.py checks that the YAML's keys are exactly these fields). The exceptions, each said where
# it stands: None where it means "unset" (AlgorithmConfig), the items of a list (RewardSourceConfig), and the three
# TrainerConfig fields that code building a TrainerConfig without YAML reads (make_accelerator).
@dataclass
class LoraSettings:  # model.lora (rlhf.lora); r null = full fine-tuning
    r: int | None = MISSING
    alpha: float | None = MISSING
    dropout: float = MISSING
    target_modules: Any = MISSING  # "all-linear" or a list of module names
    modules_to_save: list[str] | None = MISSING


@dataclass
class ModelConfig:
    policy: str = MISSING
    tokenizer: str | None = MISSING  # null = the policy's own
    reward: str | None = MISSING
    reward_tokenizer: str | None = MISSING
    value: str | None = MISSING
    dtype: str = MISSING
    lora: LoraSettings | None = MISSING


@dataclass
class AlgorithmConfig:
    advantage: str = MISSING
    policy_loss: str = MISSING
    critic: bool = MISSING
    # The estimator's hyperparameters: None = unset. The advantage estimator declares which it reads
    # (rlhf.core.advantages.AdvantageInfo.reads); validation requires those and refuses the others, so an
    # algorithm preset sets what its estimator reads and leaves the rest null.
    gamma: float | None = None
    lam: float | None = None
    std_normalize: bool | None = None
    is_correction: str = MISSING
    is_cap: float = MISSING


@dataclass
class DataConfig:
    prompts: str = MISSING
    prompt_column: str = MISSING
    split: str = MISSING
    num_prompts: int | None = MISSING
    max_prompt_length: int = MISSING
    options: dict[str, Any] = MISSING  # a built-in task's options; each task checks its own keys
    chat_template: Any = MISSING  # auto | true | false (rlhf.chat.chat_mode checks it)
    system_prompt: str | None = MISSING


@dataclass
class RewardSourceConfig:
    # An item of the reward.sources list keeps its defaults here: YAML gives a list no per-item defaults (policy.yaml
    # holds `sources: []` and a user writes only the keys one source needs), so the schema is their only home.
    type: str = MISSING
    name: str | None = None
    path: str | None = None
    url: str | None = None
    weight: float = 1.0
    tokenizer: str | None = None
    batch_size: int = 64
    timeout_s: float = 30.0
    retries: int = 3


@dataclass
class RewardConfig:
    sources: list[RewardSourceConfig] = MISSING
    function: str | None = MISSING  # AUTO = the built-in task's (resolve_policy_defaults)
    function_weight: float = MISSING
    model_weight: float = MISSING
    gold: str | None = MISSING
    missing_eos_penalty: float | None = MISSING
    clip: float | None = MISSING
    timeout_s: float | None = MISSING
    overlong_buffer: float | None = MISSING  # tokens (int >= 1) or a share of rollout.max_new_tokens (float < 1)
    overlong_factor: float = MISSING


@dataclass
class VLLMConfig:  # rollout.vllm: a mapping in policy.yaml, so each field has its YAML default like any other
    dtype: str = MISSING
    gpu_memory_utilization: float = MISSING
    enforce_eager: bool = MISSING
    cpu_kv_cache_gb: int = MISSING


@dataclass
class HFEngineConfig:  # rollout.hf
    dtype: str = MISSING


@dataclass
class RolloutConfig:
    prompts_per_step: int = MISSING
    samples_per_prompt: int = MISSING
    max_new_tokens: int = MISSING
    min_new_tokens: int = MISSING
    temperature: float = MISSING
    top_k: int = MISSING
    top_p: float = MISSING
    min_p: float = MISSING
    sampler: str = MISSING
    engine: str = MISSING
    hf: HFEngineConfig = field(default_factory=HFEngineConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    logprob_chunk_size: int | None = MISSING
    gather_for_generation: bool = MISSING
    max_resample_rounds: int = MISSING


@dataclass
class KLConfig:
    beta: float = MISSING
    in_reward: bool = MISSING
    estimator: str = MISSING
    controller: str = MISSING
    target: float = MISSING
    horizon: int = MISSING
    log_at_zero_beta: bool | None = MISSING  # null = auto (resolve_policy_defaults)
    loss_correction: str = MISSING


@dataclass
class TrainerConfig:
    max_steps: int = MISSING
    ppo_epochs: int = MISSING
    minibatches: int = MISSING
    grad_accum: int = MISSING
    shuffle: str = MISSING
    lr: float | None = MISSING  # null = by the policy (resolve_policy_defaults)
    value_lr: float | None = MISSING  # null = by the policy; set, it is refused without a critic
    weight_decay: float = MISSING
    adam_betas: list[float] = MISSING
    warmup_steps: int = MISSING
    scheduler: str = MISSING
    max_grad_norm: float | None = MISSING
    clip_low: float = MISSING
    clip_high: float | None = MISSING
    value_clip: float | None = MISSING
    value_coef: float = MISSING
    value_loss: str = MISSING
    loss_agg: str = MISSING
    whiten_rewards: bool = MISSING
    whiten_advantages: bool = MISSING
    max_nonfinite_steps: int = MISSING
    log_every: int = MISSING
    sample_every: int = MISSING
    save_every: int = MISSING
    keep_last: int = MISSING
    resume: str | None = MISSING
    # What rlhf.runtime.accelerator.make_accelerator reads, kept so that a TrainerConfig(...) built in code (a test)
    # makes an Accelerator; tests/test_config_schema.py checks they equal policy.yaml's.
    cpu: bool = False
    mixed_precision: str = "no"
    gradient_checkpointing: bool = MISSING
    torch_threads: int | None = MISSING
    dist_timeout_s: int = 1800


@dataclass
class PolicyEvalConfig:  # eval: held-out evaluation in the loop (rlhf.trainers.policy_eval)
    every: int = MISSING
    prompts: str | None = MISSING
    split: str = MISSING
    num_prompts: int | None = MISSING
    samples: int = MISSING
    temperature: float | None = MISSING
    max_new_tokens: int | None = MISSING
    batch_size: int = MISSING


@dataclass
class LoggingConfig:
    tensorboard: bool = MISSING
    wandb: bool = MISSING
    wandb_project: str = MISSING
    progress: bool = MISSING


@dataclass
class PolicyConfig:
    seed: int = MISSING
    run_dir: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: PolicyEvalConfig = field(default_factory=PolicyEvalConfig)
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


MOVED_MODULES = {
    "rlhf.losses": "rlhf.core.losses", "rlhf.logprobs": "rlhf.core.logprobs", "rlhf.kl": "rlhf.core.kl",
    "rlhf.advantages": "rlhf.core.advantages", "rlhf.objectives": "rlhf.core.objectives",
    "rlhf.registry": "rlhf.core.registry", "rlhf.sampling": "rlhf.rollout.sampling",
    "rlhf.vllm_engine": "rlhf.rollout.vllm", "rlhf.trainer": "rlhf.trainers.policy", "rlhf.sft": "rlhf.trainers.sft",
    "rlhf.reward_trainer": "rlhf.trainers.reward", "rlhf.checkpoint": "rlhf.runtime.checkpoint",
    "rlhf.tracking": "rlhf.runtime.tracking", "rlhf.errors": "rlhf.runtime.errors", "rlhf.report": "rlhf.analysis.report",
    "rlhf.best_of_n": "rlhf.analysis.best_of_n", "rlhf.runtime": "rlhf.runtime.accelerator",
    "rlhf.rollout": "rlhf.rollout.batch, rlhf.rollout.hf, rlhf.rollout.forward or rlhf.rewards",
}
"""Modules of the flat 0.1 layout -> where their contents went, for dotted paths in older configs."""


def import_function(path: str, key: str):
    """``pkg.module.fn`` (or ``pkg.module:fn``) -> the callable; a one-line error naming ``key`` otherwise (and the
    new module, for a path into a module that has moved)."""
    mod_name, _, attr = path.replace(":", ".").rpartition(".")
    _check(bool(mod_name), key, f"{path!r} is not a dotted path like pkg.module.fn")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        if mod_name in MOVED_MODULES:
            raise ConfigError(f"{key}: {mod_name} has moved to {MOVED_MODULES[mod_name]}; write "
                              f"{MOVED_MODULES[mod_name].split(',')[0].split(' ')[0]}.{attr}") from None
        raise ConfigError(f"{key}: cannot import {path!r} ({e})") from None
    _check(callable(fn), key, f"{path!r} is not callable")
    return fn


def _multirun_sets(key: str) -> bool:
    """True inside a Hydra multirun job whose overrides set ``key`` (e.g. ``-m kl.beta=0,0.1,1``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hc = HydraConfig.get()
    return hc.mode == RunMode.MULTIRUN and any(
        o.split("=", 1)[0].lstrip("+~") == key for o in hc.overrides.task)


def resolve_policy_defaults(cfg: DictConfig, multirun_sets_beta: bool = False) -> list[str]:
    """Fill the fields whose default depends on the rest of the config, in place; returns ``key=value`` for each
    filled field, to be reported.

    - ``trainer.lr`` / ``trainer.value_lr`` null: RANDOM_INIT_LR for a random-init built-in policy
      (``builtin:tiny``, ...), PRETRAINED_LR for anything else (a folder, a hub id, ``builtin:smollm2``), the policy's
      times LORA_LR_SCALE with ``model.lora`` (:func:`default_lr`).
    - ``reward.function`` / ``reward.gold`` ``auto``: the built-in task's functions when ``data.prompts`` is
      ``builtin:<task>`` (rlhf.tasks.BUILTIN_TASKS), else null: a user's prompts never get the built-in scorer.
    - ``kl.log_at_zero_beta`` null: true in a Hydra multirun that sets ``kl.beta`` (its beta = 0 job is the
      unpenalised end of the frontier and needs its KL), false otherwise (a lone beta = 0 run loads no reference).
    """
    from rlhf.models import is_random_init
    from rlhf.tasks import builtin_task

    filled = []
    random_init = is_random_init(cfg.model.policy)
    for key, which in (("lr", "policy"), ("value_lr", "value")):
        if cfg.trainer[key] is None:
            cfg.trainer[key] = default_lr(random_init, which, cfg.model.get("lora"))
            if which == "policy" or cfg.algorithm.critic:  # a critic-free run never uses value_lr
                filled.append(f"trainer.{key}={cfg.trainer[key]:g}")
    task = builtin_task(cfg.data.prompts)
    for key in ("function", "gold"):
        if cfg.reward[key] == AUTO:
            cfg.reward[key] = task[key] if task is not None else None
            if cfg.reward[key] is not None:
                filled.append(f"reward.{key}={cfg.reward[key]}")
    if cfg.kl.log_at_zero_beta is None:
        cfg.kl.log_at_zero_beta = bool(multirun_sets_beta)
    return filled


def pretrained_defaults_line(cfg: DictConfig, filled: list[str]) -> str | None:
    """The one line a run with a pretrained policy prints about the defaults it was given, or None for a random-init
    built-in policy (whose defaults are the built-in task's by design)."""
    from rlhf.models import is_random_init

    if is_random_init(cfg.model.policy):
        return None
    used = [*filled, *([f"data.prompts={cfg.data.prompts}"] if cfg.data.prompts.startswith("builtin:") else [])]
    return (f"model.policy {cfg.model.policy} is pretrained; defaults in use: {', '.join(used) or 'none'} "
            "(set any of them to override)")


def validate_policy_config(cfg: DictConfig, world_size: int = 1, multirun_sets_beta: bool | None = None
                           ) -> DictConfig:
    """Type-check and value-check a composed policy config. Returns the typed, resolved config, with the
    config-dependent defaults filled (resolve_policy_defaults). ``multirun_sets_beta`` None: read from Hydra.

    Raises ConfigError with a message ``"<key>: <problem>"``.
    """
    from rlhf.models import check_spec

    cfg = _typed(cfg, PolicyConfig)
    value_lr_set = cfg.trainer.value_lr is not None  # the user's: resolve_policy_defaults fills a null one
    for key in ("policy", "tokenizer"):
        if cfg.model[key] is not None:
            try:
                check_spec(cfg.model[key], f"model.{key}")
            except ValueError as e:
                raise ConfigError(str(e)) from None
    filled = resolve_policy_defaults(cfg, _multirun_sets("kl.beta") if multirun_sets_beta is None
                                     else multirun_sets_beta)
    _check_rollout(cfg.rollout, world_size)
    _check_kl(cfg.kl)
    _check_algorithm(cfg, value_lr_set)
    _check_trainer(cfg.trainer, cfg.rollout, world_size)
    _check_eval(cfg.eval)
    _check_models_and_rewards(cfg)
    _check_lora(cfg.model, cfg.model.policy, "model.lora")
    if cfg.model.lora is not None:
        # Dropout would make the update's log-probs differ from the rollout's at ratio 1 (rlhf.models.disable_dropout)
        _check(cfg.model.lora.dropout == 0, "model.lora.dropout",
               "the policy trainer runs without dropout (rollout and update log-probs must agree); set 0")
    line = pretrained_defaults_line(cfg, filled)
    if line is not None and int(os.environ.get("RANK", "0")) == 0:
        log.info(line)
    return cfg


def _check_rollout(r: DictConfig, world_size: int) -> None:
    from rlhf.models import DTYPES
    from rlhf.rollout.engines import ENGINES
    from rlhf.rollout.spec import SamplingSpec
    from rlhf.rollout.vllm import VLLMUnavailable, require_vllm

    _check(r.prompts_per_step > 0, "rollout.prompts_per_step", "must be > 0")
    _check(r.samples_per_prompt > 0, "rollout.samples_per_prompt", "must be > 0")
    _check(r.prompts_per_step % world_size == 0, "rollout.prompts_per_step",
           f"{r.prompts_per_step} prompts do not split over {world_size} processes")
    _check(r.max_new_tokens > 0, "rollout.max_new_tokens", "must be > 0")
    _check(0 <= r.min_new_tokens <= r.max_new_tokens, "rollout.min_new_tokens",
           f"must be in [0, rollout.max_new_tokens={r.max_new_tokens}]")
    # rollout.temperature, top_k, top_p, min_p, sampler: SamplingSpec's own checks (one-line ConfigErrors).
    spec = SamplingSpec.from_config(r)
    _check_choice(r.engine, "rollout.engine", ENGINES.names())
    ENGINES.get(r.engine).check_spec(spec)  # e.g. vllm: min_p together with top_k/top_p
    _check_choice(r.hf.dtype, "rollout.hf.dtype", ["auto", *DTYPES])
    if r.engine == "vllm":
        _check_choice(r.vllm.dtype, "rollout.vllm.dtype", ["auto", *DTYPES])
        _check(0 < r.vllm.gpu_memory_utilization < 1, "rollout.vllm.gpu_memory_utilization", "must be in (0, 1)")
        _check(r.vllm.cpu_kv_cache_gb >= 1, "rollout.vllm.cpu_kv_cache_gb", "must be >= 1")
        try:
            require_vllm()
        except VLLMUnavailable as e:
            raise ConfigError(str(e)) from None
    _check(r.logprob_chunk_size is None or r.logprob_chunk_size > 0, "rollout.logprob_chunk_size",
           "must be > 0 or null")
    _check(r.max_resample_rounds >= 0, "rollout.max_resample_rounds", "must be >= 0")
    _check(r.max_resample_rounds == 0 or r.samples_per_prompt >= 2, "rollout.max_resample_rounds",
           "dynamic sampling drops groups whose samples all score the same, so it needs rollout.samples_per_prompt "
           f">= 2, got {r.samples_per_prompt}")


def _check_kl(k: DictConfig) -> None:
    from rlhf.core.correction import KL_LOSS_CORRECTIONS
    from rlhf.core.kl import KL_CONTROLLERS, KL_ESTIMATORS

    _check(k.beta >= 0, "kl.beta", f"must be >= 0, got {k.beta}")
    _check_choice(k.estimator, "kl.estimator", KL_ESTIMATORS.names())
    _check(k.in_reward or k.estimator != "k1", "kl.estimator",
           "k1 as a loss (kl.in_reward=false) has zero gradient in expectation (E[grad log pi] = 0 on the policy's "
           "samples), so it would not hold the policy near the reference; use k3 (GRPO's default) or k2")
    _check_choice(k.controller, "kl.controller", KL_CONTROLLERS.names())
    _check(k.target > 0, "kl.target", f"must be > 0, got {k.target}")
    _check(k.horizon > 0, "kl.horizon", "must be > 0")
    _check(not (k.controller == "adaptive" and k.beta == 0), "kl.beta",
           "the adaptive controller cannot move a beta of 0; start it above 0")
    _check_choice(k.loss_correction, "kl.loss_correction", list(KL_LOSS_CORRECTIONS))
    if k.loss_correction != "none":
        _check(not k.in_reward, "kl.loss_correction", "corrects the KL loss term, and kl.in_reward=true has none; "
               "set kl.in_reward=false or kl.loss_correction=none")
        _check(k.estimator in ("k1", "k3"), "kl.loss_correction",
               f"=is needs kl.estimator k1 or k3, got {k.estimator} (the importance-weighted k2 estimates "
               "E[(log r)^2 / 2], not the KL)")


def _check_algorithm(cfg: DictConfig, value_lr_set: bool) -> None:
    from rlhf.core.advantages import ADVANTAGE_ESTIMATORS
    from rlhf.core.correction import IS_CORRECTIONS
    from rlhf.core.objectives import POLICY_LOSSES

    a = cfg.algorithm
    _check_choice(a.advantage, "algorithm.advantage", ADVANTAGE_ESTIMATORS.names())
    _check_choice(a.policy_loss, "algorithm.policy_loss", POLICY_LOSSES.names())
    max_clip = POLICY_LOSSES.info(a.policy_loss).max_clip
    if max_clip is not None:
        t = cfg.trainer
        clip_high = t.clip_low if t.clip_high is None else t.clip_high
        _check(t.clip_low <= max_clip and clip_high <= max_clip, "trainer.clip_low",
               f"algorithm.policy_loss={a.policy_loss} clips a sequence-level ratio, which stays far closer to 1 than a "
               f"token's: clip_low={t.clip_low}, clip_high={clip_high} would hardly ever clip (limit {max_clip}); the "
               "GSPO paper uses trainer.clip_low=3e-4 trainer.clip_high=4e-4")
    _check_choice(a.is_correction, "algorithm.is_correction", list(IS_CORRECTIONS))
    _check(a.is_cap > 1, "algorithm.is_cap", f"must be > 1 (the weight cap C; 1/C is the lower band), got {a.is_cap}")
    _check_declarations(cfg, ADVANTAGE_ESTIMATORS.info(a.advantage), value_lr_set)


def _check_trainer(t: DictConfig, r: DictConfig, world_size: int) -> None:
    from rlhf.core.objectives import AGGREGATION_ALIASES, AGGREGATION_MODES
    from rlhf.rollout.sampling import SHUFFLES

    n_rollouts = r.prompts_per_step * r.samples_per_prompt // world_size
    _check(t.max_steps > 0, "trainer.max_steps", "must be > 0")
    _check(t.ppo_epochs > 0, "trainer.ppo_epochs", "must be > 0")
    _check(t.minibatches > 0 and t.grad_accum > 0, "trainer.minibatches", "minibatches and grad_accum must be > 0")
    _check(n_rollouts % (t.minibatches * t.grad_accum) == 0, "trainer.minibatches",
           f"{n_rollouts} rollouts per process do not split into {t.minibatches} minibatches x "
           f"{t.grad_accum} micro-batches")
    _check_choice(t.shuffle, "trainer.shuffle", SHUFFLES)
    _check(t.lr > 0 and t.value_lr > 0, "trainer.lr", "learning rates must be > 0")
    _check(t.clip_low > 0, "trainer.clip_low", "must be > 0")
    _check(t.clip_high is None or t.clip_high > 0, "trainer.clip_high", "must be > 0 or null")
    _check(t.max_grad_norm is None or t.max_grad_norm > 0, "trainer.max_grad_norm", "must be > 0 or null")
    _check_choice(t.value_loss, "trainer.value_loss", ["mse", "huber"])
    _check_choice(t.loss_agg, "trainer.loss_agg", [*AGGREGATION_MODES, *AGGREGATION_ALIASES])
    _check_choice(t.scheduler, "trainer.scheduler", ["constant", "constant_with_warmup", "linear", "cosine"])
    _check_choice(t.mixed_precision, "trainer.mixed_precision", ["no", "bf16"])  # fp16 needs a loss scaler
    _check(t.keep_last >= 1, "trainer.keep_last", "must be >= 1")
    _check(t.save_every >= 0 and t.sample_every >= 0 and t.log_every >= 1, "trainer.save_every",
           "save_every and sample_every must be >= 0, log_every >= 1")
    _check(t.max_nonfinite_steps >= 0, "trainer.max_nonfinite_steps", "must be >= 0")
    _check(t.dist_timeout_s > 0, "trainer.dist_timeout_s", "must be > 0")
    _check(len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas), "trainer.adam_betas",
           "must be two numbers in [0, 1)")


def _check_eval(e: DictConfig) -> None:
    _check(e.every >= 0, "eval.every", "must be >= 0")
    _check(e.samples >= 0, "eval.samples", "must be >= 0 (0 = greedy only)")
    _check(e.num_prompts is None or e.num_prompts > 0, "eval.num_prompts", "must be > 0 or null")
    _check(e.batch_size > 0, "eval.batch_size", "must be > 0")
    _check(e.temperature is None or e.temperature > 0, "eval.temperature", "must be > 0 or null")
    _check(e.max_new_tokens is None or e.max_new_tokens > 0, "eval.max_new_tokens", "must be > 0 or null")


def _check_models_and_rewards(cfg: DictConfig) -> None:
    from rlhf.models import DTYPES, check_spec
    from rlhf.rewards.sources import check_reward_sources
    from rlhf.rollout.dynamic import overlong_buffer_tokens

    _check_choice(cfg.model.dtype, "model.dtype", list(DTYPES))
    _check(cfg.model.reward is not None or cfg.reward.function is not None or len(cfg.reward.sources) > 0,
           "reward.function", f"no reward: set model.reward or reward.function (auto gives a built-in task's reward "
           f"only with data.prompts=builtin:<task>, not {cfg.data.prompts!r}), or list reward.sources")
    _check_tokenizer_pairing(cfg.model.policy, cfg.model.tokenizer, "model.tokenizer", "model.policy")
    _check(cfg.reward.timeout_s is None or cfg.reward.timeout_s > 0, "reward.timeout_s", "must be > 0 or null")
    try:
        overlong_buffer_tokens(cfg.reward.overlong_buffer, cfg.rollout.max_new_tokens)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check(cfg.reward.overlong_factor >= 0, "reward.overlong_factor", "must be >= 0")
    _check(cfg.data.max_prompt_length > 0, "data.max_prompt_length", "must be > 0")
    # model.value here; model.reward (its folder, tokenizer and one label) and reward.function are reward sources,
    # checked by check_reward_sources with the same messages.
    if cfg.model.value is not None and cfg.model.value != "policy":
        try:
            check_spec(cfg.model.value, "model.value")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _check_one_label(cfg.model.value, "model.value")
    _check(cfg.data.num_prompts is None or cfg.data.num_prompts > 0, "data.num_prompts", "must be > 0 or null")
    if cfg.reward.gold is not None:
        import_function(cfg.reward.gold, "reward.gold")
    check_reward_sources(cfg)


def _check_declarations(cfg: DictConfig, info, value_lr_set: bool) -> None:
    """Check the config against what its advantage estimator declared (rlhf.core.advantages.AdvantageInfo): the
    ``algorithm.*`` hyperparameters it reads are set and the others unset, it has the critic or the group it needs,
    and without a critic no critic-only field is set. ``value_lr_set``: trainer.value_lr was set before
    resolve_policy_defaults filled it. (The critic-only fields refused are those whose default is null, so that a
    set one is the user's: trainer.value_lr and model.value. value_clip, value_coef and value_loss have values in
    policy.yaml, and a user's equal value could not be told apart from it.)"""
    from rlhf.core.advantages import HYPERPARAMETERS

    a, name = cfg.algorithm, cfg.algorithm.advantage
    for key in HYPERPARAMETERS:
        if key in info.reads:
            _check(a[key] is not None, f"algorithm.{key}", f"{name} reads {key}, which is unset; set it in the "
                   f"algorithm preset or with algorithm.{key}=<value>")
        else:
            _check(a[key] is None, f"algorithm.{key}", f"{name} does not read {key} ({info.summary}); remove it")
    for key in ("gamma", "lam"):
        _check(a[key] is None or 0 <= a[key] <= 1, f"algorithm.{key}", f"must be in [0, 1], got {a[key]}")
    _check(a.critic or not info.needs_critic, "algorithm.critic",
           f"{name} needs a critic ({info.summary}); set algorithm.critic=true")
    k = cfg.rollout.samples_per_prompt
    _check(k >= 2 or not info.needs_group, "rollout.samples_per_prompt",
           f"{name} needs at least 2 samples per prompt ({info.summary}), got {k}")
    if not a.critic:
        _check(not value_lr_set, "trainer.value_lr",
               f"{name} trains no critic (algorithm.critic=false), so nothing uses a critic learning rate; remove it")
        _check(cfg.model.value is None, "model.value",
               f"{name} trains no critic (algorithm.critic=false), so no critic starts from {cfg.model.value!r}; "
               "remove it")


def _check_lora(m: DictConfig, spec: str, key: str, score: bool = False) -> None:
    """``model.lora``: a null rank means full fine-tuning and becomes ``model.lora: null``; a set one is checked
    against the model ``spec`` (rlhf.lora.check_lora_config: peft installed, rank > 0, module names exist)."""
    from rlhf.lora import check_lora_config, lora_enabled

    if not lora_enabled(m.lora):
        m.lora = None
        return
    check_lora_config(m.lora, spec, key, score)


def _check_tokenizer_pairing(model_spec: str, tok_spec: str | None, tok_key: str, model_key: str) -> None:
    """A word-level built-in tokenizer drives only a random-init built-in model, which is built with that tokenizer's
    vocabulary; beside a pretrained model it would turn every prompt into ``<unk>`` and the model's output into the
    built-in lexicon. (Vocabulary sizes are compared once the tokenizer loads: rlhf.models.check_tokenizer_fits.)"""
    from rlhf.models import ModelSpecError, check_has_tokenizer, is_builtin, is_random_init

    if tok_spec is None:
        try:
            check_has_tokenizer(model_spec, model_key, tok_key)
        except ModelSpecError as e:
            raise ConfigError(str(e)) from None
    elif is_builtin(tok_spec) and not is_random_init(model_spec):
        raise ConfigError(f"{tok_key}: {tok_spec} is the built-in task's word tokenizer and {model_key} "
                          f"{model_spec} is a pretrained model with its own; set {tok_key}=null to use the model's "
                          "tokenizer")


def _check_one_label(spec: str | None, key: str) -> None:
    """A reward or value model folder must be a sequence classifier with exactly one label. Only its config.json is
    read, so a wrong folder fails here rather than after the policy has loaded."""
    if spec is None or not os.path.isfile(os.path.join(os.path.expanduser(spec), "config.json")):
        return  # built-in models have one label; hub ids are checked when they load
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(os.path.expanduser(spec))
    archs = conf.architectures or []
    _check(not archs or any(a.endswith("ForSequenceClassification") for a in archs), key,
           f"{spec!r} is a {archs[0] if archs else '?'}; a reward or value model is an "
           "AutoModelForSequenceClassification with 1 label")
    _check(conf.num_labels == 1, key, f"{spec!r} has {conf.num_labels} labels; a reward or value model needs exactly 1")


# ---------------------------------------------------------------------- SFT and reward-model training
@dataclass
class StageModelConfig:
    init: str = MISSING
    tokenizer: str | None = MISSING
    dtype: str = MISSING
    lora: LoraSettings | None = MISSING


@dataclass
class SupervisedTrainerConfig:
    max_steps: int = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    eval_every: int = MISSING
    lr: float | None = MISSING  # null = by the init model (resolve_stage_defaults)
    weight_decay: float = MISSING
    adam_betas: list[float] = MISSING
    warmup_steps: int = MISSING
    scheduler: str = MISSING
    max_grad_norm: float | None = MISSING
    log_every: int = MISSING
    save_every: int = MISSING
    keep_last: int = MISSING
    resume: str | None = MISSING
    cpu: bool = MISSING
    mixed_precision: str = MISSING
    gradient_checkpointing: bool = MISSING
    torch_threads: int | None = MISSING
    dist_timeout_s: int = MISSING


@dataclass
class SFTDataConfig:
    source: str = MISSING
    eval_source: str | None = MISSING
    format: str = MISSING
    prompt_column: str = MISSING
    completion_column: str = MISSING
    text_column: str = MISSING
    messages_column: str = MISSING
    train_split: str = MISSING
    eval_split: str = MISSING
    num_train: int | None = MISSING
    num_eval: int | None = MISSING
    max_length: int = MISSING
    completion_only: bool = MISSING
    add_eos: bool = MISSING


@dataclass
class SFTConfig:
    seed: int = MISSING
    run_dir: str = MISSING
    model: StageModelConfig = field(default_factory=StageModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    trainer: SupervisedTrainerConfig = field(default_factory=SupervisedTrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class RewardDataConfig:
    source: str = MISSING
    eval_source: str | None = MISSING
    train_split: str = MISSING
    eval_split: str = MISSING
    num_train: int | None = MISSING
    num_eval: int | None = MISSING
    prompt_column: str = MISSING
    chosen_column: str = MISSING
    rejected_column: str = MISSING
    margin_column: str | None = MISSING
    text_column: str = MISSING
    label_column: str = MISSING
    temperature: float = MISSING
    noise_std: float = MISSING
    label_threshold: float | None = MISSING
    max_length: int = MISSING


@dataclass
class RewardLossConfig:
    center_coef: float = MISSING
    regression: str = MISSING
    huber_delta: float = MISSING


@dataclass
class RewardTrainingConfig:
    seed: int = MISSING
    run_dir: str = MISSING
    objective: str = MISSING
    model: StageModelConfig = field(default_factory=StageModelConfig)
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    loss: RewardLossConfig = field(default_factory=RewardLossConfig)
    trainer: SupervisedTrainerConfig = field(default_factory=SupervisedTrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


REWARD_OBJECTIVES = ["pairwise", "regression", "binary"]
SFT_FORMATS = ["prompt_completion", "text", "messages"]


def _check_stage_model(m: DictConfig, key: str = "init") -> None:
    """``model.<key>`` (the trained model: ``init``, or ``policy`` for DPO), ``model.tokenizer`` and ``model.dtype``."""
    from rlhf.models import DTYPES, check_spec

    _check_choice(m.dtype, "model.dtype", list(DTYPES))
    for name in (key, "tokenizer"):
        if m[name] is not None:
            try:
                check_spec(m[name], f"model.{name}")
            except ValueError as e:
                raise ConfigError(str(e)) from None
    _check_tokenizer_pairing(m[key], m.tokenizer, "model.tokenizer", f"model.{key}")


def resolve_stage_defaults(cfg: DictConfig, stage: str, key: str = "init") -> list[str]:
    """SFT, reward or DPO stage (``stage`` "sft" / "reward" / "dpo"): ``trainer.lr`` null becomes
    RANDOM_INIT_LR[stage] for a random-init built-in ``model.<key>``, else PRETRAINED_LR[stage] (times LORA_LR_SCALE
    with ``model.lora``). Returns ``key=value`` for each filled field."""
    from rlhf.models import is_random_init

    spec = cfg.model[key]
    if cfg.trainer.lr is not None:
        return []
    cfg.trainer.lr = default_lr(is_random_init(spec), stage, cfg.model.get("lora"))
    filled = [f"trainer.lr={cfg.trainer.lr:g}"]
    if not is_random_init(spec) and int(os.environ.get("RANK", "0")) == 0:
        log.info("model.%s %s is pretrained; defaults in use: %s (set any of them to override)", key, spec,
                 ", ".join(filled))
    return filled


def _check_supervised_trainer(t: DictConfig, world_size: int) -> None:
    _check(t.max_steps > 0, "trainer.max_steps", "must be > 0")
    _check(t.batch_size > 0, "trainer.batch_size", "must be > 0")
    _check(t.batch_size % world_size == 0, "trainer.batch_size",
           f"{t.batch_size} rows do not split over {world_size} processes")
    _check(t.eval_batch_size > 0, "trainer.eval_batch_size", "must be > 0")
    _check(t.eval_every >= 0, "trainer.eval_every", "must be >= 0 (0 = only before and after training)")
    _check(t.lr is None or t.lr > 0, "trainer.lr", "must be > 0")
    _check(t.weight_decay >= 0, "trainer.weight_decay", "must be >= 0")
    _check(len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas), "trainer.adam_betas",
           "must be two numbers in [0, 1)")
    _check(0 <= t.warmup_steps <= t.max_steps, "trainer.warmup_steps",
           f"must be in [0, trainer.max_steps={t.max_steps}]")
    _check_choice(t.scheduler, "trainer.scheduler", ["constant", "constant_with_warmup", "linear", "cosine"])
    _check(t.max_grad_norm is None or t.max_grad_norm > 0, "trainer.max_grad_norm", "must be > 0 or null")
    _check(t.log_every >= 1, "trainer.log_every", "must be >= 1")
    _check(t.save_every >= 0, "trainer.save_every", "must be >= 0 (0 = no checkpoints)")
    _check(t.keep_last >= 1, "trainer.keep_last", "must be >= 1")
    _check_choice(t.mixed_precision, "trainer.mixed_precision", ["no", "bf16"])  # fp16 needs a loss scaler
    _check(t.torch_threads is None or t.torch_threads > 0, "trainer.torch_threads", "must be > 0 or null")
    _check(t.dist_timeout_s > 0, "trainer.dist_timeout_s", "must be > 0")


def _looks_like_file(source: str) -> bool:
    from rlhf.data import FILE_BUILDERS

    return not source.startswith("builtin:") and (
        os.path.splitext(source)[1].lower() in FILE_BUILDERS or os.path.exists(os.path.expanduser(source)))


def _check_stage_data(d: DictConfig) -> None:
    _check(d.max_length >= 2, "data.max_length", "must be >= 2")
    _check(d.num_train is None or d.num_train > 0, "data.num_train", "must be > 0 or null (all rows)")
    _check(d.num_eval is None or d.num_eval >= 0, "data.num_eval",
           "must be >= 0 (0 = no evaluation) or null (all rows)")
    # A file holds one split, so evaluating on the same file would report training-set numbers as held-out ones.
    _check(d.eval_source is not None or d.num_eval == 0 or not _looks_like_file(d.source), "data.eval_source",
           f"data.source {d.source!r} is a file, which holds one split: name a held-out file here or set "
           "data.num_eval=0")


def validate_sft_config(cfg: DictConfig, world_size: int = 1) -> DictConfig:
    """Type-check and value-check a composed SFT config (configs/sft.yaml). Returns the typed, resolved config.

    Raises ConfigError with a message ``"<key>: <problem>"``, before any data or model loads.
    """
    cfg = _typed(cfg, SFTConfig)
    _check_stage_model(cfg.model)
    _check_lora(cfg.model, cfg.model.init, "model.lora")
    resolve_stage_defaults(cfg, "sft")
    _check_supervised_trainer(cfg.trainer, world_size)
    _check_stage_data(cfg.data)
    _check_choice(cfg.data.format, "data.format", SFT_FORMATS)
    return cfg


def validate_reward_config(cfg: DictConfig, world_size: int = 1) -> DictConfig:
    """Type-check and value-check a composed reward-model config (configs/reward.yaml). Returns the typed config.

    Raises ConfigError with a message ``"<key>: <problem>"``, before any data or model loads.
    """
    cfg = _typed(cfg, RewardTrainingConfig)
    _check_choice(cfg.objective, "objective", REWARD_OBJECTIVES)
    _check_stage_model(cfg.model)
    _check_lora(cfg.model, cfg.model.init, "model.lora", score=True)
    resolve_stage_defaults(cfg, "reward")
    _check_supervised_trainer(cfg.trainer, world_size)
    _check_stage_data(cfg.data)
    d, loss = cfg.data, cfg.loss
    _check(d.temperature > 0, "data.temperature", "must be > 0")
    _check(d.noise_std >= 0, "data.noise_std", "must be >= 0")
    _check(d.margin_column is None or cfg.objective == "pairwise", "data.margin_column",
           f"only the pairwise objective uses a margin, not {cfg.objective!r}")
    _check(d.label_threshold is None or cfg.objective == "binary", "data.label_threshold",
           f"only the binary objective thresholds labels, not {cfg.objective!r}")
    _check(loss.center_coef >= 0, "loss.center_coef", "must be >= 0")
    _check_choice(loss.regression, "loss.regression", ["mse", "huber"])
    _check(loss.huber_delta > 0, "loss.huber_delta", "must be > 0")
    return cfg


# ---------------------------------------------------------------------- direct preference optimization
@dataclass
class DPOModelConfig:
    policy: str = MISSING
    tokenizer: str | None = MISSING
    dtype: str = MISSING
    lora: LoraSettings | None = MISSING


@dataclass
class DPODataConfig:
    source: str = MISSING
    eval_source: str | None = MISSING
    train_split: str = MISSING
    eval_split: str = MISSING
    num_train: int | None = MISSING
    num_eval: int | None = MISSING
    prompt_column: str = MISSING
    chosen_column: str = MISSING
    rejected_column: str = MISSING
    temperature: float = MISSING
    max_length: int = MISSING


@dataclass
class DPOSettings:
    loss: str = MISSING
    beta: float = MISSING
    label_smoothing: float = MISSING
    precompute_ref: bool = MISSING


@dataclass
class FrontierSettings:  # dpo.yaml frontier: (rlhf.analysis.frontier)
    num_prompts: int = MISSING
    samples: int = MISSING
    prompts: str | None = MISSING  # AUTO = data.source's built-in task (_check_frontier)
    prompt_column: str = MISSING
    split: str = MISSING
    gold: str | None = MISSING     # AUTO = that task's gold scorer
    temperature: float = MISSING
    max_new_tokens: int = MISSING
    batch_size: int = MISSING


@dataclass
class DPOConfig:
    seed: int = MISSING
    run_dir: str = MISSING
    model: DPOModelConfig = field(default_factory=DPOModelConfig)
    data: DPODataConfig = field(default_factory=DPODataConfig)
    dpo: DPOSettings = field(default_factory=DPOSettings)
    frontier: FrontierSettings = field(default_factory=FrontierSettings)
    trainer: SupervisedTrainerConfig = field(default_factory=SupervisedTrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def validate_dpo_config(cfg: DictConfig, world_size: int = 1) -> DictConfig:
    """Type-check and value-check a composed DPO config (configs/dpo.yaml). Returns the typed config.

    Raises ConfigError with a message ``"<key>: <problem>"``, before any data or model loads.
    """
    from rlhf.core.dpo import DPO_LOSSES

    cfg = _typed(cfg, DPOConfig)
    _check_stage_model(cfg.model, key="policy")
    _check_lora(cfg.model, cfg.model.policy, "model.lora")
    resolve_stage_defaults(cfg, "dpo", key="policy")
    _check_supervised_trainer(cfg.trainer, world_size)
    _check_stage_data(cfg.data)
    _check(cfg.data.temperature > 0, "data.temperature", "must be > 0")
    p = cfg.dpo
    _check_choice(p.loss, "dpo.loss", DPO_LOSSES.names())
    _check(p.beta > 0, "dpo.beta", f"must be > 0, got {p.beta}")
    _check(0 <= p.label_smoothing < 0.5, "dpo.label_smoothing", f"must be in [0, 0.5), got {p.label_smoothing}")
    _check(p.label_smoothing == 0 or p.loss == "sigmoid", "dpo.label_smoothing",
           f"conservative DPO smooths the sigmoid loss only, not {p.loss!r}; set it to 0")
    _check_frontier(cfg)
    return cfg


def _check_frontier(cfg: DictConfig) -> None:
    """``frontier``: ``auto`` prompts become the built-in task's that ``data.source`` names (none for a user's
    data: the measurement is off, and says so), ``auto`` gold that task's gold scorer (none otherwise); a gold path
    must import."""
    from rlhf.tasks import builtin_task

    f = cfg.frontier
    _check(f.num_prompts >= 0, "frontier.num_prompts", "must be >= 0 (0 = off)")
    _check(f.samples >= 1, "frontier.samples", "must be >= 1")
    _check(f.temperature > 0, "frontier.temperature", "must be > 0")
    _check(f.max_new_tokens > 0, "frontier.max_new_tokens", "must be > 0")
    _check(f.batch_size > 0, "frontier.batch_size", "must be > 0")
    if f.prompts == AUTO:
        f.prompts = cfg.data.source if builtin_task(cfg.data.source) else None
    if f.gold == AUTO:
        task = builtin_task(f.prompts)
        f.gold = task["gold"] if task else None
    if f.gold is not None:
        import_function(f.gold, "frontier.gold")
    if f.num_prompts and f.prompts is None and int(os.environ.get("RANK", "0")) == 0:
        log.info("frontier: data.source %s is not a built-in task, so frontier.prompts=auto names no prompts and "
                 "the gold-vs-KL measurement is off; set frontier.prompts to a prompt file to turn it on",
                 cfg.data.source)
