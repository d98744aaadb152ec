"""Rollouts: sampling responses and the tensors that carry them through a step.

    batch.py     the Rollout batch, response masks, decoding
    spec.py      SamplingSpec: the sampling distribution (temperature, top-k, top-p, min-p, min_new_tokens), the
                 processors that draw from it and the log-probs of tokens under it, one definition for both
    engines.py   the RolloutEngine protocol, the ENGINES registry, build_engine and check_backend
    hf.py        the transformers ``generate`` engine (KV cache; counter or torch sampler)
    vllm.py      the vLLM engine (weights streamed in every step)
    sampling.py  counter-based sampling: a row's randomness keyed by (seed, step, row)
    forward.py   log-probs and values of a rollout under the policy, reference and critic

A new rollout engine (e.g. SGLang, a remote server) is one new file here, a class following
``engines.RolloutEngine`` (``generate(query_ids, query_mask, spec, row_keys) -> (response_ids, response_mask,
sampler_logprobs | None)``, ``sync_weights(policy)``, ``close()``, the ``backends`` it supports), plus one registry
line in engines.py: ``ENGINES.register("sglang")(SGLangEngine)``. Config validation, the backend check and
``build_engine`` then know it; the trainer does not change.
"""
