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
import math
import os
import signal
import time
import warnings

import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf
from transformers import get_scheduler

from rlhf.advantages import ADVANTAGE_ESTIMATORS
from rlhf.checkpoint import check_checkpoint, latest_checkpoint, load_trainer_state, save_checkpoint
from rlhf.config import import_function
from rlhf.kl import build_kl_controller, per_token_kl, shape_rewards
from rlhf.losses import masked_mean, masked_whiten
from rlhf.models import (
    Models,
    freeze,
    load_causal_lm,
    load_score_model,
    load_tokenizer,
    same_tokenizer,
    value_model_from_policy,
)
from rlhf.objectives import POLICY_LOSSES, explained_variance, kl_loss, value_loss
from rlhf.rollout import (
    Rollout,
    TokenValues,
    call_reward_function,
    decode_responses,
    generate,
    has_eos,
    policy_logprobs,
    response_values,
    reward_model_scores,
)
from rlhf.tracking import MetricsLogger, truncate_metrics


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite updates, ...). The message says what to change."""


def step_seed(seed: int, step: int, rank: int) -> int:
    """Sampling and shuffling are re-seeded every step, so a resumed run draws exactly what the original drew."""
    return (seed * 1_000_003 + step * 7919 + rank) % (2**63 - 1)


class PolicyTrainer:
    def __init__(self, cfg: DictConfig, accelerator: Accelerator | None = None):
        self.cfg = cfg
        t = cfg.trainer
        if t.torch_threads:
            torch.set_num_threads(t.torch_threads)
        self.acc = accelerator or Accelerator(cpu=t.cpu, mixed_precision=t.mixed_precision)
        self.run_dir = self._shared_run_dir(cfg.run_dir)
        self.ckpt_root = os.path.join(self.run_dir, "checkpoints")
        self.resume_from = self._resolve_resume(t.resume)

        self.prompts = self._load_prompts()
        self.models = self._load_models()
        self._check_prompt_lengths()
        self.policy_loss_fn = POLICY_LOSSES.get(cfg.algorithm.policy_loss)
        self.estimator = ADVANTAGE_ESTIMATORS.get(cfg.algorithm.advantage)
        self.reward_fn = import_function(cfg.reward.function, "reward.function") if cfg.reward.function else None
        self.gold_fn = import_function(cfg.reward.gold, "reward.gold") if cfg.reward.gold else None
        self.kl_ctl = build_kl_controller(cfg.kl.controller, cfg.kl.beta, cfg.kl.target, cfg.kl.horizon)

        self.policy = self.models.policy
        self.critic = TokenValues(self.models.value) if self.models.value is not None else None
        self.optimizer = self._build_optimizer()
        if self.critic is not None:
            self.policy, self.critic, self.optimizer = self.acc.prepare(self.policy, self.critic, self.optimizer)
        else:
            self.policy, self.optimizer = self.acc.prepare(self.policy, self.optimizer)
        # Not prepared: accelerate would step a prepared scheduler once per process.
        self.scheduler = get_scheduler(t.scheduler, self.optimizer,
                                       num_warmup_steps=t.warmup_steps,
                                       num_training_steps=t.max_steps * t.ppo_epochs * t.minibatches)
        for m in (self.models.reference, self.models.reward):
            if m is not None:
                m.to(self.acc.device)

        self.start_step = 0
        self.nonfinite_steps = 0
        self.stop_requested = False
        if self.resume_from:
            self._load_state(self.resume_from)
        self.logger = MetricsLogger(self.run_dir, enabled=self.acc.is_main_process,
                                    tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                                    wandb_project=cfg.logging.wandb_project,
                                    config=OmegaConf.to_container(cfg, resolve=True))
        if self.acc.is_main_process and self.resume_from:
            truncate_metrics(self.logger.path, self.start_step - 1)
            truncate_metrics(self.logger.samples_path, self.start_step - 1)

    # ------------------------------------------------------------------ setup
    def _shared_run_dir(self, run_dir: str) -> str:
        """Hydra names each process's job folder by the time it started; all processes use rank 0's."""
        if self.acc.num_processes == 1:
            return run_dir
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([run_dir], from_process=0)[0]

    def _resolve_resume(self, resume: str | None) -> str | None:
        if resume is None:
            return None
        if resume == "auto":
            return latest_checkpoint(self.ckpt_root)
        check_checkpoint(resume)
        return resume

    def _load_prompts(self) -> list[str]:
        from rlhf.data import load_prompts

        d = self.cfg.data
        return load_prompts(d.prompts, column=d.prompt_column, split=d.split, n=d.num_prompts, seed=self.cfg.seed)

    def _check_prompt_lengths(self) -> None:
        """Prompts longer than data.max_prompt_length are refused (truncating would change the task silently)."""
        tok = self.models.tokenizer
        limit = self.cfg.data.max_prompt_length
        lengths = [len(ids) for ids in tok(self.prompts, add_special_tokens=True)["input_ids"]]
        for i, n in enumerate(lengths):
            if n > limit:
                raise ValueError(f"data.max_prompt_length: prompt {i} of {self.cfg.data.prompts} has {n} tokens "
                                 f"> {limit}; shorten it or raise data.max_prompt_length")
        ctx = getattr(self.models.policy.config, "max_position_embeddings", None)
        if ctx is not None and limit + self.cfg.rollout.max_new_tokens > ctx:
            raise ValueError(f"data.max_prompt_length: {limit} + rollout.max_new_tokens "
                             f"{self.cfg.rollout.max_new_tokens} exceeds the model's context of {ctx} tokens")

    def _load_models(self) -> Models:
        cfg, m = self.cfg, self.cfg.model
        tok = load_tokenizer(m.tokenizer or m.policy)
        policy_spec = os.path.join(self.resume_from, "policy") if self.resume_from else m.policy
        policy = load_causal_lm(policy_spec, tok, m.dtype, seed=cfg.seed)
        need_ref = cfg.kl.beta > 0 or cfg.kl.log_at_zero_beta or cfg.kl.controller == "adaptive"
        reference = None
        if need_ref:
            # The reference is the starting policy, also when the policy itself comes from a checkpoint.
            reference = freeze(copy.deepcopy(policy) if not self.resume_from
                               else load_causal_lm(m.policy, tok, m.dtype, seed=cfg.seed))
        reward = reward_tok = None
        if m.reward is not None:
            reward = freeze(load_score_model(m.reward, tok, m.dtype, seed=cfg.seed))
            reward_tok = load_tokenizer(m.reward_tokenizer or m.reward, padding_side="right")
            if same_tokenizer(tok, reward_tok):
                reward_tok = None
        value = None
        if cfg.algorithm.critic:
            if self.resume_from:
                value = load_score_model(os.path.join(self.resume_from, "value"), tok, m.dtype, key="trainer.resume")
            elif m.value is not None:
                value = load_score_model(m.value, tok, m.dtype, seed=cfg.seed, key="model.value")
            elif reward is not None and reward_tok is None:
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

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict]:
        """Run from ``start_step`` to ``trainer.max_steps``; returns the logged metrics of this process."""
        cfg = self.cfg
        history = []
        old_handlers = self._install_signal_handlers()
        bar = None
        if cfg.logging.progress and self.acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.trainer.max_steps, initial=self.start_step, desc="rlhf", dynamic_ncols=True)
        try:
            step = self.start_step
            for step in range(self.start_step, cfg.trainer.max_steps):
                metrics = self.train_step(step)
                history.append(metrics)
                if step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_steps - 1:
                    self.logger.log(metrics)
                if bar is not None:
                    bar.set_postfix(score=f"{metrics['score']:.3f}", kl=f"{metrics['kl']:.3f}",
                                    reward=f"{metrics['reward']:.3f}")
                    bar.update(1)
                done = step + 1
                if self._stop_agreed():
                    self.save(done)
                    break
                if cfg.trainer.save_every and done % cfg.trainer.save_every == 0 and done < cfg.trainer.max_steps:
                    self.save(done)
            else:
                self.save(cfg.trainer.max_steps)
        finally:
            if bar is not None:
                bar.close()
            self.logger.close()
            self._restore_signal_handlers(old_handlers)
        return history

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        torch.manual_seed(step_seed(cfg.seed, step, self.acc.process_index))
        beta = self.kl_ctl.value
        prompts = self.prompt_batch(step)

        t0 = time.perf_counter()
        rollout, t_generate = self.sample(prompts)                                # 1. sample
        scores, gold, completions = self.score(prompts, rollout)                  # 2. score
        rollout = rollout._replace(scores=scores)
        t_score = time.perf_counter() - t0 - t_generate
        kl_tok = self.kl_per_token(rollout, cfg.kl.estimator)
        rewards = self.shape(rollout, kl_tok, beta)                               # 3. shape
        advantages, returns, ev = self.estimate(rollout, rewards)                 # 4. estimate
        t1 = time.perf_counter()
        update_stats = self.update(rollout, advantages, returns, beta)            # 5. update
        t_update = time.perf_counter() - t1

        metrics = self.step_metrics(step, rollout, gold, beta, update_stats, ev)  # 6. log
        self.kl_ctl.update(metrics["kl"], cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt)
        metrics["time/generated_tokens_per_s"] = (metrics["response_length"] * cfg.rollout.prompts_per_step
                                                  * cfg.rollout.samples_per_prompt / max(t_generate, 1e-9))
        metrics.update({"time/generate_s": t_generate, "time/score_s": t_score, "time/update_s": t_update,
                        "time/step_s": time.perf_counter() - t0})
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
        g = torch.Generator().manual_seed(self.cfg.seed + epoch)
        order = torch.randperm(n, generator=g)
        idx = order[torch.arange(pos * p, pos * p + p) % n]
        per_rank = p // self.acc.num_processes
        mine = idx[self.acc.process_index * per_rank:(self.acc.process_index + 1) * per_rank]
        return [self.prompts[i] for i in mine.tolist()]

    def sample(self, prompts: list[str]) -> tuple[Rollout, float]:
        r = self.cfg.rollout
        tok = self.models.tokenizer
        dev = self.acc.device
        enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
        query_ids = enc["input_ids"].repeat_interleave(r.samples_per_prompt, 0).to(dev)
        query_mask = enc["attention_mask"].repeat_interleave(r.samples_per_prompt, 0).to(dev)
        t0 = time.perf_counter()
        response_ids, response_mask = generate(
            self.acc.unwrap_model(self.policy), query_ids, query_mask, tok, max_new_tokens=r.max_new_tokens,
            min_new_tokens=r.min_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)
        t_generate = time.perf_counter() - t0
        args = (query_ids, query_mask, response_ids, response_mask)
        with torch.no_grad(), self.acc.autocast():
            logprobs, entropy = policy_logprobs(self.policy, *args, temperature=r.temperature,
                                                chunk_size=r.logprob_chunk_size, with_entropy=True)
            ref_logprobs = None
            if self.models.reference is not None:
                ref_logprobs, _ = policy_logprobs(self.models.reference, *args, temperature=r.temperature,
                                                  chunk_size=r.logprob_chunk_size)
            values = response_values(self.critic, *args) if self.critic is not None else None
        empty = torch.zeros(query_ids.shape[0], device=dev)
        return Rollout(*args, logprobs, ref_logprobs, values, empty, entropy), t_generate

    # ------------------------------------------------------------------ 2. score
    def score(self, prompts: list[str], ro: Rollout) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        """Total score ``(N,)``: weighted reward model + reward function, + missing-EOS penalty, clipped."""
        cfg, tok = self.cfg.reward, self.models.tokenizer
        k = self.cfg.rollout.samples_per_prompt
        texts_p = [p for p in prompts for _ in range(k)]
        completions = decode_responses(tok, ro.response_ids, ro.response_mask)
        dev = self.acc.device
        scores = torch.zeros(len(completions), device=dev)
        if self.models.reward is not None:
            with torch.no_grad(), self.acc.autocast():
                rm = reward_model_scores(self.models.reward, tok, self.models.reward_tokenizer, ro.query_ids,
                                         ro.query_mask, ro.response_ids, ro.response_mask, texts_p, completions)
            if not torch.isfinite(rm).all():
                raise TrainingError(f"model.reward {self.cfg.model.reward} returned a non-finite score")
            scores = scores + cfg.model_weight * rm
        if self.reward_fn is not None:
            fn_scores = call_reward_function(self.reward_fn, cfg.function, texts_p, completions)
            scores = scores + cfg.function_weight * fn_scores.to(dev)
        if cfg.missing_eos_penalty is not None:
            ended = has_eos(ro.response_ids, ro.response_mask, tok.eos_token_id)
            scores = scores + torch.where(ended, 0.0, cfg.missing_eos_penalty)
        if cfg.clip is not None:
            scores = scores.clamp(-cfg.clip, cfg.clip)
        gold = None
        if self.gold_fn is not None:
            gold = call_reward_function(self.gold_fn, cfg.gold, texts_p, completions).to(dev)
        return scores, gold, completions

    # ------------------------------------------------------------------ 3. shape
    def kl_per_token(self, ro: Rollout, estimator: str) -> torch.Tensor:
        """``(N, R)`` per-token KL of the rollout against the reference; zeros when no reference is loaded."""
        if ro.ref_logprobs is None:
            return torch.zeros_like(ro.logprobs)
        return per_token_kl(ro.logprobs, ro.ref_logprobs, estimator) * ro.response_mask

    def shape(self, ro: Rollout, kl_tok: torch.Tensor, beta: float) -> torch.Tensor:
        """``(N, R)`` rewards: -beta * kl_t per token (if kl.in_reward), score at the last real token."""
        kl_in_reward = kl_tok if self.cfg.kl.in_reward else torch.zeros_like(kl_tok)
        rewards = shape_rewards(ro.scores, kl_in_reward, ro.response_mask, beta)
        if self.cfg.trainer.whiten_rewards:
            rewards = masked_whiten(rewards, ro.response_mask, shift_mean=False)
        return rewards

    # ------------------------------------------------------------------ 4. estimate
    def estimate(self, ro: Rollout, rewards: torch.Tensor):
        """Advantages and returns ``(N, R)`` for this process's rows, computed on the batch of ALL processes so
        group baselines and whitening are global. Also returns the critic's explained variance (or None)."""
        a = self.cfg.algorithm
        r_max = self.cfg.rollout.max_new_tokens
        local_r = rewards.shape[1]
        g_rewards, g_mask = self._gather(rewards, r_max), self._gather(ro.response_mask, r_max)
        g_values = self._gather(ro.values, r_max) if ro.values is not None else None
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
    def update(self, ro: Rollout, advantages: torch.Tensor, returns: torch.Tensor, beta: float) -> dict:
        """PPO-style update: ``ppo_epochs`` passes, ``minibatches`` optimizer steps each, ``grad_accum``
        micro-batches per step. Each micro-batch loss is scaled so the summed gradient equals the gradient of the
        loss aggregated over the whole minibatch on all processes."""
        t, cfg = self.cfg.trainer, self.cfg
        n = ro.response_ids.shape[0]
        mb_size = n // t.minibatches
        micro = mb_size // t.grad_accum
        g = torch.Generator().manual_seed(step_seed(cfg.seed, 10**6, self.acc.process_index))
        sums: dict[str, torch.Tensor] = {}
        count = 0
        kl_as_loss = not cfg.kl.in_reward and beta > 0 and ro.ref_logprobs is not None
        for _ in range(t.ppo_epochs):
            perm = torch.randperm(n, generator=g).to(ro.response_ids.device) if t.minibatches > 1 else \
                torch.arange(n, device=ro.response_ids.device)
            for mb in range(t.minibatches):
                mb_idx = perm[mb * mb_size:(mb + 1) * mb_size]
                denom = self._global_count(ro.response_mask[mb_idx])
                for j in range(t.grad_accum):
                    idx = mb_idx[j * micro:(j + 1) * micro]
                    last = j == t.grad_accum - 1
                    with self._maybe_no_sync(not last):
                        loss, stats = self._micro_loss(ro, advantages, returns, idx, beta, kl_as_loss, denom)
                        self.acc.backward(loss)
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v.detach()
                    count += 1
                sums["policy/grad_norm"] = sums.get("policy/grad_norm", 0.0) + self._optimizer_step()
        return {k: v / count if k != "policy/grad_norm" else v / (t.ppo_epochs * t.minibatches)
                for k, v in sums.items()}

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
        logp, _ = policy_logprobs(self.policy, q_ids, q_mask, resp, mask, temperature=r.temperature,
                                  chunk_size=r.logprob_chunk_size)
        pg_loss, pstats = self.policy_loss_fn(logp, ro.logprobs[idx, :width], advantages[idx, :width], mask,
                                              clip_low=t.clip_low, clip_high=t.clip_high, agg=t.loss_agg)
        local = mask.sum() if t.loss_agg == "token-mean" else torch.tensor(float(mask.shape[0]))
        # aggregate() divides by the local count; rescale to the global one. DDP averages gradients over
        # processes, hence the factor num_processes.
        scale = local.to(denom) / denom * self.acc.num_processes
        loss = pg_loss
        stats = {"policy/loss": pg_loss.detach(), "policy/clipfrac": pstats["clipfrac"],
                 "policy/approxkl": pstats["approxkl"]}
        if kl_as_loss:
            kl_term = kl_loss(logp, ro.ref_logprobs[idx, :width], mask, self.cfg.kl.estimator, t.loss_agg)
            loss = loss + beta * kl_term
            stats["policy/kl_loss"] = kl_term.detach()
        if self.critic is not None:
            values = response_values(self.critic, q_ids, q_mask, resp, mask)
            v_loss, vstats = value_loss(values, ro.values[idx, :width], returns[idx, :width], mask,
                                        clip_range=t.value_clip, loss=t.value_loss, agg=t.loss_agg)
            loss = loss + t.value_coef * v_loss
            stats["value/loss"] = v_loss.detach()
            stats["value/clipfrac"] = vstats["clipfrac"]
        return loss * scale, stats

    def _maybe_no_sync(self, skip_sync: bool):
        if not skip_sync or self.acc.num_processes == 1:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for m in (self.policy, self.critic):
            if m is not None:
                stack.enter_context(self.acc.no_sync(m))
        return stack

    def _optimizer_step(self) -> torch.Tensor:
        """Clip, check for non-finite gradients (skip the step if any), step. Returns the gradient norm."""
        t = self.cfg.trainer
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = self.acc.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm is not None else float("inf"))
        norm = torch.as_tensor(norm)
        if not torch.isfinite(norm):
            self.nonfinite_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            warnings.warn(f"non-finite loss or gradient: update skipped ({self.nonfinite_steps} of at most "
                          f"trainer.max_nonfinite_steps={t.max_nonfinite_steps})", stacklevel=2)
            if self.nonfinite_steps > t.max_nonfinite_steps:
                raise TrainingError(f"trainer.max_nonfinite_steps: {self.nonfinite_steps} updates had non-finite "
                                    "gradients; lower trainer.lr, set trainer.max_grad_norm, or check the rewards")
            return torch.zeros(())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach().float().cpu()

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
        """Write ``checkpoints/step_<step>`` (rank 0 only, atomically). Refuses non-finite weights."""
        self.acc.wait_for_everyone()
        path = None
        if self.acc.is_main_process:
            policy = self.acc.unwrap_model(self.policy)
            critic = self.acc.unwrap_model(self.critic).model if self.critic is not None else None
            for name, m in (("policy", policy), ("value", critic)):
                if m is not None and not all(torch.isfinite(p).all() for p in m.parameters()):
                    raise TrainingError(f"{name} weights are not finite at step {step}; checkpoint not written")
            state = {"step": step, "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "kl_controller": self.kl_ctl.state_dict(),
                     "nonfinite_steps": self.nonfinite_steps, "rng": torch.get_rng_state(),
                     "config": OmegaConf.to_container(self.cfg, resolve=True)}

            def write(folder: str) -> None:
                policy.save_pretrained(os.path.join(folder, "policy"))
                self.models.tokenizer.save_pretrained(os.path.join(folder, "policy"))
                if critic is not None:
                    critic.save_pretrained(os.path.join(folder, "value"))
                torch.save(state, os.path.join(folder, "trainer_state.pt"))

            path = save_checkpoint(self.ckpt_root, step, write, self.cfg.trainer.keep_last)
        self.acc.wait_for_everyone()
        return path

    def _load_state(self, path: str) -> None:
        state = load_trainer_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.nonfinite_steps = state["nonfinite_steps"]
        self.start_step = state["step"]

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self):
        def request_stop(signum, frame):
            self.stop_requested = True

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread
                pass
        return old

    def _restore_signal_handlers(self, old) -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    def _stop_agreed(self) -> bool:
        """A stop on any process stops all of them after the same step (so the checkpoint is collective)."""
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.acc.device)
        if self.acc.num_processes > 1:
            flag = self.acc.reduce(flag, "sum")
        return bool(flag.item() > 0)
