"""What one rank contributes to a checkpoint: its model chunks' sharded state, and who speaks."""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def say(msg: str) -> None:
    if rank() == 0:
        print(f"[checkpoint] {msg}", flush=True)


def unwrapped(chunks) -> list[torch.nn.Module]:
    """Each chunk under its DDP / Float16Module wrappers: the module that owns the sharded state."""
    out = []
    for chunk in chunks:
        inner = chunk
        while not hasattr(inner, "sprm") and hasattr(inner, "module"):  # an RGM model or attached GPTModel
            inner = inner.module
        while hasattr(inner, "module") and not hasattr(inner, "sharded_state_dict"):
            inner = inner.module
        out.append(inner)
    return out


def inner_module(chunks):
    return unwrapped(chunks)[0]


def model_sharded_state_dict(chunks) -> dict:
    """``{"model": ...}`` (or ``model0``, ``model1``, ... per virtual stage), Megatron-LM's keys."""
    chunks = unwrapped(chunks)
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


# A norm fused into the next linear, as Transformer Engine's layer spec names it (Megatron-LM's and Megatron-Bridge's
# GPU runs) -> the local spec's separate norm. Suffixes of the stacked layer keys ("decoder.layers.<suffix>").
TE_NORM_KEYS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def match_norm_names(state: dict, names: set[str]) -> int:
    """Point each model tensor whose key ``names`` (a checkpoint's) lacks at its name under the other layer spec,
    where the checkpoint has that one: a checkpoint saved with Transformer Engine's fused norms loads into the
    local spec, and the other way. Returns how many keys were redirected."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    other = {**TE_NORM_KEYS, **{v: k for k, v in TE_NORM_KEYS.items()}}
    redirected = 0
    for sh in nested_values(state):
        if not isinstance(sh, ShardedTensor) or sh.key in names or ".layers." not in sh.key:
            continue
        prefix, _, suffix = sh.key.partition(".layers.")
        alias = f"{prefix}.layers.{other.get(suffix, suffix)}"
        if alias in names:
            sh.key = alias
            redirected += 1
    return redirected
