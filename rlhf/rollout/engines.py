"""Rollout engines: one protocol, one registry, one factory, one backend check.

An engine turns prompts into sampled responses from the distribution a :class:`~rlhf.rollout.spec.SamplingSpec`
names, and follows the policy's weights as training moves them:

    engine = build_engine(name, policy, tokenizer, spec, gather=..., synced_gpus=..., **engine_options(cfg))
    check_backend(name, backend_kind)       # once the distributed backend is known; one-line ConfigError
    engine.sync_weights(policy)             # every step, before generating
    ids, mask, sampler_logprobs = engine.generate(query_ids, query_mask, spec, row_keys)
    engine.close()                          # at the end of the run

Registered: ``hf`` (rlhf.rollout.hf.HFEngine: transformers ``generate`` on the trainer's own policy, every
backend) and ``vllm`` (rlhf.rollout.vllm.VLLMEngine: a vLLM copy of the policy, weights streamed in every step;
single, ddp and zero2, where each process holds the whole policy). A new engine, e.g. SGLang behind a server, is one
file ``rlhf/rollout/sglang.py`` holding a class that follows :class:`RolloutEngine` (its ``sync_weights`` pushes the
weights to the server, its ``generate`` sends the token-id prompts and the spec's knobs and pads what comes back),
plus one line here: ``ENGINES.register("sglang")(SGLangEngine)``. The config check (rollout.engine), the backend
check and the factory then know it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from transformers import PreTrainedTokenizerBase

from rlhf.config import ConfigError
from rlhf.core.registry import Registry
from rlhf.rollout.hf import HFEngine
from rlhf.rollout.spec import SamplingSpec
from rlhf.rollout.vllm import VLLMEngine

BACKENDS = ("single", "ddp", "fsdp2", "zero2", "zero3")
"""The distributed backends an engine may support: the values of rlhf.runtime.backend.DistributedBackend.kind."""

_BACKEND_NAMES = {"single": "one process", "ddp": "DDP", "fsdp2": "FSDP2", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}
_BACKEND_CONFIGS = {"ddp": "ddp.yaml", "zero2": "deepspeed_zero2.yaml", "fsdp2": "fsdp2.yaml",
                    "zero3": "deepspeed_zero3.yaml"}  # under configs/accelerate/


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs of a rollout engine.

    Construction (through :func:`build_engine`): ``Engine(policy, tokenizer, spec, *, gather=None,
    synced_gpus=None, **options)``: the unwrapped policy and its tokenizer, the run's default spec, the context
    decoding on a sharded policy runs in (``gather()``) and whether every process must keep stepping (``synced_gpus``),
    which an engine that does not decode with the trainer's module may ignore, then its own options (built from the
    run config by ``options_from_config``).
    """

    backends: ClassVar[frozenset[str]]
    """The subset of BACKENDS the engine works under. Optionally ``unsupported_backend``: a ``str.format``
    template with ``{backend}`` saying why the others are refused."""

    @classmethod
    def options_from_config(cls, cfg: Any) -> dict:
        """Engine-specific constructor options from the run config (``cfg.rollout.<engine>``, seed, dtypes, ...)."""
        ...

    @classmethod
    def check_spec(cls, spec: SamplingSpec) -> None:
        """Raise a one-line ConfigError for a spec the engine cannot draw exactly."""
        ...

    def generate(self, query_ids: torch.Tensor, query_mask: torch.Tensor, spec: SamplingSpec | None = None,
                 row_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``query_ids, query_mask (N, Q)`` left-padded -> ``response_ids (N, R)`` (right-padded after EOS; R <=
        spec.max_new_tokens), ``response_mask (N, R)`` (1 up to and including EOS), ``sampler_logprobs (N, R)``
        float32 or None (the drawn tokens' log-probs under the distribution they were drawn from; 0 at padding).
        spec None: the one given at construction. row_keys ``(N, 2)`` (rlhf.rollout.sampling.row_keys): the rows'
        counter-sampling keys, used when ``spec.sampler == "counter"``."""
        ...

    def sync_weights(self, policy: torch.nn.Module) -> None:
        """Make the next ``generate`` sample from ``policy``'s current weights (the unwrapped module)."""
        ...

    def close(self) -> None:
        """Release the engine's resources (process groups, servers, caches) before the run's own shutdown."""
        ...


ENGINES: Registry[Callable[..., RolloutEngine]] = Registry("rollout engine")
ENGINES.register("hf")(HFEngine)
ENGINES.register("vllm")(VLLMEngine)


def _engine_class(name: str):
    try:
        return ENGINES.get(name)
    except KeyError as e:
        raise ConfigError(f"rollout.engine: {e.args[0]}") from None


def engine_options(cfg: Any) -> dict:
    """The constructor options of ``cfg.rollout.engine`` from the run config (``{}`` for hf)."""
    return _engine_class(cfg.rollout.engine).options_from_config(cfg)


def build_engine(name: str, policy: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, spec: SamplingSpec, *,
                 gather: Callable[[], AbstractContextManager] | None = None, synced_gpus: bool | None = None,
                 **options: Any) -> RolloutEngine:
    """The engine registered as ``name`` (unknown: one-line ConfigError listing the valid names).

    policy: the unwrapped policy; spec: the run's SamplingSpec (checked by the engine's ``check_spec``); gather: a
    callable returning the context manager decoding on a sharded policy runs in (FSDP2 / ZeRO-3: the whole weights
    gathered once; None: nothing); synced_gpus: True when every process must keep stepping until all are done
    (multi-process FSDP2), None to let transformers decide; options: engine-specific (``engine_options(cfg)``).
    """
    cls = _engine_class(name)
    cls.check_spec(spec)
    return cls(policy, tokenizer, spec, gather=gather, synced_gpus=synced_gpus, **options)


def check_backend(name: str, backend: str, options: dict | None = None) -> None:
    """Raise a one-line ConfigError starting ``rollout.engine:`` when engine ``name`` does not support the
    distributed ``backend`` (one of BACKENDS: DistributedBackend.kind), or (an engine's own ``check_options``, when
    it has one) not with these constructor ``options``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown distributed backend {backend!r}; one of {', '.join(BACKENDS)}")
    cls = _engine_class(name)
    if backend in cls.backends:
        if options and hasattr(cls, "check_options"):
            cls.check_options(backend, options)
        return
    label = _BACKEND_NAMES[backend]
    why = getattr(cls, "unsupported_backend", "does not support {backend}").format(backend=label)
    files = [_BACKEND_CONFIGS[b] for b in ("ddp", "zero2", "fsdp2", "zero3") if b in cls.backends]
    use = "configs/accelerate/" + " or ".join(files) if files else "one process"
    raise ConfigError(f"rollout.engine: {name} {why}; use {use} with {name}")
