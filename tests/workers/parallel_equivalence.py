"""Worker: TP/PP/SP layouts of RGMModel against TP=1/PP=1 on the same weights and batch.

Every rank first builds the TP=1/PP=1 model (data-parallel replicas, all the
same), records logits, head logits and gradients of a fixed loss, then
re-initialises megatron's parallel state for each layout, loads the same full
weights into its shards, runs one forward/backward through megatron's pipeline
schedule with megatron DDP and finalize_model_grads, and writes the max abs
differences it sees to <out>/rank<r>.json.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist

from common import fixed_batch, probe_loss, tiny_args

from megatron_rgm import distributed
from megatron_rgm.model import build_model
from megatron_rgm.model.state import full_state, gather_full, load_full_state

LAYOUTS = {
    "tp2": dict(tp=2),
    "tp2_sp": dict(tp=2, sp=True),
    "tp2_recompute": dict(tp=2, recompute=2),
    "tp2_head_dropout": dict(tp=2, head_dropout=0.5),
    "pp2": dict(pp=2),
    "pp2_untied": dict(pp=2, untied=True),
    "pp2_last_stage_one_layer": dict(pp=2, last_stage_layers=1),
    "pp2_last_stage_one_layer_recompute": dict(pp=2, last_stage_layers=1, recompute=1),
    "tp2_pp2": dict(tp=2, pp=2),
    "tp2_pp2_sp": dict(tp=2, pp=2, sp=True),
}


def reference(layout: dict):
    kw = {k: v for k, v in layout.items() if k in ("untied", "head_dropout")}
    args = tiny_args(**kw)
    distributed.initialize(args.parallel)
    model = build_model(args)[0]
    full = full_state(model)
    ids, pos, mask, logit_w, head_w = fixed_batch()
    logits, head = model(ids, pos, None, step_mask=mask)
    probe_loss(logits, head, logit_w, head_w).backward()
    grads = gather_full(model, {n: p.grad for n, p in model.named_parameters()})
    return full, logits.detach(), head.detach(), grads


def run_layout(layout: dict, full: dict):
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    args = tiny_args(**layout)
    distributed.initialize(args.parallel)
    chunk = build_model(args)[0]
    load_full_state(chunk, full)
    ddp = DistributedDataParallel(args.transformer, DistributedDataParallelConfig(), chunk)
    ddp.zero_grad_buffer()
    ids, pos, mask, logit_w, head_w = fixed_batch()
    seen = {}

    def loss_func(output):
        logits, head = output
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        seen["logits"], seen["head"] = logits.detach(), head.detach()
        return probe_loss(logits, head, logit_w, head_w), {}

    def step(data_iterator, model):
        batch_ids, batch_pos, batch_mask = next(data_iterator)
        out = model(batch_ids, batch_pos, None, step_mask=batch_mask)
        return out, loss_func

    get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([(ids, pos, mask)]), model=[ddp],
        num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=False,
    )
    finalize_model_grads([ddp])
    grads = gather_full(chunk, {n: p.main_grad for n, p in chunk.named_parameters()})
    head_grads = {n: g for n, g in grads.items() if n.startswith("sprm_head.")}
    return seen, grads, head_grads


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--layouts", nargs="+", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    results = {}
    for name in a.layouts:
        layout = LAYOUTS[name]
        full, ref_logits, ref_head, ref_grads = reference(layout)
        seen, grads, head_grads = run_layout(layout, full)
        from megatron.core import parallel_state as ps

        r = {"tp_rank": ps.get_tensor_model_parallel_rank(), "pp_rank": ps.get_pipeline_model_parallel_rank(),
             "reference_params": sorted(ref_grads), "grad_diff": {}}
        if "logits" in seen:
            r["logits_diff"] = max_diff(seen["logits"], ref_logits)
            r["head_diff"] = max_diff(seen["head"], ref_head)
            r["num_steps"] = int(seen["head"].numel())
        for n, g in grads.items():
            r["grad_diff"][n] = max_diff(g, ref_grads[n])
            r.setdefault("grad_abs_max", {})[n] = g.abs().max().item()
        if head_grads:
            # Replicated head: every TP rank must hold the same gradient.
            tp_group = ps.get_tensor_model_parallel_group()
            spread = 0.0
            for n, g in head_grads.items():
                parts = [torch.empty_like(g) for _ in range(ps.get_tensor_model_parallel_world_size())]
                dist.all_gather(parts, g.contiguous(), group=tp_group)
                spread = max(spread, max(max_diff(x, parts[0]) for x in parts))
            r["head_grad_tp_spread"] = spread
            r["head_grad_norm"] = float(sum(g.norm() ** 2 for g in head_grads.values()) ** 0.5)
        results[name] = r
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    distributed.shutdown()


if __name__ == "__main__":
    main()
