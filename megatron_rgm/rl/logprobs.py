"""Log-probabilities and entropy of vocab-parallel logits, without gathering the vocabulary.

Under tensor parallelism each rank holds ``[..., V/tp]`` logits. Both functions
reduce across the tensor-parallel group with megatron's
``reduce_from_tensor_model_parallel_region`` (all-reduce forward, identity
backward), so each rank's gradient covers exactly its vocabulary slice. The
input logits are never modified in place (megatron's own
``vocab_parallel_cross_entropy`` works on its input's buffer).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


def _tp():
    if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return None, 1, 0
    return (parallel_state.get_tensor_model_parallel_group(),
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank())


def _global_max(x: torch.Tensor, group, size: int) -> torch.Tensor:
    m = x.max(dim=-1).values.detach()
    if size > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    return m


def _global_sum(x: torch.Tensor, size: int) -> torch.Tensor:
    # Every use of a reduced sum must come after the reduction: the identity
    # backward then hands each rank the same (global) gradient for its part.
    return reduce_from_tensor_model_parallel_region(x) if size > 1 else x


def _logsumexp(logits: torch.Tensor, group, size: int) -> torch.Tensor:
    """``[...]`` log-sum-exp over the full (sharded) vocabulary, in fp32."""
    x = logits.float()
    m = _global_max(x, group, size)
    return m + torch.log(_global_sum(torch.exp(x - m.unsqueeze(-1)).sum(-1), size))


_PADDED = -1e30  # finite: exp() gives 0 and 0 * (x - m) stays 0


def _real_vocab(logits: torch.Tensor, vocab_size: int | None, rank: int) -> torch.Tensor:
    """fp32 logits with the ids >= ``vocab_size`` (megatron's TP padding of the vocabulary) removed."""
    x = logits.float()
    if vocab_size is None:
        return x
    part = x.shape[-1]
    ids = torch.arange(rank * part, (rank + 1) * part, device=x.device)
    return x.masked_fill(ids >= vocab_size, _PADDED)


def _local_targets(targets: torch.Tensor, rank: int, part: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target's column in this rank's ``part`` vocabulary ids (``[..., 1]``, clamped into range) and whether
    the target is one of them."""
    local = targets - rank * part
    return local.clamp(0, part - 1).unsqueeze(-1), (local >= 0) & (local < part)


def vocab_parallel_log_probs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None
                             ) -> torch.Tensor:
    """``log softmax(logits)[target]`` for vocab-sharded logits.

    Args:
        logits: ``[b, s, V/tp]`` this rank's vocabulary slice (rank r holds ids
            ``[r*V/tp, (r+1)*V/tp)``).
        targets: ``[b, s]`` token ids in the full vocabulary.
        vocab_size: the tokenizer's vocabulary; ids from it up to the padded
            size are left out of the softmax, as the sampler leaves them out.

    Returns:
        ``[b, s]`` float32 log-probabilities, differentiable w.r.t. ``logits``.
    """
    group, size, rank = _tp()
    x = _real_vocab(logits, vocab_size, rank)
    column, inside = _local_targets(targets, rank, x.shape[-1])
    picked = x.gather(-1, column).squeeze(-1) * inside
    if size > 1:
        picked = reduce_from_tensor_model_parallel_region(picked)
    return picked - _logsumexp(x, group, size)


def vocab_parallel_entropy(logits: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """``[b, s]`` entropy of ``softmax(logits)`` over the full (sharded) vocabulary, float32.

    ``H = log S - T / S`` with ``S = sum exp(x - m)``, ``T = sum exp(x - m) (x - m)``,
    both summed over every rank's slice before they are used. ``vocab_size``:
    as for :func:`vocab_parallel_log_probs`.
    """
    group, size, rank = _tp()
    x = _real_vocab(logits, vocab_size, rank)
    m = _global_max(x, group, size)
    shifted = x - m.unsqueeze(-1)
    e = torch.exp(shifted)
    s = _global_sum(e.sum(-1), size)
    t = _global_sum((e * shifted).sum(-1), size)
    return torch.log(s) - t / s


# Rows of [tokens, V/tp] fp32 work a chunk holds at once: 2^25 floats (128 MiB) by default.
CHUNK_ELEMENTS = 1 << 25


class _ChunkedLogProbs(torch.autograd.Function):
    """Log-probs (and entropy) of vocab-sharded logits, a chunk of positions at a time, forward and backward.

    Saves for backward only what it was given and two floats a position (the log-sum-exp and the entropy): the
    fp32 softmax of a chunk is rebuilt in backward, so no full fp32 copy of ``[tokens, V/tp]`` ever exists.
    """

    @staticmethod
    def forward(ctx, logits, targets, vocab_size, temperature, rows, with_entropy):
        group, size, rank = _tp()
        flat, tgt = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        n, part = flat.shape
        lse = torch.empty(n, dtype=torch.float32, device=flat.device)
        logp = torch.empty_like(lse)
        ent = torch.empty_like(lse) if with_entropy else None
        for a in range(0, n, rows):
            x = _real_vocab(flat[a:a + rows], vocab_size, rank) / temperature
            m = _global_max(x, group, size)
            shifted = x - m.unsqueeze(-1)
            e = torch.exp(shifted)
            column, inside = _local_targets(tgt[a:a + rows], rank, part)
            picked = x.gather(-1, column).squeeze(-1) * inside
            sums = [e.sum(-1), picked] + ([(e * shifted).sum(-1)] if with_entropy else [])
            sums = torch.stack(sums)
            if size > 1:
                dist.all_reduce(sums, group=group)  # one reduction for S, the target's logit and T
            lse[a:a + rows] = m + torch.log(sums[0])
            logp[a:a + rows] = sums[1] - lse[a:a + rows]
            if with_entropy:
                ent[a:a + rows] = torch.log(sums[0]) - sums[2] / sums[0]
        ctx.save_for_backward(logits, targets, lse, *([ent] if with_entropy else []))
        ctx.args = (vocab_size, temperature, rows, with_entropy)
        shape = targets.shape
        return logp.view(shape), (ent.view(shape) if with_entropy else torch.zeros(shape, device=logp.device))

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        logits, targets, lse, *rest = ctx.saved_tensors
        vocab_size, temperature, rows, with_entropy = ctx.args
        _, _, rank = _tp()
        flat, tgt = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        n, part = flat.shape
        g_lp = grad_logp.reshape(-1).float()
        g_h = grad_ent.reshape(-1).float() if with_entropy else None
        grad = torch.empty_like(flat)
        for a in range(0, n, rows):
            x = _real_vocab(flat[a:a + rows], vocab_size, rank) / temperature
            z = x - lse[a:a + rows].unsqueeze(-1)  # log p
            p = torch.exp(z)
            # d logp / dx = onehot(target) - p;  d H / dx = -p (log p + H)
            g = -p * g_lp[a:a + rows].unsqueeze(-1)
            if with_entropy:
                g -= p * (z + rest[0][a:a + rows].unsqueeze(-1)) * g_h[a:a + rows].unsqueeze(-1)
            column, inside = _local_targets(tgt[a:a + rows], rank, part)
            g.scatter_add_(-1, column, (g_lp[a:a + rows] * inside).unsqueeze(-1))
            grad[a:a + rows] = g / temperature
        return grad.view_as(logits), None, None, None, None, None


def chunked_log_probs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None,
                                  temperature: float = 1.0, entropy: bool = True,
                                  chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`vocab_parallel_log_probs` and :func:`vocab_parallel_entropy` of ``logits / temperature`` in one pass,
    a chunk of positions at a time (forward and backward): the fp32 work is ``chunk_elements`` floats, not a copy
    of the logits. Equal to the unchunked functions within fp32 rounding.

    Args:
        logits: ``[b, s, V/tp]`` this rank's vocabulary slice, any float dtype (not copied or changed).
        targets: ``[b, s]`` token ids in the full vocabulary.
        vocab_size: the tokenizer's vocabulary (ids past it are padding, left out).
        temperature: the sampling temperature the log-probs are taken at.
        entropy: also return the entropy (else None).

    Returns:
        ``([b, s] log-probs, [b, s] entropy or None)``, float32, differentiable w.r.t. ``logits``.
    """
    rows = max(1, chunk_elements // logits.shape[-1])
    logp, ent = _ChunkedLogProbs.apply(logits, targets, vocab_size, float(temperature), rows, entropy)
    return logp, (ent if entropy else None)
