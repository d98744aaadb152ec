"""The sweep configs compose into the multiruns the docs promise, and a real small sweep orders KL by beta."""

import importlib.util

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlhf.analysis.report import collect_runs, group_rows, kl_monotone, run_row
from rlhf.config import validate_policy_config
from tests.conftest import CONFIGS, compose_policy, run_script


def compose_with_hydra(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="policy", overrides=list(overrides), return_hydra_config=True)


def sweep_values(cfg, key):
    return [float(v) for v in str(cfg.hydra.sweeper.params[key]).split(",")]


def test_beta_sweep_composes_into_a_joblib_multirun():
    cfg = compose_with_hydra(["+sweep=beta"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 2
    betas = sweep_values(cfg, "kl.beta")
    assert betas[0] == 0.0 and betas == sorted(betas) and len(betas) >= 4
    assert sweep_values(cfg, "seed") == [0.0, 1.0]
    assert cfg.kl.log_at_zero_beta is True  # otherwise the beta = 0 run logs no KL
    assert cfg.kl.controller == "fixed"
    assert cfg.trainer.torch_threads == 1
    subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"]  # job folders named by their values
    assert "${kl.beta}" in subdir and "${seed}" in subdir


def test_kl_target_sweep_composes_with_the_adaptive_controller():
    cfg = compose_with_hydra(["+sweep=kl_target"])
    assert cfg.kl.controller == "adaptive"
    targets = sweep_values(cfg, "kl.target")
    assert targets == sorted(targets) and len(targets) >= 3 and targets[0] > 0
    assert cfg.hydra.launcher.n_jobs == 2
    # 64 samples a step: beta may move by a factor 1 +- 0.2 * 64 / horizon per step, which must matter in 100 steps
    assert 0.2 * 64 / cfg.kl.horizon * cfg.trainer.max_steps >= 1.0


@pytest.mark.parametrize("sweep, key", [("beta", "kl.beta"), ("kl_target", "kl.target")])
def test_every_swept_value_validates(sweep, key, tmp_path):
    for value in sweep_values(compose_with_hydra([f"+sweep={sweep}"]), key):
        cfg = compose_policy([f"+sweep={sweep}", f"{key}={value}", "seed=1"], run_dir=str(tmp_path))
        assert validate_policy_config(cfg).kl[key.split(".")[1]] == value


def test_slurm_launcher_replaces_joblib():
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        pytest.skip("hydra-submitit-launcher is not installed (pip install 'rlhf[slurm]')")
    cfg = compose_with_hydra(["+sweep=beta", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert "n_jobs" not in launcher  # nothing of the local launcher leaks into the Slurm one
    assert (launcher.partition, launcher.nodes, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert sweep_values(cfg, "kl.beta")[0] == 0.0  # the same jobs, sent elsewhere


@pytest.mark.slow
def test_mean_final_kl_decreases_as_beta_grows(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_script(["scripts/train_policy.py", "-m", "+sweep=beta", "kl.beta=0,0.03,0.3", "seed=0",
                       "trainer.max_steps=30", "logging.tensorboard=false", f"hydra.sweep.dir={sweep}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = collect_runs(str(sweep))
    assert all(r.finished for r in runs)
    groups = group_rows([run_row(r, "beta") for r in runs], "beta")
    assert [g["beta"] for g in groups] == [0.0, 0.03, 0.3]
    # Measured on 2 seeds at 30 steps: KL ~ 11-14, 5-8 and 4 nats; the penalty must order them.
    assert kl_monotone(groups), [g["kl_mean"] for g in groups]
