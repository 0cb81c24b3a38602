"""Pure-torch reference of every op: the definition the kernels are tested against.

Packed layout: trajectory t owns ``step_logits[cu_steps[t]:cu_steps[t+1]]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PROB_FLOOR = 1e-10
SPR_EPS = 1e-5
MODES = ("geometric", "arithmetic", "product", "min", "last")


def _acc(t: torch.Tensor) -> torch.dtype:
    """fp32 accumulation; fp64 stays fp64 (gradcheck)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def segment_ids(cu_steps: torch.Tensor, num_steps: int) -> torch.Tensor:
    """``[S]`` trajectory index of every step."""
    counts = (cu_steps[1:] - cu_steps[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=cu_steps.device), counts,
                                   output_size=num_steps)


def spr_counts(step_logits: torch.Tensor, cu_steps: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """``[2]`` int64: masked positives P (z > 0, y = 1) and masked negatives N (z < 0, y = 0)."""
    y = correct.to(torch.bool)[segment_ids(cu_steps, step_logits.numel())]
    z = step_logits.detach()
    return torch.stack([((z > 0) & y).sum(), ((z < 0) & ~y).sum()])


def spr_weights(counts, pos_weight: float) -> tuple[float, float]:
    """(w_pos, w_neg) = (pos_weight * N / (P+N), P / (P+N)); both 0 when P+N = 0.

    ``counts``: (P, N) as a tensor or a sequence of numbers.
    """
    p, n = (float(c) for c in counts)
    if p + n == 0:
        return 0.0, 0.0
    return pos_weight * n / (p + n), p / (p + n)


def spr_loss(step_logits: torch.Tensor, cu_steps: torch.Tensor, correct: torch.Tensor,
             counts: torch.Tensor | None = None, pos_weight: float = 1.5,
             batch_counts: torch.Tensor | None = None) -> torch.Tensor:
    """Masked, class-weighted BCE of the SPR loss.

    Args:
        step_logits: ``[S]`` head logits.
        cu_steps: ``[T+1]`` offsets.
        correct: ``[T]`` final-answer correctness (the label of every step of t).
        counts: ``[2]`` (P, N) summed over data-parallel ranks; default: this batch's.
        pos_weight: multiplier of the positive class weight.
        batch_counts: ``[2]`` (P, N) of the whole batch when these steps are a share of it (context
            parallelism): the denominator is then the batch's; default: these steps'.

    Returns:
        ``[]`` loss; zero (with a graph to ``step_logits``) when no step is masked.
    """
    dt = _acc(step_logits)
    y = correct.to(dt)[segment_ids(cu_steps, step_logits.numel())]
    z = step_logits.to(dt)
    counts = spr_counts(step_logits, cu_steps, correct) if counts is None else counts
    w_pos, w_neg = spr_weights(counts, pos_weight)
    with torch.no_grad():
        mask = ((z > 0) & (y > 0.5)) | ((z < 0) & (y < 0.5))
        w = (y * w_pos + (1 - y) * w_neg) * mask  # y is 0/1; keeps fp64 inputs in fp64
    bce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    if batch_counts is None:
        return (w * bce).sum() / (w.sum() + SPR_EPS)
    p, n = (float(c) for c in batch_counts)
    return (w * bce).sum() / (w_pos * p + w_neg * n + SPR_EPS)


def step_bce_loss(step_logits: torch.Tensor, cu_steps: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Ablation: plain BCE, every step labelled with its trajectory's correctness, no mask or weights."""
    dt = _acc(step_logits)
    y = correct.to(dt)[segment_ids(cu_steps, step_logits.numel())]
    if step_logits.numel() == 0:
        return step_logits.to(dt).sum() * 0.0
    return F.binary_cross_entropy_with_logits(step_logits.to(dt), y)


def segment_aggregate(values: torch.Tensor, cu_steps: torch.Tensor, mode: str = "geometric",
                      from_probs: bool = False) -> torch.Tensor:
    """Per-trajectory aggregate of step probabilities.

    Args:
        values: ``[S]`` logits (probabilities are their sigmoid) or, with
            ``from_probs``, probabilities.
        cu_steps: ``[T+1]`` offsets.
        mode: geometric | arithmetic | product | min | last.

    Returns:
        ``[T]`` float32 (float64 for float64 input); a trajectory without steps gets 0.
    """
    if mode not in MODES:
        raise ValueError(f"aggregation mode {mode!r} is not one of {', '.join(MODES)}")
    num_t = cu_steps.numel() - 1
    counts = (cu_steps[1:] - cu_steps[:-1]).long()
    seg = segment_ids(cu_steps, values.numel())
    dt = _acc(values)
    p = values.to(dt) if from_probs else torch.sigmoid(values.to(dt))
    out = torch.zeros(num_t, dtype=dt, device=values.device)
    nonempty = counts > 0
    if mode in ("geometric", "product"):
        logs = torch.log(torch.clamp(p, min=PROB_FLOOR))
        total = torch.zeros_like(out).index_add(0, seg, logs)
        if mode == "geometric":
            total = total / counts.clamp(min=1)
        return torch.where(nonempty, torch.exp(total), out)
    if mode == "arithmetic":
        total = torch.zeros_like(out).index_add(0, seg, p)
        return torch.where(nonempty, total / counts.clamp(min=1), out)
    if mode == "min":
        mins = torch.full_like(out, math.inf).scatter_reduce(0, seg, p, reduce="amin")
        return torch.where(nonempty, mins, out)
    last = (cu_steps[1:].long() - 1).clamp(min=0)
    return torch.where(nonempty, p[last] if p.numel() else out, out)
