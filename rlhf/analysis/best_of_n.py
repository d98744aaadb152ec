"""Best-of-n sampling from the starting policy: the no-training baseline of the reward-KL frontier.

For each prompt, draw n completions, keep the one with the highest proxy score, and record its gold score. Its KL
from the sampling policy is, analytically (Stiennon et al. 2020, App. G; Gao et al. 2022, eq. 1),

    KL_bon(n) = log n - (n - 1) / n   nats,

an upper bound that is tight when the proxy rarely ties (Beirami et al. 2024).

Every n is estimated from one pool of ``n_max`` samples per prompt: the pool is cut into ``n_max / n`` disjoint
groups of n and each group keeps its best, so each estimate is unbiased and uses every sample.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.models import Models
from rlhf.rewards.sources import RewardSources, score_model_loader
from rlhf.rollout.hf import generate
from rlhf.rollout.sampling import row_keys

# The counter sampler's "step" for best-of-n pools: far past any training step, so a pool never repeats the
# samples of a training rollout with the same seed.
BEST_OF_N_STREAM = 1 << 48


def bon_kl(n: int) -> float:
    """KL in nats of best-of-``n`` from its sampling policy: ``log n - (n - 1) / n``."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    return math.log(n) - (n - 1) / n


def powers_of_two(n_max: int) -> list[int]:
    """``[1, 2, 4, ..., n_max]``; ``n_max`` must be a power of two so every n divides the pool."""
    if isinstance(n_max, bool) or not isinstance(n_max, int) or n_max < 1 or n_max & (n_max - 1):
        raise ValueError(f"n_max must be a power of two >= 1, got {n_max!r}")
    return [2**k for k in range(n_max.bit_length())]


def _check_pool(proxy: torch.Tensor, gold: torch.Tensor) -> None:
    for name, t in (("proxy", proxy), ("gold", gold)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be (prompts, n_max), got shape {tuple(t.shape)}")
    if proxy.shape != gold.shape:
        raise ValueError(f"gold shape {tuple(gold.shape)} does not match proxy shape {tuple(proxy.shape)}")


def best_of_n(proxy: torch.Tensor, gold: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Proxy and gold score of the proxy-best completion of each disjoint group of ``n``.

    ``proxy``, ``gold``: ``(prompts, n_max)`` scores of the same completions, ``n`` divides ``n_max``. Returns two
    ``(prompts, n_max // n)`` tensors. Ties go to the first of the group (samples are exchangeable, so this is
    as good as a random tie-break).
    """
    _check_pool(proxy, gold)
    n_max = proxy.shape[1]
    bon_kl(n)
    if n_max % n:
        raise ValueError(f"n={n} does not divide the pool of {n_max} samples per prompt")
    p = proxy.reshape(proxy.shape[0], n_max // n, n)
    g = gold.reshape(gold.shape[0], n_max // n, n)
    best = p.argmax(-1, keepdim=True)
    return p.gather(-1, best).squeeze(-1), g.gather(-1, best).squeeze(-1)


def best_of_n_table(proxy: torch.Tensor, gold: torch.Tensor, ns: Sequence[int]) -> list[dict]:
    """One row per n: ``n``, ``kl`` (analytic), ``d = sqrt(kl)``, mean ``proxy`` and ``gold`` of the chosen,
    ``gold_se`` (standard error over prompts of the per-prompt mean) and ``gain`` (gold minus the n = 1 gold).

    ``proxy``, ``gold``: ``(prompts, n_max)``.
    """
    _check_pool(proxy, gold)
    base = float(gold.mean())
    rows = []
    for n in ns:
        p, g = best_of_n(proxy, gold, n)
        per_prompt = g.mean(-1)
        se = float(per_prompt.std(unbiased=True) / math.sqrt(per_prompt.numel())) if per_prompt.numel() > 1 \
            else math.nan
        kl = bon_kl(n)
        rows.append({"n": n, "kl": kl, "d": math.sqrt(kl), "proxy": float(p.mean()), "gold": float(g.mean()),
                     "gold_se": se, "gain": float(g.mean()) - base})
    return rows


def sample_pool(policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], n_max: int,
                *, max_new_tokens: int, min_new_tokens: int = 0, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, max_rows: int = 1024, sampler: str = "counter", seed: int = 0):
    """Yield ``(prompts_chunk, query_ids, query_mask, response_ids, response_mask)`` for ``n_max`` samples of every
    prompt, at most ``max_rows`` rows per generate call (to bound memory).

    Shapes: ``query_* (chunk * n_max, Q)``, ``response_* (chunk * n_max, R)``; the samples of one prompt are
    consecutive rows. With the counter sampler, row ``i`` of the whole pool is keyed by ``(seed, BEST_OF_N_STREAM,
    i)``, so the pool does not depend on ``max_rows``.
    """
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    per_call = max(max_rows // n_max, 1)
    device = next(policy.parameters()).device
    for start in range(0, len(prompts), per_call):
        chunk = list(prompts[start:start + per_call])
        enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left")
        q_ids = enc["input_ids"].repeat_interleave(n_max, 0).to(device)
        q_mask = enc["attention_mask"].repeat_interleave(n_max, 0).to(device)
        rows = start * n_max + torch.arange(q_ids.shape[0])
        r_ids, r_mask = generate(policy, q_ids, q_mask, tokenizer, max_new_tokens=max_new_tokens,
                                 min_new_tokens=min_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 sampler=sampler, row_keys=row_keys(seed, BEST_OF_N_STREAM, rows))
        yield chunk, q_ids, q_mask, r_ids, r_mask


def proxy_and_gold(sources: RewardSources, prompts: Sequence[str], q_ids: torch.Tensor, q_mask: torch.Tensor,
                   r_ids: torch.Tensor, r_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chunk, n_max)`` proxy and gold scores of one chunk from ``sample_pool`` (``n_max`` consecutive rows per
    prompt), by the policy trainer's rule (rlhf.rewards.sources.RewardSources: the weighted sources, + missing-EOS
    penalty, clipped). Without a gold scorer, gold = proxy."""
    n_max = r_ids.shape[0] // len(prompts)
    scored = sources.score([p for p in prompts for _ in range(n_max)], q_ids, q_mask, r_ids, r_mask)
    scores = scored.total.float().cpu()
    gold = scored.gold.cpu() if scored.gold is not None else scores
    return scores.reshape(len(prompts), n_max), gold.reshape(len(prompts), n_max)


BON_COLUMNS = ["seed", "n", "kl", "d", "proxy", "gold", "gold_se", "gain", "prompts"]


def write_bon_csv(rows: Sequence[dict], path: str) -> str:
    """Write best-of-n rows (``BON_COLUMNS``) to ``path``."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=BON_COLUMNS)
        w.writeheader()
        w.writerows({k: row[k] for k in BON_COLUMNS} for row in rows)
    return path


def read_bon_csv(path: str) -> list[dict]:
    """Rows written by ``write_bon_csv``, numbers parsed (``seed``, ``n``, ``prompts`` as int)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in BON_COLUMNS if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(f"best-of-n file {path}: {'no rows' if not rows else 'missing columns ' + str(missing)}")
    ints = {"seed", "n", "prompts"}
    return [{k: (int(v) if k in ints else float(v) if v != "" else math.nan) for k, v in r.items()} for r in rows]


def mean_over_seeds(rows: Sequence[dict]) -> list[dict]:
    """One row per n: ``n``, ``kl``, ``d`` and the mean over seeds of ``proxy``, ``gold`` and ``gain``."""
    by_n: dict[int, list[dict]] = {}
    for r in rows:
        by_n.setdefault(int(r["n"]), []).append(r)
    return [{"n": n, "kl": bon_kl(n), "d": math.sqrt(bon_kl(n)), "seeds": len(rs),
             **{k: float(np.mean([r[k] for r in rs])) for k in ("proxy", "gold", "gain")}}
            for n, rs in sorted(by_n.items())]


def load_for_best_of_n(cfg: DictConfig) -> tuple[Models, RewardSources]:
    """The starting policy (the one an RL run with ``cfg`` starts from, same seed = same built-in weights) and the
    reward sources and gold scorer of a validated policy config (``model.reward``, ``reward.function``,
    ``reward.sources``, ``reward.gold``), reward models on the policy's device."""
    from rlhf.models import freeze, load_causal_lm, load_tokenizer

    m = cfg.model
    tok = load_tokenizer(m.tokenizer or m.policy)
    device = "cuda" if torch.cuda.is_available() and not cfg.trainer.cpu else "cpu"
    policy = freeze(load_causal_lm(m.policy, tok, m.dtype, seed=cfg.seed)).to(device)
    sources = RewardSources.from_config(cfg, tok, score_model_loader(m.dtype, cfg.seed))
    sources.place(lambda module: module.to(device))
    reward, reward_tok = sources.reward_model()
    return Models(policy, None, reward, None, tok, reward_tok), sources


def run_best_of_n(cfg: DictConfig, num_prompts: int, n_max: int, max_rows: int = 1024) -> list[dict]:
    """Best-of-n rows (``BON_COLUMNS``) for n = 1, 2, 4, ..., ``n_max`` on the first ``num_prompts`` prompts of a
    validated policy config, sampling with its rollout settings and seeded by ``cfg.seed``."""
    from rlhf.trainers.policy_setup import load_prompts

    if num_prompts < 2:
        raise ValueError(f"num_prompts must be >= 2 (the standard error needs two), got {num_prompts}")
    ns = powers_of_two(n_max)
    models, sources = load_for_best_of_n(cfg)
    r = cfg.rollout
    prompts = load_prompts(cfg)[:num_prompts]  # the policy run's prompts, data.options included
    torch.manual_seed(cfg.seed)
    proxy, gold = [], []
    for chunk, *tensors in sample_pool(models.policy, models.tokenizer, prompts, n_max,
                                       max_new_tokens=r.max_new_tokens, min_new_tokens=r.min_new_tokens,
                                       temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, max_rows=max_rows,
                                       sampler=r.sampler, seed=cfg.seed):
        p, g = proxy_and_gold(sources, chunk, *tensors)
        proxy.append(p)
        gold.append(g)
    rows = best_of_n_table(torch.cat(proxy), torch.cat(gold), ns)
    return [{"seed": cfg.seed, "prompts": len(prompts), **row} for row in rows]
