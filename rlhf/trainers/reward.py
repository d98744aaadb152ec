"""Reward-model training, the second RLHF stage.

The reward model is an ``AutoModelForSequenceClassification`` with one label, read at the last real token of
``prompt + " " + completion + EOS`` (``rlhf.models.sequence_scores``): the same text and position at which the
policy trainer scores its samples. Objectives, selected by name with ``objective=``:

    pairwise    -log sigmoid(r_c - r_r - margin) + center_coef * mean((r_c + r_r)^2)
                Bradley-Terry with an optional per-pair margin (Llama 2) and reward centering (Eisenstein et al.
                2023), which pins the mean score near 0 without changing which completion scores higher
    regression  MSE or Huber of the score against a real-valued label
    binary      binary cross-entropy of the score, as a logit, against a 0/1 label

Tensors of a dataset (``encode_pairs`` / ``encode_labelled``), ``k`` = 2 (chosen, rejected) or 1:

    input_ids, attention_mask   (rows, k, seq_len)  right-padded
    margin                      (rows,)             pairwise, when data.margin_column is set
    label                       (rows,)             regression and binary

The loop is ``rlhf.trainers.sft.fit``; the model and tokenizer go to ``<run_dir>/final``, which the policy trainer loads as
``model.reward=<run_dir>/final``.
"""

from __future__ import annotations

import logging
import math
import os
import warnings

import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from omegaconf import DictConfig
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel

from rlhf.config import REWARD_OBJECTIVES
from rlhf.core.losses import binary_cross_entropy_with_logits, huber, mae, mse
from rlhf.core.objectives import bradley_terry_loss, preference_accuracy
from rlhf.models import sequence_scores
from rlhf.runtime.backend import DistributedBackend
from rlhf.trainers.sft import (
    FINAL_DIR,
    Batch,
    fit,
    inner_weights,
    num_rows,
    run_stage,
    save_trained,
    strided_rows,
    take,
    with_lora,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------- the objectives
def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                  center_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss with reward centering: ``mean(-log sigmoid(r_c - r_r - m)) + c * mean((r_c + r_r)^2)``.

    ``chosen``, ``rejected``: ``(batch,)`` scores; ``margin``: None or ``(batch,)``. Returns the ``()`` loss and
    detached ``()`` stats: ``accuracy`` (fraction with r_c > r_r), ``margin`` (mean r_c - r_r), ``centering``
    (mean (r_c + r_r)^2, whatever ``center_coef``).
    """
    if not center_coef >= 0:
        raise ValueError(f"center_coef must be >= 0, got {center_coef!r}")
    loss = bradley_terry_loss(chosen, rejected, margin)
    centering = mse(chosen + rejected, torch.zeros_like(chosen))
    if center_coef > 0:
        loss = loss + center_coef * centering
    stats = {"accuracy": preference_accuracy(chosen, rejected), "margin": (chosen - rejected).mean().detach(),
             "centering": centering.detach()}
    return loss, stats


def regression_loss(scores: torch.Tensor, labels: torch.Tensor, loss: str = "mse",
                    delta: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mse`` or ``huber`` (with ``delta``) of ``(batch,)`` scores against ``(batch,)`` labels.

    Returns the ``()`` loss and detached ``()`` stats ``mse`` and ``mae``.
    """
    if loss not in ("mse", "huber"):
        raise ValueError(f"loss must be 'mse' or 'huber', got {loss!r}")
    value = mse(scores, labels) if loss == "mse" else huber(scores, labels, delta=delta)
    return value, {"mse": mse(scores, labels).detach(), "mae": mae(scores, labels).detach()}


def binary_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Binary cross-entropy of ``(batch,)`` logits against ``(batch,)`` 0/1 labels.

    Returns the ``()`` loss and the detached ``()`` stat ``accuracy`` (fraction with ``(logit > 0) == label``).
    """
    loss = binary_cross_entropy_with_logits(logits, labels)
    accuracy = ((logits > 0) == (labels > 0.5)).float().mean().detach()
    return loss, {"accuracy": accuracy}


def objective_loss(objective: str, scores: torch.Tensor, batch: Batch,
                   loss_cfg: DictConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of ``objective`` on ``(batch, k)`` scores; ``batch`` supplies ``margin`` or ``label`` ``(batch,)``.

    ``loss_cfg`` holds ``center_coef``, ``regression`` and ``huber_delta`` (configs/reward.yaml ``loss``).
    """
    k = 2 if objective == "pairwise" else 1
    if scores.dim() != 2 or scores.shape[1] != k:
        raise ValueError(f"scores must be (batch, {k}) for the {objective} objective, got {tuple(scores.shape)}")
    if objective == "pairwise":
        return pairwise_loss(scores[:, 0], scores[:, 1], batch.get("margin"), loss_cfg.center_coef)
    if objective == "regression":
        return regression_loss(scores[:, 0], batch["label"], loss_cfg.regression, loss_cfg.huber_delta)
    if objective == "binary":
        return binary_loss(scores[:, 0], batch["label"])
    raise ValueError(f"objective must be one of {', '.join(REWARD_OBJECTIVES)}, got {objective!r}")


# ---------------------------------------------------------------------- scoring
class SequenceScorer(nn.Module):
    """A one-label sequence-classification model as ``(batch, seq) -> (batch,)`` scores at the last real token.

    A module of its own so that DDP wraps the path the gradients take (``sequence_scores`` calls the backbone and
    the head directly, not the model's ``forward``).
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return sequence_scores(self.model, input_ids, attention_mask)


SEQUENCE_KEYS = ("input_ids", "attention_mask", "loss_mask")
"""The ``(rows, k, seq_len)`` tensors of a batch that ``batch_scores`` hands to the scorer, those present."""


def batch_scores(scorer: nn.Module, batch: Batch) -> torch.Tensor:
    """Scores of every sequence of a batch in one forward pass: ``(batch, k, seq_len)`` ids -> ``(batch, k)``.

    The scorer is called with ``(batch * k, width)`` ``input_ids``, ``attention_mask`` and, when the batch has one,
    ``loss_mask`` (the DPO scorer's completion tokens), as keywords."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, k, seq_len = ids.shape
    # Columns that are padding in every row change nothing but cost a forward pass.
    width = int(mask.sum(-1).max())
    flat = scorer(**{name: batch[name][..., :width].reshape(rows * k, width) for name in SEQUENCE_KEYS
                     if name in batch})
    return flat.view(rows, k)


@torch.no_grad()
def dataset_scores(scorer: nn.Module, data: Batch, batch_size: int, backend: DistributedBackend) -> torch.Tensor:
    """``(rows, k)`` scores of all rows of ``data``, each process scoring every ``num_processes``-th row.

    Under FSDP2 every forward pass of a sharded scorer is a collective, so a process with a batch fewer than the
    others (rows that do not split evenly) scores row 0 once more, unused, to keep in step."""
    rows = num_rows(data)
    mine = strided_rows(rows, backend.process_index, backend.num_processes)
    per = math.ceil(rows / backend.num_processes)
    k = data["input_ids"].shape[1]
    out = torch.zeros(len(mine), k, device=backend.device)
    for start in range(0, per if backend.is_fsdp2 else len(mine), batch_size):
        idx = mine[start:start + batch_size]
        if len(idx) == 0:
            batch_scores(scorer, take(data, torch.zeros(1, dtype=torch.long), backend.device))
            continue
        out[start:start + len(idx)] = batch_scores(scorer, take(data, idx, backend.device))
    return gather_strided(out, rows, backend)


def gather_strided(local: torch.Tensor, rows: int, backend: DistributedBackend) -> torch.Tensor:
    """This process's ``(len(strided_rows(rows, rank, world)), k)`` results -> all ``(rows, k)`` in row order, on
    every process (``local`` itself on one process)."""
    if backend.num_processes == 1:
        return local
    per = math.ceil(rows / backend.num_processes)
    gathered = backend.gather(F.pad(local.to(backend.device), (0, 0, 0, per - local.shape[0])).contiguous())
    return unstride(gathered, backend.num_processes, rows)


def unstride(gathered: torch.Tensor, world_size: int, rows: int) -> torch.Tensor:
    """Undo ``strided_rows`` sharding: ``(world_size * per, k)`` -> ``(rows, k)`` in the original row order.

    ``gathered`` holds each process's ``per`` rows in process order, each shard padded at its end to ``per``
    rows; row ``j`` of process ``r`` is global row ``r + j * world_size``.
    """
    if gathered.dim() != 2 or gathered.shape[0] % world_size:
        raise ValueError(f"gathered must be (world_size * per, k), got shape {tuple(gathered.shape)}")
    per = gathered.shape[0] // world_size
    if not 0 <= rows <= gathered.shape[0]:
        raise ValueError(f"rows must be in [0, {gathered.shape[0]}], got {rows}")
    return gathered.view(world_size, per, -1).transpose(0, 1).reshape(world_size * per, -1)[:rows]


# ---------------------------------------------------------------------- data
def _tokenize_texts(prompts: list[str] | None, texts: list[str], tokenizer, max_length: int,
                    completion_only: bool = False, chat: bool = False) -> Batch:
    """``(n, seq_len)`` ids and mask of ``prompt + " " + text + EOS`` (or ``text + EOS``), as the SFT and policy
    stages tokenize them (the prompt alone, with the tokenizer's special tokens); with ``completion_only`` also the
    ``(n, seq_len)`` ``loss_mask`` of the text's tokens (EOS included), as ``rlhf.data.tokenize_sft`` marks them.

    ``chat``: prompts and texts rendered by a chat template (``rlhf.data.render_conversational``), joined as
    ``tokenize_sft(chat=True)`` joins them: ``prompt + text``, no space, no second BOS, no EOS after the template's
    end-of-turn."""
    from rlhf.data import DataError, tokenize_sft

    table = {"prompt": prompts, "completion": texts} if prompts is not None else {"text": texts}
    # A rendered completion does not end in EOS: a row is cut when it has more than max_length tokens, so tokenize
    # one more and look.
    limit = max_length + 1 if chat else max_length
    enc = tokenize_sft(datasets.Dataset.from_dict(table), tokenizer, limit, completion_only=completion_only,
                       add_eos=not chat, chat=chat)
    if enc["input_ids"].shape[0] != len(texts):
        raise DataError(f"{len(texts) - enc['input_ids'].shape[0]} rows have no token; check the text columns")
    lengths = enc["attention_mask"].sum(-1)
    if chat:
        cut = int((lengths > max_length).sum())
        enc = {name: x[:, :max_length] for name, x in enc.items()}
        empty = int((enc["loss_mask"].sum(-1) == 0).sum())
        if completion_only and empty:
            raise DataError(f"{empty} rows have no completion token within data.max_length={max_length}; raise it")
    else:
        last = enc["input_ids"].gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)
        cut = int(((lengths == max_length) & (last != tokenizer.eos_token_id)).sum())
    if cut:
        warnings.warn(f"{cut} rows were cut at data.max_length={max_length}; their score is read at the cut, "
                      "not at the end of the text", stacklevel=2)
    keys = SEQUENCE_KEYS if completion_only else SEQUENCE_KEYS[:2]
    return {name: enc[name] for name in keys}


def encode_pairs(rows: datasets.Dataset, tokenizer, max_length: int, completion_only: bool = False,
                 chat: bool = False) -> Batch:
    """Preference rows (``prompt``, ``chosen``, ``rejected``, optional ``margin``) -> ``input_ids``,
    ``attention_mask`` (and with ``completion_only`` the completion tokens' ``loss_mask``) ``(rows, 2, seq_len)``
    (index 0 chosen, 1 rejected) and ``margin`` ``(rows,)`` float32. ``chat``: the rows are conversational pairs
    rendered by ``rlhf.data.render_conversational`` (see ``_tokenize_texts``)."""
    n = len(rows)
    prompts = list(rows["prompt"])
    enc = _tokenize_texts(prompts * 2, list(rows["chosen"]) + list(rows["rejected"]), tokenizer, max_length,
                          completion_only, chat)
    out = {name: x.view(2, n, -1).transpose(0, 1).contiguous() for name, x in enc.items()}
    if "margin" in rows.column_names:
        out["margin"] = torch.tensor(rows["margin"], dtype=torch.float32)
    return out


def encode_labelled(rows: datasets.Dataset, tokenizer, max_length: int) -> Batch:
    """Labelled rows (``text``, ``label``) -> ``input_ids``, ``attention_mask`` ``(rows, 1, seq_len)`` and
    ``label`` ``(rows,)`` float32."""
    enc = _tokenize_texts(None, list(rows["text"]), tokenizer, max_length)
    out = {name: x.unsqueeze(1) for name, x in enc.items()}
    out["label"] = torch.tensor(rows["label"], dtype=torch.float32)
    return out


def binarize_labels(rows: datasets.Dataset, source: str, column: str, threshold: float | None) -> datasets.Dataset:
    """Labels for the binary objective: ``label > threshold`` as 0/1, or, with no threshold, labels that must
    already be 0 or 1 (a DataError names the first row that is not, and its ``column`` in ``source``)."""
    from rlhf.data import DataError

    labels = list(rows["label"])
    if threshold is not None:
        binary = [float(x > threshold) for x in labels]
    else:
        bad = next((i for i, x in enumerate(labels) if x not in (0.0, 1.0)), None)
        if bad is not None:
            raise DataError(f"{source!r} column {column!r} row {bad} (0-based): the binary objective needs 0 or 1, "
                            f"got {labels[bad]!r}; set data.label_threshold to binarize real labels")
        binary = labels
    return rows.remove_columns("label").add_column("label", binary, feature=datasets.Value("float64"))


def load_reward_rows(cfg: DictConfig, split: str, eval_split: bool) -> datasets.Dataset:
    """The rows of one split for ``cfg.objective``, with normalized columns. Raises ``rlhf.data.DataError``."""
    from rlhf.data import DataError, is_conversational, load_preferences, load_scalar

    d = cfg.data
    source = (d.eval_source or d.source) if eval_split else d.source
    n = d.num_eval if eval_split else d.num_train
    if cfg.objective == "pairwise":
        rows = load_preferences(source, prompt_column=d.prompt_column, chosen_column=d.chosen_column,
                                rejected_column=d.rejected_column, margin_column=d.margin_column, split=split,
                                n=n, seed=cfg.seed, temperature=d.temperature)
        if is_conversational(rows):  # the policy trainer scores prompt + " " + completion strings, never a chat
            raise DataError(f"{source!r} holds conversational pairs (lists of messages); the reward stage reads "
                            "prompt, chosen and rejected strings (conversational pairs are for scripts/train_dpo.py)")
        return rows
    rows = load_scalar(source, text_column=d.text_column, label_column=d.label_column, split=split, n=n,
                       seed=cfg.seed, noise_std=d.noise_std)
    return binarize_labels(rows, source, d.label_column, d.label_threshold) if cfg.objective == "binary" else rows


def builtin_eval_reference(rows: datasets.Dataset, temperature: float) -> dict[str, torch.Tensor | float]:
    """What the built-in task's gold reward says about its preference pairs.

    ``gold_diff``: ``(rows,)`` gold(chosen) - gold(rejected). ``ceiling``: the expected accuracy of the best
    possible scorer under the label noise (``rlhf.tasks.sentiment.preference_ceiling``). ``gold_label_accuracy``:
    the accuracy the gold reward itself reaches on these very labels (gold ties count 1/2), the ceiling's
    realised value, which scatters around it by about ``sqrt(ceiling * (1 - ceiling) / rows)``.
    """
    from rlhf.tasks.sentiment import gold_score, preference_ceiling

    pairs = rows.select_columns(["chosen", "rejected"]).to_list()
    gold_diff = torch.tensor([gold_score(p["chosen"]) - gold_score(p["rejected"]) for p in pairs])
    hits = (gold_diff > 0).double() + 0.5 * (gold_diff == 0).double()
    return {"ceiling": preference_ceiling(gold_diff.tolist(), temperature=temperature),
            "gold_label_accuracy": float(hits.mean()), "gold_diff": gold_diff}


def gold_agreement(chosen: torch.Tensor, rejected: torch.Tensor, gold_diff: torch.Tensor) -> float:
    """Fraction of pairs the reward model orders as the gold reward does; ``(rows,)`` each, gold ties skipped.

    Unlike the accuracy it is not capped by label noise: it measures the reward model against the true reward.
    """
    for name, x in (("rejected", rejected), ("gold_diff", gold_diff)):
        if x.shape != chosen.shape or chosen.dim() != 1:
            raise ValueError(f"{name} must have the (rows,) shape of chosen {tuple(chosen.shape)}, got "
                             f"{tuple(x.shape)}")
    keep = gold_diff != 0
    agree = torch.sign(chosen - rejected).cpu() == torch.sign(gold_diff)
    return float(agree[keep].float().mean()) if keep.any() else math.nan


# ---------------------------------------------------------------------- models
def load_reward_init(spec: str, tokenizer, dtype: str = "float32", seed: int = 0) -> PreTrainedModel:
    """The reward model to train, ``(batch, seq) -> (batch,)`` scores through ``sequence_scores``.

    ``spec`` is a built-in architecture, a one-label sequence-classification folder (trained further), or a causal
    LM (an SFT ``final/`` or ``adapter/`` folder, a hub id): its backbone gets a new one-label score head.
    """
    from rlhf.lora import is_adapter_folder, read_base_info
    from rlhf.models import DTYPES, disable_dropout, is_builtin, load_causal_lm, load_score_model

    if is_builtin(spec):
        return load_score_model(spec, tokenizer, dtype, seed=seed, key="model.init")
    if is_adapter_folder(spec) and read_base_info(spec)["head"] == "causal_lm":
        lm = load_causal_lm(spec, tokenizer, dtype)  # an SFT stage's adapters, merged into their base
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            model = AutoModelForSequenceClassification.from_config(lm.config, num_labels=1).to(lm.dtype)
        model.base_model.load_state_dict(lm.base_model.state_dict())
        model.config.pad_token_id = tokenizer.pad_token_id
        return disable_dropout(model)
    path = os.path.expanduser(spec)
    architectures = AutoConfig.from_pretrained(path).architectures or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return load_score_model(spec, tokenizer, dtype, seed=seed, key="model.init")
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=DTYPES[dtype])
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return disable_dropout(model)


# ---------------------------------------------------------------------- the stage
def evaluate_reward(scorer: nn.Module, data: Batch, cfg: DictConfig, backend: DistributedBackend,
                    reference: dict | None) -> dict[str, float]:
    """Held-out ``eval/loss`` and the objective's stats over all of ``data``; with built-in pairs also
    ``eval/ceiling``, ``eval/gold_label_accuracy`` (see ``builtin_eval_reference``) and ``eval/gold_agreement``."""
    scorer.eval()
    scores = dataset_scores(scorer, data, cfg.trainer.eval_batch_size, backend).cpu()
    scorer.train()
    targets = {k: v for k, v in data.items() if k in ("margin", "label")}
    loss, stats = objective_loss(cfg.objective, scores, targets, cfg.loss)
    out = {"eval/loss": float(loss), **{f"eval/{k}": float(v) for k, v in stats.items()}}
    if reference is not None:
        out["eval/ceiling"] = reference["ceiling"]
        out["eval/gold_label_accuracy"] = reference["gold_label_accuracy"]
        out["eval/gold_agreement"] = gold_agreement(scores[:, 0], scores[:, 1], reference["gold_diff"])
    return out


def train_reward(cfg: DictConfig, accelerator: Accelerator | None = None) -> list[dict]:
    """Train a reward model from a validated config (``rlhf.config.validate_reward_config``).

    Writes ``metrics.jsonl`` and ``<run_dir>/final`` (model + tokenizer, for ``model.reward=``); returns the
    metric lines.
    """
    return run_stage(cfg, accelerator, _train_reward)


def _train_reward(cfg: DictConfig, backend: DistributedBackend) -> list[dict]:
    from rlhf.models import check_tokenizer_fits, load_tokenizer

    d = cfg.data
    torch.manual_seed(cfg.seed)
    train_rows = load_reward_rows(cfg, d.train_split, eval_split=False)                 # 1. data
    eval_rows = load_reward_rows(cfg, d.eval_split, eval_split=True) if d.num_eval != 0 else None
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.init)
    check_tokenizer_fits(tokenizer, cfg.model.init, cfg.model.tokenizer, model_key="model.init")
    encode = encode_pairs if cfg.objective == "pairwise" else encode_labelled
    train = encode(train_rows, tokenizer, d.max_length)
    held_out = encode(eval_rows, tokenizer, d.max_length) if eval_rows is not None else None
    # Only the built-in task knows the gold reward behind its labels, hence the ceiling.
    builtin_pairs = cfg.objective == "pairwise" and (d.eval_source or d.source) == "builtin:sentiment"
    reference = builtin_eval_reference(eval_rows, d.temperature) if builtin_pairs and eval_rows is not None \
        else None
    model = load_reward_init(cfg.model.init, tokenizer, cfg.model.dtype, seed=cfg.seed)  # 2. model
    model = with_lora(model, cfg.model, cfg.seed, score=True)  # the score head trains in full (modules_to_save)
    model.train()
    scorer = SequenceScorer(model)

    def batch_loss(module: nn.Module, batch: Batch):
        return objective_loss(cfg.objective, batch_scores(module, batch), batch, cfg.loss)

    def evaluate(module: nn.Module) -> dict[str, float]:
        return evaluate_reward(module, held_out, cfg, backend, reference) if held_out is not None else {}

    folder = os.path.join(cfg.run_dir, FINAL_DIR)
    history = fit(cfg, backend, scorer, train, batch_loss, evaluate,                        # 3. train
                  lambda m, w: save_trained(m.model, tokenizer, cfg.run_dir, inner_weights(w)))
    if backend.is_main:
        log.info(reward_summary(cfg.objective, history, folder))
    return history


def reward_summary(objective: str, history: list[dict], folder: str) -> str:
    """The one-line result of a reward run: the final held-out numbers (next to the ceiling) and the folder."""
    final = history[-1]
    keys = {"pairwise": ["accuracy", "gold_agreement", "margin"], "regression": ["mse", "mae"],
            "binary": ["accuracy", "loss"]}[objective]
    parts = [f"{k.replace('_', ' ')} {final[f'eval/{k}']:.4f}" for k in keys if f"eval/{k}" in final]
    if "eval/ceiling" in final:
        parts[0] += (f" (label-noise ceiling {final['eval/ceiling']:.4f}; the gold reward itself scores "
                     f"{final['eval/gold_label_accuracy']:.4f} on these labels)")
    result = "held-out " + ", ".join(parts) if parts else "no held-out evaluation"
    return f"reward model ({objective}) done: {result}; saved to {folder}"
