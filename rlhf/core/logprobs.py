"""Memory-aware per-token log-probabilities and entropies from `(batch, seq_len, vocab)` logits.

A full `log_softmax` over an LLM vocabulary is the largest tensor in an RL step (batch * seq_len * vocab floats,
and twice that once upcast from bf16). These helpers only ever materialise `chunk_size` rows at a time, in
float32, both in the forward pass and in their hand-written backward pass, so autograd never keeps a float32
copy of the logits alive either.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.autograd.function import once_differentiable

# None = by bytes: as many rows as keep one float32 block under CHUNK_BYTES (chunk_rows).
DEFAULT_CHUNK_SIZE: int | None = None
# 16 MiB: under glibc's largest mmap threshold (32 MiB). Larger float32 blocks are fresh mmaps that page-fault on every
# op: with SmolLM2's 49152-token vocabulary, 1024-row blocks (201 MB) cost R0 1 s a step on the 2-core VM.
CHUNK_BYTES = 16 * 2**20

Block = tuple[slice, slice]


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def chunk_rows(vocab: int, chunk_size: int | None = None) -> int:
    """Rows of a ``(rows, vocab)`` block softmaxed at once: ``chunk_size`` when given, else the most rows whose
    float32 block fits in ``CHUNK_BYTES`` (at least 1): 85 rows for a 49152-token vocabulary, 27 for 151936."""
    _check_chunk_size(chunk_size)
    return chunk_size if chunk_size is not None else max(1, CHUNK_BYTES // (4 * vocab))


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating point tensor, got dtype {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (batch, seq_len, vocab), got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty vocab dimension, got vocab size 0")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 softmax statistics lose too much precision; float64 inputs stay float64.
    return torch.promote_types(dtype, torch.float32)


def _blocks(batch: int, seq_len: int, chunk_size: int) -> Iterator[Block]:
    """Rectangular `(batch, seq_len)` blocks of at most `chunk_size` rows that tile the grid.

    Blocks are slices of the first two dims rather than slices of a flattened `(batch*seq_len, vocab)` view, so
    a non-contiguous input such as `logits[:, :-1]` is never copied to make it flattenable.
    """
    if batch == 0 or seq_len == 0:
        return
    if seq_len >= chunk_size:
        for b in range(batch):
            for t0 in range(0, seq_len, chunk_size):
                yield slice(b, b + 1), slice(t0, min(t0 + chunk_size, seq_len))
    else:
        rows_per_block = chunk_size // seq_len
        for b0 in range(0, batch, rows_per_block):
            yield slice(b0, min(b0 + rows_per_block, batch)), slice(0, seq_len)


class _SelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, index: torch.Tensor, chunk_size: int) -> torch.Tensor:
        batch, seq_len, _ = logits.shape
        dtype = _compute_dtype(logits.dtype)
        out = torch.empty((batch, seq_len), dtype=dtype, device=logits.device)
        lse = torch.empty((batch, seq_len), dtype=dtype, device=logits.device)
        for rows, cols in _blocks(batch, seq_len, chunk_size):
            chunk = logits[rows, cols].to(dtype)
            chunk_lse = torch.logsumexp(chunk, dim=-1)
            picked = chunk.gather(-1, index[rows, cols].unsqueeze(-1)).squeeze(-1)
            out[rows, cols] = picked - chunk_lse
            lse[rows, cols] = chunk_lse
        ctx.save_for_backward(logits, index, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, index, lse = ctx.saved_tensors
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        batch, seq_len, _ = logits.shape
        for rows, cols in _blocks(batch, seq_len, ctx.chunk_size):
            g = grad_out[rows, cols].to(lse.dtype).unsqueeze(-1)
            # d log p_i / d z_j = 1[i == j] - p_j. In-place ops keep the peak at about one float32 chunk;
            # `logits[rows, cols].to(...)` may be a view of the logits, so it is never modified itself.
            chunk_grad = logits[rows, cols].to(lse.dtype) - lse[rows, cols].unsqueeze(-1)
            chunk_grad.exp_().mul_(-g).scatter_add_(-1, index[rows, cols].unsqueeze(-1), g)
            grad_logits[rows, cols] = chunk_grad
        return grad_logits, None, None


class _EntropyFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, chunk_size: int) -> torch.Tensor:
        batch, seq_len, _ = logits.shape
        dtype = _compute_dtype(logits.dtype)
        out = torch.empty((batch, seq_len), dtype=dtype, device=logits.device)
        lse = torch.empty((batch, seq_len), dtype=dtype, device=logits.device)
        for rows, cols in _blocks(batch, seq_len, chunk_size):
            chunk_lse = torch.logsumexp(logits[rows, cols].to(dtype), dim=-1, keepdim=True)
            logp = logits[rows, cols].to(dtype) - chunk_lse
            p = logp.exp()
            # -inf logits (masked vocab) give p = 0 and logp = -inf; their term is 0, not 0 * -inf = NaN.
            plogp = logp.masked_fill_(p == 0, 0).mul_(p)
            out[rows, cols] = -plogp.sum(dim=-1)
            lse[rows, cols] = chunk_lse.squeeze(-1)
        ctx.save_for_backward(logits, lse, out)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, lse, entropy = ctx.saved_tensors
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        batch, seq_len, _ = logits.shape
        for rows, cols in _blocks(batch, seq_len, ctx.chunk_size):
            g = grad_out[rows, cols].to(lse.dtype).unsqueeze(-1)
            logp = logits[rows, cols].to(lse.dtype) - lse[rows, cols].unsqueeze(-1)
            p = logp.exp()
            # dH/dz_j = -p_j (log p_j + H); zero where p_j = 0 rather than 0 * -inf = NaN.
            chunk_grad = logp.add_(entropy[rows, cols].unsqueeze(-1)).masked_fill_(p == 0, 0).mul_(p).mul_(-g)
            grad_logits[rows, cols] = chunk_grad
        return grad_logits, None


def selective_log_softmax(
    logits: torch.Tensor, index: torch.Tensor, chunk_size: int | None = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """Log-probability of the chosen tokens, `log_softmax(logits)[b, t, index[b, t]]`.

    Args:
        logits: `(batch, seq_len, vocab)` float logits (any float dtype; may be a non-contiguous view such as
            `logits[:, :-1]`).
        index: `(batch, seq_len)` integer token ids in `[0, vocab)`.
        chunk_size: at most this many `(batch, seq_len)` rows are softmaxed at once, in float32 or wider; None =
            `chunk_rows(vocab)` (a 16 MiB float32 block).

    Returns:
        `(batch, seq_len)` log-probabilities, float32 for half-precision logits, else the logits' dtype.
        Differentiable with respect to `logits` (first order), with the same chunked memory bound.
    """
    _check_logits(logits)
    _check_chunk_size(chunk_size)
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be a torch.Tensor, got {type(index).__name__}")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"index must be an integer tensor of token ids, got dtype {index.dtype}")
    if index.shape != logits.shape[:2]:
        raise ValueError(
            f"index must have shape (batch, seq_len) = {tuple(logits.shape[:2])}, got {tuple(index.shape)}"
        )
    vocab = logits.shape[-1]
    # An out-of-range id is a device-side assert on CUDA; fail here with a readable message instead.
    if index.numel() and bool(((index < 0) | (index >= vocab)).any()):
        raise ValueError(
            f"index values must be in [0, {vocab}), got min {index.min().item()} max {index.max().item()}"
        )
    return _SelectiveLogSoftmax.apply(logits, index.long(), chunk_rows(vocab, chunk_size))


def entropy_from_logits(logits: torch.Tensor, chunk_size: int | None = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Entropy `-sum_v p_v log p_v` of `softmax(logits)` at every position.

    Args:
        logits: `(batch, seq_len, vocab)` float logits (any float dtype; `-inf` entries are allowed).
        chunk_size: at most this many `(batch, seq_len)` rows are softmaxed at once, in float32 or wider; None =
            `chunk_rows(vocab)`.

    Returns:
        `(batch, seq_len)` entropies in nats, float32 for half-precision logits, else the logits' dtype.
        Differentiable with respect to `logits` (first order), with the same chunked memory bound.
    """
    _check_logits(logits)
    return _EntropyFromLogits.apply(logits, chunk_rows(logits.shape[-1], chunk_size))  # chunk_rows checks it
