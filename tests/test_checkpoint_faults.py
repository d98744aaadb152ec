"""Checkpoint write faults: each failure gets a one-line error naming its true cause, and a failed save leaves no
``.tmp`` folder and never damages the previous complete checkpoint.

The faults are injected through ``save_checkpoint``'s ``write_fn`` (or by patching the publish step), so no model is
trained. A full disk is the only cause whose message says "free disk space".
"""

import errno
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

import rlhf.runtime.checkpoint as checkpoint
from rlhf.runtime.checkpoint import (
    CheckpointWriteError,
    check_checkpoint,
    error_errno,
    latest_checkpoint,
    save_checkpoint,
)

Usage = namedtuple("Usage", "total used free")
INTACT = "The previous checkpoint is intact"


def _write(folder):
    """A complete (tiny) checkpoint's files."""
    Path(folder, "policy").mkdir()
    Path(folder, "policy", "config.json").write_text("{}")
    Path(folder, "trainer_state.pt").write_text("x")


def _failing(error):
    """A write_fn that writes part of a checkpoint, then raises ``error``."""
    def write(folder):
        Path(folder, "policy").mkdir()
        raise error
    return write


@pytest.fixture
def root(tmp_path):
    """A checkpoint root that already holds a complete step_1."""
    root = tmp_path / "checkpoints"
    save_checkpoint(str(root), 1, _write, keep_last=3)
    return root


def _fail(root, write_fn, step=2) -> str:
    """Save ``step`` with ``write_fn``, expect CheckpointWriteError, and return its message."""
    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint(str(root), step, write_fn, keep_last=3)
    msg = str(e.value)
    assert msg.startswith("run_dir: ") and "\n" not in msg, msg
    return msg


def _assert_previous_intact(root, msg):
    """No step_2 or step_2.tmp is left, step_1 is untouched and still the latest, and the message says so."""
    assert sorted(os.listdir(root)) == ["step_1"]
    assert latest_checkpoint(str(root)) == str(root / "step_1")
    check_checkpoint(str(root / "step_1"))
    assert msg.endswith(INTACT), msg


def _plenty(path):
    return Usage(2**40, 0, 2**40)


def _tiny(path):
    return Usage(2**40, 2**40 - 2**20, 2**20)  # 1 MiB free


SAFETENSORS_FULL = ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
                    'device" })')


def _chained_enospc():
    """A wrapper without errno raised ``from`` an OSError(ENOSPC)."""
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError as e:
        try:
            raise RuntimeError("saving policy failed") from e
        except RuntimeError as wrapped:
            return wrapped


FULL = "the disk is full; free disk space or set run_dir"


@pytest.mark.parametrize("error, cause", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), FULL),
    (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), "the disk quota is exceeded; free disk space, raise the quota"),
    # safetensors' SafetensorError is no OSError; only its text carries the errno
    (RuntimeError(SAFETENSORS_FULL), FULL),
    # an errno lost by a wrapper is found along the exception chain
    (_chained_enospc(), FULL),
], ids=["ENOSPC", "EDQUOT", "safetensors-code-28", "chained"])
def test_full_disk_says_free_disk_space(error, cause, root):
    msg = _fail(root, _failing(error))
    assert msg.startswith(f"run_dir: writing checkpoint {root / 'step_2'} failed (")
    assert cause in msg and "MiB free there" in msg and "(hydra.run.dir) to a disk with room" in msg
    _assert_previous_intact(root, msg)


def test_errno_is_found_in_messages_and_along_the_chain():
    """The errno classification sees through wrappers: attributes, types, Rust and Python message formats."""
    inner = OSError(errno.EDQUOT, "quota")
    outer = RuntimeError("wrapped")
    outer.__context__ = inner
    assert error_errno(outer) == errno.EDQUOT
    assert error_errno(FileNotFoundError("gone")) == errno.ENOENT
    assert error_errno(RuntimeError(SAFETENSORS_FULL)) == errno.ENOSPC
    assert error_errno(RuntimeError("I/O error: Read-only file system (os error 30)")) == errno.EROFS
    assert error_errno(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")) is None


def test_torch_write_failure_without_errno_is_not_called_a_full_disk(root, monkeypatch):
    """torch.save's errno-less RuntimeError, with plenty of room: the original reason, no disk-full claim."""
    monkeypatch.setattr(shutil, "disk_usage", _plenty)
    error = RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file "
                         "data/0: file write failed")
    msg = _fail(root, _failing(error))
    assert msg.startswith(f"run_dir: writing checkpoint {root / 'step_2'} failed (RuntimeError: [enforce fail")
    assert "file write failed" in msg
    assert "free disk space" not in msg and "disk is full" not in msg and "another process" not in msg
    _assert_previous_intact(root, msg)


def test_torch_write_failure_without_errno_on_a_nearly_full_disk_is_a_full_disk(root, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", _tiny)
    msg = _fail(root, _failing(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")))
    assert "1 MiB free there): the disk is full; free disk space or set run_dir" in msg
    _assert_previous_intact(root, msg)


def test_folder_removed_by_another_process_is_not_called_a_full_disk(root):
    """Another process deletes step_2.tmp mid-write (a real rmtree): the next file write fails with ENOENT."""
    def write(folder):
        _write(folder)
        shutil.rmtree(folder)
        Path(folder, "trainer_state.pt").write_text("x")

    msg = _fail(root, write)
    assert msg.startswith(f"run_dir: {root / 'step_2.tmp'} disappeared while it was being written (removed by "
                          "another process, or run_dir was deleted?)")
    assert "is another run using this run_dir?" in msg and "FileNotFoundError" in msg
    assert "free disk space" not in msg
    _assert_previous_intact(root, msg)


def test_folder_removed_after_write_fn_returned_is_reported_too(root):
    """write_fn finishes, but the folder is gone before the COMPLETE marker is written."""
    msg = _fail(root, lambda folder: shutil.rmtree(folder))
    assert f"{root / 'step_2.tmp'} disappeared while it was being written" in msg and "free disk space" not in msg
    _assert_previous_intact(root, msg)


def test_deleted_run_dir_is_named_and_the_lost_checkpoint_is_not_called_intact(root):
    """The whole checkpoint root is deleted mid-write: the message names it and does not claim step_1 survived."""
    def write(folder):
        shutil.rmtree(root)
        Path(folder, "trainer_state.pt").write_text("x")

    msg = _fail(root, write)
    assert msg.startswith(f"run_dir: {root} disappeared while it was being written")
    assert msg.endswith(f"The previous checkpoint {root / 'step_1'} is gone too")
    assert INTACT not in msg and "free disk space" not in msg


def test_folder_recreated_by_another_run_is_changed_by_another_process(root):
    """A second run saving the same step removes and recreates step_2.tmp: publishing its folder would mix runs."""
    def write(folder):
        _write(folder)
        shutil.rmtree(folder)
        os.makedirs(folder)  # the other run's fresh folder
        _write(folder)

    msg = _fail(root, write)
    assert msg.startswith(f"run_dir: checkpoint folder {root / 'step_2.tmp'} was changed by another process while "
                          "this run wrote it (")
    assert "two runs may share run_dir" in msg and "free disk space" not in msg
    _assert_previous_intact(root, msg)


def test_missing_file_elsewhere_is_not_called_a_vanished_folder(root):
    """FileNotFoundError for a file outside the checkpoint (e.g. a tokenizer file in a cache): no cause claim."""
    error = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/cache/tokenizer.json")
    msg = _fail(root, _failing(error))
    assert msg.startswith(f"run_dir: writing checkpoint {root / 'step_2'} failed (FileNotFoundError: [Errno 2] No "
                          "such file or directory: '/cache/tokenizer.json').")
    assert "free disk space" not in msg and "disappeared" not in msg and "another process" not in msg
    _assert_previous_intact(root, msg)


@pytest.mark.parametrize("error", [
    PermissionError(errno.EACCES, os.strerror(errno.EACCES)),
    OSError(errno.EPERM, os.strerror(errno.EPERM)),
], ids=["EACCES", "EPERM"])
def test_permission_error_names_the_folder_and_the_fix(error, root):
    msg = _fail(root, _failing(error))
    assert msg.startswith(f"run_dir: writing checkpoint {root / 'step_2'} failed: permission denied for folder "
                          f"{root} (")
    assert "fix its permissions or set run_dir (hydra.run.dir) to a folder this user can write" in msg
    assert "free disk space" not in msg
    _assert_previous_intact(root, msg)


def test_permission_error_on_another_folder_names_that_folder(root, tmp_path):
    other = tmp_path / "cache" / "vocab.json"
    msg = _fail(root, _failing(PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(other))))
    assert f"permission denied for folder {other.parent} (" in msg and "free disk space" not in msg
    _assert_previous_intact(root, msg)


def test_read_only_file_system_says_so(root):
    msg = _fail(root, _failing(RuntimeError("I/O error: Read-only file system (os error 30)")))
    assert f"failed: {root} is on a read-only file system (" in msg and "remount it writable" in msg
    assert "free disk space" not in msg
    _assert_previous_intact(root, msg)


def test_other_failure_names_the_reason_without_a_cause_claim(root, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", _plenty)
    msg = _fail(root, _failing(ValueError("tensor is not contiguous\nsecond line")))
    assert msg == (f"run_dir: writing checkpoint {root / 'step_2'} failed (ValueError: tensor is not contiguous). "
                   f"{INTACT}")
    _assert_previous_intact(root, msg)


def test_publish_collision_is_changed_by_another_process(root, monkeypatch):
    """os.replace(step_2.tmp, step_2) fails because another run published step_2 first: a classified one-liner,
    not a traceback, and no step_2.tmp left behind."""
    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), str(src), None, str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    msg = _fail(root, _write)
    assert msg.startswith(f"run_dir: checkpoint folder {root / 'step_2'} was changed by another process while this "
                          "run wrote it (OSError: [Errno 39] Directory not empty")
    assert "two runs may share run_dir" in msg and "free disk space" not in msg
    _assert_previous_intact(root, msg)


def test_publish_on_a_full_disk_is_a_full_disk(root, monkeypatch):
    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    msg = _fail(root, _write)
    assert "the disk is full; free disk space" in msg
    _assert_previous_intact(root, msg)


def test_publish_failing_otherwise_names_the_reason_only(root, monkeypatch):
    def replace(src, dst):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    monkeypatch.setattr(shutil, "disk_usage", _plenty)
    msg = _fail(root, _write)
    monkeypatch.undo()
    assert msg == (f"run_dir: writing checkpoint {root / 'step_2'} failed (OSError: [Errno 5] Input/output error). "
                   f"{INTACT}")
    _assert_previous_intact(root, msg)


def test_cleanup_failure_after_publishing_says_the_new_checkpoint_was_saved(root, monkeypatch):
    """Listing the root after publishing fails (permissions changed meanwhile): classified, and truthful that the
    new checkpoint is in place."""
    real_replace, real_listdir = os.replace, os.listdir
    published = []

    def replace(src, dst):
        real_replace(src, dst)
        published.append(dst)

    def listdir(path):
        if published and os.path.samefile(path, root):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_listdir(path)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    monkeypatch.setattr(checkpoint.os, "listdir", listdir)
    msg = _fail(root, _write)
    monkeypatch.undo()
    assert msg.startswith(f"run_dir: removing old checkpoints from {root} after saving {root / 'step_2'} failed: "
                          f"permission denied for folder {root} (")
    assert msg.endswith(f"Checkpoint {root / 'step_2'} was saved") and "free disk space" not in msg
    assert latest_checkpoint(str(root)) == str(root / "step_2")
    check_checkpoint(str(root / "step_1"))


def test_first_save_failing_claims_no_previous_checkpoint(tmp_path):
    msg = _fail(tmp_path / "checkpoints", _failing(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    assert "the disk is full" in msg and INTACT not in msg
    assert os.listdir(tmp_path / "checkpoints") == []


def test_interrupt_while_writing_removes_the_tmp_folder(root):
    """A KeyboardInterrupt is re-raised as is, but the partial folder does not stay behind."""
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(root), 2, _failing(KeyboardInterrupt()), keep_last=3)
    assert sorted(os.listdir(root)) == ["step_1"]
    assert latest_checkpoint(str(root)) == str(root / "step_1")
