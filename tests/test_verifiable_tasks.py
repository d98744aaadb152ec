import os

import pytest

from rlhf import data
from rlhf.data import DataError, load_prompts
from rlhf.tasks import BUILTIN_TASKS, arithmetic, countdown, verifiable, wordcount

TASKS = {"arithmetic": arithmetic, "countdown": countdown, "wordcount": wordcount}


def canonical(task: str, prompt: str) -> str:
    """The problem a prompt states, in the form whose hash picks its split."""
    problem = TASKS[task].parse_prompt(prompt)
    if task == "countdown":
        return countdown.canonical(problem)
    if task == "wordcount":
        return wordcount.canonical(problem)
    return problem.expression


# --- arithmetic: "47 + 8 * 6" is 47 + 48 = 95 ---

ARITH = arithmetic.make_prompt("47 + 8 * 6")


@pytest.mark.parametrize(
    "completion, reward",
    [
        ("<answer>95</answer>", 1.1),  # right, well-formed tag: 1.0 + 0.1
        ("47 + 48 = 95", 1.0),  # no tag: the last number, 95, is right; no bonus
        (
            "<answer> = 95. </answer>",
            1.1,
        ),  # "=", spaces and a trailing period are allowed in a well-formed tag
        (
            "so 8 * 6 = 48, and 47 + 48 = 95.0",
            1.0,
        ),  # 95.0 is 95; the sentence's period is not a decimal point
        ("<answer>94</answer>", 0.1),  # wrong number in a well-formed tag: the bonus alone
        ("<answer>95</answer> no, <answer>96</answer>", 0.1),  # the last tag counts: 96
        (
            "95 <answer>ninety-five</answer>",
            0.0,
        ),  # a tag hides the text outside it; its content has no number
        (
            "<answer>The result is 95</answer>",
            1.0,
        ),  # the last number in the tag is right, the tag is not just a number
        ("<answer>95", 1.0),  # an unclosed tag is no tag: the last number, 95
        ("the answer is 95, not 96", 0.0),  # the last number is 96
        ("<answer>95.5</answer>", 0.1),  # 95.5 != 95
        ("", 0.0),
        ("I don't know.", 0.0),
    ],
)
def test_arithmetic_reward_on_hand_written_completions(completion, reward):
    assert arithmetic.reward_fn([ARITH], [completion]) == [pytest.approx(reward)]
    assert arithmetic.correct_fn([ARITH], [completion]) == [float(reward >= 1.0)]
    assert arithmetic.format_fn([ARITH], [completion]) == [float(round(reward * 10) % 10 == 1)]


def test_arithmetic_numbers_with_commas_and_signs():
    big = arithmetic.make_prompt("1000 + 234")  # 1234
    assert arithmetic.reward_fn([big] * 2, ["<answer>1,234</answer>", "1,234."]) == [pytest.approx(1.1), 1.0]
    small = arithmetic.make_prompt("10 - 3")  # 7
    # "10-3=7": the "-" after a digit is a subtraction, so the numbers are 10, 3, 7; "-7" is minus seven
    assert arithmetic.correct_fn([small] * 3, ["10-3=7", "<answer>-7</answer>", "x = -7"]) == [1.0, 0.0, 0.0]


def test_arithmetic_parse_prompt_round_trips_and_evaluates():
    for prompt in arithmetic.make_split("prompts", 50, seed=1, ops="+-*/", operations=3):
        problem = arithmetic.parse_prompt(prompt)
        assert arithmetic.make_prompt(problem.expression) == prompt
        assert problem.answer >= 0
        assert arithmetic.correct_fn([prompt], [f"<answer>{problem.answer}</answer>"]) == [1.0]
    # 504 / 7 / 8: the dividend was built as 9 * 7 * 8, so every division is exact: 72, then 9
    assert arithmetic.parse_prompt(arithmetic.make_prompt("504 / 7 / 8")).answer == 9
    with pytest.raises(ValueError, match="not a builtin:arithmetic prompt"):
        arithmetic.parse_prompt("What is the capital of France?")


def test_arithmetic_options_shape_the_problems():
    prompts = arithmetic.make_split("prompts", 200, seed=0, digits=3, operations=2, ops="*")
    for prompt in prompts:
        expression = arithmetic.parse_prompt(prompt).expression
        operands = expression.split(" ")[::2]
        assert expression.count("*") == 2 and len(operands) == 3
        assert all(100 <= int(x) <= 999 for x in operands)
    divided = arithmetic.make_split("prompts", 200, seed=0, digits=1, ops="/")
    assert all(" / " in p for p in divided)


# --- countdown: [7, 3, 12] -> 33 is 7 * 3 + 12 ---

COUNT = countdown.make_prompt(countdown.Problem((7, 3, 12), 33))


@pytest.mark.parametrize(
    "completion, reward",
    [
        ("<answer>7 * 3 + 12</answer>", 1.1),
        ("<answer>(7 * 3) + 12 = 33</answer>", 1.1),  # "= target" after the expression is allowed
        ("<answer>33 = 12 + 3 * 7</answer>", 1.1),  # and before it; the order of the numbers is free
        ("<answer>7 × 3 + 12</answer>", 1.1),  # "×" reads as "*"
        ("<answer>7 x 3 + 12.</answer>", 1.1),  # "x" between numbers reads as "*"; a final period is dropped
        ("<answer>7 * 3.0 + 12</answer>", 0.0),  # "3.0" is no integer literal: not a whitelisted expression
        ("<answer>7 * 3 + 12 = 34</answer>", 0.1),  # a stated result other than the target is wrong
        ("<answer>3 * 11</answer>", 0.1),  # 33, but not the given numbers
        ("<answer>7 * 3 + 12 + 0</answer>", 0.1),  # an extra number
        ("<answer>7 * 3 + 12 * 12 / 12</answer>", 0.1),  # 12 used three times
        ("<answer>(7 + 3) * 12</answer>", 0.1),  # the right numbers, 120 != 33
        ("<answer>7 ** 3</answer>", 0.0),  # powers are not whitelisted: no expression, no bonus
        ("<answer>-7 + 3 * 12 + 4</answer>", 0.0),  # no unary minus
        ("<answer>__import__('os').getcwd()</answer>", 0.0),  # names and calls are refused, never run
        ("The equation is 7 * 3 + 12 = 33.", 1.0),  # no tag: the last equation-like run
        ("First 7 * 3 = 21, then 21 + 12 = 33.", 0.0),  # the last run is "21 + 12 = 33", which uses 21
        ("", 0.0),
        ("<answer></answer>", 0.0),
    ],
)
def test_countdown_reward_on_hand_written_completions(completion, reward):
    assert countdown.reward_fn([COUNT], [completion]) == [pytest.approx(reward)]
    assert countdown.correct_fn([COUNT], [completion]) == [float(reward >= 1.0)]


def test_countdown_exact_fractions_and_division_by_zero():
    thirds = countdown.make_prompt(countdown.Problem((3, 6, 4), 2))
    assert countdown.correct_fn([thirds], ["<answer>3 / 6 * 4</answer>"]) == [1.0]  # 1/2 * 4 = 2 exactly
    twins = countdown.make_prompt(countdown.Problem((5, 5, 2), 1))
    # 2 / (5 - 5) divides by zero: wrong, but a well-formed expression in a tag
    assert countdown.reward_fn([twins], ["<answer>2 / (5 - 5)</answer>"]) == [pytest.approx(0.1)]
    assert countdown.correct_fn([twins], ["<answer>(5 + 5) / 2 - 4</answer>"]) == [0.0]  # 4 is not given


def test_countdown_every_problem_is_solvable_and_round_trips():
    import random

    rng = random.Random(5)
    for _ in range(100):
        problem, solution = countdown.draw(rng, 4, 30, 10, 60)
        prompt = countdown.make_prompt(problem)
        assert countdown.parse_prompt(prompt) == problem
        assert 10 <= problem.target <= 60 and all(1 <= x <= 30 for x in problem.numbers)
        assert countdown.reward_fn([prompt], [f"<answer>{solution}</answer>"]) == [pytest.approx(1.1)]
    with pytest.raises(ValueError, match="not a builtin:countdown prompt"):
        countdown.parse_prompt(ARITH)


# --- wordcount: "rain" in exactly 6 words ---

WORDS = wordcount.make_prompt(wordcount.Problem("rain", 6, 6))


@pytest.mark.parametrize(
    "completion, reward",
    [
        ("<answer>The rain fell softly all night.</answer>", 1.1),
        ("Sure! Here is one:\n\nThe rain fell softly all night.\n", 1.0),  # no tag: the last non-empty line
        ("<answer>Rain, rain — go away today please</answer>", 1.1),  # "—" is no word; "Rain," mentions rain
        ("<answer>Raindrops fall on the old roof.</answer>", 1.1),  # "raindrops" starts with the topic
        ("<answer>The sun shines bright every day.</answer>", 0.1),  # 6 words, off topic
        ("<answer>Raindrops fall on the roof.</answer>", 0.1),  # 5 words
        ("<answer>The rain fell softly all night long.</answer>", 0.1),  # 7 words
        (
            "<answer>a</answer>\nThe rain fell softly all night.",
            0.1,
        ),  # the tag wins over the last line: 1 word
        ("<answer>  </answer>", 0.0),  # an empty tag is not well formed
        ("", 0.0),
    ],
)
def test_wordcount_reward_on_hand_written_completions(completion, reward):
    assert wordcount.reward_fn([WORDS], [completion]) == [pytest.approx(reward)]
    assert wordcount.correct_fn([WORDS], [completion]) == [float(reward >= 1.0)]


def test_wordcount_slack_allows_a_range():
    ranged = wordcount.make_prompt(wordcount.Problem("rain", 5, 7))
    assert "in 5 to 7 words" in ranged and wordcount.parse_prompt(ranged) == ("rain", 5, 7)
    sentences = [
        "Rain falls on the roof.",
        "Rain falls on the old tin roof.",
        "Rain falls on the old red tin roof.",
    ]
    # 5 and 7 words are in [5, 7]; 8 words are not
    assert wordcount.correct_fn([ranged] * 3, sentences) == [1.0, 1.0, 0.0]


def test_wordcount_parse_prompt_and_options():
    prompts = wordcount.make_split(
        "prompts", 100, seed=2, min_words=3, max_words=5, slack=2, topics=["tea", "owl"]
    )
    problems = [wordcount.parse_prompt(p) for p in prompts]
    assert {p.topic for p in problems} == {"tea", "owl"} and {p.low for p in problems} == {3, 4, 5}
    assert all(p.high == p.low + 2 for p in problems)
    assert all(wordcount.make_prompt(p) == prompt for p, prompt in zip(problems, prompts))


# --- what all three share ---


@pytest.mark.parametrize("task", TASKS)
def test_rewards_are_correct_plus_a_tenth_for_format(task):
    module = TASKS[task]
    prompts = module.make_split("prompts", 20, seed=0)
    completions = ["<answer>1</answer>", "", "1 + 1", "<answer>x</answer>"] * 5
    reward, correct, fmt = (
        f(prompts, completions) for f in (module.reward_fn, module.correct_fn, module.format_fn)
    )
    assert reward == pytest.approx([c + 0.1 * f for c, f in zip(correct, fmt)])
    assert set(correct) <= {0.0, 1.0} and set(fmt) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="differ in length: 20 != 19"):
        module.reward_fn(prompts, completions[:-1])


@pytest.mark.parametrize("task", TASKS)
def test_splits_are_deterministic_per_seed(task):
    make = TASKS[task].make_split
    assert make("prompts", 30, seed=4) == make("prompts", 30, seed=4)
    assert make("prompts", 30, seed=4, split="test") == make("prompts", 30, seed=4, split="test")
    assert make("prompts", 30, seed=4) != make("prompts", 30, seed=5)
    assert (
        make("prompts", 10, seed=4) == make("prompts", 30, seed=4)[:10]
    )  # a prefix: more rows, same first ones


@pytest.mark.parametrize("task", TASKS)
def test_train_and_test_never_share_a_problem(task):
    """Disjoint by construction: each problem's hash picks its split, whatever the seed or the size."""
    make = TASKS[task].make_split
    train, test = set(), set()
    for seed in range(4):
        for n in (1, 40, 300):
            train |= {canonical(task, p) for p in make("prompts", n, seed=seed, split="train")}
            rows = [canonical(task, p) for p in make("prompts", n, seed=seed, split="test")]
            assert len(set(rows)) == len(rows)  # the test split holds distinct problems
            test |= set(rows)
    assert train and test and not train & test
    assert {verifiable.split_of(c) for c in train} == {"train"} and {
        verifiable.split_of(c) for c in test
    } == {"test"}


@pytest.mark.parametrize(
    "text, value",
    [
        ("(1 + 2) * 3", 9),
        (" 7 / 2 * 4 ", 14),  # left to right, exactly: 7/2 * 4 = 14
        ("1 / (2 - 2)", None),  # parses; evaluating it divides by zero
    ],
)
def test_expressions_are_evaluated_exactly(text, value):
    assert verifiable.evaluate(verifiable.parse_expression(text)) == value


@pytest.mark.parametrize(
    "text",
    ["", "   ", "1 // 2", "2 ** 3", "-1 + 2", "1.5 + 1", "(1)(2)", "07 + 1", "x + 1", "1 + ", "9" * 201],
)
def test_only_whitelisted_expressions_parse(text):
    assert verifiable.parse_expression(text) is None


def test_split_hash_is_stable_and_about_a_fifth_test():
    # int(sha256(text)[:8 bytes]) % 100 < 20 is test: "1 + 1" -> 0x72fce59447a01f48 % 100 = 32 (train);
    # pinned, so a change of hash (or Python's salted hash()) fails here
    assert verifiable.split_of("1 + 1") == "train"
    assert int("72fce59447a01f48", 16) % 100 == 32
    tests = [
        c
        for c in (f"{a} + {b}" for a in range(10, 20) for b in range(10, 20))
        if verifiable.split_of(c) == "test"
    ]
    assert tests[:3] == ["10 + 13", "10 + 14", "10 + 15"]
    shares = [verifiable.split_of(str(i)) == "test" for i in range(5000)]
    assert 0.18 < sum(shares) / len(shares) < 0.22


def test_a_problem_space_too_small_for_the_test_split_says_which_knob():
    # 1-digit additions: 9 x 9 = 81 problems, about 16 of them test problems
    space = {f"{a} + {b}" for a in range(1, 10) for b in range(1, 10)}
    n_test = sum(verifiable.split_of(c) == "test" for c in space)
    assert 8 < n_test < 30
    assert len(arithmetic.make_split("prompts", n_test, split="test", digits=1, ops="+")) == n_test
    with pytest.raises(
        ValueError,
        match=rf"^builtin:arithmetic has only {n_test} distinct test problems .*"
        r"raise data\.options\.digits or data\.options\.operations",
    ):
        arithmetic.make_split("prompts", n_test + 1, split="test", digits=1, ops="+")


@pytest.mark.parametrize(
    "task, options, message",
    [
        (
            "arithmetic",
            {"digit": 2},
            r"^data\.options\.digit: unknown option of builtin:arithmetic; "
            r"valid: digits, operations, ops$",
        ),
        ("arithmetic", {"digits": 0}, r"^data\.options\.digits: must be an int in \[1, 9\], got 0$"),
        ("arithmetic", {"ops": "+^"}, r"^data\.options\.ops: must be a non-empty string of operators"),
        ("arithmetic", {"ops": ""}, r"^data\.options\.ops: "),
        ("countdown", {"count": 1}, r"^data\.options\.count: must be an int in \[2, 8\], got 1$"),
        ("countdown", {"target_min": 50, "target_max": 10}, r"^data\.options\.target_max: must be >= "),
        (
            "countdown",
            {"max_number": 1, "count": 2, "target_min": 50},
            r"^data\.options\.target_min: no target",
        ),
        (
            "countdown",
            {"numbers": 3},
            r"^data\.options\.numbers: unknown option of builtin:countdown; valid: count, ",
        ),
        (
            "wordcount",
            {"min_words": 5, "max_words": 4},
            r"^data\.options\.max_words: must be an int >= 5, got 4$",
        ),
        ("wordcount", {"topics": ["Rain"]}, r"^data\.options\.topics: "),
        ("wordcount", {"slack": -1}, r"^data\.options\.slack: must be an int >= 0, got -1$"),
        ("wordcount", {"topics": "rain"}, r"^data\.options\.topics: "),
    ],
)
def test_option_errors_name_the_key(task, options, message):
    with pytest.raises(ValueError, match=message):
        TASKS[task].make_split("prompts", 5, **options)


@pytest.mark.parametrize("task", TASKS)
def test_only_prompts_are_made(task):
    with pytest.raises(ValueError, match=r"^kind must be 'prompts' .*got 'sft'$"):
        TASKS[task].make_split("sft", 5)


# --- wiring: rlhf.data, the task registry, the configs ---


def test_load_prompts_passes_options_to_the_builtin_task():
    rows = load_prompts("builtin:arithmetic", split="test", n=5, seed=3, options={"digits": 1, "ops": "*"})
    assert rows == arithmetic.make_split("prompts", 5, seed=3, split="test", digits=1, ops="*")
    assert all(" * " in r for r in rows)
    with pytest.raises(ValueError, match=r"^data\.options\.digitz: unknown option"):
        load_prompts("builtin:arithmetic", options={"digitz": 1})
    with pytest.raises(DataError, match=r"^data\.options: only a built-in task takes options"):
        load_prompts("prompts.jsonl", options={"digits": 1})


@pytest.mark.parametrize("task", TASKS)
def test_default_test_split_has_enough_distinct_problems(task):
    assert len(set(load_prompts(f"builtin:{task}", split="test"))) == data.BUILTIN_SIZES["test"]


@pytest.mark.parametrize("task", TASKS)
def test_the_registry_and_the_config_name_the_task(task):
    from rlhf.config import import_function
    from tests.conftest import compose_policy

    entry = BUILTIN_TASKS[task]
    assert import_function(entry["function"], "reward.function") is TASKS[task].reward_fn
    assert import_function(entry["gold"], "reward.gold") is TASKS[task].correct_fn
    cfg = compose_policy([f"data={task}"])
    assert cfg.data.prompts == f"builtin:{task}"
    assert set(cfg.data.options) == set(TASKS[task].DEFAULTS)
    assert {k: cfg.data.options[k] for k in cfg.data.options} == TASKS[task].DEFAULTS


def test_the_policy_setup_passes_data_options():
    from rlhf.trainers.policy_setup import load_prompts as setup_load_prompts
    from tests.conftest import compose_policy

    cfg = compose_policy(["data=arithmetic", "data.options.digits=1", "data.num_prompts=6", "seed=2"])
    assert setup_load_prompts(cfg) == arithmetic.make_split("prompts", 6, seed=2, digits=1)


SMOLLM2 = os.path.join(os.environ.get("RLHF_CACHE", os.path.expanduser("~/.cache/rlhf")), "smollm2")


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(SMOLLM2, "tokenizer.json")),
    reason="SmolLM2 not prepared (builtin:smollm2)",
)
@pytest.mark.parametrize("task", TASKS)
def test_prompts_fit_the_data_configs_max_prompt_length(task):
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    limit = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "configs", "data", f"{task}.yaml"))
    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    harder = {
        "arithmetic": {"digits": 4, "operations": 4, "ops": "+-*/"},
        "countdown": {"count": 6, "max_number": 1000, "target_max": 100000},
        "wordcount": {"max_words": 99},
    }
    for options in (dict(limit.options), harder[task]):
        prompts = load_prompts(f"builtin:{task}", n=200, options=options)
        # SmolLM2 has a token per digit; the plain prompt is what data.max_prompt_length limits
        assert max(len(ids) for ids in tok(prompts)["input_ids"]) <= limit.max_prompt_length
