"""Counter-based sampling: the same samples for any number of processes and any batch split; and
:func:`minibatch_rows`, the same PPO minibatches for any number of processes.

torch's sampler draws from one generator stream, so which random numbers a row gets depends on how many rows came
before it in the batch, i.e. on the number of processes. Here the random number of row ``n`` at new-token position
``t`` is a pure function of ``(seed, step, n, t)``: a hash of those counters. The token is then drawn by inverse
CDF,

    token = min { v : cdf[n, v] > u(seed, step, n, t) * cdf[n, V - 1] },   cdf = cumsum(softmax(scores[n]))

which samples exactly from ``softmax(scores[n])``. Row ``n`` of the global batch therefore gets the same token
whether one process generates the whole batch or rank 3 of 8 generates its share.

The hash is Thomas Mueller's 32-bit integer finaliser (``x ^= x >> 16; x *= 0x45d9f3b``), computed in int64 lanes
that hold values below 2**32: the multiplier is below 2**31, so no product overflows int64 and the result is the
same on every device. Only ``N`` numbers are hashed per token, so the cost is one softmax, one cumsum and one
binary search per row: what ``torch.multinomial`` does.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

_MASK32 = 0xFFFFFFFF
_MUL = 0x45D9F3B
_GOLDEN = 0x9E3779B9  # 2**32 / golden ratio: spreads consecutive counters before hashing


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Hash int64 values in ``[0, 2**32)`` to int64 values in ``[0, 2**32)``, elementwise; any shape."""
    x = x & _MASK32
    for _ in range(3):
        x = x ^ (x >> 16)
        x = (x * _MUL) & _MASK32
    return x ^ (x >> 16)


def _fold(h: torch.Tensor, value) -> torch.Tensor:
    """Absorb one more non-negative counter into hash state ``h`` ``(..., 2)`` (two 32-bit lanes).

    ``value``: int, or int64 tensor of shape ``h.shape[:-1]``. The counter is hashed before it is mixed in, so
    counters that differ in one low bit (rows 4 and 5) do not give states that differ in one bit.
    """
    value = torch.as_tensor(value, dtype=torch.int64, device=h.device).unsqueeze(-1)
    h = mix32(h ^ mix32(value & _MASK32 ^ _GOLDEN))
    return mix32(h ^ mix32((value >> 32) & _MASK32))


# Start states of the two lanes (hex digits of pi): the lanes see the same counters but start apart, so together
# they hold 64 bits and two (row, position) counters share a uniform with probability ~2**-53, not ~2**-32.
_START = (0x243F6A88, 0x85A308D3)


def row_keys(seed: int, step: int, rows: torch.Tensor) -> torch.Tensor:
    """``(N, 2)`` int64 hash state of each row for one step: a function of ``(seed, step, global row index)`` only.

    ``rows (N,)`` holds the rows' indices in the global batch (for rank r of a split batch, ``r * N_local +
    arange(N_local)``).
    """
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be non-negative for counter sampling, got seed={seed} step={step}")
    h = torch.tensor(_START, dtype=torch.int64, device=rows.device).expand(*rows.shape, 2)
    return _fold(_fold(_fold(h, seed), step), rows.to(torch.int64))


def counter_uniform(keys: torch.Tensor, position: int | torch.Tensor) -> torch.Tensor:
    """Float64 uniforms in the open interval (0, 1) for decoding ``position`` (0 = first new token).

    keys: ``(N, 2)`` from :func:`row_keys`. position: an int, giving ``(N,)``, or a ``(T,)`` int64 tensor of
    positions, giving the ``(N, T)`` table (column j = the int call at ``position[j]``, bit for bit). 53 random bits
    per value: ``(k + 0.5) / 2**53`` for an integer ``k``.
    """
    if isinstance(position, torch.Tensor):
        n, t = keys.shape[0], position.shape[0]
        keys = keys.unsqueeze(1).expand(n, t, 2)
        position = position.to(keys.device, torch.int64).expand(n, t)
    h = _fold(keys, position)                  # (..., 2): 32 bits in each lane
    bits = h[..., 0] << 21 | h[..., 1] >> 11   # 53 bits
    return (bits.to(torch.float64) + 0.5) / float(1 << 53)


def inverse_cdf_sample(scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``(N,)`` token ids drawn from ``softmax(scores)`` (``(N, V)``, -inf = excluded) with uniforms ``u`` ``(N,)``.

    The token whose CDF interval contains ``u``; tokens of probability 0 have empty intervals and are never drawn.
    """
    probs = torch.softmax(scores.float(), dim=-1)
    cdf = probs.cumsum(-1, dtype=torch.float64)                            # (N, V)
    target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)                 # (N, 1), scaled: cdf[-1] may be 1 - eps
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)          # first v with cdf[v] > target
    return idx.clamp_(max=scores.shape[-1] - 1)


class DrawingSampler(LogitsProcessor):
    """Last logits processor of a greedy ``generate``: draws the next token from ``softmax(scores)`` (the scores the
    processors before it left: the sampling distribution) and returns scores whose argmax is that token (0 there,
    -inf elsewhere), so greedy decoding emits the draw and transformers applies no sampling step of its own.

    record: keep the log-prob of each drawn token under the distribution it was drawn from,
    ``scores[token] - logsumexp(scores)`` in float32; :meth:`logprobs` gives them as ``(N, steps)``.
    """

    def __init__(self, record: bool = False):
        self.record = record
        self._logprobs: list[torch.Tensor] = []

    def draw(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        """``(N,)`` token ids drawn from ``softmax(scores)``, ``scores (N, V)``."""
        raise NotImplementedError

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        token = self.draw(input_ids, scores)
        if self.record:
            s = scores.float()
            self._logprobs.append(s.gather(1, token.unsqueeze(1)).squeeze(1) - torch.logsumexp(s, dim=-1))
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, token.unsqueeze(1), 0.0)

    def logprobs(self) -> torch.Tensor:
        """``(N, steps)`` float32 log-probs of the tokens drawn so far (needs ``record=True``)."""
        if not self.record:
            raise RuntimeError("this sampler was built with record=False")
        return torch.stack(self._logprobs, 1)


class CounterSampler(DrawingSampler):
    """Draws the token by :func:`inverse_cdf_sample` with counter-based uniforms.

    keys: ``(N, 2)`` from :func:`row_keys`; prompt_length: the width of the (padded) prompt, so that the position
    counter is the index of the new token (0 for the first), whatever padding the batch needed. max_new_tokens: when
    given, the uniforms of every position are hashed once, up front, as one ``(N, max_new_tokens)`` table: on a GPU
    decoding is bound by kernel launches, and hashing per token costs about fifty small kernels each time.
    """

    def __init__(self, keys: torch.Tensor, prompt_length: int, max_new_tokens: int | None = None,
                 record: bool = False):
        super().__init__(record)
        self.keys = keys
        self.prompt_length = prompt_length
        self.table = None
        if max_new_tokens:
            self.table = counter_uniform(keys, torch.arange(max_new_tokens, device=keys.device))

    def draw(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        position = input_ids.shape[1] - self.prompt_length
        if self.table is not None and position < self.table.shape[1]:
            u = self.table[:, position]
        else:
            u = counter_uniform(self.keys, position)  # keys live on the scores' device
        return inverse_cdf_sample(scores, u)


class TorchSampler(DrawingSampler):
    """Draws the token with torch's global RNG, exactly as transformers' own sampling step does
    (``torch.multinomial(softmax(scores), 1)``: the same ops, the same random numbers consumed)."""

    def draw(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        probs = torch.nn.functional.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)


SHUFFLES = ["process", "global"]


def minibatch_rows(n: int, minibatches: int, world: int, rank: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's minibatches for process ``rank`` of ``world`` (``trainer.shuffle=global``): ``minibatches`` int64
    tensors of ``n // minibatches`` local row indices in ``[0, n)``, ``n`` the rows each process holds.

    The global batch (``n * world`` rows; process r holds rows ``[r * n, (r + 1) * n)``) is cut into blocks of
    ``minibatches`` consecutive rows, and each block sends one of its rows to each minibatch, in an order drawn
    from ``generator`` for every block of the global batch (the same draw on every process). ``n`` is a multiple
    of ``minibatches``, so a process holds whole blocks: every minibatch gets exactly ``n // minibatches`` of its
    rows, and the processes' minibatches together are the minibatches of one process holding the whole batch,
    whatever the number of processes.
    """
    if n % minibatches:
        raise ValueError(f"{n} rows per process do not split into {minibatches} minibatches")
    per = n // minibatches
    order = torch.rand(n * world // minibatches, minibatches, generator=generator).argsort(dim=1)  # (blocks, M)
    mine = order[rank * per:(rank + 1) * per]                 # (per, M): this process's blocks
    starts = torch.arange(per) * minibatches                  # (per,): each block's first local row
    return [starts + mine[:, j] for j in range(minibatches)]
