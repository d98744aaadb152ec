"""One rank's side of the distributed tests, started by `accelerate launch` (pytest does not collect this file).

    python -m accelerate.commands.launch --config_file configs/accelerate/cpu_2proc.yaml \
        tests/distributed_worker.py <out_dir> <hydra overrides...>

Runs the policy trainer with a few of its steps recorded, then writes ``<out_dir>/rank<r>.pt`` with what this rank
saw: its prompts, its rollout tensors, the rewards that went into ``estimate`` and the advantages that came out,
the metrics it logged, and the steps at which it called ``save_checkpoint``. The test compares the ranks' files.
Needs the repository root on PYTHONPATH (for ``tests.conftest``).
"""

from __future__ import annotations

import os
import sys
import time

import torch


def reward_fails_on_rank_1(prompts: list[str], completions: list[str]) -> list[float]:
    """The built-in task's reward on every rank but rank 1, where it raises: one failing rank must end the job."""
    if int(os.environ.get("RANK", "0")) == 1:
        raise RuntimeError("reward service unreachable from rank 1")
    from rlhf.tasks.sentiment import reward_fn

    return reward_fn(prompts, completions)


def reward_hangs_on_rank_1(prompts: list[str], completions: list[str]) -> list[float]:
    """The built-in task's reward, except that rank 1 never answers (a stuck reward service)."""
    if int(os.environ.get("RANK", "0")) == 1:
        time.sleep(600)
    from rlhf.tasks.sentiment import reward_fn

    return reward_fn(prompts, completions)


def _record_calls(obj, name: str, calls: list) -> None:
    """Replace ``obj.name`` by a wrapper that appends ``(args, result)`` of every call to ``calls``."""
    fn = getattr(obj, name)

    def wrapped(*args):
        out = fn(*args)
        calls.append((args, out))
        return out

    setattr(obj, name, wrapped)


def _cpu(x):
    """Tensors (also inside tuples, lists, dicts and NamedTuples) moved to the CPU, so torch.save needs no device."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if hasattr(x, "_asdict"):
        return {k: _cpu(v) for k, v in x._asdict().items()}
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_cpu(v) for v in x]
    return x


def main(out_dir: str, overrides: list[str]) -> None:
    from accelerate import Accelerator

    from rlhf.config import validate_policy_config
    from rlhf.trainers import policy as trainer_module
    from rlhf.trainers import policy_state
    from tests.conftest import compose_policy

    acc = Accelerator(cpu=True)
    cfg = validate_policy_config(compose_policy(overrides), world_size=acc.num_processes)
    trainer = trainer_module.PolicyTrainer(cfg, accelerator=acc)
    calls: dict[str, list] = {"prompt_batch": [], "estimate": []}
    for name, log in calls.items():
        _record_calls(trainer, name, log)
    saves: list[int] = []
    real_save = policy_state.save_checkpoint

    def counting_save(ckpt_root, step, write_fn, keep_last):
        saves.append(step)
        return real_save(ckpt_root, step, write_fn, keep_last)

    policy_state.save_checkpoint = counting_save
    history = trainer.train()
    record = {
        "rank": acc.process_index,
        "world_size": acc.num_processes,
        "prompts": [out for _, out in calls["prompt_batch"]],
        # estimate(rollout, rewards) -> (advantages, returns, explained variance)
        "rollouts": [_cpu(args[0]) for args, _ in calls["estimate"]],
        "rewards": [_cpu(args[1]) for args, _ in calls["estimate"]],
        "advantages": [_cpu(out[0]) for _, out in calls["estimate"]],
        "returns": [_cpu(out[1]) for _, out in calls["estimate"]],
        "history": history,
        "saves": saves,
    }
    os.makedirs(out_dir, exist_ok=True)
    torch.save(record, os.path.join(out_dir, f"rank{acc.process_index}.pt"))


if __name__ == "__main__":
    from rlhf.runtime.accelerator import shutdown_distributed

    main(sys.argv[1], sys.argv[2:])
    shutdown_distributed()  # as the scripts do: gloo's teardown at exit can abort the process otherwise
