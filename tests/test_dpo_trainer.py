"""The DPO stage (rlhf.trainers.dpo, scripts/train_dpo.py) with the tiny built-in model: config and data errors
before any model loads, completion log-probs against a direct computation, step-0 values that follow from
policy == reference (h = 0), precomputed and live references giving the same steps, learning on the built-in task,
and the saved model being the trained one."""

import json
import math

import datasets
import pytest
import torch

from rlhf.config import ConfigError, validate_dpo_config
from rlhf.data import DataError
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.trainers.dpo import dpo_summary, sequence_logps, train_dpo
from rlhf.trainers.reward import encode_pairs
from tests.conftest import compose_config

FAST = ["data.num_train=256", "data.num_eval=64", "trainer.batch_size=16", "trainer.warmup_steps=0",
        "trainer.max_steps=3", "trainer.eval_every=0", "trainer.log_every=1", "logging.progress=false",
        "logging.tensorboard=false", "frontier.num_prompts=0"]
FRONTIER = ["frontier.num_prompts=16", "frontier.samples=2"]
# The multi-process runs: STAGE_FAST (tests/test_distributed.py) with the frontier, and 65 held-out pairs in batches of
# 32, which 2 processes split into 33 and 32 rows: under FSDP2 (every forward a collective) the one with 32 must still
# run a second forward pass (rlhf.trainers.reward.dataset_scores); without it the FSDP2 run below fails
UNEVEN = [*FRONTIER, "data.num_eval=65", "trainer.eval_batch_size=32"]


def dpo_cfg(tmp_path, *overrides, name="run"):
    return validate_dpo_config(compose_config("dpo", [*FAST, *overrides], run_dir=str(tmp_path / name)))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:words")


# --- config and data errors, one line naming the key, column or row ---


@pytest.mark.parametrize("override, message", [
    ("dpo.loss=kto", r"^dpo\.loss: 'kto' is not one of hinge, ipo, sigmoid$"),
    ("dpo.beta=0", r"^dpo\.beta: must be > 0, got 0"),
    ("dpo.beta=-0.1", r"^dpo\.beta: must be > 0"),
    ("dpo.label_smoothing=0.5", r"^dpo\.label_smoothing: must be in \[0, 0\.5\)"),
])
def test_config_errors_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        dpo_cfg(tmp_path, override)


@pytest.mark.parametrize("override, message", [
    ("frontier.num_prompts=-1", r"^frontier\.num_prompts: must be >= 0"),
    ("frontier.samples=0", r"^frontier\.samples: must be >= 1"),
    ("frontier.gold=rlhf.tasks.sentiment.no_such_fn", r"^frontier\.gold: "),
])
def test_frontier_config_errors_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        dpo_cfg(tmp_path, override)


def test_frontier_auto_follows_the_data_source(tmp_path):
    """auto: the built-in task's prompts and gold scorer; a user's pair file names no prompts, so it is off."""
    cfg = dpo_cfg(tmp_path, *FRONTIER)
    assert (cfg.frontier.prompts, cfg.frontier.gold) == ("builtin:sentiment", "rlhf.tasks.sentiment.gold_fn")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", GOOD)
    cfg = dpo_cfg(tmp_path, *FRONTIER, f"data.source={pairs}", "data.num_eval=0")
    assert (cfg.frontier.prompts, cfg.frontier.gold) == (None, None)


@pytest.mark.parametrize("loss", ["hinge", "ipo"])
def test_label_smoothing_with_a_non_sigmoid_loss_is_refused(tmp_path, loss):
    with pytest.raises(ConfigError, match=rf"^dpo\.label_smoothing: .*sigmoid loss only, not '{loss}'"):
        dpo_cfg(tmp_path, f"dpo.loss={loss}", "dpo.label_smoothing=0.1")


GOOD = [{"prompt": "it was", "chosen": "good .", "rejected": "bad ."},
        {"prompt": "the food was", "chosen": "superb .", "rejected": "awful ."}]


RENAMED = [{"prompt": r["prompt"], "chosen": r["chosen"], "worse": r["rejected"]} for r in GOOD]


@pytest.mark.parametrize("rows, message", [
    (RENAMED, r"has no column 'rejected'; available columns: prompt, chosen, worse"),
    ([*GOOD, {"prompt": "it was", "chosen": "", "rejected": "bad ."}],
     r"column 'chosen' row 2 \(0-based\): expected a non-empty string"),
    ([*GOOD, {"prompt": "it was", "chosen": "good .", "rejected": " "}], r"column 'rejected' row 2 \(0-based\)"),
    ([*GOOD, {"prompt": "it was", "chosen": "fine .", "rejected": "fine ."}],
     r"row 2 \(0-based\): columns 'chosen' and 'rejected' hold the same text 'fine \.'"),
])
def test_data_errors_name_the_file_and_row_before_any_model_loads(tmp_path, rows, message):
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    held_out = write_jsonl(tmp_path / "test.jsonl", GOOD)
    cfg = dpo_cfg(tmp_path, f"data.source={train}", f"data.eval_source={held_out}", "data.num_train=null",
                  "data.num_eval=null")
    with pytest.raises(DataError, match=message) as err:
        train_dpo(cfg)
    assert "train.jsonl" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "final").exists()


# --- conversational pairs (TRL's format): rendered by the chat template, joined as rendered text ---


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
"""A template with no whitespace between a header and its text, as several real ones have: a joining space after
the generation prompt would be a token of its own."""
CHARS = "abcdefghijklmnopqrstuvwxyz ."  # ids 7..34 (a = 7, space = 33, "." = 34)


def char_tokenizer(template=CHAT_TEMPLATE):
    """One token per character (so a stray space is visible as id 33), built in memory: <pad> 0, <s> 1, </s> 2,
    <unk> 3, <|system|> 4, <|user|> 5, <|assistant|> 6, then CHARS. Its post-processor adds BOS, as Llama's does, and
    the template writes BOS itself (tests/test_chat.py's case)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(special + list(CHARS))}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens=special[4:], chat_template=template,
                                   clean_up_tokenization_spaces=False)


CONVERSATION = {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                "chosen": [{"role": "assistant", "content": "ok."}],
                "rejected": [{"role": "assistant", "content": "no"}]}
# <s> <|system|> b e ' ' b r i e f </s> <|user|> h i </s> <|assistant|>: 16 tokens, one BOS (the template's)
PROMPT_IDS = [1, 4, 8, 11, 33, 8, 24, 15, 11, 12, 2, 5, 14, 15, 2, 6]


def test_a_conversational_pair_encodes_as_its_rendered_conversation():
    """The prompt is rendered with the generation prompt; each completion is the rest of the whole conversation's
    rendering: the assistant's text and the template's end-of-turn </s>, which the loss mask covers exactly. The
    tokens are those of the whole conversation tokenized at once, and those of the same pair given as strings
    rendered by hand."""
    from rlhf.data import render_conversational
    from rlhf.trainers.dpo import encode_split

    tok = char_tokenizer()
    enc = encode_split(datasets.Dataset.from_list([CONVERSATION]), tok, "pairs.jsonl", 64)
    # chosen: o k . </s>; rejected: n o </s>, then padding
    assert enc["input_ids"][0].tolist() == [PROMPT_IDS + [21, 17, 34, 2], PROMPT_IDS + [20, 21, 2, 0]]
    assert enc["loss_mask"][0].tolist() == [[0] * 16 + [1, 1, 1, 1], [0] * 16 + [1, 1, 1, 0]]
    assert enc["attention_mask"][0].tolist() == [[1] * 20, [1] * 19 + [0]]
    whole = tok.apply_chat_template(CONVERSATION["prompt"] + CONVERSATION["chosen"], tokenize=True)["input_ids"]
    assert enc["input_ids"][0, 0].tolist() == whole

    by_hand = {"prompt": "<s><|system|>be brief</s><|user|>hi</s><|assistant|>", "chosen": "ok.</s>",
               "rejected": "no</s>"}
    assert render_conversational(datasets.Dataset.from_list([CONVERSATION]), tok, "pairs.jsonl")[0] == by_hand
    strings = encode_pairs(datasets.Dataset.from_list([by_hand]), tok, 64, completion_only=True, chat=True)
    assert strings.keys() == enc.keys() and all(torch.equal(strings[k], enc[k]) for k in enc)
    # What the plain join (prompt + " " + completion + EOS, the prompt with the tokenizer's own BOS) would train on:
    # a second BOS, a space the sampled policy never sees after <|assistant|>, and EOS twice
    plain = encode_pairs(datasets.Dataset.from_list([by_hand]), tok, 64, completion_only=True)
    assert plain["input_ids"][0, 0].tolist() == [1] + PROMPT_IDS + [33, 21, 17, 34, 2, 2]


def test_conversational_rows_cut_at_max_length_warn_and_keep_their_first_tokens():
    """20 tokens into max_length 18: the chosen row is cut after "o k" (a warning counts it), the rejected one after
    "n o" (its </s> is the 19th token, so it is cut too)."""
    from rlhf.trainers.dpo import encode_split

    with pytest.warns(UserWarning, match="^2 rows were cut at data.max_length=18"):
        enc = encode_split(datasets.Dataset.from_list([CONVERSATION]), char_tokenizer(), "pairs.jsonl", 18)
    assert enc["input_ids"][0].tolist() == [PROMPT_IDS + [21, 17], PROMPT_IDS + [20, 21]]
    assert enc["loss_mask"][0].tolist() == [[0] * 16 + [1, 1]] * 2


def test_conversational_pairs_need_a_chat_template_that_renders_the_prompt_as_a_prefix():
    from rlhf.data import render_conversational

    rows = datasets.Dataset.from_list([CONVERSATION])
    plain = char_tokenizer(template=None)  # built in memory, so named by its class
    with pytest.raises(DataError) as err:
        render_conversational(rows, plain, "pairs.jsonl")
    assert str(err.value) == (f"'pairs.jsonl' holds conversational pairs (lists of messages), but the tokenizer "
                              f"{type(plain).__name__} has no chat template to render them; set model.tokenizer to "
                              "one that has, or give the pairs as strings")
    # a generation prompt that is not how the template opens an assistant turn
    odd = CHAT_TEMPLATE.replace("<|assistant|>{% endif %}", "<|assistant|>.{% endif %}")
    with pytest.raises(DataError) as err:
        render_conversational(rows, char_tokenizer(template=odd), "pairs.jsonl")
    assert str(err.value) == (
        "'pairs.jsonl' row 0 (0-based): the chat template renders prompt + chosen as "
        "'<s><|system|>be brief</s><|user|>hi</s><|assistant|>ok.</s>', which does not start with the prompt it "
        "renders with the generation prompt, '<s><|system|>be brief</s><|user|>hi</s><|assistant|>.'; the chosen "
        "completion cannot be cut from it")


def conversation(prompt, chosen, rejected):
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


CHAT_GOOD = [conversation(r["prompt"], r["chosen"], r["rejected"]) for r in GOOD]


@pytest.mark.parametrize("rows, message", [
    ([*GOOD, CHAT_GOOD[0]],
     "column 'prompt' row 2 (0-based): expected a string as row 0 of column 'prompt' holds, got "
     "[{'role': 'user', 'content': 'it was'}]; give every prompt, chosen and rejected as strings, or every one as a "
     "list of messages"),
    ([*CHAT_GOOD, {**CHAT_GOOD[0], "rejected": "bad ."}],
     "column 'rejected' row 2 (0-based): expected a list of messages as row 0 of column 'prompt' holds, got "
     "'bad .'; give every prompt, chosen and rejected as strings, or every one as a list of messages"),
    ([*CHAT_GOOD, {**CHAT_GOOD[0], "chosen": []}],
     "column 'chosen' row 2 (0-based): expected a non-empty list of {'role': str, 'content': str}, got []"),
    ([*CHAT_GOOD, conversation("it was", "fine .", " fine . ")],
     "row 2 (0-based): columns 'chosen' and 'rejected' hold the same text "
     "[{'role': 'assistant', 'content': 'fine .'}]; a pair needs two different completions"),
])
def test_conversational_data_errors_are_one_line_naming_the_column_and_row(tmp_path, rows, message):
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = dpo_cfg(tmp_path, f"data.source={train}", "data.num_train=null", "data.num_eval=0")
    with pytest.raises(DataError) as err:
        train_dpo(cfg)
    assert str(err.value) == f"{train!r} {message}"
    assert not (tmp_path / "run" / "final").exists()


def test_conversational_pairs_with_a_tokenizer_without_a_template_fail_before_the_model_loads(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", CHAT_GOOD)
    plain = load_tokenizer("builtin:words")
    plain.chat_template = None
    plain.save_pretrained(tmp_path / "tok")
    cfg = dpo_cfg(tmp_path, f"data.source={train}", "data.num_train=null", "data.num_eval=0",
                  f"model.tokenizer={tmp_path / 'tok'}")
    with pytest.raises(DataError, match=r"^'.*train\.jsonl' holds conversational pairs \(lists of messages\), but "
                                        r"the tokenizer .*tok has no chat template to render them; set "
                                        r"model\.tokenizer to one that has, or give the pairs as strings$"):
        train_dpo(cfg)


def test_a_short_run_on_conversational_pairs_trains_and_logs(tmp_path, tok):
    """builtin:words renders "<|user|> it was </s> <|assistant|> " and "good . </s> ": the same completion tokens
    (good . </s>) as the string pair's "good ." + EOS, after a prompt in the template's role tokens. Step 0 is log 2
    (policy == reference), the updates move the margin, and the summed chosen log-prob is over 3 tokens a pair."""
    words = ["good", "superb", "great", "fine", "nice"], ["bad", "awful", "poor", "dull", "terrible"]
    rows = [conversation(p, f"{c} .", f"{r} .") for p in ("it was", "the food was", "the service was")
            for c, r in zip(*words)]
    train = write_jsonl(tmp_path / "train.jsonl", rows * 4)
    held_out = write_jsonl(tmp_path / "test.jsonl", rows[:6])
    history = train_dpo(dpo_cfg(tmp_path, f"data.source={train}", f"data.eval_source={held_out}",
                                "data.num_train=null", "data.num_eval=null", "trainer.lr=1e-2"))
    assert [m["step"] for m in metrics(tmp_path / "run")] == [m["step"] for m in history] == [0, 1, 2, 3]
    assert history[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[-1]["eval/rewards/margin"] > 0 and history[-1]["eval/loss"] < math.log(2)
    enc = encode_pairs(datasets.Dataset.from_list([{"prompt": "<|user|> it was </s> <|assistant|> ",
                                                     "chosen": "good . </s> ", "rejected": "bad . </s> "}]),
                       tok, 64, completion_only=True, chat=True)
    assert enc["loss_mask"][0].sum(-1).tolist() == [3, 3]
    assert tok.convert_ids_to_tokens(enc["input_ids"][0, 0].tolist()) == [
        "<|user|>", "it", "was", "</s>", "<|assistant|>", "good", ".", "</s>"]


# --- log-probs ---


def test_sequence_logps_sum_the_completion_tokens_only(tok):
    """Against log_softmax read token by token: row 0's completion "good ." + EOS is 3 tokens after the 2-token
    prompt "it was", so the sum runs over positions 2, 3, 4, each predicted by the logits one position earlier."""
    model = load_causal_lm("builtin:tiny", tok, seed=0).eval()
    rows = datasets.Dataset.from_list(GOOD)
    enc = encode_pairs(rows, tok, 32, completion_only=True)  # (2, 2, seq_len)
    ids, mask, loss_mask = (enc[k][:, 0] for k in ("input_ids", "attention_mask", "loss_mask"))
    assert loss_mask[0].tolist()[:6] == [0, 0, 1, 1, 1, 0]  # "it was" | "good ." EOS | padding
    with torch.no_grad():
        got = sequence_logps(model, ids, mask, loss_mask)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, -1)
    expected = [sum(float(logp[r, t - 1, ids[r, t]]) for t in range(ids.shape[1]) if loss_mask[r, t])
                for r in range(2)]
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    assert int(loss_mask[1].sum()) == 3  # "superb ." EOS after "the food was"


# --- the stage ---


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def live_and_precomputed(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    live = train_dpo(dpo_cfg(root, "dpo.precompute_ref=false", name="live"))
    pre = train_dpo(dpo_cfg(root, "dpo.precompute_ref=true", name="pre"))
    return root, live, pre


def test_step_0_is_log_2_with_zero_rewards_and_accuracy(live_and_precomputed):
    """policy == reference at step 0, so h = 0 in every pair: -log sigmoid(0) = log 2, implicit rewards 0, and no
    pair has chosen reward > rejected reward (a tie counts as wrong)."""
    _, live, pre = live_and_precomputed
    for first in (live[0], pre[0]):
        for split in ("train", "eval"):
            assert first[f"{split}/loss"] == pytest.approx(math.log(2), abs=1e-6)
            assert first[f"{split}/rewards/margin"] == pytest.approx(0.0, abs=1e-6)
            assert first[f"{split}/rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    # The live reference is the same computation on the same batch: h exactly 0, the loss log 2 in float32
    log2 = float(torch.tensor(math.log(2), dtype=torch.float32))
    for split in ("train", "eval"):
        assert live[0][f"{split}/rewards/margin"] == 0.0 and live[0][f"{split}/rewards/accuracy"] == 0.0
        assert live[0][f"{split}/loss"] == log2
    assert live[0]["train/logps/chosen"] < 0


def test_precomputed_and_live_reference_give_the_same_steps(live_and_precomputed):
    _, live, pre = live_and_precomputed
    assert [m["step"] for m in live] == [m["step"] for m in pre] == [0, 1, 2, 3]
    for a, b in zip(live, pre):
        for key in (k for k in a if not k.startswith("time/")):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert live[1]["train/rewards/margin"] != 0.0  # the steps moved the policy away from the reference


def test_final_is_the_trained_model_and_loads_as_a_causal_lm(live_and_precomputed, tok):
    """final/ reproduces the last held-out log-probs: it is the model after the last update, not the reference."""
    root, live, _ = live_and_precomputed
    model = load_causal_lm(str(root / "live" / "final"), tok).eval()
    cfg = dpo_cfg(root, name="unused")
    from rlhf.trainers.dpo import load_pairs

    held_out = encode_pairs(load_pairs(cfg, eval_split=True), tok, cfg.data.max_length, completion_only=True)
    with torch.no_grad():
        chosen = sequence_logps(model, held_out["input_ids"][:, 0], held_out["attention_mask"][:, 0],
                                held_out["loss_mask"][:, 0])
    assert float(chosen.mean()) == pytest.approx(live[-1]["eval/logps/chosen"], rel=1e-5)
    assert live[-1]["eval/logps/chosen"] != pytest.approx(live[0]["eval/logps/chosen"], rel=1e-5)
    assert metrics(root / "live")[-1]["step"] == 3


@pytest.mark.parametrize("loss, beta, expected", [("ipo", 0.1, 25.0), ("hinge", 0.5, 1.0)])
def test_other_losses_at_step_0(tmp_path, loss, beta, expected):
    """h = 0: IPO's (0 - 1 / (2 * 0.1))^2 = 25, the hinge's max(0, 1 - 0) = 1."""
    history = train_dpo(dpo_cfg(tmp_path, f"dpo.loss={loss}", f"dpo.beta={beta}", "trainer.max_steps=1",
                                "data.num_eval=0", "dpo.precompute_ref=false"))
    assert history[0]["train/loss"] == pytest.approx(expected, rel=1e-6)


def test_a_short_run_learns_the_builtin_preferences(tmp_path):
    history = train_dpo(dpo_cfg(tmp_path, "data.num_train=1024", "data.num_eval=256", "trainer.batch_size=32",
                                "trainer.max_steps=40", "trainer.eval_every=0", "trainer.log_every=10"))
    first, last = history[0], history[-1]
    assert first["eval/rewards/accuracy"] == 0.0
    assert last["eval/rewards/accuracy"] > 0.6, last
    assert last["eval/loss"] < math.log(2)
    assert "held-out preference accuracy 0.0000 -> " in dpo_summary("sigmoid", history, "f")


@pytest.mark.parametrize("lora", [["trainer.lr=1e-2"], ["model.lora.r=4", "trainer.lr=5e-2"]])
def test_frontier_starts_at_exactly_zero_kl_and_moves_with_the_policy(tmp_path, lora):
    """Step 0 samples the untouched policy, which is the reference bit for bit (with LoRA: B = 0), so every summed
    k1 is exactly 0; after the updates the policy's own samples are further from the reference. The measurement is
    on every evaluation line, the last one included (step max_steps), and the summary reports it."""
    history = train_dpo(dpo_cfg(tmp_path, "frontier.num_prompts=48", "frontier.samples=4", *lora,
                                "trainer.max_steps=12", "trainer.eval_every=6"))
    points = [m for m in history if "frontier/kl" in m]
    assert [m["step"] for m in points] == [0, 6, 12]
    assert points[0]["frontier/kl"] == 0.0 and points[0]["frontier/kl_se"] == 0.0
    # a KL the 48 prompts resolve: more than 3 standard errors above 0
    assert points[-1]["frontier/kl"] > 3 * points[-1]["frontier/kl_se"] > 0, points[-1]
    for m in points:
        assert -3.0 < m["frontier/gold_score"] < 1.0 and 0 < m["frontier/length"] <= 12
    assert "gold score of its samples" in dpo_summary("sigmoid", history, "f")


def test_lora_reference_is_the_policy_with_adapters_disabled(tmp_path):
    """B = 0 at the start, so the adapters change nothing and step 0 is log 2; only the adapters train, and the run
    writes the merged model to final/ and the adapters to adapter/."""
    history = train_dpo(dpo_cfg(tmp_path, "model.lora.r=4", "dpo.precompute_ref=false", "trainer.max_steps=2"))
    assert history[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[0]["eval/rewards/accuracy"] == 0.0
    assert history[-1]["eval/rewards/margin"] != 0.0
    assert (tmp_path / "run" / "final" / "config.json").exists()
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()


def test_resuming_a_checkpoint_continues_the_same_run_exactly(tmp_path):
    """A checkpoint at step 2 holds the weights, AdamW and the schedule, and batches are a function of the step, so
    a run resumed from it (in a fresh folder) logs bit for bit what the uninterrupted run logged from step 2 on, and
    saves the same final weights. The reference stays the initial policy (model.policy), not the checkpoint's."""
    from transformers import AutoModelForCausalLM

    steps = ["trainer.max_steps=4", "trainer.save_every=2", "trainer.eval_every=2", "trainer.warmup_steps=1"]
    whole = train_dpo(dpo_cfg(tmp_path, *steps, name="whole"))
    assert sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir()) == ["step_2", "step_4"]
    resumed = train_dpo(dpo_cfg(tmp_path, *steps, f"trainer.resume={tmp_path / 'whole' / 'checkpoints' / 'step_2'}",
                                name="resumed"))
    strip = [{k: v for k, v in m.items() if not k.startswith("time/")} for m in whole if m["step"] >= 2]
    assert [{k: v for k, v in m.items() if not k.startswith("time/")} for m in resumed] == strip
    assert [m["step"] for m in metrics(tmp_path / "resumed")] == [2, 3, 4]
    weights = [AutoModelForCausalLM.from_pretrained(tmp_path / run / "final").state_dict()
               for run in ("whole", "resumed")]
    assert all(torch.equal(weights[1][name], w) for name, w in weights[0].items())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """STAGE_FAST (6 steps, batch 16, evaluations at 0, 3, 6) with UNEVEN (the frontier on 16 prompts x 2 samples,
    65 held-out pairs) and a checkpoint at step 3, on one plain process: (run folder, metric lines)."""
    from tests.test_distributed import STAGE_FAST

    run = tmp_path_factory.mktemp("dpo_one") / "one"
    threads = torch.get_num_threads()
    try:
        return run, train_dpo(validate_dpo_config(compose_config(
            "dpo", [*STAGE_FAST, *UNEVEN, "trainer.save_every=3"], run_dir=str(run))))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_processes_follow_one_process(one_process, tmp_path):
    """The batch (16 pairs) is global: 2 gloo processes take 8 each, the reference log-probs are precomputed with
    each process scoring every other pair, and the held-out pass gathers both halves. A per-pair mean over equal
    shards averages exactly, so the trajectory and the final weights are those of 1 process; and 2 processes resume
    the 1-process checkpoint."""
    from transformers import AutoModelForCausalLM

    from tests.test_distributed import STAGE_FAST, _assert_same_trajectory, _launch

    one_run, one = one_process
    proc = _launch(["scripts/train_dpo.py", "trainer.cpu=true", *STAGE_FAST, *UNEVEN,
                    f"hydra.run.dir={tmp_path / 'two'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = metrics(tmp_path / "two")
    assert [m["step"] for m in two] == list(range(7))
    # it trained (h = 0 in every pair at step 0, not after): the comparison is not of two idle runs
    assert one[0]["eval/rewards/margin"] == 0.0 and one[-1]["eval/rewards/margin"] != 0.0
    # frontier/*: each process samples every other prompt, keyed by the prompt's global index, and the per-prompt
    # means are gathered, so the 2-process measurement is the 1-process one (compared with the rest below). The
    # policy moved: the summed k1 of step 0 is exactly 0, later ones are not (a mean of 32 sampled k1 can be < 0)
    assert one[0]["frontier/kl"] == 0.0 and one[-1]["frontier/kl"] != 0.0 and "frontier/kl" in two[-1]
    _assert_same_trajectory(one, two)
    weights = [AutoModelForCausalLM.from_pretrained(run / "final").state_dict() for run in (one_run, tmp_path / "two")]
    for name, w in weights[0].items():
        torch.testing.assert_close(weights[1][name], w, rtol=1e-4, atol=1e-5)
    # Two processes resume the one-process checkpoint of step 3 and continue its trajectory
    proc = _launch(["scripts/train_dpo.py", "trainer.cpu=true", *STAGE_FAST, *UNEVEN, f"hydra.run.dir={tmp_path / 'res'}",
                    f"trainer.resume={one_run / 'checkpoints' / 'step_3'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_trajectory([m for m in one if m["step"] >= 3], metrics(tmp_path / "res"))


@pytest.mark.slow
def test_fsdp2_two_processes_follow_one_process(one_process, tmp_path):
    """FSDP2 over two gloo processes (tests/fsdp2_worker.py --dpo: accelerate's FSDP2 prepare with
    configs/accelerate/fsdp2.yaml's settings): each process holds half of every policy weight and of AdamW's state,
    the reference is a whole frozen copy on each. The frontier samples decode on the policy's weights gathered once
    (each process decodes its own prompts for its own number of steps); the checkpoint and final/ gather the whole
    weights. The same metrics as one plain process at every step within test_distributed's TOL, frontier/* included,
    and the same final/ and checkpoint weights to float32 rounding."""
    import json

    from transformers import AutoModelForCausalLM

    from tests.test_distributed import STAGE_FAST, _assert_same_trajectory, _launch

    one_run, one = one_process
    run = tmp_path / "fsdp2"
    proc = _launch(["tests/fsdp2_worker.py", "--dpo", str(run), "trainer.cpu=true", *STAGE_FAST, *UNEVEN,
                    "trainer.save_every=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = metrics(run)
    assert [m["step"] for m in two] == list(range(7))
    frontier = {"frontier/kl", "frontier/kl_se", "frontier/gold_score", "frontier/gold_se", "frontier/length"}
    assert all(frontier <= m.keys() for m in two if m["step"] in (0, 3, 6))
    assert one[-1]["frontier/kl"] != 0.0 and one[-1]["eval/rewards/margin"] != 0.0  # the policy moved
    _assert_same_trajectory(one, two)
    weights = [AutoModelForCausalLM.from_pretrained(r / "final").state_dict() for r in (one_run, run)]
    assert weights[1].keys() == weights[0].keys()
    for name, w in weights[0].items():
        assert weights[1][name].shape == w.shape, name  # whole tensors, not one process's half
        torch.testing.assert_close(weights[1][name], w, rtol=1e-4, atol=1e-5, msg=name)
    config = json.loads((run / "final" / "config.json").read_text())
    assert not any(a.startswith("FSDP") for a in config["architectures"])  # loadable by class name
    ckpts = [torch.load(r / "checkpoints" / "step_3" / "module.pt") for r in (one_run, run)]
    assert ckpts[1].keys() == ckpts[0].keys()
    for name, w in ckpts[0].items():
        torch.testing.assert_close(ckpts[1][name], w, rtol=1e-4, atol=1e-5, msg=name)
