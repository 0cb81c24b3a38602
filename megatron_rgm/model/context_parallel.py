"""Context parallelism (CP): each rank of a CP group holds a share of every sequence.

The split is megatron's load-balanced one: a sequence of length ``s`` is cut into ``2 x cp`` chunks and CP rank
``r`` holds chunks ``r`` and ``2 cp - 1 - r``, so under the causal mask every rank does the same attention work.
Transformer Engine's attention (``--transformer-impl transformer_engine``) takes that layout as it is. For the
local implementation, which megatron-core refuses under CP, :class:`ContextParallelAttention` gathers the keys
and values of the whole sequence from the CP group and attends from this rank's queries with the causal mask of
their global positions: the same numbers as CP = 1, with the memory of the score matrix cut by ``cp``.

The rest is plumbing every implementation needs: :func:`split_batch` gives a rank its share of a micro-batch
(global ``position_ids`` included, so RoPE rotates by the true positions), :func:`gather_sequence` and
:func:`gather_step_logits` put per-token values and the head's step logits back in the whole sequence's order,
and :func:`context_parallel_off` lets one rank run whole sequences (the sampler) with CP switched off.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import attention_mask_func

from megatron_rgm.config import ConfigError


def cp_size() -> int:
    """The context-parallel world size (1 outside an initialised megatron run)."""
    if not ps.model_parallel_is_initialized():
        return 1
    return ps.get_context_parallel_world_size()


def chunk_positions(length: int, size: int, rank: int, device=None) -> torch.Tensor:
    """The global positions ``[length / size]`` CP rank ``rank`` of ``size`` holds: chunks ``rank`` and
    ``2 size - 1 - rank`` of ``2 size``."""
    if length % (2 * size):
        raise ValueError(f"a sequence of {length} tokens does not split into {2 * size} equal chunks for context "
                         f"parallelism {size}: pad micro-batches to a multiple of {2 * size}")
    c = length // (2 * size)
    first, second = rank * c, (2 * size - 1 - rank) * c
    return torch.cat([torch.arange(first, first + c, device=device), torch.arange(second, second + c, device=device)])


def split_batch(batch: dict) -> dict:
    """This CP rank's share of a whole micro-batch (the batch itself at CP = 1, or if already split).

    Every tensor laid out ``[b, s, ...]`` like ``tokens`` is cut along ``s``; ``position_ids`` are the global
    positions (from 0 per row when the batch has none). ``cp_tokens`` keeps the whole micro-batch's response-token
    count, the scale of its SPR term (:func:`megatron_rgm.integration.rgm_loss_func`).
    """
    size = cp_size()
    if size == 1 or batch.get("cp_local"):
        return batch
    if "cu_seqlens" in batch:
        raise ConfigError("packed rows cannot be split for context parallelism: run without --pack-sequences or "
                          "with --context-parallel-size 1")
    if batch.get("attention_mask") is not None:
        raise ConfigError("context parallelism takes causal batches without an explicit attention_mask: drop the "
                          "mask (Megatron-LM: --no-create-attention-mask-in-dataloader) or run with "
                          "--context-parallel-size 1")
    tokens = batch["tokens"]
    b, s = tokens.shape
    index = chunk_positions(s, size, ps.get_context_parallel_rank(), tokens.device)

    def share(key, v):
        if not torch.is_tensor(v) or v.dim() < 2:
            return v
        if tuple(v.shape[:2]) == (b, s) or (key == "position_ids" and v.shape[-1] == s):  # ([1, s] broadcast)
            return v.index_select(1, index)
        return v

    out = {k: share(k, v) for k, v in batch.items()}
    if "position_ids" not in batch:
        out["position_ids"] = index.unsqueeze(0).expand(b, -1)
    if "loss_mask" in batch:
        out["cp_tokens"] = batch["loss_mask"].float().sum()
    out["cp_local"] = True
    return out


def from_first_cp_rank(make):
    """``make()`` run on CP rank 0 only, its result sent to the other ranks of its CP group (rollouts: the CP ranks
    train on shares of the same samples, which they need not draw alike; their TP and PP groups are their own)."""
    if cp_size() == 1:
        return make()
    group = ps.get_context_parallel_group()
    box = [make() if ps.get_context_parallel_rank() == 0 else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


@torch.no_grad()
def gather_sequence(local: torch.Tensor, length: int) -> torch.Tensor:
    """``[b, length, ...]`` from every CP rank's ``[b, length / cp, ...]`` share (:func:`split_batch`'s inverse)."""
    size = cp_size()
    if size == 1:
        return local
    pieces = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(pieces, local.contiguous(), group=ps.get_context_parallel_group())
    full = local.new_empty((local.shape[0], length) + tuple(local.shape[2:]))
    for r, piece in enumerate(pieces):
        full[:, chunk_positions(length, size, r, local.device)] = piece
    return full


def gather_step_logits(local_logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """The whole micro-batch's step logits ``[S]`` in row-major order, from this CP rank's, given the whole
    ``batch`` (its ``step_mask``)."""
    if cp_size() == 1:
        return local_logits
    mask = batch["step_mask"].to(torch.bool)
    mine = split_batch({"tokens": batch["tokens"], "step_mask": mask})["step_mask"]
    placed = torch.zeros(mine.shape, dtype=local_logits.dtype, device=local_logits.device)
    placed[mine] = local_logits.detach()
    return gather_sequence(placed, mask.shape[1])[mask]


class _GatherSequence(torch.autograd.Function):
    """``[s/cp, ...]`` -> ``[s, ...]`` in rank order over the CP group; backward: the summed gradient's own block."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rows = group, x.shape[0]
        pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            mine = grad.new_empty((ctx.rows,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, grad, group=ctx.group)
            return mine, None
        dist.all_reduce(grad, group=ctx.group)  # gloo has no reduce-scatter
        rank = dist.get_rank(ctx.group)
        return grad[rank * ctx.rows:(rank + 1) * ctx.rows], None


class ContextParallelAttention(DotProductAttention):
    """megatron-core's local attention under context parallelism.

    The keys and values of the whole sequence are gathered from the CP group (the backward sums their gradients
    back); this rank's queries attend to them under the causal mask of their global positions. Everything else
    (scale, dropout, grouped-query heads, attention sinks) is megatron-core's ``DotProductAttention``. Sliding
    windows are refused. With ``context_parallel = False`` (:func:`context_parallel_off`) it is that class
    unchanged.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, **kwargs):
        if config.window_size is not None:
            raise ConfigError("sliding-window attention is not built for context parallelism with --transformer-impl "
                              "local: use --context-parallel-size 1 or --transformer-impl transformer_engine")
        local = copy.copy(config)
        local.context_parallel_size = 1  # megatron-core's class refuses CP; this one does the CP part itself
        super().__init__(local, layer_number, attn_mask_type, attention_type, attention_dropout=attention_dropout,
                         softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection, **kwargs)
        self.context_parallel = True
        causal = self.scale_mask_softmax
        # With an explicit mask (a rank's queries against the whole sequence is not square), not the causal kernel.
        self.masked_softmax = FusedScaleMaskSoftmax(
            input_in_fp16=causal.input_in_fp16, input_in_bf16=causal.input_in_bf16,
            attn_mask_type=AttnMaskType.padding, scaled_masked_softmax_fusion=causal.scaled_masked_softmax_fusion,
            mask_func=attention_mask_func, softmax_in_fp32=causal.softmax_in_fp32, scale=causal.scale)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if not self.context_parallel or cp_size() == 1:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params, **kwargs)
        if attention_mask is not None or packed_seq_params is not None:
            raise ConfigError("context parallelism with --transformer-impl local takes causal batches only (no "
                              "attention_mask, no packed rows)")
        group, size = ps.get_context_parallel_group(), cp_size()
        rank, rows = ps.get_context_parallel_rank(), query.shape[0]
        length = rows * size
        key, value = _GatherSequence.apply(key, group), _GatherSequence.apply(value, group)
        q_pos = chunk_positions(length, size, rank, query.device)
        k_pos = torch.cat([chunk_positions(length, size, r, query.device) for r in range(size)])
        mask = (k_pos.unsqueeze(0) > q_pos.unsqueeze(1)).view(1, 1, rows, length)  # True: not attended
        causal, self.scale_mask_softmax = self.scale_mask_softmax, self.masked_softmax
        try:
            return super().forward(query, key, value, mask, attn_mask_type, attention_bias, None, **kwargs)
        finally:
            self.scale_mask_softmax = causal


@contextlib.contextmanager
def context_parallel_off(modules: list):
    """While active, ``modules`` (model chunks) run whole sequences on each rank as at CP = 1: the attention
    attends locally, RoPE is not sliced, megatron's rotary length is not multiplied by CP. For the sampler."""
    if cp_size() == 1:
        yield
        return
    found = [m for module in modules for m in module.modules()]
    attention = [m for m in found if isinstance(m, ContextParallelAttention)]
    if not attention:
        raise ConfigError("rollouts under context parallelism are sampled with CP switched off, which needs "
                          "--transformer-impl local; use --context-parallel-size 1 for in-loop sampling with "
                          "Transformer Engine")
    ropes = [(m, m.cp_group) for m in found if isinstance(m, RotaryEmbedding)]
    configs = {id(m.config): m.config for m in found if getattr(m, "config", None) is not None
               and getattr(m.config, "context_parallel_size", 1) > 1}
    sizes = {k: c.context_parallel_size for k, c in configs.items()}
    for m in attention:
        m.context_parallel = False
    for m, _ in ropes:
        m.cp_group = None
    for c in configs.values():
        c.context_parallel_size = 1
    try:
        yield
    finally:
        for m in attention:
            m.context_parallel = True
        for m, group in ropes:
            m.cp_group = group
        for k, c in configs.items():
            c.context_parallel_size = sizes[k]
