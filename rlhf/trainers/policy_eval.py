"""Held-out evaluation inside the policy loop (``eval.every``): greedy accuracy, mean reward and pass@k of the policy on
prompts it never trains on, logged as ``eval/*`` in the metric line of the step it was run at.

The prompts are ``eval.prompts`` or, by default, the test split of ``data.prompts`` (a built-in task's train and test
splits never share a problem). They are chat-formatted as the training prompts are. Correctness is ``reward.gold``
(a verifiable task's 0/1 checker) and the reward is ``reward.function``; the numbers are those of
``scripts/evaluate.py`` (rlhf.analysis.evaluate), which reproduces them from a checkpoint. Each process evaluates every
``num_processes``-th prompt and the means are combined over processes, weighted by their prompt counts.
"""

from __future__ import annotations

import dataclasses

import torch
from omegaconf import DictConfig, OmegaConf

from rlhf.analysis.evaluate import evaluate_policy
from rlhf.chat import add_special_tokens_for, format_prompts
from rlhf.config import ConfigError, import_function
from rlhf.rollout.spec import SamplingSpec


class HeldOut:
    """The held-out prompts and scorers of a run; :meth:`run` evaluates a policy on them."""

    def __init__(self, cfg: DictConfig, tokenizer, chat: bool, spec: SamplingSpec, backend):
        from rlhf.data import load_prompts

        e, d = cfg.eval, cfg.data
        if backend.kind in ("fsdp2", "zero3"):
            raise ConfigError(f"eval.every: held-out evaluation decodes with one whole policy per process, which "
                              f"{backend.kind} shards; set eval.every=0 and run scripts/evaluate.py on a checkpoint")
        source = e.prompts or d.prompts
        if e.prompts is None and not str(d.prompts).startswith("builtin:"):
            raise ConfigError(f"eval.prompts: data.prompts={d.prompts!r} has no held-out split of ours; give the "
                              "held-out prompts as eval.prompts (a file or hub id)")
        options = OmegaConf.to_container(d.options) if e.prompts is None and d.get("options") else None
        prompts = load_prompts(source, column=d.prompt_column, split="test" if e.prompts is None else e.split,
                               n=e.num_prompts, seed=cfg.seed, options=options)
        self.correct_fn = import_function(cfg.reward.gold, "reward.gold") if cfg.reward.gold else None
        self.reward_fn = import_function(cfg.reward.function, "reward.function") if cfg.reward.function else None
        if self.correct_fn is None and self.reward_fn is None:
            raise ConfigError("eval.every: evaluation scores with reward.gold or reward.function, and this run has "
                              "neither (a reward model alone is not evaluated); set one or eval.every=0")
        rank, world = backend.process_index, backend.num_processes
        self.prompts = prompts[rank::world]
        self.formatted = format_prompts(tokenizer, self.prompts, chat, d.system_prompt)
        self.tokenizer, self.chat, self.backend, self.cfg = tokenizer, chat, backend, cfg
        self.spec = dataclasses.replace(spec, temperature=float(e.temperature or spec.temperature),
                                        max_new_tokens=int(e.max_new_tokens or spec.max_new_tokens))

    def run(self, policy: torch.nn.Module) -> dict[str, float]:
        """``eval/<metric>`` over all processes' held-out prompts (rlhf.analysis.evaluate.summarize's metrics)."""
        e = self.cfg.eval
        ks = sorted({1, e.samples}) if e.samples else []
        local = evaluate_policy(policy, self.tokenizer, self.prompts, self.formatted, self.correct_fn, self.reward_fn,
                                samples=e.samples, ks=ks, spec=self.spec, seed=self.cfg.seed,
                                batch_size=e.batch_size, device=self.backend.device, autocast=self.backend.autocast,
                                add_special_tokens=add_special_tokens_for(self.chat),
                                timeout_s=self.cfg.reward.timeout_s)
        n = local.pop("prompts")
        names = sorted(local)
        sums = torch.tensor([local[k] * n for k in names] + [n], dtype=torch.float64, device=self.backend.device)
        sums = self.backend.sum(sums).tolist()
        return {f"eval/{k}": v / sums[-1] for k, v in zip(names, sums)}
