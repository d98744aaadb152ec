"""SIGKILL at each phase of a step, then ``trainer.resume=auto``: the metrics read as if the run had never stopped.

tests/fault_worker.py runs scripts/train_policy.py with one phase wrapped so that the process kills itself (SIGKILL:
no handler, ``finally`` or lock release runs). The run is RESUMABLE (6 steps, a checkpoint every 2), killed after its
first checkpoint ``step_2``; the plain script then resumes it in the same folder. Whatever the kill left on disk (a
stale run-folder lock, metric lines past the checkpoint, a half-written ``step_N.tmp``), the resumed run must log
steps 0..5 once each with exactly the numbers of an uninterrupted run (``reference_metrics``, one run per module),
leave no ``.tmp`` folder, and end with a complete ``step_6``.
"""

import json

import pytest

from rlhf.runtime.checkpoint import MARKER, check_checkpoint, list_checkpoints
from rlhf.runtime.runlock import LOCK_NAME, holder_state
from tests.conftest import run_script
from tests.test_reliability import RESUMABLE, SCRIPT, _comparable, _read_metrics, reference_metrics  # noqa: F401

# reference_metrics is module-scoped: imported here it runs once for this module, in this process.
WORKER = "tests/fault_worker.py"

# (phase, step the worker kills at, steps logged before the kill). What each kill leaves on disk, and why the
# resumed run must still match:
KILLS = [
    # generate, step 3: the rollout of step 3 is generated in memory and lost. On disk: the complete step_2 and
    # metrics of steps 0-2. Sampling is re-seeded from (seed, step), so the resumed run, which restarts at step 2
    # from step_2's weights, draws the same rollouts again; the metric line of step 2 is dropped and rewritten.
    ("generate", 3, [0, 1, 2]),
    # update, step 3: after the first of the step's 4 optimizer steps (ppo_epochs=4), so the policy, AdamW's
    # moments and the LR schedule have moved in memory only. On disk: the same as for generate; nothing of the
    # half-done update reached a file, so step_2 holds exactly the state steps 2-5 start from.
    ("update", 3, [0, 1, 2]),
    # checkpoint step_4: killed inside the save after step 3, once the weights and trainer state are written into
    # step_4.tmp but before its COMPLETE marker and the rename. On disk: step_2, a half-written step_4.tmp, metrics
    # of steps 0-3. resume=auto sees only complete step_<N> folders, so it resumes step_2 (the .tmp is never read);
    # the run's own save of step_4 replaces the .tmp, and steps 2-3 are trained and logged again identically.
    ("checkpoint", 4, [0, 1, 2, 3]),
]


@pytest.mark.slow
@pytest.mark.parametrize("phase, kill_step, logged", KILLS, ids=[k[0] for k in KILLS])
def test_sigkill_at_each_phase_then_resume_auto_matches_an_uninterrupted_run(
        phase, kill_step, logged, reference_metrics, tmp_path):  # noqa: F811 (the imported fixture)
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    killed = run_script([WORKER, *RESUMABLE, f"hydra.run.dir={run}"], timeout=300,
                        env={"RLHF_KILL_PHASE": phase, "RLHF_KILL_STEP": str(kill_step)})
    assert killed.returncode == -9, killed.stderr[-2000:]  # died by SIGKILL, not an error
    assert killed.stderr.strip().splitlines()[-1] == f"fault_worker: SIGKILL at {phase} of step {kill_step}"

    # What the kill left: step_2 only, the metric lines written before it, and the dead run's lock.
    assert [s for s, _ in list_checkpoints(str(ckpts))] == [2]
    assert [r["step"] for r in _read_metrics(run)] == logged
    assert holder_state(json.loads((run / LOCK_NAME).read_text())) == "stale"  # its process is gone
    if phase == "checkpoint":
        tmp = ckpts / f"step_{kill_step}.tmp"
        assert tmp.is_dir() and not (ckpts / f"step_{kill_step}").exists()
        assert (tmp / "policy" / "config.json").exists() and (tmp / "trainer_state.pt").exists()
        assert not (tmp / MARKER).exists()
    else:
        assert sorted(p.name for p in ckpts.iterdir()) == ["step_2"]

    resumed = run_script([SCRIPT, *RESUMABLE, "trainer.resume=auto", f"hydra.run.dir={run}"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "steps 2 to 6" in resumed.stdout + resumed.stderr  # resumed from step_2, not from scratch
    rows = _read_metrics(run)
    assert [r["step"] for r in rows] == list(range(6))  # each step exactly once
    assert _comparable(rows) == _comparable(reference_metrics)
    assert not [p.name for p in ckpts.iterdir() if p.name.endswith(".tmp")]
    assert [s for s, _ in list_checkpoints(str(ckpts))] == [2, 4, 6]
    check_checkpoint(str(ckpts / "step_6"))
    assert not (run / LOCK_NAME).exists()  # the resumed run took the stale lock over and released it


def slow_reward(prompts, completions):
    """The built-in reward, 1.5 s late: a step long enough to signal twice inside it."""
    import time

    from rlhf.tasks.sentiment import reward_fn

    time.sleep(1.5)
    return reward_fn(prompts, completions)


@pytest.mark.slow
def test_sigterm_twice_stops_at_once_without_a_checkpoint_and_the_run_resumes(reference_metrics, tmp_path):  # noqa: F811
    """The first SIGTERM asks for a stop after the current step (and a checkpoint); a second one, sent while that
    step still runs, ends the process at once (the handler put the default action back): no checkpoint is written
    for the unfinished step, and resume=auto continues from the last complete one."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    run = tmp_path / "run"
    args = [*RESUMABLE, "reward.function=tests.test_kill_phases.slow_reward", f"hydra.run.dir={run}"]
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "step_2" / MARKER).exists():  # steps 0-1 done; step 2 runs (1.5 s reward)
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the handler runs and prints its line; step 2 is still in its slow reward
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM, err[-2000:]  # killed by the second signal, not a clean 143
    assert "SIGTERM: stopping after this step and writing a checkpoint (send it again to stop at once" in err
    assert [s for s, _ in list_checkpoints(str(run / "checkpoints"))] == [2]  # nothing for the unfinished step
    resumed = run_script([SCRIPT, *args, "trainer.resume=auto"], timeout=300, env={"PYTHONPATH": str(ROOT)})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["step"] for r in _read_metrics(run)] == list(range(6))
    assert _comparable(_read_metrics(run)) == _comparable(reference_metrics)  # the same scores, only later
    check_checkpoint(str(run / "checkpoints" / "step_6"))
