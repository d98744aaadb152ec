"""The training loops: policy optimisation (policy.py), SFT (sft.py) and reward-model training (reward.py)."""
