"""The KV-cache sampler over an HF export: the native sampler's draws, stops and step rules on a transformers model.

Used where a model is served from ``mcore-to-hf`` output rather than a Megatron checkpoint: Best-of-N
(``tools/best_of_n.py --backend hf``) and offline rollouts (``tools/generate_rollouts.py --backend hf``).
Only the forward differs from :class:`~megatron_rgm.rollout.sampler.Sampler`'s: transformers' cache, and the
head reading the hooked ``sprm_layer`` output of each pass.
"""

from __future__ import annotations

import inspect

import torch

from megatron_rgm.rollout.sampler import Sampler


class HFPolicy(torch.nn.Module):
    """An HF causal LM and its SPRM head, with the attributes :meth:`Sampler.generate` reads."""

    def __init__(self, scorer):
        super().__init__()
        self.lm, self.head, self.feature = scorer.model, scorer.head, scorer.feature
        self.max_sequence_length = scorer.model.config.max_position_embeddings
        # transformers >= 5.2x names the KV cache ``cache`` (``past_key_values`` before, now deprecated).
        self.cache_kw = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"


class HFSampler(Sampler):
    """:class:`Sampler` over an HF export (:class:`megatron_rgm.hf.RGMScorer`): the same draws, stops and step
    rules, with transformers' KV cache; the head reads the hooked ``sprm_layer`` output of each forward, so step
    scores again come from the sampling passes.

    Args:
        scorer: model, head and feature hook.
        tokenizer: for stop strings.
        segmenter: step rules.
    """

    def __init__(self, scorer, tokenizer, segmenter):
        super().__init__(HFPolicy(scorer), scorer.model.config.vocab_size, segmenter, tokenizer, pipeline=False)
        self.position_limit = self.model.max_sequence_length
        self._past = None

    def _forward(self, tokens, positions, context):
        m = self.model
        if int(positions[0, 0]) == 0:  # a prefill (or a full recompute): start a new cache
            self._past = None
        out = m.lm(input_ids=tokens, position_ids=positions, use_cache=True, **{m.cache_kw: self._past})
        self._past = out["cache"] if "cache" in out else out["past_key_values"]
        feature = m.feature.value[:, -1]  # [b, h] at the last position
        head = m.head(feature.to(m.head[0].weight.dtype)).view(-1).float()
        return out.logits[:, -1, : self.vocab_size].float(), head
