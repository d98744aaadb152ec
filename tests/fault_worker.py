"""A test tool (pytest does not collect this file): scripts/train_policy.py with a SIGKILL at one phase of one step.

    RLHF_KILL_PHASE=update RLHF_KILL_STEP=3 python tests/fault_worker.py <hydra overrides...>

Runs the script exactly as ``python scripts/train_policy.py <overrides>`` would (same ``sys.argv``, ``sys.path`` and
``__main__``), after wrapping ONE method so that the process sends itself SIGKILL: no handler, ``finally`` or
``atexit`` runs, as when the kernel's OOM killer or a scheduler ends a job. The phases:

    generate    step RLHF_KILL_STEP (0-based): right after ``PolicyTrainer.sample`` has generated and scored the rollout
    update      step RLHF_KILL_STEP: right after the first optimizer step of its update (weights moved in memory)
    checkpoint  the save of ``step_<RLHF_KILL_STEP>``: after ``write_fn`` has written the weights and trainer state
                into ``step_<N>.tmp`` but before the COMPLETE marker, so the half-written ``.tmp`` folder stays

Used by tests/test_kill_phases.py.
"""

from __future__ import annotations

import functools
import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_policy.py"
PHASES = ("generate", "update", "checkpoint")


def _die() -> None:
    print(f"fault_worker: SIGKILL at {os.environ['RLHF_KILL_PHASE']} of step {os.environ['RLHF_KILL_STEP']}",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def install(phase: str, step: int) -> None:
    """Wrap the method of ``phase`` (one of PHASES) so that it kills this process at ``step``."""
    import rlhf.trainers.policy
    import rlhf.trainers.policy_state
    from rlhf.trainers.policy import PolicyTrainer

    if phase == "generate":
        sample = PolicyTrainer.sample

        @functools.wraps(sample)
        def sample_then_die(self, at, *args, **kwargs):
            out = sample(self, at, *args, **kwargs)
            if at == step:
                _die()
            return out

        PolicyTrainer.sample = sample_then_die
    elif phase == "update":
        update, optimizer_step = PolicyTrainer.update, PolicyTrainer._optimizer_step

        @functools.wraps(update)
        def update_noting_step(self, *args, **kwargs):
            self._fault_step = args[-1] if len(args) == 5 else kwargs["step"]  # update(ro, adv, ret, beta, step)
            try:
                return update(self, *args, **kwargs)
            finally:
                self._fault_step = None

        @functools.wraps(optimizer_step)
        def step_then_die(self):
            norm = optimizer_step(self)
            if getattr(self, "_fault_step", None) == step:
                _die()
            return norm

        PolicyTrainer.update, PolicyTrainer._optimizer_step = update_noting_step, step_then_die
    elif phase == "checkpoint":
        save_checkpoint = rlhf.trainers.policy_state.save_checkpoint  # policy_state imported it by name: patch that name

        @functools.wraps(save_checkpoint)
        def save_dying_before_marker(ckpt_root, at, write_fn, *args, **kwargs):
            def write_then_die(folder):
                write_fn(folder)
                if at == step:
                    _die()

            return save_checkpoint(ckpt_root, at, write_then_die if at == step else write_fn, *args, **kwargs)

        rlhf.trainers.policy_state.save_checkpoint = save_dying_before_marker
    else:
        raise SystemExit(f"fault_worker: RLHF_KILL_PHASE must be one of {', '.join(PHASES)}, got {phase!r}")


def main() -> None:
    install(os.environ["RLHF_KILL_PHASE"], int(os.environ["RLHF_KILL_STEP"]))
    sys.argv = [str(SCRIPT), *sys.argv[1:]]
    sys.path[0] = str(SCRIPT.parent)  # as `python scripts/train_policy.py` has it
    runpy.run_path(str(SCRIPT), run_name="__main__")


if __name__ == "__main__":
    main()
