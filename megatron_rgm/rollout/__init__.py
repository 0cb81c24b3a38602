"""Rollouts: answer rewards (the sampler and the rollout store land here too)."""
