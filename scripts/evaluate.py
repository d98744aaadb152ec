"""Evaluate a model on held-out prompts: greedy accuracy and reward, pass@k from n samples per prompt.

    python scripts/evaluate.py                                                  # offline default: tiny model, built-in task
    python scripts/evaluate.py model.policy=outputs/<run>/checkpoints/step_100 # a policy checkpoint
    python scripts/evaluate.py model.policy=builtin:smollm2 data.prompts=builtin:arithmetic eval.samples=16 eval.ks=[1,4,16]
    python scripts/evaluate.py data.prompts=held_out.jsonl reward.function=my_pkg.rewards.exact_match eval.threshold=1
"""

import logging

import hydra
from omegaconf import DictConfig

from rlhf.runtime.errors import exit_on_user_error, one_line_hydra_errors

log = logging.getLogger(__name__)


@hydra.main(config_path="../configs", config_name="evaluate", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from rlhf.analysis.evaluate import markdown_header, markdown_row, run_evaluation, validate_eval_config

    cfg = validate_eval_config(cfg)
    metrics, path = run_evaluation(cfg)
    log.info("wrote %s\n%s", path, markdown_header(metrics))
    print(markdown_row(cfg, metrics), flush=True)


if __name__ == "__main__":
    one_line_hydra_errors(main)()
