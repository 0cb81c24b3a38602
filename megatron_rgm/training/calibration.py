"""The first iteration's head calibration: where the SPR mask's boundary goes, and which way the head points.

The SPR mask is a sign test (``z > 0`` for a correct trajectory, ``z < 0`` for
an incorrect one), so a step logit that sits on 0 is decided by rounding: TP=1
and TP=2, AVX2 and AVX-512, or two BLAS builds can put it on different sides.
The calibration therefore never puts the boundary on a logit: it goes in the
middle of the widest gap between consecutive logits near the median, which
leaves every logit at least half that gap away from 0.
"""

from __future__ import annotations

import math

import torch

from megatron_rgm.evaluation.metrics import pairwise_accuracy
from megatron_rgm.ops import segment_aggregate

# Two trajectories whose aggregate scores differ by less than this (relative) count as tied when the head's
# orientation is decided: a difference that small is a rounding difference between layouts, not a ranking.
SCORE_TIE_RTOL = 1e-6


def calibration_shift(step_logits: torch.Tensor) -> tuple[float, float]:
    """The shift to subtract from the head's output bias, and the margin it leaves, for ``step_logits [S]``.

    The boundary (0 after the shift) goes midway across the widest gap between
    two consecutive sorted logits whose split leaves at least a quarter of the
    steps on each side (at least one for ``S < 4``). Both classes are then
    masked on the first batch, as a median split would give, and no logit lies
    closer to 0 than the margin (half that gap). With fewer than 2 distinct
    logits no split exists: the shift is 0 and so is the margin.

    Returns:
        (shift, margin): floats; after ``bias -= shift`` every ``|z - shift| >= margin``.
    """
    z = step_logits.detach().double().flatten().sort().values
    n = z.numel()
    if n < 2 or z[0] == z[-1]:
        return 0.0, 0.0
    quarter = max(1, math.ceil(n / 4))
    # split i puts z[:i] below the boundary and z[i:] above it; 2 * ceil(n / 4) <= n + 1, so never empty
    splits = torch.arange(quarter, n - quarter + 1)
    gaps = z[splits] - z[splits - 1]
    if float(gaps.max()) == 0.0:  # the central logits are all equal: the widest gap of any split
        splits = torch.arange(1, n)
        gaps = z[splits] - z[splits - 1]
    widest = gaps == gaps.max()
    # ties between gaps: the split nearest the middle, then the lower one (a fixed rule, not an argmax accident)
    candidates = splits[widest]
    best = int(candidates[(2 * candidates - n).abs().argmin()])
    lo, hi = float(z[best - 1]), float(z[best])
    return (lo + hi) / 2, (hi - lo) / 2


@torch.no_grad()
def orient_head(head: torch.nn.Sequential, step_logits: torch.Tensor, cu_steps: torch.Tensor,
                correct: list[bool], groups: list) -> dict[str, float]:
    """Negate ``head``'s output layer when its ``step_logits`` rank correct trajectories below incorrect ones.

    Ranking: the geometric mean of the step scores, compared within each group
    (prompt); scores within ``SCORE_TIE_RTOL`` of each other count as a tie, so
    the decision does not depend on rounding. Negates only below a pairwise
    accuracy of 0.5 (exactly 0.5, or no group holding both outcomes, keeps the
    head). Returns the pairwise accuracy before (nan without such a group) and
    whether the head was negated (1.0 / 0.0).
    """
    scores = segment_aggregate(step_logits.float(), cu_steps, "geometric").double()
    # Snap scores within the tolerance onto one value (the smallest of each run), so near-ties are exact ties.
    order = scores.argsort()
    snapped = scores.clone()
    for a, b in zip(order[:-1].tolist(), order[1:].tolist()):
        if snapped[b] - snapped[a] <= SCORE_TIE_RTOL * max(abs(float(snapped[b])), 1e-30):
            snapped[b] = snapped[a]
    pairwise, pairs = pairwise_accuracy(snapped.tolist(), correct, groups)
    flip = pairs > 0 and pairwise < 0.5
    if flip:  # the logits become -z: every ranking reverses, and the boundary at 0 stays where it was
        head[-1].weight.neg_()
        head[-1].bias.neg_()
    return {"sprm initial pairwise": pairwise, "sprm head negated": float(flip)}


@torch.no_grad()
def calibrate_head(head: torch.nn.Sequential, step_logits: torch.Tensor, steps: torch.Tensor, correct: list[bool],
                   groups: list, orient: bool) -> dict[str, float]:
    """Shift ``head``'s output bias by :func:`calibration_shift` of ``step_logits`` (every replica's) and, with
    ``orient``, :func:`orient_head` it; ``steps`` holds each trajectory's step count. Returns what to log."""
    shift, margin = calibration_shift(step_logits)
    head[-1].bias.sub_(shift)
    out = {"sprm calibration shift": shift, "sprm calibration margin": margin}
    if orient:
        cu = torch.cat([torch.zeros(1, dtype=torch.long), steps.cumsum(0)])
        out.update(orient_head(head, step_logits - shift, cu, correct, groups))
    return out
