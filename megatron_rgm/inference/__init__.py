"""Inference: reflective Best-of-N (sample k thinking trajectories, keep the best-scored, write its answer)."""

from megatron_rgm.inference.best_of_n import BestOfN, BestOfNConfig, HFSampler, choose, score_candidates

__all__ = ["BestOfN", "BestOfNConfig", "HFSampler", "choose", "score_candidates"]
