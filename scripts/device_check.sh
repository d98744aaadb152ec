#!/usr/bin/env bash
# Short GPU check (a few minutes): bf16 PPO and RLOO steps on one GPU with the W1-sized model, and bf16 vs fp32 PPO
# with a GPT-2-small-sized one.
# Prints one JSON line per run: median step time (steps >= 2), the generate/score/update split, generated
# tokens per second and peak GPU memory. Usage: bash scripts/device_check.sh [out_dir]
# RUNS="rloo_bf16 rloo_fsdp2_bf16" bash scripts/device_check.sh runs only the runs named.
# With deepspeed installed it also runs RLOO under DeepSpeed ZeRO-2 and ZeRO-3 on this one GPU (one process: a smoke
# test of the engine step, ZeRO-3's sharded reference and gathered checkpoint weights, not of multi-GPU scaling).
# It runs RLOO under FSDP2 (configs/accelerate/fsdp2.yaml) on this one GPU too: one process, so a smoke test of the
# prepared model, gathered decoding and gathered checkpoint weights, not of sharding over GPUs.
# With vllm installed it runs the same bf16 RLOO and the small PPO with rollout.engine=vllm next to the hf runs, and
# the vLLM tests (weight sync, sampling distribution, seeds) on the GPU.
# A failed run prints its log's tail and the check goes on with the next; the exit status counts the failures.
set -uo pipefail
failed=0
py=${PYTHON:-python3}
out=${1:-${OUT:-/tmp/device_check}}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
run() {
  local name=$1; shift
  if [[ -n "${RUNS:-}" && " $RUNS " != *" $name "* ]]; then return 1; fi  # RUNS="a b": only these runs
  ${LAUNCH:-$py} scripts/train_policy.py model.policy=${MODEL:-builtin:w1} trainer.mixed_precision=bf16 trainer.max_steps=12 \
    rollout.prompts_per_step=64 rollout.samples_per_prompt=4 rollout.max_new_tokens=32 rollout.min_new_tokens=32 \
    trainer.ppo_epochs=1 trainer.minibatches=1 trainer.save_every=0 logging.progress=false logging.tensorboard=false \
    hydra.run.dir="$out/$name" "$@" > "$out/$name.log" 2>&1 || { tail -30 "$out/$name.log"; echo "{\"run\": \"$name\", \"failed\": true}"; failed=$((failed + 1)); return 1; }
  grep -m1 "\[rlhf.trainers.policy\]\[INFO\]" "$out/$name.log" | sed 's/.*INFO\] - /  backend: /'
  $py - "$out/$name/metrics.jsonl" "$name" "${MODEL:-builtin:w1}" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])][2:]
med = lambda k: statistics.median(r[k] for r in rows)
print(json.dumps({"run": sys.argv[2], "model": sys.argv[3], "steps_timed": len(rows), "step_s": round(med("time/step_s"), 4),
                  "generate_s": round(med("time/generate_s"), 4), "score_s": round(med("time/score_s"), 4),
                  "update_s": round(med("time/update_s"), 4),
                  "gen_tokens_per_s": round(med("time/generated_tokens_per_s")),
                  "peak_gb": round(max(r.get("memory/peak_gb", 0) for r in rows), 3),
                  "final_score": round(rows[-1]["score"], 3), "final_kl": round(rows[-1]["kl"], 3)}))
PY
}
run ppo_bf16 algorithm=ppo
run rloo_bf16 algorithm=rloo
run rloo_fp32 algorithm=rloo trainer.mixed_precision=no
# transformers' multinomial sampler instead of the counter sampler (the default; see rlhf/rollout/sampling.py)
run rloo_bf16_torch_sampler algorithm=rloo rollout.sampler=torch
# A GPT-2-small-sized policy (and critic): large enough for bf16 to pay off.
MODEL=builtin:small run small_ppo_bf16 algorithm=ppo trainer.lr=1e-5 trainer.value_lr=1e-5
MODEL=builtin:small run small_ppo_fp32 algorithm=ppo trainer.lr=1e-5 trainer.value_lr=1e-5 trainer.mixed_precision=no
checkpoint_mb() {  # whole weights in the last checkpoint: far above 0 when ZeRO-3 / FSDP2 gathered them
  $py -c "import os, sys; print('{\"run\": \"%s\", \"policy_mb\": %.1f}' % (sys.argv[1], sum(os.path.getsize(
    os.path.join(sys.argv[2], f)) for f in os.listdir(sys.argv[2]) if f.endswith('.safetensors')) / 2**20))" \
    "$1" "$out/$1/checkpoints/step_12/policy"
}
launch() { echo "$py -m accelerate.commands.launch --config_file configs/accelerate/$1.yaml --num_processes 1 --main_process_port 29517"; }
LAUNCH=$(launch fsdp2) run rloo_fsdp2_bf16 algorithm=rloo && checkpoint_mb rloo_fsdp2_bf16
LAUNCH=$(launch fsdp2) run ppo_fsdp2_bf16 algorithm=ppo  # the policy and the critic sharded as one module
if $py -c "import deepspeed" > /dev/null 2>&1; then
  for stage in 2 3; do
    LAUNCH=$(launch deepspeed_zero$stage) run "rloo_zero${stage}_bf16" algorithm=rloo && checkpoint_mb "rloo_zero${stage}_bf16"
  done
  # ZeRO-3 decoding layer by layer (gathers every layer at every token) instead of gathering the policy once
  LAUNCH=$(launch deepspeed_zero3) run rloo_zero3_bf16_layerwise algorithm=rloo rollout.gather_for_generation=false
else
  echo '{"run": "deepspeed", "skipped": "deepspeed is not installed (pip install -e .[deepspeed])"}'
fi
if $py -c "import vllm" > /dev/null 2>&1; then
  run rloo_bf16_vllm algorithm=rloo rollout.engine=vllm
  MODEL=builtin:small run small_ppo_bf16_vllm algorithm=ppo trainer.lr=1e-5 trainer.value_lr=1e-5 rollout.engine=vllm
  $py -m pytest -q -p no:cacheprovider tests/test_vllm_engine.py 2>&1 | tail -3
else
  echo '{"run": "vllm", "skipped": "vllm is not installed (pip install -e .[vllm])"}'
fi
exit $failed
