"""The transformers engine: ``generate`` with a KV cache, sampling by the counter sampler or torch's RNG."""

from __future__ import annotations

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
from rlhf.rollout.batch import response_mask_from_ids
from rlhf.rollout.sampling import CounterSampler

SAMPLERS = ["counter", "torch"]

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
    :func:`rlhf.rollout.sampling.row_keys`, so a row's sample does not depend on the batch it is in or the process that
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
