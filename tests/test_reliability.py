"""Reliability: bad input fails early with one line, faults are skipped or reported, and a stopped or killed run
resumes without losing a step.

Each test injects one fault and checks what the user sees (one line naming the key, file or column; an exit code)
and what is left on disk (a complete checkpoint, metrics that read as if the run had never stopped). Subprocess tests
run scripts/train_policy.py exactly as a user would.
"""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf.config import ConfigError, validate_policy_config
from rlhf.runtime.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    check_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
)
from tests.conftest import FAST, ROOT, compose_policy, run_script

# One thread keeps float reductions in one order (bit-identical reruns) and shares the 2 CPU cores politely.
ONE_THREAD = "trainer.torch_threads=1"
SCRIPT = "scripts/train_policy.py"
# A prompt file of the user's gets no built-in reward (reward.function=auto is none there): these tests name it.
SENTIMENT = "reward.function=rlhf.tasks.sentiment.reward_fn"


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _trainer(run_dir, *overrides):
    from rlhf.trainers.policy import PolicyTrainer

    return PolicyTrainer(validate_policy_config(compose_policy([*FAST, ONE_THREAD, *overrides],
                                                               run_dir=str(run_dir))))


def _no_model_load(monkeypatch):
    """Make any weight loading fail loudly, to prove an error came before it."""
    import rlhf.trainers.policy_setup

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input error was found")

    monkeypatch.setattr(rlhf.trainers.policy_setup, "load_causal_lm", refuse)
    monkeypatch.setattr(rlhf.trainers.policy_setup, "load_score_model", refuse)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _comparable(rows: list[dict]) -> list[dict]:
    """Metric rows without wall-clock and memory keys, which legitimately differ between runs."""
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "memory/"))} for r in rows]


def _read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- 1. input validation
def test_unknown_key_without_plus_is_one_line_through_the_script(tmp_path):
    """Without a '+', Hydra itself rejects the key (multi-line report, exit 1); the entry point makes it one line."""
    proc = run_script([SCRIPT, "trainer.foo=1", f"hydra.run.dir={tmp_path}"], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: trainer.foo: unknown key"]


def test_a_home_folder_typed_with_a_tilde_reaches_the_model_check(tmp_path):
    """`model.policy=~/x`: the shell does not expand a tilde after '=', and Hydra cannot parse it; the entry point
    expands it, so the user gets the folder check on their home folder, not a lexer error."""
    home = tmp_path / "home"
    home.mkdir()
    proc = run_script([SCRIPT, "model.policy=~/no_such_model", f"hydra.run.dir={tmp_path}/run"], timeout=120,
                      env={**os.environ, "HOME": str(home)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: model.policy: folder '{home}/no_such_model' does not exist"], proc.stderr


def test_expand_home_touches_only_a_value_that_starts_with_a_tilde():
    from rlhf.runtime.errors import expand_home

    home = os.path.expanduser("~")
    assert expand_home(["model.policy=~/m", "+x=~", "s=a,~/b", "~kl.beta", "c=~x", "d=a~/b", "--multirun"]) == [
        f"model.policy={home}/m", f"+x={home}", f"s=a,{home}/b", "~kl.beta", "c=~x", "d=a~/b", "--multirun"]


@pytest.mark.parametrize("override, message", [
    ("trainer.foo=1", "trainer.foo: unknown key"),
    ("model=nope", "model: unknown option 'nope'; valid: "),
    ("kl.beta=[", "kl.beta=[: cannot parse this override"),
])
def test_hydra_composition_errors_become_one_line(override, message):
    from hydra.errors import HydraException

    from rlhf.runtime.errors import hydra_error_message

    with pytest.raises(HydraException) as e:
        compose_policy([override])
    text = hydra_error_message(e.value)
    assert text.startswith(message), text
    assert "\n" not in text


# Cases test_config.py does not already cover; each message starts with the key to change.
@pytest.mark.parametrize("overrides, message", [
    (["rollout.max_new_tokens=many"], "rollout.max_new_tokens: Value 'many'"),
    (["rollout.max_new_tokens=-3"], "rollout.max_new_tokens: must be > 0"),
    (["kl.target=-1"], "kl.target: must be > 0, got -1.0"),
    # 16 prompts x 4 samples = 64 rollouts; 2 minibatches x 3 micro-batches = 6 does not divide 64
    (["trainer.minibatches=2", "trainer.grad_accum=3"], "trainer.minibatches: 64 rollouts per process"),
    (["data.num_prompts=0"], "data.num_prompts: must be > 0"),
    (["trainer.max_nonfinite_steps=-1"], "trainer.max_nonfinite_steps: must be >= 0"),
])
def test_more_bad_values_name_the_key(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as e:
        validate_policy_config(compose_policy(overrides, run_dir=str(tmp_path)))
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("rows, message", [
    ([], "split 'train' is empty"),
    ([{"text": "the food was good"}], "has no column 'prompt'; available columns: text"),
    # 70 words are 70 tokens for the word tokenizer (it adds no special tokens): above the default limit of 64
    ([{"prompt": "the food"}, {"prompt": " ".join(["good"] * 70)}],
     "data.max_prompt_length: prompt 1 (0-based) of '{file}' has 70 tokens > 64; prompts are refused, not truncated"),
])
def test_data_errors_come_before_any_model_loads(rows, message, tmp_path, monkeypatch):
    from rlhf.data import DataError

    file = _write_jsonl(tmp_path / "prompts.jsonl", rows)
    _no_model_load(monkeypatch)
    with pytest.raises(DataError) as e:
        _trainer(tmp_path / "run", f"data.prompts={file}", SENTIMENT)
    assert message.format(file=file) in str(e.value)
    assert str(file) in str(e.value) and "\n" not in str(e.value)


def test_prompt_limit_beyond_the_context_fails_before_loading(tmp_path, monkeypatch):
    # builtin:tiny has max_position_embeddings = 256, and 251 + 6 new tokens = 257 > 256
    _no_model_load(monkeypatch)
    with pytest.raises(ConfigError, match=r"^data.max_prompt_length: 251 \+ rollout.max_new_tokens 6 exceeds the "
                                          r"policy's context of 256 tokens"):
        _trainer(tmp_path / "run", "data.max_prompt_length=251")


def test_missing_column_through_the_script_is_one_line(tmp_path):
    file = _write_jsonl(tmp_path / "p.jsonl", [{"text": "the food was good"}])
    proc = run_script([SCRIPT, *FAST, f"data.prompts={file}", SENTIMENT, f"hydra.run.dir={tmp_path / 'run'}"],
                      timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: '{file}' has no column 'prompt'; available columns: text")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    from rlhf.models import load_tokenizer
    from rlhf.tokenizers import builtin_tokenizer

    tok = builtin_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"))
    # the word tokenizer's ids: <pad> 0, <s> 1, </s> 2; with no pad, pad becomes </s>
    assert (loaded.pad_token, loaded.pad_token_id) == ("</s>", 2)

    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the food was good"}, {"prompt": "it was"}] * 2)
    trainer = _trainer(tmp_path / "run", f"model.tokenizer={tmp_path / 'tok'}", f"data.prompts={prompts}", SENTIMENT)
    ro = trainer.generate(trainer.prompt_batch(0), 0, 0)[0]
    # "it was" is 2 tokens left-padded to 4: its first 2 positions are pad (= eos id 2) with mask 0
    short = ro.query_mask.sum(-1) == 2
    assert short.any()
    assert ro.query_ids[short][:, :2].eq(2).all() and ro.query_mask[short][:, :2].eq(0).all()


def _save_score_model(folder: Path, num_labels: int) -> None:
    from transformers import AutoModelForSequenceClassification

    from rlhf.models import _builtin_config, load_tokenizer

    tok = load_tokenizer("builtin:words")
    AutoModelForSequenceClassification.from_config(_builtin_config("tiny", tok, num_labels=num_labels)) \
        .save_pretrained(folder)
    tok.save_pretrained(folder)


def test_reward_model_needs_exactly_one_label_before_anything_loads(tmp_path):
    _save_score_model(tmp_path / "rm2", num_labels=2)
    with pytest.raises(ConfigError, match=r"^model.reward: '.*rm2' has 2 labels; a reward or value model needs "
                                          "exactly 1$"):
        validate_policy_config(compose_policy([f"model.reward={tmp_path / 'rm2'}"], run_dir=str(tmp_path)))


def test_causal_lm_is_not_a_reward_model(tmp_path):
    from rlhf.models import load_causal_lm, load_tokenizer

    load_causal_lm("builtin:tiny", load_tokenizer("builtin:words")).save_pretrained(tmp_path / "lm")
    with pytest.raises(ConfigError, match=r"^model.value: '.*lm' is a LlamaForCausalLM; a reward or value model"):
        validate_policy_config(compose_policy([f"model.value={tmp_path / 'lm'}"], run_dir=str(tmp_path)))


def test_bad_reward_function_fails_through_the_trainer_naming_it(tmp_path):
    from rlhf.rewards.functions import RewardFunctionError

    trainer = _trainer(tmp_path / "run", "trainer.max_steps=1")
    bad = {
        "raises": (lambda p, c: {}["missing"], "raised KeyError"),
        "nan": (lambda p, c: [math.nan] * len(c), "returned a non-finite score (nan) for completion 0"),
        "inf": (lambda p, c: [0.0] + [math.inf] * (len(c) - 1), "returned a non-finite score (inf) for completion 1"),
        "short": (lambda p, c: [0.0], "returned 1 scores for 8 completions"),  # 4 prompts x 2 samples
        "str": (lambda p, c: "good", "returned str; expected a list of floats"),
    }
    for fn, fragment in bad.values():
        trainer.rewards["function"].fn = fn
        with pytest.raises(RewardFunctionError) as e:
            trainer.train_step(0)
        assert str(e.value).startswith("reward function rlhf.tasks.sentiment.reward_fn ") and fragment in str(e.value)


@pytest.mark.parametrize("resume, message", [
    ("{tmp}/nope", "trainer.resume: checkpoint folder '{tmp}/nope' does not exist"),
    ("{tmp}/half", "trainer.resume: checkpoint '{tmp}/half' is incomplete (no COMPLETE)"),
])
def test_bad_resume_folder_fails_before_any_model_loads(resume, message, tmp_path, monkeypatch):
    (tmp_path / "half" / "policy").mkdir(parents=True)
    (tmp_path / "half" / "policy" / "config.json").write_text("{}")
    _no_model_load(monkeypatch)
    with pytest.raises(CheckpointError) as e:
        _trainer(tmp_path / "run", f"trainer.resume={resume.format(tmp=tmp_path)}")
    assert str(e.value) == message.format(tmp=tmp_path)


# ---------------------------------------------------------------------------------------------- 2. faults
@pytest.mark.parametrize("where", ["loss", "reward_model"])
def test_nonfinite_steps_are_skipped_then_stop_the_run(where, tmp_path, monkeypatch):
    """NaN/inf at steps 0 and 2 with trainer.max_nonfinite_steps=1: step 0 is skipped (weights unchanged), step 1
    trains, step 2 is the second skip (2 > 1) and stops the run with an error naming the key."""
    import rlhf.rewards.scoring

    overrides = ["trainer.max_steps=3", "trainer.max_nonfinite_steps=1", "trainer.warmup_steps=0"]
    if where == "reward_model":
        _save_score_model(tmp_path / "rm", num_labels=1)
        overrides += [f"model.reward={tmp_path / 'rm'}", "algorithm=rloo"]
    trainer = _trainer(tmp_path / "run", *overrides)
    bad_steps, current, snapshots = {0, 2}, [0], []

    if where == "loss":
        micro_loss = trainer._micro_loss

        def poisoned(*args):
            loss, stats, share = micro_loss(*args)
            return (loss * math.nan if current[0] in bad_steps else loss), stats, share

        trainer._micro_loss = poisoned
    else:
        rm_scores = rlhf.rewards.scoring.reward_model_scores

        def poisoned(*args):
            scores = rm_scores(*args)
            return torch.full_like(scores, math.inf) if current[0] in bad_steps else scores

        monkeypatch.setattr(rlhf.rewards.scoring, "reward_model_scores", poisoned)

    train_step = trainer.train_step

    def tracked(step):
        current[0] = step
        metrics = train_step(step)
        snapshots.append(_params(trainer.policy))
        return metrics

    trainer.train_step = tracked
    before = _params(trainer.policy)
    with pytest.warns(UserWarning) as caught, pytest.raises(
            rlhf.trainers.policy.TrainingError, match=r"^trainer.max_nonfinite_steps: 2 steps skipped for NaN/inf \(last: step 2"):
        trainer.train()
    what = "a non-finite loss or gradient" if where == "loss" else f"model.reward {tmp_path / 'rm'} returned a " \
        "non-finite score"
    assert [str(w.message) for w in caught if "update skipped" in str(w.message)] == [
        f"step 0: {what}; update skipped (1 of at most trainer.max_nonfinite_steps=1)",
        f"step 2: {what}; update skipped (2 of at most trainer.max_nonfinite_steps=1)"]
    assert all(torch.equal(before[n], snapshots[0][n]) for n in before)          # step 0 moved nothing
    assert any(not torch.equal(before[n], snapshots[1][n]) for n in before)      # step 1 trained
    assert all(torch.isfinite(p).all() for p in snapshots[1].values())
    rows = _read_metrics(tmp_path / "run")
    assert [r["nonfinite_steps"] for r in rows] == [1, 1]  # step 2 raised before it was logged
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_checkpoint_with_nonfinite_weights_is_never_written(tmp_path):
    from rlhf.trainers.policy import TrainingError

    trainer = _trainer(tmp_path / "run")
    trainer.save(1)
    next(trainer.policy.parameters()).data[0] = math.nan
    with pytest.raises(TrainingError, match="^policy weights are not finite at step 2; checkpoint not written"):
        trainer.save(2)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(root)) == ["step_1"]
    check_checkpoint(str(root / "step_1"))


@pytest.mark.parametrize("target, error", [
    ("torch.save", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
    # safetensors reports a full disk as its own exception type, not as an OSError
    ("save_pretrained", RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")),
])
def test_full_disk_names_run_dir_and_keeps_the_previous_checkpoint(target, error, tmp_path, monkeypatch):
    trainer = _trainer(tmp_path / "run")
    trainer.save(1)

    def full(*args, **kwargs):
        raise error

    if target == "torch.save":
        monkeypatch.setattr(torch, "save", full)
    else:
        monkeypatch.setattr(type(trainer.acc.unwrap_model(trainer.policy)), "save_pretrained", full)
    with pytest.raises(CheckpointWriteError) as e:
        trainer.save(2)
    msg = str(e.value)
    assert msg.startswith(f"run_dir: writing checkpoint {tmp_path / 'run' / 'checkpoints' / 'step_2'} failed (")
    assert "No space left on device" in msg and "The previous checkpoint is intact" in msg and "\n" not in msg
    root = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(root)) == ["step_1"]  # no step_2, no step_2.tmp
    check_checkpoint(str(root / "step_1"))


def test_checkpoints_are_atomic_and_keep_last(tmp_path):
    def write(folder):
        Path(folder, "policy").mkdir()
        Path(folder, "policy", "config.json").write_text("{}")
        Path(folder, "trainer_state.pt").write_text("x")

    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        save_checkpoint(str(root), step, write, keep_last=2)
    # keep_last=2: steps 1 and 2 were deleted once 3 and then 4 were complete
    assert [s for s, _ in list_checkpoints(str(root))] == [3, 4]
    # A crash mid-write leaves step_9.tmp; a copied-in step_8 lacks COMPLETE: neither is a checkpoint.
    (root / "step_9.tmp" / "policy").mkdir(parents=True)
    (root / "step_8" / "policy").mkdir(parents=True)
    assert latest_checkpoint(str(root)) == str(root / "step_4")
    with pytest.raises(CheckpointError, match="incomplete"):
        check_checkpoint(str(root / "step_8"))
    save_checkpoint(str(root), 5, write, keep_last=2)
    assert not (root / "step_9.tmp").exists()  # the next save sweeps leftovers
    assert (root / "step_5" / "COMPLETE").read_text() == "5"


def test_out_of_memory_says_what_to_change(tmp_path):
    from rlhf.trainers.policy import TrainingError, is_out_of_memory

    trainer = _trainer(tmp_path / "run", "trainer.max_steps=1")
    cuda = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you tried "
                       "to allocate 4096 bytes. Error code 12 (Cannot allocate memory)")
    other = RuntimeError("shape mismatch")
    assert [is_out_of_memory(e) for e in (cuda, cpu, MemoryError(), other)] == [True, True, True, False]
    for err in (cuda, cpu):
        def fail(prompts, step, round_, err=err):
            raise err

        trainer.generate = fail
        with pytest.raises(TrainingError) as e:
            trainer.train()
        msg = str(e.value)
        assert msg.startswith("out of memory at step 0 (") and "\n" not in msg
        # FAST: 4 prompts per step, 6 new tokens, 1 minibatch, grad_accum 1
        for hint in ("rollout.prompts_per_step (now 4)", "rollout.max_new_tokens (now 6)",
                     "trainer.minibatches (now 1)", "trainer.grad_accum (now 1)",
                     "or set trainer.gradient_checkpointing=true"):
            assert hint in msg, hint

    def broken(prompts, step, round_):
        raise other

    trainer.generate = broken
    with pytest.raises(RuntimeError, match="^shape mismatch$"):  # not an OOM: passes through untouched
        trainer.train()


@pytest.mark.parametrize("error, code, prefix", [
    ("interrupted", 128 + signal.SIGTERM, "interrupted: SIGTERM after step 3"),
    ("write", 2, "error: run_dir: disk full"),
    ("config", 2, "error: data.max_prompt_length: too long"),
])
def test_script_wrapper_exit_codes(error, code, prefix, capsys):
    from rlhf.runtime.errors import exit_on_user_error
    from rlhf.trainers.policy import TrainingInterrupted

    errors = {"interrupted": TrainingInterrupted("SIGTERM after step 3", signal.SIGTERM),
              "write": CheckpointWriteError("run_dir: disk full"),
              "config": ConfigError("data.max_prompt_length: too long")}

    @exit_on_user_error
    def main():
        raise errors[error]

    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == code
    assert capsys.readouterr().err == prefix + "\n"


def test_script_wrapper_lets_bugs_through():
    """Only the user-error types become one line; any other exception (a bug, whatever its message looks like)
    keeps its traceback."""
    from rlhf.runtime.errors import exit_on_user_error

    @exit_on_user_error
    def main():
        raise ValueError("shape: (3,) vs (4,)")

    with pytest.raises(ValueError, match="shape"):
        main()


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler (KeyboardInterrupt) during the test, whatever an earlier test left installed."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigint_writes_a_checkpoint_and_a_second_one_acts_at_once(tmp_path, python_sigint):
    from rlhf.trainers.policy import TrainingInterrupted

    trainer = _trainer(tmp_path / "run", "trainer.max_steps=5")
    train_step = trainer.train_step

    def interrupted_during_step_1(step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(step)

    trainer.train_step = interrupted_during_step_1
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as e:
        trainer.train()
    # SIGINT arrived in step 1: the step finishes, then checkpoint step_2 (2 steps done) is written
    assert e.value.signum == signal.SIGINT
    assert str(e.value).startswith(f"SIGINT after step 1: checkpoint {tmp_path / 'run' / 'checkpoints' / 'step_2'} "
                                   "written; continue with trainer.resume=auto")
    check_checkpoint(str(tmp_path / "run" / "checkpoints" / "step_2"))
    assert signal.getsignal(signal.SIGINT) is handler  # restored after train()

    def twice(step):
        os.kill(os.getpid(), signal.SIGINT)
        # Python runs a handler later, in the main thread; two signals sent before it runs are one. Wait until the
        # first was handled (it puts the previous handler back), so the second meets that handler: KeyboardInterrupt
        deadline = time.monotonic() + 10
        while signal.getsignal(signal.SIGINT) is not handler and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGINT)
        while time.monotonic() < deadline + 10:  # the KeyboardInterrupt is raised here, as soon as Python handles it
            time.sleep(0.001)
        return train_step(step)

    trainer.train_step = twice
    with pytest.raises(KeyboardInterrupt):
        trainer.train()


def test_resume_auto_without_checkpoint_drops_stale_metrics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _write_jsonl(run / "metrics.jsonl", [{"step": 0, "score": 9.0}, {"step": 1, "score": 9.0}])
    with pytest.warns(UserWarning, match="trainer.resume=auto: no complete checkpoint under"):
        trainer = _trainer(run, "trainer.resume=auto", "trainer.max_steps=1")
    assert trainer.start_step == 0
    trainer.train()
    # the killed run's two lines are gone; only this run's step 0 remains
    assert [r["step"] for r in _read_metrics(run)] == [0]
    assert _read_metrics(run)[0]["score"] != 9.0


def test_resume_at_the_end_rewrites_nothing_and_a_mismatched_config_is_one_line(tmp_path):
    import re

    trainer = _trainer(tmp_path / "a", "trainer.max_steps=2")  # PPO: a critic and two optimizer groups
    ckpt = trainer.save(2)
    resumed = _trainer(tmp_path / "b", f"trainer.resume={ckpt}", "trainer.max_steps=2")
    assert resumed.start_step == 2 and resumed.train() == []
    assert not (tmp_path / "b" / "checkpoints").exists()  # no step ran, so no new checkpoint
    # RLOO has no critic: one optimizer group where the checkpoint has two
    with pytest.raises(CheckpointError, match=rf"^trainer.resume: checkpoint '{re.escape(ckpt)}' does not fit "
                                              r"this run \("):
        _trainer(tmp_path / "c", f"trainer.resume={ckpt}", "algorithm=rloo")


# ---------------------------------------------------------------------------------------------- 3. reproducibility
# save_every=2 with 6 steps: checkpoints after steps 2 and 4, and the final one at 6.
RESUMABLE = [*FAST, ONE_THREAD, "trainer.max_steps=6", "trainer.save_every=2", "trainer.keep_last=10",
             "trainer.sample_every=0"]


@pytest.fixture(scope="module")
def reference_metrics(tmp_path_factory):
    """An uninterrupted run of RESUMABLE, in this process."""
    from rlhf.trainers.policy import PolicyTrainer

    threads = torch.get_num_threads()
    run = tmp_path_factory.mktemp("reference") / "run"
    try:
        PolicyTrainer(validate_policy_config(compose_policy(RESUMABLE, run_dir=str(run)))).train()
    finally:
        torch.set_num_threads(threads)
    return _read_metrics(run)


def test_same_seed_and_config_give_identical_metrics(reference_metrics, tmp_path):
    from rlhf.trainers.policy import PolicyTrainer

    PolicyTrainer(validate_policy_config(compose_policy(RESUMABLE, run_dir=str(tmp_path / "run")))).train()
    again = _read_metrics(tmp_path / "run")
    assert [r["step"] for r in again] == list(range(6))
    assert _comparable(again) == _comparable(reference_metrics)


# ---------------------------------------------------------------------------------------------- subprocess runs
def _start(run_dir: Path, *overrides) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, SCRIPT, *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) before {path} appeared: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_writes_a_complete_checkpoint_and_exits_143(tmp_path):
    run = tmp_path / "run"
    proc = _start(run, *FAST, ONE_THREAD, "trainer.max_steps=1000")
    _wait_for(run / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    # 128 + SIGTERM (15), as a shell reports a process the signal ended: the run did not finish
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    done = len(_read_metrics(run))  # the step running at the signal finishes and is logged, then the run stops
    assert err.strip().splitlines()[-1].startswith(f"interrupted: SIGTERM after step {done - 1}: checkpoint ")
    assert [s for s, _ in list_checkpoints(str(run / "checkpoints"))] == [done]
    check_checkpoint(str(run / "checkpoints" / f"step_{done}"))


@pytest.mark.slow
def test_kill_9_then_resume_auto_matches_an_uninterrupted_run(reference_metrics, tmp_path):
    run = tmp_path / "run"
    proc = _start(run, *RESUMABLE)
    _wait_for(run / "checkpoints" / "step_2" / "COMPLETE", proc)
    proc.kill()  # SIGKILL: no handler runs, whatever was being written stays half-written
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # Leftovers that resume must ignore: a half-written folder and one without its COMPLETE marker.
    (run / "checkpoints" / "step_5.tmp" / "policy").mkdir(parents=True)
    (run / "checkpoints" / "step_5" / "policy").mkdir(parents=True)
    resumed = run_script([SCRIPT, *RESUMABLE, "trainer.resume=auto", f"hydra.run.dir={run}"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = _read_metrics(run)
    assert [r["step"] for r in rows] == list(range(6))  # each step exactly once
    assert _comparable(rows) == _comparable(reference_metrics)


def test_resuming_an_older_checkpoint_sets_newer_ones_aside(policy_cfg, tmp_path):
    """Resume from step_2 of a run that reached step_4: step_4 belongs to an abandoned future. It is moved to
    checkpoints/abandoned/ (not deleted), so a later resume=auto continues this run, not the old one."""
    from rlhf.runtime.checkpoint import latest_checkpoint
    from rlhf.trainers.policy import PolicyTrainer

    common = ["trainer.max_steps=4", "trainer.save_every=2", "trainer.keep_last=5"]
    PolicyTrainer(policy_cfg(*common)).train()
    ckpts = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(str(ckpts)).endswith("step_4")
    with pytest.warns(UserWarning, match="newer checkpoint moved"):
        trainer = PolicyTrainer(policy_cfg("trainer.max_steps=3", "trainer.keep_last=5",
                                           f"trainer.resume={ckpts / 'step_2'}"))
    assert (ckpts / "abandoned" / "step_4" / "COMPLETE").exists() and not (ckpts / "step_4").exists()
    trainer.train()
    assert latest_checkpoint(str(ckpts)).endswith("step_3")


def test_resume_hides_the_abandoned_tensorboard_events(policy_cfg, tmp_path):
    """A run logs steps 0-3, then resumes from its step_2 checkpoint and logs steps 2-3 again. TensorBoard must show
    each step once: the writer's purge_step tells it to drop the old run's events from step 2 on. Without it,
    steps 2 and 3 would each have two points (four in all would be six)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlhf.trainers.policy import PolicyTrainer

    common = ["trainer.max_steps=4", "trainer.save_every=2", "trainer.keep_last=5", "logging.tensorboard=true"]
    PolicyTrainer(policy_cfg(*common)).train()
    ckpt = tmp_path / "run" / "checkpoints" / "step_2"
    with pytest.warns(UserWarning, match="newer checkpoint moved"):
        resumed = PolicyTrainer(policy_cfg(*common, f"trainer.resume={ckpt}")).train()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    kl = events.Scalars("kl")
    assert [e.step for e in kl] == [0, 1, 2, 3]
    # The points of steps 2-3 are the resumed run's (float32 in the event file).
    assert [e.value for e in kl[2:]] == pytest.approx([m["kl"] for m in resumed], rel=1e-6, abs=1e-7)
