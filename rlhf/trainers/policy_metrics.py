"""Step 6 of the policy loop, log: the metric line of a step, as global means over all processes."""

from __future__ import annotations

import math

import torch

from rlhf.core.correction import mismatch_weights
from rlhf.core.kl import sampler_mismatch
from rlhf.core.losses import masked_mean
from rlhf.rollout.batch import Rollout
from rlhf.runtime.backend import DistributedBackend


def step_metrics(backend: DistributedBackend, step: int, ro: Rollout, kl_seq: torch.Tensor | None,
                 gold: torch.Tensor | None, beta: float, update_stats: dict, ev, lr: float,
                 extra_means: dict[str, torch.Tensor] | None = None,
                 extra_token_means: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict:
    """One metric line: global means over all processes' sequences (and of the update's statistics, which the
    update already weighted by each process's share). ``kl_seq (N,)``: k1 KL summed over each response, or None
    without a reference (then ``kl`` is NaN and ``reward`` is the score). ``extra_means``: more ``(N,)`` per-sequence
    values to average (e.g. each reward source's score); ``extra_token_means``: ``(sum, count)`` pairs averaged over
    all processes' tokens (e.g. the sampler mismatch)."""
    mask = ro.response_mask
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
    for k, v in (extra_means or {}).items():
        pairs[k] = (v.float().sum(), v.numel())
    for k, (total, count) in (extra_token_means or {}).items():
        pairs[k] = (total.float(), count)
    for k, v in update_stats.items():
        pairs[k] = (torch.as_tensor(v, dtype=torch.float32), 1)
    names = list(pairs)
    dev = backend.device
    sums = torch.stack([torch.as_tensor(pairs[k][0], dtype=torch.float32, device=dev) for k in names])
    counts = torch.tensor([float(pairs[k][1]) for k in names], device=dev)
    sums, counts = backend.sum(sums), backend.sum(counts)
    values = (sums / counts).tolist()
    out = {"step": step, **dict(zip(names, values))}
    out.setdefault("kl", float("nan"))
    out["beta"] = beta
    out["reward"] = out["score"] - beta * out["kl"] if math.isfinite(out["kl"]) else out["score"]
    out["policy/lr"] = lr
    if ev is not None:
        out["value/explained_variance"] = float(ev)
    if torch.cuda.is_available():
        out["memory/peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def sample_rows(prompts: list[str], completions: list[str], scores: torch.Tensor, samples_per_prompt: int,
                n: int = 4) -> list[dict]:
    """The first ``n`` completions of a step with their prompt and score, for samples.jsonl and TensorBoard."""
    k = samples_per_prompt
    return [{"prompt": prompts[i // k], "completion": completions[i], "score": float(scores[i])}
            for i in range(min(n, len(completions)))]


def add_timings(metrics: dict, rollout_cfg, t_generate: float, t_sync: float | None, t_score: float,
                t_update: float, t_step: float) -> None:
    """The step's ``time/*`` metrics, and generated tokens per second over all processes."""
    r = rollout_cfg
    metrics["time/generated_tokens_per_s"] = (metrics["response_length"] * r.prompts_per_step
                                              * r.samples_per_prompt / max(t_generate, 1e-9))
    if t_sync is not None:
        metrics["time/weight_sync_s"] = t_sync  # part of time/generate_s
    metrics.update({"time/generate_s": t_generate, "time/score_s": t_score, "time/update_s": t_update,
                    "time/step_s": t_step})


def start_line(cfg, backend: DistributedBackend, start_step: int, run_dir: str) -> str:
    """The run's first log line: algorithm, device, backend, processes, precision, steps, run folder."""
    return (f"advantage {cfg.algorithm.advantage}, loss {cfg.algorithm.policy_loss} on {backend.device}: "
            f"{backend.describe()}, {backend.num_processes} process(es), mixed precision "
            f"{backend.acc.mixed_precision}, steps {start_step} to {cfg.trainer.max_steps}, run_dir {run_dir}")


def progress_bar(cfg, is_main: bool, start_step: int):
    """A tqdm bar over the run's steps on the main process when logging.progress, else None."""
    if not (cfg.logging.progress and is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.trainer.max_steps, initial=start_step, desc="rlhf", dynamic_ncols=True)


def mismatch_metrics(ro: Rollout, correction: str, cap: float
                     ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
    """``mismatch/kl_k1``, ``kl_k3``, ``ratio_mean`` and ``share_above_cap`` (tokens whose ratio exceeds ``cap``,
    algorithm.is_cap) as (sum, token count) pairs, and this process's largest ratio, from the engine's own log-probs
    of its samples against the trainer's (rlhf.core.kl.sampler_mismatch); with a ``correction``
    (algorithm.is_correction) also its ``mismatch/is_weight_mean`` and ``mismatch/is_share_corrected`` (tokens
    truncated or dropped). ``({}, None)`` when the engine returned none."""
    if ro.sampler_logprobs is None:
        return {}, None
    m = sampler_mismatch(ro.logprobs, ro.sampler_logprobs, ro.response_mask)
    tokens = ro.response_mask.sum()
    above = ((m["ratio"] > cap) & ro.response_mask.bool()).sum()
    out = {"mismatch/kl_k1": (m["k1"].sum(), tokens), "mismatch/kl_k3": (m["k3"].sum(), tokens),
           "mismatch/ratio_mean": (m["ratio"].sum(), tokens), "mismatch/share_above_cap": (above, tokens)}
    if correction != "none":
        w, stats = mismatch_weights(ro.logprobs, ro.sampler_logprobs, ro.response_mask, correction, cap)
        out["mismatch/is_weight_mean"] = (w.sum(), tokens)
        out["mismatch/is_share_corrected"] = (stats["share_corrected"] * tokens, tokens)
    return out, m["ratio"].max()


def dynamic_counts(flags: list[torch.Tensor], fillers: int, group_size: int, backend) -> dict[str, float]:
    """Dynamic sampling's cost, over all processes: ``dynamic/rounds`` (the most any process sampled),
    ``dynamic/generations`` (responses generated), ``dynamic/uninformative_first`` (the share of the first round's
    groups whose scores were all equal: what the step would have wasted without it), ``dynamic/dropped_groups``
    (uninformative groups left out) and ``dynamic/filler_groups`` (uninformative groups that still filled the batch
    because the rounds ran out)."""
    sampled = sum(f.numel() for f in flags)
    uninformative = sum(int((~f).sum()) for f in flags)
    local = torch.tensor([sampled * group_size, float((~flags[0]).sum()), flags[0].numel(), uninformative - fillers,
                          fillers], dtype=torch.float32, device=backend.device)
    total = backend.sum(local).tolist()
    rounds = backend.max(torch.tensor(float(len(flags)), device=backend.device)).item()
    return {"dynamic/rounds": rounds, "dynamic/generations": total[0], "dynamic/uninformative_first": total[1] / total[2],
            "dynamic/dropped_groups": total[3], "dynamic/filler_groups": total[4]}
