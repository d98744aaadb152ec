"""The policy trainer: one loop for PPO, RLOO, GRPO and REINFORCE++.

Each step is a handful of named steps:

    1. sample      prompts -> responses (generate), policy / reference log-probs, critic values
    2. score       reward model and/or reward functions -> one score per response (+ gold score, logged only)
    3. shape       per-token rewards: -beta * kl_t on every token, score added at the last real token
    4. estimate    advantages and returns from the registered estimator (on the global batch)
    5. update      epochs x minibatches x micro-batches of the RL loss (rlhf.core.rl_loss)
    6. log         global means over all processes -> metrics.jsonl, TensorBoard, progress bar
    7. checkpoint  atomically, every N steps and at the end

The algorithm is a choice of estimator and loss in the registries, not a subclass. The rooms around the loop are
their own modules: the distributed backend (rlhf.runtime.backend), setup (policy_setup), metrics (policy_metrics),
checkpoint contents (policy_state), signals (rlhf.runtime.signals).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import NamedTuple

import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf
from transformers import get_scheduler

from rlhf.chat import add_special_tokens_for, chat_enabled, format_prompts
from rlhf.core.advantages import ADVANTAGE_ESTIMATORS
from rlhf.core.kl import build_kl_controller, per_token_kl, shape_rewards
from rlhf.core.losses import masked_whiten
from rlhf.core.objectives import POLICY_LOSSES, explained_variance
from rlhf.core.rl_loss import LossSettings, rl_loss
from rlhf.rewards.sources import Scored
from rlhf.rollout.batch import Rollout
from rlhf.rollout.dynamic import (
    add_overlong_penalty,
    concat_rollouts,
    concat_scored,
    fill_groups,
    informative_groups,
    overlong_buffer_tokens,
    select_rows,
    select_scored,
)
from rlhf.rollout.engines import build_engine, check_backend, engine_options
from rlhf.rollout.forward import TokenValues, policy_logprobs, response_values, rollout_forwards
from rlhf.rollout.sampling import row_keys
from rlhf.rollout.spec import SamplingSpec
from rlhf.runtime.accelerator import make_accelerator
from rlhf.runtime.backend import DistributedBackend, micro_batch_share
from rlhf.runtime.checkpoint import resolve_resume
from rlhf.runtime.errors import TrainingError, TrainingInterrupted
from rlhf.runtime.runlock import lock_run_dir
from rlhf.runtime.signals import StopSignals
from rlhf.runtime.tracking import open_logger
from rlhf.trainers import policy_setup as setup
from rlhf.trainers.policy_eval import HeldOut
from rlhf.trainers.policy_metrics import (
    add_timings,
    dynamic_counts,
    mismatch_metrics,
    progress_bar,
    sample_rows,
    start_line,
    step_metrics,
)
from rlhf.trainers.policy_state import load_state, save_policy_checkpoint
from rlhf.trainers.policy_update import (
    check_nonfinite_budget,
    is_out_of_memory,
    loss_units,
    minibatch_indices,
    mismatch_corrected,
    out_of_memory_message,
    prompt_rows,
    step_seed,
)

__all__ = ["PolicyTrainer", "TrainingError", "TrainingInterrupted", "is_out_of_memory", "step_seed"]

log = logging.getLogger(__name__)


class Live(NamedTuple):
    """The fused path's forward (one epoch, one minibatch, no accumulation): the sampling-time policy log-probs and
    critic values ``(N, R)`` with their graphs, reused by the update instead of a second forward."""

    logprobs: torch.Tensor
    values: torch.Tensor | None


class Sampled(NamedTuple):
    """What ``sample`` hands on besides the rollout: generation and weight-sync seconds, and dynamic sampling's
    ``dynamic/*`` counts (None when it is off)."""

    t_generate: float
    t_sync: float
    drawn: dict[str, float] | None


class PolicyTrainer:
    def __init__(self, cfg: DictConfig, accelerator: Accelerator | None = None):
        self.cfg = cfg
        if cfg.trainer.torch_threads:
            torch.set_num_threads(cfg.trainer.torch_threads)
        self.backend = DistributedBackend(accelerator or make_accelerator(cfg.trainer))
        self.acc = self.backend.acc
        # Hydra names each process's job folder by the time it started; all processes use rank 0's.
        self.run_dir = self.backend.from_main(cfg.run_dir)
        # One writer per run folder, taken before anything loads or is written (rlhf.runtime.runlock).
        self.run_lock = lock_run_dir(self.acc, self.run_dir)
        try:
            self._setup()
        except BaseException:
            self.run_lock.release()
            raise

    def _setup(self) -> None:
        """Checkpoint to resume, prompts (checked before any weights load), models, optimizer, engine, logger."""
        cfg, t, b = self.cfg, self.cfg.trainer, self.backend
        self.ckpt_root = os.path.join(self.run_dir, "checkpoints")
        self.resume_from = resolve_resume(t.resume, self.ckpt_root, b)
        tokenizer = setup.load_policy_tokenizer(cfg)
        self.prompts = setup.load_prompts(cfg)
        # The policy reads each prompt as its chat template renders it (data.chat_template); rewards get it plain.
        self.chat = chat_enabled(tokenizer, cfg.data.chat_template)
        self.rendered = dict(zip(self.prompts, format_prompts(tokenizer, self.prompts, self.chat,
                                                              cfg.data.system_prompt)))
        setup.check_prompt_lengths(cfg, list(self.rendered.values()), tokenizer, add_special_tokens_for(self.chat))
        self.models, self.rewards = setup.load_models(cfg, tokenizer, self.resume_from, b.zero_stage)
        self.policy_loss_fn = POLICY_LOSSES.get(cfg.algorithm.policy_loss)
        self.estimator = ADVANTAGE_ESTIMATORS.get(cfg.algorithm.advantage)
        self.spec = SamplingSpec.from_config(cfg.rollout, eos_token_id=tokenizer.eos_token_id)
        self.overlong_buffer = overlong_buffer_tokens(cfg.reward.overlong_buffer, cfg.rollout.max_new_tokens)
        self.kl_ctl = build_kl_controller(cfg.kl.controller, cfg.kl.beta, cfg.kl.target, cfg.kl.horizon)
        critic = TokenValues(self.models.value) if self.models.value is not None else None
        optimizer = setup.build_optimizer(cfg, self.models.policy, critic)
        r = cfg.rollout
        b.check(t, r.prompts_per_step * r.samples_per_prompt // b.num_processes, critic is not None)
        check_backend(r.engine, b.kind, engine_options(cfg))
        self.policy, self.critic, self.optimizer = b.prepare(self.models.policy, critic, optimizer)
        # Not prepared: accelerate would step a prepared scheduler once per process.
        self.scheduler = get_scheduler(t.scheduler, self.optimizer, num_warmup_steps=t.warmup_steps,
                                       num_training_steps=t.max_steps * t.ppo_epochs * t.minibatches)
        self.models.reference = b.place_frozen(self.models.reference)
        self.rewards.place(b.place_frozen)
        self.models.reward = self.rewards.reward_model()[0]
        self.engine = build_engine(r.engine, b.unwrap(self.policy), self.models.tokenizer, self.spec,
                                   gather=lambda: b.gathered_for_generation(self.policy, r.gather_for_generation),
                                   synced_gpus=b.synced_gpus, **engine_options(cfg))
        # With one epoch, one minibatch and no accumulation the update sees exactly the rollout's batch once, so the
        # rollout's policy forward doubles as the update's (see sample()). DeepSpeed steps inside backward.
        self.fused = t.ppo_epochs == 1 and t.minibatches == 1 and t.grad_accum == 1 and not b.steps_inside_backward
        self.loss_settings = LossSettings(clip_low=t.clip_low, clip_high=t.clip_high, agg=t.loss_agg,
                                          agg_norm=cfg.rollout.max_new_tokens, kl_estimator=cfg.kl.estimator,
                                          kl_correction=cfg.kl.loss_correction,
                                          value_clip=t.value_clip, value_loss=t.value_loss, value_coef=t.value_coef)
        self.start_step, self.nonfinite_steps = 0, 0
        self.signals = StopSignals()
        if self.resume_from:
            self.start_step, self.nonfinite_steps = load_state(
                self.resume_from, self._load_optimizer_state, self.scheduler, self.kl_ctl)
        self.held_out = HeldOut(cfg, tokenizer, self.chat, self.spec, b) if cfg.eval.every else None
        self.logger = open_logger(cfg, self.run_dir, self.backend.is_main, self.start_step, self.ckpt_root)

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict]:
        """Run from ``start_step`` to ``trainer.max_steps``; returns the logged metrics of this process.

        SIGINT or SIGTERM stop the run after the current step: its checkpoint is written, then TrainingInterrupted
        is raised. Running out of memory raises TrainingError saying which settings to lower.
        """
        cfg, t = self.cfg, self.cfg.trainer
        if self.backend.is_main:
            log.info(start_line(cfg, self.backend, self.start_step, self.run_dir))
        history, bar = [], progress_bar(cfg, self.backend.is_main, self.start_step)
        self.signals.install()
        try:
            for step in range(self.start_step, t.max_steps):
                try:
                    metrics = self.train_step(step)
                except (RuntimeError, MemoryError) as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
                    if not is_out_of_memory(e):
                        raise
                    raise TrainingError(out_of_memory_message(step, e, cfg.rollout, t)) from e
                history.append(metrics)
                if step % t.log_every == 0 or step == t.max_steps - 1:
                    self.logger.log(metrics)
                if bar is not None:
                    bar.set_postfix(score=f"{metrics['score']:.3f}", kl=f"{metrics['kl']:.3f}",
                                    reward=f"{metrics['reward']:.3f}")
                    bar.update(1)
                self._after_step(step)
            if self.start_step < t.max_steps:  # a run resumed at its last step has nothing new
                self.save(t.max_steps)
                if self.held_out is not None:  # the final policy, as checkpoints/step_<max_steps> holds it
                    history.append(self._evaluate_final(t.max_steps))
        finally:
            if bar is not None:
                bar.close()
            self.logger.close()
            self.engine.close()
            self.signals.restore()
            self.run_lock.release()
        return history

    def _evaluate_final(self, steps: int) -> dict:
        """Held-out metrics of the trained policy, logged as a line of their own at step ``steps``: eval/* at step N
        is always the policy after N updates, the one checkpoints/step_N holds."""
        t0 = time.perf_counter()
        metrics = {"step": steps, **self.held_out.run(self.backend.unwrap(self.policy))}
        metrics["time/eval_s"] = time.perf_counter() - t0
        self.logger.log(metrics)
        return metrics

    def _after_step(self, step: int) -> None:
        """Checkpoint every trainer.save_every steps, and stop (with a checkpoint) when a signal asked for it."""
        t, done = self.cfg.trainer, step + 1
        signum = self._stop_agreed()
        if signum is not None and done < t.max_steps:
            path = self.save(done) or os.path.join(self.ckpt_root, f"step_{done}")
            raise TrainingInterrupted(
                f"{signal.Signals(signum).name} after step {step}: checkpoint {path} written; continue with "
                f"trainer.resume=auto hydra.run.dir={self.run_dir}", signum)
        if t.save_every and done % t.save_every == 0 and done < t.max_steps:
            self.save(done)

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        torch.manual_seed(step_seed(cfg.seed, step, self.backend.process_index))
        beta = self.kl_ctl.value

        every = cfg.eval.every  # held-out evaluation of the policy this step starts from (= checkpoint step_<step>)
        due = self.held_out is not None and step % every == 0
        t0 = time.perf_counter()
        evaluated = self.held_out.run(self.backend.unwrap(self.policy)) if due else {}
        if due:
            evaluated["time/eval_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        prompts, rollout, scored, sampled = self.sample(step)                     # 1. sample, 2. score
        rollout, live = self.forwards(rollout._replace(scores=scored.total))      #    log-probs, values
        t_score = time.perf_counter() - t0 - sampled.t_generate
        update_stats, ev, t_update = {}, None, 0.0
        # A NaN score would make every advantage of the batch NaN (whitening and baselines mix rows): skip the step.
        if self.backend.any(not bool(torch.isfinite(scored.total).all())):
            self._count_nonfinite(step, self.rewards.nonfinite_message(scored)
                                  or "a reward source returned a non-finite score on another process")
        else:
            kl_tok = self.kl_per_token(rollout, cfg.kl.estimator)
            rewards = self.shape(rollout, kl_tok, beta)                           # 3. shape
            advantages, returns, ev = self.estimate(rollout, rewards)             # 4. estimate
            advantages = mismatch_corrected(rollout, advantages, cfg.algorithm, cfg.rollout.engine)
            t1 = time.perf_counter()
            update_stats = self.update(rollout, advantages, returns, beta, step, live=live)  # 5. update
            t_update = time.perf_counter() - t1
            if update_stats["policy/skipped_updates"] > 0:
                self._count_nonfinite(step, "a non-finite loss or gradient")
        metrics = self.log_step(step, rollout, scored, beta, update_stats, ev, sampled.drawn)  # 6. log
        self.kl_ctl.update(metrics["kl"], cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt)
        add_timings(metrics, cfg.rollout, sampled.t_generate, sampled.t_sync, t_score, t_update,
                    time.perf_counter() - t0)
        metrics["nonfinite_steps"] = self.nonfinite_steps
        metrics.update(evaluated)
        if cfg.trainer.sample_every and step % cfg.trainer.sample_every == 0 and self.backend.is_main:
            self.logger.log_samples(step, sample_rows(prompts, scored.completions, rollout.scores,
                                                      cfg.rollout.samples_per_prompt))
        return metrics

    # ------------------------------------------------------------------ 1. sample, 2. score
    def prompt_batch(self, step: int, round_: int = 0) -> list[str]:
        """This process's prompts for ``step``: a seeded permutation per pass over the data, split by rank. Dynamic
        sampling's extra round ``round_`` draws from another permutation."""
        rows = prompt_rows(len(self.prompts), self.cfg.rollout.prompts_per_step, step, self.cfg.seed + 7919 * round_,
                           self.backend.process_index, self.backend.num_processes)
        return [self.prompts[i] for i in rows.tolist()]

    def sampling_keys(self, step: int, rows: int, round_: int = 0) -> torch.Tensor:
        """``(rows, 2)`` counter-sampling keys of this process's rows at ``step``: keyed by each row's index in the
        global batch (rank r holds rows ``r * rows .. (r + 1) * rows - 1``; round k of dynamic sampling continues
        after k global batches), so the samples do not depend on the number of processes."""
        first = (round_ * self.backend.num_processes + self.backend.process_index) * rows
        return row_keys(self.cfg.seed, step, first + torch.arange(rows))

    def sample(self, step: int) -> tuple[list[str], Rollout, Scored, Sampled]:
        """Generate K responses per prompt of this process and score them (rollout without forwards yet). With
        rollout.max_resample_rounds (DAPO's dynamic sampling), more rounds of fresh prompts until every process has
        enough groups whose scores differ (rlhf.rollout.dynamic.fill_groups)."""
        r, b = self.cfg.rollout, self.backend
        k, target = r.samples_per_prompt, r.prompts_per_step // b.num_processes
        prompts, parts, scores, flags, t_generate, t_sync = [], [], [], [], 0.0, 0.0
        for round_ in range(1 + r.max_resample_rounds):
            batch = self.prompt_batch(step, round_)
            ro, t_g, t_s = self.generate(batch, step, round_)
            prompts, t_generate, t_sync = prompts + batch, t_generate + t_g, t_sync + t_s
            parts.append(ro)
            scores.append(self.score(batch, ro))
            if r.max_resample_rounds == 0:
                break
            flags.append(informative_groups(scores[-1].total, k))
            if round_ == r.max_resample_rounds or not b.any(int(sum(f.sum() for f in flags)) < target):
                break
        ro, scored, drawn = concat_rollouts(parts, self.models.tokenizer.pad_token_id), concat_scored(scores), None
        if flags:
            groups, fillers = fill_groups(flags, target)
            rows = (groups[:, None] * k + torch.arange(k)).flatten()
            ro, scored, prompts = select_rows(ro, rows), select_scored(scored, rows), [prompts[g] for g in groups]
            drawn = dynamic_counts(flags, fillers, k, b)
        return prompts, ro, scored, Sampled(t_generate, t_sync, drawn)

    def generate(self, prompts: list[str], step: int, round_: int) -> tuple[Rollout, float, float]:
        """K responses per prompt: a rollout of ids, masks and the sampler's log-probs; generate and sync seconds."""
        r, dev = self.cfg.rollout, self.backend.device
        enc = self.models.tokenizer([self.rendered[p] for p in prompts], return_tensors="pt", padding=True,
                                    padding_side="left", add_special_tokens=add_special_tokens_for(self.chat))
        query_ids = enc["input_ids"].repeat_interleave(r.samples_per_prompt, 0).to(dev)
        query_mask = enc["attention_mask"].repeat_interleave(r.samples_per_prompt, 0).to(dev)
        t0 = time.perf_counter()
        keys = self.sampling_keys(step, query_ids.shape[0], round_)
        self.engine.sync_weights(self.backend.unwrap(self.policy))
        t_sync = time.perf_counter() - t0
        response_ids, response_mask, sampler_logprobs = self.engine.generate(query_ids, query_mask, self.spec, keys)
        # The forwards (log-probs, values, entropy) come after scoring, on the rows that make the batch.
        scores = torch.zeros(query_ids.shape[0], device=dev)
        ro = Rollout(query_ids, query_mask, response_ids, response_mask, None, None, None, scores, None,
                     sampler_logprobs)
        return ro, time.perf_counter() - t0, t_sync

    def forwards(self, ro: Rollout) -> tuple[Rollout, Live | None]:
        """The forwards over the rollout (rlhf.rollout.forward.rollout_forwards); fused, the policy/critic forward
        keeps its graph and is handed on as ``Live`` for the update."""
        ro, live = rollout_forwards(ro, self.policy, self.critic, self.models.reference, self.spec,
                                    self.cfg.rollout.logprob_chunk_size, self.fused, self.backend.autocast)
        return ro, (Live(*live) if live is not None else None)

    def score(self, prompts: list[str], ro: Rollout) -> Scored:
        """The reward sources' weighted total ``(N,)`` (+ DAPO's overlong penalty), each source's score, the gold
        score (or None) and the decoded completions (rlhf.rewards.sources.RewardSources.score)."""
        k, r = self.cfg.rollout.samples_per_prompt, self.cfg.rollout
        q_ids, q_mask = ro.query_ids, ro.query_mask
        if self.chat:  # a reward model that shares the policy's tokenizer reads the plain prompt's ids
            enc = self.models.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
            q_ids, q_mask = (enc[key].repeat_interleave(k, 0).to(q_ids.device) for key in ("input_ids", "attention_mask"))
        scored = self.rewards.score([p for p in prompts for _ in range(k)], q_ids, q_mask,
                                    ro.response_ids, ro.response_mask, autocast=self.backend.autocast)
        return add_overlong_penalty(scored, ro.response_mask, r.max_new_tokens, self.overlong_buffer,
                                    self.cfg.reward.overlong_factor)

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
        a, b = self.cfg.algorithm, self.backend
        r_max = self.cfg.rollout.max_new_tokens
        local_r = rewards.shape[1]
        g_rewards, g_mask = b.gather_rows(rewards, r_max), b.gather_rows(ro.response_mask, r_max)
        g_values = b.gather_rows(ro.values, r_max) if ro.values is not None else None
        if self.cfg.trainer.whiten_rewards:  # over the batch of all processes, like every other statistic
            g_rewards = masked_whiten(g_rewards, g_mask, shift_mean=False)
        adv, ret = self.estimator(g_rewards, g_mask, g_values, group_size=self.cfg.rollout.samples_per_prompt,
                                  gamma=a.gamma, lam=a.lam, std_normalize=a.std_normalize)
        if self.cfg.trainer.whiten_advantages:
            adv = masked_whiten(adv, g_mask)
        ev = explained_variance(g_values, ret, g_mask) if g_values is not None else None
        n = rewards.shape[0]
        rows = slice(b.process_index * n, (b.process_index + 1) * n)
        return adv[rows, :local_r], ret[rows, :local_r], ev

    # ------------------------------------------------------------------ 5. update
    def update(self, ro: Rollout, advantages: torch.Tensor, returns: torch.Tensor, beta: float, step: int, *,
               live: Live | None = None) -> dict:
        """PPO-style update: ``ppo_epochs`` passes, ``minibatches`` optimizer steps each, ``grad_accum``
        micro-batches per step. Each micro-batch loss is scaled so the summed gradient equals the gradient of the
        loss aggregated over the whole minibatch on all processes. The logged statistics (loss, clip fraction, ...)
        are weighted the same way, so after step_metrics' mean over processes each is the minibatch-wide value,
        averaged over the optimizer steps: the same numbers one process would log for the whole batch. ``live``:
        the fused path's forward from ``sample``."""
        t, b = self.cfg.trainer, self.backend
        n = ro.response_ids.shape[0]
        micro = n // t.minibatches // t.grad_accum
        # Seeded by the step (resume stays exact) and offset from the sampling seed of the same step; the global
        # shuffle draws the same on every process.
        g = torch.Generator().manual_seed(step_seed(self.cfg.seed + 1, step,
                                                    b.process_index if t.shuffle == "process" else 0))
        sums: dict[str, torch.Tensor] = {}
        norms, skipped = [], 0
        kl_as_loss = not self.cfg.kl.in_reward and beta > 0 and ro.ref_logprobs is not None
        for _ in range(t.ppo_epochs):
            for mb_idx in minibatch_indices(n, t.minibatches, t.shuffle, g, b.num_processes, b.process_index,
                                            ro.response_ids.device):
                mask = ro.response_mask[mb_idx]
                denom = b.global_count(loss_units(mask, t.loss_agg, mask.device, self.loss_settings.agg_norm))
                for j in range(t.grad_accum):
                    idx = mb_idx[j * micro:(j + 1) * micro]
                    with b.no_sync((self.policy, self.critic), j != t.grad_accum - 1):
                        loss, stats, share = self._micro_loss(ro, advantages, returns, idx, beta, kl_as_loss,
                                                              denom, live)
                        b.backward(loss)
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v.detach() * share
                norm = self._optimizer_step()
                if norm is None:
                    skipped += 1
                else:
                    norms.append(norm)
        # This process's share of each minibatch-wide value, times num_processes: step_metrics averages over
        # processes, which then sums the shares.
        out = {k: v * (b.num_processes / (t.ppo_epochs * t.minibatches)) for k, v in sums.items()}
        out["policy/grad_norm"] = torch.stack(norms).mean() if norms else torch.tensor(float("nan"))
        out["policy/skipped_updates"] = torch.tensor(float(skipped))
        return out

    def _micro_loss(self, ro, advantages, returns, idx, beta, kl_as_loss, denom, live: Live | None = None):
        """The scaled ``()`` loss of micro-batch ``idx``, its statistics, and its share of the minibatch's units."""
        r = self.cfg.rollout
        mask = ro.response_mask[idx]
        width = int(mask.sum(-1).max())  # drop columns that are padding in every row of this micro-batch
        mask = mask[:, :width]
        q_ids, q_mask, resp = ro.query_ids[idx], ro.query_mask[idx], ro.response_ids[idx, :width]
        if live is not None:  # fused: idx is every row, in order
            logp = live.logprobs[:, :width]
        else:
            logp, _ = policy_logprobs(self.policy, q_ids, q_mask, resp, mask, spec=self.spec,
                                      chunk_size=r.logprob_chunk_size)
        values = None
        if self.critic is not None:
            values = live.values[:, :width] if live is not None else \
                response_values(self.critic, q_ids, q_mask, resp, mask)
        loss, stats = rl_loss(
            self.policy_loss_fn, logp, ro.logprobs[idx, :width], advantages[idx, :width], mask, self.loss_settings,
            ref_logp=ro.ref_logprobs[idx, :width] if kl_as_loss else None, kl_coef=beta, values=values,
            old_values=ro.values[idx, :width] if values is not None else None,
            returns=returns[idx, :width] if values is not None else None)
        # The loss is a mean over this micro-batch's units; rescale it to the minibatch's over all processes.
        units = loss_units(mask, self.cfg.trainer.loss_agg, agg_norm=self.loss_settings.agg_norm)
        share, scale = micro_batch_share(units, denom, self.backend.num_processes)
        return loss * scale, stats, share.detach()

    def _optimizer_step(self) -> torch.Tensor | None:
        """The gradient norm, or None (nothing moved) when it is not finite."""
        return self.backend.clip_and_step(self.optimizer, self.scheduler, self.cfg.trainer.max_grad_norm)

    def _count_nonfinite(self, step: int, what: str) -> None:
        """Warn that ``step`` skipped (part of) its update; stop once more than trainer.max_nonfinite_steps did."""
        self.nonfinite_steps += 1
        check_nonfinite_budget(step, what, self.nonfinite_steps, self.cfg.trainer.max_nonfinite_steps)

    # ------------------------------------------------------------------ 6. log
    def log_step(self, step: int, ro: Rollout, scored: Scored, beta: float, update_stats: dict, ev,
                 drawn: dict | None) -> dict:
        """The step's metric line (rlhf.trainers.policy_metrics.step_metrics): ``kl`` is always k1; each reward
        source's mean score as ``score/<name>``; the sampler mismatch; dynamic sampling's counts."""
        kl_seq = self.kl_per_token(ro, "k1").sum(-1) if ro.ref_logprobs is not None else None
        by_source = {f"score/{name}": v for name, v in scored.by_source.items()}
        # the engine's log-probs of its samples against the trainer's
        token_means, ratio_max = mismatch_metrics(ro, self.cfg.algorithm.is_correction, self.cfg.algorithm.is_cap)
        metrics = step_metrics(self.backend, step, ro, kl_seq, scored.gold, beta, update_stats, ev,
                               self.scheduler.get_last_lr()[0], extra_means=by_source, extra_token_means=token_means)
        if ratio_max is not None:
            metrics["mismatch/ratio_max"] = self.backend.max(ratio_max).item()
        return {**metrics, **(drawn or {})}

    # ------------------------------------------------------------------ 7. checkpoint
    def save(self, step: int) -> str | None:
        """Write ``checkpoints/step_<step>`` (rlhf.trainers.policy_state.save_policy_checkpoint, a collective);
        returns its path on the main process."""
        return save_policy_checkpoint(self.backend, step, self.policy, self.critic, self.models.tokenizer,
                                      self.optimizer, self._trainer_state(step), self.ckpt_root,
                                      self.cfg.trainer.keep_last)

    def _trainer_state(self, step: int) -> dict:
        return {"step": step, "scheduler": self.scheduler.state_dict(), "kl_controller": self.kl_ctl.state_dict(),
                "nonfinite_steps": self.nonfinite_steps, "config": OmegaConf.to_container(self.cfg, resolve=True)}

    def _load_optimizer_state(self, saved: dict) -> None:
        self.backend.load_optimizer_state(self.optimizer, self.backend.optimized_module(self.policy, self.critic),
                                          saved)

    def _stop_agreed(self) -> int | None:
        """The signal that stops the run after this step. A stop on any process stops all of them after the same
        step, so the checkpoint is collective."""
        if self.backend.any(self.signals.requested is not None):
            return self.signals.requested or signal.SIGTERM
        return None
