"""SIGINT and SIGTERM ask a run to stop after its current step (with a checkpoint); a second signal stops it at once.

``StopSignals`` is installed for the duration of ``train()``. Its handler records the signal and puts the previous
handler back, so the same signal again acts at once: a stuck step can still be stopped. ``requested`` is the signal
this process received, if any; the trainer combines it over processes (a stop on any process stops all of them
after the same step, so the checkpoint is collective).
"""

from __future__ import annotations

import signal
import sys

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    def __init__(self):
        self.requested: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        self.requested = signum
        signal.signal(signum, self._old.get(signum) or signal.SIG_DFL)
        print(f"{signal.Signals(signum).name}: stopping after this step and writing a checkpoint (send it again "
              "to stop at once, without one)", file=sys.stderr, flush=True)

    def install(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler or signal.SIG_DFL)
        self._old = {}
