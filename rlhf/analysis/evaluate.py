"""Evaluate a policy on held-out prompts: greedy accuracy and reward, and pass@k from n samples per prompt.

For each prompt:

    greedy     one completion by argmax decoding          -> accuracy, reward, gold, length
    samples    n completions from the sampling spec      -> pass@k for each k, sample_reward, sample_length

A completion is *correct* when its correctness score reaches ``threshold``: the score is the correctness (gold)
function's when there is one (a verifiable task's ``correct_fn`` returns 0 or 1, so any threshold in (0, 1] counts
exactly the right answers; the sentiment task's gold is a score in about (-1, 1)), else the reward function's. pass@k
is the probability that at least one of k completions drawn without replacement from the n is correct, estimated
without bias from the number c of correct ones (Chen et al. 2021, "Evaluating Large Language Models Trained on
Code", eq. 1):

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

Samples come from the counter sampler keyed by ``(seed, EVAL_STREAM, row)``: the same seed gives the same samples
whatever the batch size, and an evaluation inside a training run draws the same uniforms at every step, so the
change between two evaluations is the policy's, not the dice's.

Reward and correctness functions get the plain prompt and the decoded completion (special tokens skipped), whatever
chat template the model was prompted with (rlhf.chat).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from rlhf.config import AUTO, ConfigError, _check, _check_choice, _typed, import_function
from rlhf.rewards.functions import call_reward_function
from rlhf.rollout.batch import decode_responses, response_mask_from_ids
from rlhf.rollout.hf import sample
from rlhf.rollout.sampling import row_keys
from rlhf.rollout.spec import SamplingSpec

log = logging.getLogger(__name__)

# The counter sampler's "step" for evaluation samples: past any training step and apart from best-of-n's pools
# (rlhf.analysis.best_of_n.BEST_OF_N_STREAM = 1 << 48), so evaluation never replays a rollout's uniforms.
EVAL_STREAM = (1 << 48) + 1

ScoreFn = Callable[[list[str], list[str]], Sequence[float]]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``c`` correct completions out of ``n`` (``0 <= c <= n``, ``1 <= k <= n``):
    ``1 - C(n - c, k) / C(n, k)``, as a product of ``c`` factors so no binomial coefficient overflows. 1 when fewer
    than k are wrong (every k-subset holds a correct one)."""
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=0}^{c-1} (n - k - i) / (n - i) = prod_{i=n-c+1}^{n} (1 - k / i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def policy_folder(spec: str) -> str:
    """A policy checkpoint ``checkpoints/step_N`` -> its ``step_N/policy`` (the weights and tokenizer the trainer
    saves there); every other spec (``step_N/policy`` itself, a model folder, a hub id, ``builtin:...``) unchanged."""
    if os.path.isfile(os.path.join(os.path.expanduser(spec), "policy", "config.json")):
        return os.path.join(spec, "policy")
    return spec


def greedy(model: PreTrainedModel, query_ids: torch.Tensor, query_mask: torch.Tensor,
           tokenizer: PreTrainedTokenizerBase, spec: SamplingSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax decoding of ``(N, Q)`` left-padded prompts -> ``response_ids (N, R)``, ``response_mask (N, R)``
    (R <= spec.max_new_tokens; 1 up to and including EOS).

    The argmax of the sampling distribution's scores: the spec's processors run first (min_new_tokens holds EOS back
    here too; temperature, top-k, top-p and min-p keep the most likely token), and every other knob is explicit, so no
    field of the model's generation_config.json (repetition_penalty, ...) changes the completion.
    """
    eos = spec.eos_token_id if spec.eos_token_id is not None else tokenizer.eos_token_id
    eos = list(eos) if isinstance(eos, tuple) else eos
    gen_cfg = GenerationConfig(do_sample=False, temperature=None, top_k=None, top_p=None, min_p=None,
                               max_new_tokens=spec.max_new_tokens, min_new_tokens=0, typical_p=1.0,
                               repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=eos,
                               pad_token_id=tokenizer.pad_token_id, use_cache=True)
    q = query_ids.shape[1]
    with torch.inference_mode():
        out = model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=gen_cfg,
                             logits_processor=spec.processors(q, eos))
    response_ids = out[:, q:]
    return response_ids, response_mask_from_ids(response_ids, eos)


def _scores(fn: ScoreFn | None, prompts: list[str], completions: list[str], timeout_s: float | None,
            key: str) -> list[float] | None:
    if fn is None:
        return None
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
    return call_reward_function(fn, name, prompts, completions, timeout_s, key=key).tolist()


def evaluation_records(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                       formatted: list[str], correct_fn: ScoreFn | None, reward_fn: ScoreFn | None, *,
                       samples: int, spec: SamplingSpec, seed: int, batch_size: int,
                       device: torch.device | str | None = None, threshold: float = 0.5,
                       add_special_tokens: bool = True,
                       autocast: Callable[[], AbstractContextManager] | None = None,
                       timeout_s: float | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """One record per prompt: its greedy completion and ``samples`` sampled ones, decoded, scored and judged.

    prompts: the plain prompts (what the functions see); formatted: the text the model is prompted with (rlhf.chat
    .format_prompts), tokenized with ``add_special_tokens`` (rlhf.chat.add_special_tokens_for). ``batch_size``
    prompts per generate call (``batch_size * samples`` sampled rows). autocast: a context decoding runs in (e.g.
    ``accelerator.autocast`` or ``lambda: torch.autocast("cuda", torch.bfloat16)``); None = none.

    Record keys: ``prompt``; ``greedy`` (text), ``greedy_length`` (tokens, EOS included), ``greedy_reward`` and
    ``greedy_gold`` (None without that function), ``greedy_correct``; ``samples`` (texts), ``sample_lengths``,
    ``sample_rewards`` and ``sample_golds`` (None without that function), ``correct`` (how many samples are).
    """
    if len(prompts) != len(formatted):
        raise ValueError(f"{len(prompts)} prompts but {len(formatted)} formatted prompts")
    if correct_fn is None and reward_fn is None:
        raise ValueError("evaluation needs a correctness function, a reward function or both")
    from tqdm.auto import tqdm

    device = device if device is not None else next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext
    records = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="eval", unit="batch", disable=not progress, dynamic_ncols=True):
        chunk, texts = prompts[start:start + batch_size], formatted[start:start + batch_size]
        enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=add_special_tokens)
        q_ids, q_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        with autocast():
            g_ids, g_mask = greedy(model, q_ids, q_mask, tokenizer, spec)
            if samples:
                rows = start * samples + torch.arange(len(chunk) * samples)   # global row = prompt * samples + j
                s_ids, s_mask, _ = sample(model, q_ids.repeat_interleave(samples, 0),
                                          q_mask.repeat_interleave(samples, 0), tokenizer, spec,
                                          row_keys=row_keys(seed, EVAL_STREAM, rows))
        completions = decode_responses(tokenizer, g_ids, g_mask)
        lengths = g_mask.sum(-1).tolist()
        if samples:
            completions += decode_responses(tokenizer, s_ids, s_mask)
            lengths += s_mask.sum(-1).tolist()
        # one call per function per batch: the greedy completions first, then the samples of each prompt in turn
        owners = chunk + [p for p in chunk for _ in range(samples)]
        rewards = _scores(reward_fn, owners, completions, timeout_s, "reward.function")
        golds = _scores(correct_fn, owners, completions, timeout_s, "reward.gold")
        judged = golds if golds is not None else rewards
        for i, prompt in enumerate(chunk):
            mine = [len(chunk) + i * samples + j for j in range(samples)]
            records.append({
                "prompt": prompt,
                "greedy": completions[i], "greedy_length": lengths[i],
                "greedy_reward": rewards[i] if rewards is not None else None,
                "greedy_gold": golds[i] if golds is not None else None,
                "greedy_correct": judged[i] >= threshold,
                "samples": [completions[r] for r in mine], "sample_lengths": [lengths[r] for r in mine],
                "sample_rewards": [rewards[r] for r in mine] if rewards is not None else None,
                "sample_golds": [golds[r] for r in mine] if golds is not None else None,
                "correct": sum(judged[r] >= threshold for r in mine),
            })
    return records


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def summarize(records: Sequence[dict[str, Any]], ks: Sequence[int]) -> dict[str, float]:
    """Metrics of :func:`evaluation_records`' records (all with the same number n of samples):

    ``prompts``; ``accuracy`` (share of greedy completions correct), ``reward`` and ``gold`` (their mean reward and
    correctness score; a key only when that function was given), ``length`` (mean greedy tokens); with samples,
    ``pass@k`` for each k (mean over prompts of :func:`pass_at_k`), ``sample_reward`` and ``sample_length`` (means
    over every sample).
    """
    if not records:
        raise ValueError("no records to summarize")
    n = len(records[0]["samples"])
    out = {"prompts": float(len(records)), "accuracy": _mean([float(r["greedy_correct"]) for r in records])}
    for key, field_ in (("reward", "greedy_reward"), ("gold", "greedy_gold")):
        if records[0][field_] is not None:
            out[key] = _mean([r[field_] for r in records])
    out["length"] = _mean([r["greedy_length"] for r in records])
    for k in ks:
        out[f"pass@{k}"] = _mean([pass_at_k(n, r["correct"], k) for r in records])
    if n:
        if records[0]["sample_rewards"] is not None:
            out["sample_reward"] = _mean([x for r in records for x in r["sample_rewards"]])
        out["sample_length"] = _mean([x for r in records for x in r["sample_lengths"]])
    return out


def evaluate_policy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                    formatted: list[str], correct_fn: ScoreFn | None, reward_fn: ScoreFn | None, *, samples: int,
                    ks: Sequence[int], spec: SamplingSpec, seed: int, batch_size: int,
                    device: torch.device | str | None = None, progress: bool = False, threshold: float = 0.5,
                    add_special_tokens: bool = True, autocast: Callable[[], AbstractContextManager] | None = None,
                    timeout_s: float | None = None) -> dict[str, float]:
    """The metrics of :func:`summarize` for ``model`` on ``prompts`` (arguments as in :func:`evaluation_records`;
    every k of ``ks`` in ``[1, samples]``), with the model in eval mode and no autograd graph; its train/eval mode
    is restored afterwards, so a trainer can call this between steps. ``model`` is one whole module decoding on its
    own (under DDP, the unwrapped policy on one process); a sharded policy (FSDP2, ZeRO-3) needs every process in
    each forward, which this does not arrange."""
    bad = [k for k in ks if not 1 <= k <= samples]
    if bad:
        raise ValueError(f"pass@k needs 1 <= k <= samples={samples}, got k={bad[0]}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            records = evaluation_records(model, tokenizer, prompts, formatted, correct_fn, reward_fn,
                                         samples=samples, spec=spec, seed=seed, batch_size=batch_size, device=device,
                                         threshold=threshold, add_special_tokens=add_special_tokens,
                                         autocast=autocast, timeout_s=timeout_s, progress=progress)
    finally:
        model.train(was_training)
    return summarize(records, ks)


# ---------------------------------------------------------------------- scripts/evaluate.py (configs/evaluate.yaml)
# Schemas only, as in rlhf.config: every default lives in configs/evaluate.yaml next to its comment.
@dataclass
class EvalModelConfig:
    policy: str = MISSING
    tokenizer: str | None = MISSING
    dtype: str = MISSING


@dataclass
class EvalDataConfig:
    prompts: str = MISSING
    prompt_column: str = MISSING
    split: str = MISSING
    num_prompts: int | None = MISSING
    options: dict[str, Any] = MISSING
    chat_template: Any = MISSING  # auto | true | false
    system_prompt: str | None = MISSING


@dataclass
class EvalRewardConfig:
    function: str | None = MISSING
    gold: str | None = MISSING
    timeout_s: float | None = MISSING


@dataclass
class EvalOptions:
    samples: int = MISSING
    ks: list[int] | None = MISSING  # null = [1, samples]
    temperature: float = MISSING
    top_k: int = MISSING
    top_p: float = MISSING
    max_new_tokens: int = MISSING
    batch_size: int = MISSING
    threshold: float = MISSING
    output: str | None = MISSING
    records: bool = MISSING
    mixed_precision: str = MISSING
    cpu: bool = MISSING
    progress: bool = MISSING


@dataclass
class EvalConfig:
    seed: int = MISSING
    run_dir: str = MISSING
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    reward: EvalRewardConfig = field(default_factory=EvalRewardConfig)
    eval: EvalOptions = field(default_factory=EvalOptions)


def validate_eval_config(cfg: DictConfig) -> DictConfig:
    """Type- and value-check a composed configs/evaluate.yaml, before anything loads. Returns the typed config with
    ``model.policy`` resolved to a checkpoint's ``policy/`` folder (:func:`policy_folder`), ``reward.function`` /
    ``reward.gold`` ``auto`` resolved to the built-in task's functions (else null), and ``eval.ks`` null to
    ``[1, eval.samples]``. Raises ``ConfigError("<key>: ...")``."""
    from rlhf.chat import chat_mode
    from rlhf.config import _check_tokenizer_pairing
    from rlhf.models import DTYPES, check_spec
    from rlhf.tasks import builtin_task

    cfg = _typed(cfg, EvalConfig)
    m, d, r, e = cfg.model, cfg.data, cfg.reward, cfg.eval
    m.policy = policy_folder(m.policy)
    for key in ("policy", "tokenizer"):
        if m[key] is not None:
            try:
                check_spec(m[key], f"model.{key}")
            except ValueError as err:
                raise ConfigError(str(err)) from None
    _check_tokenizer_pairing(m.policy, m.tokenizer, "model.tokenizer", "model.policy")
    _check_choice(m.dtype, "model.dtype", list(DTYPES))
    _check(d.num_prompts is None or d.num_prompts > 0, "data.num_prompts", "must be > 0 or null (all rows)")
    d.chat_template = chat_mode(d.chat_template)
    _check(not d.system_prompt or d.chat_template is not False, "data.system_prompt",
           "needs chat formatting and data.chat_template=false turns it off; remove it or set data.chat_template")
    task = builtin_task(d.prompts)
    for key in ("function", "gold"):
        if r[key] == AUTO:
            r[key] = task[key] if task is not None else None
        if r[key] is not None:
            import_function(r[key], f"reward.{key}")
    _check(r.function is not None or r.gold is not None, "reward.function",
           f"nothing to score with: set reward.function (or reward.gold) to a dotted path; auto gives a built-in "
           f"task's functions only with data.prompts=builtin:<task>, not {d.prompts!r}")
    _check(r.timeout_s is None or r.timeout_s > 0, "reward.timeout_s", "must be > 0 or null")
    _check(e.samples >= 0, "eval.samples", "must be >= 0 (0 = greedy only)")
    if e.ks is None:
        e.ks = sorted({1, e.samples}) if e.samples else []
    for k in e.ks:
        _check(1 <= k <= e.samples, "eval.ks", f"k={k} is not in [1, eval.samples={e.samples}]")
    _check(len(set(e.ks)) == len(e.ks), "eval.ks", f"{list(e.ks)} repeats a k")
    _check(e.temperature > 0, "eval.temperature", "must be > 0")
    _check(e.top_k >= 0, "eval.top_k", "must be >= 0 (0 = off)")
    _check(0 < e.top_p <= 1, "eval.top_p", "must be in (0, 1] (1 = off)")
    _check(e.max_new_tokens > 0, "eval.max_new_tokens", "must be > 0")
    _check(e.batch_size > 0, "eval.batch_size", "must be > 0")
    _check_choice(e.mixed_precision, "eval.mixed_precision", ["no", "bf16"])
    return cfg


def output_paths(cfg: DictConfig) -> tuple[str, str]:
    """``(metrics JSON, per-prompt JSONL)``: ``eval.output`` (default ``<run_dir>/eval.json``) and the same name
    with ``_records.jsonl`` for ``.json``."""
    out = cfg.eval.output or os.path.join(cfg.run_dir, "eval.json")
    return out, os.path.splitext(out)[0] + "_records.jsonl"


def markdown_row(cfg: DictConfig, metrics: dict[str, float]) -> str:
    """``| model | data:split | metric | ... |``, the metrics in :func:`summarize`'s order: one row of a table of
    evaluations, whose header is :func:`markdown_header`."""
    cells = [cfg.model.policy, f"{cfg.data.prompts}:{cfg.data.split}"]
    cells += [f"{v:.0f}" if k == "prompts" else f"{v:.4g}" for k, v in metrics.items()]
    return "| " + " | ".join(cells) + " |"


def markdown_header(metrics: dict[str, float]) -> str:
    names = ["model", "data", *metrics]
    return "| " + " | ".join(names) + " |\n|" + "---|" * len(names)


def run_evaluation(cfg: DictConfig) -> tuple[dict[str, float], str]:
    """Evaluate a validated config (:func:`validate_eval_config`): the tokenizer, prompts and their chat formatting
    first (their errors come before the weights load), then the model. Writes the metrics JSON (``metrics``,
    ``config``) and, with ``eval.records``, one JSON line per prompt; returns the metrics and the JSON's path."""
    from rlhf.chat import add_special_tokens_for, chat_enabled, format_prompts
    from rlhf.data import load_prompts
    from rlhf.models import DTYPES, check_tokenizer_fits, load_causal_lm, load_tokenizer

    m, d, r, e = cfg.model, cfg.data, cfg.reward, cfg.eval
    tokenizer = load_tokenizer(m.tokenizer or m.policy)
    check_tokenizer_fits(tokenizer, m.policy, m.tokenizer)
    chat = chat_enabled(tokenizer, d.chat_template)
    options = {"options": dict(d.options)} if d.options else {}
    prompts = load_prompts(d.prompts, column=d.prompt_column, split=d.split, n=d.num_prompts, seed=cfg.seed,
                           **options)
    formatted = format_prompts(tokenizer, prompts, d.chat_template, d.system_prompt)
    device = "cuda" if torch.cuda.is_available() and not e.cpu else "cpu"
    model = load_causal_lm(m.policy, tokenizer, m.dtype, seed=cfg.seed).to(device)
    spec = SamplingSpec(temperature=e.temperature, top_k=e.top_k, top_p=e.top_p, max_new_tokens=e.max_new_tokens,
                        sampler="counter")
    autocast = (lambda: torch.autocast(device, dtype=DTYPES["bfloat16"])) if e.mixed_precision == "bf16" else None
    model.eval()
    with torch.no_grad():
        records = evaluation_records(
            model, tokenizer, prompts, formatted, import_function(r.gold, "reward.gold") if r.gold else None,
            import_function(r.function, "reward.function") if r.function else None, samples=e.samples, spec=spec,
            seed=cfg.seed, batch_size=e.batch_size, device=device, threshold=e.threshold,
            add_special_tokens=add_special_tokens_for(chat), autocast=autocast, timeout_s=r.timeout_s,
            progress=e.progress)
    metrics = summarize(records, list(e.ks))
    out, records_path = output_paths(cfg)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"metrics": metrics, "chat_template": chat, "config": OmegaConf.to_container(cfg)}, f, indent=2)
    if e.records:
        with open(records_path, "w") as f:
            for rec, text in zip(records, formatted, strict=True):
                f.write(json.dumps({**rec, "formatted": text}) + "\n")
    return metrics, out
