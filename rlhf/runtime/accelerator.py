"""What every training stage does the same way: the Accelerator from a ``trainer`` config, and the optimizer step."""

from __future__ import annotations

import logging
import math
import os
import sys
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from omegaconf import DictConfig

LAUNCHER_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "LOCAL_WORLD_SIZE")
"""Environment variables in which torchrun / accelerate launch, MPI and friends say how many processes they
started (LOCAL_WORLD_SIZE only counts one machine's, so it is read last, as a lower bound)."""


class BackendMismatch(RuntimeError):
    """The launcher started several processes but the Accelerator would run each alone. One line: cause and fix."""


def launched_world_size(env: dict | None = None) -> int:
    """How many processes the launcher started, from its environment variables; 1 when not launched."""
    env = os.environ if env is None else env
    for var in LAUNCHER_WORLD_VARS:
        value = env.get(var)
        if value and value.strip().isdigit():
            return int(value)
    return 1


def has_accelerator_device() -> bool:
    """True when torch sees a GPU (CUDA/ROCm) or another accelerator backend that accelerate can run processes on."""
    if torch.cuda.is_available():
        return True
    acc = getattr(torch, "accelerator", None)
    return bool(acc is not None and acc.is_available() and acc.current_accelerator().type != "mps")


def wants_cpu(cpu: bool, world: int, device_present: bool) -> bool:
    """Whether the Accelerator must run on the CPU: asked for (``trainer.cpu``), or several processes were launched
    on a machine with no accelerator, where the only backend that can join them is the CPU's (gloo)."""
    return cpu or (world > 1 and not device_present)


def check_gpus_per_machine(cpu: bool, local_world: int, gpus: int | None = None) -> None:
    """Raise BackendMismatch when more GPU processes were launched on this machine than it has GPUs: each process
    takes the GPU of its local rank, and ranks past the last GPU would fail with an opaque CUDA error."""
    if cpu or local_world <= 1 or not torch.cuda.is_available():
        return
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if local_world > gpus:
        raise BackendMismatch(f"trainer.cpu: the launcher started {local_world} processes on this machine, but it "
                              f"has {gpus} GPU(s); launch at most {gpus} per machine (--num_processes), or set "
                              "trainer.cpu=true to run them on the CPU (gloo)")


def fresh_precision_state(mixed_precision: str) -> None:
    """Let a second stage in the same Python process use another ``trainer.mixed_precision`` than the first.

    accelerate keeps one process-wide AcceleratorState and refuses an Accelerator whose mixed precision differs
    from it ("AcceleratorState has already been initialized and cannot be changed"): a notebook or script that runs
    a bf16 stage and then a float32 one would stop there. The precision part of that state is dropped when it
    differs; the process state (device, process group) is kept.
    """
    from accelerate.state import AcceleratorState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def make_accelerator(t: DictConfig) -> Accelerator:
    """The Accelerator of a stage from its ``trainer`` config (``cpu``, ``mixed_precision``, ``dist_timeout_s``).

    ``dist_timeout_s`` bounds how long a process waits in a collective, so a stuck rank fails the job instead of
    hanging it. When the launcher started N > 1 processes on a machine without an accelerator, the CPU (gloo)
    backend is chosen without ``trainer.cpu=true`` (else accelerate would run N independent single-process runs
    into one run folder); if the Accelerator still sees another number of processes than were launched, every
    process stops with BackendMismatch.
    """
    world = launched_world_size()
    device_present = has_accelerator_device()
    cpu = wants_cpu(t.cpu, world, device_present)
    check_gpus_per_machine(cpu, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if cpu and not t.cpu and int(os.environ.get("RANK", "0")) == 0:
        logging.getLogger(__name__).info("%d processes launched and no GPU: running them on the CPU (gloo backend)",
                                         world)
    fresh_precision_state(t.mixed_precision)
    acc = Accelerator(cpu=cpu, mixed_precision=t.mixed_precision,
                      kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=t.dist_timeout_s))])
    if world > 1 and acc.num_processes != world:
        raise BackendMismatch(
            f"trainer.cpu: the launcher started {world} processes but each sees {acc.num_processes} "
            f"({acc.distributed_type.name} on {acc.device}), so each would train alone into one run folder; launch "
            "with a config that matches this machine (configs/accelerate/), or set trainer.cpu=true for gloo")
    return acc


def clip_and_step(acc: Accelerator, optimizer: torch.optim.Optimizer, scheduler,
                  max_grad_norm: float | None) -> torch.Tensor | None:
    """Clip the global gradient norm of the optimizer's parameters, then step the optimizer and the schedule.

    Returns the ``()`` norm before clipping (float32, CPU), or None when it is not finite: then the gradients are
    dropped and nothing (weights, AdamW moments, schedule) moves. The norm is that of the synchronised gradients,
    the same on every process, so all processes take the same branch. Callers decide what a skipped step means
    (the policy trainer counts it, SFT and reward training stop).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = acc.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2: a replicated DTensor, the same global norm on every process
        norm = norm.full_tensor()
    norm = torch.as_tensor(norm)
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.detach().float().cpu()


def shutdown_distributed() -> None:
    """End a finished multi-process run: destroy the process group, flush, and leave with status 0 at once.

    Left to interpreter teardown, a process of a gloo job sometimes aborts after all its work is done ("terminate
    called without an active exception", SIGABRT, about one launch in ten on the CPU; no Python frame is running
    then, so it is a C++ static destructor), and the launcher reports the whole job as failed. Every file the run
    writes is closed by now, so the process skips that teardown (``os._exit``) once logs and streams are flushed.
    A single process, or one whose process group vLLM made for itself (world size 1), exits normally.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    many = torch.distributed.get_world_size() > 1
    torch.distributed.destroy_process_group()
    if many:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
