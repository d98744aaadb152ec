"""What every training stage sets up the same way: the Accelerator from a ``trainer`` config."""

from __future__ import annotations

from datetime import timedelta

from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from omegaconf import DictConfig


def make_accelerator(t: DictConfig) -> Accelerator:
    """The Accelerator of a stage from its ``trainer`` config (``cpu``, ``mixed_precision``, ``dist_timeout_s``).

    ``dist_timeout_s`` bounds how long a process waits in a collective, so a stuck rank fails the job instead of
    hanging it.
    """
    return Accelerator(cpu=t.cpu, mixed_precision=t.mixed_precision,
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=t.dist_timeout_s))])
