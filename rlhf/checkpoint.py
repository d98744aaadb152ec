"""Atomic checkpoints: write into ``step_<N>.tmp``, then rename to ``step_<N>``.

A folder named ``step_<N>`` is therefore always complete; half-written ``.tmp`` folders from a crash are ignored on
resume and removed by the next save. A ``COMPLETE`` marker file is written last as a second guard.
"""

from __future__ import annotations

import os
import re
import shutil

import torch

_STEP = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"


class CheckpointError(ValueError):
    """A checkpoint folder that does not exist, is incomplete, or does not fit the run's config."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (usually a full disk). The previous checkpoint is intact."""


def list_checkpoints(ckpt_root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``ckpt_root`` as (step, path), oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    found = []
    for name in os.listdir(ckpt_root):
        m = _STEP.match(name)
        path = os.path.join(ckpt_root, name)
        if m and os.path.isfile(os.path.join(path, MARKER)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(ckpt_root: str) -> str | None:
    """The newest complete checkpoint under ``ckpt_root``, or None when there is none."""
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1][1] if ckpts else None


def check_checkpoint(path: str, key: str = "trainer.resume") -> None:
    """Fail with a one-line error naming ``key`` unless ``path`` is a complete checkpoint."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{key}: checkpoint folder {path!r} does not exist")
    for need in (MARKER, "trainer_state.pt", os.path.join("policy", "config.json")):
        if not os.path.exists(os.path.join(path, need)):
            raise CheckpointError(f"{key}: checkpoint {path!r} is incomplete (no {need})")


def save_checkpoint(ckpt_root: str, step: int, write_fn, keep_last: int) -> str:
    """Call ``write_fn(tmp_dir)`` to fill a fresh folder, then publish it atomically as ``step_<step>``.

    Older complete checkpoints beyond ``keep_last`` are deleted only after the new one is in place. Any failure
    while writing (a full disk, most often) removes the partial folder and raises CheckpointWriteError.
    """
    final = os.path.join(ckpt_root, f"step_{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        write_fn(tmp)
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(str(step))
    except Exception as e:
        # A full disk surfaces as OSError, as safetensors' SafetensorError or as a RuntimeError from torch.save,
        # so every failure is reported the same way: what failed, and how much room is left.
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(_write_failure(ckpt_root, final, e)) from e
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for name in os.listdir(ckpt_root):
        if name.endswith(".tmp"):
            shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)
    for _, old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_failure(ckpt_root: str, final: str, err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    reason = f"{type(err).__name__}: {lines[0] if lines else ''}"
    try:
        free = f"{shutil.disk_usage(ckpt_root).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    return (f"run_dir: writing checkpoint {final} failed ({reason}; {free}); free disk space or set run_dir "
            "(hydra.run.dir) to a disk with room. The previous checkpoint is intact")


def load_trainer_state(path: str) -> dict:
    return torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)


def set_aside_newer(ckpt_root: str, step: int) -> list[str]:
    """Move complete checkpoints newer than ``step`` into ``ckpt_root/abandoned/``, where ``latest_checkpoint`` no
    longer sees them: after resuming from an older checkpoint they belong to a discarded future, and a later
    ``resume=auto`` must not jump back to them. Nothing is deleted. Returns the new paths."""
    moved = []
    for s, path in list_checkpoints(ckpt_root):
        if s > step:
            target = os.path.join(ckpt_root, "abandoned", os.path.basename(path))
            if os.path.exists(target):
                shutil.rmtree(target)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(path, target)
            moved.append(target)
    return moved
