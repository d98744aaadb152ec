"""Pieces of step 5 of the policy loop, update, that need no trainer: seeds, minibatch rows, the units a loss
averages over, and what an out-of-memory error should say."""

from __future__ import annotations

import warnings

import torch

from rlhf.core.correction import mismatch_weights
from rlhf.core.objectives import aggregation_mode
from rlhf.rollout.sampling import minibatch_rows


def step_seed(seed: int, step: int, rank: int) -> int:
    """Sampling and shuffling are re-seeded every step, so a resumed run draws exactly what the original drew."""
    return (seed * 1_000_003 + step * 7919 + rank) % (2**63 - 1)


def minibatch_indices(n: int, minibatches: int, shuffle: str, g: torch.Generator, num_processes: int,
                      process_index: int, device) -> list[torch.Tensor]:
    """One epoch's minibatches of this process's ``n`` rollout rows: ``minibatches`` index tensors of
    ``n // minibatches`` rows each. shuffle=process: slices of a permutation of this process's rows (``g`` seeded by
    its rank). shuffle=global: rlhf.rollout.sampling.minibatch_rows, the same minibatches on any number of
    processes."""
    size = n // minibatches
    if minibatches == 1:
        return [torch.arange(n, device=device)]
    if shuffle == "global":
        rows = minibatch_rows(n, minibatches, num_processes, process_index, g)
        return [r.to(device) for r in rows]
    perm = torch.randperm(n, generator=g).to(device)
    return [perm[mb * size:(mb + 1) * size] for mb in range(minibatches)]


def loss_units(mask: torch.Tensor, loss_agg: str, device=None, agg_norm: float | None = None) -> torch.Tensor:
    """``()``: what a loss aggregated by ``loss_agg`` (rlhf.core.objectives.aggregate) divides by over ``mask (rows,
    len)``: its real tokens (token-mean), its sequences (seq-mean-token-mean, seq-mean-token-sum, and the alias
    seq-mean), or its sequences times the constant ``agg_norm`` (seq-mean-token-sum-norm, Dr. GRPO: rows x
    rollout.max_new_tokens). The trainer rescales each micro-batch's loss by its units over the global count, so
    accumulation and several processes give the loss of the whole minibatch."""
    mode = aggregation_mode(loss_agg)
    if mode == "token-mean":
        return mask.sum()
    if mode == "seq-mean-token-sum-norm":
        if agg_norm is None or not agg_norm > 0:
            raise ValueError(f"loss_agg={mode} needs agg_norm > 0 (rollout.max_new_tokens), got {agg_norm}")
        return torch.tensor(float(mask.shape[0]) * float(agg_norm), device=device)
    return torch.tensor(float(mask.shape[0]), device=device)


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the RuntimeError a CPU allocation failure raises."""
    if isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def out_of_memory_message(step: int, err: BaseException, rollout_cfg, trainer_cfg) -> str:
    """One line: where memory ran out and which settings to lower or raise, with their values now."""
    r, t = rollout_cfg, trainer_cfg
    lines = str(err).strip().splitlines()
    return (f"out of memory at step {step} ({lines[0] if lines else type(err).__name__}); lower "
            f"rollout.prompts_per_step (now {r.prompts_per_step}) or rollout.max_new_tokens (now "
            f"{r.max_new_tokens}), or raise trainer.minibatches (now {t.minibatches}) or trainer.grad_accum "
            f"(now {t.grad_accum}) so each backward pass sees fewer sequences"
            + ("" if t.gradient_checkpointing else
               ", or set trainer.gradient_checkpointing=true to recompute activations instead of keeping them"))


def prompt_rows(n: int, prompts_per_step: int, step: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """This process's prompt indices at ``step``: ``(prompts_per_step // world,)`` int64. Each pass over the ``n``
    prompts is a permutation seeded by ``seed`` and the pass number (no overlap between seeds' passes); the step's
    global batch is cut into consecutive per-rank slices."""
    p = prompts_per_step
    per_epoch = max(n // p, 1)
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    idx = order[torch.arange(pos * p, pos * p + p) % n]
    per_rank = p // world
    return idx[rank * per_rank:(rank + 1) * per_rank]


def check_nonfinite_budget(step: int, what: str, skipped: int, limit: int) -> None:
    """Warn that ``step`` skipped (part of) its update, the ``skipped``-th time; raise TrainingError once more than
    ``limit`` (trainer.max_nonfinite_steps) steps did."""
    from rlhf.runtime.errors import TrainingError

    warnings.warn(f"step {step}: {what}; update skipped ({skipped} of at most trainer.max_nonfinite_steps={limit})",
                  stacklevel=3)
    if skipped > limit:
        raise TrainingError(f"trainer.max_nonfinite_steps: {skipped} steps skipped for NaN/inf (last: step {step}, "
                            f"{what}); lower trainer.lr, set trainer.max_grad_norm, check the reward model and "
                            "functions, or raise trainer.max_nonfinite_steps")


def mismatch_corrected(ro, advantages: torch.Tensor, algorithm_cfg, engine: str) -> torch.Tensor:
    """``(N, R)`` advantages times the mismatch weights of algorithm.is_correction (rlhf.core.correction) from the
    rollout's trainer and sampler log-probs: for the PPO family, the same as weighting each token's policy loss.
    Unchanged with is_correction=none."""
    from rlhf.runtime.errors import TrainingError

    a = algorithm_cfg
    if a.is_correction == "none":
        return advantages
    if ro.sampler_logprobs is None:
        raise TrainingError(f"algorithm.is_correction={a.is_correction} needs the engine's own log-probs, and "
                            f"rollout.engine={engine} returned none")
    w, _ = mismatch_weights(ro.logprobs, ro.sampler_logprobs, ro.response_mask, a.is_correction, a.is_cap)
    return advantages * w.to(advantages.dtype)
