"""Worker: log-probs, entropy and their gradients on vocab-sharded logits (TP=2) vs full logits."""

import json
import os
import sys

import torch

from megatron_rgm import distributed
from megatron_rgm.rl import chunked_log_probs_and_entropy, vocab_parallel_entropy, vocab_parallel_log_probs


def main():
    distributed.initialize(distributed.ParallelConfig(tensor_model_parallel_size=2))
    from megatron.core import parallel_state as ps

    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, 7, 16, generator=g) * 3
    targets = torch.randint(0, 16, (3, 7), generator=g)
    rank = ps.get_tensor_model_parallel_rank()
    local = full.chunk(2, -1)[rank].clone().requires_grad_(True)
    ref = full.clone().requires_grad_(True)
    w = torch.randn(3, 7, generator=g)
    lp, ent = vocab_parallel_log_probs(local, targets), vocab_parallel_entropy(local)
    ((lp + 0.3 * ent) * w).sum().backward()
    lp_ref = torch.log_softmax(ref, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    p = torch.softmax(ref, -1)
    ent_ref = -(p * torch.log_softmax(ref, -1)).sum(-1)
    ((lp_ref + 0.3 * ent_ref) * w).sum().backward()
    # Megatron's padded vocabulary: ids >= 13 are padding (all on rank 1) and must carry no probability.
    real = 13
    t_real = targets.clamp(max=real - 1)
    lp_pad = vocab_parallel_log_probs(local.detach(), t_real, vocab_size=real)
    ent_pad = vocab_parallel_entropy(local.detach(), vocab_size=real)
    # Chunked (2 positions a chunk), at temperature 0.5, with the padded vocabulary: against the full softmax.
    chunk_local = full.chunk(2, -1)[rank].clone().requires_grad_(True)
    chunk_ref = full.clone().requires_grad_(True)
    clp, cent = chunked_log_probs_and_entropy(chunk_local, t_real, vocab_size=real, temperature=0.5,
                                              chunk_elements=2 * 8)
    ((clp + 0.3 * cent) * w).sum().backward()
    rlsm = torch.log_softmax(chunk_ref[..., :real] / 0.5, -1)
    rlp = rlsm.gather(-1, t_real.unsqueeze(-1)).squeeze(-1)
    rent = -(rlsm.exp() * rlsm).sum(-1)
    ((rlp + 0.3 * rent) * w).sum().backward()
    lsm = torch.log_softmax(full[..., :real], -1)
    out = {"logp_diff": (lp - lp_ref).abs().max().item(), "entropy_diff": (ent - ent_ref).abs().max().item(),
           "grad_diff": (local.grad - ref.grad.chunk(2, -1)[rank]).abs().max().item(),
           "padded_logp_diff": (lp_pad - lsm.gather(-1, t_real.unsqueeze(-1)).squeeze(-1)).abs().max().item(),
           "padded_entropy_diff": (ent_pad + (lsm.exp() * lsm).sum(-1)).abs().max().item(),
           "chunked_diff": max((clp - rlp).abs().max().item(), (cent - rent).abs().max().item()),
           "chunked_grad_diff": (chunk_local.grad - chunk_ref.grad.chunk(2, -1)[rank]).abs().max().item()}
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    distributed.shutdown()


if __name__ == "__main__":
    main()
