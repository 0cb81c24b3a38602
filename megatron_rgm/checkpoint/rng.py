"""Random states in a checkpoint, in two layouts.

* ours (``rng_state_per_rank``): one object per (pp, tp, dp) rank holding python, torch
  (and CUDA), megatron's tracker and the data-order generator, restored bit for bit when
  the layout is the same;
* Megatron-LM's (``rng_state``): one object per (pp, tp) rank, data-parallel ranks as
  replicas, a list of every data-parallel rank's states under its key names.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist

RNG_KEY = "rng_state_per_rank"  # ours; "rng_state" holds Megatron-LM's layout (older RGM checkpoints: ours)


def layout() -> dict:
    from megatron.core import parallel_state as ps

    out = {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
           "dp": ps.get_data_parallel_world_size()}
    cp = ps.get_context_parallel_world_size()
    return {**out, "cp": cp} if cp > 1 else out  # without CP, the layout checkpoints recorded before CP ran


def rng_state(data_generator: torch.Generator | None = None) -> dict:
    """This rank's random states: python, torch CPU (and CUDA), megatron's tracker, a data generator."""
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if data_generator is not None:
        state["data"] = data_generator.get_state()
    return state


def set_rng_state(state: dict, data_generator: torch.Generator | None = None) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if data_generator is not None and "data" in state:
        data_generator.set_state(state["data"])


def rng_object(data_generator: torch.Generator | None, key: str = "rng_state"):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedObject

    # One object per (pp, tp, dp) rank, and per context-parallel rank under CP: the states differ between all of
    # them (a CP rank's dropout draws as many numbers as its share of the batch holds steps).
    shape = [ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size()]
    offset = [ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()]
    if ps.get_context_parallel_world_size() > 1:  # (the three-way shape of checkpoints without CP stays as it was)
        shape.append(ps.get_context_parallel_world_size())
        offset.append(ps.get_context_parallel_rank())
    return ShardedObject(key, rng_state(data_generator), tuple(shape), tuple(offset), replica_id=0)


def _megatron_lm_rng_state() -> dict:
    """This rank's states under Megatron-LM's names (``megatron.training.checkpointing.get_rng_state``)."""
    from megatron.core import tensor_parallel

    # On the CPU (megatron_rgm.cpu) the "CUDA" generator megatron forks is the CPU one.
    cuda_state = torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state()
    return {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": cuda_state,
            "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}


def megatron_lm_rng_states() -> list:
    """Every data-parallel rank's states, in dp-rank order (Megatron-LM picks ``[dp_rank]`` under
    ``--data-parallel-random-init``, else ``[0]``). Collective over the data-parallel group."""
    from megatron.core import parallel_state as ps

    mine = _megatron_lm_rng_state()
    size = ps.get_data_parallel_world_size()
    if size == 1 or not dist.is_initialized():
        return [mine]
    states = [None] * size
    dist.all_gather_object(states, mine, group=ps.get_data_parallel_group())
    return states


def megatron_lm_rng_object(value):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedObject

    # Megatron-LM's layout: one object per (pp, tp) rank, data-parallel ranks are replicas.
    return ShardedObject("rng_state", value,
                         (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                         replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


def set_megatron_lm_rng_state(states: list) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    dp_rank = ps.get_data_parallel_rank()
    state = states[dp_rank] if len(states) > dp_rank else states[0]
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])
