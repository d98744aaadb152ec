"""Direct preference optimization (DPO and its variants) of a causal LM on preference pairs. The model and tokenizer
go to <run_dir>/final.

    python scripts/train_dpo.py                                   # offline default: tiny model, built-in preferences
    python scripts/train_dpo.py model.policy=runs/sft/final       # start from an SFT model (the usual recipe)
    python scripts/train_dpo.py dpo.loss=ipo dpo.beta=0.5         # IPO; or dpo.loss=hinge, or dpo.label_smoothing=0.1
    python scripts/train_policy.py model.policy=<run_dir>/final   # then RL from it, or scripts/evaluate.py
"""

import os

import hydra
from omegaconf import DictConfig

from rlhf.config import validate_dpo_config
from rlhf.runtime.errors import exit_on_user_error, one_line_hydra_errors


@hydra.main(config_path="../configs", config_name="dpo", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    cfg = validate_dpo_config(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    from rlhf.trainers.dpo import train_dpo  # heavy imports only after the config is known to be good

    train_dpo(cfg)


if __name__ == "__main__":
    one_line_hydra_errors(main)()
