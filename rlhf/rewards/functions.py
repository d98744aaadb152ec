"""Calling a user's reward function: a time limit, and one-line errors for everything it can return wrong."""

from __future__ import annotations

import contextvars
import math
import threading
from collections.abc import Callable

import torch


class RewardFunctionError(ValueError):
    """A reward function raised or returned something unusable. The message names the function."""

def _call_with_timeout(fn: Callable, args: tuple, timeout_s: float):
    """``fn(*args)`` in a daemon thread, waited for at most ``timeout_s`` seconds.

    Returns ``(finished, result)``; an exception ``fn`` raised is re-raised here, in the caller's thread. A daemon
    thread (not a ThreadPoolExecutor, whose workers are joined at exit) lets the process exit while a call that
    never returns is still running. The caller's thread-local torch state (grad and inference mode, the current CUDA
    device) and its context variables are carried into the thread, so the function runs as it would directly.
    """
    box: list = []  # [("ok", result)] or [("err", exception)], set by the thread before it ends
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    ctx = contextvars.copy_context()

    def target():
        try:
            if device is not None:
                torch.cuda.set_device(device)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                box.append(("ok", ctx.run(fn, *args)))
        except BaseException as e:  # handed to the caller, which re-raises it
            box.append(("err", e))

    thread = threading.Thread(target=target, name=f"reward:{getattr(fn, '__name__', 'fn')}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not box:
        return False, None
    kind, value = box[0]
    if kind == "err":
        try:
            raise value
        finally:
            del value, box  # no reference cycle through the traceback
    return True, value

def call_reward_function(fn: Callable, name: str, prompts: list[str], completions: list[str],
                         timeout_s: float | None = None, key: str = "reward.function") -> torch.Tensor:
    """Run ``fn(prompts, completions)`` and check what it returns: ``(N,)`` float32 tensor.

    Any failure (it raised; wrong length; not numbers; NaN or inf) is a RewardFunctionError naming ``name``.
    With ``timeout_s`` (seconds), a call that has not returned by then is a RewardFunctionError too, starting with
    the config ``key`` that named the function (``reward.function`` or ``reward.gold``); the call is left running
    in a daemon thread, which does not keep the process alive. ``timeout_s=None`` calls ``fn`` directly.
    """
    finished = True
    try:
        if timeout_s is None:
            out = fn(prompts, completions)
        else:
            finished, out = _call_with_timeout(fn, (prompts, completions), timeout_s)
    except Exception as e:
        raise RewardFunctionError(f"reward function {name} raised {type(e).__name__}: {e}") from e
    if not finished:
        raise RewardFunctionError(f"{key}: reward function {name} did not return within reward.timeout_s="
                                  f"{timeout_s:g} s (it may hang); fix it or raise reward.timeout_s")
    if isinstance(out, torch.Tensor):
        out = out.detach().float().cpu().reshape(-1).tolist()
    if not isinstance(out, (list, tuple)):
        raise RewardFunctionError(f"reward function {name} returned {type(out).__name__}; expected a list of floats")
    if len(out) != len(completions):
        raise RewardFunctionError(f"reward function {name} returned {len(out)} scores for {len(completions)} "
                                  "completions")
    bad_type = [type(x).__name__ for x in out if isinstance(x, bool) or not isinstance(x, (int, float))]
    if bad_type:
        raise RewardFunctionError(f"reward function {name} returned a {bad_type[0]}; expected floats")
    bad = [i for i, x in enumerate(out) if not math.isfinite(x)]
    if bad:
        raise RewardFunctionError(f"reward function {name} returned a non-finite score ({out[bad[0]]}) for "
                                  f"completion {bad[0]}")
    return torch.tensor(out, dtype=torch.float32)
