"""Distributed helpers that the trainers call around decoding: hold a sharded policy's whole weights once per rollout
(FSDP2, DeepSpeed ZeRO-3) instead of gathering every layer at every generated token."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def gathered_for_generation(model: torch.nn.Module, reshard_after_forward: bool = True) -> Iterator[None]:
    """Under FSDP2, hold the whole weights of ``model`` for the body (decoding), instead of gathering every layer again
    for every generated token; outside FSDP2 this does nothing.

    Every ``fully_shard`` unit is all-gathered once on entry (a collective: every process enters together) and
    kept gathered across forwards; on exit the shards are restored and each unit again frees its gathered weights
    after forward when ``reshard_after_forward`` (the accelerate config's ``fsdp_reshard_after_forward``). Costs
    one whole copy of the weights per process while decoding, as DDP holds all the time.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    root = units[0]  # modules() lists the model itself first; accelerate shards it as the root unit
    # A peft policy decodes through its inner transformers model, never calling the root's forward: initialise the
    # root first, or the first unit decoding reaches would make itself the root (idempotent otherwise).
    root._get_fsdp_state()._lazy_init()
    root.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        root.set_reshard_after_forward(bool(reshard_after_forward))

@contextlib.contextmanager
def zero3_gathered_for_generation(engine) -> Iterator[None]:
    """Under DeepSpeed ZeRO-3, hold the whole weights of the ``engine``'s model for the body (decoding).

    ZeRO-3's hooks gather each layer before its forward and release it after, at every decoding step. Here every
    parameter is gathered once (``deepspeed.zero.GatheredParameters``, a collective), the hooks are taken off
    while the body runs, and put back after; DeepSpeed re-records its prefetch trace on the next forward. Costs
    one whole copy of the weights per process while decoding.
    """
    import deepspeed

    offload = engine.optimizer.parameter_offload  # DeepSpeedZeRoOffload: owns the stage-3 module hooks
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        offload._remove_module_hooks()
        try:
            yield
        finally:
            offload.setup_zero_stage3_hooks()
