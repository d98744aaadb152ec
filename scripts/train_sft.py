"""Supervised fine-tuning, the first RLHF stage. The model and tokenizer go to <run_dir>/final.

    python scripts/train_sft.py                                  # offline default: tiny model, built-in task
    python scripts/train_sft.py data.source=demos.jsonl data.eval_source=demos_test.jsonl model.init=<hub id>
    accelerate launch --multi_gpu --num_processes 2 scripts/train_sft.py
"""

import os

import hydra
from omegaconf import DictConfig

from rlhf.config import validate_sft_config
from rlhf.runtime.errors import exit_on_user_error, one_line_hydra_errors


@hydra.main(config_path="../configs", config_name="sft", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    cfg = validate_sft_config(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    from rlhf.trainers.sft import train_sft  # heavy imports only after the config is known to be good

    train_sft(cfg)


if __name__ == "__main__":
    one_line_hydra_errors(main)()
