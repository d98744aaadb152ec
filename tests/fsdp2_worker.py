"""One rank of the FSDP2 tests on the CPU, started by `accelerate launch` (pytest does not collect this file).

    python -m accelerate.commands.launch --config_file configs/accelerate/cpu_2proc.yaml \
        tests/fsdp2_worker.py [--dpo] <run_dir> <hydra overrides...>

(``--dpo``: the DPO stage, configs/dpo.yaml; else the policy trainer, configs/policy.yaml.)

accelerate builds FSDP only on GPU processes, yet torch's ``fully_shard`` runs on gloo CPU processes too. So this
worker makes the CPU Accelerator, then switches its state to FSDP2 with the ``fsdp_config`` of
configs/accelerate/fsdp2.yaml, exactly the plugin ``accelerate launch --config_file fsdp2.yaml`` builds on GPUs.
From there on everything is the real thing: accelerate's FSDP2 prepare (per-layer ``fully_shard``, DTensor
parameters, the optimizer re-pointed at the shards), and the trainer's FSDP2 code paths (gathered decoding in
lockstep, DTensor gradient clipping, gathered checkpoint weights and AdamW state, PPO's critic). Needs the
repository root on PYTHONPATH.
"""

from __future__ import annotations

import sys

import yaml


def fsdp2_plugin():
    """accelerate's FSDP plugin with the settings configs/accelerate/fsdp2.yaml gives ``accelerate launch``."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from tests.conftest import ROOT

    fsdp = yaml.safe_load((ROOT / "configs/accelerate/fsdp2.yaml").read_text())["fsdp_config"]
    return FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"], auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower(),
        reshard_after_forward=fsdp["fsdp_reshard_after_forward"], state_dict_type=fsdp["fsdp_state_dict_type"],
        cpu_offload=fsdp["fsdp_offload_params"], cpu_ram_efficient_loading=fsdp["fsdp_cpu_ram_efficient_loading"],
        activation_checkpointing=fsdp["fsdp_activation_checkpointing"])


def fsdp2_accelerator():
    """A CPU Accelerator switched to FSDP2 with configs/accelerate/fsdp2.yaml's settings."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType

    acc = Accelerator(cpu=True)
    # Both shared states: every AcceleratorState() made later (accelerate makes them in its ops) copies PartialState's.
    PartialState().distributed_type = DistributedType.FSDP
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = fsdp2_plugin()
    assert acc.is_fsdp2
    return acc


def main_dpo(run_dir: str, overrides: list[str]) -> None:
    """The DPO stage (rlhf.trainers.dpo.train_dpo) under FSDP2; the module ``fit`` prepares must come back sharded."""
    from rlhf.config import validate_dpo_config
    from rlhf.trainers.dpo import train_dpo
    from tests.conftest import compose_config

    acc = fsdp2_accelerator()
    prepare, sharded = acc.prepare, []

    def recording_prepare(*args):
        prepared = prepare(*args)
        sharded.append(type(next(prepared[0].parameters())).__name__)
        return prepared

    acc.prepare = recording_prepare
    train_dpo(validate_dpo_config(compose_config("dpo", overrides, run_dir=run_dir), world_size=acc.num_processes),
              accelerator=acc)
    assert sharded == ["DTensor"], f"the DPO policy was not sharded: its parameters are {sharded}"


def main(run_dir: str, overrides: list[str]) -> None:
    from rlhf.config import validate_policy_config
    from rlhf.trainers.policy import PolicyTrainer
    from tests.conftest import compose_policy

    acc = fsdp2_accelerator()
    cfg = validate_policy_config(compose_policy(overrides, run_dir=run_dir), world_size=acc.num_processes)
    trainer = PolicyTrainer(cfg, accelerator=acc)
    for name, model in (("policy", trainer.policy), ("critic", trainer.critic)):
        if model is not None:
            sharded = type(next(model.parameters())).__name__
            assert sharded == "DTensor", f"the {name} was not sharded: its parameters are {sharded}"
    trainer.train()


if __name__ == "__main__":
    from rlhf.runtime.accelerator import shutdown_distributed

    if sys.argv[1] == "--dpo":
        main_dpo(sys.argv[2], sys.argv[3:])
    else:
        main(sys.argv[1], sys.argv[2:])
    shutdown_distributed()
