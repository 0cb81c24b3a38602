"""SPR loss and step-score aggregation over packed trajectories.

Each op dispatches to the ``megatron_rgm._C`` extension (C++ on the CPU, CUDA
on a GPU) and falls back to the pure-torch reference (:mod:`.reference`) with
one warning when the extension is missing; ``MEGATRON_RGM_REQUIRE_EXT=1``
turns that into an error. ``MEGATRON_RGM_CPU_ISA`` forces the CPU kernels onto one
instruction set (``avx512``, ``avx2`` or ``default``).

Packed layout: trajectory t owns ``step_logits[cu_steps[t]:cu_steps[t+1]]``
(``cu_steps`` like flash-attn's ``cu_seqlens``).
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_rgm.ops import reference
from megatron_rgm.ops.reference import MODES, SPR_EPS, step_bce_loss

__all__ = ["spr_loss", "segment_aggregate", "step_bce_loss", "extension", "SPRStats", "MODES"]

_EXT = None
_EXT_ERROR: str | None = None
_WARNED = False


def extension():
    """The compiled ``megatron_rgm._C`` module, or None (with one warning) if it is missing.

    Raises:
        RuntimeError: it is missing and ``MEGATRON_RGM_REQUIRE_EXT=1``.
    """
    global _EXT, _EXT_ERROR, _WARNED
    if _EXT is None and _EXT_ERROR is None:
        try:
            from megatron_rgm import _C
        except ImportError as e:
            _EXT_ERROR = str(e)
        else:
            _select_cpu_isa(_C)
            _EXT = _C
    if _EXT is not None:
        return _EXT
    if os.environ.get("MEGATRON_RGM_REQUIRE_EXT", "0") == "1":
        raise RuntimeError(
            f"megatron_rgm._C is not built ({_EXT_ERROR}) and MEGATRON_RGM_REQUIRE_EXT=1: reinstall with "
            "`pip install --no-build-isolation -e .` on a machine with a C++ compiler"
        )
    if not _WARNED:
        warnings.warn(f"megatron_rgm._C is not built ({_EXT_ERROR}); using the pure-torch reference ops")
        _WARNED = True
    return None


def _select_cpu_isa(ext) -> None:
    """``MEGATRON_RGM_CPU_ISA=avx2|avx512|default`` runs the CPU kernels on that instruction set instead of
    the best one this processor has, so one machine can run the whole suite on each of its paths."""
    wanted = os.environ.get("MEGATRON_RGM_CPU_ISA", "")
    if not wanted:
        return
    available = list(ext.cpu_isas())
    if wanted not in available:
        raise RuntimeError(f"MEGATRON_RGM_CPU_ISA={wanted!r} is not an instruction set this processor's kernels "
                           f"can run; choose one of {available}, or unset it for the best ({available[0]})")
    ext._use_cpu_isa(wanted)


def _use_ext(t: torch.Tensor):
    ext = extension()
    if ext is None or (t.is_cuda and not ext.cuda_compiled()):
        return None
    return ext


class SPRStats(NamedTuple):
    """Masked-step counts behind the SPR loss (summed over the group)."""

    positives: torch.Tensor  # P: steps with z > 0 in correct trajectories
    negatives: torch.Tensor  # N: steps with z < 0 in incorrect trajectories


class _SPRLoss(torch.autograd.Function):
    """Loss from precomputed sums; backward by the kernel. ``weights = (w_pos, w_neg, den)``."""

    @staticmethod
    def forward(ctx, step_logits, cu_steps, correct, loss_value, weights):
        ctx.save_for_backward(step_logits, cu_steps, correct)
        ctx.weights = weights
        dtype = torch.float64 if step_logits.dtype == torch.float64 else torch.float32
        return torch.tensor(loss_value, dtype=dtype, device=step_logits.device)

    @staticmethod
    def backward(ctx, grad):
        step_logits, cu_steps, correct = ctx.saved_tensors
        w_pos, w_neg, den = ctx.weights
        g = extension().spr_backward(step_logits, cu_steps, correct, float(grad) / den, w_pos, w_neg)
        return g, None, None, None, None


def _check_packed(values: torch.Tensor, cu_steps: torch.Tensor, name: str, check_end: bool = True) -> None:
    """Shapes and dtypes; with ``check_end`` also ``cu_steps[-1] == S`` (the kernel checks it itself)."""
    if values.dim() != 1:
        raise ValueError(f"{name} must be 1-D [S] (packed steps), got shape {tuple(values.shape)}")
    if cu_steps.dim() != 1 or cu_steps.numel() < 1:
        raise ValueError(f"cu_steps must be 1-D [T+1], got shape {tuple(cu_steps.shape)}")
    if cu_steps.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_steps must be int32 or int64, got {cu_steps.dtype}")
    if check_end and cu_steps.numel() > 1 and int(cu_steps[-1]) != values.numel():
        raise ValueError(
            f"cu_steps ends at {int(cu_steps[-1])} but {name} has {values.numel()} steps: "
            "cu_steps[-1] must equal the number of packed steps"
        )


def spr_loss(step_logits: torch.Tensor, cu_steps: torch.Tensor, correct: torch.Tensor, *,
             pos_weight: float = 1.5, group: dist.ProcessGroup | None = None,
             split_group: dist.ProcessGroup | None = None, return_stats: bool = False):
    """The self-supervised process reward (SPR) loss.

    Mask ``m = (z > 0 and y = 1) or (z < 0 and y = 0)``; weights ``pos_weight
    * N/(P+N)`` on positives and ``P/(P+N)`` on negatives, where P, N count
    the masked steps over ``group``; loss ``sum(m w BCE) / (sum(m w) + 1e-5)``.

    Args:
        step_logits: ``[S]`` head logits (fp32/bf16/fp16/fp64).
        cu_steps: ``[T+1]`` int offsets.
        correct: ``[T]`` final-answer correctness (bool or 0/1).
        pos_weight: positive-class multiplier (1.5).
        group: data-parallel group the counts are summed over; None: this batch only.
        split_group: the group this batch's steps are split over (context parallelism; inside ``group``): the
            denominator is the whole batch's, so the split ranks' losses add up to the batch's loss.
        return_stats: also return :class:`SPRStats`.

    Returns:
        ``[]`` loss (fp32; fp64 for fp64 input); zero with a graph to
        ``step_logits`` when no step is masked. With ``return_stats``:
        ``(loss, SPRStats)``.
    """
    _check_packed(step_logits, cu_steps, "step_logits")
    if correct.numel() != cu_steps.numel() - 1:
        raise ValueError(f"correct has {correct.numel()} entries but cu_steps describes "
                         f"{cu_steps.numel() - 1} trajectories")
    correct = correct.to(device=step_logits.device, dtype=torch.bool)
    cu_steps = cu_steps.to(step_logits.device)
    ext = _use_ext(step_logits)
    if ext is not None:
        # One pass: local [P, N, sum of masked positive BCE, sum of masked negative BCE].
        local = ext.spr_stats(step_logits.detach(), cu_steps, correct)
        counts = local[:2]
    else:
        counts = reference.spr_counts(step_logits, cu_steps, correct).to(torch.float64)
    batch_counts = counts.to(torch.float64)
    if split_group is not None and dist.get_world_size(split_group) > 1:
        batch_counts = batch_counts.clone()
        dist.all_reduce(batch_counts, group=split_group)
    if group is not None and dist.get_world_size(group) > 1:
        counts = counts.clone()
        dist.all_reduce(counts, group=group)
    w_pos, w_neg = reference.spr_weights(counts.tolist(), pos_weight)
    if ext is not None:
        p_loc, n_loc, bce_pos, bce_neg = local.tolist()
        p_all, n_all = batch_counts.tolist()
        den = w_pos * p_all + w_neg * n_all + SPR_EPS
        loss = _SPRLoss.apply(step_logits, cu_steps, correct, (w_pos * bce_pos + w_neg * bce_neg) / den,
                              (w_pos, w_neg, den))
    else:
        loss = reference.spr_loss(step_logits, cu_steps, correct, counts=counts, pos_weight=pos_weight,
                                  batch_counts=batch_counts)
    if return_stats:
        return loss, SPRStats(counts[0].clone(), counts[1].clone())
    return loss


def segment_aggregate(step_logits: torch.Tensor, cu_steps: torch.Tensor, mode: str = "geometric", *,
                      from_probs: bool = False) -> torch.Tensor:
    """Per-trajectory aggregate of step probabilities ``sigmoid(step_logits)``.

    Args:
        step_logits: ``[S]`` logits; with ``from_probs`` the probabilities themselves.
        cu_steps: ``[T+1]`` int offsets.
        mode: geometric (``exp(mean(log(clamp(p, 1e-10))))``) | arithmetic |
            product | min | last.

    Returns:
        ``[T]`` float32 (float64 for float64 input); 0 for a trajectory without steps.
        Differentiable for every mode (geometric and arithmetic in the kernel).
    """
    if mode not in MODES:
        raise ValueError(f"aggregation {mode!r} is not one of {', '.join(MODES)}")
    # Per-call Python costs about as much as the kernel at 10^4 steps: the kernel checks that
    # cu_steps ends at S (the same ValueError), and cu_steps moves only when it must.
    _check_packed(step_logits, cu_steps, "step_logits", check_end=False)
    if cu_steps.device != step_logits.device:
        cu_steps = cu_steps.to(step_logits.device)
    ext = _use_ext(step_logits)
    needs_grad = step_logits.requires_grad and torch.is_grad_enabled()
    if ext is None or (needs_grad and mode not in ("geometric", "arithmetic")):
        _check_packed(step_logits, cu_steps, "step_logits")
        return reference.segment_aggregate(step_logits, cu_steps, mode, from_probs=from_probs)
    if needs_grad:
        # A C++ autograd function: the forward also writes each step's derivative, the backward
        # (no Python) multiplies it by its trajectory's coefficient.
        return ext.segment_aggregate_autograd(step_logits, cu_steps, MODES.index(mode), from_probs)
    return ext.segment_aggregate(step_logits, cu_steps, MODES.index(mode), from_probs)
