"""Inference: reflective Best-of-N (sample k thinking trajectories, keep the best-scored, write its answer)."""

from megatron_rgm.inference.best_of_n import BestOfN, BestOfNConfig, choose, score_candidates
from megatron_rgm.rollout.hf_sampler import HFSampler
from megatron_rgm.rollout.vllm_sampler import VLLMSampler

__all__ = ["BestOfN", "BestOfNConfig", "HFSampler", "VLLMSampler", "choose", "score_candidates"]
