"""Errors a user can act on. Scripts print their one-line message and exit with status 2, with no traceback.

A run stopped by SIGINT or SIGTERM writes its checkpoint, prints one line and exits with 128 + the signal number
(130, 143), as a shell does for a process the signal ended, so schedulers still see it did not finish.
"""

from __future__ import annotations

import functools
import os
import re
import sys


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite updates, non-finite weights, out of memory, ...). The message says
    what to change."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after a step; its checkpoint is written. ``signum`` is the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def user_errors() -> tuple[type[BaseException], ...]:
    from rlhf.config import ConfigError
    from rlhf.models import ModelSpecError
    from rlhf.rewards.functions import RewardFunctionError
    from rlhf.runtime.accelerator import BackendMismatch
    from rlhf.runtime.checkpoint import CheckpointError, CheckpointWriteError
    from rlhf.runtime.runlock import RunDirBusy

    errors: list[type[BaseException]] = [BackendMismatch, ConfigError, CheckpointError, CheckpointWriteError,
                                         ModelSpecError, RewardFunctionError, RunDirBusy, TrainingError]
    try:
        from rlhf.data import DataError

        errors.append(DataError)
    except ImportError:
        pass
    return tuple(errors)


def _interrupted() -> tuple[type[BaseException], ...]:
    return (TrainingInterrupted,)


def exit_on_user_error(fn):
    """Decorator for script entry points: a user error becomes ``error: <message>`` on stderr and exit code 2.
    A finished run destroys its process group (rlhf.runtime.accelerator.shutdown_distributed) before returning."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from rlhf.runtime.accelerator import shutdown_distributed

        try:
            result = fn(*args, **kwargs)
            shutdown_distributed()  # only after success: a failing rank exits and the launcher ends the rest
            return result
        except _interrupted() as e:
            print(f"interrupted: {e}", file=sys.stderr, flush=True)
            sys.exit(128 + e.signum)
        except user_errors() as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper


def one_line_hydra_errors(entry):
    """Wrap a ``@hydra.main`` entry point so that a bad command-line override (unknown key without ``+``, unknown
    config-group option, unparsable value) is one ``error: <key>: <problem>`` line and exit code 2, like every
    other user error, instead of Hydra's multi-line report and exit code 1.

    Hydra prints that report itself unless HYDRA_FULL_ERROR=1, in which case it raises; the wrapper sets it for the
    call and catches the composition errors. Anyone who set HYDRA_FULL_ERROR=1 still gets Hydra's traceback.
    Before Hydra writes into an explicit ``hydra.run.dir``, a folder that another live run holds stops the command
    (rlhf.runtime.runlock.check_run_dir_free). Usage: ``one_line_hydra_errors(main)()`` under ``if __name__ == "__main__":``.
    """

    @functools.wraps(entry)
    def wrapper(*args, **kwargs):
        from hydra.errors import ConfigCompositionException, OverrideParseException

        from rlhf.runtime.runlock import RunDirBusy, check_run_dir_free

        sys.argv[1:] = expand_home(sys.argv[1:])
        try:
            check_run_dir_free(sys.argv[1:])
        except RunDirBusy as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

        user_wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            return entry(*args, **kwargs)
        except (ConfigCompositionException, OverrideParseException) as e:
            if user_wants_traceback:
                raise
            print(f"error: {hydra_error_message(e)}", file=sys.stderr, flush=True)
            sys.exit(2)
        finally:
            if not user_wants_traceback:
                os.environ.pop("HYDRA_FULL_ERROR", None)

    return wrapper


_HOME_VALUE = re.compile(r"(?<=[=,])~(?=/|,|$)")


def expand_home(overrides: list[str]) -> list[str]:
    """``key=~/path`` -> ``key=<home>/path`` (also each ``~/`` item of a ``key=a,~/b`` sweep). The shell leaves a
    tilde after ``=`` alone in a command argument, and Hydra's override grammar cannot parse one, so
    ``model.policy=~/.cache/rlhf/smollm2`` would stop with a lexer error. A leading ``~key`` (Hydra's delete) and
    anything else are left as they are."""
    home = os.path.expanduser("~")
    out = []
    for arg in overrides:
        key, eq, value = arg.partition("=")
        if eq and not key.startswith(("-", "~")):
            arg = key + _HOME_VALUE.sub(lambda _: home, eq + value)
        out.append(arg)
    return out


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def hydra_error_message(e: BaseException) -> str:
    """One ``<key>: <problem>`` line for a Hydra composition or override-parsing error."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in e.missing_cfg_file:
        group, _, name = e.missing_cfg_file.rpartition("/")
        valid = f"; valid: {', '.join(e.options)}" if e.options else ""
        return f"{group}: unknown option {name!r}{valid}"
    if isinstance(e, OverrideParseException):
        return f"{e.override}: cannot parse this override ({_first_line(e.message)})"
    key = getattr(e.__cause__, "full_key", None)
    if key:
        problem = _first_line(str(e.__cause__))
        return f"{key}: {'unknown key' if 'not in struct' in problem else problem}"
    return _first_line(str(e))
