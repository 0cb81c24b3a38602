"""What an iteration logs: rollout statistics and loss reports, summed over data-parallel replicas."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from megatron_rgm.compat.mcore import take_moe_router_losses
from megatron_rgm.data.store import Trajectory
from megatron_rgm.ops import segment_aggregate

COUNTS = ("spr positives", "spr negatives")  # loss reports already summed over data-parallel ranks


def device() -> torch.device:
    """Where collectives' tensors live: the GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def dp_sum(ps, values: list[float], with_cp: bool = False) -> list[float]:
    """``values`` summed over the data-parallel group (float64); ``with_cp``: and over context-parallel ranks,
    which hold shares of the same samples."""
    t = torch.tensor(values, dtype=torch.float64, device=device())
    if ps.get_data_parallel_world_size(with_context_parallel=with_cp) > 1:
        dist.all_reduce(t, group=ps.get_data_parallel_group(with_context_parallel=with_cp))
    return t.tolist()


def mean(xs) -> float:
    """The mean of the values that are not None (NaN for none)."""
    xs = [x for x in xs if x is not None]
    return float(sum(xs) / len(xs)) if xs else float("nan")


def rollout_metrics(ps, samples: list[Trajectory], aggregation: str) -> dict[str, float]:
    """Reward, accuracy, lengths and the head's mean trajectory score by correctness, over all replicas."""
    scores = [torch.as_tensor(np.asarray(s.step_scores if s.step_scores is not None else [], np.float32))
              for s in samples]
    cu = torch.tensor([0] + np.cumsum([len(x) for x in scores]).tolist(), dtype=torch.int32)
    agg = segment_aggregate(torch.cat(scores) if scores else torch.zeros(0), cu, aggregation, from_probs=True)
    correct = torch.tensor([s.correct for s in samples], dtype=torch.bool)
    length = torch.tensor([float(s.response_mask.sum()) for s in samples])
    sums = dp_sum(ps, [len(samples), float(correct.sum()), sum(s.reward for s in samples), float(length.sum()),
                       float(agg[correct].sum()), float(agg[~correct].sum()), float(sum(len(x) for x in scores))])
    n, n_correct, reward, length, score_c, score_i, steps = sums
    return {"reward": reward / n, "accuracy": n_correct / n, "response length": length / n,
            "steps per trajectory": steps / n,
            "score correct": score_c / n_correct if n_correct else float("nan"),
            "score incorrect": score_i / (n - n_correct) if n - n_correct else float("nan")}


def loss_metrics(ps, reports: list[dict]) -> dict[str, float]:
    """Token-weighted means of the micro-batches' loss reports over all replicas (the last stage's reports).

    Each report maps a name to ``(sum, weight)``. The SPR class counts and the step count are totals, not
    means; ``masked step fraction`` is the share of steps the SPR mask kept. Under context parallelism each rank
    reports its share of a micro-batch, and the shares are summed too.
    """
    if not reports:
        return {}
    dp = ps.get_data_parallel_world_size(with_context_parallel=True)  # the SPR counts come summed over these
    keys = sorted(reports[0])
    values = []
    for k in keys:
        per_micro = [r[k][0] / r[k][1].clamp(min=1) for r in reports]
        if k in COUNTS:
            values += [float(sum(per_micro)) / dp, 1.0]
        elif k == "steps":
            values += [float(sum(per_micro)), 1.0]
        else:
            values += [float(sum(r[k][0] for r in reports)), float(sum(r[k][1] for r in reports))]
    summed = dp_sum(ps, values, with_cp=True)
    out = {}
    for i, k in enumerate(keys):
        total, weight = summed[2 * i], summed[2 * i + 1]
        out[k] = total if k in COUNTS + ("steps",) else total / max(weight, 1.0)
    if "steps" in out and "spr positives" in out:
        out["masked step fraction"] = (out["spr positives"] + out["spr negatives"]) / max(out["steps"], 1.0)
    return out


def moe_router_losses(ps, num_microbatches: int, num_layers: int) -> dict[str, float]:
    """The routers' load-balancing losses of a step (``moe load balancing loss``: the mean over the MoE layers of
    every pipeline stage and over the micro-batches, averaged over data-parallel replicas, before its
    ``--moe-aux-loss-coeff``), logged apart from the GRPO and SPR losses. Collective."""
    out = {}
    for name, values in take_moe_router_losses().items():
        v = values.float().to(device())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(v, group=ps.get_pipeline_model_parallel_group())
        total = dp_sum(ps, [float(v.sum())])[0] / ps.get_data_parallel_world_size()
        out[f"moe {name.replace('_', ' ')}"] = total / num_layers / max(num_microbatches, 1)
    return out
