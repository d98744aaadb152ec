"""The transformers engine: ``generate`` with a KV cache, sampling by the counter sampler or torch's RNG.

Both samplers run transformers' greedy decoding over scores that our own processors prepared: the spec's processors
(:meth:`rlhf.rollout.spec.SamplingSpec.processors`: min_new_tokens, temperature, top-k, top-p, min-p) and last a
drawing processor (:class:`rlhf.rollout.sampling.CounterSampler` or :class:`~rlhf.rollout.sampling.TorchSampler`)
that draws the token and records its log-prob. transformers applies no warper of its own (greedy decoding has
none), so no field of a model's generation_config.json (top_k=50, min_p, top_h, ...) can change the distribution.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from rlhf.models import contiguous_head_input
from rlhf.rollout.batch import response_mask_from_ids
from rlhf.rollout.sampling import CounterSampler, TorchSampler
from rlhf.rollout.spec import SAMPLERS, SamplingSpec

__all__ = ["SAMPLERS", "HFEngine", "generate", "sample"]


def sample(policy: PreTrainedModel, query_ids: torch.Tensor, query_mask: torch.Tensor,
           tokenizer: PreTrainedTokenizerBase, spec: SamplingSpec, *, row_keys: torch.Tensor | None = None,
           synced_gpus: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one response per row with a KV cache, from the distribution ``spec`` names.

    query_ids, query_mask: ``(N, Q)``, left-padded. Returns ``response_ids (N, R)`` (R <= spec.max_new_tokens,
    padded with the pad id after EOS), ``response_mask (N, R)`` and ``sampler_logprobs (N, R)``: the log-prob of each
    drawn token under the processed scores it was drawn from (float32; 0 at padding positions).

    spec.sampler "torch": transformers' multinomial draw from torch's global RNG (so a row's sample depends on the
    rows before it). "counter": every row draws from its own counter-based stream, ``row_keys (N, 2)`` from
    :func:`rlhf.rollout.sampling.row_keys`, so a row's sample does not depend on the batch it is in or the process that
    generates it. Both sample from the same distribution.

    synced_gpus: every process keeps running forward passes until all processes' rows are done, as a policy whose
    forward is a collective (FSDP2, ZeRO-3) needs. transformers turns it on by itself under ZeRO-3 but not for
    accelerate's FSDP2 models, so the caller says so (None: transformers decides). When True, decoding runs under
    ``no_grad`` rather than ``inference_mode``: weights FSDP2 gathers inside ``inference_mode`` become inference
    tensors, and the update's next forward fails on them.
    """
    if spec.max_new_tokens is None:
        raise ValueError("sampling needs a SamplingSpec with max_new_tokens")
    n, q = query_ids.shape
    if spec.sampler == "counter":
        if row_keys is None or row_keys.shape != (n, 2):
            raise ValueError(f"counter sampling needs row_keys of shape ({n}, 2)")
        drawer = CounterSampler(row_keys.to(query_ids.device), q, spec.max_new_tokens, record=True)
    else:
        drawer = TorchSampler(record=True)
    eos = spec.eos_token_id if spec.eos_token_id is not None else tokenizer.eos_token_id
    eos = list(eos) if isinstance(eos, tuple) else eos
    processors = spec.processors(q, eos)
    processors.append(drawer)
    # Greedy decoding over the drawer's one-hot scores. Every knob transformers would apply even when greedy is set
    # explicitly: a field left None is filled from the model's generation_config.json. min_new_tokens=0 here: EOS
    # suppression is the spec's processor, the one the log-prob code applies too. temperature/top_k/top_p/min_p stay
    # None: greedy decoding applies no warper, so a value there (ours or the model's) has no effect, and an explicit
    # one only makes transformers log that it is ignored.
    gen_cfg = GenerationConfig(do_sample=False, temperature=None, top_k=None, top_p=None, min_p=None,
                               max_new_tokens=spec.max_new_tokens, min_new_tokens=0, typical_p=1.0,
                               repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=eos,
                               pad_token_id=tokenizer.pad_token_id, use_cache=True)
    was_training = policy.training
    policy.eval()
    with torch.no_grad() if synced_gpus else torch.inference_mode():
        out = policy.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=gen_cfg,
                              logits_processor=processors, synced_gpus=synced_gpus)
    policy.train(was_training)
    # inference_mode skips autograd bookkeeping while decoding; the clone (made outside it) is an ordinary tensor
    # that the update's forward may save for backward.
    response_ids = out[:, q:].clone()
    response_mask = response_mask_from_ids(response_ids, eos)
    logprobs = drawer.logprobs()
    if logprobs.shape != response_ids.shape:  # one draw per generated position, or the record is misaligned
        raise RuntimeError(f"sampler recorded {tuple(logprobs.shape)} log-probs for {tuple(response_ids.shape)} tokens")
    # Positions after EOS were drawn for finished rows and then replaced by the pad id: their log-prob means nothing.
    logprobs = torch.where(response_mask.bool(), logprobs, torch.zeros((), device=logprobs.device))
    return response_ids, response_mask, logprobs


def generate(policy: PreTrainedModel, query_ids: torch.Tensor, query_mask: torch.Tensor,
             tokenizer: PreTrainedTokenizerBase, *, max_new_tokens: int, min_new_tokens: int = 0,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, sampler: str = "torch",
             row_keys: torch.Tensor | None = None, synced_gpus: bool | None = None,
             min_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample` with the knobs as keywords, returning ``response_ids (N, R)`` and ``response_mask (N, R)``
    only (the call the trainer and best-of-n make until they pass a :class:`SamplingSpec`)."""
    spec = SamplingSpec(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens, sampler=sampler)
    response_ids, response_mask, _ = sample(policy, query_ids, query_mask, tokenizer, spec, row_keys=row_keys,
                                            synced_gpus=synced_gpus)
    return response_ids, response_mask


def merged_copy(policy: torch.nn.Module, dtype: torch.dtype) -> PreTrainedModel:
    """A plain transformers model of ``policy``'s base architecture in ``dtype``, on its device, holding the merged
    weights of the peft ``policy`` (frozen, eval mode); the policy is not changed."""
    base = policy.get_base_model()
    device = next(policy.parameters()).device
    with torch.device("meta"):
        plain = type(base)(base.config)
    plain.to_empty(device=device)
    plain.to(dtype)
    plain.tie_weights()
    # to_empty leaves every buffer uninitialised, and the non-persistent ones (rotary inv_freq) are in no state_dict:
    # take them from the base, whose module names are the plain model's but for peft's ".base_layer".
    theirs = {name.replace(".base_layer.", "."): b for name, b in base.named_buffers()}
    with torch.no_grad():
        for name, buffer in plain.named_buffers():
            buffer.copy_(theirs[name])
    plain.generation_config = copy.deepcopy(base.generation_config)
    load_merged_weights(plain, policy)
    return contiguous_head_input(plain.eval().requires_grad_(False))


@torch.no_grad()
def load_merged_weights(plain: torch.nn.Module, policy: torch.nn.Module) -> None:
    """Copy the peft ``policy``'s merged weights (rlhf.lora.merged_weights) into ``plain``, cast to its dtype; every
    one of ``plain``'s tensors must be written (a tied weight once per name)."""
    from rlhf.lora import merged_weights

    mine = plain.state_dict()
    written = set()
    for name, tensor in merged_weights(policy):
        if name not in mine:
            raise KeyError(f"merged weight {name!r} has no place in the decoding copy")
        mine[name].copy_(tensor)
        written.add(name)
    missing = set(mine) - written
    if missing:
        raise KeyError(f"the decoding copy's {sorted(missing)[:3]} got no merged weight")


class HFEngine:
    """``rollout.engine=hf``: decodes with the trainer's own policy module (no copy of the weights).

    policy: the unwrapped policy (``accelerator.unwrap_model``); ``sync_weights`` only records which module decodes.
    gather: a callable returning the context decoding runs in, e.g. the whole policy gathered once under FSDP2 or
    ZeRO-3 (default: nothing). synced_gpus: as in :func:`sample` (True under multi-process FSDP2; None: transformers
    decides). spec: the default spec of ``generate``. dtype (``rollout.hf.dtype``): None decodes with the policy
    module itself; a dtype other than the policy's decodes with a copy in that dtype (e.g. bfloat16 beside a float32
    trainer: faster on AMX CPUs and GPUs), refreshed from the policy by every ``sync_weights``, and its log-probs
    differ from the trainer's by the rounding (logged as ``mismatch/*``, corrected by ``algorithm.is_correction``).
    A copy needs the whole weights on each process: one process or DDP.
    """

    backends: ClassVar[frozenset[str]] = frozenset({"single", "ddp", "fsdp2", "zero2", "zero3"})

    def __init__(self, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: SamplingSpec | None = None,
                 *, gather: Callable[[], AbstractContextManager] | None = None, synced_gpus: bool | None = None,
                 dtype: torch.dtype | None = None):
        self.tokenizer = tokenizer
        self.spec = spec
        self.gather = gather if gather is not None else contextlib.nullcontext
        self.synced_gpus = synced_gpus
        self.dtype = dtype
        self.policy = None
        self.sync_weights(policy)

    @classmethod
    def options_from_config(cls, cfg: Any) -> dict:
        """Constructor options from the run config: ``dtype`` from rollout.hf.dtype (auto = None: the policy's
        own module and dtype)."""
        name = cfg.rollout.hf.dtype
        return {"dtype": None if name == "auto" else getattr(torch, name)}

    @classmethod
    def check_options(cls, backend: str, options: dict) -> None:
        """A copy in another dtype needs the whole weights on each process: refused under FSDP2 and ZeRO-3."""
        if options.get("dtype") is not None and backend in ("fsdp2", "zero3"):
            from rlhf.config import ConfigError

            raise ConfigError("rollout.hf.dtype: a decoding copy in another dtype needs the whole weights on each "
                              f"process, which {backend} shards; use rollout.hf.dtype=auto")

    @classmethod
    def check_spec(cls, spec: SamplingSpec) -> None:
        """Every SamplingSpec is drawn exactly."""

    def sync_weights(self, policy: torch.nn.Module) -> None:
        """Decode with ``policy`` from now on: the module itself (shared weights, nothing to copy), or with
        ``dtype`` set, a copy in that dtype whose weights are copied from it (made on the first call). A LoRA policy
        (peft) with ``dtype`` set, its own dtype included, decodes with a plain model holding the merged weights
        (rlhf.lora.merged_weights: W + alpha / r * B @ A), not through peft's wrapped layers, which cost a Python
        detour per adapted layer and token."""
        from rlhf.lora import is_peft_model

        peft = is_peft_model(policy)
        if self.dtype is None or (next(policy.parameters()).dtype == self.dtype and not peft):
            self.policy = policy
            return
        with torch.no_grad():
            if self.policy is None or self.policy is policy:
                self.policy = merged_copy(policy, self.dtype) if peft else \
                    copy.deepcopy(policy).to(self.dtype).eval().requires_grad_(False)
            elif peft:
                load_merged_weights(self.policy, policy)
            else:
                for mine, theirs in zip(self.policy.parameters(), policy.parameters(), strict=True):
                    mine.copy_(theirs)

    def generate(self, query_ids: torch.Tensor, query_mask: torch.Tensor, spec: SamplingSpec | None = None,
                 row_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(N, Q)`` left-padded prompts -> ``response_ids (N, R)``, ``response_mask (N, R)``,
        ``sampler_logprobs (N, R)`` (see :func:`sample`). row_keys ``(N, 2)``: used by the counter sampler."""
        spec = spec if spec is not None else self.spec
        if spec is None:
            raise ValueError("HFEngine.generate needs a SamplingSpec (here or at construction)")
        with self.gather():
            return sample(self.policy, query_ids, query_mask, self.tokenizer, spec, row_keys=row_keys,
                          synced_gpus=self.synced_gpus)

    def close(self) -> None:
        """Nothing to release."""
