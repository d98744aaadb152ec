"""The policy trainer: one loop for PPO, RLOO, GRPO and REINFORCE++.

Each step is a handful of named steps:

    1. sample      prompts -> responses (generate), policy / reference log-probs, critic values
    2. score       reward model and/or reward functions -> one score per response (+ gold score, logged only)
    3. shape       per-token rewards: -beta * kl_t on every token, score added at the last real token
    4. estimate    advantages and returns from the registered estimator (on the global batch)
    5. update      epochs x minibatches x micro-batches of the policy loss (+ value loss, + KL loss)
    6. log         global means over all processes -> metrics.jsonl, TensorBoard, progress bar
    7. checkpoint  atomically, every N steps and at the end

The algorithm is a choice of estimator and loss in the registries, not a subclass.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import signal
import sys
import time
import warnings

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from omegaconf import DictConfig, OmegaConf
from transformers import get_scheduler

from rlhf.config import ConfigError, import_function
from rlhf.core.advantages import ADVANTAGE_ESTIMATORS
from rlhf.core.kl import build_kl_controller, per_token_kl, shape_rewards
from rlhf.core.losses import masked_mean, masked_whiten
from rlhf.core.objectives import POLICY_LOSSES, explained_variance, kl_loss, value_loss
from rlhf.models import (
    BUILTIN_ARCHS,
    BUILTIN_PREFIX,
    Models,
    check_tokenizer_fits,
    freeze,
    is_builtin,
    load_causal_lm,
    load_score_model,
    load_tokenizer,
    same_tokenizer,
    value_model_from_policy,
)
from rlhf.rewards.scoring import score_responses
from rlhf.rollout.batch import Rollout
from rlhf.rollout.forward import PolicyAndValue, TokenValues, policy_logprobs, response_values
from rlhf.rollout.hf import generate
from rlhf.rollout.sampling import minibatch_rows, row_keys
from rlhf.runtime.accelerator import clip_and_step, make_accelerator
from rlhf.runtime.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    check_checkpoint,
    latest_checkpoint,
    load_trainer_state,
    save_checkpoint,
    set_aside_newer,
)
from rlhf.runtime.distributed import gathered_for_generation, zero3_gathered_for_generation
from rlhf.runtime.runlock import lock_run_dir
from rlhf.runtime.tracking import MetricsLogger, truncate_metrics

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite updates, ...). The message says what to change."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after a step; its checkpoint is written. ``signum`` is the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def _context_length(spec: str) -> int | None:
    """The policy's context in tokens, read from its config without loading weights; None when it has no limit."""
    if is_builtin(spec) and spec[len(BUILTIN_PREFIX):] in BUILTIN_ARCHS:
        return BUILTIN_ARCHS[spec[len(BUILTIN_PREFIX):]].get("max_position_embeddings")
    from transformers import AutoConfig

    from rlhf.models import resolve_spec

    return getattr(AutoConfig.from_pretrained(os.path.expanduser(resolve_spec(spec))), "max_position_embeddings",
                   None)


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the RuntimeError a CPU allocation failure raises."""
    if isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _local(p: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: its shard under FSDP2 (a DTensor), else the tensor itself."""
    return p.to_local() if hasattr(p, "to_local") else p


def step_seed(seed: int, step: int, rank: int) -> int:
    """Sampling and shuffling are re-seeded every step, so a resumed run draws exactly what the original drew."""
    return (seed * 1_000_003 + step * 7919 + rank) % (2**63 - 1)


class PolicyTrainer:
    def __init__(self, cfg: DictConfig, accelerator: Accelerator | None = None):
        self.cfg = cfg
        t = cfg.trainer
        if t.torch_threads:
            torch.set_num_threads(t.torch_threads)
        self.acc = accelerator or make_accelerator(t)
        self.run_dir = self._shared_run_dir(cfg.run_dir)
        # One writer per run folder, taken before anything loads or is written (rlhf.runtime.runlock); train() releases it.
        self.run_lock = lock_run_dir(self.acc, self.run_dir)
        try:
            self._setup()
        except BaseException:
            self.run_lock.release()
            raise

    def _setup(self) -> None:
        """Everything a run needs before its first step: checkpoint to resume, prompts, models, optimizer, engine."""
        cfg, t = self.cfg, self.cfg.trainer
        self.ckpt_root = os.path.join(self.run_dir, "checkpoints")
        self.resume_from = self._resolve_resume(t.resume)

        # Data problems are found before any weights load: prompts and their lengths need only the tokenizer.
        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.policy)
        check_tokenizer_fits(tokenizer, cfg.model.policy, cfg.model.tokenizer)
        self.prompts = self._load_prompts()
        self._check_prompt_lengths(tokenizer)
        self.models = self._load_models(tokenizer)
        self.policy_loss_fn = POLICY_LOSSES.get(cfg.algorithm.policy_loss)
        self.estimator = ADVANTAGE_ESTIMATORS.get(cfg.algorithm.advantage)
        self.reward_fn = import_function(cfg.reward.function, "reward.function") if cfg.reward.function else None
        self.gold_fn = import_function(cfg.reward.gold, "reward.gold") if cfg.reward.gold else None
        self.kl_ctl = build_kl_controller(cfg.kl.controller, cfg.kl.beta, cfg.kl.target, cfg.kl.horizon)

        self.policy = self.models.policy
        self.critic = TokenValues(self.models.value) if self.models.value is not None else None
        self.optimizer = self._build_optimizer()
        self._check_backend()
        self._both = None  # PPO under FSDP2: the prepared PolicyAndValue
        if self.critic is not None and self._is_fsdp2():
            self._both, self.optimizer = self.acc.prepare(PolicyAndValue(self.policy, self.critic), self.optimizer)
            self.policy, self.critic = self._both.policy, self._both.critic
        elif self.critic is not None:
            self.policy, self.critic, self.optimizer = self.acc.prepare(self.policy, self.critic, self.optimizer)
        else:
            self.policy, self.optimizer = self.acc.prepare(self.policy, self.optimizer)
        # Not prepared: accelerate would step a prepared scheduler once per process.
        self.scheduler = get_scheduler(t.scheduler, self.optimizer,
                                       num_warmup_steps=t.warmup_steps,
                                       num_training_steps=t.max_steps * t.ppo_epochs * t.minibatches)
        self.models.reference = self._place_frozen(self.models.reference)
        self.models.reward = self._place_frozen(self.models.reward)
        self.engine = self._build_engine() if cfg.rollout.engine == "vllm" else None

        # With one epoch, one minibatch and no accumulation the update sees exactly the rollout's batch once, so the
        # rollout's policy forward doubles as the update's (see sample()). DeepSpeed engines step inside backward
        # and are kept on the plain path.
        self.fused = (t.ppo_epochs == 1 and t.minibatches == 1 and t.grad_accum == 1
                      and self.acc.distributed_type != DistributedType.DEEPSPEED)
        self._live: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.start_step = 0
        self.nonfinite_steps = 0
        self.stop_signal: int | None = None
        if self.resume_from:
            self._load_state(self.resume_from)
        self.logger = MetricsLogger(self.run_dir, enabled=self.acc.is_main_process,
                                    tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                                    wandb_project=cfg.logging.wandb_project,
                                    config=OmegaConf.to_container(cfg, resolve=True),
                                    purge_step=self.start_step if t.resume is not None else None)
        # Also with resume=auto and no checkpoint yet: lines a killed run logged past its checkpoint are dropped.
        if self.acc.is_main_process and t.resume is not None:
            truncate_metrics(self.logger.path, self.start_step - 1)
            truncate_metrics(self.logger.samples_path, self.start_step - 1)
            for path in set_aside_newer(self.ckpt_root, self.start_step):
                warnings.warn(f"trainer.resume: newer checkpoint moved to {path} (this run continues from step "
                              f"{self.start_step})", stacklevel=2)

    # ------------------------------------------------------------------ setup
    def _shared_run_dir(self, run_dir: str) -> str:
        """Hydra names each process's job folder by the time it started; all processes use rank 0's."""
        return self._from_main_process(run_dir)

    def _from_main_process(self, value):
        """``value`` as the main process has it, on every process (a picklable object; collective)."""
        if self.acc.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def _resolve_resume(self, resume: str | None) -> str | None:
        """The checkpoint every process resumes from, the same on all of them (any world size may resume it)."""
        if resume is None:
            return None
        if resume == "auto":
            # The main process's choice: another machine's copy of run_dir may hold an older checkpoint, or none.
            resume = self._from_main_process(latest_checkpoint(self.ckpt_root))
            if resume is None:
                warnings.warn(f"trainer.resume=auto: no complete checkpoint under {self.ckpt_root}; starting at "
                              "step 0", stacklevel=2)
                return None
        try:
            check_checkpoint(resume)
        except CheckpointError as e:
            if self.acc.is_main_process:
                raise
            raise CheckpointError(f"{e} on process {self.acc.process_index}; every machine must see run_dir "
                                  "(a shared filesystem)") from None
        return resume

    def _load_prompts(self) -> list[str]:
        from rlhf.data import load_prompts

        d = self.cfg.data
        return load_prompts(d.prompts, column=d.prompt_column, split=d.split, n=d.num_prompts, seed=self.cfg.seed)

    def _check_prompt_lengths(self, tok) -> None:
        """Prompts longer than data.max_prompt_length are refused, not truncated (a cut prompt is silently another
        task), and the longest allowed prompt plus the response must fit the policy's context."""
        from rlhf.data import DataError

        d, new_tokens = self.cfg.data, self.cfg.rollout.max_new_tokens
        limit = d.max_prompt_length
        ctx = _context_length(self.cfg.model.policy)
        if ctx is not None and limit + new_tokens > ctx:
            raise ConfigError(f"data.max_prompt_length: {limit} + rollout.max_new_tokens {new_tokens} exceeds the "
                              f"policy's context of {ctx} tokens; lower one of them")
        lengths = [len(ids) for ids in tok(self.prompts, add_special_tokens=True)["input_ids"]]
        for i, n in enumerate(lengths):
            if n > limit:
                raise DataError(f"data.max_prompt_length: prompt {i} (0-based) of {d.prompts!r} has {n} tokens > "
                                f"{limit}; prompts are refused, not truncated: shorten or drop it, or raise "
                                "data.max_prompt_length")

    def _load_models(self, tok) -> Models:
        cfg, m = self.cfg, self.cfg.model
        policy_spec = os.path.join(self.resume_from, "policy") if self.resume_from else m.policy
        policy = load_causal_lm(policy_spec, tok, m.dtype, seed=cfg.seed)
        need_ref = cfg.kl.beta > 0 or cfg.kl.log_at_zero_beta or cfg.kl.controller == "adaptive"
        reference = None
        if need_ref:
            # The reference is the starting policy, also when the policy itself comes from a checkpoint. Under
            # ZeRO-3 transformers builds models already partitioned (zero.Init), and those cannot be deep-copied.
            copyable = not self.resume_from and self._zero_stage() != 3
            reference = freeze(copy.deepcopy(policy) if copyable
                               else load_causal_lm(m.policy, tok, m.dtype, seed=cfg.seed))
        reward = reward_tok = None
        if m.reward is not None:
            reward_tok = load_tokenizer(m.reward_tokenizer or m.reward, padding_side="right")
            check_tokenizer_fits(reward_tok, m.reward, m.reward_tokenizer, "model.reward_tokenizer", "model.reward")
            # A built-in reward model is built for the tokenizer that feeds it, which is its own.
            reward = freeze(load_score_model(m.reward, reward_tok, m.dtype, seed=cfg.seed))
            if same_tokenizer(tok, reward_tok):
                reward_tok = None
        value = None
        if cfg.algorithm.critic:
            if self.resume_from:
                value = load_score_model(os.path.join(self.resume_from, "value"), tok, m.dtype, key="trainer.resume")
            elif m.value is not None and m.value != "policy":
                value = load_score_model(m.value, tok, m.dtype, seed=cfg.seed, key="model.value")
            elif m.value is None and reward is not None and reward_tok is None:
                value = copy.deepcopy(reward).requires_grad_(True)
            else:
                value = value_model_from_policy(policy, tok)
            value.train()
        policy.train()
        return Models(policy, reference, reward, value, tok, reward_tok)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.trainer
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": t.lr}]
        if self.critic is not None:
            groups.append({"params": [p for p in self.critic.parameters() if p.requires_grad], "lr": t.value_lr})
        return torch.optim.AdamW(groups, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)

    # ------------------------------------------------------------------ distributed backends
    def _check_backend(self) -> None:
        """Refuse what this trainer cannot do correctly under FSDP or DeepSpeed (a one-line ConfigError), and give
        DeepSpeed the micro-batch size it would otherwise read from a DataLoader (the trainer has none).
        DDP (one or many machines) needs nothing here. See docs/distributed.md."""
        dist_type, t, r = self.acc.distributed_type, self.cfg.trainer, self.cfg.rollout
        if dist_type == DistributedType.FSDP:
            if self.acc.state.fsdp_plugin.fsdp_version != 2:
                raise ConfigError("accelerate config: fsdp_config.fsdp_version is "
                                  f"{self.acc.state.fsdp_plugin.fsdp_version}; only FSDP2 (fsdp_version: 2) is "
                                  "supported, as in configs/accelerate/fsdp2.yaml")
            if r.engine == "vllm":
                raise ConfigError("rollout.engine: vllm copies the whole policy into vLLM every step, but FSDP2 "
                                  "shards it; use configs/accelerate/ddp.yaml or deepspeed_zero2.yaml with vllm")
            return
        if dist_type != DistributedType.DEEPSPEED:
            return
        if self.critic is not None:
            raise ConfigError("algorithm.critic: DeepSpeed prepares one model per Accelerator and PPO trains two "
                              "(policy and critic); use algorithm=rloo, grpo or reinforce_pp, or the DDP config")
        if r.engine == "vllm" and self.acc.state.deepspeed_plugin.zero_stage == 3:
            raise ConfigError("rollout.engine: vllm copies the whole policy into vLLM every step, but ZeRO-3 shards "
                              "it; use configs/accelerate/deepspeed_zero2.yaml or ddp.yaml with vllm")
        if t.grad_accum != 1:
            raise ConfigError(f"trainer.grad_accum: {t.grad_accum}, but under DeepSpeed every backward pass ends in "
                              "an optimizer step; set trainer.grad_accum=1 (or use the DDP config)")
        ds = self.acc.state.deepspeed_plugin.deepspeed_config
        if ds.get("gradient_accumulation_steps", 1) not in (1, "auto"):
            raise ConfigError(f"accelerate config: deepspeed_config.gradient_accumulation_steps is "
                              f"{ds['gradient_accumulation_steps']}; it must be 1 (the trainer's loss scaling already "
                              "averages over the minibatch)")
        clip = ds.get("gradient_clipping")
        if clip not in (None, "auto") and float(clip) != float(t.max_grad_norm or 0.0):
            raise ConfigError(f"trainer.max_grad_norm: {t.max_grad_norm}, but DeepSpeed clips at its own "
                              f"gradient_clipping={clip} inside its step; make the two equal")
        rollouts = r.prompts_per_step * r.samples_per_prompt // self.acc.num_processes
        ds["train_micro_batch_size_per_gpu"] = rollouts // (t.minibatches * t.grad_accum)
        # DeepSpeed checks train batch == micro x accumulation (1) x processes; set it with the micro-batch rather
        # than leave it to accelerate's "auto" fill, so the two can never disagree.
        ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * self.acc.num_processes

    def _build_engine(self):
        """The vLLM rollout engine, built from the policy as loaded (weights are synced before every rollout)."""
        from rlhf.rollout.vllm import VLLMEngine

        r, t = self.cfg.rollout, self.cfg.trainer
        dtype = r.vllm.dtype
        if dtype == "auto":
            dtype = "bfloat16" if t.mixed_precision == "bf16" else self.cfg.model.dtype
        # Prompts longer than data.max_prompt_length were refused before any model loaded.
        return VLLMEngine(self.acc.unwrap_model(self.policy), self.models.tokenizer, seed=self.cfg.seed, dtype=dtype,
                          max_model_len=self.cfg.data.max_prompt_length + r.max_new_tokens, enforce_eager=r.vllm.enforce_eager,
                          gpu_memory_utilization=r.vllm.gpu_memory_utilization, cpu_kv_cache_gb=r.vllm.cpu_kv_cache_gb)

    def _is_fsdp2(self) -> bool:
        return self.acc.distributed_type == DistributedType.FSDP and self.acc.state.fsdp_plugin.fsdp_version == 2

    def _gathered_for_generation(self):
        """The context decoding runs in: the whole policy gathered once under FSDP2 or ZeRO-3 when
        rollout.gather_for_generation, else nothing (the weights are whole already, or gathered layer by layer)."""
        if not self.cfg.rollout.gather_for_generation:
            return contextlib.nullcontext()
        if self._is_fsdp2():
            return gathered_for_generation(self.acc.unwrap_model(self.policy),
                                           self.acc.state.fsdp_plugin.reshard_after_forward)
        if self._zero_stage() == 3:
            return zero3_gathered_for_generation(self.policy)
        return contextlib.nullcontext()

    def _zero_stage(self) -> int | None:
        """DeepSpeed's ZeRO stage, or None without DeepSpeed."""
        if self.acc.distributed_type != DistributedType.DEEPSPEED:
            return None
        return self.acc.state.deepspeed_plugin.zero_stage

    def _place_frozen(self, model: torch.nn.Module | None) -> torch.nn.Module | None:
        """The reference and reward models only run forward passes. Under ZeRO-3 they are sharded like the policy,
        as DeepSpeed engines without an optimizer; everywhere else each process holds a whole copy."""
        if model is None or self._zero_stage() != 3:
            return model.to(self.acc.device) if model is not None else None
        import deepspeed

        # The policy's prepared config (stage 3, precision, filled-in batch sizes); no optimizer is attached.
        config = copy.deepcopy(self.acc.state.deepspeed_plugin.deepspeed_config)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        return engine

    def _optimizer_state(self) -> dict | None:
        """AdamW's state for a checkpoint (a collective under FSDP2).

        Under DDP it is whole and the same on every process: torch's ``state_dict``, keyed by parameter index.
        Under FSDP2 each process holds a shard of it: the shards are gathered into whole tensors on the main
        process, keyed by parameter name (``{"by_name": ...}``, torch.distributed.checkpoint's full optimizer state
        dict). Either resumes on any number of processes, with or without FSDP2 (see _load_optimizer_state).
        DeepSpeed partitions it in its own format: it is not saved, and a resumed run restarts AdamW's moments
        (with a warning)."""
        if self.acc.distributed_type == DistributedType.DEEPSPEED:
            return None
        if self._is_fsdp2():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            full = get_optimizer_state_dict(self._optimized_module(), self.optimizer.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return {"by_name": full}
        return self.optimizer.state_dict()

    def _optimized_module(self) -> torch.nn.Module:
        """The module whose trainable parameters, in order, are the optimizer's: the policy, or (PPO) the policy
        and the critic as one PolicyAndValue (the prepared one under FSDP2)."""
        if self.critic is None:
            return self.acc.unwrap_model(self.policy)
        if self._both is not None:
            return self._both
        return PolicyAndValue(self.acc.unwrap_model(self.policy), self.acc.unwrap_model(self.critic))

    def _load_optimizer_state(self, saved: dict) -> None:
        """Load AdamW's state saved by _optimizer_state, whichever backend wrote it and whichever this run uses.

        Every process reads the whole saved state. Under FSDP2, or for a state saved by name, it goes through
        torch.distributed.checkpoint's ``set_optimizer_state_dict`` (which keeps each process's shard under FSDP2);
        an index-keyed state is first renamed: index i is the i-th trainable parameter of _optimized_module, the
        order in which _build_optimizer listed them."""
        if not self._is_fsdp2() and "by_name" not in saved:
            self.optimizer.load_state_dict(saved)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        model = self._optimized_module()
        by_name = saved.get("by_name")
        if by_name is None:
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            count = sum(len(g["params"]) for g in saved["param_groups"])
            if count != len(names):
                raise ValueError(f"the saved optimizer holds {count} parameters; this run trains {len(names)}")
            by_name = {"state": {names[i]: v for i, v in saved["state"].items()},
                       "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                        for g in saved["param_groups"]]}
        set_optimizer_state_dict(model, self.optimizer.optimizer, by_name,
                                 options=StateDictOptions(full_state_dict=True))

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict]:
        """Run from ``start_step`` to ``trainer.max_steps``; returns the logged metrics of this process.

        SIGINT or SIGTERM stop the run after the current step: its checkpoint is written, then TrainingInterrupted
        is raised. Running out of memory raises TrainingError saying which settings to lower.
        """
        cfg = self.cfg
        history = []
        if self.acc.is_main_process:
            backend = self.acc.distributed_type.name + ("2" if self._is_fsdp2() else "")
            if self._zero_stage() is not None:
                backend += f" ZeRO-{self._zero_stage()}"
            log.info("advantage %s, loss %s on %s: %s, %d process(es), mixed precision %s, steps %d to %d, "
                     "run_dir %s", cfg.algorithm.advantage, cfg.algorithm.policy_loss, self.acc.device, backend,
                     self.acc.num_processes, self.acc.mixed_precision, self.start_step, cfg.trainer.max_steps,
                     self.run_dir)
        old_handlers = self._install_signal_handlers()
        bar = None
        if cfg.logging.progress and self.acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.trainer.max_steps, initial=self.start_step, desc="rlhf", dynamic_ncols=True)
        try:
            step = self.start_step
            for step in range(self.start_step, cfg.trainer.max_steps):
                try:
                    metrics = self.train_step(step)
                except (RuntimeError, MemoryError) as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
                    if not is_out_of_memory(e):
                        raise
                    raise TrainingError(self._out_of_memory_message(step, e)) from e
                history.append(metrics)
                if step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_steps - 1:
                    self.logger.log(metrics)
                if bar is not None:
                    bar.set_postfix(score=f"{metrics['score']:.3f}", kl=f"{metrics['kl']:.3f}",
                                    reward=f"{metrics['reward']:.3f}")
                    bar.update(1)
                done = step + 1
                signum = self._stop_agreed()
                if signum is not None and done < cfg.trainer.max_steps:
                    path = self.save(done) or os.path.join(self.ckpt_root, f"step_{done}")
                    raise TrainingInterrupted(
                        f"{signal.Signals(signum).name} after step {step}: checkpoint {path} written; continue with "
                        f"trainer.resume=auto hydra.run.dir={self.run_dir}", signum)
                if cfg.trainer.save_every and done % cfg.trainer.save_every == 0 and done < cfg.trainer.max_steps:
                    self.save(done)
            else:
                if self.start_step < cfg.trainer.max_steps:  # a run resumed at its last step has nothing new
                    self.save(cfg.trainer.max_steps)
        finally:
            if bar is not None:
                bar.close()
            self.logger.close()
            if self.engine is not None:
                self.engine.close()
            self._restore_signal_handlers(old_handlers)
            self.run_lock.release()
        return history

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        torch.manual_seed(step_seed(cfg.seed, step, self.acc.process_index))
        beta = self.kl_ctl.value
        prompts = self.prompt_batch(step)

        t0 = time.perf_counter()
        rollout, t_generate = self.sample(prompts, step)                          # 1. sample
        scores, gold, completions = self.score(prompts, rollout)                  # 2. score
        rollout = rollout._replace(scores=scores)
        t_score = time.perf_counter() - t0 - t_generate
        update_stats, ev, t_update = {}, None, 0.0
        # A NaN score would make every advantage of the batch NaN (whitening and baselines mix rows): skip the step.
        if self._any_process(not bool(torch.isfinite(scores).all())):
            self._count_nonfinite(step, f"model.reward {cfg.model.reward} returned a non-finite score")
        else:
            kl_tok = self.kl_per_token(rollout, cfg.kl.estimator)
            rewards = self.shape(rollout, kl_tok, beta)                           # 3. shape
            advantages, returns, ev = self.estimate(rollout, rewards)             # 4. estimate
            t1 = time.perf_counter()
            update_stats = self.update(rollout, advantages, returns, beta, step)        # 5. update
            t_update = time.perf_counter() - t1
            if update_stats["policy/skipped_updates"] > 0:
                self._count_nonfinite(step, "a non-finite loss or gradient")

        self._live = None  # free the fused forward's graph, also when the update was skipped
        metrics = self.step_metrics(step, rollout, gold, beta, update_stats, ev)  # 6. log
        self.kl_ctl.update(metrics["kl"], cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt)
        metrics["time/generated_tokens_per_s"] = (metrics["response_length"] * cfg.rollout.prompts_per_step
                                                  * cfg.rollout.samples_per_prompt / max(t_generate, 1e-9))
        if self.engine is not None:
            metrics["time/weight_sync_s"] = self._t_sync  # part of time/generate_s
        metrics.update({"time/generate_s": t_generate, "time/score_s": t_score, "time/update_s": t_update,
                        "time/step_s": time.perf_counter() - t0})
        metrics["nonfinite_steps"] = self.nonfinite_steps
        if cfg.trainer.sample_every and step % cfg.trainer.sample_every == 0:
            self.log_samples(step, prompts, completions, rollout.scores)
        return metrics

    # ------------------------------------------------------------------ 1. sample
    def prompt_batch(self, step: int) -> list[str]:
        """This process's prompts for ``step``: a seeded permutation per pass over the data, split by rank."""
        p = self.cfg.rollout.prompts_per_step
        n = len(self.prompts)
        per_epoch = max(n // p, 1)
        epoch, pos = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)  # no overlap between seeds' epochs
        order = torch.randperm(n, generator=g)
        idx = order[torch.arange(pos * p, pos * p + p) % n]
        per_rank = p // self.acc.num_processes
        mine = idx[self.acc.process_index * per_rank:(self.acc.process_index + 1) * per_rank]
        return [self.prompts[i] for i in mine.tolist()]

    def sampling_keys(self, step: int, rows: int) -> torch.Tensor:
        """``(rows, 2)`` counter-sampling keys of this process's rows at ``step``: keyed by each row's index in the
        global batch (rank r holds rows ``r * rows .. (r + 1) * rows - 1``), so the samples do not depend on the
        number of processes."""
        return row_keys(self.cfg.seed, step, self.acc.process_index * rows + torch.arange(rows))

    def sample(self, prompts: list[str], step: int) -> tuple[Rollout, float]:
        r = self.cfg.rollout
        tok = self.models.tokenizer
        dev = self.acc.device
        enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
        query_ids = enc["input_ids"].repeat_interleave(r.samples_per_prompt, 0).to(dev)
        query_mask = enc["attention_mask"].repeat_interleave(r.samples_per_prompt, 0).to(dev)
        t0 = time.perf_counter()
        keys = self.sampling_keys(step, query_ids.shape[0])
        if self.engine is not None:
            self.engine.sync_weights(self.acc.unwrap_model(self.policy))
            self._t_sync = time.perf_counter() - t0
            response_ids, response_mask = self.engine.generate(
                query_ids, query_mask, max_new_tokens=r.max_new_tokens, min_new_tokens=r.min_new_tokens,
                temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                row_keys=keys if r.sampler == "counter" else None)
        else:
            # FSDP2 and ZeRO-3: every process steps until all are done (transformers sees ZeRO-3 by itself), and
            # with rollout.gather_for_generation the whole weights are gathered once for the decode.
            synced = True if self._is_fsdp2() and self.acc.num_processes > 1 else None
            with self._gathered_for_generation():
                response_ids, response_mask = generate(
                    self.acc.unwrap_model(self.policy), query_ids, query_mask, tok, max_new_tokens=r.max_new_tokens,
                    min_new_tokens=r.min_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                    sampler=r.sampler, row_keys=keys, synced_gpus=synced)
        t_generate = time.perf_counter() - t0
        args = (query_ids, query_mask, response_ids, response_mask)
        if self.fused:
            # One optimizer step on exactly these samples: the forward that gives the sampling-time log-probs
            # (and values) keeps its graph and becomes the update's forward, instead of running twice.
            with self.acc.autocast():
                live_logp, entropy = policy_logprobs(self.policy, *args, temperature=r.temperature,
                                                     chunk_size=r.logprob_chunk_size, with_entropy=True)
                live_values = response_values(self.critic, *args) if self.critic is not None else None
            self._live = (live_logp, live_values)
            logprobs = live_logp.detach()
            values = live_values.detach() if live_values is not None else None
        with torch.no_grad(), self.acc.autocast():
            if not self.fused:
                logprobs, entropy = policy_logprobs(self.policy, *args, temperature=r.temperature,
                                                    chunk_size=r.logprob_chunk_size, with_entropy=True)
                values = response_values(self.critic, *args) if self.critic is not None else None
            ref_logprobs = None
            if self.models.reference is not None:
                ref_logprobs, _ = policy_logprobs(self.models.reference, *args, temperature=r.temperature,
                                                  chunk_size=r.logprob_chunk_size)
        empty = torch.zeros(query_ids.shape[0], device=dev)
        return Rollout(*args, logprobs, ref_logprobs, values, empty, entropy), t_generate

    # ------------------------------------------------------------------ 2. score
    def score(self, prompts: list[str], ro: Rollout) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        """Total score ``(N,)`` (rlhf.rollout.score_responses), the gold score ``(N,)`` or None, and the text."""
        k = self.cfg.rollout.samples_per_prompt
        return score_responses(self.models.reward, self.models.tokenizer, self.models.reward_tokenizer,
                               self.cfg.reward, self.reward_fn, self.gold_fn, [p for p in prompts for _ in range(k)],
                               ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask,
                               autocast=self.acc.autocast())

    # ------------------------------------------------------------------ 3. shape
    def kl_per_token(self, ro: Rollout, estimator: str) -> torch.Tensor:
        """``(N, R)`` per-token KL of the rollout against the reference; zeros when no reference is loaded."""
        if ro.ref_logprobs is None:
            return torch.zeros_like(ro.logprobs)
        kl = per_token_kl(ro.logprobs, ro.ref_logprobs, estimator)
        return torch.where(ro.response_mask.bool(), kl, 0.0)  # padding log-probs may be inf: never multiply

    def shape(self, ro: Rollout, kl_tok: torch.Tensor, beta: float) -> torch.Tensor:
        """``(N, R)`` rewards: -beta * kl_t per token (if kl.in_reward), score at the last real token."""
        kl_in_reward = kl_tok if self.cfg.kl.in_reward else torch.zeros_like(kl_tok)
        return shape_rewards(ro.scores, kl_in_reward, ro.response_mask, beta)

    # ------------------------------------------------------------------ 4. estimate
    def estimate(self, ro: Rollout, rewards: torch.Tensor):
        """Advantages and returns ``(N, R)`` for this process's rows, computed on the batch of ALL processes so
        group baselines and whitening are global. Also returns the critic's explained variance (or None)."""
        a = self.cfg.algorithm
        r_max = self.cfg.rollout.max_new_tokens
        local_r = rewards.shape[1]
        g_rewards, g_mask = self._gather(rewards, r_max), self._gather(ro.response_mask, r_max)
        g_values = self._gather(ro.values, r_max) if ro.values is not None else None
        if self.cfg.trainer.whiten_rewards:  # over the batch of all processes, like every other statistic
            g_rewards = masked_whiten(g_rewards, g_mask, shift_mean=False)
        adv, ret = self.estimator(g_rewards, g_mask, g_values, group_size=self.cfg.rollout.samples_per_prompt,
                                  gamma=a.gamma, lam=a.lam, std_normalize=a.std_normalize)
        if self.cfg.trainer.whiten_advantages:
            adv = masked_whiten(adv, g_mask)
        ev = explained_variance(g_values, ret, g_mask) if g_values is not None else None
        n = rewards.shape[0]
        rows = slice(self.acc.process_index * n, (self.acc.process_index + 1) * n)
        return adv[rows, :local_r], ret[rows, :local_r], ev

    def _gather(self, x: torch.Tensor, width: int) -> torch.Tensor:
        if self.acc.num_processes == 1:
            return x
        x = torch.nn.functional.pad(x, (0, width - x.shape[1]))
        return self.acc.gather(x.contiguous())

    # ------------------------------------------------------------------ 5. update
    def update(self, ro: Rollout, advantages: torch.Tensor, returns: torch.Tensor, beta: float, step: int) -> dict:
        """PPO-style update: ``ppo_epochs`` passes, ``minibatches`` optimizer steps each, ``grad_accum``
        micro-batches per step. Each micro-batch loss is scaled so the summed gradient equals the gradient of the
        loss aggregated over the whole minibatch on all processes. The logged statistics (loss, clip fraction, ...)
        are weighted the same way, so after step_metrics' mean over processes each is the minibatch-wide value,
        averaged over the optimizer steps: the same numbers one process would log for the whole batch."""
        t, cfg = self.cfg.trainer, self.cfg
        n = ro.response_ids.shape[0]
        micro = n // t.minibatches // t.grad_accum
        # Seeded by the step (resume stays exact) and offset from the sampling seed of the same step; the global
        # shuffle draws the same on every process.
        rank = self.acc.process_index if t.shuffle == "process" else 0
        g = torch.Generator().manual_seed(step_seed(cfg.seed + 1, step, rank))
        sums: dict[str, torch.Tensor] = {}
        norms, skipped = [], 0
        kl_as_loss = not cfg.kl.in_reward and beta > 0 and ro.ref_logprobs is not None
        for _ in range(t.ppo_epochs):
            for mb_idx in self._minibatches(n, g, ro.response_ids.device):
                denom = self._global_count(ro.response_mask[mb_idx])
                for j in range(t.grad_accum):
                    idx = mb_idx[j * micro:(j + 1) * micro]
                    last = j == t.grad_accum - 1
                    with self._maybe_no_sync(not last):
                        loss, stats, share = self._micro_loss(ro, advantages, returns, idx, beta, kl_as_loss,
                                                              denom)
                        self.acc.backward(loss)
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v.detach() * share
                norm = self._optimizer_step()
                if norm is None:
                    skipped += 1
                else:
                    norms.append(norm)
        # This process's share of each minibatch-wide value, times num_processes: step_metrics averages over
        # processes, which then sums the shares.
        out = {k: v * (self.acc.num_processes / (t.ppo_epochs * t.minibatches)) for k, v in sums.items()}
        out["policy/grad_norm"] = torch.stack(norms).mean() if norms else torch.tensor(float("nan"))
        out["policy/skipped_updates"] = torch.tensor(float(skipped))
        return out

    def _minibatches(self, n: int, g: torch.Generator, device) -> list[torch.Tensor]:
        """One epoch's minibatches of this process's ``n`` rollout rows: trainer.minibatches index tensors of
        ``n // minibatches`` rows each. shuffle=process: slices of a permutation of this process's rows (seeded
        by its rank). shuffle=global: rlhf.rollout.sampling.minibatch_rows, the same minibatches on any number of
        processes."""
        t = self.cfg.trainer
        size = n // t.minibatches
        if t.minibatches == 1:
            return [torch.arange(n, device=device)]
        if t.shuffle == "global":
            rows = minibatch_rows(n, t.minibatches, self.acc.num_processes, self.acc.process_index, g)
            return [r.to(device) for r in rows]
        perm = torch.randperm(n, generator=g).to(device)
        return [perm[mb * size:(mb + 1) * size] for mb in range(t.minibatches)]

    def _global_count(self, mask: torch.Tensor) -> torch.Tensor:
        """What the aggregation divides by over the minibatch on all processes: tokens or sequences."""
        local = mask.sum() if self.cfg.trainer.loss_agg == "token-mean" else torch.tensor(
            float(mask.shape[0]), device=mask.device)
        return self.acc.reduce(local.float(), reduction="sum") if self.acc.num_processes > 1 else local.float()

    def _micro_loss(self, ro, advantages, returns, idx, beta, kl_as_loss, denom):
        t, r = self.cfg.trainer, self.cfg.rollout
        mask = ro.response_mask[idx]
        width = int(mask.sum(-1).max())  # drop columns that are padding in every row of this micro-batch
        mask = mask[:, :width]
        q_ids, q_mask, resp = ro.query_ids[idx], ro.query_mask[idx], ro.response_ids[idx, :width]
        live_logp, live_values = self._live if self._live is not None else (None, None)
        if live_logp is not None:  # fused: idx is every row, in order
            logp = live_logp[:, :width]
        else:
            logp, _ = policy_logprobs(self.policy, q_ids, q_mask, resp, mask, temperature=r.temperature,
                                      chunk_size=r.logprob_chunk_size)
        pg_loss, pstats = self.policy_loss_fn(logp, ro.logprobs[idx, :width], advantages[idx, :width], mask,
                                              clip_low=t.clip_low, clip_high=t.clip_high, agg=t.loss_agg)
        local = mask.sum() if t.loss_agg == "token-mean" else torch.tensor(float(mask.shape[0]))
        # aggregate() divides by the local count; rescale to the global one. DDP averages gradients over
        # processes, hence the factor num_processes.
        share = local.to(denom) / denom
        scale = share * self.acc.num_processes
        loss = pg_loss
        stats = {"policy/loss": pg_loss.detach(), "policy/clipfrac": pstats["clipfrac"],
                 "policy/approxkl": pstats["approxkl"]}
        if kl_as_loss:
            kl_term = kl_loss(logp, ro.ref_logprobs[idx, :width], mask, self.cfg.kl.estimator, t.loss_agg)
            loss = loss + beta * kl_term
            stats["policy/kl_loss"] = kl_term.detach()
        if self.critic is not None:
            values = live_values[:, :width] if live_values is not None else \
                response_values(self.critic, q_ids, q_mask, resp, mask)
            v_loss, vstats = value_loss(values, ro.values[idx, :width], returns[idx, :width], mask,
                                        clip_range=t.value_clip, loss=t.value_loss, agg=t.loss_agg)
            loss = loss + t.value_coef * v_loss
            stats["value/loss"] = v_loss.detach()
            stats["value/clipfrac"] = vstats["clipfrac"]
        return loss * scale, stats, share.detach()

    def _maybe_no_sync(self, skip_sync: bool):
        if not skip_sync or self.acc.num_processes == 1:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for m in (self.policy, self.critic):
            if m is not None:
                stack.enter_context(self.acc.no_sync(m))
        return stack

    def _optimizer_step(self) -> torch.Tensor | None:
        """rlhf.runtime.accelerator.clip_and_step: the gradient norm, or None (nothing moved) when it is not finite."""
        return clip_and_step(self.acc, self.optimizer, self.scheduler, self.cfg.trainer.max_grad_norm)

    def _count_nonfinite(self, step: int, what: str) -> None:
        """Warn that ``step`` skipped (part of) its update; stop once more than trainer.max_nonfinite_steps did."""
        limit = self.cfg.trainer.max_nonfinite_steps
        self.nonfinite_steps += 1
        warnings.warn(f"step {step}: {what}; update skipped ({self.nonfinite_steps} of at most "
                      f"trainer.max_nonfinite_steps={limit})", stacklevel=2)
        if self.nonfinite_steps > limit:
            raise TrainingError(f"trainer.max_nonfinite_steps: {self.nonfinite_steps} steps skipped for NaN/inf "
                                f"(last: step {step}, {what}); lower trainer.lr, set trainer.max_grad_norm, check "
                                "the reward model and functions, or raise trainer.max_nonfinite_steps")

    def _out_of_memory_message(self, step: int, err: BaseException) -> str:
        r, t = self.cfg.rollout, self.cfg.trainer
        lines = str(err).strip().splitlines()
        return (f"out of memory at step {step} ({lines[0] if lines else type(err).__name__}); lower "
                f"rollout.prompts_per_step (now {r.prompts_per_step}) or rollout.max_new_tokens (now "
                f"{r.max_new_tokens}), or raise trainer.minibatches (now {t.minibatches}) or trainer.grad_accum "
                f"(now {t.grad_accum}) so each backward pass sees fewer sequences")

    # ------------------------------------------------------------------ 6. log
    def step_metrics(self, step: int, ro: Rollout, gold, beta: float, update_stats: dict, ev) -> dict:
        """Global means over all processes. ``kl`` is always k1 summed over the response, averaged over sequences."""
        mask = ro.response_mask
        kl_seq = self.kl_per_token(ro, "k1").sum(-1) if ro.ref_logprobs is not None else None
        # (sum, count) pairs, reduced once over all processes.
        pairs = {
            "score": (ro.scores.sum(), ro.scores.numel()),
            "entropy": (masked_mean(ro.entropy, mask, dim=-1).sum(), mask.shape[0]),
            "response_length": (mask.sum().float(), mask.shape[0]),
        }
        if kl_seq is not None:
            pairs["kl"] = (kl_seq.sum(), kl_seq.numel())
        if gold is not None:
            pairs["gold_score"] = (gold.sum(), gold.numel())
        for k, v in update_stats.items():
            pairs[k] = (torch.as_tensor(v, dtype=torch.float32), 1)
        names = list(pairs)
        dev = self.acc.device
        sums = torch.stack([torch.as_tensor(pairs[k][0], dtype=torch.float32, device=dev) for k in names])
        counts = torch.tensor([float(pairs[k][1]) for k in names], device=dev)
        if self.acc.num_processes > 1:
            sums, counts = self.acc.reduce(sums, "sum"), self.acc.reduce(counts, "sum")
        values = (sums / counts).tolist()
        out = {"step": step, **dict(zip(names, values))}
        out.setdefault("kl", float("nan"))
        out["beta"] = beta
        out["reward"] = out["score"] - beta * out["kl"] if math.isfinite(out["kl"]) else out["score"]
        out["policy/lr"] = self.scheduler.get_last_lr()[0]
        if ev is not None:
            out["value/explained_variance"] = float(ev)
        if torch.cuda.is_available():
            out["memory/peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return out

    def log_samples(self, step: int, prompts: list[str], completions: list[str], scores: torch.Tensor,
                    n: int = 4) -> None:
        if not self.acc.is_main_process:
            return
        k = self.cfg.rollout.samples_per_prompt
        rows = [{"prompt": prompts[i // k], "completion": completions[i], "score": float(scores[i])}
                for i in range(min(n, len(completions)))]
        self.logger.log_samples(step, rows)

    # ------------------------------------------------------------------ 7. checkpoint
    def save(self, step: int) -> str | None:
        """Write ``checkpoints/step_<step>`` (main process only, atomically); returns its path there. Refuses
        non-finite weights. Every process takes part in the same collectives whatever happens, so a refusal or a
        failed write raises on all of them instead of leaving the others waiting."""
        policy = self.acc.unwrap_model(self.policy)
        critic = self.acc.unwrap_model(self.critic).model if self.critic is not None else None
        # Each process checks what it holds (an FSDP2 process: its shards), and _any_process combines the answers.
        bad = [name for name, m in (("policy", policy), ("value", critic))
               if m is not None and not all(bool(torch.isfinite(_local(p)).all()) for p in m.parameters())]
        if self._any_process(bool(bad)):
            raise TrainingError(f"{' and '.join(bad) or 'model'} weights are not finite at step {step}; checkpoint "
                                "not written (the previous one is kept)")
        # Collective: under ZeRO-3 and FSDP2 the whole weights exist only once gathered, so every process takes part.
        policy_weights = self.acc.get_state_dict(self.policy)
        critic_weights = None
        if critic is not None and self._is_fsdp2():  # TokenValues' names: "model." + the value model's
            critic_weights = {k.removeprefix("model."): v for k, v in self.acc.get_state_dict(self.critic).items()}
        optimizer_state = self._optimizer_state()
        path, failure = None, None
        if self.acc.is_main_process:
            state = {"step": step, "optimizer": optimizer_state,
                     "scheduler": self.scheduler.state_dict(), "kl_controller": self.kl_ctl.state_dict(),
                     "nonfinite_steps": self.nonfinite_steps,
                     "config": OmegaConf.to_container(self.cfg, resolve=True)}

            def write(folder: str) -> None:
                policy.save_pretrained(os.path.join(folder, "policy"), state_dict=policy_weights)
                self.models.tokenizer.save_pretrained(os.path.join(folder, "policy"))
                if critic is not None:
                    critic.save_pretrained(os.path.join(folder, "value"), state_dict=critic_weights)
                torch.save(state, os.path.join(folder, "trainer_state.pt"))

            try:
                path = save_checkpoint(self.ckpt_root, step, write, self.cfg.trainer.keep_last)
            except CheckpointWriteError as e:
                failure = e
        if self._any_process(failure is not None):
            raise failure or TrainingError(f"run_dir: the main process could not write checkpoint step_{step}")
        return path

    def _load_state(self, path: str) -> None:
        """Optimizer, schedule, KL controller and counters from ``path``; the weights came with the models."""
        try:
            state = load_trainer_state(path)
            if state["optimizer"] is not None:
                self._load_optimizer_state(state["optimizer"])
            else:
                warnings.warn(f"trainer.resume: {path} holds no optimizer state (written under DeepSpeed, which "
                              "partitions it); AdamW's moments start from zero", stacklevel=2)
            self.scheduler.load_state_dict(state["scheduler"])
            self.kl_ctl.load_state_dict(state["kl_controller"])
            self.nonfinite_steps = state["nonfinite_steps"]
            self.start_step = state["step"]
        except (KeyError, ValueError, RuntimeError, EOFError, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"trainer.resume: checkpoint {path!r} does not fit this run ({first}); resume "
                                  "with the config it was written with") from e

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self):
        """SIGINT and SIGTERM ask for a stop after the current step (see train). The handler then puts the previous
        one back, so a second signal acts at once: a stuck step can still be stopped."""
        old = {}

        def request_stop(signum, frame):
            self.stop_signal = signum
            signal.signal(signum, old.get(signum) or signal.SIG_DFL)
            print(f"{signal.Signals(signum).name}: stopping after this step and writing a checkpoint (send it again "
                  "to stop at once, without one)", file=sys.stderr, flush=True)

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread
                pass
        return old

    def _restore_signal_handlers(self, old) -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler or signal.SIG_DFL)

    def _stop_agreed(self) -> int | None:
        """The signal that stops the run after this step. A stop on any process stops all of them after the same
        step, so the checkpoint is collective."""
        if self._any_process(self.stop_signal is not None):
            return self.stop_signal or signal.SIGTERM
        return None

    def _any_process(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any: for decisions all processes must take together."""
        if self.acc.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(t, "sum").item() > 0)
