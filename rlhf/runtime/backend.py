"""The distributed backend: everything the trainers do differently under one process, DDP, FSDP2 or DeepSpeed.

The trainers hold a ``DistributedBackend`` and never branch on accelerate's ``DistributedType`` themselves. It
answers what the backend is (``kind``), prepares models and the optimizer, gathers a sharded policy for decoding,
places frozen models, runs the collectives the trainers need (``any``, ``from_main``, sums, means, gathers), weighs
micro-batch losses by their share of the global token count, and saves and loads AdamW's state by parameter name so
that checkpoints move between backends and process counts.

The loss-scaling math is two pure functions, ``micro_batch_share`` and ``process_weight``, tested on their own.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from rlhf.config import ConfigError
from rlhf.runtime.accelerator import clip_and_step
from rlhf.runtime.distributed import gathered_for_generation, zero3_gathered_for_generation

BACKEND_KINDS = ("single", "ddp", "fsdp2", "zero2", "zero3")
"""What ``DistributedBackend.kind`` can be; rollout engines declare which of them they support."""


def micro_batch_share(local: torch.Tensor, global_count: torch.Tensor, num_processes: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's ``share`` of the units (tokens or sequences) its loss averages over, of all processes'
    minibatch: ``local / global_count``; and the ``scale`` its locally averaged loss is multiplied by,
    ``share * num_processes``: DDP averages gradients over processes, so ``(1/W) sum_micro W * share * mean_micro``
    is the mean over every unit of the minibatch. ``()`` tensors in, ``()`` tensors out."""
    share = local.to(global_count) / global_count
    return share, share * num_processes


def process_weight(units: torch.Tensor, total: torch.Tensor, num_processes: int) -> torch.Tensor:
    """``()`` weight ``W * units / total`` of a process whose loss is a mean over ``units`` of the ``total`` units of
    all processes: a per-process mean times this weight, averaged over processes (what DDP does to gradients), is the
    mean over all units: ``(1/W) sum_r W u_r / U * mean_r = sum_r sum_r_units / U``."""
    return num_processes * units / total.clamp(min=1.0)


def local_part(p: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: its shard under FSDP2 (a DTensor), else the tensor itself."""
    return p.to_local() if hasattr(p, "to_local") else p


def all_finite(module: torch.nn.Module) -> bool:
    """True when this process's part of every parameter of ``module`` is finite (no collective)."""
    return all(bool(torch.isfinite(local_part(p)).all()) for p in module.parameters())


class DistributedBackend:
    """One process, DDP (CPU gloo or GPU NCCL, one or many machines), FSDP2 or DeepSpeed ZeRO-2/3, behind one
    interface. Wraps the run's Accelerator (``acc``)."""

    def __init__(self, acc: Accelerator):
        self.acc = acc
        self.both: torch.nn.Module | None = None  # PPO under FSDP2: policy and critic prepared as one module

    # ------------------------------------------------------------------ what it is
    @property
    def num_processes(self) -> int:
        return self.acc.num_processes

    @property
    def process_index(self) -> int:
        return self.acc.process_index

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def is_fsdp2(self) -> bool:
        return self.acc.distributed_type == DistributedType.FSDP and self.acc.state.fsdp_plugin.fsdp_version == 2

    @property
    def zero_stage(self) -> int | None:
        """DeepSpeed's ZeRO stage, or None without DeepSpeed."""
        if self.acc.distributed_type != DistributedType.DEEPSPEED:
            return None
        return self.acc.state.deepspeed_plugin.zero_stage

    @property
    def kind(self) -> str:
        """One of BACKEND_KINDS (ZeRO-1 counts as zero2: neither shards the weights)."""
        if self.is_fsdp2:
            return "fsdp2"
        if self.zero_stage is not None:
            return "zero3" if self.zero_stage == 3 else "zero2"
        return "ddp" if self.num_processes > 1 else "single"

    @property
    def steps_inside_backward(self) -> bool:
        """DeepSpeed engines take the optimizer step inside ``backward``: a forward cannot be reused across it."""
        return self.zero_stage is not None

    def describe(self) -> str:
        """For the start line: accelerate's distributed type, ``FSDP2``, or ``DEEPSPEED ZeRO-<n>``."""
        name = self.acc.distributed_type.name + ("2" if self.is_fsdp2 else "")
        return name + (f" ZeRO-{self.zero_stage}" if self.zero_stage is not None else "")

    # ------------------------------------------------------------------ checks
    def check(self, trainer_cfg, rollouts_per_process: int, has_critic: bool) -> None:
        """Refuse what the trainer cannot do correctly under this backend (one-line ConfigError), and give DeepSpeed
        the micro-batch size it would otherwise read from a DataLoader (the trainer has none). One process and DDP
        need nothing here. See docs/distributed.md."""
        t = trainer_cfg
        if self.acc.distributed_type == DistributedType.FSDP and not self.is_fsdp2:
            raise ConfigError("accelerate config: fsdp_config.fsdp_version is "
                              f"{self.acc.state.fsdp_plugin.fsdp_version}; only FSDP2 (fsdp_version: 2) is "
                              "supported, as in configs/accelerate/fsdp2.yaml")
        if self.zero_stage is None:
            return
        if has_critic:
            raise ConfigError("algorithm.critic: DeepSpeed prepares one model per Accelerator and PPO trains two "
                              "(policy and critic); use algorithm=rloo, grpo or reinforce_pp, or the DDP config")
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
        ds["train_micro_batch_size_per_gpu"] = rollouts_per_process // (t.minibatches * t.grad_accum)
        # DeepSpeed checks train batch == micro x accumulation (1) x processes; set it with the micro-batch rather
        # than leave it to accelerate's "auto" fill, so the two can never disagree.
        ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * self.num_processes

    # ------------------------------------------------------------------ models
    def prepare(self, policy, critic, optimizer):
        """``(policy, critic or None, optimizer)`` prepared for this backend. Under FSDP2 a critic is prepared with
        the policy as one PolicyAndValue (``self.both``): accelerate shards one model per prepare call."""
        if critic is not None and self.is_fsdp2:
            from rlhf.rollout.forward import PolicyAndValue

            self.both, optimizer = self.acc.prepare(PolicyAndValue(policy, critic), optimizer)
            return self.both.policy, self.both.critic, optimizer
        if critic is not None:
            return self.acc.prepare(policy, critic, optimizer)
        policy, optimizer = self.acc.prepare(policy, optimizer)
        return policy, None, optimizer

    def unwrap(self, model: torch.nn.Module | None) -> torch.nn.Module | None:
        return self.acc.unwrap_model(model) if model is not None else None

    def optimized_module(self, policy, critic) -> torch.nn.Module:
        """The module whose trainable parameters, in order, are the optimizer's: the policy, or (PPO) the policy
        and the critic as one PolicyAndValue (the prepared one under FSDP2)."""
        if critic is None:
            return self.unwrap(policy)
        if self.both is not None:
            return self.both
        from rlhf.rollout.forward import PolicyAndValue

        return PolicyAndValue(self.unwrap(policy), self.unwrap(critic))

    def place_frozen(self, model: torch.nn.Module | None) -> torch.nn.Module | None:
        """The reference and reward models only run forward passes. Under ZeRO-3 they are sharded like the policy,
        as DeepSpeed engines without an optimizer; everywhere else each process holds a whole copy."""
        if model is None or self.zero_stage != 3:
            return model.to(self.device) if model is not None else None
        import deepspeed

        # The policy's prepared config (stage 3, precision, filled-in batch sizes); no optimizer is attached.
        config = copy.deepcopy(self.acc.state.deepspeed_plugin.deepspeed_config)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        return engine

    def gathered_for_generation(self, policy, enabled: bool):
        """The context decoding runs in: the whole policy gathered once under FSDP2 or ZeRO-3 when ``enabled``
        (rollout.gather_for_generation), else nothing (the weights are whole already, or gathered layer by layer)."""
        if not enabled:
            return contextlib.nullcontext()
        if self.is_fsdp2:
            return gathered_for_generation(self.unwrap(policy), self.acc.state.fsdp_plugin.reshard_after_forward)
        if self.zero_stage == 3:
            return zero3_gathered_for_generation(policy)
        return contextlib.nullcontext()

    @property
    def synced_gpus(self) -> bool | None:
        """FSDP2 with several processes: every process steps until all are done (transformers sees ZeRO-3 by
        itself, so None leaves that to it)."""
        return True if self.is_fsdp2 and self.num_processes > 1 else None

    def state_dict(self, model: torch.nn.Module) -> dict:
        """The whole weights of ``model`` (a collective under ZeRO-3 and FSDP2: every process takes part)."""
        return self.acc.get_state_dict(model)

    # ------------------------------------------------------------------ the update
    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def no_sync(self, models, skip_sync: bool):
        """Within a minibatch's micro-batches before the last: no gradient all-reduce (DDP's ``no_sync``)."""
        if not skip_sync or self.num_processes == 1:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for m in models:
            if m is not None:
                stack.enter_context(self.acc.no_sync(m))
        return stack

    def clip_and_step(self, optimizer, scheduler, max_grad_norm: float | None) -> torch.Tensor | None:
        """rlhf.runtime.accelerator.clip_and_step: the norm, or None (nothing moved) when it is not finite."""
        return clip_and_step(self.acc, optimizer, scheduler, max_grad_norm)

    def autocast(self):
        return self.acc.autocast()

    # ------------------------------------------------------------------ collectives
    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any: for decisions all processes must take together."""
        if self.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.acc.reduce(t, "sum").item() > 0)

    def from_main(self, value):
        """``value`` as the main process has it, on every process (a picklable object; collective)."""
        if self.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over processes (``x`` itself for one process)."""
        return self.acc.reduce(x, reduction="sum") if self.num_processes > 1 else x

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` maximised over processes (``x`` itself for one process)."""
        if self.num_processes == 1:
            return x
        x = x.detach().float().to(self.device).clone()
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
        return x

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` averaged over processes (``x`` itself for one process)."""
        return self.acc.reduce(x, reduction="mean") if self.num_processes > 1 else x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's ``x`` (same shape everywhere) concatenated along dim 0 in rank order."""
        return self.acc.gather(x)

    def gather_rows(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """``(n, w)`` per process -> ``(n * processes, width)``: right-padded with zeros to ``width``, rank order."""
        if self.num_processes == 1:
            return x
        x = torch.nn.functional.pad(x, (0, width - x.shape[1]))
        return self.acc.gather(x.contiguous())

    def global_count(self, local: torch.Tensor) -> torch.Tensor:
        """``()`` float: ``local`` (tokens or sequences) summed over processes."""
        return self.sum(local.float()) if self.num_processes > 1 else local.float()

    def process_weight(self, units: torch.Tensor | None) -> torch.Tensor | None:
        """``process_weight`` of this process's ``units`` against all processes' (a collective); None without."""
        if units is None:
            return None
        units = units.detach().float().reshape(()).to(self.device)
        total = self.acc.reduce(units.clone(), reduction="sum") if self.num_processes > 1 else units
        return process_weight(units, total, self.num_processes)

    def wait(self) -> None:
        self.acc.wait_for_everyone()

    # ------------------------------------------------------------------ optimizer state
    def optimizer_state(self, optimizer, module: torch.nn.Module) -> dict | None:
        """AdamW's state for a checkpoint (a collective under FSDP2).

        Under DDP it is whole and the same on every process: torch's ``state_dict``, keyed by parameter index.
        Under FSDP2 each process holds a shard of it: the shards are gathered into whole tensors on the main
        process, keyed by parameter name (``{"by_name": ...}``, torch.distributed.checkpoint's full optimizer state
        dict). Either resumes on any number of processes, with or without FSDP2 (see load_optimizer_state).
        DeepSpeed partitions it in its own format: it is not saved (None), and a resumed run restarts AdamW's
        moments (with a warning)."""
        if self.zero_stage is not None:
            return None
        if self.is_fsdp2:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            full = get_optimizer_state_dict(module, optimizer.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return {"by_name": full}
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer, module: torch.nn.Module, saved: dict) -> None:
        """Load AdamW's state saved by optimizer_state, whichever backend wrote it and whichever this run uses.

        Every process reads the whole saved state. Under FSDP2, or for a state saved by name, it goes through
        torch.distributed.checkpoint's ``set_optimizer_state_dict`` (which keeps each process's shard under FSDP2);
        an index-keyed state is first renamed: index i is the i-th trainable parameter of ``module``, the order in
        which the trainer listed them for the optimizer."""
        if not self.is_fsdp2 and "by_name" not in saved:
            optimizer.load_state_dict(saved)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        by_name = saved.get("by_name")
        if by_name is None:
            names = [n for n, p in module.named_parameters() if p.requires_grad]
            count = sum(len(g["params"]) for g in saved["param_groups"])
            if count != len(names):
                raise ValueError(f"the saved optimizer holds {count} parameters; this run trains {len(names)}")
            by_name = {"state": {names[i]: v for i, v in saved["state"].items()},
                       "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                        for g in saved["param_groups"]]}
        set_optimizer_state_dict(module, optimizer.optimizer, by_name, options=StateDictOptions(full_state_dict=True))
