"""Every `accelerate launch` config under configs/accelerate/ loads with accelerate's own loader and says what the
docs promise: its distributed type, process counts, and the FSDP / DeepSpeed settings the trainer relies on."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "accelerate"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))

# name -> (distributed_type, num_processes, num_machines)
EXPECTED = {
    "single_gpu.yaml": ("NO", 1, 1),
    "ddp.yaml": ("MULTI_GPU", 8, 1),
    "fsdp2.yaml": ("FSDP", 8, 1),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 8, 1),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 8, 1),
    "multinode_2x8.yaml": ("MULTI_GPU", 16, 2),
    "cpu_2proc.yaml": ("MULTI_GPU", 2, 1),
}


def _load(path: Path):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(path))


def _launch_option_names() -> set[str]:
    """Names `accelerate launch` accepts; fsdp_config / deepspeed_config keys become these options."""
    from accelerate.commands.launch import launch_command_parser

    return {action.dest for action in launch_command_parser()._actions}


def test_the_documented_configs_are_all_there():
    assert sorted(p.name for p in CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_with_accelerate_and_names_a_valid_distributed_type(path):
    from accelerate.utils import DistributedType

    raw = yaml.safe_load(path.read_text())
    # Quoted "NO": unquoted it would be the YAML boolean false and accelerate would reject it.
    assert isinstance(raw["distributed_type"], str)
    cfg = _load(path)  # accelerate's ClusterConfig refuses unknown keys and unknown distributed types
    assert isinstance(cfg.distributed_type, DistributedType)
    dist_type, processes, machines = EXPECTED[path.name]
    assert cfg.distributed_type.value == dist_type
    assert cfg.num_processes == processes
    assert cfg.num_machines == machines
    assert 0 <= cfg.machine_rank < cfg.num_machines
    # The trainer passes trainer.mixed_precision to Accelerator; a config asking for another one would mislead.
    assert cfg.mixed_precision == "no"
    assert cfg.dynamo_config == {}
    if cfg.num_processes > 1:
        assert cfg.num_processes % cfg.num_machines == 0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_plugin_keys_are_options_accelerate_launch_knows(path):
    """`accelerate launch` copies fsdp_config / deepspeed_config keys onto its options and ignores the ones it does
    not know, so a typo would silently fall back to a default. Every key must be a real option."""
    cfg = _load(path)
    options = _launch_option_names()
    keys = [k if k.startswith("fsdp") else "fsdp_" + k for k in cfg.fsdp_config] + list(cfg.deepspeed_config)
    assert [k for k in keys if k not in options] == []


def test_multinode_config_names_the_main_machine():
    cfg = _load(CONFIG_DIR / "multinode_2x8.yaml")
    assert cfg.num_machines == 2 and cfg.machine_rank == 0
    assert cfg.main_process_ip and isinstance(cfg.main_process_port, int)
    assert cfg.rdzv_backend == "static" and cfg.same_network is True
    # 16 processes over 2 machines = 8 per machine.
    assert cfg.num_processes // cfg.num_machines == 8


def test_fsdp2_config_shards_per_layer_and_saves_full_weights():
    cfg = _load(CONFIG_DIR / "fsdp2.yaml")
    fsdp = cfg.fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    # Checkpoints are save_pretrained folders, which need the full (gathered) state dict.
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp["fsdp_reshard_after_forward"] is True


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_configs(name, stage):
    ds = _load(CONFIG_DIR / name).deepspeed_config
    assert ds["zero_stage"] == stage
    # The trainer scales each micro-batch loss so that they sum to the minibatch loss; DeepSpeed dividing by its own
    # accumulation count on top would shrink every gradient.
    assert ds["gradient_accumulation_steps"] == 1
    # Same clip as the trainer's default trainer.max_grad_norm (configs/policy.yaml).
    policy = yaml.safe_load((ROOT / "configs" / "policy.yaml").read_text())
    assert ds["gradient_clipping"] == policy["trainer"]["max_grad_norm"]
    if stage == 3:
        # save_pretrained needs the consolidated 16-bit weights that only this flag lets rank 0 gather.
        assert ds["zero3_save_16bit_model"] is True


def test_cpu_config_is_a_two_process_gloo_job():
    """MULTI_CPU would make accelerate start one process and expect mpirun; the tests need two local processes."""
    cfg = _load(CONFIG_DIR / "cpu_2proc.yaml")
    assert cfg.distributed_type.value == "MULTI_GPU" and cfg.num_processes == 2 and cfg.use_cpu is True
    assert cfg.main_process_port == 0  # a free port: parallel test runs must not collide
