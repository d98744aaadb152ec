"""One writer per run folder: a lock file that a run holds from its start (before any model loads) to its exit.

Two runs in one folder (the same ``hydra.run.dir``, or two launches that Hydra gave the same time-stamped folder)
would write one ``metrics.jsonl``, one TensorBoard folder and one ``checkpoints/`` that then belong to neither. The
main process of a run creates ``<run_dir>/.rlhf.lock`` with ``O_EXCL`` and writes who holds it: pid, host and the
process's start time. A second run finds it and stops with one line naming the folder and the holder.

A lock whose holder is gone is stale and taken over: on the same host the pid is not running, or it runs but
started at another time (the pid was reused). A lock from another host cannot be checked from here; the message
says to delete the file when that run is known to be gone. The holding process itself may take the lock again
(a second trainer object in the same process, as tests and notebooks make, one after the other).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Iterator

LOCK_NAME = ".rlhf.lock"


class RunDirBusy(RuntimeError):
    """Another live run holds the run folder's lock. The message is one line naming the folder and the holder."""


def process_start_time(pid: int) -> str | None:
    """When ``pid`` started, as an opaque string (Linux: field 22 of /proc/<pid>/stat, in clock ticks since boot);
    None where /proc is not available. Tells a live holder from a new process that got its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: split after its closing one
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def holder_state(holder: dict) -> str:
    """``"self"`` (this process), ``"live"``, ``"stale"`` (its process is gone) or ``"unknown"`` (another host)."""
    me = _me()
    if holder.get("host") != me["host"]:
        return "unknown"
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return "stale"
    if pid == me["pid"] and holder.get("start") == me["start"]:
        return "self"
    if not _pid_alive(pid):
        return "stale"
    start = holder.get("start")
    now = process_start_time(pid)
    if start is not None and now is not None and start != now:
        return "stale"  # the pid was reused by a process that started later
    return "live"


def _read(path: str) -> dict | None:
    """The holder written in a lock file; None for an unreadable or half-written one (treated as stale)."""
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


class RunLock:
    """The lock of one run folder. ``acquire`` raises RunDirBusy when a live run holds it; ``release`` removes it
    if this process still holds it. Used only on the main process."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.held = False

    def acquire(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        me = _me()
        for _ in range(3):  # a stale lock is removed and the exclusive create tried again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                state = holder_state(holder) if holder is not None else "stale"
                if state in ("live", "unknown"):
                    raise RunDirBusy(self._busy_message(holder, state)) from None
                if state == "self":
                    self._write(me)
                    self.held = True
                    return
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass  # another starting run removed it first; the exclusive create decides between us
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RunDirBusy(f"run_dir: {self.run_dir} is being claimed by another run at the same moment; "
                         "give each run its own hydra.run.dir")

    def _write(self, holder: dict) -> None:
        tmp = self.path + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(holder, f)
        os.replace(tmp, self.path)

    def _busy_message(self, holder: dict, state: str) -> str:
        who = f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('since', '?')})"
        if state == "live":
            return (f"run_dir: {self.run_dir} is in use by another run, {who}; give this run its own "
                    "hydra.run.dir, or wait for that one to finish")
        return (f"run_dir: {self.run_dir} is locked by a run on another machine, {who}; if that run is gone, delete "
                f"{self.path}, else give this run its own hydra.run.dir")

    def release(self) -> None:
        """Remove the lock if this process holds it (a run that took it over from us keeps its own)."""
        if not self.held:
            return
        self.held = False
        holder = _read(self.path)
        if holder is not None and holder_state(holder) == "self":
            try:
                os.remove(self.path)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(acc, run_dir: str) -> RunLock:
    """Take ``run_dir``'s lock on the main process of ``acc`` (an Accelerator) and share the outcome with every
    process (a collective), so that all of them stop together when another run holds it. Returns the lock (held on
    the main process only); the caller releases it when the run ends."""
    lock = RunLock(run_dir)
    failure = None
    if acc.is_main_process:
        try:
            lock.acquire()
        except RunDirBusy as e:
            failure = str(e)
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        failure = broadcast_object_list([failure], from_process=0)[0]
    if failure is not None:
        raise RunDirBusy(failure)
    return lock


@contextlib.contextmanager
def locked_run_dir(acc, run_dir: str) -> Iterator[RunLock]:
    """``lock_run_dir`` for the body, released after it however it ends."""
    lock = lock_run_dir(acc, run_dir)
    try:
        yield lock
    finally:
        lock.release()


def check_run_dir_free(argv: list[str]) -> None:
    """Before Hydra writes ``.hydra/`` and its log into an explicit ``hydra.run.dir=...`` of the command line, stop
    if a live run holds that folder (raises RunDirBusy). Only the main process of a launch checks: the others would
    see their own launch's lock."""
    if int(os.environ.get("RANK", "0")) != 0 or any(a in ("-m", "--multirun") for a in argv):
        return
    dirs = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    if not dirs:
        return
    lock = RunLock(os.path.abspath(os.path.expanduser(dirs[-1])))
    holder = _read(lock.path) if os.path.exists(lock.path) else None
    if holder is not None:
        state = holder_state(holder)
        if state in ("live", "unknown"):
            raise RunDirBusy(lock._busy_message(holder, state))
