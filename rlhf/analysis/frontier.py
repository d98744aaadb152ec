"""Where a trained policy sits on the gold-vs-KL frontier, measured on its own samples, as an RL run measures it.

A policy trained without sampling (DPO and the other direct alignment losses) logs no KL on the way: its loss only
sees the fixed preference pairs. To put it on the frontier beside RL and best-of-n (Gao et al. 2022; Rafailov et
al. 2024, "Scaling laws for reward model overoptimization in direct alignment algorithms"), sample it:

    prompts (P,) held out   -> ``samples`` completions each from the policy, counter sampler keyed by
                               (seed, FRONTIER_STREAM, prompt * samples + j): the same uniforms at every evaluation
                               and on any number of processes
    log-probs (N, R)        -> policy under the sampling distribution (``policy_logprobs``), reference under its
                               tempered softmax (``reference_logprobs``), as the RL trainer's k1 KL
    per sequence (N,)       -> kl = sum_t (log pi(y_t) - log pi_ref(y_t)) over the response (EOS included),
                               gold = gold_fn(prompt, completion), length = response tokens
    per prompt (P,)         -> means over its ``samples`` completions
    metrics                 -> frontier/kl, frontier/gold_score, frontier/length: means over prompts;
                               frontier/kl_se, frontier/gold_se: standard errors over prompts (the samples of one
                               prompt are not independent, the prompts are)

With y drawn from pi, the summed k1 is an unbiased estimate of KL(pi || pi_ref) per sequence in nats: the quantity
an RL run logs as ``kl`` (on its training rollouts) and the one best-of-n's analytic ``log n - (n - 1) / n`` bounds.
Before any update (policy = reference, bit for bit) every k1 term is exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.rewards.functions import call_reward_function
from rlhf.rollout.batch import decode_responses
from rlhf.rollout.forward import policy_logprobs, reference_logprobs
from rlhf.rollout.hf import sample
from rlhf.rollout.sampling import row_keys
from rlhf.rollout.spec import SamplingSpec

# The counter sampler's "step" for frontier samples: apart from best-of-n's pools (1 << 48) and evaluation's
# samples (rlhf.analysis.evaluate.EVAL_STREAM = (1 << 48) + 1), past any training step.
FRONTIER_STREAM = (1 << 48) + 2

GoldFn = Callable[[list[str], list[str]], Sequence[float]]

PER_PROMPT = ("kl", "gold", "length")
"""Columns of ``prompt_means``' ``(P, 3)`` output."""


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(N,)`` summed k1 ``sum_t mask[:, t] * (logprobs[:, t] - ref_logprobs[:, t])``, in float32.

    ``logprobs``, ``ref_logprobs``, ``mask``: ``(N, R)``; positions where ``mask`` is 0 count for nothing, whatever
    they hold (a -inf there does not leak into the sum).
    """
    if logprobs.shape != ref_logprobs.shape or logprobs.shape != mask.shape or logprobs.dim() != 2:
        raise ValueError(f"logprobs, ref_logprobs and mask must be (N, R) alike, got {tuple(logprobs.shape)}, "
                         f"{tuple(ref_logprobs.shape)} and {tuple(mask.shape)}")
    diff = logprobs.float() - ref_logprobs.float()
    return torch.where(mask.bool(), diff, torch.zeros((), device=diff.device)).sum(-1)


@torch.no_grad()
def prompt_means(policy: PreTrainedModel, reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 prompts: Sequence[str], prompt_ids: Sequence[int], spec: SamplingSpec, *, samples: int, seed: int,
                 gold_fn: GoldFn | None, gold_name: str = "gold", batch_size: int = 64,
                 timeout_s: float | None = None) -> torch.Tensor:
    """``(P, 3)`` per-prompt means over ``samples`` completions of [kl, gold, length] (``PER_PROMPT``); gold is nan
    without ``gold_fn``.

    ``prompt_ids``: each prompt's index in the whole prompt list, which keys its samples (a process measuring a
    share of the prompts draws what one process measuring all of them draws). ``batch_size``: prompts per generate
    call. ``spec.sampler`` must be "counter".
    """
    if spec.sampler != "counter":
        raise ValueError(f"frontier samples use the counter sampler, got spec.sampler={spec.sampler!r}")
    if samples < 1 or len(prompt_ids) != len(prompts):
        raise ValueError(f"need samples >= 1 and one id per prompt, got samples={samples}, {len(prompts)} prompts "
                         f"and {len(prompt_ids)} ids")
    device = next(policy.parameters()).device
    out = torch.full((len(prompts), len(PER_PROMPT)), math.nan)
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left")
        q_ids = enc["input_ids"].repeat_interleave(samples, 0).to(device)
        q_mask = enc["attention_mask"].repeat_interleave(samples, 0).to(device)
        ids = torch.as_tensor(list(prompt_ids[start:start + batch_size]), dtype=torch.int64)
        rows = (ids.unsqueeze(1) * samples + torch.arange(samples)).reshape(-1)
        r_ids, r_mask, _ = sample(policy, q_ids, q_mask, tokenizer, spec, row_keys=row_keys(seed, FRONTIER_STREAM,
                                                                                             rows.to(device)))
        logp, _ = policy_logprobs(policy, q_ids, q_mask, r_ids, r_mask, spec=spec)
        ref_logp = reference_logprobs(reference, q_ids, q_mask, r_ids, r_mask, spec=spec)
        kl = sequence_kl(logp, ref_logp, r_mask).cpu()
        length = r_mask.sum(-1).float().cpu()
        if gold_fn is not None:
            texts = decode_responses(tokenizer, r_ids, r_mask)
            gold = call_reward_function(gold_fn, gold_name, [p for p in chunk for _ in range(samples)], texts,
                                        timeout_s, key="frontier.gold").float().cpu()
        else:
            gold = torch.full_like(kl, math.nan)
        per_row = torch.stack([kl, gold, length], 1)  # (chunk * samples, 3), a prompt's samples consecutive
        out[start:start + len(chunk)] = per_row.view(len(chunk), samples, len(PER_PROMPT)).mean(1)
    return out


def frontier_metrics(per_prompt: torch.Tensor) -> dict[str, float]:
    """``(P, 3)`` per-prompt means (``prompt_means``) -> ``frontier/kl``, ``frontier/kl_se``,
    ``frontier/gold_score``, ``frontier/gold_se`` (left out when gold is nan) and ``frontier/length``.

    The standard error is ``std(per-prompt means, ddof=1) / sqrt(P)``; nan for one prompt.
    """
    if per_prompt.dim() != 2 or per_prompt.shape[1] != len(PER_PROMPT) or per_prompt.shape[0] < 1:
        raise ValueError(f"per_prompt must be (prompts >= 1, {len(PER_PROMPT)}), got {tuple(per_prompt.shape)}")
    x = per_prompt.double()
    p = x.shape[0]

    def se(col: torch.Tensor) -> float:
        return float(col.std(unbiased=True) / math.sqrt(p)) if p > 1 else math.nan

    out = {"frontier/kl": float(x[:, 0].mean()), "frontier/kl_se": se(x[:, 0])}
    if not torch.isnan(x[:, 1]).any():
        out.update({"frontier/gold_score": float(x[:, 1].mean()), "frontier/gold_se": se(x[:, 1])})
    out["frontier/length"] = float(x[:, 2].mean())
    return out
