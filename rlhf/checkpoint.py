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
    """A checkpoint folder that does not exist or is incomplete."""


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

    Older complete checkpoints beyond ``keep_last`` are deleted only after the new one is in place.
    """
    os.makedirs(ckpt_root, exist_ok=True)
    final = os.path.join(ckpt_root, f"step_{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write_fn(tmp)
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(str(step))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"writing checkpoint {final} failed ({e.strerror or e}); free disk space or set run_dir "
                      "to a folder with room") from e
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for name in os.listdir(ckpt_root):
        if name.endswith(".tmp"):
            shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)
    for _, old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: str) -> dict:
    return torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
