"""rlhf: one RL loop (PPO, RLOO, GRPO, REINFORCE++) against a reward model with a per-token KL penalty."""

__version__ = "0.1.0"
