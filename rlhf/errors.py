"""Errors a user can act on. Scripts print their one-line message and exit with status 2, with no traceback."""

from __future__ import annotations

import functools
import sys


def user_errors() -> tuple[type[BaseException], ...]:
    from rlhf.checkpoint import CheckpointError
    from rlhf.config import ConfigError
    from rlhf.models import ModelSpecError
    from rlhf.rollout import RewardFunctionError
    from rlhf.trainer import TrainingError

    errors: list[type[BaseException]] = [ConfigError, CheckpointError, ModelSpecError, RewardFunctionError,
                                         TrainingError]
    try:
        from rlhf.data import DataError

        errors.append(DataError)
    except ImportError:
        pass
    return tuple(errors)


def exit_on_user_error(fn):
    """Decorator for script entry points: a user error becomes ``error: <message>`` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except user_errors() as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        except ValueError as e:
            # Validation inside the trainer raises ValueError("<key>: ..."): still one line, still the user's to fix.
            msg = str(e)
            if ":" in msg.split(" ", 1)[0]:
                print(f"error: {msg}", file=sys.stderr, flush=True)
                sys.exit(2)
            raise

    return wrapper
