"""rlhf.analysis.evaluate and scripts/evaluate.py: pass@k against brute force, evaluate_policy on the tiny model
(greedy checked against a hand-written argmax loop, scores recomputed from the returned completions), determinism,
the checkpoint folder, the config's one-line errors and the script end to end."""

import itertools
import json
import math

import pytest
import torch

from rlhf.analysis.evaluate import (
    evaluate_policy,
    evaluation_records,
    pass_at_k,
    policy_folder,
    summarize,
    validate_eval_config,
)
from rlhf.chat import format_prompts
from rlhf.config import ConfigError
from rlhf.data import load_prompts
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.rollout.spec import SamplingSpec
from tests.conftest import ROOT, compose_config, run_script


def word_count(prompts, completions):
    """Reward: words in the completion."""
    return [float(len(c.split())) for c in completions]


def even_words(prompts, completions):
    """Correctness: 1 when the completion has an even number of words (a random model gets about half)."""
    return [float(len(c.split()) % 2 == 0) for c in completions]


# ---------------------------------------------------------------------- pass@k
def brute_force_pass_at_k(n, c, k):
    """Share of the k-subsets of n completions (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_is_the_share_of_k_subsets_with_a_correct_completion(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases():
    assert pass_at_k(5, 0, 3) == 0.0                     # nothing correct
    assert pass_at_k(5, 5, 1) == 1.0                     # everything correct
    assert pass_at_k(5, 3, 3) == 1.0                     # n - c = 2 < k: every 3-subset holds a correct one
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)      # 1 - C(3, 2) / C(5, 2) = 1 - 3 / 10
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)    # pass@1 is the share correct
    # C(2000, 1000) overflows a float; the product does not: 1 - (1000/2000)(999/1999) ... with 1 correct = k/n
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5)
    for bad in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)
    with pytest.raises(TypeError):
        pass_at_k(4.0, 2, 1)


def test_summarize_worked_example():
    records = [  # two prompts, 4 samples each; correct counts 1 and 4
        {"greedy_correct": True, "greedy_reward": 1.0, "greedy_gold": None, "greedy_length": 3,
         "samples": ["a"] * 4, "sample_rewards": [0.0, 1.0, 0.0, 0.0], "sample_lengths": [1, 2, 3, 4], "correct": 1},
        {"greedy_correct": False, "greedy_reward": 0.0, "greedy_gold": None, "greedy_length": 5,
         "samples": ["b"] * 4, "sample_rewards": [1.0] * 4, "sample_lengths": [2] * 4, "correct": 4},
    ]
    m = summarize(records, [1, 2])
    assert "gold" not in m
    assert m["prompts"] == 2 and m["accuracy"] == 0.5 and m["reward"] == 0.5 and m["length"] == 4.0
    assert m["pass@1"] == pytest.approx((1 / 4 + 1) / 2)                # 0.625
    assert m["pass@2"] == pytest.approx(((1 - 3 / 6) + 1) / 2)          # 1 - C(3,2)/C(4,2) = 0.5, then 1: 0.75
    assert m["sample_reward"] == pytest.approx(5 / 8) and m["sample_length"] == pytest.approx(18 / 8)


# ---------------------------------------------------------------------- evaluate_policy on the tiny model
@pytest.fixture(scope="module")
def tiny():
    tok = load_tokenizer("builtin:words")
    model = load_causal_lm("builtin:tiny", tok, seed=0)
    prompts = load_prompts("builtin:sentiment", split="test", n=5, seed=0)
    return model, tok, prompts


SPEC = SamplingSpec(max_new_tokens=6, sampler="counter")
KW = dict(samples=4, spec=SPEC, seed=0, batch_size=2, device="cpu")


def manual_greedy(model, tok, prompt, max_new_tokens):
    """Argmax one token at a time over the whole sequence (no KV cache, no padding); the ids up to EOS."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def test_records_hold_greedy_argmax_completions_and_their_scores(tiny):
    model, tok, prompts = tiny
    records = evaluation_records(model, tok, prompts, prompts, even_words, word_count, **KW)
    assert [r["prompt"] for r in records] == prompts
    for r in records:
        ids = manual_greedy(model, tok, r["prompt"], SPEC.max_new_tokens)
        assert r["greedy"] == tok.decode(ids, skip_special_tokens=True)
        assert r["greedy_length"] == len(ids)
        # the scores are the functions of the decoded completions, and correct = gold >= 0.5
        assert r["greedy_reward"] == len(r["greedy"].split())
        assert r["greedy_gold"] == float(len(r["greedy"].split()) % 2 == 0)
        assert r["greedy_correct"] == (r["greedy_gold"] == 1.0)
        assert len(r["samples"]) == 4
        assert r["sample_rewards"] == [len(s.split()) for s in r["samples"]]
        assert r["correct"] == sum(len(s.split()) % 2 == 0 for s in r["samples"])
        assert all(1 <= n <= SPEC.max_new_tokens for n in r["sample_lengths"])
    assert 0 < sum(r["correct"] for r in records) < 20  # the check below is not vacuous


def test_evaluate_policy_metrics_follow_from_the_completions(tiny):
    model, tok, prompts = tiny
    records = evaluation_records(model, tok, prompts, prompts, even_words, word_count, **KW)
    m = evaluate_policy(model, tok, prompts, prompts, even_words, word_count, ks=[1, 2, 4], **KW)
    greedy_words = [len(r["greedy"].split()) for r in records]
    assert m["prompts"] == 5
    assert m["accuracy"] == pytest.approx(sum(w % 2 == 0 for w in greedy_words) / 5)
    assert m["reward"] == pytest.approx(sum(greedy_words) / 5)
    for k in (1, 2, 4):
        brute = [brute_force_pass_at_k(4, r["correct"], k) for r in records]
        assert m[f"pass@{k}"] == pytest.approx(sum(brute) / 5)
    assert m["sample_reward"] == pytest.approx(sum(len(s.split()) for r in records for s in r["samples"]) / 20)


def test_without_a_gold_function_correct_means_reward_at_least_threshold(tiny):
    model, tok, prompts = tiny
    records = evaluation_records(model, tok, prompts, prompts, None, word_count, threshold=4, **KW)
    m = summarize(records, [1])
    assert "gold" not in m
    assert m["accuracy"] == pytest.approx(sum(len(r["greedy"].split()) >= 4 for r in records) / 5)
    assert m["pass@1"] == pytest.approx(sum(len(s.split()) >= 4 for r in records for s in r["samples"]) / 20)


def test_same_seed_same_metrics_any_batch_size_and_train_mode_restored(tiny):
    model, tok, prompts = tiny
    model.train()
    a = evaluate_policy(model, tok, prompts, prompts, even_words, word_count, ks=[1, 4], **KW)
    assert model.training and all(p.grad is None for p in model.parameters())
    b = evaluate_policy(model, tok, prompts, prompts, even_words, word_count, ks=[1, 4],
                        **{**KW, "batch_size": 5})  # counter keys follow the prompt, not the batch
    assert a == b
    model.eval()
    other = evaluation_records(model, tok, prompts, prompts, even_words, word_count, **{**KW, "seed": 1})
    mine = evaluation_records(model, tok, prompts, prompts, even_words, word_count, **KW)
    assert [r["samples"] for r in other] != [r["samples"] for r in mine]
    assert [r["greedy"] for r in other] == [r["greedy"] for r in mine]  # greedy does not depend on the seed


def test_functions_get_plain_prompts_when_the_model_sees_chat_formatted_ones(tiny):
    model, tok, prompts = tiny
    seen = []

    def spy(ps, cs):
        seen.extend(ps)
        return [0.0] * len(cs)

    formatted = format_prompts(tok, prompts, True)
    assert formatted[0] == f"<|user|> {prompts[0]} </s> <|assistant|> "
    evaluate_policy(model, tok, prompts, formatted, None, spy, ks=[1], add_special_tokens=False, **KW)
    assert set(seen) == set(prompts) and len(seen) == 5 * (1 + 4)


def test_greedy_only(tiny):
    model, tok, prompts = tiny
    m = evaluate_policy(model, tok, prompts, prompts, even_words, word_count, ks=[], **{**KW, "samples": 0})
    assert set(m) == {"prompts", "accuracy", "reward", "gold", "length"}


def test_evaluate_policy_refuses_a_k_above_samples(tiny):
    model, tok, prompts = tiny
    with pytest.raises(ValueError, match="k=8"):
        evaluate_policy(model, tok, prompts, prompts, even_words, None, ks=[8], **KW)


# ---------------------------------------------------------------------- config and checkpoint folders
def test_a_checkpoint_folder_resolves_to_its_policy_folder(tmp_path):
    step = tmp_path / "checkpoints" / "step_3"
    (step / "policy").mkdir(parents=True)
    (step / "policy" / "config.json").write_text("{}")
    assert policy_folder(str(step)) == str(step / "policy")
    assert policy_folder(str(step / "policy")) == str(step / "policy")
    assert policy_folder("builtin:tiny") == "builtin:tiny"
    assert policy_folder("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def compose_eval(*overrides):
    return compose_config("evaluate", overrides, run_dir="unused")


def test_the_default_config_resolves_the_builtin_tasks_functions():
    cfg = validate_eval_config(compose_eval())
    assert cfg.reward.function == "rlhf.tasks.sentiment.reward_fn"
    assert cfg.reward.gold == "rlhf.tasks.sentiment.gold_fn"
    assert cfg.data.split == "test" and list(cfg.eval.ks) == [1, 8]  # eval.ks null: [1, eval.samples]
    assert list(validate_eval_config(compose_eval("eval.samples=4")).eval.ks) == [1, 4]
    assert list(validate_eval_config(compose_eval("eval.samples=1")).eval.ks) == [1]
    assert list(validate_eval_config(compose_eval("eval.samples=0")).eval.ks) == []


@pytest.mark.parametrize("overrides, message", [
    (["eval.ks=[1,16]"], r"^eval\.ks: k=16 is not in \[1, eval\.samples=8\]$"),
    (["eval.samples=0", "eval.ks=[1]"], r"^eval\.ks: k=1 is not in \[1, eval\.samples=0\]$"),
    (["eval.ks=[1,1]"], r"^eval\.ks: \[1, 1\] repeats a k$"),
    (["data.prompts=held_out.jsonl"], r"^reward\.function: nothing to score with"),
    (["reward.function=no.such.fn"], r"^reward\.function: cannot import"),
    (["data.chat_template=maybe"], r"^data\.chat_template: 'maybe' is not one of auto, true, false$"),
    (["data.chat_template=false", "data.system_prompt=hi"], r"^data\.system_prompt: needs chat formatting"),
    (["+eval.foo=1"], r"^eval\.foo: unknown key$"),
    (["eval.temperature=0"], r"^eval\.temperature: must be > 0$"),
    (["model.policy=/no/such/folder"], r"^model\.policy: folder '/no/such/folder' does not exist$"),
    (["eval.mixed_precision=fp16"], r"^eval\.mixed_precision: 'fp16' is not one of no, bf16$"),
])
def test_bad_configs_fail_in_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_eval_config(compose_eval(*overrides))


def test_script_evaluates_a_checkpoint_on_a_prompt_file(tmp_path):
    tok = load_tokenizer("builtin:words")
    step = tmp_path / "checkpoints" / "step_2"
    model = load_causal_lm("builtin:tiny", tok, seed=3)
    model.save_pretrained(step / "policy")
    tok.save_pretrained(step / "policy")
    prompts = ["the food was", "overall the service is", "my coffee seemed"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    out = tmp_path / "out" / "metrics.json"
    result = run_script(["scripts/evaluate.py", f"model.policy={step}", f"data.prompts={tmp_path / 'prompts.jsonl'}",
                         "data.prompt_column=text", "reward.function=tests.test_evaluate.word_count",
                         "eval.samples=3", "eval.ks=[1,3]", "eval.max_new_tokens=5", "eval.threshold=3",
                         "eval.progress=false", f"eval.output={out}", f"hydra.run.dir={tmp_path / 'run'}"],
                        timeout=120, env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    m = saved["metrics"]
    assert saved["config"]["model"]["policy"] == str(step / "policy")
    assert saved["config"]["reward"]["gold"] is None and saved["chat_template"] is False
    assert set(m) == {"prompts", "accuracy", "reward", "length", "pass@1", "pass@3", "sample_reward",
                      "sample_length"}
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics_records.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == prompts
    assert m["reward"] == pytest.approx(sum(len(r["greedy"].split()) for r in records) / 3)
    assert m["accuracy"] == pytest.approx(sum(len(r["greedy"].split()) >= 3 for r in records) / 3)
    row = result.stdout.strip().splitlines()[-1]
    assert row.startswith(f"| {step / 'policy'} | {tmp_path / 'prompts.jsonl'}:test | 3 | ")
    assert math.isclose(float(row.split(" | ")[3]), m["accuracy"], abs_tol=1e-3)
