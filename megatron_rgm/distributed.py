"""Process-group start-up from torchrun or SLURM, and megatron-core's parallel state.

One entry point, :func:`initialize`, works the same way on a laptop (gloo,
CPU) and on a cluster (nccl, one process per GPU):

* under ``torchrun`` it reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` and ``MASTER_PORT``;
* under ``srun`` without torchrun it reads ``SLURM_PROCID``, ``SLURM_NTASKS``,
  ``SLURM_LOCALID`` and takes the master address from the first host of
  ``SLURM_NODELIST`` (``MASTER_PORT`` if set, else one derived from
  ``SLURM_JOB_ID``);
* with neither, it runs as a single process.
"""

from __future__ import annotations

import datetime
import os
import random
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_rgm import cpu
from megatron_rgm.config import ParallelConfig


class LaunchError(RuntimeError):
    """The environment does not describe a consistent launch."""


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


def first_slurm_host(nodelist: str) -> str:
    """First host name of a SLURM node list.

    Handles the compressed forms SLURM writes: ``node07``, ``a,b``,
    ``gpu[003-010,012]``, ``rack1-[08-09]n``.

    Args:
        nodelist: the value of ``SLURM_NODELIST`` / ``SLURM_JOB_NODELIST``.

    Returns:
        The first host name.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise LaunchError("SLURM_NODELIST is empty: cannot choose a master address; set MASTER_ADDR")
    # The first entry ends at the first comma outside brackets.
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end]
    match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", entry)
    if not match:
        return entry
    prefix, ranges, suffix = match.groups()
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}{suffix}"


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def launch_info() -> LaunchInfo:
    """Read this process's rank and rendezvous address from the environment."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return LaunchInfo(
            rank=_int_env("RANK"),
            world_size=_int_env("WORLD_SIZE"),
            local_rank=_int_env("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0,
            master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int_env("MASTER_PORT") if "MASTER_PORT" in os.environ else 29500,
            launcher="torchrun",
        )
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        if "MASTER_ADDR" in os.environ:
            addr = os.environ["MASTER_ADDR"]
        else:
            nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
            if nodes is None:
                raise LaunchError("running under SLURM without SLURM_NODELIST: set MASTER_ADDR")
            addr = first_slurm_host(nodes)
        if "MASTER_PORT" in os.environ:
            port = _int_env("MASTER_PORT")
        else:
            # Every task of a job derives the same port; jobs sharing a node differ.
            port = 20000 + _int_env("SLURM_JOB_ID") % 20000 if "SLURM_JOB_ID" in os.environ else 29500
        return LaunchInfo(
            rank=_int_env("SLURM_PROCID"),
            world_size=_int_env("SLURM_NTASKS"),
            local_rank=_int_env("SLURM_LOCALID") if "SLURM_LOCALID" in os.environ else 0,
            master_addr=addr,
            master_port=port,
            launcher="slurm",
        )
    return LaunchInfo(0, 1, 0, "127.0.0.1", int(os.environ.get("MASTER_PORT", 29500)), "single")


def initialize(parallel: ParallelConfig | None = None) -> LaunchInfo:
    """Start the process group, megatron's parallel state and its RNG seeds.

    On a machine without CUDA this first applies :mod:`megatron_rgm.cpu`.
    Calling it again with the process group already up only rebuilds the
    parallel state (tests switch layouts this way inside one launch).

    Args:
        parallel: the layout; defaults to everything 1.

    Returns:
        This process's :class:`LaunchInfo`.
    """
    from megatron.core import parallel_state

    parallel = parallel or ParallelConfig()
    info = launch_info()
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        cpu.activate()
    backend = parallel.distributed_backend or ("nccl" if use_cuda else "gloo")

    if info.world_size % parallel.model_parallel_size() != 0:
        raise LaunchError(
            f"world size {info.world_size} is not divisible by tensor x pipeline x context parallel "
            f"size {parallel.model_parallel_size()}: launch a multiple of that many processes "
            "(torchrun --nproc-per-node / srun --ntasks) or change the parallel sizes"
        )

    timeout = datetime.timedelta(minutes=parallel.distributed_timeout_minutes)
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{info.master_addr}:{info.master_port}",
            rank=info.rank,
            world_size=info.world_size,
            timeout=timeout,
        )

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
    )
    set_seed(parallel.seed)
    return info


def set_seed(seed: int) -> None:
    """Seed python, torch and megatron's model-parallel RNG tracker.

    Pipeline stages get different default seeds (as in Megatron-LM) so that
    dropout differs between layers on different stages; tensor-parallel ranks
    share the default seed, so replicated modules (the SPRM head) draw the same
    dropout mask on every TP rank.
    """
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def shutdown() -> None:
    """Tear down megatron's parallel state and the process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
