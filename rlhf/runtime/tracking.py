"""Metrics sinks: ``metrics.jsonl`` (what sweeps and reports read), TensorBoard and, optionally, W&B.

Only the main process writes. On resume the JSONL files are cut back to the resumed step and TensorBoard is told
to hide the events at and after it (``purge_step``), so a resumed run reads as if it had never stopped.
"""

from __future__ import annotations

import json
import math
import os
import warnings


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _step_of(line: str) -> int | None:
    """The step of one JSONL line, or None for a line a killed process left half-written."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop lines with ``step > last_step`` (written after the checkpoint we resume from), and any line cut short
    by a crash in the middle of a write."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = []
        for line in f:
            step = _step_of(line)
            if step is not None and step <= last_step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class MetricsLogger:
    def __init__(self, run_dir: str, *, enabled: bool, tensorboard: bool, wandb: bool, wandb_project: str,
                 config: dict | None = None, purge_step: int | None = None):
        """purge_step: the first step a resumed run logs again; TensorBoard drops the killed run's events from it
        on (the event files stay, so nothing is lost from disk)."""
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.samples_path = os.path.join(run_dir, "samples.jsonl")
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge_step)
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise ImportError("logging.wandb=true needs the wandb package: pip install 'rlhf[wandb]'") from None
            self.wandb = wb.init(project=wandb_project, config=config, dir=run_dir)

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in metrics.items()}) + "\n")
        step = metrics["step"]
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        if not self.enabled:
            return
        with open(self.samples_path, "a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")
        if self.tb is not None:
            table = "| prompt | completion | score |\n|---|---|---|\n" + "\n".join(
                f"| {r['prompt']} | {r['completion']} | {r['score']:.3f} |" for r in rows)
            self.tb.add_text("samples", table, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def open_logger(cfg, run_dir: str, is_main: bool, start_step: int, ckpt_root: str) -> MetricsLogger:
    """metrics.jsonl / TensorBoard / W&B on the main process. On resume, what a killed run logged past its checkpoint
    is dropped (also with resume=auto and no checkpoint yet), TensorBoard hides it, and newer checkpoints are set
    aside (rlhf.runtime.checkpoint.set_aside_newer)."""
    from omegaconf import OmegaConf

    from rlhf.runtime.checkpoint import set_aside_newer

    resumed = cfg.trainer.resume is not None
    logger = MetricsLogger(run_dir, enabled=is_main, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                           wandb_project=cfg.logging.wandb_project, config=OmegaConf.to_container(cfg, resolve=True),
                           purge_step=start_step if resumed else None)
    if is_main and resumed:
        truncate_metrics(logger.path, start_step - 1)
        truncate_metrics(logger.samples_path, start_step - 1)
        for path in set_aside_newer(ckpt_root, start_step):
            warnings.warn(f"trainer.resume: newer checkpoint moved to {path} (this run continues from step "
                          f"{start_step})", stacklevel=4)
    return logger
