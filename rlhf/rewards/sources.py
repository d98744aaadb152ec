"""Reward sources, selected by ``type`` from the REWARD_SOURCES registry, and the container that sums them.

    type      scores each (prompt, completion) row with                     reads
    model     an AutoModelForSequenceClassification with 1 label             path, tokenizer (null = the model's own)
    function  a Python ``fn(prompts, completions) -> list[float]``           path (pkg.module.fn), reward.timeout_s
    remote    a reward server: POST {"prompts", "completions"} -> {"scores"}  url, batch_size, timeout_s, retries

Every source has a unique name (logged as ``score/<name>``) and a weight. The sources of a policy config are, in
this order: ``model.reward`` (name ``model``, weight ``reward.model_weight``), ``reward.function`` (name
``function``, weight ``reward.function_weight``), then each entry of ``reward.sources``. The total is
rlhf.rewards.scoring.total_score: the weighted sum, then ``reward.missing_eos_penalty``, then ``reward.clip``.

A new source type is one RewardSource subclass registered with ``@REWARD_SOURCES.register("<type>")``: its
``check`` (config values, before any model loads), ``build`` (from the config), ``score`` and, if it holds torch
modules, ``modules`` / ``place``.
"""

from __future__ import annotations

import contextlib
import math
import re
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rlhf.config import ConfigError, RewardSourceConfig, import_function
from rlhf.core.registry import Registry
from rlhf.rewards import scoring
from rlhf.rewards.functions import call_reward_function
from rlhf.rewards.remote import remote_scores
from rlhf.rollout.batch import decode_responses

LoadModel = Callable[[str, PreTrainedTokenizerBase, str], nn.Module]
"""``(spec, tokenizer the model is built for, config key) -> frozen score model``: how a model source loads its
weights, given by the caller so that it controls dtype, seed and device (see score_model_loader)."""

MAX_RETRIES = 10
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-]+")


# ---------------------------------------------------------------------------------------------- what a source sees
@dataclass
class ScoreBatch:
    """N rows to score. ``prompts`` / ``completions``: N strings (a prompt repeated once per sample; completions
    decoded up to EOS); ``query_ids`` / ``query_mask`` ``(N, Q)`` left-padded, ``response_ids`` /
    ``response_mask`` ``(N, R)``, in the policy ``tokenizer``'s ids; ``autocast``: a zero-argument callable
    returning the context a model forward runs in, or None."""

    prompts: list[str]
    completions: list[str]
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    tokenizer: PreTrainedTokenizerBase
    autocast: Callable[[], Any] | None = None

    @property
    def device(self) -> torch.device:
        return self.response_ids.device


@dataclass
class SourceSpec(RewardSourceConfig):
    """One source as configured: a ``reward.sources`` entry, or a shorthand (``model.reward``,
    ``reward.function``). ``key`` is the config key of the source; ``keys`` maps a field to its config key where
    that is not ``<key>.<field>`` (the shorthands)."""

    key: str = ""
    keys: Mapping[str, str] = field(default_factory=dict)

    def key_of(self, name: str) -> str:
        return self.keys.get(name, f"{self.key}.{name}")


@dataclass
class BuildContext:
    """What building a source may use: the whole validated policy config, the policy tokenizer, the loader."""

    cfg: Any
    tokenizer: PreTrainedTokenizerBase
    load_model: LoadModel


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


# ---------------------------------------------------------------------------------------------- the interface
class RewardSource:
    """One way of scoring responses. Subclasses set ``type`` (the registry name) and ``fields`` (the optional config
    fields among path / url / tokenizer they read; setting another is an error), and implement ``check``,
    ``build`` and ``score``."""

    type: ClassVar[str] = ""
    fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, weight: float, key: str):
        self.name, self.weight, self.key = name, float(weight), key

    @classmethod
    def default_name(cls, spec_fields: Mapping[str, Any], index: int) -> str:
        """The name of ``reward.sources[index]`` when it sets none: ``<type><index>``."""
        return f"{cls.type}{index}"

    @classmethod
    def check(cls, spec: SourceSpec) -> None:
        """Raise a one-line ConfigError naming the key for a value this type cannot run with. Reads config files
        at most; loads no weights. The base class refuses the fields the type does not read."""
        for name in ("path", "url", "tokenizer"):
            _check(getattr(spec, name) is None or name in cls.fields, spec.key_of(name),
                   f"a {cls.type} source has no {name} (it reads {', '.join(cls.fields) or 'none of them'})")

    @classmethod
    def build(cls, spec: SourceSpec, ctx: BuildContext) -> RewardSource:
        raise NotImplementedError

    def score(self, batch: ScoreBatch) -> torch.Tensor:
        """``(N,)`` float32 unweighted scores of the batch's rows, on ``batch.device``."""
        raise NotImplementedError

    def modules(self) -> list[nn.Module]:
        """The torch modules the caller places on a device (and shards under ZeRO-3); none by default."""
        return []

    def place(self, fn: Callable[[nn.Module], nn.Module]) -> None:
        """Replace each of ``modules()`` by ``fn(module)`` (e.g. the backend's place_frozen)."""

    def describe(self) -> str:
        """What the source is, for messages: its path or URL."""
        return ""


REWARD_SOURCES: Registry[type[RewardSource]] = Registry("reward source type")


# ---------------------------------------------------------------------------------------------- the types
@REWARD_SOURCES.register("model")
class ModelSource(RewardSource):
    """A reward model: ``AutoModelForSequenceClassification`` with one label, read at the last real token of
    prompt + response. ``tokenizer`` None: the policy's token ids are passed as they are; else the text is
    re-tokenized with it (rlhf.rewards.scoring.reward_model_scores)."""

    type = "model"
    fields = ("path", "tokenizer")

    def __init__(self, name: str, weight: float, module: nn.Module,
                 tokenizer: PreTrainedTokenizerBase | None = None, key: str = "model.reward",
                 path: str | None = None):
        super().__init__(name, weight, key)
        self.module, self.tokenizer, self.path = module, tokenizer, path

    @classmethod
    def check(cls, spec: SourceSpec) -> None:
        from rlhf.config import _check_one_label, _check_tokenizer_pairing
        from rlhf.models import check_spec

        super().check(spec)
        path_key, tok_key = spec.key_of("path"), spec.key_of("tokenizer")
        _check(spec.path is not None, path_key, "a model source needs path: a reward model folder, hub id or "
               "builtin:<name>")
        for value, key in ((spec.path, path_key), (spec.tokenizer, tok_key)):
            if value is not None:
                try:
                    check_spec(value, key)
                except ValueError as e:
                    raise ConfigError(str(e)) from None
        _check_tokenizer_pairing(spec.path, spec.tokenizer, tok_key, path_key)
        _check_one_label(spec.path, path_key)

    @classmethod
    def build(cls, spec: SourceSpec, ctx: BuildContext) -> ModelSource:
        from rlhf.models import check_tokenizer_fits, load_tokenizer, same_tokenizer

        path_key, tok_key = spec.key_of("path"), spec.key_of("tokenizer")
        own = load_tokenizer(spec.tokenizer or spec.path, padding_side="right")
        check_tokenizer_fits(own, spec.path, spec.tokenizer, tok_key, path_key)
        # A built-in reward model is built for the tokenizer that feeds it, which is its own.
        module = ctx.load_model(spec.path, own, path_key)
        return cls(spec.name, spec.weight, module, None if same_tokenizer(ctx.tokenizer, own) else own,
                   key=spec.key, path=spec.path)

    def score(self, batch: ScoreBatch) -> torch.Tensor:
        with torch.no_grad(), (batch.autocast() if batch.autocast is not None else contextlib.nullcontext()):
            # Looked up on the module at each call, so a test can replace it (tests/test_reliability.py).
            rm = scoring.reward_model_scores(self.module, batch.tokenizer, self.tokenizer, batch.query_ids,
                                             batch.query_mask, batch.response_ids, batch.response_mask,
                                             batch.prompts, batch.completions)
        return rm.float().to(batch.device)

    def modules(self) -> list[nn.Module]:
        return [self.module]

    def place(self, fn: Callable[[nn.Module], nn.Module]) -> None:
        self.module = fn(self.module)

    def describe(self) -> str:
        return self.path or type(self.module).__name__


@REWARD_SOURCES.register("function")
class FunctionSource(RewardSource):
    """A Python function ``fn(prompts, completions) -> list[float]`` (TRL's ``reward_funcs``), called through
    call_reward_function: at most ``timeout_s`` seconds (``reward.timeout_s``; None = no limit), result checked."""

    type = "function"
    fields = ("path",)

    def __init__(self, name: str, weight: float, fn: Callable, path: str | None = None,
                 timeout_s: float | None = None, key: str = "reward.function"):
        super().__init__(name, weight, key)
        self.fn, self.timeout_s = fn, timeout_s
        self.path = path or getattr(fn, "__qualname__", repr(fn))

    @classmethod
    def default_name(cls, spec_fields: Mapping[str, Any], index: int) -> str:
        """The function's own name: the last component of ``pkg.module.fn`` (or ``pkg.module:fn``)."""
        path = spec_fields.get("path")
        return path.replace(":", ".").rpartition(".")[2] if path else super().default_name(spec_fields, index)

    @classmethod
    def check(cls, spec: SourceSpec) -> None:
        super().check(spec)
        _check(spec.path is not None, spec.key_of("path"), "a function source needs path: pkg.module.fn")
        import_function(spec.path, spec.key_of("path"))

    @classmethod
    def build(cls, spec: SourceSpec, ctx: BuildContext) -> FunctionSource:
        return cls(spec.name, spec.weight, import_function(spec.path, spec.key_of("path")), spec.path,
                   getattr(ctx.cfg.reward, "timeout_s", None), key=spec.key)

    def score(self, batch: ScoreBatch) -> torch.Tensor:
        return call_reward_function(self.fn, self.path, batch.prompts, batch.completions, self.timeout_s,
                                    key=self.key).to(batch.device)

    def describe(self) -> str:
        return self.path


@REWARD_SOURCES.register("remote")
class RemoteSource(RewardSource):
    """A reward server at ``url`` (rlhf.rewards.remote): ``batch_size`` rows per request, ``timeout_s`` per
    attempt, ``retries`` more attempts with exponential backoff from ``backoff_s`` (None = rlhf.rewards.remote
    .BACKOFF_S, 0.5 s) on connection errors, timeouts and 5xx."""

    type = "remote"
    fields = ("url",)

    def __init__(self, name: str, weight: float, url: str, batch_size: int = 64, timeout_s: float = 30.0,
                 retries: int = 3, key: str = "reward.sources[0]", backoff_s: float | None = None):
        super().__init__(name, weight, key)
        self.url, self.batch_size, self.timeout_s, self.retries = url, batch_size, timeout_s, retries
        self.backoff_s = backoff_s

    @classmethod
    def check(cls, spec: SourceSpec) -> None:
        super().check(spec)
        url_key = spec.key_of("url")
        _check(spec.url is not None, url_key, "a remote source needs url: http(s)://host:port/path")
        parts = urllib.parse.urlsplit(spec.url)
        _check(parts.scheme in ("http", "https") and bool(parts.netloc), url_key,
               f"{spec.url!r} is not an http:// or https:// URL with a host")
        _check(spec.batch_size >= 1, spec.key_of("batch_size"), f"must be >= 1, got {spec.batch_size}")
        _check(math.isfinite(spec.timeout_s) and spec.timeout_s > 0, spec.key_of("timeout_s"),
               f"must be > 0 seconds, got {spec.timeout_s}")
        _check(0 <= spec.retries <= MAX_RETRIES, spec.key_of("retries"),
               f"must be in [0, {MAX_RETRIES}], got {spec.retries}")

    @classmethod
    def build(cls, spec: SourceSpec, ctx: BuildContext) -> RemoteSource:
        return cls(spec.name, spec.weight, spec.url, spec.batch_size, spec.timeout_s, spec.retries, key=spec.key)

    def score(self, batch: ScoreBatch) -> torch.Tensor:
        out = remote_scores(self.url, batch.prompts, batch.completions, key=self.key, batch_size=self.batch_size,
                            timeout_s=self.timeout_s, retries=self.retries, backoff_s=self.backoff_s)
        return torch.tensor(out, dtype=torch.float32).to(batch.device)

    def describe(self) -> str:
        return self.url


# ---------------------------------------------------------------------------------------------- config
def source_specs(cfg) -> list[SourceSpec]:
    """The sources of a policy config, in scoring order: ``model.reward``, ``reward.function``, then
    ``reward.sources``. An unknown ``type`` is a ConfigError listing the valid ones; nothing else is checked."""
    r, m = cfg.reward, cfg.model
    specs = []
    if m.reward is not None:
        specs.append(SourceSpec(type="model", key="model.reward", name="model", path=m.reward, tokenizer=m.reward_tokenizer,
                                weight=r.model_weight, keys={"path": "model.reward", "name": "model.reward",
                                                             "tokenizer": "model.reward_tokenizer",
                                                             "weight": "reward.model_weight"}))
    if r.function is not None:
        specs.append(SourceSpec(type="function", key="reward.function", name="function", path=r.function,
                                weight=r.function_weight, keys={"path": "reward.function", "name": "reward.function",
                                                                "weight": "reward.function_weight"}))
    for i, s in enumerate(getattr(r, "sources", None) or []):
        key = f"reward.sources[{i}]"
        _check(s.type in REWARD_SOURCES, f"{key}.type",
               f"unknown reward source type {s.type!r}; valid types: {', '.join(REWARD_SOURCES.names())}")
        values = {f: s[f] for f in ("path", "url", "weight", "tokenizer", "batch_size", "timeout_s", "retries")}
        name = s.name if s.name is not None else REWARD_SOURCES.get(s.type).default_name(values, i)
        specs.append(SourceSpec(type=s.type, key=key, name=name, **values))
    return specs


def check_reward_sources(cfg) -> None:
    """Config checks of every source, the shorthands included (types, per-type fields, ranges), finite weights, and
    unique names across the shorthands and the list. Run by validate_policy_config, before any model loads.
    Raises a one-line ConfigError naming the key (``reward.sources[1].type: ...``)."""
    seen: dict[str, str] = {}
    for spec in source_specs(cfg):
        REWARD_SOURCES.get(spec.type).check(spec)  # the shorthands too: model.reward, reward.function
        _check(math.isfinite(spec.weight), spec.key_of("weight"), f"must be a finite number, got {spec.weight}")
        _check(bool(NAME_PATTERN.fullmatch(spec.name)), spec.key_of("name"),
               f"{spec.name!r} is not a metric name (letters, digits, _ . - only); it is logged as score/<name>")
        _check(spec.name not in seen, spec.key_of("name"),
               f"{spec.name!r} is already the name of {seen.get(spec.name)}; names are unique (each is logged as "
               "score/<name>): set a name")
        seen[spec.name] = spec.key


def score_model_loader(dtype: str = "float32", seed: int = 0) -> LoadModel:
    """The LoadModel of a model source: rlhf.models.load_score_model (built-in weights seeded by ``seed``, so every
    process builds the same), frozen, on the CPU; the caller places it (RewardSources.place)."""
    from rlhf.models import freeze, load_score_model

    def load(spec: str, tokenizer: PreTrainedTokenizerBase, key: str) -> nn.Module:
        return freeze(load_score_model(spec, tokenizer, dtype, seed=seed, key=key))

    return load


# ---------------------------------------------------------------------------------------------- the container
class Scored(NamedTuple):
    """What RewardSources.score returns: ``total (N,)``, each source's unweighted ``(N,)`` score by name, the gold
    score ``(N,)`` (logged only) or None, and the N decoded completions."""

    total: torch.Tensor
    by_source: dict[str, torch.Tensor]
    gold: torch.Tensor | None
    completions: list[str]


class RewardSources:
    """The reward sources of a run, in scoring order, with the rule that sums them (rlhf.rewards.scoring
    .total_score) and the gold scorer. ``tokenizer`` is the policy's: it decodes the completions and its EOS
    decides ``missing_eos_penalty``. ``timeout_s`` bounds each call of ``gold_fn`` (None = no limit)."""

    def __init__(self, sources: list[RewardSource], tokenizer: PreTrainedTokenizerBase, *,
                 missing_eos_penalty: float | None = None, clip: float | None = None, gold_fn: Callable | None = None,
                 gold_name: str | None = None, timeout_s: float | None = None):
        names = [s.name for s in sources]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"reward source name {dup!r} is used twice; names are unique (logged as score/<name>)")
        self.sources, self.tokenizer = list(sources), tokenizer
        self.missing_eos_penalty, self.clip = missing_eos_penalty, clip
        self.gold_fn, self.timeout_s = gold_fn, timeout_s
        self.gold_name = gold_name or getattr(gold_fn, "__qualname__", "gold")

    @classmethod
    def from_config(cls, cfg, tokenizer: PreTrainedTokenizerBase, load_model: LoadModel | None = None
                    ) -> RewardSources:
        """The sources of a validated policy config (``model.reward``, ``reward.function``, ``reward.sources``) and
        its ``reward.gold``. Model sources load through ``load_model`` (default: score_model_loader(model.dtype,
        seed)), on the CPU; place them with ``place``."""
        load_model = load_model or score_model_loader(cfg.model.dtype, cfg.seed)
        ctx = BuildContext(cfg, tokenizer, load_model)
        sources = [REWARD_SOURCES.get(spec.type).build(spec, ctx) for spec in source_specs(cfg)]
        r = cfg.reward
        gold_fn = import_function(r.gold, "reward.gold") if r.gold else None
        return cls(sources, tokenizer, missing_eos_penalty=r.missing_eos_penalty, clip=r.clip, gold_fn=gold_fn,
                   gold_name=r.gold, timeout_s=getattr(r, "timeout_s", None))

    # ---------------------------------------------------------------- access
    def __iter__(self) -> Iterator[RewardSource]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, name: str) -> RewardSource:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(f"no reward source named {name!r}; names: {', '.join(self.names())}")

    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def modules(self) -> list[nn.Module]:
        """Every torch module of every source (the reward models), to place on a device and freeze."""
        return [m for s in self.sources for m in s.modules()]

    def place(self, fn: Callable[[nn.Module], nn.Module]) -> None:
        """Replace each module by ``fn(module)``: ``sources.place(backend.place_frozen)`` moves the reward models to
        the device, or wraps them as ZeRO-3 engines."""
        for s in self.sources:
            s.place(fn)

    def reward_model(self) -> tuple[nn.Module | None, PreTrainedTokenizerBase | None]:
        """The ``model.reward`` shorthand's model and tokenizer (None when it is the policy's), or ``(None,
        None)``: what Models.reward / reward_tokenizer held (a PPO critic starts as a copy of it)."""
        for s in self.sources:
            if isinstance(s, ModelSource) and s.key == "model.reward":
                return s.module, s.tokenizer
        return None, None

    # ---------------------------------------------------------------- scoring
    def score(self, prompts: list[str], query_ids: torch.Tensor, query_mask: torch.Tensor,
              response_ids: torch.Tensor, response_mask: torch.Tensor,
              autocast: Callable[[], Any] | None = None) -> Scored:
        """Score N rows: ``prompts`` N strings (each prompt once per sample), ``query_*`` ``(N, Q)``,
        ``response_*`` ``(N, R)`` in the policy tokenizer's ids. ``autocast``: a zero-argument callable returning
        the context of the reward-model forwards (e.g. ``backend.autocast``), or None.

        Returns Scored: ``total (N,)`` float32 on the rows' device (weighted sum, missing-EOS penalty, clip),
        ``by_source`` name -> unweighted ``(N,)``, ``gold (N,)`` or None, the decoded completions.
        """
        n = response_ids.shape[0]
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} rows; repeat each prompt once per sample")
        completions = decode_responses(self.tokenizer, response_ids, response_mask)
        batch = ScoreBatch(list(prompts), completions, query_ids, query_mask, response_ids, response_mask,
                           self.tokenizer, autocast)
        by_source = {s.name: s.score(batch) for s in self.sources}
        total = scoring.total_score([(s.weight, by_source[s.name]) for s in self.sources], response_ids,
                                    response_mask, self.tokenizer.eos_token_id, self.missing_eos_penalty, self.clip)
        gold = None
        if self.gold_fn is not None:
            gold = call_reward_function(self.gold_fn, self.gold_name, batch.prompts, completions, self.timeout_s,
                                        key="reward.gold").to(batch.device)
        return Scored(total, by_source, gold, completions)

    def nonfinite_message(self, scored: Scored) -> str | None:
        """None when every total is finite; else what to report: the first source with a non-finite score
        (``model.reward <path> returned a non-finite score``), or the weighted total itself."""
        if bool(torch.isfinite(scored.total).all()):
            return None
        for s in self.sources:
            if not bool(torch.isfinite(scored.by_source[s.name]).all()):
                return " ".join(filter(None, (s.key, s.describe(), "returned a non-finite score")))
        return "the weighted total of the reward sources is non-finite (a score times its weight overflows)"
