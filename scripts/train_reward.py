"""Reward-model training, the second RLHF stage. The model and tokenizer go to <run_dir>/final.

    python scripts/train_reward.py                               # offline default: tiny model, built-in preferences
    python scripts/train_reward.py model.init=runs/sft/final     # start from the SFT model's backbone
    python scripts/train_reward.py objective=regression           # fit real-valued labels (built-in: gold scores)
    python scripts/train_reward.py objective=binary data.label_threshold=0
    python scripts/train_policy.py model.reward=<run_dir>/final  # then optimise a policy against it
"""

import os

import hydra
from omegaconf import DictConfig

from rlhf.config import validate_reward_config
from rlhf.runtime.errors import exit_on_user_error, one_line_hydra_errors


@hydra.main(config_path="../configs", config_name="reward", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    cfg = validate_reward_config(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    from rlhf.trainers.reward import train_reward  # heavy imports only after the config is known to be good

    train_reward(cfg)


if __name__ == "__main__":
    one_line_hydra_errors(main)()
