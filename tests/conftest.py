import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def compose_config(name, overrides=(), run_dir=None):
    """Compose configs/<name>.yaml as the script would, with run_dir pointing at a test folder."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        ovr = list(overrides)
        if run_dir is not None:
            ovr.append(f"run_dir={run_dir}")
        return compose(config_name=name, overrides=ovr)


def compose_policy(overrides=(), run_dir=None):
    return compose_config("policy", overrides, run_dir)


# Small and quick: 4 prompts x 2 samples, short responses, no progress bar or TensorBoard.
FAST = ["rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=6",
        "trainer.minibatches=1", "logging.progress=false", "logging.tensorboard=false", "data.num_prompts=64"]


@pytest.fixture
def policy_cfg(tmp_path):
    from rlhf.config import validate_policy_config

    def make(*overrides, world_size=1):
        return validate_policy_config(compose_policy([*FAST, *overrides], run_dir=str(tmp_path / "run")),
                                      world_size=world_size)

    return make


def run_script(args, cwd=ROOT, timeout=600, env=None):
    import subprocess

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)
