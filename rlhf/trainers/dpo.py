"""Direct preference optimization (issue 19): a causal LM trained on preference pairs against a frozen reference.

One DPO run, as data:

    rows (prompt, chosen, rejected)  -> encode_split      input_ids, attention_mask, loss_mask (rows, 2, seq_len),
                                                          index 0 chosen, 1 rejected; loss_mask = completion tokens
                                                          (conversational rows: rendered by the chat template first,
                                                          the completion = assistant text + end-of-turn)
    response log-probs               -> SequenceLogps     (rows, 2): sum of log pi(y_t | x, y_<t) over the completion
                                                          tokens (EOS included), the prompt masked
    reference log-probs              -> the same under the initial policy: once up front (``dpo.precompute_ref``, as
                                        ``ref_logps`` (rows, 2) of the data) or live each step
    loss                             -> rlhf.core.dpo.DPO_LOSSES[dpo.loss] of PairLogps, mean over the pairs
    metrics                          -> rlhf.core.dpo.pair_metrics: rewards/chosen, rewards/rejected, rewards/margin,
                                        rewards/accuracy, logps/chosen, logps/rejected (train/ and eval/)
    frontier (at every evaluation)   -> rlhf.analysis.frontier: the policy sampled on held-out prompts, summed k1 KL
                                        to the reference on its own samples and their gold score (frontier/*), the
                                        point scripts/report.py puts beside RL and best-of-n

The loop, the optimiser, logging and saving are ``rlhf.trainers.sft.fit``'s; batching of pairs and the held-out
pass are the reward trainer's (``batch_scores``, ``dataset_scores``). The model goes to ``<run_dir>/final``, which
``scripts/train_policy.py model.policy=`` and ``scripts/evaluate.py`` load.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from typing import NamedTuple

import datasets
import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from torch import nn

from rlhf.core.dpo import DPO_LOSSES, PairLogps, pair_metrics
from rlhf.core.logprobs import selective_log_softmax
from rlhf.rollout.spec import SamplingSpec
from rlhf.runtime.backend import DistributedBackend
from rlhf.trainers.reward import batch_scores, dataset_scores, encode_pairs, gather_strided
from rlhf.trainers.sft import (
    FINAL_DIR,
    Batch,
    fit,
    inner_weights,
    run_stage,
    save_trained,
    strided_rows,
    with_lora,
)

log = logging.getLogger(__name__)

REF_LOGPS = "ref_logps"
"""Key of the precomputed ``(rows, 2)`` reference log-probs in a dataset's tensors (``take`` slices it with the
rows)."""


# ---------------------------------------------------------------------- log-probs
def sequence_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   loss_mask: torch.Tensor) -> torch.Tensor:
    """``(n,)`` sum over the tokens ``t`` with ``loss_mask[:, t] = 1`` of ``log p(input_ids[:, t] | input_ids[:, <t])``.

    ``input_ids``, ``attention_mask``, ``loss_mask``: ``(n, seq_len)``, right-padded; ``loss_mask`` marks the
    completion tokens (0 on the prompt and on padding; its column 0 is never scored, nothing predicts it).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    logps = selective_log_softmax(logits, input_ids[:, 1:])  # (n, seq_len - 1): [:, t] scores token t + 1
    return (logps * loss_mask[:, 1:].to(logps.dtype)).sum(-1)


class SequenceLogps(nn.Module):
    """A causal LM as ``(n, seq_len)`` -> ``(n,)`` summed completion log-probs (``sequence_logps``); a module of its
    own so that DDP wraps the path the gradients take, and the scorer ``batch_scores`` calls."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        return sequence_logps(self.model, input_ids, attention_mask, loss_mask)


def pair_logps(policy: torch.Tensor, reference: torch.Tensor) -> PairLogps:
    """``(rows, 2)`` policy and reference log-probs (column 0 chosen, 1 rejected) -> ``PairLogps`` of ``(rows,)``."""
    if policy.dim() != 2 or policy.shape[1] != 2 or reference.shape != policy.shape:
        raise ValueError(f"policy and reference log-probs must both be (rows, 2), got {tuple(policy.shape)} and "
                         f"{tuple(reference.shape)}")
    return PairLogps(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1])


def dpo_loss(logps: PairLogps, d: DictConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ``()`` mean of ``DPO_LOSSES[d.loss](logps, d.beta, d.label_smoothing)`` and the ``()`` pair metrics
    (``rlhf.core.dpo.pair_metrics``, as detached tensors)."""
    loss = DPO_LOSSES.get(d.loss)(logps, d.beta, d.label_smoothing).mean()
    return loss, {k: torch.tensor(v) for k, v in pair_metrics(logps, d.beta).items()}


# ---------------------------------------------------------------------- data
def load_pairs(cfg: DictConfig, eval_split: bool) -> datasets.Dataset:
    """The preference pairs of one split with columns ``prompt``, ``chosen``, ``rejected``; raises
    ``rlhf.data.DataError`` naming the source, column and row of a missing column, an empty text or a pair whose
    two completions are the same."""
    from rlhf.data import check_distinct_pairs, load_preferences

    d = cfg.data
    source = (d.eval_source or d.source) if eval_split else d.source
    rows = load_preferences(source, prompt_column=d.prompt_column, chosen_column=d.chosen_column,
                            rejected_column=d.rejected_column, split=d.eval_split if eval_split else d.train_split,
                            n=d.num_eval if eval_split else d.num_train, seed=cfg.seed, temperature=d.temperature)
    check_distinct_pairs(rows, source, d.chosen_column, d.rejected_column)
    return rows


def encode_split(rows: datasets.Dataset, tokenizer, source: str, max_length: int) -> Batch:
    """``encode_pairs`` of one split's pairs with the completion ``loss_mask``. Conversational pairs (lists of
    messages) are first rendered by the tokenizer's chat template (``rlhf.data.render_conversational``) and joined as
    rendered text: the prompt ends with the assistant's header, the completion is the assistant's text and the
    template's end-of-turn, which the loss mask covers."""
    from rlhf.data import is_conversational, render_conversational

    chat = is_conversational(rows)
    if chat:
        rows = render_conversational(rows, tokenizer, source)
    return encode_pairs(rows, tokenizer, max_length, completion_only=True, chat=chat)


def with_reference_logps(data: Batch, reference: nn.Module, batch_size: int, backend: DistributedBackend) -> Batch:
    """``data`` plus ``ref_logps`` ``(rows, 2)``: the reference's log-probs of every pair, on the CPU."""
    return {**data, REF_LOGPS: dataset_scores(reference, data, batch_size, backend).cpu()}


# ---------------------------------------------------------------------- models
def load_policy_and_reference(cfg: DictConfig, tokenizer) -> tuple[nn.Module, nn.Module]:
    """The policy to train and the frozen reference, each a ``SequenceLogps``. With ``model.lora`` the reference is
    the policy with its adapters disabled (one copy of the base weights), else a frozen copy of the loaded policy."""
    from rlhf.lora import AdapterDisabled
    from rlhf.models import freeze, load_causal_lm

    m = cfg.model
    policy = load_causal_lm(m.policy, tokenizer, m.dtype, seed=cfg.seed)
    if m.get("lora") is None:
        reference = freeze(copy.deepcopy(policy))
    else:
        policy = with_lora(policy, m, cfg.seed, key="policy")
        reference = AdapterDisabled(policy).eval()
    policy.train()
    return SequenceLogps(policy), SequenceLogps(reference)


# ---------------------------------------------------------------------- the stage
def evaluate_dpo(module: nn.Module, data: Batch, cfg: DictConfig, backend: DistributedBackend) -> dict[str, float]:
    """Held-out ``eval/loss`` and ``eval/`` pair metrics over every pair of ``data`` (which holds ``ref_logps``)."""
    module.eval()
    logps = dataset_scores(module, data, cfg.trainer.eval_batch_size, backend).cpu()
    module.train()
    loss, stats = dpo_loss(pair_logps(logps, data[REF_LOGPS]), cfg.dpo)
    return {"eval/loss": float(loss), **{f"eval/{k}": float(v) for k, v in stats.items()}}


def train_dpo(cfg: DictConfig, accelerator: Accelerator | None = None) -> list[dict]:
    """Train a policy by DPO from a validated config (``rlhf.config.validate_dpo_config``).

    Writes ``metrics.jsonl`` and ``<run_dir>/final`` (model + tokenizer); returns the metric lines.
    """
    return run_stage(cfg, accelerator, _train_dpo)


def _train_dpo(cfg: DictConfig, backend: DistributedBackend) -> list[dict]:
    from rlhf.models import check_tokenizer_fits, load_tokenizer

    d, t = cfg.data, cfg.trainer
    torch.manual_seed(cfg.seed)
    train_rows = load_pairs(cfg, eval_split=False)                                         # 1. data
    eval_rows = load_pairs(cfg, eval_split=True) if d.num_eval != 0 else None
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.policy)
    check_tokenizer_fits(tokenizer, cfg.model.policy, cfg.model.tokenizer, model_key="model.policy")
    train = encode_split(train_rows, tokenizer, d.source, d.max_length)
    held_out = encode_split(eval_rows, tokenizer, d.eval_source or d.source, d.max_length) \
        if eval_rows is not None else None
    frontier = load_frontier(cfg)
    policy, reference = load_policy_and_reference(cfg, tokenizer)                           # 2. models
    reference.to(backend.device)
    if held_out is not None:  # the held-out reference log-probs never change: always once
        held_out = with_reference_logps(held_out, reference, t.eval_batch_size, backend)
    frontier_reference = reference.model if frontier is not None else None
    if cfg.dpo.precompute_ref:
        train = with_reference_logps(train, reference, t.eval_batch_size, backend)
        reference = None  # a full copy is freed here unless the frontier keeps it; a LoRA reference is a view

    def batch_loss(module: nn.Module, batch: Batch):
        logps = batch_scores(module, batch)
        if reference is None:
            ref = batch[REF_LOGPS]
        else:
            with torch.no_grad():
                ref = batch_scores(reference, batch)
        return dpo_loss(pair_logps(logps, ref), cfg.dpo)

    def evaluate(module: nn.Module) -> dict[str, float]:
        metrics = evaluate_dpo(module, held_out, cfg, backend) if held_out is not None else {}
        if frontier is not None:
            # FSDP2: each process decodes its own prompts for its own number of steps, so it decodes on the whole
            # weights, gathered once (a collective every process enters), not on shards gathered at every token.
            with backend.gathered_for_generation(module, True):
                metrics.update(frontier_eval(backend.unwrap(module).model, frontier_reference, tokenizer, frontier,
                                             cfg, backend))
        return metrics

    folder = os.path.join(cfg.run_dir, FINAL_DIR)
    history = fit(cfg, backend, policy, train, batch_loss, evaluate,                        # 3. train
                  lambda m, w: save_trained(m.model, tokenizer, cfg.run_dir, inner_weights(w)))
    if backend.is_main:
        log.info(dpo_summary(cfg.dpo.loss, history, folder))
    return history


# ---------------------------------------------------------------------- the frontier
class Frontier(NamedTuple):
    """What ``frontier_eval`` samples: the held-out prompts, the gold scorer and the sampling distribution."""

    prompts: list[str]
    gold_fn: Callable | None
    spec: SamplingSpec


def load_frontier(cfg: DictConfig) -> Frontier | None:
    """The ``frontier`` section's prompts, gold scorer and sampling spec; None when it is off (``num_prompts`` 0 or
    no prompts)."""
    from rlhf.config import import_function
    from rlhf.data import load_prompts

    f = cfg.frontier
    if not f.num_prompts or f.prompts is None:
        return None
    prompts = load_prompts(f.prompts, column=f.prompt_column, split=f.split, n=f.num_prompts, seed=cfg.seed)
    gold_fn = import_function(f.gold, "frontier.gold") if f.gold is not None else None
    spec = SamplingSpec(temperature=f.temperature, max_new_tokens=f.max_new_tokens, sampler="counter")
    return Frontier(prompts, gold_fn, spec)


def frontier_eval(policy: nn.Module, reference: nn.Module, tokenizer, frontier: Frontier, cfg: DictConfig,
                  backend: DistributedBackend) -> dict[str, float]:
    """``frontier/*`` metrics (rlhf.analysis.frontier) of the causal LM ``policy`` against ``reference``: each
    process samples every ``num_processes``-th prompt (keyed by the prompt's global index, so the samples do not
    depend on the process count) and the per-prompt means are gathered."""
    from rlhf.analysis.frontier import frontier_metrics, prompt_means

    n = len(frontier.prompts)
    mine = strided_rows(n, backend.process_index, backend.num_processes).tolist()
    per_prompt = prompt_means(policy, reference, tokenizer, [frontier.prompts[i] for i in mine], mine,
                              frontier.spec, samples=cfg.frontier.samples, seed=cfg.seed, gold_fn=frontier.gold_fn,
                              gold_name=cfg.frontier.gold or "gold", batch_size=cfg.frontier.batch_size)
    return frontier_metrics(gather_strided(per_prompt, n, backend).cpu())


def dpo_summary(loss: str, history: list[dict], folder: str) -> str:
    """The one-line result of a DPO run: held-out preference accuracy and margin before -> after, the frontier
    measurement (gold score before -> after, KL to the reference) when on, and the folder."""
    evals = [m for m in history if "eval/rewards/accuracy" in m]
    parts = []
    if evals:
        first, last = evals[0], evals[-1]
        parts.append(f"held-out preference accuracy {first['eval/rewards/accuracy']:.4f} -> "
                     f"{last['eval/rewards/accuracy']:.4f}, reward margin {first['eval/rewards/margin']:.4f} -> "
                     f"{last['eval/rewards/margin']:.4f}")
    points = [m for m in history if "frontier/kl" in m]
    if points:
        first, last = points[0], points[-1]
        gold = (f"gold score of its samples {first['frontier/gold_score']:+.4f} -> {last['frontier/gold_score']:+.4f}"
                f", " if "frontier/gold_score" in last else "")
        parts.append(f"{gold}KL to the reference {last['frontier/kl']:.3f} nats")
    return f"DPO ({loss}) done" + (": " + "; ".join(parts) if parts else "") + f"; model saved to {folder}"
