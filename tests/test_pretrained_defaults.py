"""Defaults of the tiny built-in task must not leak into a run on a user's pretrained model.

A model folder here is what a user has: a ``from_config`` Llama saved with ``save_pretrained`` next to its own
tokenizer (a byte-level BPE trained on a few sentences, so its vocabulary shares nothing with the built-in word
tokenizer's ids). Each test checks what the run would use, or the one line that stops it before weights load.
"""

import logging
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from rlhf.config import (
    PRETRAINED_LR,
    RANDOM_INIT_LR,
    ConfigError,
    resolve_policy_defaults,
    validate_policy_config,
    validate_reward_config,
    validate_sft_config,
)
from rlhf.models import ModelSpecError, load_tokenizer
from tests.conftest import FAST, compose_config, compose_policy

TEXT = ["The quick brown fox jumps over the lazy dog.", "A pretrained model speaks English, not a word list.",
        "Numbers like 12 and 345 are split into pieces.", "Hello there! How are you today?"] * 8


def _bpe_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def save_pretrained_folder(folder: Path, vocab_size: int = 300, embed: int | None = None,
                           with_tokenizer: bool = True) -> Path:
    """A user's model folder: config + weights (+ its tokenizer). ``embed`` overrides config.vocab_size."""
    tok = _bpe_tokenizer(vocab_size)
    config = LlamaConfig(vocab_size=embed or len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    if with_tokenizer:
        tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def user_model(tmp_path_factory) -> Path:
    return save_pretrained_folder(tmp_path_factory.mktemp("user") / "model")


def _no_model_load(monkeypatch):
    import rlhf.trainers.policy_setup

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the tokenizer error was found")

    monkeypatch.setattr(rlhf.trainers.policy_setup, "load_causal_lm", refuse)
    monkeypatch.setattr(rlhf.trainers.policy_setup, "load_score_model", refuse)


# ---------------------------------------------------------------------------------------------- tokenizer
def test_a_folder_policy_brings_its_own_tokenizer(user_model, tmp_path):
    """model.policy=<folder>, nothing else: the run tokenizes with the folder's BPE (about 300 tokens), not the tiny
    preset's 1 000-word tokenizer, and its completions decode through it."""
    from rlhf.trainers.policy import PolicyTrainer

    cfg = validate_policy_config(compose_policy([*FAST, f"model.policy={user_model}", "trainer.max_steps=1"],
                                                run_dir=str(tmp_path / "run")))
    assert cfg.model.tokenizer is None
    trainer = PolicyTrainer(cfg)
    own = load_tokenizer(str(user_model))
    assert trainer.models.tokenizer.get_vocab() == own.get_vocab()
    assert len(trainer.models.tokenizer) == len(own) < 400  # the word tokenizer has 1 031 entries
    assert trainer.policy.get_input_embeddings().num_embeddings == len(own)  # not resized to another tokenizer
    (m,) = trainer.train()
    assert m["response_length"] > 0


def test_the_builtin_word_tokenizer_beside_a_pretrained_policy_is_refused(user_model, tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.tokenizer: builtin:words is the built-in task's word tokenizer "
                                          r"and model\.policy .* set model\.tokenizer=null"):
        validate_policy_config(compose_policy([f"model.policy={user_model}", "model.tokenizer=builtin:words"],
                                              run_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"^model\.tokenizer: builtin:words .* model\.init "):
        validate_sft_config(compose_config("sft", [f"model.init={user_model}", "model.tokenizer=builtin:words"],
                                           run_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"^model\.reward_tokenizer: builtin:words .* model\.reward "):
        validate_policy_config(compose_policy([f"model.reward={_reward_folder(user_model, tmp_path)}",
                                               "model.reward_tokenizer=builtin:words"], run_dir=str(tmp_path)))


def _reward_folder(user_model: Path, tmp_path: Path) -> Path:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(user_model)
    config.num_labels = 1
    config.pad_token_id = config.eos_token_id
    folder = tmp_path / "rm"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    load_tokenizer(str(user_model)).save_pretrained(folder)
    return folder


def test_a_tokenizer_larger_than_the_embedding_stops_before_weights_load(tmp_path, monkeypatch):
    """A 300-token tokenizer beside a model whose config says 100 embeddings: ids 100-299 would index past the
    embedding table (or be silently resized into untrained rows)."""
    from rlhf.trainers.policy import PolicyTrainer

    small = save_pretrained_folder(tmp_path / "small", vocab_size=300, embed=100, with_tokenizer=False)
    other = tmp_path / "tok"
    _bpe_tokenizer(300).save_pretrained(other)
    n = len(load_tokenizer(str(other)))
    cfg = validate_policy_config(compose_policy([*FAST, f"model.policy={small}", f"model.tokenizer={other}"],
                                                run_dir=str(tmp_path / "run")))
    _no_model_load(monkeypatch)
    with pytest.raises(ModelSpecError, match=rf"^model\.tokenizer: {other} has {n} tokens but model\.policy "
                                             rf"{small} embeds only 100 \(config\.vocab_size\)"):
        PolicyTrainer(cfg)


def test_a_tokenizer_of_another_vocabulary_than_the_folders_own_stops(user_model, tmp_path, monkeypatch):
    """Same size, other vocabulary: a BPE trained on other text gives other ids to the same strings."""
    from rlhf.trainers.policy import PolicyTrainer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["zzz yyy xxx www"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(tmp_path / "tok")
    cfg = validate_policy_config(compose_policy([*FAST, f"model.policy={user_model}",
                                                 f"model.tokenizer={tmp_path / 'tok'}"],
                                                run_dir=str(tmp_path / "run")))
    _no_model_load(monkeypatch)
    with pytest.raises(ModelSpecError, match=r"^model\.tokenizer: .* has another vocabulary .* than the tokenizer "
                                             r"in model\.policy"):
        PolicyTrainer(cfg)


def test_naming_the_policy_folder_as_its_own_tokenizer_is_fine(user_model, tmp_path):
    """model.tokenizer=<the policy folder> (as scripts/pipeline.sh used to pass) is the same pair."""
    from rlhf.models import check_tokenizer_fits

    check_tokenizer_fits(load_tokenizer(str(user_model)), str(user_model), str(user_model))


def test_a_folder_without_a_tokenizer_needs_one_named(tmp_path):
    bare = save_pretrained_folder(tmp_path / "bare", with_tokenizer=False)
    with pytest.raises(ConfigError, match=r"^model\.tokenizer: null uses the tokenizer of model\.policy .* has none"):
        validate_policy_config(compose_policy([f"model.policy={bare}"], run_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"^model\.tokenizer: folder .* has no tokenizer files"):
        validate_policy_config(compose_policy([f"model.policy={bare}", f"model.tokenizer={bare}"],
                                              run_dir=str(tmp_path)))


# ---------------------------------------------------------------------------------------------- task defaults, lr
def test_learning_rates_follow_the_policy(user_model, tmp_path):
    """null lr: 1e-3 (random init learns the built-in task only with a high rate) for builtin:tiny; 1e-6 / 1e-5
    for a pretrained policy; an explicit value is kept."""
    tiny = validate_policy_config(compose_policy([], run_dir=str(tmp_path)))
    assert (tiny.trainer.lr, tiny.trainer.value_lr) == (1e-3, 1e-3) == (RANDOM_INIT_LR["policy"],
                                                                       RANDOM_INIT_LR["value"])
    real = validate_policy_config(compose_policy([f"model.policy={user_model}"], run_dir=str(tmp_path)))
    assert (real.trainer.lr, real.trainer.value_lr) == (1e-6, 1e-5) == (PRETRAINED_LR["policy"],
                                                                       PRETRAINED_LR["value"])
    mine = validate_policy_config(compose_policy([f"model.policy={user_model}", "trainer.lr=3e-5"],
                                                 run_dir=str(tmp_path)))
    assert mine.trainer.lr == 3e-5
    sft = validate_sft_config(compose_config("sft", [f"model.init={user_model}"], run_dir=str(tmp_path)))
    rm = validate_reward_config(compose_config("reward", [f"model.init={user_model}"], run_dir=str(tmp_path)))
    assert (sft.trainer.lr, rm.trainer.lr) == (2e-5, 1e-5)
    # LoRA adapters of a pretrained model: 10x (LORA_LR_SCALE) the full-weight rate, 1e-5 / 2e-4 / 1e-4; the critic, a
    # full model, keeps 1e-5; a random-init model's rate stays 1e-3
    pytest.importorskip("peft")
    lora = [f"model.policy={user_model}", "model.lora.r=4"]
    real_lora = validate_policy_config(compose_policy([*lora, "algorithm=ppo"], run_dir=str(tmp_path)))
    assert (real_lora.trainer.lr, real_lora.trainer.value_lr) == (pytest.approx(1e-5), 1e-5)
    tiny_lora = validate_policy_config(compose_policy(["model.lora.r=4"], run_dir=str(tmp_path)))
    assert tiny_lora.trainer.lr == 1e-3
    sft_lora = validate_sft_config(compose_config("sft", [f"model.init={user_model}", "model.lora.r=4"],
                                                  run_dir=str(tmp_path)))
    rm_lora = validate_reward_config(compose_config("reward", [f"model.init={user_model}", "model.lora.r=4"],
                                                    run_dir=str(tmp_path)))
    assert (sft_lora.trainer.lr, rm_lora.trainer.lr) == (pytest.approx(2e-4), pytest.approx(1e-4))
    sft_tiny = validate_sft_config(compose_config("sft", [], run_dir=str(tmp_path)))
    rm_tiny = validate_reward_config(compose_config("reward", [], run_dir=str(tmp_path)))
    assert (sft_tiny.trainer.lr, rm_tiny.trainer.lr) == (3e-3, 1e-3)


def test_builtin_reward_and_gold_apply_only_to_builtin_prompts(user_model, tmp_path):
    """reward.function / reward.gold = auto follow data.prompts: the sentiment scorers for builtin:sentiment, none
    for a user's prompt file, where the sentiment gold score would mean nothing."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name a fruit."}\n')
    builtin = validate_policy_config(compose_policy([f"model.policy={user_model}"], run_dir=str(tmp_path)))
    assert builtin.reward.function == "rlhf.tasks.sentiment.reward_fn"
    assert builtin.reward.gold == "rlhf.tasks.sentiment.gold_fn"
    own = validate_policy_config(compose_policy([f"model.policy={user_model}", f"data.prompts={prompts}",
                                                 "reward.function=tests.test_pretrained_defaults.length_reward"],
                                                run_dir=str(tmp_path)))
    assert own.reward.function == "tests.test_pretrained_defaults.length_reward" and own.reward.gold is None
    with pytest.raises(ConfigError, match=r"^reward\.function: no reward: set model\.reward or reward\.function "
                                          r"\(auto gives a built-in task's reward only with data\.prompts=builtin"):
        validate_policy_config(compose_policy([f"model.policy={user_model}", f"data.prompts={prompts}"],
                                              run_dir=str(tmp_path)))


def length_reward(prompts, completions):
    return [float(len(c)) for c in completions]


def test_a_pretrained_run_says_in_one_line_which_defaults_it_uses(user_model, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="rlhf.config"):
        validate_policy_config(compose_policy([f"model.policy={user_model}", "algorithm=rloo"],
                                              run_dir=str(tmp_path)))
    lines = [r.getMessage() for r in caplog.records if r.name == "rlhf.config"]
    assert lines == [f"model.policy {user_model} is pretrained; defaults in use: trainer.lr=1e-06, "
                     "reward.function=rlhf.tasks.sentiment.reward_fn, reward.gold=rlhf.tasks.sentiment.gold_fn, "
                     "data.prompts=builtin:sentiment (set any of them to override)"]  # RLOO: no value_lr
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rlhf.config"):
        validate_policy_config(compose_policy([], run_dir=str(tmp_path)))  # builtin:tiny: the task is its purpose
    assert [r for r in caplog.records if r.name == "rlhf.config"] == []


# ---------------------------------------------------------------------------------------------- beta = 0 in a sweep
def test_log_at_zero_beta_auto_is_on_only_in_a_multirun_over_beta(tmp_path):
    def resolved(*overrides, multirun):
        cfg = validate_policy_config(compose_policy(["kl.beta=0", *overrides], run_dir=str(tmp_path)),
                                     multirun_sets_beta=multirun)
        return cfg.kl.log_at_zero_beta

    assert resolved(multirun=True) is True
    assert resolved(multirun=False) is False
    assert resolved("kl.log_at_zero_beta=false", multirun=True) is False  # an explicit choice wins
    assert resolved("kl.log_at_zero_beta=true", multirun=False) is True


def test_resolving_twice_changes_nothing(tmp_path):
    """A resumed run resolves its saved, already resolved config again: the values must stay."""
    cfg = validate_policy_config(compose_policy([], run_dir=str(tmp_path)))
    before = dict(cfg.trainer), dict(cfg.reward), cfg.kl.log_at_zero_beta
    assert resolve_policy_defaults(cfg, multirun_sets_beta=True) == []
    assert (dict(cfg.trainer), dict(cfg.reward), cfg.kl.log_at_zero_beta) == before


@pytest.mark.slow
def test_a_plain_multirun_over_beta_logs_kl_for_beta_zero(tmp_path):
    """`-m kl.beta=0,0.1` as a user types it (a real Hydra multirun): the beta = 0 job logs a KL (auto flag)."""
    import json

    from tests.conftest import run_script

    proc = run_script(["scripts/train_policy.py", "-m", "kl.beta=0,0.1", *FAST, "trainer.max_steps=2",
                       "trainer.torch_threads=1", f"hydra.sweep.dir={tmp_path}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for job, beta in (("0", 0.0), ("1", 0.1)):
        rows = [json.loads(line) for line in (tmp_path / job / "metrics.jsonl").read_text().splitlines()]
        assert [r["beta"] for r in rows] == [beta, beta]
        assert all(r["kl"] is not None and r["kl"] >= 0 for r in rows), rows  # null when no reference was loaded
        assert rows[1]["kl"] > 0  # one update moved the policy away from the reference
