"""Atomic checkpoints: write into ``step_<N>.tmp``, then rename to ``step_<N>``.

A folder named ``step_<N>`` is therefore always complete; half-written ``.tmp`` folders from a crash are ignored on
resume and removed by the next save. A ``COMPLETE`` marker file is written last as a second guard.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
import warnings

import torch

_STEP = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"
# Written first into ``step_<N>.tmp`` with a token unique to this save and removed just before publishing: a folder
# another run created at the same path has another token, so it is never published as this run's.
WRITER = ".writer"


class CheckpointError(ValueError):
    """A checkpoint folder that does not exist, is incomplete, or does not fit the run's config."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the one-line message names the cause. The previous checkpoint is intact."""


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


def check_checkpoint(path: str, key: str = "trainer.resume", weights: str = os.path.join("policy", "config.json")
                     ) -> None:
    """Fail with a one-line error naming ``key`` unless ``path`` is a complete checkpoint whose model is at
    ``weights`` (the policy trainer's ``policy/`` folder; a supervised stage's ``module.pt``)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{key}: checkpoint folder {path!r} does not exist")
    for need in (MARKER, "trainer_state.pt", weights):
        if not os.path.exists(os.path.join(path, need)):
            raise CheckpointError(f"{key}: checkpoint {path!r} is incomplete (no {need})")


def save_checkpoint(ckpt_root: str, step: int, write_fn, keep_last: int) -> str:
    """Call ``write_fn(tmp_dir)`` to fill a fresh folder, then publish it atomically as ``step_<step>``.

    Older complete checkpoints beyond ``keep_last`` are deleted only after the new one is in place. Any failure
    while writing, publishing or cleaning up removes the partial folder and raises CheckpointWriteError, whose one
    line names the true cause (a full disk, a folder removed or changed by another process, a permission error);
    older complete checkpoints are never touched by a failed save.
    """
    final = os.path.join(ckpt_root, f"step_{step}")
    tmp = final + ".tmp"
    previous = _latest_or_none(ckpt_root)
    shutil.rmtree(tmp, ignore_errors=True)
    stage, ours, ours_id = "write", tmp, None
    try:
        os.makedirs(tmp)
        with open(os.path.join(tmp, WRITER), "w") as f:
            f.write(f"{os.getpid()} {uuid.uuid4().hex}")
        ours_id = _folder_id(tmp)
        write_fn(tmp)
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(str(step))
        stage = "publish"
        _check_unchanged(tmp, step, ours_id)
        os.remove(os.path.join(tmp, WRITER))
        ours_id = _folder_id(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        stage, ours, ours_id = "cleanup", final, _folder_id(final)
        for name in os.listdir(ckpt_root):
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)
        for _, old in list_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    except Exception as e:
        # Look before cleaning up: whether our folder is still there, and the free space the write ran into.
        state = _folder_state(ours, ours_id)
        free_mib = _free_mib(ckpt_root)
        if stage != "cleanup":
            shutil.rmtree(tmp, ignore_errors=True)
        kind = _classify(e, state, free_mib)
        raise CheckpointWriteError(_failure_message(
            kind, e, stage=stage, final=final, ckpt_root=ckpt_root, folder=ours, free_mib=free_mib,
            tail=_tail(stage, final, previous))) from e
    except BaseException:
        if stage != "cleanup":
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


class _FolderChanged(Exception):
    """Raised before publishing when the ``.tmp`` folder is not the one this run wrote."""


_EDQUOT = getattr(errno, "EDQUOT", None)
_DENIED = {errno.EACCES, errno.EPERM}
_CHANGED = {errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR}
_TYPE_ERRNO = {FileNotFoundError: errno.ENOENT, PermissionError: errno.EACCES, FileExistsError: errno.EEXIST,
               IsADirectoryError: errno.EISDIR, NotADirectoryError: errno.ENOTDIR}
# How an errno survives in messages of exceptions that lost it: Rust's io::Error (safetensors' SafetensorError shows
# ``IoError(Os { code: 28, kind: StorageFull, ... })`` or ``... (os error 28)``) and Python's ``[Errno 28]``.
_ERRNO_IN_TEXT = re.compile(r"\bOs \{ code: (\d+)|\bos error (\d+)|\[Errno (\d+)\]")
_STRERROR = {os.strerror(c): c for c in (errno.ENOSPC, _EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                                          errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR)
             if c is not None}
# An errno-less failure (torch.save: "PytorchStreamWriter failed writing file ...: file write failed") counts as a
# full disk only when the disk really is (nearly) full.
TINY_FREE_MIB = 64


def _exception_chain(err: BaseException) -> list[BaseException]:
    """``err`` followed by its causes and contexts (``__cause__``, ``__context__``), each exception once."""
    chain: list[BaseException] = []
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is seen for seen in chain):
            continue
        chain.append(e)
        todo += [e.__cause__, e.__context__]
    return chain


def errno_in_text(text: str) -> int | None:
    """The errno a message mentions (``Os { code: 28``, ``os error 28``, ``[Errno 28]`` or an errno's own text such
    as "No space left on device"), or None."""
    m = _ERRNO_IN_TEXT.search(text)
    if m:
        return int(next(g for g in m.groups() if g is not None))
    for strerror, code in _STRERROR.items():
        if strerror in text:
            return code
    return None


def error_errno(err: BaseException) -> int | None:
    """The errno behind ``err``: the first one found along its exception chain, from an OSError's ``errno``, its
    type (FileNotFoundError, PermissionError, ...) or its message. None when no exception in the chain has one."""
    for e in _exception_chain(err):
        if isinstance(e, OSError):
            if isinstance(e.errno, int):
                return e.errno
            for kind, code in _TYPE_ERRNO.items():
                if isinstance(e, kind):
                    return code
        code = errno_in_text(str(e))
        if code is not None:
            return code
    return None


def _classify(err: BaseException, state: str, free_mib: float | None) -> str:
    """What made a save fail: "full", "quota", "readonly", "denied", "changed", "vanished" or "other".

    ``state`` is what became of the folder this save owns (see ``_folder_state``); it decides errno-less failures and
    beats errnos that merely follow from it (a write into a removed folder fails with ENOENT or a RuntimeError).
    """
    code = error_errno(err)
    if code == errno.ENOSPC:
        return "full"
    if code is not None and code == _EDQUOT:
        return "quota"
    if code == errno.EROFS:
        return "readonly"
    if code in _DENIED:
        return "denied"
    if state == "replaced":
        return "changed"
    if state == "gone" or (state == "absent" and code == errno.ENOENT):
        return "vanished"
    if isinstance(err, _FolderChanged) or code in _CHANGED:
        return "changed"
    if code is None and free_mib is not None and free_mib < TINY_FREE_MIB:
        return "full"
    return "other"


def _failure_message(kind: str, err: BaseException, *, stage: str, final: str, ckpt_root: str, folder: str,
                     free_mib: float | None, tail: str) -> str:
    """The one-line error for a failed save: ``run_dir: `` first, then what failed, the cause ``kind`` (from
    ``_classify``) names with its fix, and ``tail`` (what is left intact)."""
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else ""
    reason = first if isinstance(err, _FolderChanged) else f"{type(err).__name__}: {first}"
    what = (f"removing old checkpoints from {ckpt_root} after saving {final}" if stage == "cleanup"
            else f"writing checkpoint {final}")
    free = "free space unknown" if free_mib is None else f"{free_mib:.0f} MiB free there"
    if kind == "full":
        msg = (f"{what} failed ({reason}; {free}): the disk is full; free disk space or set run_dir "
               "(hydra.run.dir) to a disk with room.")
    elif kind == "quota":
        msg = (f"{what} failed ({reason}; {free}): the disk quota is exceeded; free disk space, raise the quota or "
               "set run_dir (hydra.run.dir) to a disk with room.")
    elif kind in ("denied", "readonly"):
        where = _denied_folder(err, final + ".tmp", ckpt_root)
        if kind == "readonly":
            msg = (f"{what} failed: {where} is on a read-only file system ({reason}); remount it writable or set "
                   "run_dir (hydra.run.dir) to a writable disk.")
        else:
            msg = (f"{what} failed: permission denied for folder {where} ({reason}); fix its permissions or set "
                   "run_dir (hydra.run.dir) to a folder this user can write.")
    elif kind == "vanished":
        msg = (f"{_missing_top(folder)} disappeared while it was being written (removed by another process, or "
               f"run_dir was deleted?): {what} failed ({reason}); is another run using this run_dir?")
    elif kind == "changed":
        # A publish that collides (os.replace: ENOTEMPTY, EEXIST) is about step_<N>; anything else about our folder.
        changed = final if stage == "publish" and not isinstance(err, _FolderChanged) else folder
        msg = (f"checkpoint folder {changed} was changed by another process while this run wrote it ({reason}); "
               "two runs may share run_dir: give each its own run_dir (hydra.run.dir).")
    else:
        msg = f"{what} failed ({reason})."
    return f"run_dir: {msg} {tail}" if tail else f"run_dir: {msg}"


def _tail(stage: str, final: str, previous: str | None) -> str:
    """What a failed save leaves intact, said only where it is true: the checkpoint just published (a failed cleanup),
    else the newest complete checkpoint from before the save (nothing when there was none)."""
    if stage == "cleanup":
        return f"Checkpoint {final} was saved" if os.path.isfile(os.path.join(final, MARKER)) else ""
    if previous is None or previous == final:
        return ""
    if os.path.isfile(os.path.join(previous, MARKER)):
        return "The previous checkpoint is intact"
    return f"The previous checkpoint {previous} is gone too"


def _latest_or_none(ckpt_root: str) -> str | None:
    """``latest_checkpoint``, or None when ``ckpt_root`` cannot be read (the save then reports why)."""
    try:
        return latest_checkpoint(ckpt_root)
    except OSError:
        return None


def _folder_id(path: str) -> tuple | None:
    """Identity of the folder at ``path``: its device, inode and WRITER token (None if it holds none). A folder
    another process creates at the same path differs in its token even where the filesystem reuses the inode.
    None when there is no folder."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    try:
        with open(os.path.join(path, WRITER)) as f:
            token = f.read()
    except OSError:
        token = None
    return st.st_dev, st.st_ino, token


def _folder_state(path: str, created: tuple | None) -> str:
    """What became of the folder this save created at ``path`` (``created`` is its ``_folder_id``, None when it
    was never created): "ours", "gone", "replaced" (a different folder now), "absent" or "present" (never created)."""
    now = _folder_id(path)
    if created is None:
        return "absent" if now is None else "present"
    if now is None:
        return "gone"
    return "ours" if now == created else "replaced"


def _check_unchanged(tmp: str, step: int, created: tuple | None) -> None:
    """Raise _FolderChanged unless ``tmp`` is still the folder this save created, holding its COMPLETE marker."""
    if _folder_id(tmp) != created:
        raise _FolderChanged(f"{tmp} is no longer the folder this run created")
    try:
        with open(os.path.join(tmp, MARKER)) as f:
            marker = f.read()
    except OSError:
        marker = None
    if marker != str(step):
        raise _FolderChanged(f"its {MARKER} marker is gone or no longer reads {step}")


def _missing_top(path: str) -> str:
    """The outermost missing folder on the way to ``path`` (the run_dir itself when it was deleted)."""
    while True:
        parent = os.path.dirname(path)
        if not parent or parent == path or os.path.exists(parent):
            return path
        path = parent


def _denied_folder(err: BaseException, tmp: str, ckpt_root: str) -> str:
    """The folder a permission error is about: the one named by the error (a missing target's parent), with this
    save's own scratch folder ``tmp`` (removed on failure) standing for ``ckpt_root``."""
    folder = ckpt_root
    for e in _exception_chain(err):
        if isinstance(e, OSError) and e.filename:
            name = os.fsdecode(e.filename)
            folder = name if os.path.isdir(name) else os.path.dirname(name)
            break
    if folder == tmp or folder.startswith(tmp + os.sep):
        return ckpt_root
    return folder


def _free_mib(path: str) -> float | None:
    """Free space in MiB on the disk holding ``path`` (or its nearest existing parent); None if unknown."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free / 2**20
    except OSError:
        return None


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


def resolve_resume(resume: str | None, ckpt_root: str, backend, **check) -> str | None:
    """The checkpoint every process resumes from (``backend``: rlhf.runtime.backend.DistributedBackend), the same on all of them (any world size may resume it): None,
    ``auto`` (the main process's newest complete checkpoint under ``ckpt_root``) or a checkpoint folder. ``check``:
    keywords of ``check_checkpoint`` (a supervised stage's checkpoint holds its weights elsewhere)."""
    if resume is None:
        return None
    if resume == "auto":
        # The main process's choice: another machine's copy of run_dir may hold an older checkpoint, or none.
        resume = backend.from_main(latest_checkpoint(ckpt_root))
        if resume is None:
            warnings.warn(f"trainer.resume=auto: no complete checkpoint under {ckpt_root}; starting at step 0",
                          stacklevel=3)
            return None
    try:
        check_checkpoint(resume, **check)
    except CheckpointError as e:
        if backend.is_main:
            raise
        raise CheckpointError(f"{e} on process {backend.process_index}; every machine must see run_dir "
                              "(a shared filesystem)") from None
    return resume
