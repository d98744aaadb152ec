"""Policy optimisation (PPO, RLOO, GRPO, REINFORCE++) against a reward model with a per-token KL penalty.

    python scripts/train_policy.py                              # offline default: tiny model, built-in task
    python scripts/train_policy.py algorithm=grpo kl.beta=0.02
    accelerate launch --multi_gpu --num_processes 2 scripts/train_policy.py trainer.cpu=true
"""

import os

import hydra
from omegaconf import DictConfig

from rlhf.config import validate_policy_config
from rlhf.runtime.errors import exit_on_user_error, one_line_hydra_errors


@hydra.main(config_path="../configs", config_name="policy", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    cfg = validate_policy_config(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    from rlhf.trainers.policy import PolicyTrainer  # heavy imports only after the config is known to be good

    PolicyTrainer(cfg).train()


if __name__ == "__main__":
    one_line_hydra_errors(main)()
