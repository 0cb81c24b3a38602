"""Full (TP=1, PP=1) tensors <-> this rank's shards of an RGMModel.

Names are the model's own parameter names with layer numbers made global
(``decoder.layers.{i}.`` counts from the first layer of the whole model). A
last pipeline stage that ties its output layer to the embedding holds
``output_layer.weight`` as its copy of ``embedding.word_embeddings.weight``.

Tensor-parallel splits: column-parallel weights (QKV, FC1, output layer,
embedding) along dim 0, row-parallel ones (attention projection, FC2) along
dim 1, with one twist: the gated MLP's ``linear_fc1`` stacks [gate; up] and
each rank holds [gate_r; up_r].
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


def _layer_offset(model) -> int:
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def global_name(model, local_name: str) -> str:
    """Parameter name with the layer index counted over the whole model, and an expert's index over all experts
    (expert parallelism holds ``num_moe_experts / EP`` of them per rank, numbered from 0)."""
    offset = _layer_offset(model)
    name = _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", local_name)
    if _LOCAL_EXPERT.search(name):
        local = model.config.num_moe_experts // parallel_state.get_expert_model_parallel_world_size()
        first = parallel_state.get_expert_model_parallel_rank() * local
        name = _LOCAL_EXPERT.sub(lambda m: f".mlp.experts.local_experts.{int(m.group(1)) + first}.", name)
    if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    return name


# Which parameters tensor parallelism splits, by name (megatron sets the partition
# attributes only when it initialises the weights itself).
_COLUMN_SPLIT = ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias",
                 "output_layer.weight", "word_embeddings.weight", "core_attention.softmax_offset")
_ROW_SPLIT = ("linear_proj.weight", "linear_fc2.weight")


def partition(model, name: str, param: torch.Tensor) -> tuple[int | None, bool]:
    """(partition dim or None if replicated, whether the dim stacks [gate; up]). Experts are split over the
    tensor-parallel ranks unless their expert tensor parallelism is 1 (the only other size built)."""
    if ".mlp.experts." in name and model.config.expert_tensor_parallel_size == 1:
        return None, False
    if name.endswith(_COLUMN_SPLIT):
        return 0, bool(model.config.gated_linear_unit) and "linear_fc1." in name
    if name.endswith(_ROW_SPLIT):
        return 1, False
    return None, False


def shard(full: torch.Tensor, dim: int | None, gated: bool, rank: int, size: int) -> torch.Tensor:
    """This TP rank's slice of a full tensor."""
    if dim is None or size == 1:
        return full
    if gated:
        return torch.cat([part.chunk(size, dim)[rank] for part in full.chunk(2, dim)], dim)
    return full.chunk(size, dim)[rank]


def unshard(parts: list[torch.Tensor], dim: int | None, gated: bool) -> torch.Tensor:
    """Inverse of :func:`shard` given every TP rank's slice in rank order."""
    if dim is None or len(parts) == 1:
        return parts[0]
    if gated:
        halves = [p.chunk(2, dim) for p in parts]
        return torch.cat([torch.cat([h[0] for h in halves], dim), torch.cat([h[1] for h in halves], dim)], dim)
    return torch.cat(parts, dim)


@torch.no_grad()
def load_full_state(model, full: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into this rank's parameters.

    Args:
        model: an (unwrapped) :class:`RGMModel` chunk.
        full: global name -> full tensor, as :func:`full_state` returns.
    """
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    for name, param in model.named_parameters():
        key = global_name(model, name)
        if key not in full:
            raise KeyError(f"no tensor {key!r} (for parameter {name!r}) in the given state")
        dim, gated = partition(model, name, param)
        piece = shard(full[key], dim, gated, rank, size)
        if piece.shape != param.shape:
            raise ValueError(f"{key}: expected shard shape {tuple(param.shape)}, got {tuple(piece.shape)}")
        param.copy_(piece)


@torch.no_grad()
def gather_full(model, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Full tensors of this rank's parameters (or of per-parameter tensors such as grads).

    Collective over the tensor-parallel group.

    Args:
        model: an (unwrapped) :class:`RGMModel` chunk.
        tensors: local parameter name -> tensor shaped like that parameter;
            defaults to the parameters themselves.

    Returns:
        global name -> full tensor, for the parameters of this pipeline stage.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    size = parallel_state.get_tensor_model_parallel_world_size()
    out = {}
    for name, param in model.named_parameters():
        local = (tensors[name] if tensors is not None else param).detach().contiguous()
        dim, gated = partition(model, name, param)
        if dim is None or size == 1:
            out[global_name(model, name)] = local.clone()
            continue
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local, group=group)
        out[global_name(model, name)] = unshard(parts, dim, gated)
    return out


def full_state(model) -> dict[str, torch.Tensor]:
    """Full tensors of every parameter of the whole model, on every rank.

    Collective over all ranks of the model-parallel group (TP gather, then an
    exchange between pipeline stages).
    """
    mine = gather_full(model)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp == 1:
        return mine
    parts: list[dict | None] = [None] * pp
    dist.all_gather_object(parts, mine, group=parallel_state.get_pipeline_model_parallel_group())
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    return merged
