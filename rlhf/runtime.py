"""What every training stage does the same way: the Accelerator from a ``trainer`` config, and the optimizer step."""

from __future__ import annotations

import math
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from omegaconf import DictConfig


def make_accelerator(t: DictConfig) -> Accelerator:
    """The Accelerator of a stage from its ``trainer`` config (``cpu``, ``mixed_precision``, ``dist_timeout_s``).

    ``dist_timeout_s`` bounds how long a process waits in a collective, so a stuck rank fails the job instead of
    hanging it.
    """
    return Accelerator(cpu=t.cpu, mixed_precision=t.mixed_precision,
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=t.dist_timeout_s))])


def clip_and_step(acc: Accelerator, optimizer: torch.optim.Optimizer, scheduler,
                  max_grad_norm: float | None) -> torch.Tensor | None:
    """Clip the global gradient norm of the optimizer's parameters, then step the optimizer and the schedule.

    Returns the ``()`` norm before clipping (float32, CPU), or None when it is not finite: then the gradients are
    dropped and nothing (weights, AdamW moments, schedule) moves. The norm is that of the synchronised gradients,
    the same on every process, so all processes take the same branch. Callers decide what a skipped step means
    (the policy trainer counts it, SFT and reward training stop).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.as_tensor(acc.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else math.inf))
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.detach().float().cpu()


def shutdown_distributed() -> None:
    """Destroy the default process group, if any, before the interpreter exits.

    Left to interpreter teardown, the gloo process group's threads are sometimes destroyed while still joinable and
    the process aborts ("terminate called without an active exception", SIGABRT) after all its work is done, which
    the launcher reports as a failed job.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
