import math
import random

import pytest

from rlhf.tasks.sentiment import (
    LEXICON,
    VOCAB,
    gold_fn,
    gold_score,
    make_preferences,
    make_prompts,
    make_scalar,
    make_sft,
    make_split,
    preference_ceiling,
    reward_fn,
)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- lexicon and vocabulary ---


def test_lexicon_weights_are_in_range_and_both_signs_present():
    assert all(-1.0 <= w <= 1.0 for w in LEXICON.values())
    assert LEXICON["superb"] == 1.0 and LEXICON["awful"] == -1.0
    assert sum(w > 0 for w in LEXICON.values()) >= 20
    assert sum(w < 0 for w in LEXICON.values()) >= 20


def test_vocab_is_small_unique_and_covers_lexicon_and_punctuation():
    assert len(VOCAB) < 1000
    assert len(set(VOCAB)) == len(VOCAB)
    assert set(LEXICON) <= set(VOCAB)
    assert "." in VOCAB and "," in VOCAB
    assert all(len(w.split()) == 1 for w in VOCAB)


# --- gold score: expected values follow the docstring formula term by term ---


@pytest.mark.parametrize(
    "text, expected",
    [
        # one word of weight 1.0, well-formed: tanh(1.0) = 0.7616
        ("superb .", math.tanh(1.0)),
        # weights 0.5 (good) and -1.0 (awful), no penalty: tanh(-0.5) = -0.4621
        ("good but the service was awful .", math.tanh(-0.5)),
        # sum 2.0; "superb" repeats once (-0.5); one adjacent lexicon pair (-0.25): 0.9640 - 0.75 = 0.2140
        ("superb superb .", math.tanh(2.0) - 0.75),
        # sum 1.0 + 0.9 = 1.9; one adjacent lexicon pair (-0.25): 0.9560 - 0.25 = 0.7060
        ("superb excellent .", math.tanh(1.9) - 0.25),
        # no final period (-0.5): 0.7616 - 0.5 = 0.2616
        ("superb", math.tanh(1.0) - 0.5),
        # sum 1.0; "good" repeats (-0.5); two periods (-0.5): 0.7616 - 1.0 = -0.2384
        ("good . good .", math.tanh(1.0) - 1.0),
        # empty text: no sentiment, bad shape: -0.5
        ("", -0.5),
        # 17 "the" + "." = 18 tokens; function words repeat freely; 2 over MAX_WORDS=16: -0.1 * 2 = -0.2
        ("the " * 17 + ".", -0.2),
        # "superb." is one unknown token (weight 0) and there is no "." token: -0.5
        ("superb.", -0.5),
        # unknown words weigh 0: tanh(0) = 0
        ("xyzzy plugh .", 0.0),
        # lowercased before scoring: same as "superb ." = tanh(1.0)
        ("SUPERB .", math.tanh(1.0)),
    ],
)
def test_gold_score_hand_computed(text, expected):
    assert gold_score(text) == pytest.approx(expected, abs=1e-9)


def test_gold_score_babble_scores_below_a_natural_sentence():
    natural = gold_score("perfect and i loved it .")  # tanh(1.0 + 0.9) = 0.956
    assert natural == pytest.approx(math.tanh(1.9))
    # three repeats (-1.5), three adjacent pairs (-0.75): tanh(4) - 2.25 = -1.251
    assert gold_score("perfect perfect perfect perfect .") == pytest.approx(math.tanh(4.0) - 2.25)
    # a list of distinct positive words: sum 4.7, four adjacent pairs (-1.0): 0.9998 - 1.0 < 0
    assert gold_score("superb perfect excellent wonderful amazing .") == pytest.approx(math.tanh(4.7) - 1.0)


def test_reward_fn_scores_completions_and_ignores_prompts():
    out = reward_fn(["awful awful awful", "the food was"], ["superb .", "awful ."])
    # prompts do not count: tanh(1.0) and tanh(-1.0)
    assert out == pytest.approx([math.tanh(1.0), -math.tanh(1.0)])
    assert gold_fn(["x"], ["superb ."]) == pytest.approx([math.tanh(1.0)])


def test_reward_fn_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        reward_fn(["a", "b"], ["c ."])


# --- generators ---


def test_generators_are_deterministic_and_leave_global_random_state_alone():
    random.seed(123)
    expected_next = random.random()
    random.seed(123)
    a = make_sft(50, seed=7)
    assert random.random() == expected_next
    assert make_sft(50, seed=7) == a
    assert make_sft(50, seed=8) != a


def test_prompts_are_short_neutral_and_in_vocab():
    vocab = set(VOCAB)
    for prompt in make_prompts(300, seed=1):
        words = prompt.split()
        assert 2 <= len(words) <= 5, prompt
        assert set(words) <= vocab, prompt
        assert not set(words) & set(LEXICON), prompt


def test_sft_rows_are_full_sentences_in_vocab_without_penalties():
    vocab = set(VOCAB)
    rows = make_sft(500, seed=2)
    for row in rows:
        sentence = row["prompt"] + " " + row["completion"]
        assert sentence.split()[-1] == "." and sentence.count(".") == 1
        assert not row["completion"][0].isspace()
        assert set(sentence.split()) <= vocab
        # natural text pays no penalty: gold is exactly tanh of the summed weights
        words = row["completion"].split()
        assert gold_score(row["completion"]) == pytest.approx(
            math.tanh(sum(LEXICON.get(w, 0.0) for w in words))
        )


def test_sft_sentiment_is_mixed_so_sft_is_not_optimal():
    golds = [gold_score(r["completion"]) for r in make_sft(1000, seed=3)]
    assert sum(g > 0.2 for g in golds) > 250
    assert sum(g < -0.2 for g in golds) > 250
    assert abs(sum(golds) / len(golds)) < 0.15


def test_train_and_test_prompts_are_disjoint():
    train = set(make_prompts(3000, seed=0, split="train"))
    test = set(make_prompts(1000, seed=0, split="test"))
    assert train and test
    assert not train & test
    sft_test = {r["prompt"] for r in make_sft(500, seed=1, split="test")}
    assert not sft_test & train


def test_preference_labels_follow_bradley_terry():
    rows = make_preferences(2000, seed=4, temperature=0.2)
    assert all(r["chosen"] != r["rejected"] for r in rows)
    agree = sum(gold_score(r["chosen"]) > gold_score(r["rejected"]) for r in rows) / len(rows)
    ties = sum(gold_score(r["chosen"]) == gold_score(r["rejected"]) for r in rows) / len(rows)
    # each label agrees with the gold order with probability max(p, 1 - p), ties with 1/2 either way,
    # so agree + ties / 2 estimates the ceiling; binomial std ~ sqrt(0.87 * 0.13 / 2000) = 0.0075
    assert agree + ties / 2 == pytest.approx(preference_ceiling(rows, 0.2), abs=0.03)


def test_preference_labels_are_nearly_clean_at_low_temperature():
    rows = make_preferences(300, seed=5, temperature=1e-4)
    diffs = [gold_score(r["chosen"]) - gold_score(r["rejected"]) for r in rows]
    # a gap of 0.01 gives p = sigmoid(100): the worse completion is practically never chosen
    assert all(d > 0 for d in diffs if abs(d) > 0.01)


def test_preference_ceiling_hand_computed():
    t = 0.5
    # diff 0 -> p = 0.5; diff t * ln 3 -> p = sigmoid(ln 3) = 3/4; mean(0.5, 0.75) = 0.625
    assert preference_ceiling([0.0, t * math.log(3)], t) == pytest.approx(0.625)
    # the sign does not matter: max(p, 1 - p) = 3/4 for a diff of -t ln 3
    assert preference_ceiling([-t * math.log(3)], t) == pytest.approx(0.75)
    rows = [{"chosen": "superb .", "rejected": "awful ."}, {"chosen": "food .", "rejected": "coffee ."}]
    # diffs: tanh(1) - tanh(-1) = 1.5232 -> sigmoid(1.5232 / 1) = 0.8210; 0 -> 0.5; mean = 0.6605
    expected = (_sigmoid(2 * math.tanh(1.0)) + 0.5) / 2
    assert preference_ceiling(rows, 1.0) == pytest.approx(expected)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_temperature_must_be_positive(bad):
    with pytest.raises(ValueError, match="temperature"):
        make_preferences(3, temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        preference_ceiling([0.1], bad)


def test_preference_ceiling_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        preference_ceiling([], 1.0)


def test_scalar_labels_are_gold_scores_of_the_full_text():
    rows = make_scalar(200, seed=6)
    for row in rows:
        assert row["label"] == pytest.approx(gold_score(row["text"]))
    # the prompt adds no sentiment and no repeat, so the full sentence scores like its completion
    for row in make_sft(200, seed=6):
        assert gold_score(row["prompt"] + " " + row["completion"]) == pytest.approx(
            gold_score(row["completion"])
        )


def test_scalar_noise_has_the_requested_std():
    rows = make_scalar(2000, seed=7, noise_std=0.5)
    residuals = [r["label"] - gold_score(r["text"]) for r in rows]
    mean = sum(residuals) / len(residuals)
    std = math.sqrt(sum((x - mean) ** 2 for x in residuals) / len(residuals))
    # sample std of 2000 N(0, 0.25) draws: within 0.05 of 0.5 (its own std is ~0.008)
    assert std == pytest.approx(0.5, abs=0.05)
    assert mean == pytest.approx(0.0, abs=0.05)


def test_make_split_dispatches_and_validates():
    assert make_split("sft", 10, seed=3, split="train") == make_sft(10, seed=3, split="train")
    assert make_split("preferences", 5, seed=1, temperature=0.3) == make_preferences(
        5, seed=1, temperature=0.3
    )
    with pytest.raises(ValueError, match="kind"):
        make_split("nope", 3)
    with pytest.raises(ValueError, match="split"):
        make_prompts(3, split="validation")
    with pytest.raises(ValueError, match="n must"):
        make_prompts(-1)


def test_scalar_noise_std_must_be_non_negative():
    with pytest.raises(ValueError, match="noise_std"):
        make_scalar(3, noise_std=-0.1)
