"""Worker: load a pretrain checkpoint at TP/PP layouts, record the logits, optionally continue training.

Usage: reshard_logits.py CKPT MODEL_ARGV_JSON OUT LAYOUTS [CONTINUE_ARGV_JSON]

LAYOUTS is ``TPxPP[,TPxPP...]`` (each a layout of this launch's ranks). At each
layout the checkpoint's weights are loaded into a fresh model and the logits of
a fixed batch saved as ``OUT/logits_tp{tp}_pp{pp}.pt``; with CONTINUE_ARGV_JSON
the backbone check then resumes from CKPT at that layout (its flags plus these,
e.g. ``--train-iters 6``; model, optimizer and iteration from the checkpoint) and
its per-iteration losses go to ``OUT/continued_tp{tp}_pp{pp}.json``.
"""

import json
import os
import sys

import torch

from megatron_rgm import distributed
from megatron_rgm.arguments import parse_args
from megatron_rgm.checkpoint import load_checkpoint
from megatron_rgm.model import build_model


def at_layout(argv: list[str], tp: int, pp: int, padded_vocab: int) -> list[str]:
    """``argv`` at ``tp`` x ``pp`` with the saved padded vocabulary rows (argparse keeps a flag's last value)."""
    return argv + ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
                   "--vocab-size", str(padded_vocab), "--make-vocab-size-divisible-by", "1"]


def _reporting_rank() -> bool:
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0


def logits_at(ckpt: str, model_argv: list[str], padded_vocab: int, tp: int, pp: int):
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    args = parse_args(at_layout(model_argv, tp, pp, padded_vocab))
    distributed.initialize(args.parallel)
    model = build_model(args)[0]
    load_checkpoint(ckpt, [model])
    model.eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 500, (2, 16), generator=g)
    seen = {}

    def loss_func(output):
        seen["logits"] = tensor_parallel.gather_from_tensor_model_parallel_region(output)
        return output.sum() * 0.0, {}

    def step(it, m):
        return m(next(it), torch.arange(16).expand(2, 16), None), loss_func

    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=step, data_iterator=iter([ids]), model=[model],
                                    num_microbatches=1, seq_length=16, micro_batch_size=2, forward_only=True)
    return seen["logits"] if _reporting_rank() else None


def continue_at(ckpt: str, argv: list[str], padded_vocab: int, tp: int, pp: int):
    from megatron_rgm.pretrain import backbone_check

    args = parse_args(at_layout(argv + ["--load", ckpt], tp, pp, padded_vocab))
    losses = backbone_check(args)
    return losses if _reporting_rank() else None


def main():
    ckpt, model_argv_json, out, layouts = sys.argv[1:5]
    model_argv = json.loads(model_argv_json)
    cont_argv = json.loads(sys.argv[5]) if len(sys.argv) > 5 else None
    padded = parse_args(model_argv).vocab_size
    for layout in layouts.split(","):
        tp, pp = map(int, layout.split("x"))
        logits = logits_at(ckpt, model_argv, padded, tp, pp)
        if logits is not None:
            torch.save(logits, os.path.join(out, f"logits_tp{tp}_pp{pp}.pt"))
        if cont_argv is not None:
            losses = continue_at(ckpt, model_argv + cont_argv, padded, tp, pp)
            if losses is not None:
                with open(os.path.join(out, f"continued_tp{tp}_pp{pp}.json"), "w") as f:
                    json.dump(losses, f)
    distributed.shutdown()


if __name__ == "__main__":
    main()
