"""Megatron's optimizer with the SPRM head in its own param group, learning rate and gradient clip.

The head's group carries ``sprm_head=True``, its own ``max_lr`` (``--sprm-lr``,
10x the policy's by default) and weight decay. :func:`optimizer_step` replaces
``optimizer.step()``: after the gradients are ready it clips the policy's and
the head's gradients each by their own norm, then steps. Norms follow
megatron's rules (tensor-parallel duplicates and shared weights counted once,
reduced over the optimizer's gradient-statistics group, which spans the whole
model-parallel group and, with the distributed optimizer, the data-parallel
shards), so they are the same on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from megatron.core import tensor_parallel
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, ParamKey, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import param_is_not_shared

from megatron_rgm.arguments import lr_schedule
from megatron_rgm.integration import HEAD_PARAMS

HEAD_GROUP_KEY = "sprm_head"


def ddp_config(args) -> DistributedDataParallelConfig:
    """megatron-core's DDP options from Megatron-LM's flags: the distributed optimizer, overlapped and bucketed
    gradient reduction, gradients kept and reduced in fp32."""
    par = args.parallel
    return DistributedDataParallelConfig(
        use_distributed_optimizer=args.optim.use_distributed_optimizer, overlap_grad_reduce=par.overlap_grad_reduce,
        grad_reduce_in_fp32=par.accumulate_allreduce_grads_in_fp32, bucket_size=par.ddp_bucket_size)


def _one_dimensional(param: torch.Tensor) -> bool:
    return param.dim() == 1


def build_optimizer(model_chunks, optim, transformer_config):
    """``get_megatron_optimizer`` over the chunks (DDP-wrapped), with the head's param group.

    Args:
        model_chunks: this rank's DDP-wrapped model chunks.
        optim: :class:`megatron_rgm.config.OptimConfig` (lr, head lr, weight decays, distributed optimizer).
        transformer_config: the model's TransformerConfig (precision).
    """
    min_lr, head_min_lr = optim.floors()
    config = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=min_lr, weight_decay=optim.weight_decay, clip_grad=optim.clip_grad,
        use_distributed_optimizer=optim.use_distributed_optimizer, bf16=transformer_config.bf16,
        fp16=transformer_config.fp16, params_dtype=transformer_config.params_dtype,
    )
    head_decay = optim.sprm_weight_decay
    overrides = {
        # Biases and norm weights take no weight decay (megatron's default rule).
        ParamKey(predicate=(_one_dimensional,)): {"wd_mult": 0.0},
        # is_decoupled_lr marks the head's groups apart from the policy's in the checkpoint: megatron
        # matches saved and current param groups by (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr).
        ParamKey(name=HEAD_PARAMS): {
            "max_lr": optim.head_lr, "min_lr": head_min_lr, HEAD_GROUP_KEY: True, "base_weight_decay": head_decay,
            "is_decoupled_lr": True},
    }
    return get_megatron_optimizer(config, model_chunks, config_overrides=overrides)


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def set_learning_rates(optimizer, optim, iteration: int, train_iters: int) -> dict[str, float]:
    """Each param group's learning rate at ``iteration`` by megatron-core's own scheduler (linear warm-up over
    ``--lr-warmup-iters``, then ``--lr-decay-style`` down to ``--min-lr``), counted in iterations; returns
    ``{"lr", "sprm lr"}``. The policy's and the head's peaks and floors come from ``optim``."""
    (low, head_low), out = optim.floors(), {}
    schedule = OptimizerParamScheduler(SimpleNamespace(param_groups=[]), init_lr=0.0, max_lr=optim.lr, min_lr=low,
                                       start_wd=0.0, end_wd=0.0, wd_incr_steps=1, wd_incr_style="constant",
                                       **lr_schedule(optim, train_iters))
    schedule.num_steps = iteration
    for opt in _inner_optimizers(optimizer):
        for group in opt.param_groups:
            head = group.get(HEAD_GROUP_KEY, False)
            group["max_lr"], group["min_lr"] = (optim.head_lr, head_low) if head else (optim.lr, low)
            group["lr"] = out["sprm lr" if head else "lr"] = schedule.get_lr(group)
            group["weight_decay"] = group.get("base_weight_decay", optim.weight_decay) * group.get("wd_mult", 1.0)
    out.setdefault("lr", schedule.get_lr({"max_lr": optim.lr, "min_lr": low}))
    out.setdefault("sprm lr", schedule.get_lr({"max_lr": optim.head_lr, "min_lr": head_low}))
    return out


@dataclass
class StepResult:
    ok: bool
    grad_norm: float | None  # the policy's, before clipping
    head_grad_norm: float | None


def _grads_for_norm(opt, params) -> list[torch.Tensor]:
    tp_group = getattr(opt, "tp_group", None)
    return [p.grad for p in params if p.grad is not None and param_is_not_shared(p)
            and tensor_parallel.param_is_not_tensor_parallel_duplicate(p, tp_group)]


@torch.no_grad()
def optimizer_step(optimizer, clip_grad: float, head_clip_grad: float) -> StepResult:
    """Clip the policy and the head each by its own norm (0: no clip), then step. Collective.

    A NaN or Inf gradient anywhere skips the update on every rank (the norms
    are reduced, so all ranks see them) and returns ``ok=False``: weights never
    take a non-finite step.
    """
    if optimizer.prepare_grads():
        return StepResult(False, None, None)
    norms = {}
    for opt in _inner_optimizers(optimizer):
        if getattr(opt, "is_stub_optimizer", False):
            continue
        group_of = {False: [], True: []}
        for group in opt.optimizer.param_groups:
            group_of[bool(group.get(HEAD_GROUP_KEY, False))].extend(group["params"])
        for is_head, params in group_of.items():
            # Every rank computes both norms: the reductions are collective even where a group is empty.
            norm = get_grad_norm_fp32(_grads_for_norm(opt, params),
                                      grad_stats_parallel_group=opt.get_grad_stats_parallel_group())
            norms.setdefault(is_head, []).append((params, float(norm)))
    # Experts under expert parallelism have an optimizer of their own (megatron's ChainedOptimizer): the policy's
    # norm is over all of them, each one's norm already reduced over its own ranks, and clips them all alike.
    total = {is_head: math.sqrt(sum(n * n for _, n in pairs)) for is_head, pairs in norms.items()}
    if not all(math.isfinite(n) for n in total.values()):
        return StepResult(False, total.get(False), total.get(True))
    for is_head, pairs in norms.items():
        clip = head_clip_grad if is_head else clip_grad
        for params, _ in pairs:
            if clip > 0 and params:
                clip_grad_by_total_norm_fp32(params, clip, total[is_head])
    ok = optimizer.step_with_ready_grads()
    return StepResult(bool(ok), total.get(False), total.get(True))
