import json
import math

import datasets
import pytest
import torch

from rlhf.config import ConfigError, validate_reward_config
from rlhf.data import DataError
from rlhf.models import load_score_model, load_tokenizer, same_tokenizer, sequence_scores
from rlhf.trainers.reward import (
    binarize_labels,
    binary_loss,
    builtin_eval_reference,
    encode_labelled,
    encode_pairs,
    gold_agreement,
    load_reward_init,
    objective_loss,
    pairwise_loss,
    regression_loss,
    reward_summary,
    train_reward,
    unstride,
)
from tests.conftest import compose_config, run_script

FAST = ["data.num_train=256", "data.num_eval=64", "trainer.batch_size=16", "trainer.warmup_steps=2",
        "logging.progress=false", "logging.tensorboard=false"]


def compose_reward(overrides=(), run_dir="/tmp/unused"):
    return compose_config("reward", overrides, run_dir)


def reward_cfg(tmp_path, *overrides):
    return validate_reward_config(compose_reward([*FAST, *overrides], run_dir=str(tmp_path / "run")))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:words")


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


# --- the objectives, against hand-computed values ---


def test_pairwise_loss_is_bradley_terry_plus_centering():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    # differences [2, -1]: BT = mean(-log sigmoid(2), -log sigmoid(-1)) = mean(0.1269, 1.3133) = 0.7201
    bt = -(log_sigmoid(2.0) + log_sigmoid(-1.0)) / 2
    loss, stats = pairwise_loss(chosen, rejected)
    assert loss.item() == pytest.approx(bt, rel=1e-6)
    assert stats["accuracy"].item() == 0.5                       # 2 > 0 right, 0 > 1 wrong
    assert stats["margin"].item() == pytest.approx(0.5)          # mean(2, -1)
    assert stats["centering"].item() == pytest.approx(2.5)       # sums [2, 1]: mean(4, 1)
    # centering adds 0.1 * 2.5 = 0.25 and changes nothing else
    loss_c, _ = pairwise_loss(chosen, rejected, center_coef=0.1)
    assert loss_c.item() == pytest.approx(bt + 0.25, rel=1e-6)


def test_pairwise_loss_subtracts_the_margin():
    # differences [2, -1] minus margins [1, 0] = [1, -1]: mean(-log sigmoid(1), -log sigmoid(-1)) = 0.8133
    loss, _ = pairwise_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(-(log_sigmoid(1.0) + log_sigmoid(-1.0)) / 2, rel=1e-6)


def test_centering_gradient_pulls_the_pair_sum_to_zero():
    chosen = torch.tensor([3.0], requires_grad=True)
    rejected = torch.tensor([1.0], requires_grad=True)
    loss, _ = pairwise_loss(chosen, rejected, center_coef=1.0)
    loss.backward()
    # d/dr_c [-log sigmoid(r_c - r_r)] = -sigmoid(-(2)) = -0.1192; d/dr_c (r_c + r_r)^2 = 2 * 4 = 8
    s = 1 / (1 + math.exp(2.0))
    assert chosen.grad.item() == pytest.approx(-s + 8.0, rel=1e-6)
    assert rejected.grad.item() == pytest.approx(s + 8.0, rel=1e-6)


def test_regression_loss_mse_and_huber():
    scores, labels = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])
    # errors [1, -2]: mse = (1 + 4) / 2 = 2.5, mae = (1 + 2) / 2 = 1.5
    loss, stats = regression_loss(scores, labels, "mse")
    assert loss.item() == pytest.approx(2.5) and stats["mse"].item() == pytest.approx(2.5)
    assert stats["mae"].item() == pytest.approx(1.5)
    # huber, delta 1: |1| -> 0.5 * 1 = 0.5; |2| -> 1 * (2 - 0.5) = 1.5; mean 1.0
    loss, stats = regression_loss(scores, labels, "huber", delta=1.0)
    assert loss.item() == pytest.approx(1.0) and stats["mse"].item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="loss must be"):
        regression_loss(scores, labels, "l1")


def test_binary_loss_and_accuracy():
    logits, labels = torch.tensor([0.0, 2.0, -1.0]), torch.tensor([1.0, 1.0, 0.0])
    # -log sigmoid(0) = 0.6931, -log sigmoid(2) = 0.1269, -log(1 - sigmoid(-1)) = -log sigmoid(1) = 0.3133
    expected = -(log_sigmoid(0.0) + log_sigmoid(2.0) + log_sigmoid(1.0)) / 3
    loss, stats = binary_loss(logits, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # predictions (logit > 0): [0, 1, 0] against labels [1, 1, 0]: 2 of 3 right
    assert stats["accuracy"].item() == pytest.approx(2 / 3)


def test_gold_agreement_skips_gold_ties():
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0])
    # pair 0 ordered as gold (+, +), pair 1 reversed (-, +), pair 2 a gold tie: 1 of 2 counted pairs
    assert gold_agreement(chosen, rejected, torch.tensor([0.5, 0.3, 0.0])) == 0.5
    with pytest.raises(ValueError, match="gold_diff must have the"):
        gold_agreement(chosen, rejected, torch.tensor([0.5, 0.3]))


def test_objective_loss_checks_the_score_shape():
    from omegaconf import OmegaConf

    loss_cfg = OmegaConf.create({"center_coef": 0.0, "regression": "mse", "huber_delta": 1.0})
    with pytest.raises(ValueError, match=r"scores must be \(batch, 2\) for the pairwise objective"):
        objective_loss("pairwise", torch.zeros(3, 1), {}, loss_cfg)
    # pairwise reads column 0 as chosen and column 1 as rejected: [2, 0] -> BT -log sigmoid(2)
    loss, _ = objective_loss("pairwise", torch.tensor([[2.0, 0.0]]), {}, loss_cfg)
    assert loss.item() == pytest.approx(-log_sigmoid(2.0), rel=1e-6)


def test_builtin_reference_holds_the_ceiling_and_gold_differences():
    rows = datasets.Dataset.from_list([
        {"prompt": "it was", "chosen": "superb .", "rejected": "awful ."},
        {"prompt": "it was", "chosen": "awful .", "rejected": "superb ."},
        {"prompt": "it was", "chosen": "quiet .", "rejected": "small ."},
    ])
    ref = builtin_eval_reference(rows, temperature=0.2)
    # gold differences: tanh(1) - tanh(-1) = 1.5232, its negative, and 0 (no sentiment words on either side)
    diff = 2 * math.tanh(1.0)
    assert ref["gold_diff"].tolist() == pytest.approx([diff, -diff, 0.0])
    # per pair max(p, 1 - p) with p = sigmoid(d / 0.2): 0.99951 twice, and 0.5 for the tie
    best = 1 / (1 + math.exp(-diff / 0.2))
    assert ref["ceiling"] == pytest.approx((2 * best + 0.5) / 3)
    # the gold reward on these labels: right, wrong, a tie counted 1/2
    assert ref["gold_label_accuracy"] == pytest.approx(1.5 / 3)


def test_unstride_restores_row_order():
    # 5 rows over 2 processes: rank 0 scored rows 0, 2, 4; rank 1 rows 1, 3 and one padding row (-1)
    gathered = torch.tensor([[0.0], [2.0], [4.0], [1.0], [3.0], [-1.0]])
    assert unstride(gathered, 2, 5).flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


# --- data ---


def test_encode_pairs_matches_the_policy_trainer_tokenization(tok):
    rows = datasets.Dataset.from_list([
        {"prompt": "the food was", "chosen": "superb .", "rejected": "bland and cold ."},
        {"prompt": "it was", "chosen": "good .", "rejected": "bad ."},
    ])
    enc = encode_pairs(rows, tok, max_length=32)
    # the longest text, "the food was bland and cold ." + EOS, is 8 tokens
    assert enc["input_ids"].shape == (2, 2, 8) and "margin" not in enc
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    # row 1, rejected: "it was" + "bad ." + EOS, right-padded to 8
    expected = ids("it was bad .") + [tok.eos_token_id]
    assert enc["input_ids"][1, 1, :5].tolist() == expected
    assert enc["attention_mask"][1, 1].tolist() == [1] * 5 + [0] * 3
    assert enc["input_ids"][0, 0, :6].tolist() == ids("the food was superb .") + [tok.eos_token_id]


def test_encode_pairs_keeps_the_margin_and_encode_labelled_the_label(tok):
    rows = datasets.Dataset.from_list([{"prompt": "it was", "chosen": "good .", "rejected": "bad .", "margin": 0.5}])
    assert encode_pairs(rows, tok, 16)["margin"].tolist() == [0.5]
    labelled = encode_labelled(datasets.Dataset.from_list([{"text": "it was good .", "label": 0.25}]), tok, 16)
    assert labelled["input_ids"].shape == (1, 1, 5) and labelled["label"].tolist() == [0.25]


def test_truncated_texts_warn(tok):
    rows = datasets.Dataset.from_list([{"text": "it was good and the food was fresh .", "label": 1.0}])
    with pytest.warns(UserWarning, match="1 rows were cut at data.max_length=4"):
        encode_labelled(rows, tok, 4)


def test_binarize_labels():
    rows = datasets.Dataset.from_list([{"text": "a", "label": -0.5}, {"text": "b", "label": 0.2},
                                       {"text": "c", "label": 0.0}])
    assert binarize_labels(rows, "src", "y", threshold=0.0)["label"] == [0.0, 1.0, 0.0]  # > 0 only
    with pytest.raises(DataError, match="column 'y' row 0 .*needs 0 or 1, got -0.5"):
        binarize_labels(rows, "src", "y", threshold=None)


# --- the stage ---


POSITIVE = ["superb", "perfect", "excellent", "wonderful", "amazing", "great", "lovely", "good"]
NEGATIVE = ["awful", "terrible", "horrible", "dreadful", "lousy", "bad", "poor", "rude"]


def separable_pairs(path):
    rows = [{"prompt": f"{det} {noun} was", "chosen": f"{p} .", "rejected": f"{n} ."}
            for det, noun in [("the", "food"), ("my", "room")] for p, n in zip(POSITIVE, NEGATIVE)]
    return write_jsonl(path, rows)


def test_separable_preferences_reach_accuracy_1_and_the_saved_model_scores_the_same(tmp_path, tok):
    path = separable_pairs(tmp_path / "pairs.jsonl")
    cfg = reward_cfg(tmp_path, f"data.source={path}", f"data.eval_source={path}", "data.num_train=null",
                     "data.num_eval=null", "trainer.max_steps=60", "trainer.eval_every=0", "trainer.lr=3e-3")
    history = train_reward(cfg)
    final = history[-1]
    assert final["step"] == 60 and final["eval/accuracy"] == 1.0
    assert history[0]["eval/accuracy"] < 1.0  # the untrained model does not already separate them
    assert "eval/ceiling" not in final  # a file has no known gold reward

    # The policy trainer's path: load_score_model + the folder's tokenizer, scores at the last real token.
    folder = str(tmp_path / "run" / "final")
    model = load_score_model(folder, tok)
    assert model.config.num_labels == 1
    assert same_tokenizer(tok, load_tokenizer(folder, padding_side="right"))
    rows = datasets.Dataset.from_list([json.loads(line) for line in open(path)])
    enc = encode_pairs(rows, tok, 64)
    n, _, width = enc["input_ids"].shape
    with torch.no_grad():
        scores = sequence_scores(model, enc["input_ids"].view(2 * n, width),
                                 enc["attention_mask"].view(2 * n, width)).view(n, 2)
    loss, stats = pairwise_loss(scores[:, 0], scores[:, 1], center_coef=cfg.loss.center_coef)
    assert loss.item() == pytest.approx(final["eval/loss"], rel=1e-5)
    assert stats["margin"].item() == pytest.approx(final["eval/margin"], rel=1e-5)


def test_builtin_preferences_log_accuracy_next_to_the_ceiling(tmp_path):
    from rlhf.tasks.sentiment import make_preferences, preference_ceiling

    history = train_reward(reward_cfg(tmp_path, "trainer.max_steps=2", "trainer.eval_every=0"))
    # FAST holds out 64 built-in test pairs, generated with seed 0 and the default temperature 0.2
    expected = preference_ceiling(make_preferences(64, seed=0, split="test"), temperature=0.2)
    for line in (history[0], history[-1]):
        assert line["eval/ceiling"] == pytest.approx(expected)
        assert 0 <= line["eval/gold_agreement"] <= 1
        # the gold reward's realised accuracy scatters around the ceiling (64 pairs: about +-0.04)
        assert abs(line["eval/gold_label_accuracy"] - expected) < 0.15


@pytest.mark.parametrize("objective, overrides, metric", [
    ("regression", [], "eval/mse"),
    ("regression", ["loss.regression=huber"], "eval/mse"),
    ("binary", ["data.label_threshold=0"], "eval/loss"),
])
def test_regression_and_binary_objectives_lower_their_loss(objective, overrides, metric, tmp_path):
    # 80 steps: the binary loss sits near log 2 for about 40 steps before it falls
    history = train_reward(reward_cfg(tmp_path, f"objective={objective}", *overrides, "trainer.max_steps=80",
                                      "trainer.eval_every=0", "trainer.lr=3e-3"))
    first, last = history[0], history[-1]
    assert last["eval/loss"] < 0.8 * first["eval/loss"]
    assert last[metric] < first[metric]


def test_init_from_a_causal_lm_folder_keeps_its_backbone(tmp_path, tok):
    from rlhf.models import load_causal_lm

    lm = load_causal_lm("builtin:tiny", tok, seed=3)
    lm.save_pretrained(tmp_path / "sft")
    rm = load_reward_init(str(tmp_path / "sft"), tok)
    assert rm.config.num_labels == 1 and type(rm).__name__.endswith("ForSequenceClassification")
    for name, p in lm.model.state_dict().items():
        assert torch.equal(rm.model.state_dict()[name], p), name


def test_reward_summary_puts_accuracy_next_to_the_ceiling():
    history = [{"step": 0}, {"step": 4, "eval/loss": 0.4, "eval/accuracy": 0.85, "eval/margin": 1.5,
                             "eval/ceiling": 0.88, "eval/gold_label_accuracy": 0.86, "eval/gold_agreement": 0.95}]
    assert reward_summary("pairwise", history, "/x") == (
        "reward model (pairwise) done: held-out accuracy 0.8500 (label-noise ceiling 0.8800; the gold reward "
        "itself scores 0.8600 on these labels), gold agreement 0.9500, margin 1.5000; saved to /x")


# --- config ---


@pytest.mark.parametrize("objective", ["pairwise", "regression", "binary"])
def test_reward_config_composes_for_every_objective(objective):
    cfg = validate_reward_config(compose_reward([f"objective={objective}"]))
    assert cfg.objective == objective and cfg.model.init == "builtin:tiny"


@pytest.mark.parametrize("overrides, key", [
    (["+loss.temperature=1"], "loss.temperature: unknown key"),
    (["objective=listwise"], "objective: 'listwise' is not one of pairwise, regression, binary"),
    (["loss.center_coef=-1"], "loss.center_coef: must be >= 0"),
    (["loss.regression=l1"], "loss.regression: 'l1' is not one of mse, huber"),
    (["data.label_threshold=0"], "data.label_threshold: only the binary objective thresholds labels"),
    (["objective=regression", "data.margin_column=m"], "data.margin_column: only the pairwise objective"),
    (["trainer.batch_size=many"], "trainer.batch_size:"),
    (["model.init=./no/such/folder"], "model.init: folder './no/such/folder' does not exist"),
])
def test_bad_reward_config_is_one_line_config_error(overrides, key):
    with pytest.raises(ConfigError) as err:
        validate_reward_config(compose_reward(overrides))
    assert str(err.value).startswith(key)
    assert "\n" not in str(err.value)


# --- bad data fails before any model loads ---


@pytest.fixture
def no_models(monkeypatch):
    import rlhf.models
    import rlhf.trainers.reward

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer loaded before the data was checked")

    for name in ("load_tokenizer", "load_score_model", "load_causal_lm"):
        monkeypatch.setattr(rlhf.models, name, refuse)
    monkeypatch.setattr(rlhf.trainers.reward, "load_reward_init", refuse)


@pytest.mark.parametrize("rows, overrides, message", [
    ([{"prompt": "it was", "chosen": "good ."}], [], "no column 'rejected'; available columns: prompt, chosen"),
    ([{"prompt": "it was", "chosen": "good .", "rejected": "bad ."}], ["data.margin_column=strength"],
     "no column 'strength'"),
    ([{"prompt": "it was", "chosen": "good .", "rejected": "bad .", "m": "big"}], ["data.margin_column=m"],
     "column 'm' row 0 (0-based): expected a finite number, got 'big'"),
    ([{"text": "it was good .", "label": "high"}], ["objective=regression"],
     "column 'label' row 0 (0-based): expected a finite number"),
    ([{"text": "it was good .", "label": 0.7}], ["objective=binary"], "row 0 (0-based): the binary objective needs"),
    ([{"text": "it was good .", "score": 1.0}], ["objective=regression"], "no column 'label'"),
])
def test_bad_data_is_a_data_error_before_any_model_loads(rows, overrides, message, tmp_path, no_models):
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError) as err:
        train_reward(reward_cfg(tmp_path, f"data.source={path}", "data.num_eval=0", *overrides))
    assert message in str(err.value)


def test_script_reports_bad_data_in_one_line(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "it was", "chosen": "good ."}])
    result = run_script(["scripts/train_reward.py", f"data.source={path}", "data.num_eval=0",
                         f"hydra.run.dir={tmp_path / 'run'}"], timeout=120)
    assert result.returncode == 2
    # the last stderr line; the lines above it are the datasets library's file-loading progress
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: '{path}' has no column 'rejected'; available columns: prompt, chosen")
    assert "Traceback" not in result.stderr
