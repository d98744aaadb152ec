"""The pure math of RLHF: losses, log-probs, KL estimators and controllers, advantage estimators, policy and value
objectives, and the registries that select them by name. Tensors in, tensors out: no model, no accelerate, no
Hydra."""
