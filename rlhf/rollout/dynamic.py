"""DAPO's dynamic sampling and overlong reward shaping (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement
Learning System at Scale"), as pure functions of the batch.

Dynamic sampling: a group whose K scores are all equal has zero advantage under every group baseline (GRPO, RLOO,
Dr. GRPO), so it costs a forward and backward and teaches nothing. With ``rollout.max_resample_rounds = M > 0`` the
trainer samples up to M more rounds of fresh prompts and fills the batch with informative groups first
(:func:`fill_groups`); when the rounds run out, uninformative groups fill what is left (logged), so the batch keeps
its size on every process.

Overlong shaping (:func:`overlong_penalty`): a response that ends in the last ``buffer`` tokens before the length cap
gets a penalty that grows linearly from 0 to ``-factor`` at the cap, so the policy learns to finish before it is cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf.rewards.sources import Scored
from rlhf.rollout.batch import Rollout


def informative_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(N,)`` scores, K consecutive rows per prompt -> ``(N // K,)`` bool: True where the group's scores are not all
    equal (exactly: max > min)."""
    if scores.dim() != 1 or scores.shape[0] % group_size:
        raise ValueError(f"scores must be (N,) with N a multiple of group_size={group_size}, got "
                         f"{tuple(scores.shape)}")
    g = scores.reshape(-1, group_size)
    return g.amax(-1) > g.amin(-1)


def fill_groups(informative: Sequence[torch.Tensor], target: int) -> tuple[torch.Tensor, int]:
    """Which groups make the batch: the first ``target`` informative ones in round order, then (if too few) the first
    uninformative ones.

    informative: one ``(G_r,)`` bool tensor per round. Returns ``(target,)`` int64 indices into the rounds'
    concatenated groups, in increasing order, and how many of them are uninformative fillers.
    """
    flags = torch.cat([f.cpu() for f in informative])
    if flags.numel() < target:
        raise ValueError(f"{flags.numel()} groups sampled, fewer than the {target} the batch needs")
    good = torch.nonzero(flags).flatten()[:target]
    fillers = target - good.numel()
    bad = torch.nonzero(~flags).flatten()[:fillers]
    return torch.cat([good, bad]).sort().values, fillers


def _pad_cat(tensors: list[torch.Tensor | None], left: bool, value: float = 0) -> torch.Tensor | None:
    """Concatenate ``(n_i, L_i)`` tensors along rows, padding each to the longest L (on the left or right)."""
    if any(t is None for t in tensors):
        return None
    width = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        pad = (width - t.shape[1], 0) if left else (0, width - t.shape[1])
        padded.append(torch.nn.functional.pad(t, pad, value=value))
    return torch.cat(padded)


def concat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """Rows of several rollouts as one: prompts left-padded and responses right-padded to the longest (masks 0 there,
    ids ``pad_token_id``, other per-token fields 0)."""
    if len(parts) == 1:
        return parts[0]
    fields = {}
    for name in Rollout._fields:
        values = [getattr(p, name) for p in parts]
        if name == "scores":
            fields[name] = torch.cat(values)
        elif name in ("query_ids", "query_mask"):
            fields[name] = _pad_cat(values, left=True, value=pad_token_id if name == "query_ids" else 0)
        else:
            fields[name] = _pad_cat(values, left=False, value=pad_token_id if name == "response_ids" else 0)
    return Rollout(**fields)


def select_rows(ro: Rollout, rows: torch.Tensor) -> Rollout:
    """The rollout's ``rows``, response columns cut to the longest selected response."""
    rows = rows.to(ro.response_ids.device)
    mask = ro.response_mask[rows]
    width = max(int(mask.sum(-1).max()), 1)
    q_width = max(int(ro.query_mask[rows].sum(-1).max()), 1)
    out = {}
    for name, v in ro._asdict().items():
        if v is None or name == "scores":
            out[name] = v if v is None else v[rows]
        elif name.startswith("query"):
            out[name] = v[rows, v.shape[1] - q_width:]
        else:
            out[name] = v[rows, :width]
    return Rollout(**out)


def concat_scored(parts: list[Scored]) -> Scored:
    """Several rounds' scores as one (rows in order)."""
    if len(parts) == 1:
        return parts[0]
    gold = None if parts[0].gold is None else torch.cat([p.gold for p in parts])
    by_source = {k: torch.cat([p.by_source[k] for p in parts]) for k in parts[0].by_source}
    return Scored(torch.cat([p.total for p in parts]), by_source, gold, [c for p in parts for c in p.completions])


def select_scored(s: Scored, rows: torch.Tensor) -> Scored:
    """The scores of ``rows``."""
    idx = rows.tolist()
    return Scored(s.total[rows.to(s.total.device)], {k: v[rows.to(v.device)] for k, v in s.by_source.items()},
                  None if s.gold is None else s.gold[rows.to(s.gold.device)], [s.completions[i] for i in idx])


def overlong_buffer_tokens(buffer: float | int | None, max_new_tokens: int) -> int:
    """``reward.overlong_buffer`` in tokens: an int >= 1 is a token count; a float in (0, 1) is a share of
    ``max_new_tokens`` (DAPO: 4096 of 20480 = 0.2), rounded, at least 1; None or 0 = off (0)."""
    if buffer is None or buffer == 0:
        return 0
    if isinstance(buffer, float) and 0 < buffer < 1:
        return max(1, round(buffer * max_new_tokens))
    if float(buffer) != int(buffer) or not 1 <= buffer <= max_new_tokens:
        raise ValueError(f"reward.overlong_buffer must be a token count in [1, rollout.max_new_tokens="
                         f"{max_new_tokens}] or a share in (0, 1), got {buffer!r}")
    return int(buffer)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment. ``lengths (N,)`` response lengths in tokens -> ``(N,)`` penalties <= 0:
    0 for ``L <= max_new_tokens - buffer``, ``factor * (max_new_tokens - buffer - L) / buffer`` above (reaching
    ``-factor`` at the cap). ``buffer = 0``: all zeros."""
    if buffer == 0:
        return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
    start = max_new_tokens - buffer
    return factor * (start - lengths.float()).clamp(max=0) / buffer


def add_overlong_penalty(scored: Scored, response_mask: torch.Tensor, max_new_tokens: int, buffer: int,
                         factor: float) -> Scored:
    """``scored`` with :func:`overlong_penalty` added to its total and logged as the source ``overlong``; unchanged
    when ``buffer`` is 0."""
    if buffer == 0:
        return scored
    penalty = overlong_penalty(response_mask.sum(-1), max_new_tokens, buffer, factor).to(scored.total.device)
    return scored._replace(total=scored.total + penalty, by_source={**scored.by_source, "overlong": penalty})
