"""Reflective early stopping: Best-of-N candidates whose step scores fall far behind their group's best end early.

The head's step scores come out of the sampling passes, so a candidate's running aggregate is known while it is
being written. Every ``every`` decode steps, for each problem, the rule takes the running aggregate of each of
its candidates (the candidate's steps so far, as :func:`megatron_rgm.inference.best_of_n.score_candidates`
aggregates them at the end) and ends every candidate still decoding that has at least ``min_steps`` steps and
trails the best candidate with ``min_steps`` steps by more than ``margin``. An ended candidate is never chosen;
its slot goes to a waiting sequence (another problem's candidate). A sample draws from its own generator, so the
candidates that are not stopped are exactly those of the same run without the rule: the two compare on the same
draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_rgm import ops
from megatron_rgm.config import ConfigError
from megatron_rgm.steps import StepSegmenter


@dataclass(frozen=True)
class PruneRule:
    """When to end a candidate: it trails its group's best running aggregate by more than ``margin``, both with at
    least ``min_steps`` steps, at a check (every ``every`` decode steps)."""

    margin: float
    min_steps: int = 2
    every: int = 8

    def __post_init__(self):
        if not 0 < self.margin < 1:
            raise ConfigError(f"--bon-prune-margin must be in (0, 1) (aggregates are probabilities), got {self.margin}")
        if self.min_steps < 1 or self.every < 1:
            raise ConfigError(f"--bon-prune-min-steps and --bon-prune-every must be >= 1, got {self.min_steps} and "
                              f"{self.every}")


class ReflectivePruner:
    """The rule as a :class:`megatron_rgm.rollout.batching.SlotPool` stopper.

    Args:
        rule: the thresholds.
        segmenter: the head's step rules (which positions are steps).
        aggregation: how step scores become a candidate's score (the run's).
    """

    def __init__(self, rule: PruneRule, segmenter: StepSegmenter, aggregation: str):
        self.rule, self.segmenter, self.aggregation = rule, segmenter, aggregation
        self.checks = 0
        self.ended: dict[tuple[int, int], tuple[float, int]] = {}  # final (aggregate, steps) of ended samples

    def running(self, tokens: torch.Tensor, position_logits: torch.Tensor, prompt_length: int) -> tuple[float, int]:
        """(aggregate, steps) of one candidate so far: ``tokens`` and ``position_logits`` ``[n]``."""
        tokens = tokens.cpu()[None]
        response = torch.arange(tokens.shape[1])[None] >= prompt_length
        mask = self.segmenter(tokens, response_mask=response).mask[0]
        probs = torch.sigmoid(position_logits.cpu().float()[mask])
        if probs.numel() == 0:
            return 0.0, 0
        cu = torch.tensor([0, probs.numel()], dtype=torch.int32)
        return float(ops.segment_aggregate(probs, cu, self.aggregation, from_probs=True)[0]), probs.numel()

    def __call__(self, pool) -> list[int]:
        self.checks += 1
        if self.checks % self.rule.every:
            return []
        stop = []
        for r, req in enumerate(pool.requests):
            seqs = [s for s in pool.sequences(r) if not req.stopped[s.sample]]
            if len(seqs) < 2 or all(s.slot is None for s in seqs):
                continue
            scored = []
            for s in seqs:
                key = (r, s.sample)
                if s.slot is None and key not in self.ended:
                    self.ended[key] = self.running(s.tokens, s.position_logits, len(req.prompt))
                scored.append((s, self.ended[key] if s.slot is None else
                               self.running(s.tokens, s.position_logits, len(req.prompt))))
            eligible = [agg for _, (agg, steps) in scored if steps >= self.rule.min_steps]
            if not eligible:
                continue
            best = max(eligible)
            stop += [s.slot for s, (agg, steps) in scored
                     if s.slot is not None and steps >= self.rule.min_steps and agg < best - self.rule.margin]
        return stop
