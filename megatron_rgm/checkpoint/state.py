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
