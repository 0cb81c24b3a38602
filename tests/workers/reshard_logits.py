"""Worker: load a pretrain checkpoint at TP=2/PP=1 and at TP=1/PP=2 (2 ranks) and record the logits."""

import json
import os
import sys

import torch

from megatron_rgm import distributed
from megatron_rgm.arguments import parse_args
from megatron_rgm.convert.verify import _with_layout
from megatron_rgm.model import build_model
from megatron_rgm.training.checkpointing import load_checkpoint


def logits_at(ckpt: str, model_argv: list[str], padded_vocab: int, tp: int, pp: int):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    args = parse_args(_with_layout(model_argv, tp, pp, padded_vocab))
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
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        return seen["logits"]
    return None


def main():
    ckpt, model_argv_json, out = sys.argv[1:4]
    model_argv = json.loads(model_argv_json)
    padded = parse_args(model_argv).vocab_size
    for tp, pp in ((2, 1), (1, 2)):
        logits = logits_at(ckpt, model_argv, padded, tp, pp)
        if logits is not None:
            torch.save(logits, os.path.join(out, f"logits_tp{tp}_pp{pp}.pt"))
    distributed.shutdown()


if __name__ == "__main__":
    main()
