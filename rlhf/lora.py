"""LoRA adapters through peft (``model.lora``): the base weights stay frozen and one copy of them serves as both the
policy's backbone and the reference (the same model with its adapters disabled).

peft is an optional dependency, imported only when ``model.lora.r`` is set; without it the run stops at validation
with one line that says ``pip install peft``.

An adapter folder (what a LoRA checkpoint's ``policy/`` or an SFT stage's ``adapter/`` holds) is peft's
``adapter_config.json`` + ``adapter_model.safetensors``, plus what this project needs to use it as a model spec:

    rlhf_base.json   the base it sits on: {"spec": model spec (absolute for a folder), "seed": built-in init seed,
                     "head": "causal_lm" | "score"}
    config.json      the base's config, so everything that reads a spec's config (context length, vocabulary)
                     reads an adapter folder as it reads a model folder
    tokenizer files  the run's tokenizer

``rlhf.models.load_causal_lm`` loads an adapter folder as the merged model (base + adapters, folded into the
weights), so a later stage takes a merged folder or an adapter folder alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from rlhf.config import ConfigError

ADAPTER_CONFIG = "adapter_config.json"
BASE_FILE = "rlhf_base.json"
ALL_LINEAR = "all-linear"


def require_peft(key: str = "model.lora"):
    """The peft module, or a one-line ConfigError naming ``key`` and the install command."""
    try:
        import peft
    except ImportError:
        raise ConfigError(f"{key}: LoRA needs the peft package, which is not installed: pip install peft") from None
    return peft


def lora_enabled(lora: Any) -> bool:
    """``model.lora`` is on: a mapping whose rank is set (``model.lora=null`` and ``model.lora.r=null`` are off)."""
    return lora is not None and lora.get("r") is not None


def lora_alpha(lora: Any) -> float:
    """The scaling numerator: the adapter update is ``alpha / r * B @ A``; null means ``2 * r``."""
    return float(lora.alpha) if lora.alpha is not None else 2.0 * lora.r


def is_peft_model(model: nn.Module | None) -> bool:
    """A peft model, also once FSDP2 has swapped its class for an FSDP subclass (without importing peft)."""
    return model is not None and any(c.__module__.startswith("peft.") for c in type(model).__mro__)


def is_adapter_folder(spec: str | None) -> bool:
    return isinstance(spec, str) and os.path.isfile(os.path.join(os.path.expanduser(spec), ADAPTER_CONFIG))


def matches(name: str, key: str) -> bool:
    """peft's rule for a list entry of target_modules / modules_to_save: the module's full name or its last parts."""
    return name == key or name.endswith("." + key)


def check_lora_settings(lora: Any, module_names: list[str] | None, key: str = "model.lora") -> None:
    """One-line ConfigError for settings that cannot work: rank <= 0, alpha <= 0, dropout outside [0, 1),
    ``target_modules`` neither ``all-linear`` nor a non-empty list, and (when ``module_names``, the model's module
    names, are known) a target or saved module that matches no module of the model."""
    def fail(field: str, msg: str):
        raise ConfigError(f"{key}.{field}: {msg}")

    if not isinstance(lora.r, int) or lora.r <= 0:
        fail("r", f"rank must be an integer > 0, not {lora.r!r} (null = full fine-tuning)")
    if lora.alpha is not None and lora.alpha <= 0:
        fail("alpha", f"must be > 0 or null (2 * r), not {lora.alpha!r}")
    if not 0 <= lora.dropout < 1:
        fail("dropout", f"must be in [0, 1), not {lora.dropout!r}")
    targets = lora.target_modules
    if isinstance(targets, str):
        if targets != ALL_LINEAR:
            fail("target_modules", f"{targets!r}: give {ALL_LINEAR} or a list of module names, e.g. [q_proj, v_proj]")
        targets = []
    elif targets is None or len(targets) == 0:
        fail("target_modules", f"must be {ALL_LINEAR} or a non-empty list of module names")
    if module_names is None:
        return
    for field, names in (("target_modules", targets), ("modules_to_save", lora.modules_to_save or [])):
        for name in names:
            if not any(matches(m, str(name)) for m in module_names):
                leaves = sorted({m.rsplit(".", 1)[-1] for m in module_names if m and not m[-1].isdigit()})
                fail(field, f"{name!r} is not a module of the model; its module names end in: {', '.join(leaves)}")


def skeleton_module_names(spec: str, score: bool = False) -> list[str] | None:
    """The module names of the model ``spec`` would load (``score``: as a one-label sequence classifier), built on
    the meta device from its config: no weights are read or allocated. None when no config can be read offline
    (a hub id without the network): the loader reports that itself."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    from rlhf.models import BUILTIN_ARCHS, BUILTIN_PREFIX, is_random_init, resolve_spec

    if is_random_init(spec):
        config = LlamaConfig(vocab_size=8, **BUILTIN_ARCHS[spec[len(BUILTIN_PREFIX):]])
    else:
        try:
            config = AutoConfig.from_pretrained(os.path.expanduser(resolve_spec(spec)))
        except (OSError, ValueError):
            return None
    if score:
        config.num_labels = 1
    auto = AutoModelForSequenceClassification if score else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return [name for name, _ in model.named_modules()]


def check_lora_config(lora: Any, spec: str, key: str = "model.lora", score: bool = False) -> None:
    """Validation of ``model.lora`` against the model ``spec`` (before any weights load): peft importable, the
    settings sane, every named module present."""
    require_peft(key)
    check_lora_settings(lora, skeleton_module_names(spec, score), key)


# ---------------------------------------------------------------------- building and saving
def lora_config(lora: Any, score: bool = False):
    """peft's LoraConfig for ``model.lora``. ``score``: a one-label sequence classifier, whose score head peft trains
    in full (task SEQ_CLS puts it in modules_to_save) and never gives an adapter."""
    peft = require_peft()
    targets = lora.target_modules if isinstance(lora.target_modules, str) else [str(t) for t in lora.target_modules]
    saved = [str(m) for m in (lora.modules_to_save or [])]
    return peft.LoraConfig(r=lora.r, lora_alpha=lora_alpha(lora), lora_dropout=float(lora.dropout),
                           target_modules=targets, modules_to_save=saved or None,
                           task_type="SEQ_CLS" if score else "CAUSAL_LM")


def add_lora(model: nn.Module, lora: Any, base_spec: str, seed: int, score: bool = False) -> nn.Module:
    """Wrap ``model`` (the base, already loaded from ``base_spec``) in fresh LoRA adapters: B = 0, so the wrapped
    model computes exactly what the base does until the first update. Only the adapters (and modules_to_save)
    require gradients. A is drawn from ``seed``, without touching the global random stream."""
    peft = require_peft()
    with torch.random.fork_rng(), _quiet():
        torch.manual_seed(seed)
        wrapped = peft.get_peft_model(model, lora_config(lora, score))
    wrapped.rlhf_base = base_info(base_spec, seed, score)
    return wrapped


@contextlib.contextmanager
def _quiet():
    """peft calls a transformers method that transformers 5 deprecates, once per wrap: not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def base_info(spec: str, seed: int, score: bool) -> dict:
    if os.path.isdir(os.path.expanduser(spec)):
        spec = os.path.abspath(os.path.expanduser(spec))
    return {"spec": spec, "seed": seed, "head": "score" if score else "causal_lm"}


def read_base_info(folder: str) -> dict:
    path = os.path.join(os.path.expanduser(folder), BASE_FILE)
    if not os.path.isfile(path):
        from rlhf.models import ModelSpecError

        raise ModelSpecError(f"{folder!r} is a peft adapter folder without {BASE_FILE} (written by this project's "
                             "trainers): merge it into its base first (scripts/export.py --base)")
    with open(path) as f:
        return json.load(f)


def save_adapter(model: nn.Module, folder: str, state_dict: dict | None = None) -> None:
    """Write ``model``'s adapters (and modules_to_save) to ``folder``: peft's files, rlhf_base.json and the base's
    config.json. ``state_dict``: the whole model's weights gathered by the backend (peft keeps the adapter ones)."""
    model.save_pretrained(folder, state_dict=state_dict)
    model.get_base_model().config.save_pretrained(folder)
    with open(os.path.join(folder, BASE_FILE), "w") as f:
        json.dump(model.rlhf_base, f, indent=1)


def save_model(model: nn.Module, folder: str, state_dict: dict | None = None) -> None:
    """``save_pretrained`` of a plain model, or the adapter folder of a peft model."""
    if is_peft_model(model):
        save_adapter(model, folder, state_dict)
    else:
        model.save_pretrained(folder, state_dict=state_dict)


def load_adapter(base: nn.Module, folder: str, trainable: bool, base_spec: str, seed: int,
                 score: bool = False) -> nn.Module:
    """``base`` with the adapters of ``folder`` (a checkpoint's, to train further when ``trainable``)."""
    peft = require_peft(f"adapter folder {folder}")
    with _quiet():
        wrapped = peft.PeftModel.from_pretrained(base, folder, is_trainable=trainable)
    wrapped.rlhf_base = base_info(base_spec, seed, score)
    return wrapped


def merged(model: nn.Module) -> nn.Module:
    """The plain transformers model with the adapters folded into its weights (W + alpha / r * B @ A) and the
    modules_to_save copies in place of the originals. Consumes ``model`` (to keep it: :func:`merged_weights`)."""
    return model.merge_and_unload()


def merged_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every entry of the merged model's ``state_dict`` (what :func:`merged` would hold),
    computed from the peft ``model`` without changing it: a LoRA-wrapped layer's weight is a fresh
    W + alpha / r * B @ A (its adapters' names dropped), a modules_to_save module is its trained copy, everything
    else is the base tensor itself (not a copy). Names are the base model's, e.g.
    ``model.layers.0.self_attn.q_proj.weight``: peft's ``base_model.model.`` prefix and ``.base_layer`` gone. Lazy,
    one tensor at a time, so a consumer that copies each away (vLLM's weight reload) never holds a second model."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapter = model.active_adapter
    lora_layers = {f"{name}.base_layer.weight": m for name, m in base.named_modules()
                   if isinstance(m, LoraLayer) and not m.merged}  # merged: the delta is in the weight already
    saved = f".modules_to_save.{adapter}."
    for key, tensor in base.state_dict().items():
        if _ADAPTER_PART.search(key) or ".original_module." in key or (".modules_to_save." in key and saved not in key):
            continue  # adapters (folded in below); the frozen copy a modules_to_save module replaces
        name = key.replace(".base_layer.", ".").replace(saved, ".")
        layer = lora_layers.get(key)
        yield name, (_with_delta(layer, tensor) if layer is not None else tensor)


_ADAPTER_PART = re.compile(r"\.lora_[^.]+\.")  # lora_A / lora_B / lora_embedding_A / lora_magnitude_vector ...


@torch.no_grad()
def _with_delta(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` plus the deltas (alpha / r * B @ A, peft's ``get_delta_weight``) of ``layer``'s active adapters,
    summed in float32 and rounded once to the weight's dtype; a new tensor."""
    out = weight.detach().to(torch.float32, copy=True)
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A or adapter in layer.lora_embedding_A:
            out += layer.get_delta_weight(adapter).float()
    return out.to(weight.dtype)


def load_merged(folder: str, tokenizer, dtype: str = "float32", score: bool = False) -> nn.Module:
    """The model an adapter folder describes, merged: its base (rlhf_base.json) loaded, the adapters applied and
    folded in. ``score``: load the base as a one-label sequence classifier."""
    from rlhf.models import load_causal_lm, load_score_model

    info = read_base_info(folder)
    if score:
        base = load_score_model(info["spec"], tokenizer, dtype, seed=info["seed"], key="model.init")
    else:
        base = load_causal_lm(info["spec"], tokenizer, dtype, seed=info["seed"])
    return merged(load_adapter(base, os.path.expanduser(folder), False, info["spec"], info["seed"], score))


def export_merged(folder: str, out: str, dtype: str = "float32") -> str:
    """Write the merged model of the adapter folder ``folder`` (or of a checkpoint's ``policy/``) to ``out``: a plain
    transformers folder (config, weights, tokenizer) that ``from_pretrained`` loads without peft. Atomic: written to
    ``out.tmp`` and renamed. Returns ``out``."""
    from rlhf.models import ModelSpecError, has_tokenizer_files, load_tokenizer, save_model_folder

    folder = os.path.expanduser(folder)
    if not is_adapter_folder(folder) and is_adapter_folder(os.path.join(folder, "policy")):
        folder = os.path.join(folder, "policy")  # a policy checkpoint step_<N>/
    if not is_adapter_folder(folder):
        raise ModelSpecError(f"{folder!r} holds no {ADAPTER_CONFIG}: not a LoRA adapter folder or checkpoint")
    info = read_base_info(folder)
    tokenizer = load_tokenizer(folder if has_tokenizer_files(folder) else info["spec"])
    model = load_merged(folder, tokenizer, dtype, score=info["head"] == "score")
    return save_model_folder(model, tokenizer, out)


class AdapterDisabled(nn.Module):
    """The reference as a view of the LoRA policy: the policy's forward with its adapters disabled, i.e. the frozen
    base weights the adapters sit on. It holds no weights of its own (its parameters are the policy's), so the run
    keeps one copy of the base. Forward only, under no_grad (rlhf.rollout.forward.rollout_forwards)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)
