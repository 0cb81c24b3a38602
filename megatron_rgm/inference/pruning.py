"""Reflective early stopping: Best-of-N candidates whose step scores fall far behind their group's best end early.

The head's step scores come out of the sampling passes, so a candidate's running aggregate is known while it is
being written. Every ``every`` decode steps, for each problem, the rule takes the running aggregate of each of
its candidates (the candidate's steps so far, as :func:`megatron_rgm.inference.best_of_n.score_candidates`
aggregates them at the end) and ends every candidate still decoding that has at least ``min_steps`` steps and
trails the best candidate with ``min_steps`` steps by more than ``margin``, measured on the probabilities or on their
log-odds (``scale``). A head whose scores saturate near 0 or 1 puts a right and a wrong candidate a few thousandths
apart in probability and several units apart in log-odds, so one log-odds margin serves heads that a probability
margin would need retuning for. An ended candidate is never chosen;
its slot goes to a waiting sequence (another problem's candidate). A sample draws from its own generator, so the
candidates that are not stopped are exactly those of the same run without the rule: the two compare on the same
draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_rgm import ops
from megatron_rgm.config import ConfigError
from megatron_rgm.steps import StepSegmenter


PRUNE_SCALES = ("prob", "logit")
# Log-odds of aggregates at 1 (or 0) are clamped here: +-27.6, above any float64 sigmoid short of exactly 1. (The
# geometric mean and the product floor each step at 1e-10, so their aggregates stay above log-odds -23.)
_EDGE = 1e-12


def check_scale(scale: str) -> None:
    """Raises ConfigError unless ``scale`` is one of :data:`PRUNE_SCALES` (``--bon-prune-scale``)."""
    if scale not in PRUNE_SCALES:
        raise ConfigError(f"--bon-prune-scale {scale!r} is unknown: use one of {', '.join(PRUNE_SCALES)}")


@dataclass(frozen=True)
class PruneRule:
    """When to end a candidate: it trails its group's best running aggregate by more than ``margin`` (on ``scale``:
    the aggregate itself or its log-odds), both with at least ``min_steps`` steps, at a check (every ``every``
    decode steps)."""

    margin: float
    min_steps: int = 2
    every: int = 8
    scale: str = "prob"

    def __post_init__(self):
        check_scale(self.scale)
        if self.scale == "prob" and not 0 < self.margin < 1:
            raise ConfigError(f"--bon-prune-margin must be in (0, 1) with --bon-prune-scale prob (aggregates are "
                              f"probabilities), got {self.margin}")
        if self.scale == "logit" and not self.margin > 0:
            raise ConfigError(f"--bon-prune-margin must be > 0 with --bon-prune-scale logit, got {self.margin}")
        if self.min_steps < 1 or self.every < 1:
            raise ConfigError(f"--bon-prune-min-steps and --bon-prune-every must be >= 1, got {self.min_steps} and "
                              f"{self.every}")

    def value(self, aggregate: float) -> float:
        """``aggregate`` on the rule's scale."""
        if self.scale == "prob":
            return aggregate
        p = min(max(aggregate, _EDGE), 1 - _EDGE)
        return math.log(p) - math.log1p(-p)

    def stops(self, candidates: list[tuple[float, int, bool]]) -> list[int]:
        """Which of one problem's candidates end now.

        Args:
            candidates: (running aggregate, steps so far, still decoding) of each candidate not already stopped; a
                finished candidate counts with its final aggregate.

        Returns:
            Indices into ``candidates`` of those still decoding that have ``min_steps`` steps and trail the best
            candidate with ``min_steps`` steps by more than the margin.
        """
        judged = [(i, self.value(agg), decoding) for i, (agg, steps, decoding) in enumerate(candidates)
                  if steps >= self.min_steps]
        if not judged:
            return []
        bar = max(value for _, value, _ in judged) - self.margin
        return [i for i, value, decoding in judged if decoding and value < bar]


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
        # float64: in float32 the largest score short of 1 has log-odds 16.6 while 1 itself clamps to 27.6, a gap
        # a log-odds margin would read as evidence.
        probs = torch.sigmoid(position_logits.cpu().double()[mask])
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
            ends = self.rule.stops([(agg, steps, s.slot is not None) for s, (agg, steps) in scored])
            stop += [scored[i][0].slot for i in ends]
        return stop
