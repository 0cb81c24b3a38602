"""GRPO pieces: vocab-parallel log-probs and entropy, advantages, policy loss, KL, entropy bonus."""

from megatron_rgm.rl.grpo import GRPOConfig, entropy_bonus, group_advantages, grpo_loss, low_var_kl, policy_loss
from megatron_rgm.rl.logprobs import chunked_log_probs_and_entropy, vocab_parallel_entropy, vocab_parallel_log_probs

__all__ = ["GRPOConfig", "group_advantages", "policy_loss", "low_var_kl", "entropy_bonus", "grpo_loss",
           "vocab_parallel_log_probs", "vocab_parallel_entropy", "chunked_log_probs_and_entropy"]
