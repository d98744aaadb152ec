"""reward.timeout_s: a reward function (reward.function or reward.gold) that never returns stops the run with one
line naming the key, the function and the limit, instead of hanging the training job.

The call runs in a daemon thread that is waited for at most timeout_s seconds (rlhf.rollout.call_reward_function);
timeout_s=None calls the function directly, in the caller's thread.
"""

import os
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from rlhf.rewards.functions import RewardFunctionError, call_reward_function
from rlhf.rewards.scoring import score_responses
from tests.conftest import FAST, run_script

PROMPTS, COMPLETIONS = ["p", "q"], ["a", "bbb"]


def lengths(prompts, completions):
    return [float(len(c)) for c in completions]


def sleeps(prompts, completions):
    time.sleep(5)
    return [0.0] * len(completions)


def test_a_hanging_reward_function_times_out_naming_it():
    # The function sleeps 5 s; with timeout_s=0.2 the caller stops waiting after 0.2 s. 1 s leaves room for thread
    # start-up on a busy 2-core machine while staying far below the 5 s a caller that waited would take.
    start = time.monotonic()
    with pytest.raises(RewardFunctionError) as e:
        call_reward_function(sleeps, "my.module.sleeps", PROMPTS, COMPLETIONS, timeout_s=0.2)
    elapsed = time.monotonic() - start
    assert elapsed < 1.0, elapsed
    msg = str(e.value)
    # The default key is reward.function; the message names the function (its dotted name as configured) and the
    # limit as the user wrote it (0.2, formatted with :g), and is one line, as every user error the scripts print.
    assert msg.startswith("reward.function: reward function my.module.sleeps "), msg
    assert "reward.timeout_s=0.2 s" in msg and "\n" not in msg


def test_the_gold_scorer_times_out_under_its_own_key():
    with pytest.raises(RewardFunctionError, match=r"^reward.gold: reward function my.gold did not return within "
                                                  r"reward.timeout_s=0.1 s"):
        call_reward_function(sleeps, "my.gold", PROMPTS, COMPLETIONS, timeout_s=0.1, key="reward.gold")


@pytest.mark.parametrize("as_tensor", [False, True])
def test_a_fast_function_with_a_timeout_returns_what_it_returns_without(as_tensor):
    # The timeout only changes where the call runs: the checked (N,) float32 result must be identical.
    def fn(prompts, completions):
        out = lengths(prompts, completions)
        return torch.tensor(out, dtype=torch.float64) if as_tensor else out

    direct = call_reward_function(fn, "fn", PROMPTS, COMPLETIONS)
    timed = call_reward_function(fn, "fn", PROMPTS, COMPLETIONS, timeout_s=30)
    assert timed.dtype == direct.dtype == torch.float32
    torch.testing.assert_close(timed, direct, rtol=0, atol=0)
    assert timed.tolist() == [1.0, 3.0]  # len("a"), len("bbb")


@pytest.mark.parametrize("timeout_s", [None, 30])
def test_an_exception_inside_still_gives_the_old_message(timeout_s):
    # Raised in the worker thread, re-raised in the caller: same message as a direct call (tests/test_rollout.py,
    # tests/test_reliability.py assert "reward function <name> raised <Type>: <message>"), with the cause kept.
    def fn(prompts, completions):
        return {}["missing"]

    with pytest.raises(RewardFunctionError) as e:
        call_reward_function(fn, "my.module.fn", PROMPTS, COMPLETIONS, timeout_s=timeout_s)
    assert str(e.value) == "reward function my.module.fn raised KeyError: 'missing'"
    assert isinstance(e.value.__cause__, KeyError)


@pytest.mark.parametrize("timeout_s", [None, 30])
def test_bad_returns_keep_their_messages(timeout_s):
    # The result is checked in the caller, so the other failures read as before (without the key prefix).
    with pytest.raises(RewardFunctionError, match=r"^reward function f returned 1 scores for 2 completions$"):
        call_reward_function(lambda p, c: [1.0], "f", PROMPTS, COMPLETIONS, timeout_s=timeout_s)


def test_no_timeout_calls_the_function_directly():
    # timeout_s=None: no thread at all, the function runs in the caller's thread.
    seen = []

    def fn(prompts, completions):
        seen.append(threading.current_thread())
        return lengths(prompts, completions)

    assert call_reward_function(fn, "fn", PROMPTS, COMPLETIONS, timeout_s=None).tolist() == [1.0, 3.0]
    assert seen == [threading.current_thread()]


def test_the_worker_thread_is_a_daemon_and_sees_the_callers_grad_mode():
    # A daemon thread does not keep the interpreter alive after a timeout; grad mode is thread-local in torch, so
    # it is carried over (a reward function calling a model under the trainer's no_grad must not build a graph).
    seen = []

    def fn(prompts, completions):
        seen.append((threading.current_thread().daemon, torch.is_grad_enabled()))
        return lengths(prompts, completions)

    with torch.no_grad():
        call_reward_function(fn, "fn", PROMPTS, COMPLETIONS, timeout_s=30)
    call_reward_function(fn, "fn", PROMPTS, COMPLETIONS, timeout_s=30)
    assert seen == [(True, False), (True, True)]


def test_the_thread_costs_little():
    # The trainer calls the reward function once per step; starting and joining a thread must cost well under the
    # 10 ms that would matter beside a rollout. 200 calls (0.2 s budget on average 1 ms each) is generous.
    start = time.perf_counter()
    for _ in range(200):
        call_reward_function(lengths, "lengths", PROMPTS, COMPLETIONS, timeout_s=30)
    assert (time.perf_counter() - start) / 200 < 0.01


class _Tokenizer:
    """What score_responses needs of a tokenizer: batch_decode and eos_token_id."""

    eos_token_id = None

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["x" * len(r) for r in rows]


def _score(reward_cfg, reward_fn, gold_fn=None):
    ids = torch.ones(2, 3, dtype=torch.long)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    return score_responses(None, _Tokenizer(), None, reward_cfg, reward_fn, gold_fn, PROMPTS, ids, mask, ids, mask)


def _reward_cfg(**fields):
    return SimpleNamespace(function="my.fn", gold="my.gold", function_weight=1.0, model_weight=1.0,
                           missing_eos_penalty=None, clip=None, **fields)


def test_score_responses_passes_reward_timeout_to_function_and_gold():
    # Completions are "x" and "xxx" (the mask's lengths), so `lengths` scores them 1 and 3.
    scores, gold, _ = _score(_reward_cfg(timeout_s=30), lengths, lengths)
    assert scores.tolist() == [1.0, 3.0] and gold.tolist() == [1.0, 3.0]
    with pytest.raises(RewardFunctionError, match=r"^reward.function: reward function my.fn .*timeout_s=0.1 s"):
        _score(_reward_cfg(timeout_s=0.1), sleeps, lengths)
    with pytest.raises(RewardFunctionError, match=r"^reward.gold: reward function my.gold .*timeout_s=0.1 s"):
        _score(_reward_cfg(timeout_s=0.1), lengths, sleeps)


def test_score_responses_without_the_field_has_no_limit():
    # A reward section without timeout_s (older or hand-built configs) still works: no limit, direct call.
    seen = []

    def fn(prompts, completions):
        seen.append(threading.current_thread())
        return lengths(prompts, completions)

    scores, gold, _ = _score(_reward_cfg(), fn)
    assert scores.tolist() == [1.0, 3.0] and gold is None
    assert seen == [threading.current_thread()]


@pytest.mark.slow
def test_a_hanging_reward_function_stops_the_script(tmp_path):
    """As a user runs it: reward.function names a module on PYTHONPATH whose score() never returns. With
    reward.timeout_s=1 the first step's scoring gives up after 1 s; RewardFunctionError is a user error, so
    scripts/train_policy.py prints one `error: ...` line (rlhf.runtime.errors.exit_on_user_error) and exits 2, and the
    still-sleeping daemon thread does not keep the process alive."""
    (tmp_path / "hang.py").write_text("import time\n\n\ndef score(prompts, completions):\n    time.sleep(3600)\n")
    pythonpath = os.pathsep.join(p for p in [str(tmp_path), os.environ.get("PYTHONPATH", "")] if p)
    start = time.monotonic()
    proc = run_script(["scripts/train_policy.py", "reward.function=hang.score", "reward.timeout_s=1",
                       "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}", *FAST, "trainer.torch_threads=1"],
                      timeout=300, env={"PYTHONPATH": pythonpath})
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: reward.function: reward function hang.score "), last
    assert "timeout_s" in last
    assert "Traceback" not in proc.stderr
    # Start-up (imports, tiny model) takes a few seconds, plus 1 s of waiting; a run that waited for the sleep
    # (1 h) or for the daemon thread at exit would be killed by run_script's 300 s timeout instead.
    assert elapsed < 60, elapsed
