"""Supervised fine-tuning (SFT), the first RLHF stage: next-token cross-entropy on demonstrations.

One SFT run, as data:

    rows (prompt, completion) -> tokenize_sft    input_ids, attention_mask, loss_mask (rows, seq_len), right-padded
    a step's batch            -> batch_indices   a seeded permutation per pass over the rows; this process's slice
    loss                      -> lm_loss         mean -log p(x_t | x_<t) over the loss_mask tokens (the completion
                                                 only, or every token)
    update                    -> AdamW, clipped gradient norm, warmup + decay schedule
    evaluate                  -> token-weighted loss and perplexity on the held-out split
    save                      -> <run_dir>/final: save_pretrained + tokenizer, loadable by AutoModelForCausalLM
                                 (with model.lora: the adapters merged in, and <run_dir>/adapter the adapters alone)

``fit`` is the loop. The reward and DPO trainers (``rlhf.trainers.reward``, ``rlhf.trainers.dpo``) run the same loop
with their own loss and evaluation, so the stages share batching, optimisation, logging, checkpoints and saving.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable

import datasets
import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import get_scheduler

from rlhf.core.losses import lm_loss, perplexity
from rlhf.models import checkpoint_activations
from rlhf.runtime.accelerator import make_accelerator
from rlhf.runtime.backend import DistributedBackend, all_finite
from rlhf.runtime.errors import TrainingError
from rlhf.runtime.runlock import locked_run_dir

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
BatchLoss = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
Evaluate = Callable[[nn.Module], dict[str, float]]

UNITS = "units"
"""Stat key of a batch loss that is a mean over a number of units (tokens) that differs between processes: a ``()``
tensor holding this process's count. ``fit`` then weighs each process's loss by its share of the global count, so
that the gradient DDP averages, and the logged means, are those of the mean over all processes' units."""

FINAL_DIR = "final"
"""Sub-folder of the run folder that holds the trained model and its tokenizer."""

ADAPTER_DIR = "adapter"
"""Sub-folder that holds a LoRA run's adapters and tokenizer (rlhf.lora's adapter folder); final/ holds them merged."""

CKPT_DIR = "checkpoints"
"""Sub-folder of the run folder with the ``step_<N>`` checkpoints (rlhf.runtime.checkpoint) of ``trainer.save_every``."""

MODULE_FILE = "module.pt"
"""A stage checkpoint's weights: the state dict of the module ``fit`` trains (whole, also under FSDP2)."""


# ---------------------------------------------------------------------- batching
def batch_indices(num_rows: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Row indices of step ``step``: ``(batch_size,)`` int64.

    Each pass over the data is a fresh permutation drawn from ``seed`` and the pass number, cut into
    consecutive batches; the rows left over at the end of a pass are skipped. A batch is a pure function of
    ``(step, seed)``, so a rerun draws the same batches. With fewer rows than ``batch_size`` a batch repeats rows.
    """
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    per_pass = max(num_rows // batch_size, 1)
    epoch, pos = divmod(step, per_pass)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_rows, generator=g)
    return order[torch.arange(pos * batch_size, (pos + 1) * batch_size) % num_rows]


def shard(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This process's contiguous slice of a ``(batch,)`` index tensor; ``batch`` must divide by ``world_size``.

    Returns ``(batch // world_size,)``.
    """
    if indices.dim() != 1:
        raise ValueError(f"indices must be (batch,), got shape {tuple(indices.shape)}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if indices.shape[0] % world_size:
        raise ValueError(f"indices of length {indices.shape[0]} do not split over world_size={world_size}")
    per = indices.shape[0] // world_size
    return indices[rank * per:(rank + 1) * per]


def num_rows(data: Batch) -> int:
    """Rows of a dict of tensors that all have the same first dimension."""
    sizes = {name: x.shape[0] for name, x in data.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"data tensors differ in their number of rows: {sizes}")
    return next(iter(sizes.values()))


def take(data: Batch, idx: torch.Tensor, device: torch.device | str = "cpu") -> Batch:
    """Rows ``idx`` (``(batch,)``) of every ``(rows, ...)`` tensor of ``data``, moved to ``device``."""
    return {name: x[idx].to(device) for name, x in data.items()}


# ---------------------------------------------------------------------- the SFT loss
def lm_batch_loss(model: nn.Module, batch: Batch, reduction: str = "mean") -> torch.Tensor:
    """Next-token loss of a causal LM on one right-padded batch.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``loss_mask``, each ``(batch, seq_len)``;
    ``loss_mask`` marks the target tokens (0 on padding). ``reduction``: "mean" -> ``()`` mean over the target
    tokens, "sum" -> ``()`` their sum.
    """
    mask = batch["attention_mask"]
    # Columns that are padding in every row change nothing but cost a forward pass.
    width = min(max(int(mask.sum(-1).max()), 2), mask.shape[1])
    ids = batch["input_ids"][:, :width]
    logits = model(input_ids=ids, attention_mask=mask[:, :width], use_cache=False).logits
    return lm_loss(logits, ids, mask=batch["loss_mask"][:, :width], reduction=reduction)


def sft_batch_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``lm_batch_loss`` (mean over target tokens, ``()``) and, under ``UNITS``, the number of target tokens."""
    loss = lm_batch_loss(model, batch)
    return loss, {UNITS: batch["loss_mask"][:, 1:].sum().float()}


def sft_train_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """``train/perplexity``: exp of the (global, token-weighted) ``train/loss``."""
    return {"train/perplexity": perplexity(metrics["train/loss"])}


@torch.no_grad()
def lm_eval_sums(model: nn.Module, data: Batch, batch_size: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """``(2,)`` float64: the next-token loss summed over every target token of ``data``, and their number.

    Sums rather than a mean, so that processes holding different shards add up to the token-weighted mean.
    ``data`` holds ``(rows, seq_len)`` tensors as in ``lm_batch_loss``.
    """
    total = torch.zeros(2, dtype=torch.float64)
    rows = num_rows(data)
    for start in range(0, rows, batch_size):
        batch = take(data, torch.arange(start, min(start + batch_size, rows)), device)
        total[0] += float(lm_batch_loss(model, batch, reduction="sum"))
        total[1] += float(batch["loss_mask"][:, 1:].sum())
    return total


def strided_rows(rows: int, rank: int, world_size: int) -> torch.Tensor:
    """This process's evaluation rows ``rank, rank + world_size, ...``: ``(about rows / world_size,)`` int64."""
    return torch.arange(rank, rows, world_size)


def evaluate_lm(model: nn.Module, data: Batch, batch_size: int, backend: DistributedBackend) -> dict[str, float]:
    """Held-out ``eval/loss`` (token-weighted mean over all processes' rows) and ``eval/perplexity``."""
    model.eval()
    mine = take(data, strided_rows(num_rows(data), backend.process_index, backend.num_processes))
    sums = torch.zeros(2, dtype=torch.float64)
    if num_rows(mine):
        sums = lm_eval_sums(model, mine, batch_size, backend.device)
    if backend.num_processes > 1:
        sums = backend.sum(sums.to(backend.device)).cpu()
    model.train()
    loss = float(sums[0] / sums[1]) if sums[1] > 0 else math.nan
    return {"eval/loss": loss, "eval/perplexity": perplexity(loss) if math.isfinite(loss) else math.nan}


# ---------------------------------------------------------------------- optimisation
def build_optimizer(params, *, lr: float, weight_decay: float, betas: tuple[float, float], scheduler: str,
                    warmup_steps: int, max_steps: int):
    """AdamW over ``params`` and a transformers schedule (``constant_with_warmup``, ``linear``, ``cosine``)."""
    optimizer = torch.optim.AdamW(list(params), lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    schedule = get_scheduler(scheduler, optimizer, num_warmup_steps=warmup_steps,
                             num_training_steps=max_steps)
    return optimizer, schedule


def optimizer_step(backend: DistributedBackend, optimizer, scheduler, max_grad_norm: float | None,
                   step: int) -> float:
    """rlhf.runtime.accelerator.clip_and_step; a non-finite norm stops the run (on every process: the norm is the same
    everywhere) with nothing moved. Returns the norm before clipping."""
    norm = backend.clip_and_step(optimizer, scheduler, max_grad_norm)
    if norm is None:
        raise TrainingError(f"trainer.lr: non-finite loss or gradient at step {step}; lower trainer.lr, set "
                            "trainer.max_grad_norm, or check the data")
    return float(norm)


def _mean_over_processes(backend: DistributedBackend, values: dict[str, torch.Tensor],
                         weight: torch.Tensor | None = None) -> dict[str, float]:
    """Mean of each ``()`` value over processes, each process's value times ``weight``
    (rlhf.runtime.backend.process_weight)."""
    names = list(values)
    stacked = torch.stack([values[k].detach().float().reshape(()).to(backend.device) for k in names])
    if weight is not None:
        stacked = stacked * weight
    return dict(zip(names, backend.mean(stacked).tolist()))


# ---------------------------------------------------------------------- saving
def save_final(model, tokenizer, folder: str, weights: dict | None = None) -> str:
    """Write ``model.save_pretrained`` + the tokenizer into ``folder`` atomically (``folder.tmp``, then rename).

    ``weights``: the model's whole state dict when its parameters are not (an FSDP2 shard's; ``fit`` gathers them),
    None to save the parameters it holds. Non-finite weights are refused, so a folder at ``folder`` is always usable.
    """
    from rlhf.lora import save_model
    from rlhf.models import save_model_folder

    tensors = weights.values() if weights is not None else model.parameters()
    if not all(torch.isfinite(p).all() for p in tensors):
        raise TrainingError(f"trained weights are not finite; {folder} not written (lower trainer.lr)")
    return save_model_folder(model, tokenizer, folder, lambda m, tmp: save_model(m, tmp, state_dict=weights))


def save_trained(model, tokenizer, run_dir: str, weights: dict | None = None) -> str:
    """The end of an SFT or reward stage: ``<run_dir>/final`` (returned), and with LoRA first ``<run_dir>/adapter``
    (the adapters alone), then final/ as the merged model, which loads without peft. ``weights``: as in
    ``save_final`` (FSDP2; not with LoRA, which ``fit`` refuses under FSDP2)."""
    from rlhf.lora import is_peft_model, merged

    if is_peft_model(model):
        save_final(model, tokenizer, os.path.join(run_dir, ADAPTER_DIR))
        model = merged(model)
    return save_final(model, tokenizer, os.path.join(run_dir, FINAL_DIR), weights)


def inner_weights(weights: dict | None, prefix: str = "model.") -> dict | None:
    """The state dict of a wrapper's ``model`` (DPO's SequenceLogps, the reward stage's SequenceScorer) from the
    wrapper's whole ``weights``: the entries under ``prefix``, without it. None stays None."""
    if weights is None:
        return None
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


def with_lora(model, m: DictConfig, seed: int, score: bool = False, key: str = "init"):
    """``model`` (loaded from ``m[key]``) in fresh LoRA adapters when ``m.lora`` is set, else unchanged."""
    if m.get("lora") is None:
        return model
    from rlhf.lora import add_lora

    return add_lora(model, m.lora, m[key], seed, score)


# ---------------------------------------------------------------------- the loop
def fit(cfg: DictConfig, backend: DistributedBackend, module: nn.Module, train: Batch, batch_loss: BatchLoss,
        evaluate: Evaluate, save: Callable[[nn.Module, dict | None], None],
        derive: Callable[[dict[str, float]], dict[str, float]] | None = None) -> list[dict]:
    """The supervised loop of SFT and reward training; returns the metric lines, one per logged step.

    Uses ``cfg.seed``, ``cfg.run_dir``, ``cfg.trainer`` and ``cfg.logging``. Each step:

        1. batch     ``batch_indices`` of ``train`` (``(rows, ...)`` tensors), this process's shard
        2. loss      ``batch_loss(module, batch) -> (loss, stats)``; a loss that averages over per-process
                     ``UNITS`` is reweighted so the step is that of the global mean
        3. update    backward, clip, AdamW, schedule
        4. evaluate  ``evaluate(module) -> metrics`` before the first update, every ``trainer.eval_every``
                     updates and after the last one
        5. log       ``metrics.jsonl`` (and TensorBoard, W&B) on the main process

        6. checkpoint ``<run_dir>/checkpoints/step_<N>`` every ``trainer.save_every`` updates: the module's weights,
                     AdamW and the schedule, from which ``trainer.resume`` continues exactly (batches are a function
                     of the step)

    Every metric of line ``step`` describes the model after ``step`` updates; the last line
    (``step == trainer.max_steps``) holds only the final evaluation. ``derive(train metrics)`` adds metrics computed
    from the global ones (SFT: perplexity from the loss). Then ``save(unwrapped module, weights)`` runs on the main
    process, after every process has checked that the weights are finite (so a refusal stops every process, not only
    rank 0); ``weights`` is None, or under FSDP2 the module's whole state dict, gathered by every process (each holds
    a shard of every parameter).
    """
    from rlhf.runtime.checkpoint import load_trainer_state, resolve_resume
    from rlhf.runtime.tracking import open_logger

    t = cfg.trainer
    _check_fsdp2_stage(backend, module)
    if t.gradient_checkpointing:
        checkpoint_activations(module)
    ckpt_root = os.path.join(cfg.run_dir, CKPT_DIR)
    resume = resolve_resume(t.resume, ckpt_root, backend, weights=MODULE_FILE)
    if resume:
        module.load_state_dict(torch.load(os.path.join(resume, MODULE_FILE), map_location="cpu"))
    optimizer, scheduler = build_optimizer(
        (p for p in module.parameters() if p.requires_grad), lr=t.lr, weight_decay=t.weight_decay,
        betas=t.adam_betas, scheduler=t.scheduler, warmup_steps=t.warmup_steps, max_steps=t.max_steps)
    module, optimizer = backend.acc.prepare(module, optimizer)
    start = _load_stage_state(backend, module, optimizer, scheduler, load_trainer_state(resume)) if resume else 0
    logger = open_logger(cfg, cfg.run_dir, backend.is_main, start, ckpt_root)
    rows, bar, history = num_rows(train), _progress_bar(cfg, backend.is_main), []
    if bar is not None:
        bar.update(start)
    try:
        for step in range(start, t.max_steps + 1):
            metrics: dict = {"step": step}
            evaluated = step == 0 or step == t.max_steps or (t.eval_every > 0 and step % t.eval_every == 0)
            if evaluated:
                metrics.update(evaluate(module))
            if step < t.max_steps:
                metrics.update(_train_step(backend, module, optimizer, scheduler, train, rows, batch_loss, cfg,
                                           step))
                if derive is not None:
                    metrics.update(derive(metrics))
                if bar is not None:
                    bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
                    bar.update(1)
            if evaluated or step % t.log_every == 0:
                logger.log(metrics)
                history.append(metrics)
            if t.save_every and step < t.max_steps and (step + 1) % t.save_every == 0:
                _save_stage_checkpoint(backend, module, optimizer, scheduler, step + 1, cfg, ckpt_root)
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    _check_finite_everywhere(backend, module, cfg.run_dir)
    weights = backend.state_dict(module) if backend.is_fsdp2 else None  # a collective: every process gathers
    if backend.is_main:
        save(backend.unwrap(module), weights)
    backend.wait()
    return history


def _check_fsdp2_stage(backend: DistributedBackend, module: nn.Module) -> None:
    """LoRA stages save merged weights, which an FSDP2 shard cannot merge: refused under FSDP2 before training."""
    from rlhf.config import ConfigError
    from rlhf.lora import is_peft_model

    if backend.is_fsdp2 and any(is_peft_model(m) for m in module.modules()):
        raise ConfigError("model.lora: the SFT, reward and DPO stages do not train LoRA adapters under FSDP2 (their "
                          "final/ merges the adapters, which needs the whole weights); use DDP, or full weights")


def _save_stage_checkpoint(backend: DistributedBackend, module: nn.Module, optimizer, scheduler, step: int,
                           cfg: DictConfig, ckpt_root: str) -> None:
    """``<ckpt_root>/step_<step>`` (atomic; rlhf.runtime.checkpoint): ``module.pt`` and ``trainer_state.pt`` (step,
    AdamW, schedule, the resolved config). Collective: every process takes part in gathering the state."""
    from rlhf.runtime.checkpoint import save_checkpoint

    _check_finite_everywhere(backend, module, cfg.run_dir)
    weights = backend.state_dict(module)
    state = {"step": step, "optimizer": backend.optimizer_state(optimizer, backend.unwrap(module)),
             "scheduler": scheduler.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True)}
    if backend.is_main:
        def write(folder: str) -> None:
            torch.save(weights, os.path.join(folder, MODULE_FILE))
            torch.save(state, os.path.join(folder, "trainer_state.pt"))

        save_checkpoint(ckpt_root, step, write, cfg.trainer.keep_last)
    backend.wait()


def _load_stage_state(backend: DistributedBackend, module: nn.Module, optimizer, scheduler, state: dict) -> int:
    """AdamW and the schedule of a stage checkpoint (the weights loaded before ``prepare``); returns its step."""
    if state["optimizer"] is not None:
        backend.load_optimizer_state(optimizer, backend.unwrap(module), state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"]


def _progress_bar(cfg: DictConfig, is_main: bool):
    if not (cfg.logging.progress and is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.trainer.max_steps, desc=os.path.basename(cfg.run_dir) or "train", dynamic_ncols=True)


def _check_finite_everywhere(backend: DistributedBackend, module: nn.Module, run_dir: str) -> None:
    """Raise TrainingError on every process when any process holds a non-finite weight (a collective)."""
    if backend.any(not all_finite(module)):
        raise TrainingError(f"trained weights are not finite; {os.path.join(run_dir, FINAL_DIR)} not "
                            "written (lower trainer.lr)")


def _train_step(backend, module, optimizer, scheduler, train, rows, batch_loss, cfg, step) -> dict[str, float]:
    t = cfg.trainer
    t0 = time.perf_counter()
    idx = shard(batch_indices(rows, t.batch_size, step, cfg.seed), backend.process_index, backend.num_processes)
    loss, stats = batch_loss(module, take(train, idx, backend.device))
    weight = backend.process_weight(stats.pop(UNITS, None))
    backend.backward(loss * weight if weight is not None else loss)
    lr = scheduler.get_last_lr()[0]
    grad_norm = optimizer_step(backend, optimizer, scheduler, t.max_grad_norm, step)
    out = {f"train/{k}": v for k, v in _mean_over_processes(backend, {"loss": loss, **stats}, weight).items()}
    out.update({"train/lr": lr, "train/grad_norm": grad_norm, "time/step_s": time.perf_counter() - t0})
    return out


# ---------------------------------------------------------------------- the SFT stage
def load_sft_splits(cfg: DictConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Train rows and held-out rows (None when ``data.num_eval == 0``), with normalized columns.

    Raises ``rlhf.data.DataError`` on bad data; nothing else loads before this.
    """
    from rlhf.data import load_sft

    d = cfg.data
    columns = dict(format=d.format, prompt_column=d.prompt_column, completion_column=d.completion_column,
                   text_column=d.text_column, messages_column=d.messages_column, seed=cfg.seed)
    train = load_sft(d.source, split=d.train_split, n=d.num_train, **columns)
    if d.num_eval == 0:
        return train, None
    return train, load_sft(d.eval_source or d.source, split=d.eval_split, n=d.num_eval, **columns)


def train_sft(cfg: DictConfig, accelerator: Accelerator | None = None) -> list[dict]:
    """Run SFT from a validated config (``rlhf.config.validate_sft_config``); returns the metric lines.

    Writes ``metrics.jsonl`` and the model + tokenizer folder ``<run_dir>/final``.
    """
    return run_stage(cfg, accelerator, _train_sft)


def run_stage(cfg: DictConfig, accelerator: Accelerator | None,
              body: Callable[[DictConfig, DistributedBackend], list[dict]]) -> list[dict]:
    """Run an SFT or reward stage's ``body(cfg, backend)`` with the stage's thread count and Accelerator, holding the run
    folder's lock (rlhf.runtime.runlock: one writer per folder, taken before anything loads)."""
    if cfg.trainer.torch_threads:
        torch.set_num_threads(cfg.trainer.torch_threads)
    backend = DistributedBackend(accelerator or make_accelerator(cfg.trainer))
    with locked_run_dir(backend.acc, cfg.run_dir):
        return body(cfg, backend)


def _train_sft(cfg: DictConfig, backend: DistributedBackend) -> list[dict]:
    from rlhf.data import tokenize_sft
    from rlhf.models import check_tokenizer_fits, load_causal_lm, load_tokenizer

    t, d = cfg.trainer, cfg.data
    torch.manual_seed(cfg.seed)
    train_rows, eval_rows = load_sft_splits(cfg)                                         # 1. data
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.init)
    check_tokenizer_fits(tokenizer, cfg.model.init, cfg.model.tokenizer, model_key="model.init")
    train = tokenize_sft(train_rows, tokenizer, d.max_length, d.completion_only, d.add_eos)
    held_out = tokenize_sft(eval_rows, tokenizer, d.max_length, d.completion_only, d.add_eos) \
        if eval_rows is not None else None
    model = load_causal_lm(cfg.model.init, tokenizer, cfg.model.dtype, seed=cfg.seed)  # 2. model
    model = with_lora(model, cfg.model, cfg.seed)
    model.train()

    def evaluate(module: nn.Module) -> dict[str, float]:
        return evaluate_lm(module, held_out, t.eval_batch_size, backend) if held_out is not None else {}

    folder = os.path.join(cfg.run_dir, FINAL_DIR)
    history = fit(cfg, backend, model, train, sft_batch_loss, evaluate,                     # 3. train
                  lambda m, w: save_trained(m, tokenizer, cfg.run_dir, w), derive=sft_train_metrics)
    if backend.is_main:
        log.info(sft_summary(history, folder))
    return history


def sft_summary(history: list[dict], folder: str) -> str:
    """The one-line result of an SFT run: held-out perplexity before -> after, and where the model is."""
    evals = [m for m in history if "eval/perplexity" in m]
    if not evals:
        return f"SFT done; model saved to {folder}"
    first, last = evals[0]["eval/perplexity"], evals[-1]["eval/perplexity"]
    return f"SFT done: eval perplexity {first:.2f} -> {last:.2f}; model saved to {folder}"
