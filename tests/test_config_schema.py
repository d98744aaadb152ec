"""One source of truth for defaults: the YAML under configs/ holds every value, the dataclasses of rlhf.config only
the schema. These tests fail when the two drift apart: a key in one and not the other, or a schema default that
differs from the YAML's value."""

import dataclasses
import os

import pytest
from omegaconf import MISSING, OmegaConf

from rlhf.config import (
    ConfigError,
    DPOConfig,
    PolicyConfig,
    RewardTrainingConfig,
    SFTConfig,
    TrainerConfig,
    validate_dpo_config,
    validate_policy_config,
    validate_reward_config,
    validate_sft_config,
)
from tests.conftest import CONFIGS, compose_config

SCHEMAS = {"policy": PolicyConfig, "sft": SFTConfig, "reward": RewardTrainingConfig, "dpo": DPOConfig}
VALIDATE = {"policy": validate_policy_config, "sft": validate_sft_config, "reward": validate_reward_config,
            "dpo": validate_dpo_config}

# None = "unset" (AlgorithmConfig): the algorithm preset sets the hyperparameters its estimator reads, so the YAML's
# value differs by preset, and validation either requires the field or keeps it None (test_algorithm_declarations).
UNSET_BY_DEFAULT = {"policy": {"algorithm.gamma", "algorithm.lam", "algorithm.std_normalize"}}


def _options(group):
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONFIGS, group)) if f.endswith(".yaml"))


# Every composition of a shipped config: each option of each group, each sweep.
COMPOSITIONS = [("sft", []), ("reward", []), ("dpo", []), ("policy", []),
                *[("policy", [f"{g}={o}"]) for g in ("algorithm", "model", "data") for o in _options(g)],
                *[("policy", [f"+sweep={o}"]) for o in _options("sweep")]]
IDS = [" ".join([name, *over]) for name, over in COMPOSITIONS]


def schema_tree(cls) -> dict:
    """Field name -> its default (omegaconf.MISSING when it has none) or, for a nested dataclass, its own tree."""
    tree = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = MISSING
        tree[f.name] = schema_tree(type(default)) if dataclasses.is_dataclass(default) else default
    return tree


def key_drift(schema: dict, yaml: dict, prefix: str = "") -> list[str]:
    drift = [f"{prefix}{k}: in the schema, not in the YAML" for k in schema.keys() - yaml.keys()]
    drift += [f"{prefix}{k}: in the YAML, not in the schema" for k in yaml.keys() - schema.keys()]
    for k in schema.keys() & yaml.keys():
        if isinstance(schema[k], dict):
            if isinstance(yaml[k], dict):
                drift += key_drift(schema[k], yaml[k], f"{prefix}{k}.")
            else:
                drift.append(f"{prefix}{k}: a section in the schema, a value in the YAML")
    return sorted(drift)


def leaves(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _compose(name, overrides):
    return compose_config(name, overrides, run_dir="unused")


@pytest.mark.parametrize("name, overrides", COMPOSITIONS, ids=IDS)
def test_the_yaml_has_exactly_the_schemas_keys(name, overrides):
    yaml = OmegaConf.to_container(_compose(name, overrides), resolve=False)
    assert key_drift(schema_tree(SCHEMAS[name]), yaml) == []


@pytest.mark.parametrize("name, overrides", COMPOSITIONS, ids=IDS)
def test_no_schema_default_differs_from_the_yaml(name, overrides):
    """A schema field has no default (MISSING), or None meaning "unset" where the schema says so, or (the few that
    code building a dataclass without YAML needs) the YAML's own value."""
    cfg = _compose(name, overrides)
    differ = []
    for key, default in leaves(schema_tree(SCHEMAS[name])):
        if default is MISSING or (default is None and key in UNSET_BY_DEFAULT.get(name, ())):
            continue
        yaml_value = OmegaConf.select(cfg, key)
        if default != yaml_value:
            differ.append(f"{key}: schema {default!r}, YAML {yaml_value!r}")
    assert differ == []


def test_the_drift_checks_catch_drift():
    """The helpers above see an added, a removed and a misplaced key, and a differing default."""
    schema = {"a": MISSING, "b": {"c": 1}, "d": MISSING}
    assert key_drift(schema, {"a": 1, "b": {"c": 1, "x": 2}, "e": 3}) == [
        "b.x: in the YAML, not in the schema", "d: in the schema, not in the YAML", "e: in the YAML, not in the schema"]
    assert key_drift(schema, {"a": 1, "b": 5, "d": 2}) == ["b: a section in the schema, a value in the YAML"]
    assert dict(leaves(schema)) == {"a": MISSING, "b.c": 1, "d": MISSING}


def test_the_schemas_defaults_are_the_few_said():
    """Every other field's value comes from the YAML alone: a new default in a dataclass must be justified here."""
    kept = {name: sorted(k for k, v in leaves(schema_tree(cls)) if v is not MISSING) for name, cls in SCHEMAS.items()}
    assert kept == {"policy": ["algorithm.gamma", "algorithm.lam", "algorithm.std_normalize", "trainer.cpu",
                               "trainer.dist_timeout_s", "trainer.mixed_precision"],
                    "sft": [], "reward": [], "dpo": []}


def test_a_trainer_config_built_in_code_has_what_make_accelerator_reads():
    t = TrainerConfig(max_steps=1)
    assert (t.cpu, t.mixed_precision, t.dist_timeout_s) == (False, "no", 1800)


@pytest.mark.parametrize("name, key", [("policy", "trainer.value_coef"), ("policy", "rollout.vllm.dtype"),
                                       ("sft", "data.max_length"), ("reward", "loss.center_coef"),
                                       ("dpo", "dpo.beta")])
def test_a_key_left_out_of_the_yaml_is_missing_not_defaulted(name, key, tmp_path):
    with pytest.raises(ConfigError, match=rf"^{key}: required value is missing$"):
        VALIDATE[name](compose_config(name, [f"~{key}"], run_dir=str(tmp_path)))


@pytest.mark.parametrize("name, overrides", COMPOSITIONS, ids=IDS)
def test_every_shipped_config_composes_and_validates(name, overrides, tmp_path):
    cfg = VALIDATE[name](compose_config(name, overrides, run_dir=str(tmp_path)))
    assert cfg.run_dir == str(tmp_path)
