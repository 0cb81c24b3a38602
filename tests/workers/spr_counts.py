"""Worker: spr_loss over a 2-rank data-parallel group, each rank holding different trajectories."""

import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_rgm import ops
from megatron_rgm.ops import reference


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    lengths = torch.randint(1, 20, (8 + 5 * rank,), generator=g)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    logits = torch.randn(int(lengths.sum()), generator=g) * 3
    correct = torch.rand(lengths.numel(), generator=g) < (0.3 + 0.4 * rank)
    loss, stats = ops.spr_loss(logits, cu, correct, group=dist.group.WORLD, return_stats=True)
    local = reference.spr_counts(logits, cu, correct)
    global_counts = torch.stack([stats.positives, stats.negatives])
    ref = reference.spr_loss(logits, cu, correct, counts=global_counts)
    out = {
        "local": [int(x) for x in local], "global": [int(x) for x in global_counts],
        "weights": list(reference.spr_weights(global_counts, 1.5)),
        "loss_diff_vs_reference_with_global_counts": abs(loss.item() - ref.item()),
    }
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
