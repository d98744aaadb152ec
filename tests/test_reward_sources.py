"""Reward sources as a registry (rlhf.rewards.sources): one class per type, several sources weighted into one total
(bit-identical to the old model + function rule for the shorthand configs), per-source scores by name, the
missing-EOS penalty and clip after the weighted sum, and one-line config errors naming the key."""

import math
import time

import pytest
import torch

from rlhf.config import ConfigError, validate_policy_config
from rlhf.rewards import scoring
from rlhf.rewards.functions import RewardFunctionError
from rlhf.rewards.sources import (
    REWARD_SOURCES,
    FunctionSource,
    ModelSource,
    RewardSource,
    RewardSources,
    source_specs,
)
from tests.conftest import FAST, compose_policy

HERE = "tests.test_reward_sources"


# Reward functions named by dotted path in the configs below.
def lengths(prompts, completions):
    return [float(len(c)) for c in completions]


def two(prompts, completions):
    return [2.0] * len(completions)


def ten(prompts, completions):
    return [10.0] * len(completions)


def minus_nine(prompts, completions):
    return [-9.0] * len(completions)


def sleeps(prompts, completions):
    time.sleep(1)
    return [0.0] * len(completions)


class _Tokenizer:
    """What RewardSources needs of a policy tokenizer without a model: batch_decode and eos_token_id. A row of k
    unmasked tokens decodes to "x" * k."""

    eos_token_id = 2

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["x" * len(r) for r in rows]


def _rows():
    """Two rows: row 0 is one token cut without EOS ("x"), row 1 is three tokens ending with EOS id 2 ("xxx")."""
    ids = torch.tensor([[5, 0, 0], [5, 6, 2]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    return ["p", "q"], ids, mask, ids, mask


def _cfg(*overrides, sources=(), tmp_path=None, validate=True):
    cfg = compose_policy([*FAST, "reward.gold=null", *overrides], run_dir=str(tmp_path or "/tmp/unused"))
    cfg.reward.sources = [dict(s) for s in sources]
    return validate_policy_config(cfg) if validate else cfg


def _fn(fn, **fields):
    return {"type": "function", "path": f"{HERE}.{fn}", **fields}


# ---------------------------------------------------------------------------------------------- the registry
def test_each_type_is_one_registered_class_with_the_interface():
    assert REWARD_SOURCES.names() == ["function", "model", "remote"]
    classes = [REWARD_SOURCES.get(n) for n in REWARD_SOURCES.names()]
    assert len(set(classes)) == 3  # one class per type
    for name, cls in zip(REWARD_SOURCES.names(), classes):
        assert issubclass(cls, RewardSource) and cls.type == name
        for method in ("check", "build", "score"):  # each type implements the interface itself
            assert method in vars(cls), (name, method)
    with pytest.raises(KeyError, match="unknown reward source type 'nope'; valid names: function, model, remote"):
        REWARD_SOURCES.get("nope")


def test_a_new_type_is_one_class_and_a_registry_entry(monkeypatch):
    class ConstantSource(RewardSource):
        type = "constant"

        @classmethod
        def check(cls, spec):
            super().check(spec)

        @classmethod
        def build(cls, spec, ctx):
            return cls(spec.name, spec.weight, spec.key)

        def score(self, batch):
            return torch.ones(len(batch.completions))

    monkeypatch.setitem(REWARD_SOURCES._items, "constant", ConstantSource)
    cfg = _cfg("reward.function=null", sources=[{"type": "constant", "weight": 3.0}])
    sources = RewardSources.from_config(cfg, _Tokenizer())
    # Default name "constant0" (type + index); total = 0 + 3.0 * 1 on each row.
    total, by_source, gold, _ = sources.score(*_rows())
    assert sources.names() == ["constant0"] and total.tolist() == [3.0, 3.0] and gold is None
    assert by_source["constant0"].tolist() == [1.0, 1.0]


# ---------------------------------------------------------------------------------------------- the total
def test_two_function_sources_are_weighted_and_reported_by_name():
    # TRL's reward_funcs + reward_weights: lengths (weight 0.5) and two (weight -1.5) on completions "x", "xxx":
    #   row 0: 0.5 * 1 + -1.5 * 2 = -2.5;  row 1: 0.5 * 3 + -1.5 * 2 = -1.5 (no penalty, no clip configured).
    cfg = _cfg("reward.function=null", sources=[_fn("lengths", weight=0.5), _fn("two", weight=-1.5)])
    sources = RewardSources.from_config(cfg, _Tokenizer())
    scored = sources.score(*_rows())
    assert sources.names() == ["lengths", "two"]  # default names: the functions' last path component
    assert scored.total.tolist() == [-2.5, -1.5] and scored.total.dtype == torch.float32
    # Unweighted, by name, in scoring order:
    assert list(scored.by_source) == ["lengths", "two"]
    assert scored.by_source["lengths"].tolist() == [1.0, 3.0] and scored.by_source["two"].tolist() == [2.0, 2.0]
    assert scored.completions == ["x", "xxx"] and scored.gold is None


def test_penalty_and_clip_apply_to_the_weighted_sum():
    # ten (weight 1) + minus_nine (weight 1) = 1 on each row; missing_eos_penalty -5 hits row 0 (no EOS): -4;
    # clip 2: [-4, 1] -> [-2, 1]. Clipping each source first would give clip(10) + clip(-9) = 2 - 2 = 0 (+ -5 on
    # row 0); clipping before the penalty would give row 0 = 1 - 5 = -4: neither is [-2, 1].
    cfg = _cfg("reward.function=null", "reward.missing_eos_penalty=-5", "reward.clip=2",
               sources=[_fn("ten"), _fn("minus_nine")])
    scored = RewardSources.from_config(cfg, _Tokenizer()).score(*_rows())
    assert scored.total.tolist() == [-2.0, 1.0]
    assert scored.by_source["ten"].tolist() == [10.0, 10.0]  # per-source scores are before weight, penalty, clip


def test_shorthand_model_and_function_total_is_bit_identical_to_the_old_rule(tmp_path):
    """model.reward + reward.function + penalty + clip: the total equals, bit for bit, the formula score_responses
    computed before sources existed, written out here on the same inputs."""
    from rlhf.models import load_tokenizer, sequence_scores
    from rlhf.rollout.batch import decode_responses, has_eos
    from rlhf.rollout.forward import concat

    cfg = _cfg("model.reward=builtin:tiny", "reward.model_weight=0.7", "reward.function_weight=1.3",
               f"reward.function={HERE}.lengths", "reward.missing_eos_penalty=-0.25", "reward.clip=0.9",
               f"reward.gold={HERE}.two", tmp_path=tmp_path)
    tok = load_tokenizer("builtin:words")
    sources = RewardSources.from_config(cfg, tok)
    assert sources.names() == ["model", "function"]
    rm_model, rm_tok = sources.reward_model()
    assert rm_tok is None  # the reward model's own tokenizer is the policy's: ids are passed as they are

    g = torch.Generator().manual_seed(0)
    n, q, r = 6, 4, 5
    q_ids = torch.randint(4, len(tok), (n, q), generator=g)
    q_mask = torch.ones(n, q, dtype=torch.long)
    q_mask[0, :2] = 0  # left padding
    r_ids = torch.randint(4, len(tok), (n, r), generator=g)
    r_ids[1, 2] = r_ids[3, 4] = tok.eos_token_id  # rows 1 and 3 end with EOS, the others are cut
    r_mask = torch.ones(n, r, dtype=torch.long)
    r_mask[1, 3:] = 0
    prompts = [f"prompt {i // 2}" for i in range(n)]

    scored = sources.score(prompts, q_ids, q_mask, r_ids, r_mask)

    # The old rule, operation by operation (rlhf.rewards.scoring.score_responses before this change):
    completions = decode_responses(tok, r_ids, r_mask)
    with torch.no_grad():
        rm = sequence_scores(rm_model, *concat(q_ids, q_mask, r_ids, r_mask))
    expected = torch.zeros(len(completions))
    expected = expected + 0.7 * rm.float()
    expected = expected + 1.3 * torch.tensor(lengths(prompts, completions), dtype=torch.float32)
    expected = expected + torch.where(has_eos(r_ids, r_mask, tok.eos_token_id), 0.0, -0.25)
    expected = expected.clamp(-0.9, 0.9)
    assert torch.equal(scored.total, expected)
    assert torch.equal(scored.by_source["model"], rm.float())
    assert scored.by_source["function"].tolist() == [float(len(c)) for c in completions]
    assert scored.gold.tolist() == [2.0] * n and scored.completions == completions
    # And the compatibility wrapper gives the same bits.
    old, gold, _ = scoring.score_responses(rm_model, tok, None, cfg.reward, lengths, two, prompts, q_ids, q_mask,
                                           r_ids, r_mask)
    assert torch.equal(old, scored.total) and torch.equal(gold, scored.gold)


def test_model_sources_expose_their_modules_for_placement(monkeypatch):
    # The trainer places (and under ZeRO-3 wraps) the reward models itself: modules() lists them, place() swaps in
    # what the placement returns, and score() then uses the placed module with the source's own tokenizer.
    seen = []

    def fake_scores(model, policy_tok, reward_tok, *args):
        seen.append((model, reward_tok))
        return torch.full((args[0].shape[0],), 4.0)

    monkeypatch.setattr(scoring, "reward_model_scores", fake_scores)
    module, placed, own_tok = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), object()
    src = ModelSource("rm", 0.5, module, own_tok, key="reward.sources[0]", path="some/rm")
    sources = RewardSources([src, FunctionSource("len", 1.0, lengths)], _Tokenizer())
    assert sources.modules() == [module]
    sources.place(lambda m: placed)
    assert sources.modules() == [placed] and sources.reward_model() == (None, None)  # not the model.reward one
    total, by_source, _, _ = sources.score(*_rows())
    assert seen == [(placed, own_tok)]
    assert total.tolist() == [0.5 * 4 + 1, 0.5 * 4 + 3]  # lengths "x", "xxx"
    # A non-finite model score is reported by the source's key and path.
    monkeypatch.setattr(scoring, "reward_model_scores", lambda *a: torch.tensor([1.0, math.inf]))
    scored = sources.score(*_rows())
    assert sources.nonfinite_message(scored) == "reward.sources[0] some/rm returned a non-finite score"


def test_function_sources_use_reward_timeout_s_and_their_key():
    cfg = _cfg("reward.function=null", "reward.timeout_s=0.1", sources=[_fn("lengths"), _fn("sleeps")])
    sources = RewardSources.from_config(cfg, _Tokenizer())
    with pytest.raises(RewardFunctionError, match=rf"^reward.sources\[1\]: reward function {HERE}.sleeps did not "
                                                  r"return within reward.timeout_s=0.1 s"):
        sources.score(*_rows())


def test_duplicate_names_in_a_hand_built_container_are_refused():
    with pytest.raises(ValueError, match="reward source name 'a' is used twice"):
        RewardSources([FunctionSource("a", 1.0, lengths), FunctionSource("a", 1.0, two)], _Tokenizer())


# ---------------------------------------------------------------------------------------------- config
def test_default_names_and_order():
    # Shorthand reward.function (name "function") first, then the list: remote + index 0, model + index 1, the
    # function's last path component.
    cfg = _cfg(f"reward.function={HERE}.two", sources=[
        {"type": "remote", "url": "http://127.0.0.1:9/score"}, {"type": "model", "path": "builtin:tiny"},
        _fn("lengths"), {"type": "function", "path": f"{HERE}:ten", "name": "my-ten"}])
    assert [s.name for s in source_specs(cfg)] == ["function", "remote0", "model1", "lengths", "my-ten"]
    assert [s.key for s in source_specs(cfg)] == ["reward.function"] + [f"reward.sources[{i}]" for i in range(4)]


def test_sources_alone_are_a_reward():
    cfg = _cfg("reward.function=null", sources=[_fn("lengths")])
    assert [s.name for s in source_specs(cfg)] == ["lengths"]
    with pytest.raises(ConfigError, match=r"^reward.function: no reward: .*, or list reward.sources$"):
        _cfg("reward.function=null")


BAD = [
    ([{"type": "bogus"}], [],
     "reward.sources[0].type: unknown reward source type 'bogus'; valid types: function, model, remote"),
    ([{"type": "model"}], [], "reward.sources[0].path: a model source needs path"),
    ([{"type": "model", "path": "./no/such/rm"}], [], "reward.sources[0].path: folder './no/such/rm' does not exist"),
    ([{"type": "model", "path": "builtin:tiny", "url": "http://127.0.0.1:9/"}], [],
     "reward.sources[0].url: a model source has no url (it reads path, tokenizer)"),
    ([{"type": "function"}], [], "reward.sources[0].path: a function source needs path: pkg.module.fn"),
    ([_fn("lengths"), {"type": "function", "path": "no.such.module.fn"}], [],
     "reward.sources[1].path: cannot import 'no.such.module.fn'"),
    ([_fn("lengths", tokenizer="builtin:words")], [], "reward.sources[0].tokenizer: a function source has no tokenizer"),
    ([{"type": "remote"}], [], "reward.sources[0].url: a remote source needs url"),
    ([{"type": "remote", "url": "ftp://127.0.0.1/score"}], [],
     "reward.sources[0].url: 'ftp://127.0.0.1/score' is not an http:// or https:// URL with a host"),
    ([{"type": "remote", "url": "127.0.0.1:8000/score"}], [], "reward.sources[0].url: '127.0.0.1:8000/score' is not"),
    ([{"type": "remote", "url": "http://127.0.0.1:9/", "path": "a.b"}], [],
     "reward.sources[0].path: a remote source has no path (it reads url)"),
    ([{"type": "remote", "url": "http://127.0.0.1:9/", "batch_size": 0}], [],
     "reward.sources[0].batch_size: must be >= 1, got 0"),
    ([{"type": "remote", "url": "http://127.0.0.1:9/", "timeout_s": 0.0}], [],
     "reward.sources[0].timeout_s: must be > 0 seconds, got 0.0"),
    ([{"type": "remote", "url": "http://127.0.0.1:9/", "timeout_s": math.inf}], [],
     "reward.sources[0].timeout_s: must be > 0 seconds, got inf"),
    ([{"type": "remote", "url": "http://127.0.0.1:9/", "retries": -1}], [],
     "reward.sources[0].retries: must be in [0, 10], got -1"),
    ([{"type": "remote", "url": "http://127.0.0.1:9/", "retries": 11}], [],
     "reward.sources[0].retries: must be in [0, 10], got 11"),
    ([_fn("lengths", weight=math.nan)], [], "reward.sources[0].weight: must be a finite number, got nan"),
    ([_fn("lengths")], ["reward.function_weight=inf"], "reward.function_weight: must be a finite number, got inf"),
    ([_fn("lengths"), _fn("lengths", weight=2.0)], [],
     "reward.sources[1].name: 'lengths' is already the name of reward.sources[0]; names are unique"),
    ([_fn("two", name="function")], [f"reward.function={HERE}.lengths"],
     "reward.sources[0].name: 'function' is already the name of reward.function"),
    ([_fn("two", name="a/b")], [], "reward.sources[0].name: 'a/b' is not a metric name"),
]


@pytest.mark.parametrize("sources, overrides, message", BAD, ids=[b[2].split(":")[0] + f"-{i}"
                                                                  for i, b in enumerate(BAD)])
def test_bad_sources_give_one_line_error_naming_the_key(sources, overrides, message):
    # Validation runs before any model loads; the message starts with the offending key and is one line.
    overrides = overrides or ["reward.function=null"]
    with pytest.raises(ConfigError) as e:
        _cfg(*overrides, sources=sources)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
