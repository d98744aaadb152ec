"""Step 7 of the policy loop, checkpoint: what a checkpoint of the policy trainer holds, and loading it back.

    checkpoints/step_<N>/policy/         the policy (AutoModelForCausalLM.from_pretrained) and its tokenizer; with
                                         model.lora its adapters instead (rlhf.lora's adapter folder), which
                                         scripts/export.py merges into a plain model
    checkpoints/step_<N>/value/          PPO's critic (a 1-label AutoModelForSequenceClassification)
    checkpoints/step_<N>/trainer_state.pt  step, AdamW state of the trained parameters only (by index, or by name
                                         under FSDP2), LR schedule, KL controller, the count of skipped updates,
                                         the resolved config

Writing is atomic (rlhf.runtime.checkpoint.save_checkpoint); the trainer calls it with ``writer(...)``'s function.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from rlhf.lora import save_model
from rlhf.runtime.checkpoint import CheckpointError, CheckpointWriteError, load_trainer_state, save_checkpoint


def checkpoint_writer(policy, policy_weights: dict, tokenizer, critic, critic_weights: dict | None,
                      state: dict) -> Callable[[str], None]:
    """The function that fills a checkpoint folder: policy + tokenizer, critic, trainer state."""

    def write(folder: str) -> None:
        save_model(policy, os.path.join(folder, "policy"), state_dict=policy_weights)
        tokenizer.save_pretrained(os.path.join(folder, "policy"))
        if critic is not None:
            critic.save_pretrained(os.path.join(folder, "value"), state_dict=critic_weights)
        torch.save(state, os.path.join(folder, "trainer_state.pt"))

    return write


def load_state(path: str, load_optimizer: Callable[[dict], None], scheduler, kl_ctl) -> tuple[int, int]:
    """Optimizer (through ``load_optimizer``), schedule and KL controller from the checkpoint at ``path``; returns
    ``(step, nonfinite_steps)``. The weights came with the models. A checkpoint that does not fit the run is a
    one-line CheckpointError."""
    try:
        state = load_trainer_state(path)
        if state["optimizer"] is not None:
            load_optimizer(state["optimizer"])
        else:
            warnings.warn(f"trainer.resume: {path} holds no optimizer state (written under DeepSpeed, which "
                          "partitions it); AdamW's moments start from zero", stacklevel=3)
        scheduler.load_state_dict(state["scheduler"])
        kl_ctl.load_state_dict(state["kl_controller"])
        return state["step"], state["nonfinite_steps"]
    except (KeyError, ValueError, RuntimeError, EOFError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"trainer.resume: checkpoint {path!r} does not fit this run ({first}); resume "
                              "with the config it was written with") from e


def save_policy_checkpoint(backend, step: int, policy, critic, tokenizer, optimizer, state: dict, ckpt_root: str,
                           keep_last: int) -> str | None:
    """Write ``ckpt_root/step_<step>`` on the main process, atomically; returns its path there (None elsewhere).

    ``policy`` and ``critic`` (a TokenValues, or None) are the prepared modules; ``state`` the trainer state without
    the optimizer's, which is added here. Non-finite weights are refused. Every process takes part in the same
    collectives whatever happens, so a refusal or a failed write raises on all of them instead of leaving the others
    waiting.
    """
    from rlhf.runtime.backend import all_finite
    from rlhf.runtime.errors import TrainingError

    b = backend
    unwrapped = b.unwrap(policy)
    value_model = b.unwrap(critic).model if critic is not None else None
    # Each process checks what it holds (an FSDP2 process: its shards), and any() combines the answers.
    bad = [name for name, m in (("policy", unwrapped), ("value", value_model)) if m is not None and not all_finite(m)]
    if b.any(bool(bad)):
        raise TrainingError(f"{' and '.join(bad) or 'model'} weights are not finite at step {step}; checkpoint "
                            "not written (the previous one is kept)")
    # Collective: under ZeRO-3 and FSDP2 the whole weights exist only once gathered, so every process takes part.
    policy_weights = b.state_dict(policy)
    critic_weights = None
    if value_model is not None and b.is_fsdp2:  # TokenValues' names: "model." + the value model's
        critic_weights = {k.removeprefix("model."): v for k, v in b.state_dict(critic).items()}
    optimizer_state = b.optimizer_state(optimizer, b.optimized_module(policy, critic))
    path, failure = None, None
    if b.is_main:
        write = checkpoint_writer(unwrapped, policy_weights, tokenizer, value_model, critic_weights,
                                  {"step": step, "optimizer": optimizer_state, **state})
        try:
            path = save_checkpoint(ckpt_root, step, write, keep_last)
        except CheckpointWriteError as e:
            failure = e
    if b.any(failure is not None):
        raise failure or TrainingError(f"run_dir: the main process could not write checkpoint step_{step}")
    return path
