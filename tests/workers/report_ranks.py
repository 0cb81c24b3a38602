"""Worker: initialise from the environment (torchrun or SLURM) at TP=2 and report where each rank sits."""

import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_rgm import distributed


def main():
    out = sys.argv[1]
    info = distributed.initialize(distributed.ParallelConfig(tensor_model_parallel_size=2))
    from megatron.core import parallel_state as ps

    # A collective proves the group is really up.
    t = torch.tensor([float(info.rank)])
    dist.all_reduce(t)
    report = {
        "launcher": info.launcher, "rank": dist.get_rank(), "world": dist.get_world_size(),
        "local_rank": info.local_rank, "master": f"{info.master_addr}:{info.master_port}",
        "backend": dist.get_backend(), "tp_rank": ps.get_tensor_model_parallel_rank(),
        "tp_size": ps.get_tensor_model_parallel_world_size(), "sum_of_ranks": t.item(),
    }
    with open(os.path.join(out, f"rank{info.rank}.json"), "w") as f:
        json.dump(report, f)
    distributed.shutdown()


if __name__ == "__main__":
    main()
