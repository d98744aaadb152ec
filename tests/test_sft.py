import json
import math
import types

import pytest
import torch
import torch.nn.functional as F

from rlhf.config import ConfigError, validate_sft_config
from rlhf.data import DataError
from rlhf.trainers.sft import (
    batch_indices,
    build_optimizer,
    lm_batch_loss,
    lm_eval_sums,
    optimizer_step,
    save_final,
    sft_summary,
    shard,
    strided_rows,
    train_sft,
)
from tests.conftest import compose_config, run_script

# Small and quick: 256 train rows, 64 held-out rows, no progress bar or TensorBoard.
FAST = ["data.num_train=256", "data.num_eval=64", "trainer.batch_size=16", "trainer.warmup_steps=2",
        "logging.progress=false", "logging.tensorboard=false"]


def compose_sft(overrides=(), run_dir="/tmp/unused"):
    return compose_config("sft", overrides, run_dir)


def sft_cfg(tmp_path, *overrides):
    return validate_sft_config(compose_sft([*FAST, *overrides], run_dir=str(tmp_path / "run")))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- batching ---


def test_batch_indices_cut_one_permutation_per_pass():
    # 10 rows, batches of 4: a pass holds 2 batches (rows 8 and 9 of the permutation are skipped).
    first, second = batch_indices(10, 4, 0, seed=0), batch_indices(10, 4, 1, seed=0)
    seen = torch.cat([first, second])
    assert seen.shape == (8,) and len(set(seen.tolist())) == 8  # one pass draws no row twice
    assert torch.equal(batch_indices(10, 4, 1, seed=0), second)  # a pure function of (step, seed)
    # step 2 starts the next pass: a fresh permutation, so it may reuse rows of step 0 or 1
    assert not torch.equal(batch_indices(10, 4, 2, seed=0), first)
    assert not torch.equal(batch_indices(10, 4, 0, seed=1), first)


def test_batch_indices_wrap_when_rows_are_fewer_than_the_batch():
    idx = batch_indices(3, 5, 0, seed=0)
    # 5 slots over 3 rows: the permutation repeats, so all 3 rows appear and 2 of them twice
    assert idx.shape == (5,) and set(idx.tolist()) == {0, 1, 2}


def test_batch_indices_reject_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        batch_indices(10, 0, 0, seed=0)
    with pytest.raises(ValueError, match="num_rows"):
        batch_indices(0, 4, 0, seed=0)


def test_shard_gives_each_process_a_contiguous_slice():
    idx = torch.tensor([7, 3, 5, 1, 0, 2])
    assert shard(idx, 0, 2).tolist() == [7, 3, 5]
    assert shard(idx, 1, 2).tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="world_size=4"):
        shard(idx, 0, 4)


def test_strided_rows_cover_every_row_once():
    # 5 rows over 2 processes: rank 0 gets 0, 2, 4 and rank 1 gets 1, 3
    assert strided_rows(5, 0, 2).tolist() == [0, 2, 4]
    assert strided_rows(5, 1, 2).tolist() == [1, 3]


# --- the loss: completion-only masking ---


class FixedLogits(torch.nn.Module):
    """A stand-in LM whose logits ignore the input, so changing a token changes only its role as a target."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask, use_cache=False):
        return types.SimpleNamespace(logits=self.logits[:, : input_ids.shape[1]])


def _batch(ids, loss_mask):
    ids = torch.tensor([ids])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.tensor([loss_mask])}


def test_completion_only_loss_ignores_prompt_targets():
    torch.manual_seed(0)
    model = FixedLogits(torch.randn(1, 5, 7))
    # prompt = positions 0-1, completion = positions 2-4
    mask = [0, 0, 1, 1, 1]
    base = lm_batch_loss(model, _batch([1, 2, 3, 4, 5], mask))
    # position 1 is a prompt token: as a target it is masked out, so the loss cannot change
    assert lm_batch_loss(model, _batch([1, 6, 3, 4, 5], mask)) == base
    # position 2 is the first completion token: it is a target, so the loss must change
    assert lm_batch_loss(model, _batch([1, 2, 6, 4, 5], mask)) != base
    # trained on every token, position 1 counts again
    full = [1, 1, 1, 1, 1]
    assert lm_batch_loss(model, _batch([1, 6, 3, 4, 5], full)) != lm_batch_loss(model, _batch([1, 2, 3, 4, 5], full))


def test_completion_only_loss_is_the_mean_over_completion_targets():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7)
    ids = [1, 2, 3, 4, 5]
    # logits[t] predicts ids[t + 1]; the completion targets are ids[2], ids[3], ids[4], predicted by logits[1..3]
    expected = F.cross_entropy(logits[0, 1:4], torch.tensor(ids[2:5]))
    got = lm_batch_loss(FixedLogits(logits), _batch(ids, [0, 0, 1, 1, 1]))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_eval_sums_weigh_every_target_token_equally():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    data = {"input_ids": torch.tensor([[1, 2, 3, 0], [4, 5, 6, 2]]),
            "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
            "loss_mask": torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])}

    class RowLogits(torch.nn.Module):
        def forward(self, input_ids, attention_mask, use_cache=False):
            # the two rows are scored one per batch (batch_size=1), so pick the row by its first token
            row = 0 if int(input_ids[0, 0]) == 1 else 1
            return types.SimpleNamespace(logits=logits[row: row + 1, : input_ids.shape[1]])

    # targets: row 0 -> ids 2, 3 (from logits[0, 0], [0, 1]); row 1 -> ids 6, 2 (from logits[1, 1], [1, 2])
    nll = (F.cross_entropy(logits[0, 0:2], torch.tensor([2, 3]), reduction="sum")
           + F.cross_entropy(logits[1, 1:3], torch.tensor([6, 2]), reduction="sum"))
    sums = lm_eval_sums(RowLogits(), data, batch_size=1)
    assert sums[0].item() == pytest.approx(nll.item(), rel=1e-6)
    assert sums[1].item() == 4


# --- the SFT stage ---


def test_sft_lowers_train_loss_and_eval_perplexity_and_saves_a_causal_lm(tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf.data import load_sft, tokenize_sft
    from rlhf.models import load_tokenizer

    cfg = sft_cfg(tmp_path, "trainer.max_steps=40", "trainer.eval_every=20", "trainer.log_every=1")
    history = train_sft(cfg)
    train_losses = [m["train/loss"] for m in history if "train/loss" in m]
    evals = [m for m in history if "eval/perplexity" in m]
    assert [m["step"] for m in evals] == [0, 20, 40]
    assert sum(train_losses[-5:]) / 5 < 0.7 * sum(train_losses[:5]) / 5
    # An untrained model with small random weights predicts nearly uniformly over the vocabulary: perplexity ~ V.
    vocab = len(load_tokenizer("builtin:words"))
    assert 0.7 * vocab < evals[0]["eval/perplexity"] < 1.3 * vocab
    assert evals[-1]["eval/perplexity"] < 0.2 * evals[0]["eval/perplexity"]
    assert evals[-1]["eval/perplexity"] == pytest.approx(math.exp(evals[-1]["eval/loss"]))
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert lines == history

    # The saved folder loads with AutoModelForCausalLM and its tokenizer, and scores the held-out rows as logged.
    folder = tmp_path / "run" / "final"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = load_tokenizer(str(folder))
    rows = load_sft("builtin:sentiment", split="test", n=64, seed=0)
    sums = lm_eval_sums(model, tokenize_sft(rows, tok, 64), batch_size=64)
    assert (sums[0] / sums[1]).item() == pytest.approx(evals[-1]["eval/loss"], rel=1e-5)


def test_sft_is_reproducible(tmp_path):
    def run(folder):
        history = train_sft(sft_cfg(folder, "trainer.max_steps=3", "trainer.eval_every=0"))
        return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in history]

    assert run(tmp_path / "a") == run(tmp_path / "b")


def test_sft_on_a_text_file_without_evaluation(tmp_path):
    path = write_jsonl(tmp_path / "demos.jsonl", [{"text": "the food was superb ."}] * 8)
    history = train_sft(sft_cfg(tmp_path, f"data.source={path}", "data.format=text", "data.num_eval=0",
                                "data.num_train=null", "trainer.batch_size=4", "trainer.max_steps=2"))
    assert all("eval/loss" not in m for m in history)
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_non_finite_gradient_stops_the_run_without_touching_the_weights():
    from accelerate import Accelerator

    from rlhf.runtime.backend import DistributedBackend
    from rlhf.trainers.policy import TrainingError

    layer = torch.nn.Linear(2, 1)
    before = [p.detach().clone() for p in layer.parameters()]
    layer(torch.tensor([[float("nan"), 1.0]])).sum().backward()
    optimizer, scheduler = build_optimizer(layer.parameters(), lr=0.1, weight_decay=0.0, betas=(0.9, 0.999),
                                           scheduler="constant", warmup_steps=0, max_steps=10)
    with pytest.raises(TrainingError, match="non-finite loss or gradient at step 3"):
        optimizer_step(DistributedBackend(Accelerator()), optimizer, scheduler, max_grad_norm=1.0, step=3)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))


def test_save_final_refuses_non_finite_weights(tmp_path):
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.trainers.policy import TrainingError

    tok = load_tokenizer("builtin:words")
    model = load_causal_lm("builtin:tiny", tok)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="not finite"):
        save_final(model, tok, str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()


def test_sft_summary_reports_perplexity_before_and_after():
    history = [{"step": 0, "eval/perplexity": 140.0}, {"step": 5, "train/loss": 1.0},
               {"step": 10, "eval/perplexity": 5.0}]
    assert sft_summary(history, "/x/final") == "SFT done: eval perplexity 140.00 -> 5.00; model saved to /x/final"


# --- config ---


def test_default_sft_config_composes_and_validates():
    cfg = validate_sft_config(compose_sft())
    assert cfg.model.init == "builtin:tiny" and cfg.data.source == "builtin:sentiment"
    assert cfg.data.completion_only is True


@pytest.mark.parametrize("override, key", [
    ("+trainer.max_stepz=3", "trainer.max_stepz: unknown key"),
    ("trainer.lr=fast", "trainer.lr:"),
    ("trainer.max_steps=0", "trainer.max_steps: must be > 0"),
    ("data.format=chat", "data.format: 'chat' is not one of"),
    ("model.init=builtin:huge", "model.init: unknown built-in model"),
    ("trainer.warmup_steps=5000", "trainer.warmup_steps: must be in"),
    ("data.source=/tmp/demos.jsonl", "data.eval_source: data.source '/tmp/demos.jsonl' is a file"),
])
def test_bad_sft_config_is_one_line_config_error(override, key):
    with pytest.raises(ConfigError) as err:
        validate_sft_config(compose_sft([override]))
    assert str(err.value).startswith(key)
    assert "\n" not in str(err.value)


def test_batch_must_split_over_processes():
    with pytest.raises(ConfigError, match="trainer.batch_size: 32 rows do not split over 3 processes"):
        validate_sft_config(compose_sft(), world_size=3)


# --- bad data fails before any model loads ---


@pytest.fixture
def no_models(monkeypatch):
    import rlhf.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer loaded before the data was checked")

    for name in ("load_causal_lm", "load_tokenizer", "load_score_model"):
        monkeypatch.setattr(rlhf.models, name, refuse)


def test_sft_missing_column_is_a_data_error_before_any_model_loads(tmp_path, no_models):
    path = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": "the food was", "answer": "good ."}])
    with pytest.raises(DataError, match="no column 'completion'; available columns: prompt, answer"):
        train_sft(sft_cfg(tmp_path, f"data.source={path}", "data.num_eval=0"))


def test_sft_bad_eval_file_is_a_data_error_before_any_model_loads(tmp_path, no_models):
    good = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "the food was", "completion": "good ."}])
    bad = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "the food was", "completion": ""}])
    with pytest.raises(DataError, match="column 'completion' row 0"):
        train_sft(sft_cfg(tmp_path, f"data.source={good}", f"data.eval_source={bad}"))


def test_script_reports_a_bad_config_in_one_line(tmp_path):
    result = run_script(["scripts/train_sft.py", "trainer.max_steps=-1", f"hydra.run.dir={tmp_path}"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: trainer.max_steps: must be > 0"


def test_non_finite_weights_are_refused_before_saving(tmp_path):
    """fit checks the weights on every process (a collective) before rank 0 saves, so all processes stop together."""
    from accelerate import Accelerator

    from rlhf.runtime.backend import DistributedBackend
    from rlhf.trainers.policy import TrainingError
    from rlhf.trainers.sft import _check_finite_everywhere

    model = torch.nn.Linear(2, 2)
    acc = DistributedBackend(Accelerator(cpu=True))
    _check_finite_everywhere(acc, model, str(tmp_path))  # finite: no error
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="final not written"):
        _check_finite_everywhere(acc, model, str(tmp_path))


def test_process_weight_is_one_on_a_single_process():
    from accelerate import Accelerator

    from rlhf.runtime.backend import DistributedBackend

    backend = DistributedBackend(Accelerator(cpu=True))
    assert backend.process_weight(None) is None
    # W * u / sum(u) with W = 1: 1 whatever the count (the 2-process case is tested in test_distributed.py).
    assert backend.process_weight(torch.tensor(37.0)).item() == 1.0
