"""Rollout: sample responses, then score them with the policy, reference, critic and reward.

Layout of one rollout batch (N = prompts x samples_per_prompt, samples of one prompt in consecutive rows):

    query_ids      (N, Q)  left-padded prompt tokens       query_mask     (N, Q)
    response_ids   (N, R)  right-padded after EOS          response_mask  (N, R)  1 up to and including EOS
    logprobs       (N, R)  policy log-probs at sampling time (no grad)
    ref_logprobs   (N, R)  reference log-probs, or None when no reference is loaded
    values         (N, R)  critic values, or None without a critic
    scores         (N,)    total sequence score (reward model and/or functions)

Every mask is explicit; nothing downstream infers positions from pad ids.
"""

from __future__ import annotations

import contextvars
import math
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rlhf.config import ConfigError
from rlhf.logprobs import entropy_from_logits, selective_log_softmax
from rlhf.models import position_ids_from_mask, sequence_scores, token_scores
from rlhf.sampling import CounterSampler

SAMPLERS = ["counter", "torch"]


class Rollout(NamedTuple):
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None
    values: torch.Tensor | None
    scores: torch.Tensor
    entropy: torch.Tensor


class RewardFunctionError(ValueError):
    """A reward function raised or returned something unusable. The message names the function."""


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: int | Sequence[int] | None) -> torch.Tensor:
    """``(N, R)`` generated ids -> ``(N, R)`` long mask: 1 up to and including the first EOS, 0 after.

    Rows without EOS (cut at max_new_tokens) are all ones.
    """
    if eos_token_id is None:
        return torch.ones_like(response_ids)
    eos_ids = torch.as_tensor(eos_token_id, device=response_ids.device).reshape(-1)
    is_eos = torch.isin(response_ids, eos_ids).long()
    # Tokens strictly after the first EOS have a cumulative EOS count that already counted it.
    seen_before = is_eos.cumsum(-1) - is_eos
    return (seen_before == 0).long()


def has_eos(response_ids: torch.Tensor, response_mask: torch.Tensor, eos_token_id) -> torch.Tensor:
    """``(N,)`` bool: the response ended with an EOS rather than being cut at max_new_tokens."""
    if eos_token_id is None:
        return torch.zeros(response_ids.shape[0], dtype=torch.bool, device=response_ids.device)
    eos_ids = torch.as_tensor(eos_token_id, device=response_ids.device).reshape(-1)
    return (torch.isin(response_ids, eos_ids) & response_mask.bool()).any(-1)


def generate(policy: PreTrainedModel, query_ids: torch.Tensor, query_mask: torch.Tensor,
             tokenizer: PreTrainedTokenizerBase, *, max_new_tokens: int, min_new_tokens: int = 0,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, sampler: str = "torch",
             row_keys: torch.Tensor | None = None,
             synced_gpus: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one response per row with a KV cache.

    query_ids, query_mask: ``(N, Q)``, left-padded. Returns ``response_ids (N, R)`` (R <= max_new_tokens, padded
    with the pad id after EOS) and ``response_mask (N, R)``.

    sampler "torch": transformers' multinomial sampling from torch's global RNG (so a row's sample depends on the
    rows before it). "counter": every row draws from its own counter-based stream, ``row_keys (N, 2)`` from
    :func:`rlhf.sampling.row_keys`, so a row's sample does not depend on the batch it is in or the process that
    generates it. Both sample from the same distribution.

    synced_gpus: every process keeps running forward passes until all processes' rows are done, as a policy whose
    forward is a collective (FSDP2, ZeRO-3) needs. transformers turns it on by itself under ZeRO-3 but not for
    accelerate's FSDP2 models, so the caller says so (None: transformers decides). When True, decoding runs under
    ``no_grad`` rather than ``inference_mode``: weights FSDP2 gathers inside ``inference_mode`` become inference
    tensors, and the update's next forward fails on them.
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"rollout.sampler: unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    common = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, min_p=None, typical_p=1.0,
                  repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, use_cache=True)
    processors = None
    if sampler == "torch":
        # Every sampling knob is set explicitly: a field left None is filled from transformers' defaults or the
        # model's generation_config.json (top_k=50, repetition penalties, ...), and the responses would then no
        # longer be samples of the distribution whose log-probs the update uses. top_k=0 disables top-k.
        gen_cfg = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, **common)
    else:
        if row_keys is None or row_keys.shape != (query_ids.shape[0], 2):
            raise ValueError(f"counter sampling needs row_keys of shape ({query_ids.shape[0]}, 2)")
        # Greedy decoding over scores whose argmax is the drawn token. The warpers are the ones transformers'
        # sampler would apply, in its order: temperature, top-k, top-p.
        gen_cfg = GenerationConfig(do_sample=False, temperature=None, top_k=None, top_p=None, **common)
        processors = LogitsProcessorList()
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        processors.append(CounterSampler(row_keys.to(query_ids.device), query_ids.shape[1], max_new_tokens))
    was_training = policy.training
    policy.eval()
    with torch.no_grad() if synced_gpus else torch.inference_mode():
        out = policy.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=gen_cfg,
                              logits_processor=processors, synced_gpus=synced_gpus)
    policy.train(was_training)
    # inference_mode skips autograd bookkeeping while decoding; the clone (made outside it) is an ordinary tensor
    # that the update's forward may save for backward.
    response_ids = out[:, query_ids.shape[1]:].clone()
    return response_ids, response_mask_from_ids(response_ids, tokenizer.eos_token_id)


def _concat(query_ids, query_mask, response_ids, response_mask):
    return torch.cat([query_ids, response_ids], 1), torch.cat([query_mask, response_mask], 1)


def policy_logprobs(model: torch.nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor,
                    response_ids: torch.Tensor, response_mask: torch.Tensor, *, temperature: float = 1.0,
                    chunk_size: int = 1024, with_entropy: bool = False):
    """Log-probs of the response tokens under ``model``, at the sampling temperature.

    Shapes: query ``(N, Q)``, response ``(N, R)``. Returns ``logprobs (N, R)`` and, if asked, ``entropy (N, R)``
    of the full next-token distribution. Gradients flow when called outside no_grad.
    """
    ids, mask = _concat(query_ids, query_mask, response_ids, response_mask)
    r = response_ids.shape[1]
    # Only the R positions that predict response tokens need logits: logits[t] predicts ids[t + 1].
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                   use_cache=False, logits_to_keep=r + 1).logits[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = selective_log_softmax(logits, response_ids, chunk_size=chunk_size)
    entropy = entropy_from_logits(logits.detach(), chunk_size=chunk_size) if with_entropy else None
    return logprobs, entropy


class TokenValues(torch.nn.Module):
    """Wraps a one-label sequence-classification model as a critic: ``(N, S) -> (N, S)`` values per position.

    A module of its own so that DDP/FSDP wrap the path the gradients really take.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return token_scores(self.model, input_ids, attention_mask)


class PolicyAndValue(torch.nn.Module):
    """The policy and the critic as one module, for the optimizer's parameter names and for FSDP2.

    accelerate prepares one model per ``prepare`` call under FSDP2, and PPO trains two with one optimizer. Prepared
    together as this module, each becomes its own ``fully_shard`` unit (both classes are listed in
    ``_no_split_modules``, beside their decoder layers). Its own forward is never called: the trainer calls
    ``.policy`` and ``.critic`` directly. Its parameter names (``policy.*`` then ``critic.*``) are those of the
    optimizer's two groups, in order.
    """

    def __init__(self, policy: PreTrainedModel, critic: TokenValues):
        super().__init__()
        self.policy = policy
        self.critic = critic
        layers = set(getattr(policy, "_no_split_modules", None) or [])
        layers |= set(getattr(critic.model, "_no_split_modules", None) or [])
        self._no_split_modules = sorted(layers | {type(policy).__name__, type(critic).__name__})


def response_values(critic: torch.nn.Module, query_ids, query_mask, response_ids, response_mask) -> torch.Tensor:
    """Critic values of the states before each response token: ``(N, R)``, aligned with the log-probs."""
    ids, mask = _concat(query_ids, query_mask, response_ids, response_mask)
    q, r = query_ids.shape[1], response_ids.shape[1]
    return critic(ids, mask)[:, q - 1:q + r - 1]


def decode_responses(tokenizer: PreTrainedTokenizerBase, response_ids: torch.Tensor,
                     response_mask: torch.Tensor) -> list[str]:
    """Response text up to (not including) EOS."""
    rows = [ids[m.bool()].tolist() for ids, m in zip(response_ids, response_mask)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def reward_model_scores(reward_model: PreTrainedModel, policy_tokenizer: PreTrainedTokenizerBase,
                        reward_tokenizer: PreTrainedTokenizerBase | None, query_ids, query_mask, response_ids,
                        response_mask, prompts: list[str] | None = None,
                        completions: list[str] | None = None) -> torch.Tensor:
    """``(N,)`` reward-model score at the last real token of prompt + response.

    With the policy's tokenizer the token ids are reused; with a different one the text is decoded and
    re-tokenized (right-padded, so the last real token is the last 1 of its attention mask).
    """
    if reward_tokenizer is None:
        ids, mask = _concat(query_ids, query_mask, response_ids, response_mask)
        return sequence_scores(reward_model, ids, mask)
    texts = [p + " " + c if c else p for p, c in zip(prompts, completions)]
    eos = reward_tokenizer.eos_token or ""
    enc = reward_tokenizer([t + eos for t in texts], return_tensors="pt", padding=True,
                           padding_side="right", add_special_tokens=True)
    device = query_ids.device
    return sequence_scores(reward_model, enc["input_ids"].to(device), enc["attention_mask"].to(device))


def _call_with_timeout(fn: Callable, args: tuple, timeout_s: float):
    """``fn(*args)`` in a daemon thread, waited for at most ``timeout_s`` seconds.

    Returns ``(finished, result)``; an exception ``fn`` raised is re-raised here, in the caller's thread. A daemon
    thread (not a ThreadPoolExecutor, whose workers are joined at exit) lets the process exit while a call that
    never returns is still running. The caller's thread-local torch state (grad and inference mode, the current CUDA
    device) and its context variables are carried into the thread, so the function runs as it would directly.
    """
    box: list = []  # [("ok", result)] or [("err", exception)], set by the thread before it ends
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    ctx = contextvars.copy_context()

    def target():
        try:
            if device is not None:
                torch.cuda.set_device(device)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                box.append(("ok", ctx.run(fn, *args)))
        except BaseException as e:  # handed to the caller, which re-raises it
            box.append(("err", e))

    thread = threading.Thread(target=target, name=f"reward:{getattr(fn, '__name__', 'fn')}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not box:
        return False, None
    kind, value = box[0]
    if kind == "err":
        try:
            raise value
        finally:
            del value, box  # no reference cycle through the traceback
    return True, value


def call_reward_function(fn: Callable, name: str, prompts: list[str], completions: list[str],
                         timeout_s: float | None = None, key: str = "reward.function") -> torch.Tensor:
    """Run ``fn(prompts, completions)`` and check what it returns: ``(N,)`` float32 tensor.

    Any failure (it raised; wrong length; not numbers; NaN or inf) is a RewardFunctionError naming ``name``.
    With ``timeout_s`` (seconds), a call that has not returned by then is a RewardFunctionError too, starting with
    the config ``key`` that named the function (``reward.function`` or ``reward.gold``); the call is left running
    in a daemon thread, which does not keep the process alive. ``timeout_s=None`` calls ``fn`` directly.
    """
    finished = True
    try:
        if timeout_s is None:
            out = fn(prompts, completions)
        else:
            finished, out = _call_with_timeout(fn, (prompts, completions), timeout_s)
    except Exception as e:
        raise RewardFunctionError(f"reward function {name} raised {type(e).__name__}: {e}") from e
    if not finished:
        raise RewardFunctionError(f"{key}: reward function {name} did not return within reward.timeout_s="
                                  f"{timeout_s:g} s (it may hang); fix it or raise reward.timeout_s")
    if isinstance(out, torch.Tensor):
        out = out.detach().float().cpu().reshape(-1).tolist()
    if not isinstance(out, (list, tuple)):
        raise RewardFunctionError(f"reward function {name} returned {type(out).__name__}; expected a list of floats")
    if len(out) != len(completions):
        raise RewardFunctionError(f"reward function {name} returned {len(out)} scores for {len(completions)} "
                                  "completions")
    bad_type = [type(x).__name__ for x in out if isinstance(x, bool) or not isinstance(x, (int, float))]
    if bad_type:
        raise RewardFunctionError(f"reward function {name} returned a {bad_type[0]}; expected floats")
    bad = [i for i, x in enumerate(out) if not math.isfinite(x)]
    if bad:
        raise RewardFunctionError(f"reward function {name} returned a non-finite score ({out[bad[0]]}) for "
                                  f"completion {bad[0]}")
    return torch.tensor(out, dtype=torch.float32)


def score_responses(reward_model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase,
                    reward_tokenizer: PreTrainedTokenizerBase | None, reward_cfg, reward_fn: Callable | None,
                    gold_fn: Callable | None, prompts: list[str], query_ids: torch.Tensor, query_mask: torch.Tensor,
                    response_ids: torch.Tensor, response_mask: torch.Tensor, autocast=None):
    """The total score of each response, by one rule for every script: ``model_weight * reward model +
    function_weight * reward function``, plus ``missing_eos_penalty`` for responses cut without EOS, clipped to
    ``[-clip, clip]``. ``reward_cfg`` is the ``reward`` section of a policy config; ``prompts`` has one entry per row.

    Returns ``scores (N,)`` on the rows' device, ``gold (N,)`` from ``gold_fn`` (or None), and the decoded
    completions.
    """
    import contextlib

    dev = response_ids.device
    # reward.timeout_s (seconds, None = no limit) bounds each call of reward.function and reward.gold; a reward
    # section without the field (an older or hand-built config) means no limit.
    timeout_s = getattr(reward_cfg, "timeout_s", None)
    completions = decode_responses(tokenizer, response_ids, response_mask)
    scores = torch.zeros(len(completions), device=dev)
    if reward_model is not None:
        with torch.no_grad(), (autocast or contextlib.nullcontext()):
            rm = reward_model_scores(reward_model, tokenizer, reward_tokenizer, query_ids, query_mask, response_ids,
                                     response_mask, prompts, completions)
        scores = scores + reward_cfg.model_weight * rm.float()
    if reward_fn is not None:
        fn_scores = call_reward_function(reward_fn, reward_cfg.function, prompts, completions, timeout_s,
                                         key="reward.function")
        scores = scores + reward_cfg.function_weight * fn_scores.to(dev)
    if reward_cfg.missing_eos_penalty is not None:
        ended = has_eos(response_ids, response_mask, tokenizer.eos_token_id)
        scores = scores + torch.where(ended, 0.0, reward_cfg.missing_eos_penalty)
    if reward_cfg.clip is not None:
        scores = scores.clamp(-reward_cfg.clip, reward_cfg.clip)
    gold = None
    if gold_fn is not None:
        gold = call_reward_function(gold_fn, reward_cfg.gold, prompts, completions, timeout_s,
                                    key="reward.gold").to(dev)
    return scores, gold, completions
