"""trainer.gradient_checkpointing (rlhf.models.checkpoint_activations): each decoder layer is recomputed in the
backward instead of keeping its intermediates, with the same gradients.

What would be wrong if the switch did nothing: the layers would run once per forward+backward (here: twice) and the
tensors autograd keeps would not shrink. What would be wrong if it changed the maths: the gradients and the
trained weights would differ from the plain run's.
"""

import pytest
import torch
from torch import nn

from rlhf.models import ModelSpecError, checkpoint_activations, load_causal_lm, load_tokenizer


def tiny_lm():
    tok = load_tokenizer("builtin:words")
    return load_causal_lm("builtin:tiny", tok, seed=0).train(), tok


def lm_loss_and_grads(model, ids):
    """Next-token cross-entropy of ``ids`` (batch, seq) and every parameter's gradient, plus how many decoder-layer
    forwards ran (counted in each layer's MLP forward: module hooks do not fire in the recompute) and how many bytes
    autograd saved outside checkpointed regions."""
    calls = [0]

    def counted(forward):
        def run(*args, **kwargs):
            calls[0] += 1
            return forward(*args, **kwargs)
        return run

    for layer in model.model.layers:
        layer.mlp.forward = counted(layer.mlp.forward)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids, use_cache=False).logits
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    for layer in model.model.layers:
        del layer.mlp.forward  # the class's forward again
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.item(), grads, calls[0], saved[0]


def test_checkpointing_recomputes_every_layer_with_the_same_gradients():
    model, tok = tiny_lm()
    ids = torch.randint(0, len(tok), (4, 24), generator=torch.Generator().manual_seed(0))
    loss, grads, calls, saved = lm_loss_and_grads(model, ids)
    n = len(model.model.layers)
    assert calls == n  # plain: one forward per layer

    checkpoint_activations(model)
    loss_ck, grads_ck, calls_ck, saved_ck = lm_loss_and_grads(model, ids)
    assert calls_ck == 2 * n  # every layer again in the backward: the switch took effect
    assert loss_ck == loss
    for name, g in grads.items():
        torch.testing.assert_close(grads_ck[name], g, rtol=0, atol=1e-6, msg=name)
    # Autograd keeps no layer's intermediates now (checkpointed regions save through their own hooks); what is left
    # is the embedding, final norm, head and loss. The tiny model's layers keep far more than those.
    assert saved_ck < saved / 3, (saved_ck, saved)


def test_generation_keeps_its_kv_cache_under_checkpointing():
    """Without gradients the layers run as is: greedy decoding is the plain model's, token for token."""
    model, tok = tiny_lm()
    ids = torch.tensor([[tok.bos_token_id or 0, 5, 6, 7]])
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        plain = model.generate(ids, **kwargs)
        checkpoint_activations(model)
        assert model.generate(ids, **kwargs).tolist() == plain.tolist()


def test_a_model_without_support_is_refused_naming_the_key():
    with pytest.raises(ModelSpecError, match=r"^trainer.gradient_checkpointing: Linear does not support"):
        checkpoint_activations(nn.Linear(2, 2))


def trained_weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("extra", [[], ["model.lora.r=4"], ["algorithm=ppo"]], ids=["full", "lora", "ppo-critic"])
def test_policy_trainer_follows_the_plain_trajectory(policy_cfg, extra):
    """Two RL steps with and without the switch: same metrics, same trained weights (float32 round-off only)."""
    from rlhf.trainers.policy import PolicyTrainer

    runs = {}
    for flag in (False, True):
        trainer = PolicyTrainer(policy_cfg(*extra, "trainer.max_steps=2", "kl.beta=0.1",
                                           f"trainer.gradient_checkpointing={flag}"))
        history = trainer.train()
        layer = trainer.models.policy.get_base_model().model.layers[0] if extra == ["model.lora.r=4"] \
            else trainer.models.policy.model.layers[0]
        assert layer.gradient_checkpointing is flag
        if trainer.models.value is not None:
            assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.models.value.modules()) is flag
        runs[flag] = history, trained_weights(trainer)
    (plain, w_plain), (ck, w_ck) = runs[False], runs[True]
    for a, b in zip(plain, ck):
        for key in ("policy/loss", "policy/grad_norm", "kl", "score"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    for name, w in w_plain.items():
        torch.testing.assert_close(w_ck[name], w, rtol=0, atol=1e-5, msg=name)


def test_sft_stage_follows_the_plain_trajectory(tmp_path):
    from test_sft import sft_cfg

    from rlhf.trainers.sft import train_sft

    def run(flag):
        history = train_sft(sft_cfg(tmp_path / str(flag), "trainer.max_steps=3", "trainer.eval_every=0",
                                    f"trainer.gradient_checkpointing={flag}"))
        return [m["train/loss"] for m in history if "train/loss" in m]

    plain = run(False)
    assert run(True) == pytest.approx(plain, rel=1e-5)
