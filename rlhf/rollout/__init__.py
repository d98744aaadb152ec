"""Rollouts: sampling responses and the tensors that carry them through a step.

    batch.py     the Rollout batch, response masks, decoding
    hf.py        the transformers ``generate`` engine (KV cache; counter or torch sampler)
    vllm.py      the vLLM engine (weights streamed in every step)
    sampling.py  counter-based sampling: a row's randomness keyed by (seed, step, row)
    forward.py   log-probs and values of a rollout under the policy, reference and critic
"""
