"""Real multi-process runs: two gloo ranks on CPU through `accelerate launch`."""

import json
import shutil

import pytest

from tests.conftest import run_script

pytestmark = pytest.mark.slow

LAUNCH = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]


def test_two_gloo_processes_train_and_write_once(tmp_path):
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not installed")
    run = tmp_path / "run"
    proc = run_script([*LAUNCH, "scripts/train_policy.py", "trainer.cpu=true", "trainer.max_steps=3",
                       "rollout.prompts_per_step=4", "rollout.max_new_tokens=6", "logging.progress=false",
                       f"hydra.run.dir={run}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Only rank 0 writes: one line per step, not two.
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert abs(rows[0]["kl"]) < 1e-6
    assert all(r["score"] is not None and r["kl"] is not None for r in rows)
    assert (run / "checkpoints" / "step_3" / "COMPLETE").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_3"]
