"""Shared loss functions and masked reductions; every trainer uses these instead of re-implementing them.

Conventions:
    * `reduction` is one of "mean" (default), "sum", "none".
    * Half-precision (bf16/fp16) inputs are upcast to float32 before any arithmetic and the result is float32;
      float32/float64 inputs keep their dtype.
    * Shapes must match exactly: nothing is broadcast, because a silently broadcast `(B,)` vs `(B, 1)` target
      is a classic wrong-loss bug.
    * Masks are bool, integer 0/1 or float 0/1 tensors of the same shape as the values they mask. Masked-out
      values never reach the arithmetic (selected away with `torch.where`), so padding holding NaN or 1e6
      cannot change a result.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rlhf.core.logprobs import DEFAULT_CHUNK_SIZE, selective_log_softmax

REDUCTIONS = ("mean", "sum", "none")

Dim = int | tuple[int, ...] | None


def _check_tensor(name: str, x: object) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _check_float(name: str, x: object) -> None:
    _check_tensor(name, x)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {x.dtype}")


def _check_int(name: str, x: object) -> None:
    _check_tensor(name, x)
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer (class index) tensor, got dtype {x.dtype}")


def _check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b} must have the same shape as {name_a} {tuple(a.shape)}, got {tuple(b.shape)}"
        )


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _as_bool_mask(mask: object, x: torch.Tensor, name: str = "mask") -> torch.Tensor:
    _check_tensor(name, mask)
    _check_same_shape("x", x, name, mask)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(f"{name} must be a bool, integer or float 0/1 tensor, got dtype {mask.dtype}")
    # A fractional "mask" is a weighting, which these functions do not implement; refuse rather than binarise.
    if mask.numel() and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{name} must contain only 0 and 1 (or be bool)")
    return mask != 0


def _regression_inputs(input: object, target: object) -> tuple[torch.Tensor, torch.Tensor]:
    _check_float("input", input)
    _check_float("target", target)
    _check_same_shape("input", input, "target", target)
    return _upcast(input), _upcast(target)


def mse(input: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Squared error `(input - target)^2`.

    Args:
        input: `(*)` float predictions.
        target: `(*)` float targets, same shape as `input`.
        reduction: "mean" -> `()`, "sum" -> `()`, "none" -> `(*)`.
    """
    _check_reduction(reduction)
    input, target = _regression_inputs(input, target)
    return _reduce((input - target) ** 2, reduction)


def rmse(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Root mean squared error `sqrt(mean((input - target)^2))`, in the units of `target`.

    Args:
        input: `(*)` float predictions.
        target: `(*)` float targets, same shape as `input`.

    Returns:
        `()` scalar.
    """
    return torch.sqrt(mse(input, target, reduction="mean"))


def mae(input: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Absolute error `|input - target|`.

    Args:
        input: `(*)` float predictions.
        target: `(*)` float targets, same shape as `input`.
        reduction: "mean" -> `()`, "sum" -> `()`, "none" -> `(*)`.
    """
    _check_reduction(reduction)
    input, target = _regression_inputs(input, target)
    return _reduce((input - target).abs(), reduction)


def huber(
    input: torch.Tensor, target: torch.Tensor, delta: float = 1.0, reduction: str = "mean"
) -> torch.Tensor:
    """Huber loss: `0.5 e^2` if `|e| <= delta` else `delta * (|e| - 0.5 delta)`, with `e = input - target`.

    Args:
        input: `(*)` float predictions.
        target: `(*)` float targets, same shape as `input`.
        delta: positive threshold where the loss turns from quadratic to linear.
        reduction: "mean" -> `()`, "sum" -> `()`, "none" -> `(*)`.
    """
    _check_reduction(reduction)
    if not isinstance(delta, int | float) or isinstance(delta, bool) or not delta > 0:
        raise ValueError(f"delta must be a positive number, got {delta!r}")
    input, target = _regression_inputs(input, target)
    abs_err = (input - target).abs()
    loss = torch.where(abs_err <= delta, 0.5 * abs_err**2, delta * (abs_err - 0.5 * delta))
    return _reduce(loss, reduction)


def binary_cross_entropy(
    probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-7, reduction: str = "mean"
) -> torch.Tensor:
    """Binary cross-entropy `-(y log p + (1 - y) log(1 - p))` from probabilities.

    Prefer `binary_cross_entropy_with_logits` whenever logits are available: it does not need `eps`.

    Args:
        probs: `(*)` float probabilities in [0, 1]; clamped to `[eps, 1 - eps]` so that log(0) cannot occur.
        target: `(*)` float labels in [0, 1] (soft labels allowed), same shape as `probs`.
        eps: clamp margin, in (0, 0.5).
        reduction: "mean" -> `()`, "sum" -> `()`, "none" -> `(*)`.
    """
    _check_reduction(reduction)
    if not isinstance(eps, int | float) or isinstance(eps, bool) or not 0 < eps < 0.5:
        raise ValueError(f"eps must be a number in (0, 0.5), got {eps!r}")
    _check_float("probs", probs)
    _check_float("target", target)
    _check_same_shape("probs", probs, "target", target)
    # Logits passed by mistake would be silently clamped into a plausible-looking loss.
    if probs.numel() and bool(((probs < 0) | (probs > 1)).any()):
        raise ValueError("probs must lie in [0, 1]; pass logits to binary_cross_entropy_with_logits instead")
    p = _upcast(probs).clamp(eps, 1 - eps)
    y = _upcast(target)
    return _reduce(-(y * torch.log(p) + (1 - y) * torch.log1p(-p)), reduction)


def binary_cross_entropy_with_logits(
    logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Binary cross-entropy from logits, `-(y log sigmoid(z) + (1 - y) log sigmoid(-z))`, stable for any `z`.

    Args:
        logits: `(*)` float logits.
        target: `(*)` float labels in [0, 1] (soft labels allowed), same shape as `logits`.
        reduction: "mean" -> `()`, "sum" -> `()`, "none" -> `(*)`.
    """
    _check_reduction(reduction)
    _check_float("logits", logits)
    _check_float("target", target)
    _check_same_shape("logits", logits, "target", target)
    z = _upcast(logits)
    y = _upcast(target)
    return _reduce(-(y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z)), reduction)


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """Categorical cross-entropy `-log softmax(logits)[target]` with class-index targets.

    Args:
        logits: `(*, num_classes)` float logits.
        target: `(*)` integer class indices in `[0, num_classes)`, or `ignore_index` for positions to skip.
        ignore_index: target value whose positions are excluded from the loss.
        reduction: "mean" -> `()` mean over non-ignored positions (0 if there are none), "sum" -> `()`,
            "none" -> `(*)` with 0 at ignored positions.
    """
    _check_reduction(reduction)
    _check_float("logits", logits)
    _check_int("target", target)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(
            f"logits must have shape (*, num_classes) with num_classes > 0, got {tuple(logits.shape)}"
        )
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(target.shape)}"
        )
    num_classes = logits.shape[-1]
    keep = target != ignore_index
    if bool((keep & ((target < 0) | (target >= num_classes))).any()):
        raise ValueError(f"target values must be in [0, {num_classes}) or equal ignore_index={ignore_index}")
    safe_target = torch.where(keep, target, torch.zeros_like(target))
    logp = selective_log_softmax(logits.reshape(1, -1, num_classes), safe_target.reshape(1, -1))
    nll = torch.where(
        keep, -logp.reshape(target.shape), torch.zeros((), dtype=logp.dtype, device=logp.device)
    )
    if reduction == "mean":
        return _masked_mean(nll, keep, None)
    return _reduce(nll, reduction)


def lm_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Next-token loss `-1/n sum_t log P(x_t | x_<t)`: `logits[:, t]` is scored against `input_ids[:, t + 1]`.

    Args:
        logits: `(batch, seq_len, vocab)` float logits.
        input_ids: `(batch, seq_len)` integer token ids in `[0, vocab)`; `seq_len >= 2`.
        mask: optional `(batch, seq_len)` 0/1 or bool mask over TARGET positions of `input_ids`
            (only `mask[:, 1:]` is used, since position 0 is never predicted). None counts every token.
        reduction: "mean" -> `()` mean over counted tokens (0 if none), "sum" -> `()`,
            "none" -> `(batch, seq_len - 1)` per-token loss with 0 where masked.
        chunk_size: rows softmaxed at once; None = a 16 MiB block (see `rlhf.core.logprobs.selective_log_softmax`).
    """
    _check_reduction(reduction)
    _check_float("logits", logits)
    _check_int("input_ids", input_ids)
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (batch, seq_len, vocab), got {tuple(logits.shape)}")
    if input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"input_ids must have shape (batch, seq_len) = {tuple(logits.shape[:2])}, got {tuple(input_ids.shape)}"
        )
    if input_ids.shape[1] < 2:
        raise ValueError(
            f"input_ids must have seq_len >= 2 to have a next token, got seq_len {input_ids.shape[1]}"
        )
    vocab = logits.shape[-1]
    if bool(((input_ids < 0) | (input_ids >= vocab)).any()):
        raise ValueError(f"input_ids values must be in [0, {vocab})")
    logp = selective_log_softmax(logits[:, :-1], input_ids[:, 1:], chunk_size=chunk_size)
    if mask is None:
        keep = torch.ones_like(logp, dtype=torch.bool)
    else:
        keep = _as_bool_mask(mask, input_ids, name="mask")[:, 1:]
    nll = torch.where(keep, -logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    if reduction == "mean":
        return _masked_mean(nll, keep, None)
    return _reduce(nll, reduction)


def perplexity(loss: float | torch.Tensor) -> float | torch.Tensor:
    """Perplexity `exp(loss)` of a mean next-token loss in nats.

    Args:
        loss: a Python number, or a float tensor of any shape `(*)`.

    Returns:
        A float for a number, else a `(*)` tensor.
    """
    if isinstance(loss, torch.Tensor):
        _check_float("loss", loss)
        return torch.exp(loss)
    if isinstance(loss, bool) or not isinstance(loss, int | float):
        raise TypeError(f"loss must be a number or a float tensor, got {type(loss).__name__}")
    return math.exp(loss)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """KL(P || Q) = sum_x P(x) log(P(x) / Q(x)) between the categoricals `softmax(p_logits)`, `softmax(q_logits)`.

    Args:
        p_logits: `(*, num_classes)` float logits of P; `-inf` marks impossible classes.
        q_logits: `(*, num_classes)` float logits of Q, same shape.
        reduction: "mean" -> `()` mean over rows, "sum" -> `()`, "none" -> `(*)` per-row KL.
    """
    _check_reduction(reduction)
    _check_float("p_logits", p_logits)
    _check_float("q_logits", q_logits)
    _check_same_shape("p_logits", p_logits, "q_logits", q_logits)
    if p_logits.dim() < 1 or p_logits.shape[-1] == 0:
        raise ValueError(
            f"p_logits must have shape (*, num_classes) with num_classes > 0, got {tuple(p_logits.shape)}"
        )
    log_p = torch.log_softmax(_upcast(p_logits), dim=-1)
    log_q = torch.log_softmax(_upcast(q_logits), dim=-1)
    p = log_p.exp()
    # Classes with P(x) = 0 contribute 0 by convention; 0 * (-inf) would otherwise be NaN.
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros((), dtype=p.dtype, device=p.device))
    return _reduce(terms.sum(dim=-1), reduction)


def _masked_sum(x: torch.Tensor, keep: torch.Tensor, dim: Dim) -> torch.Tensor:
    kept = torch.where(keep, _upcast(x), torch.zeros((), dtype=_upcast(x).dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def _masked_mean(x: torch.Tensor, keep: torch.Tensor, dim: Dim) -> torch.Tensor:
    total = _masked_sum(x, keep, dim)
    count = keep.sum() if dim is None else keep.sum(dim=dim)
    return torch.where(count > 0, total / count.clamp_min(1).to(total.dtype), torch.zeros_like(total))


def _masked_var(x: torch.Tensor, keep: torch.Tensor, unbiased: bool) -> torch.Tensor:
    mean = _masked_mean(x, keep, None)
    sq_dev = _masked_sum((_upcast(x) - mean) ** 2, keep, None)
    n = keep.sum()
    denom = n - 1 if unbiased else n
    return torch.where(denom > 0, sq_dev / denom.clamp_min(1).to(sq_dev.dtype), torch.zeros_like(sq_dev))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    """Sum of `x` over positions where `mask` is set.

    Args:
        x: `(*)` float values.
        mask: `(*)` bool or 0/1 mask, same shape as `x`.
        dim: dim(s) to reduce; None reduces everything to `()`.

    Returns:
        `x` reduced over `dim`; an all-masked slice sums to 0.
    """
    _check_float("x", x)
    return _masked_sum(x, _as_bool_mask(mask, x), dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is set.

    Args:
        x: `(*)` float values.
        mask: `(*)` bool or 0/1 mask, same shape as `x`.
        dim: dim(s) to reduce; None reduces everything to `()`.

    Returns:
        `x` reduced over `dim`; an all-masked slice has mean 0 (not NaN).
    """
    _check_float("x", x)
    return _masked_mean(x, _as_bool_mask(mask, x), dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over all positions where `mask` is set.

    Args:
        x: `(*)` float values.
        mask: `(*)` bool or 0/1 mask, same shape as `x`.
        unbiased: divide by `n - 1` (Bessel) instead of `n`, with `n` the number of set positions.

    Returns:
        `()` variance; 0 when it is undefined (`n == 0`, or `n == 1` with `unbiased`).
    """
    _check_float("x", x)
    return _masked_var(x, _as_bool_mask(mask, x), unbiased)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten `x` to zero mean and unit variance using the masked mean and (unbiased) masked variance.

    Args:
        x: `(*)` float values.
        mask: `(*)` bool or 0/1 mask, same shape as `x`.
        shift_mean: if False, add the mean back so only the scale changes.
        eps: positive variance floor, so a constant `x` does not divide by zero.

    Returns:
        `(*)` whitened values, 0 at masked-out positions.
    """
    _check_float("x", x)
    if not isinstance(eps, int | float) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    keep = _as_bool_mask(mask, x)
    mean = _masked_mean(x, keep, None)
    var = _masked_var(x, keep, unbiased=True)
    whitened = (_upcast(x) - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(keep, whitened, torch.zeros((), dtype=whitened.dtype, device=x.device))
