"""The sampling distribution, named once: :class:`SamplingSpec`, the logits processors that draw from it
(``generate``) and the log-probs / entropy of given tokens under it (the trainer's forward passes).

A rollout token is drawn from the model's next-token scores after, in this order (transformers' order):

    1. min_new_tokens  EOS gets -inf at new-token positions < min_new_tokens
    2. temperature     scores / temperature
    3. top_k           tokens below the k-th largest score get -inf
    4. top_p           the smallest set of most likely tokens holding >= top_p of the mass is kept
    5. min_p           tokens with probability < min_p * (largest probability) get -inf

and a softmax of what is left (renormalised over the kept tokens). Steps 2-5 are transformers' own warper
classes, built by one method (:meth:`SamplingSpec.truncation_warpers`) for the sampler and for the log-probs; step 1
is :class:`MinNewTokensEOS`, also one class for both. So the log-prob of a rollout token under
:func:`sampling_logprobs` is its log-prob under the distribution that drew it, by construction, and an importance
ratio or KL built from such log-probs compares the distributions that really produced the data.

Steps 1 and 2 commute exactly (``-inf / T = -inf``), so the log-prob path divides the whole ``(N, R, V)`` logits by T
first (the op it always did) and then masks chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rlhf.config import ConfigError
from rlhf.core.logprobs import (
    _blocks,
    _compute_dtype,
    chunk_rows,
    entropy_from_logits,
    selective_log_softmax,
)

SAMPLERS = ["counter", "torch"]


def _eos_tuple(eos: int | Sequence[int] | torch.Tensor | None) -> tuple[int, ...] | None:
    if eos is None:
        return None
    if isinstance(eos, torch.Tensor):
        eos = eos.reshape(-1).tolist()
    ids = (int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos)
    return ids or None


@dataclass(frozen=True)
class SamplingSpec:
    """Every knob of the rollout's sampling distribution, explicit (0 / 1.0 = off), and how it is drawn.

    temperature > 0; top_k >= 0 (0 = off); top_p in (0, 1] (1 = off); min_p in [0, 1] (0 = off);
    min_new_tokens >= 0 (EOS suppressed before that many new tokens); max_new_tokens: the response length cap
    (None: the spec only scores tokens, an engine refuses it); sampler: "counter" (per-row counter-based stream) or
    "torch" (torch's global RNG), which draw from the same distribution. eos_token_id: the id(s) step 1 masks and
    generation stops at; engines fall back to their tokenizer's EOS when None, and the log-prob code needs it when
    min_new_tokens > 0 (``SamplingSpec.from_config(cfg.rollout, eos_token_id=tokenizer.eos_token_id)``).

    A bad value raises a one-line :class:`rlhf.config.ConfigError` naming the ``rollout.*`` key.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    min_new_tokens: int = 0
    max_new_tokens: int | None = None
    sampler: str = "counter"
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        def check(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"rollout.{key}: {msg}")

        check(self.max_new_tokens is None or self.max_new_tokens > 0, "max_new_tokens", "must be > 0")
        upper = self.max_new_tokens if self.max_new_tokens is not None else float("inf")
        check(0 <= self.min_new_tokens <= upper, "min_new_tokens",
              f"must be in [0, rollout.max_new_tokens={self.max_new_tokens}]")
        check(self.temperature > 0, "temperature", "must be > 0")
        check(self.top_k >= 0, "top_k", "must be >= 0")
        check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        check(self.sampler in SAMPLERS, "sampler", f"{self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        # Plain Python types: transformers' warpers refuse an int temperature or a float top_k.
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "min_new_tokens", int(self.min_new_tokens))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "min_p", float(self.min_p))
        eos = _eos_tuple(self.eos_token_id)
        object.__setattr__(self, "eos_token_id", eos[0] if eos is not None and len(eos) == 1 else eos)

    @classmethod
    def from_config(cls, rollout: Any, eos_token_id: int | Sequence[int] | None = None) -> SamplingSpec:
        """From ``cfg.rollout`` (temperature, top_k, top_p, min_p, min_new_tokens, max_new_tokens, sampler) and the
        tokenizer's EOS id."""
        return cls(temperature=float(rollout.temperature), top_k=int(rollout.top_k), top_p=float(rollout.top_p),
                   min_p=float(rollout.min_p), min_new_tokens=int(rollout.min_new_tokens),
                   max_new_tokens=int(rollout.max_new_tokens), sampler=str(rollout.sampler),
                   eos_token_id=eos_token_id)

    @property
    def eos_ids(self) -> tuple[int, ...] | None:
        """``eos_token_id`` as a tuple (None when unset)."""
        return _eos_tuple(self.eos_token_id)

    @property
    def truncates(self) -> bool:
        """Whether any token can get probability 0 (top-k, top-p, min-p or min_new_tokens on). When False the
        sampling distribution is the softmax of ``scores / temperature`` over the whole vocabulary."""
        return bool(self.top_k or self.top_p < 1.0 or self.min_p > 0.0 or self.min_new_tokens)

    def truncation_warpers(self) -> list[LogitsProcessor]:
        """Steps 3-5, transformers' warpers in transformers' order: top-k, top-p, min-p (only those that are on).
        Each maps ``(rows, V)`` scores to scores with -inf outside the kept set, and ignores ``input_ids``."""
        out: list[LogitsProcessor] = []
        if self.top_k:
            out.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            out.append(TopPLogitsWarper(self.top_p))
        if self.min_p > 0.0:
            out.append(MinPLogitsWarper(self.min_p))
        return out

    def processors(self, prompt_length: int, eos_token_id: int | Sequence[int] | None = None) -> LogitsProcessorList:
        """Steps 1-5 as the logits processors of one ``generate`` call over prompts ``prompt_length`` wide
        (left-padded); a drawing processor goes after them. eos_token_id: when the spec has none."""
        eos = self.eos_ids or _eos_tuple(eos_token_id)
        out = LogitsProcessorList()
        if self.min_new_tokens and eos is not None:
            out.append(MinNewTokensEOS(self.min_new_tokens, eos, prompt_length))
        if self.temperature != 1.0:
            out.append(TemperatureLogitsWarper(self.temperature))
        out.extend(self.truncation_warpers())
        return out


class MinNewTokensEOS(LogitsProcessor):
    """EOS -> -inf at new-token positions < ``min_new_tokens`` (step 1), for ``generate`` and for the log-probs.

    As a logits processor: ``(N, Q + t)`` input ids and ``(N, V)`` scores of new position ``t = input_ids.shape[1] -
    prompt_length``. :meth:`at_positions`: ``(b, t, V)`` scores of response positions ``positions (t,)``. The same
    values as transformers' MinNewTokensLengthLogitsProcessor, which cannot score many positions at once.
    """

    def __init__(self, min_new_tokens: int, eos_token_id: int | Sequence[int], prompt_length: int = 0):
        self.min_new_tokens = min_new_tokens
        self.eos = _eos_tuple(eos_token_id)
        self.prompt_length = prompt_length

    def _eos_mask(self, vocab: int, device: torch.device) -> torch.Tensor:
        mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        mask[list(self.eos)] = True
        return mask

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] - self.prompt_length >= self.min_new_tokens:
            return scores
        return scores.masked_fill(self._eos_mask(scores.shape[-1], scores.device), float("-inf"))

    def at_positions(self, scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``(b, t, V)`` scores of response positions ``positions (t,)`` -> the same with EOS at -inf where
        ``position < min_new_tokens``."""
        early = positions.to(scores.device) < self.min_new_tokens                       # (t,)
        if not bool(early.any()):
            return scores
        mask = early[:, None] & self._eos_mask(scores.shape[-1], scores.device)[None, :]  # (t, V)
        return scores.masked_fill(mask, float("-inf"))


def _truncate_fn(spec: SamplingSpec):
    """``(b, t, V)`` float scores (already divided by the temperature) and their response positions ``(t,)`` ->
    the scores with -inf outside the sampling support (steps 1, 3-5)."""
    min_new = None
    if spec.min_new_tokens:
        if spec.eos_ids is None:
            raise ValueError("a SamplingSpec with min_new_tokens > 0 needs eos_token_id to score tokens "
                             "(SamplingSpec.from_config(cfg.rollout, eos_token_id=tokenizer.eos_token_id))")
        min_new = MinNewTokensEOS(spec.min_new_tokens, spec.eos_ids)
    warpers = spec.truncation_warpers()

    def truncate(scores: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """keep: ``(b, t)`` token ids that stay in the support of steps 3-5 (see sampling_logprobs' keep_token)."""
        if min_new is not None:
            scores = min_new.at_positions(scores, positions)
        b, t, v = scores.shape
        flat = scores.reshape(b * t, v)  # the warpers are row-wise; TopP scatters along dim 1
        if keep is not None and warpers:
            keep = keep.reshape(b * t, 1)
            kept_scores = flat.gather(1, keep)
        for w in warpers:
            flat = w(None, flat)
        if keep is not None and warpers:
            flat = flat.scatter(1, keep, kept_scores)
        return flat.reshape(b, t, v)

    return truncate


class _TruncatedSelectiveLogSoftmax(torch.autograd.Function):
    """``log_softmax(truncate(logits))[index]``, chunked like rlhf.core.logprobs.selective_log_softmax: at most
    ``chunk_size`` rows of the vocabulary are materialised in float32 at once, forward and backward (which recomputes
    the truncation rather than storing an ``(N, R, V)`` mask). keep_token: the scored token stays in the support of
    top-k / top-p / min-p."""

    @staticmethod
    def forward(ctx, logits, index, truncate, chunk_size, keep_token):
        batch, seq_len, _ = logits.shape
        dtype = _compute_dtype(logits.dtype)
        out = torch.empty((batch, seq_len), dtype=dtype, device=logits.device)
        lse = torch.empty((batch, seq_len), dtype=dtype, device=logits.device)
        for rows, cols in _blocks(batch, seq_len, chunk_size):
            positions = torch.arange(cols.start, cols.stop, device=logits.device)
            chunk = truncate(logits[rows, cols].to(dtype), positions, index[rows, cols] if keep_token else None)
            chunk_lse = torch.logsumexp(chunk, dim=-1)
            out[rows, cols] = chunk.gather(-1, index[rows, cols].unsqueeze(-1)).squeeze(-1) - chunk_lse
            lse[rows, cols] = chunk_lse
        ctx.save_for_backward(logits, index, lse, out)
        ctx.truncate, ctx.chunk_size, ctx.keep_token = truncate, chunk_size, keep_token
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, index, lse, out = ctx.saved_tensors
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        batch, seq_len, _ = logits.shape
        for rows, cols in _blocks(batch, seq_len, ctx.chunk_size):
            positions = torch.arange(cols.start, cols.stop, device=logits.device)
            chunk = ctx.truncate(logits[rows, cols].to(lse.dtype), positions,
                                 index[rows, cols] if ctx.keep_token else None)
            # A token outside the support has log-prob -inf whatever the logits nearby: gradient 0, not NaN.
            g = grad_out[rows, cols].to(lse.dtype).masked_fill(torch.isneginf(out[rows, cols]), 0).unsqueeze(-1)
            # d log p_i / d z_j = 1[i == j] - p_j over the kept tokens; truncated tokens have p_j = 0. The kept set is
            # piecewise constant in the logits, so it contributes no gradient of its own.
            chunk_grad = (chunk - lse[rows, cols].unsqueeze(-1)).exp_().mul_(-g)
            grad_logits[rows, cols] = chunk_grad.scatter_add_(-1, index[rows, cols].unsqueeze(-1), g)
        return grad_logits, None, None, None, None


def _truncated_entropy(logits: torch.Tensor, truncate, chunk_size: int) -> torch.Tensor:
    """``(N, R)`` entropy of ``softmax(truncate(logits))``, no gradient, ``chunk_size`` rows at a time."""
    batch, seq_len, _ = logits.shape
    out = torch.empty((batch, seq_len), dtype=_compute_dtype(logits.dtype), device=logits.device)
    with torch.no_grad():
        for rows, cols in _blocks(batch, seq_len, chunk_size):
            positions = torch.arange(cols.start, cols.stop, device=logits.device)
            chunk = truncate(logits[rows, cols].to(out.dtype), positions)
            out[rows, cols] = entropy_from_logits(chunk, chunk_size=chunk_size)
    return out


def sampling_logprobs(logits: torch.Tensor, response_ids: torch.Tensor, spec: SamplingSpec, *,
                      response_mask: torch.Tensor | None = None, chunk_size: int | None = None,
                      with_entropy: bool = False, keep_token: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of ``response_ids (N, R)`` under the sampling distribution of ``spec`` built on ``logits (N, R, V)``
    (``logits[:, t]`` predicts ``response_ids[:, t]``, position ``t`` of the response), and, if asked, its entropy
    ``(N, R)`` (no gradient). Differentiable in the logits.

    Without truncation (``spec.truncates`` False) these are exactly the ops of the temperature-only code:
    ``logits / T`` (skipped at T = 1), then the full log-softmax: the same bits. With truncation, the log-softmax runs
    over the support only (renormalised), and positions where ``response_mask (N, R)`` is 0 (padding after EOS) hold
    0 rather than a value a masked sum could turn into NaN.

    keep_token (default True): the scored token itself always stays in the top-k / top-p / min-p support, so the
    result is ``z_y - logsumexp(support + {y})``. For a token inside the support (every token the sampler drew, scored
    with the weights and precision that drew it) that is exactly its log-prob under the sampling distribution. It
    differs only where the exact value is -inf: a drawn token that a lower-precision forward (bf16 autocast) puts just
    outside a top-k / top-p / min-p boundary, or one that left the support as the weights moved during the update;
    there it is finite (about the token's log-prob renormalised with it in the support) rather than a -inf that would
    make a KL or a ratio statistic infinite. EOS before min_new_tokens is excluded exactly either way (it is never
    drawn there). keep_token False: exact, -inf (gradient 0) outside the support.

    chunk_size: rows of the vocabulary softmaxed at once; None = ``rlhf.core.logprobs.chunk_rows`` (a 16 MiB block).
    """
    chunk_size = chunk_rows(logits.shape[-1], chunk_size)
    if spec.temperature != 1.0:
        logits = TemperatureLogitsWarper(spec.temperature)(None, logits)  # = logits / T, as before
    if not spec.truncates:
        logprobs = selective_log_softmax(logits, response_ids, chunk_size=chunk_size)
        entropy = entropy_from_logits(logits.detach(), chunk_size=chunk_size) if with_entropy else None
        return logprobs, entropy
    truncate = _truncate_fn(spec)
    logprobs = _TruncatedSelectiveLogSoftmax.apply(logits, response_ids.long(), truncate, chunk_size, keep_token)
    if response_mask is not None:
        logprobs = torch.where(response_mask.bool(), logprobs, torch.zeros((), dtype=logprobs.dtype,
                                                                           device=logprobs.device))
    entropy = _truncated_entropy(logits.detach(), truncate, chunk_size) if with_entropy else None
    return logprobs, entropy
