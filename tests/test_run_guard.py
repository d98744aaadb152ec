"""A run owns its folder, and a launch trains as many processes as it started.

- One writer per run folder (rlhf.runtime.runlock): a second run on a folder that a live run holds stops with one line naming
  the folder and the holder's pid and host, before any model loads and, through the scripts, before Hydra writes
  into the folder; a lock left by a dead process (kill -9) is taken over.
- Launch/world agreement (rlhf.runtime.accelerator.make_accelerator): ``accelerate launch --multi_gpu --num_processes 2`` on a
  machine without a GPU trains one 2-process gloo run, where accelerate alone would start two independent
  single-process runs writing into one folder.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.runtime.accelerator import BackendMismatch, launched_world_size, wants_cpu
from rlhf.runtime.runlock import (
    LOCK_NAME,
    RunDirBusy,
    RunLock,
    check_run_dir_free,
    holder_state,
    process_start_time,
)
from tests.conftest import FAST, ROOT, run_script

SCRIPT = "scripts/train_policy.py"


@pytest.fixture
def other_process():
    """A live process that is not this one (its pid and start time), ended after the test."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def _write_lock(run_dir: Path, **holder) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "since": "2026-12-04 10:00:00", **holder}))
    return path


# ---------------------------------------------------------------------------------------------- the lock itself
def test_a_lock_held_by_a_live_process_stops_a_second_run(tmp_path, other_process):
    _write_lock(tmp_path, pid=other_process.pid, start=process_start_time(other_process.pid))
    with pytest.raises(RunDirBusy, match=rf"^run_dir: {tmp_path} is in use by another run, pid {other_process.pid} "
                                         rf"on {socket.gethostname()} \(since 2026-12-04 10:00:00\)"):
        RunLock(str(tmp_path)).acquire()
    with pytest.raises(RunDirBusy, match="is in use by another run"):  # the scripts' check before Hydra writes
        check_run_dir_free(["trainer.max_steps=2", f"hydra.run.dir={tmp_path}"])


def test_a_lock_whose_process_is_gone_is_taken_over(tmp_path, other_process):
    start = process_start_time(other_process.pid)
    _write_lock(tmp_path, pid=other_process.pid, start=start)
    other_process.kill()  # as kill -9 leaves it: the file stays, its process does not
    other_process.wait()
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path, other_process):
    """The holder's pid runs, but it started at another time than the holder did: another process got the pid."""
    _write_lock(tmp_path, pid=other_process.pid, start="1")  # clock tick 1 after boot: not when it started
    assert holder_state(json.loads((tmp_path / LOCK_NAME).read_text())) == "stale"
    RunLock(str(tmp_path)).acquire()


def test_a_lock_from_another_machine_is_respected_and_says_how_to_clear_it(tmp_path):
    path = _write_lock(tmp_path, pid=1234, start="99", host="node-7")
    with pytest.raises(RunDirBusy, match=rf"locked by a run on another machine, pid 1234 on node-7 .* if that run is "
                                         rf"gone, delete {path}"):
        RunLock(str(tmp_path)).acquire()


def test_a_torn_lock_file_is_stale_and_the_same_process_may_take_its_lock_again(tmp_path):
    (tmp_path / LOCK_NAME).write_text('{"pid": 12')  # a holder killed while writing it
    first = RunLock(str(tmp_path))
    first.acquire()
    second = RunLock(str(tmp_path))  # a second trainer object in the same process, after the first
    second.acquire()
    assert second.held and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_the_trainer_stops_before_loading_a_model(tmp_path, other_process, monkeypatch, policy_cfg):
    import rlhf.trainers.policy_setup
    from rlhf.trainers.policy import PolicyTrainer

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the run folder is taken")

    monkeypatch.setattr(rlhf.trainers.policy_setup, "load_causal_lm", refuse)
    monkeypatch.setattr(rlhf.trainers.policy_setup, "load_tokenizer", refuse)
    _write_lock(tmp_path / "run", pid=other_process.pid, start=process_start_time(other_process.pid))
    with pytest.raises(RunDirBusy, match=f"pid {other_process.pid}"):
        PolicyTrainer(policy_cfg())


# ---------------------------------------------------------------------------------------------- two real runs
@pytest.mark.slow
def test_two_runs_on_one_folder_the_second_stops_and_the_first_finishes_intact(tmp_path):
    """Run A trains 30 steps; run B, started on the same hydra.run.dir while A runs, stops at once with one line
    naming the folder and A's pid; A ends with all its metrics, a complete checkpoint and its own .hydra config."""
    from rlhf.runtime.checkpoint import check_checkpoint

    run = tmp_path / "run"
    a = subprocess.Popen([sys.executable, SCRIPT, *FAST, "trainer.max_steps=30", "trainer.torch_threads=1",
                          f"hydra.run.dir={run}", "seed=11"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists():  # A holds the lock and is training
        assert a.poll() is None, a.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    t0 = time.monotonic()
    b = run_script([SCRIPT, *FAST, "trainer.max_steps=5", f"hydra.run.dir={run}", "seed=22"], timeout=120)
    b_seconds = time.monotonic() - t0
    out, err = a.communicate(timeout=300)
    assert b.returncode == 2, b.stderr[-2000:]
    lines = b.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: run_dir: {run} is in use by another run, pid {a.pid} on "), lines
    assert "Traceback" not in b.stderr and b_seconds < 30  # stopped before loading anything
    assert a.poll() is not None and a.returncode == 0, err[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(30))
    check_checkpoint(str(run / "checkpoints" / "step_30"))
    assert "seed: 11" in (run / ".hydra" / "config.yaml").read_text()  # B never wrote its config over A's
    assert not (run / LOCK_NAME).exists()  # released at the end


# ---------------------------------------------------------------------------------------------- launch / world
def test_launched_world_size_reads_the_launchers_variables():
    assert launched_world_size({}) == 1
    assert launched_world_size({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}) == 4  # torchrun / accelerate launch
    assert launched_world_size({"OMPI_COMM_WORLD_SIZE": "8"}) == 8  # mpirun
    assert launched_world_size({"LOCAL_WORLD_SIZE": "2"}) == 2  # one machine's count, a lower bound


def test_several_processes_without_a_gpu_run_on_the_cpu():
    assert wants_cpu(cpu=False, world=2, device_present=False) is True  # the case accelerate got wrong
    assert wants_cpu(cpu=False, world=2, device_present=True) is False  # GPUs: NCCL as launched
    assert wants_cpu(cpu=False, world=1, device_present=False) is False  # one process: nothing to join
    assert wants_cpu(cpu=True, world=1, device_present=True) is True  # trainer.cpu=true is obeyed


def test_a_world_the_accelerator_does_not_see_stops_with_one_line(monkeypatch):
    """GPUs present, 2 processes launched, but the Accelerator comes up alone (whatever the cause; accelerate is
    replaced by a stand-in that does so): every process stops instead of training alone into the shared folder."""
    import rlhf.runtime.accelerator
    from rlhf.config import TrainerConfig

    class AloneAccelerator:  # what accelerate returns then: one process, no distributed backend
        def __init__(self, **kwargs):
            self.num_processes = 1
            self.distributed_type = type("T", (), {"name": "NO"})()
            self.device = "cuda:0"

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(rlhf.runtime.accelerator, "has_accelerator_device", lambda: True)
    monkeypatch.setattr(rlhf.runtime.accelerator, "Accelerator", AloneAccelerator)
    with pytest.raises(BackendMismatch, match=r"^trainer\.cpu: the launcher started 2 processes but each sees 1 "
                                              r"\(NO on cuda:0\)"):
        rlhf.runtime.accelerator.make_accelerator(TrainerConfig(max_steps=1))


LAUNCH_AS_TYPED = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]


@pytest.mark.slow
def test_the_multi_gpu_launch_on_a_cpu_machine_trains_one_two_process_run(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 scripts/train_policy.py trainer.max_steps=2`, exactly as a
    user types it on a machine without a GPU (plus a run folder): one run of 2 gloo processes, one writer."""
    from rlhf.runtime.checkpoint import check_checkpoint

    run = tmp_path / "run"
    env = {"CUDA_VISIBLE_DEVICES": ""}  # also on a GPU machine, this test is about one without
    proc = run_script([*LAUNCH_AS_TYPED, SCRIPT, "trainer.max_steps=2", f"hydra.run.dir={run}"], timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "MULTI_CPU, 2 process(es)" in text, text[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]  # one writer: each step once
    check_checkpoint(str(run / "checkpoints" / "step_2"))
    assert "free disk space" not in text and not (run / LOCK_NAME).exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["scripts/train_sft.py", "scripts/train_reward.py"])
def test_the_same_launch_of_the_sft_and_reward_stages_is_one_run(tmp_path, script):
    run = tmp_path / "run"
    proc = run_script([*LAUNCH_AS_TYPED, script, "trainer.max_steps=2", "trainer.warmup_steps=0", "trainer.eval_every=0",
                       "data.num_eval=32",
                       "logging.progress=false", f"hydra.run.dir={run}"], timeout=300,
                      env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes launched and no GPU: running them on the CPU (gloo backend)" in proc.stdout + proc.stderr
    assert (run / "final" / "config.json").exists()
    assert not (run / LOCK_NAME).exists()


def test_sigkill_leaves_a_lock_the_next_run_takes_over(tmp_path):
    """What kill -9 leaves: a lock whose pid is gone. The next run on the folder (here: a lock acquire) goes on."""
    proc = subprocess.Popen([sys.executable, "-c", f"from rlhf.runtime.runlock import RunLock; RunLock({str(tmp_path)!r})"
                             ".acquire(); import time; time.sleep(60)"], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not (tmp_path / LOCK_NAME).exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid
    RunLock(str(tmp_path)).acquire()


def test_more_gpu_processes_than_gpus_stop_with_one_line(monkeypatch):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine with one GPU: rank 1 would ask for cuda:1."""
    import rlhf.runtime.accelerator as accel

    monkeypatch.setattr(accel.torch.cuda, "is_available", lambda: True)
    with pytest.raises(BackendMismatch, match=r"^trainer\.cpu: the launcher started 2 processes on this machine, but "
                                              r"it has 1 GPU\(s\); launch at most 1 per machine"):
        accel.check_gpus_per_machine(cpu=False, local_world=2, gpus=1)
    accel.check_gpus_per_machine(cpu=False, local_world=2, gpus=2)  # one GPU each: fine
    accel.check_gpus_per_machine(cpu=True, local_world=8, gpus=1)  # gloo processes need no GPU
