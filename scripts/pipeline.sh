#!/usr/bin/env bash
# The three RLHF stages on the built-in sentiment task, offline, into one folder:
#
#   1. SFT           scripts/train_sft.py     -> $OUT/sft/final     (the policy's starting point and reference)
#   2. reward model  scripts/train_reward.py  -> $OUT/reward/final  (Bradley-Terry on the built-in preferences)
#   3. policy        scripts/train_policy.py  -> $OUT/policy        (PPO against the reward model alone; the gold
#                                                                    scorer is only logged, as gold_score)
#
# Then it prints the SFT policy's gold score (policy step 0, before any update), the final policy's gold score
# and its KL to the SFT model.
#
#   bash scripts/pipeline.sh                      # into runs/pipeline
#   bash scripts/pipeline.sh /tmp/p kl.beta=0.1   # another folder; extra arguments go to the policy stage
#   LORA_R=16 bash scripts/pipeline.sh /tmp/p     # every stage trains rank-16 LoRA adapters (needs peft); the SFT
#                                                 # stage hands on final/, its merged model, or with
#   LORA_R=16 HANDOFF=adapter bash ...            # adapter/, its adapters (merged into their base when loaded)
set -euo pipefail

OUT=${1:-runs/pipeline}
shift $(( $# > 0 ? 1 : 0 ))
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute, so the model folders resolve whatever the working directory
cd "$(dirname "$0")/.."

lora=()
if [[ -n ${LORA_R:-} ]]; then lora=(model.lora.r="$LORA_R"); fi
HANDOFF=${HANDOFF:-final}
case $HANDOFF in final|adapter) ;; *) echo "HANDOFF=$HANDOFF: final or adapter" >&2; exit 2 ;; esac
if [[ $HANDOFF == adapter && -z ${LORA_R:-} ]]; then echo "HANDOFF=adapter needs LORA_R" >&2; exit 2; fi

SECONDS=0
python scripts/train_sft.py hydra.run.dir="$OUT/sft" logging.progress=false "${lora[@]}"
echo "sft: ${SECONDS} s"

SECONDS=0
python scripts/train_reward.py hydra.run.dir="$OUT/reward" logging.progress=false "${lora[@]}"
echo "reward model: ${SECONDS} s"

# The policy and its tokenizer are the SFT model's; the reward model shares that tokenizer, so scoring reuses the
# token ids. reward.function=null: the reward model is the only reward, as with a real RLHF run.
# The tiny SFT model is a folder, so it would get a pretrained model's learning rates: give it the random-init ones.
# Only PPO (the default) has a critic; the other algorithms refuse a critic learning rate.
critic_lr=(trainer.value_lr=1e-3)
for arg in "$@"; do
  case $arg in algorithm=rloo|algorithm=grpo|algorithm=reinforce_pp) critic_lr=() ;; esac
done
SECONDS=0
python scripts/train_policy.py hydra.run.dir="$OUT/policy" logging.progress=false \
  model.policy="$OUT/sft/$HANDOFF" model.reward="$OUT/reward/final" \
  reward.function=null reward.gold=rlhf.tasks.sentiment.gold_fn trainer.lr=1e-3 "${critic_lr[@]}" "${lora[@]}" \
  "$@"
echo "policy: ${SECONDS} s"

python - "$OUT/policy/metrics.jsonl" <<'EOF'
import json
import sys

lines = [json.loads(line) for line in open(sys.argv[1])]
first, last = lines[0], lines[-1]
# One step holds 64 samples; the mean of the last 10 logged steps is the steadier number.
tail = lines[-10:]
mean = lambda key: sum(m[key] for m in tail) / len(tail)  # noqa: E731
print(f"SFT policy   (step {first['step']:>3}): gold_score {first['gold_score']:+.3f}  score {first['score']:+.3f}")
print(f"final policy (step {last['step']:>3}): gold_score {last['gold_score']:+.3f}  score {last['score']:+.3f}  "
      f"kl {last['kl']:.3f}")
print(f"final policy (last {len(tail)} steps): gold_score {mean('gold_score'):+.3f}  score {mean('score'):+.3f}  "
      f"kl {mean('kl'):.3f}")
EOF
