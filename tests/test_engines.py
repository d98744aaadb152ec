"""Rollout engines (rlhf.rollout.engines): the registry, the factory, the backend check, and the HF engine's
protocol (generate -> ids, mask, sampler log-probs; sync_weights; close; the gather context it decodes in)."""

import contextlib

import pytest
import torch

from rlhf.config import ConfigError
from rlhf.rollout.engines import (
    BACKENDS,
    ENGINES,
    RolloutEngine,
    build_engine,
    check_backend,
    engine_options,
)
from rlhf.rollout.hf import HFEngine
from rlhf.rollout.sampling import row_keys
from rlhf.rollout.spec import SamplingSpec
from rlhf.rollout.vllm import VLLMEngine


@pytest.fixture(scope="module")
def tiny():
    from rlhf.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer("builtin:words")
    return tok, load_causal_lm("builtin:tiny", tok, seed=0).eval()


def test_registry_holds_hf_and_vllm():
    assert ENGINES.names() == ["hf", "vllm"]
    assert ENGINES.get("hf") is HFEngine and ENGINES.get("vllm") is VLLMEngine
    for cls in (HFEngine, VLLMEngine):
        assert cls.backends <= set(BACKENDS)
        for method in ("generate", "sync_weights", "close", "options_from_config", "check_spec"):
            assert callable(getattr(cls, method))


def test_backend_names_are_the_distributed_backend_kinds():
    try:
        from rlhf.runtime.backend import BACKEND_KINDS
    except Exception:  # noqa: BLE001 - the runtime module is optional here
        pytest.skip("rlhf.runtime.backend.BACKEND_KINDS not importable")
    assert tuple(BACKEND_KINDS) == BACKENDS


def test_unknown_engine_is_a_one_line_error_listing_the_valid_names(tiny):
    tok, model = tiny
    with pytest.raises(ConfigError) as e:
        build_engine("sglang", model, tok, SamplingSpec(max_new_tokens=2))
    assert str(e.value) == "rollout.engine: unknown rollout engine 'sglang'; valid names: hf, vllm"
    with pytest.raises(ConfigError, match="^rollout.engine: unknown rollout engine 'sglang'"):
        check_backend("sglang", "ddp")


def test_config_checks_the_engine_name_against_the_registry(policy_cfg):
    with pytest.raises(ConfigError) as e:
        policy_cfg("rollout.engine=sglang")
    assert str(e.value) == "rollout.engine: 'sglang' is not one of hf, vllm"


def test_backend_check():
    for backend in BACKENDS:
        check_backend("hf", backend)  # the HF engine decodes with the trainer's module: every backend
    for backend in ("single", "ddp", "zero2"):
        check_backend("vllm", backend)
    for backend, name in (("fsdp2", "FSDP2"), ("zero3", "ZeRO-3")):
        with pytest.raises(ConfigError) as e:
            check_backend("vllm", backend)
        msg = str(e.value)
        assert msg == (f"rollout.engine: vllm copies the whole policy into vLLM every step, but {name} shards it; "
                       "use configs/accelerate/ddp.yaml or deepspeed_zero2.yaml with vllm")
        assert "\n" not in msg
    with pytest.raises(ValueError, match="unknown distributed backend 'tpu'"):
        check_backend("hf", "tpu")


def test_vllm_refuses_min_p_with_top_k_or_top_p(policy_cfg):
    """vLLM applies min-p before top-k/top-p, transformers after: the pair would sample another distribution than
    the log-probs score. Refused by the engine's check_spec, from config validation (before vllm is imported)."""
    VLLMEngine.check_spec(SamplingSpec(min_p=0.1))
    VLLMEngine.check_spec(SamplingSpec(top_k=5, top_p=0.9))
    for knobs in ({"min_p": 0.1, "top_k": 5}, {"min_p": 0.1, "top_p": 0.9}):
        with pytest.raises(ConfigError, match="^rollout.min_p: vllm applies min-p before top-k/top-p"):
            VLLMEngine.check_spec(SamplingSpec(**knobs))
    HFEngine.check_spec(SamplingSpec(min_p=0.1, top_k=5))  # the HF engine draws every spec exactly
    with pytest.raises(ConfigError, match="^rollout.min_p: vllm applies") as e:
        policy_cfg("rollout.engine=vllm", "rollout.min_p=0.1", "rollout.top_k=5")
    assert "\n" not in str(e.value)


def test_engine_options_from_the_run_config(policy_cfg):
    assert engine_options(policy_cfg()) == {"dtype": None}  # hf, rollout.hf.dtype=auto: the policy module itself
    assert engine_options(policy_cfg("rollout.hf.dtype=bfloat16")) == {"dtype": torch.bfloat16}
    cfg = policy_cfg()  # engine_options reads the config only; vllm need not be installed to build the options
    cfg.rollout.engine = "vllm"
    cfg.trainer.mixed_precision = "bf16"
    opts = engine_options(cfg)
    assert opts["dtype"] == "bfloat16"
    assert opts["max_model_len"] == cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    assert opts["seed"] == cfg.seed
    assert set(opts) == {"seed", "dtype", "max_model_len", "enforce_eager", "gpu_memory_utilization",
                         "cpu_kv_cache_gb"}


def test_hf_engine_follows_the_protocol(tiny):
    """build_engine('hf', ...) decodes inside the trainer's gather context, returns (ids, mask, sampler log-probs)
    with 0 at padding, uses the construction spec when none is passed, and sync_weights switches the module."""
    tok, model = tiny
    entered = []

    @contextlib.contextmanager
    def gather():
        entered.append("in")
        yield
        entered.append("out")

    calls = []
    handle = model.register_forward_pre_hook(lambda mod, args: calls.append(entered[-1:] == ["in"]))
    try:
        spec = SamplingSpec(max_new_tokens=5, top_k=4, eos_token_id=tok.eos_token_id)
        engine = build_engine("hf", model, tok, spec, gather=gather, synced_gpus=None)
        assert isinstance(engine, RolloutEngine) and isinstance(engine, HFEngine)
        enc = tok(["the food was", "bad"], return_tensors="pt", padding=True, padding_side="left")
        keys = row_keys(0, 0, torch.arange(2))
        ids, mask, lp = engine.generate(enc["input_ids"], enc["attention_mask"], None, keys)
    finally:
        handle.remove()
    assert entered == ["in", "out"] and calls and all(calls)  # every decoding forward ran inside gather()
    assert ids.shape == mask.shape == lp.shape and ids.shape[0] == 2 and ids.shape[1] <= 5
    assert (lp[mask == 0] == 0).all() and torch.isfinite(lp).all() and (lp[mask == 1] < 0).all()
    # The same rows again give the same tokens (counter sampler); another module after sync_weights other ones.
    again, _, _ = engine.generate(enc["input_ids"], enc["attention_mask"], spec, keys)
    assert torch.equal(again, ids)
    other = type(model)(model.config).eval()
    engine.sync_weights(other)
    assert engine.policy is other
    engine.close()
    with pytest.raises(ValueError, match=r"row_keys of shape \(2, 2\)"):
        engine.generate(enc["input_ids"], enc["attention_mask"], spec, None)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate(enc["input_ids"], enc["attention_mask"], SamplingSpec(), keys)
