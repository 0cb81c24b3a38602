"""Rollouts: the KV-cache sampler that scores steps as it samples, offline generation into a store, answer rewards."""
