"""Advantage estimators declare what they need (rlhf.core.advantages.AdvantageInfo) and config validation reads those
declarations: a critic, a group of K >= 2 samples, the algorithm.* fields each reads. The declarations are checked
against the math here, and the expected messages are built from them."""

import pytest
import torch

from rlhf.config import ConfigError, validate_policy_config
from rlhf.core.advantages import ADVANTAGE_ESTIMATORS, HYPERPARAMETERS, AdvantageInfo, rloo
from rlhf.core.kl import per_token_kl
from rlhf.core.registry import Registry
from tests.conftest import compose_policy

PRESETS = {"ppo": "gae", "rloo": "rloo", "grpo": "grpo", "reinforce_pp": "reinforce_pp"}
SET_VALUE = {"gamma": 0.9, "lam": 0.9, "std_normalize": True}


def validate(tmp_path, *overrides):
    return validate_policy_config(compose_policy(list(overrides), run_dir=str(tmp_path)))


def refused(tmp_path, *overrides) -> str:
    with pytest.raises(ConfigError) as e:
        validate(tmp_path, *overrides)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------------- the registry
def test_a_registry_with_facts_builds_one_declaration_per_entry():
    reg = Registry("thing", info=AdvantageInfo)
    reg.register("a", needs_critic=False, needs_group=True, reads=["lam"], summary="it is a test's")(len)
    assert reg.info("a") == AdvantageInfo(False, True, frozenset({"lam"}), "it is a test's")
    assert reg.get("a") is len
    reg.unregister("a")
    assert "a" not in reg and reg.names() == []


def test_every_entry_declares_the_same_facts():
    reg = Registry("thing", info=AdvantageInfo)
    with pytest.raises(TypeError, match=r"^thing 'a': .*needs_group"):  # a fact left out
        reg.register("a", needs_critic=False, reads=set(), summary="s")
    with pytest.raises(TypeError, match=r"^thing 'a': .*colour"):  # a fact this registry does not have
        reg.register("a", needs_critic=False, needs_group=False, reads=set(), summary="s", colour="red")
    with pytest.raises(ValueError, match=r"reads \['beta'\]"):  # a hyperparameter no estimator is passed
        reg.register("a", needs_critic=False, needs_group=False, reads={"beta"}, summary="s")
    plain = Registry("plain thing")
    plain.register("x")(len)
    assert plain.info("x") is None
    with pytest.raises(TypeError, match="declare no facts, got colour"):
        plain.register("y", colour="red")
    with pytest.raises(KeyError, match="unknown plain thing 'z'"):
        plain.info("z")


# ---------------------------------------------------------------------- the declarations tell the truth
def _inputs():
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 5), torch.randn(4, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    return rewards, mask, values


BASE = {"gamma": 0.9, "lam": 0.8, "std_normalize": True}
OTHER = {"gamma": 0.5, "lam": 0.3, "std_normalize": False}


@pytest.mark.parametrize("name", ADVANTAGE_ESTIMATORS.names())
def test_an_estimator_reads_exactly_the_fields_it_declares(name):
    """A declared field changes the output; an undeclared one can be None (as the trainer passes it) or anything."""
    fn, info = ADVANTAGE_ESTIMATORS.get(name), ADVANTAGE_ESTIMATORS.info(name)
    rewards, mask, values = _inputs()
    kw = {"group_size": 2, **{k: (BASE[k] if k in info.reads else None) for k in HYPERPARAMETERS}}
    adv, ret = fn(rewards, mask, values, **kw)
    for key in HYPERPARAMETERS:
        adv2, ret2 = fn(rewards, mask, values, **{**kw, key: OTHER[key]})
        changed = not (torch.equal(adv, adv2) and torch.equal(ret, ret2))
        assert changed == (key in info.reads), (name, key)


@pytest.mark.parametrize("name", ADVANTAGE_ESTIMATORS.names())
def test_an_estimator_needs_a_critic_and_a_group_exactly_as_declared(name):
    fn, info = ADVANTAGE_ESTIMATORS.get(name), ADVANTAGE_ESTIMATORS.info(name)
    rewards, mask, values = _inputs()
    kw = {"group_size": 2, **{k: (BASE[k] if k in info.reads else None) for k in HYPERPARAMETERS}}
    if info.needs_critic:
        with pytest.raises(ValueError, match="values are required"):
            fn(rewards, mask, None, **kw)
    else:
        fn(rewards, mask, None, **kw)
    if info.needs_group:
        with pytest.raises(ValueError, match="group_size must be an int >= 2"):
            fn(rewards, mask, values, **{**kw, "group_size": 1})
    else:
        fn(rewards, mask, values, **{**kw, "group_size": 1})


# ---------------------------------------------------------------------- validation reads the declarations
@pytest.fixture
def estimator():
    """Register a test estimator (RLOO's function under another name and other facts); removed afterwards."""
    added = []

    def register(name, **facts):
        ADVANTAGE_ESTIMATORS.register(name, **{"needs_critic": False, "needs_group": False, "reads": set(),
                                               "summary": "it is a test's", **facts})(rloo)
        added.append(name)
        return ADVANTAGE_ESTIMATORS.info(name)

    yield register
    for name in added:
        ADVANTAGE_ESTIMATORS.unregister(name)


def test_a_declared_critic_is_required(estimator, tmp_path):
    info = estimator("needs_v", needs_critic=True)
    assert refused(tmp_path, "algorithm=rloo", "algorithm.advantage=needs_v") == (
        f"algorithm.critic: needs_v needs a critic ({info.summary}); set algorithm.critic=true")
    assert validate(tmp_path, "algorithm=rloo", "algorithm.advantage=needs_v", "algorithm.critic=true")


def test_a_declared_group_needs_two_samples_and_an_undeclared_one_does_not(estimator, tmp_path):
    info = estimator("grouped", needs_group=True)
    estimator("alone")
    assert refused(tmp_path, "algorithm=rloo", "algorithm.advantage=grouped", "rollout.samples_per_prompt=1") == (
        f"rollout.samples_per_prompt: grouped needs at least 2 samples per prompt ({info.summary}), got 1")
    assert validate(tmp_path, "algorithm=rloo", "algorithm.advantage=alone", "rollout.samples_per_prompt=1")


@pytest.mark.parametrize("preset", ["rloo", "grpo"])
def test_group_presets_refuse_one_sample_per_prompt(preset, tmp_path):
    info = ADVANTAGE_ESTIMATORS.info(PRESETS[preset])
    assert info.needs_group
    assert refused(tmp_path, f"algorithm={preset}", "rollout.samples_per_prompt=1") == (
        f"rollout.samples_per_prompt: {preset} needs at least 2 samples per prompt ({info.summary}), got 1")


def test_a_declared_field_must_be_set(estimator, tmp_path):
    estimator("reads_lam", reads={"lam"})
    assert refused(tmp_path, "algorithm=rloo", "algorithm.advantage=reads_lam") == (
        "algorithm.lam: reads_lam reads lam, which is unset; set it in the algorithm preset or with "
        "algorithm.lam=<value>")
    cfg = validate(tmp_path, "algorithm=rloo", "algorithm.advantage=reads_lam", "algorithm.lam=0.5")
    assert cfg.algorithm.lam == 0.5
    assert refused(tmp_path, "algorithm.lam=null").startswith("algorithm.lam: gae reads lam, which is unset")


UNREAD = [(preset, key) for preset, name in PRESETS.items() for key in HYPERPARAMETERS
          if key not in ADVANTAGE_ESTIMATORS.info(name).reads]


@pytest.mark.parametrize("preset, key", UNREAD)
def test_a_field_the_preset_does_not_read_is_refused_when_set(preset, key, tmp_path):
    name = PRESETS[preset]
    value = str(SET_VALUE[key]).lower()
    assert refused(tmp_path, f"algorithm={preset}", f"algorithm.{key}={value}") == (
        f"algorithm.{key}: {name} does not read {key} ({ADVANTAGE_ESTIMATORS.info(name).summary}); remove it")


def test_the_issue_examples(tmp_path):
    assert refused(tmp_path, "algorithm=rloo", "algorithm.gamma=0.9") == (
        "algorithm.gamma: rloo does not read gamma (it scores whole sequences against the mean of the other samples "
        "of their prompt); remove it")
    assert refused(tmp_path, "algorithm=grpo", "algorithm.lam=0.9").startswith(
        "algorithm.lam: grpo does not read lam (it scores whole sequences")
    assert validate(tmp_path, "algorithm=ppo", "algorithm.gamma=0.99").algorithm.gamma == 0.99


@pytest.mark.parametrize("preset, key, value", [("ppo", "gamma", 0.99), ("ppo", "lam", 0.9),
                                                ("grpo", "std_normalize", False), ("reinforce_pp", "gamma", 0.9)])
def test_a_field_the_preset_reads_can_be_set(preset, key, value, tmp_path):
    assert validate(tmp_path, f"algorithm={preset}", f"algorithm.{key}={str(value).lower()}").algorithm[key] == value


@pytest.mark.parametrize("preset", PRESETS)
def test_after_validation_read_fields_are_set_and_the_others_none(preset, tmp_path):
    a = validate(tmp_path, f"algorithm={preset}").algorithm
    reads = ADVANTAGE_ESTIMATORS.info(a.advantage).reads
    assert {k for k in HYPERPARAMETERS if a[k] is not None} == reads


def test_ppo_keeps_its_values():
    """The default run's estimator settings, exactly as before the presets were trimmed."""
    a = validate_policy_config(compose_policy([], run_dir="unused")).algorithm
    assert (a.advantage, a.gamma, a.lam, a.std_normalize) == ("gae", 1.0, 0.95, None)


def test_an_absent_field_is_unset(tmp_path):
    """Switching the estimator under a preset: drop what the new one does not read (~key), as a preset of one's own
    may simply leave it out."""
    over = ["algorithm.advantage=reinforce_pp", "algorithm.critic=false"]
    assert refused(tmp_path, *over).startswith("algorithm.lam: reinforce_pp does not read lam")
    a = validate(tmp_path, *over, "~algorithm.lam").algorithm
    assert (a.gamma, a.lam, a.std_normalize) == (1.0, None, None)


# ---------------------------------------------------------------------- critic-only fields
@pytest.mark.parametrize("preset", ["rloo", "grpo", "reinforce_pp"])
def test_critic_only_fields_are_refused_without_a_critic(preset, tmp_path):
    assert refused(tmp_path, f"algorithm={preset}", "trainer.value_lr=1e-4") == (
        f"trainer.value_lr: {preset} trains no critic (algorithm.critic=false), so nothing uses a critic learning "
        "rate; remove it")
    assert refused(tmp_path, f"algorithm={preset}", "model.value=policy") == (
        f"model.value: {preset} trains no critic (algorithm.critic=false), so no critic starts from 'policy'; "
        "remove it")


def test_critic_only_fields_are_kept_with_a_critic(tmp_path):
    cfg = validate(tmp_path, "algorithm=ppo", "trainer.value_lr=1e-4", "model.value=policy")
    assert (cfg.trainer.value_lr, cfg.model.value) == (1e-4, "policy")


# ---------------------------------------------------------------------- k1 as a KL loss
K1_LOSS = ("kl.estimator: k1 as a loss (kl.in_reward=false) has zero gradient in expectation (E[grad log pi] = 0 on "
           "the policy's samples), so it would not hold the policy near the reference; use k3 (GRPO's default) or k2")


@pytest.mark.parametrize("overrides", [["kl.in_reward=false"], ["algorithm=grpo", "kl.estimator=k1"],
                                       ["algorithm=rloo", "kl.in_reward=false"]])
def test_k1_as_a_loss_is_refused(overrides, tmp_path):
    assert refused(tmp_path, *overrides) == K1_LOSS


@pytest.mark.parametrize("overrides", [["algorithm=grpo"], ["algorithm=grpo", "kl.estimator=k2"],
                                       ["kl.in_reward=false", "kl.estimator=k3"], ["algorithm=grpo",
                                                                                   "kl.in_reward=true",
                                                                                   "kl.estimator=k1"]])
def test_kl_losses_with_a_gradient_and_k1_in_the_reward_are_kept(overrides, tmp_path):
    assert validate(tmp_path, *overrides)


def test_the_k1_loss_gradient_is_zero_in_expectation_and_k3s_is_not():
    """The reason behind the refusal, exactly: sum_y pi(y) grad k(y) over a whole categorical distribution."""
    torch.manual_seed(0)
    logits, ref = torch.randn(1, 6, requires_grad=True), torch.log_softmax(torch.randn(1, 6), -1)
    grads = {}
    for est in ("k1", "k2", "k3"):
        logp = torch.log_softmax(logits, -1)
        expected = (logp.exp().detach() * per_token_kl(logp, ref, est)).sum()  # E_{y~pi}[k(y)], pi held fixed
        grads[est] = torch.autograd.grad(expected, logits)[0]
    assert grads["k1"].abs().max() < 1e-6
    assert grads["k2"].abs().max() > 1e-2 and grads["k3"].abs().max() > 1e-2
