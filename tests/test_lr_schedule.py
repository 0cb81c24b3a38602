"""Megatron-LM's optimizer-side flags: the learning-rate schedules (warm-up, then constant, linear, cosine or
inverse-square-root decay to ``--min-lr``, for the policy and, scaled, the SPRM head; refused where they cannot
mean anything; carried into the scheduler state Megatron-LM resumes from) and the DDP reduction options."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_rgm.arguments import lr_schedule, parse_args
from megatron_rgm.checkpoint.megatron_lm import scheduler_state
from megatron_rgm.config import ConfigError, OptimConfig
from megatron_rgm.training.optimizer import HEAD_GROUP_KEY, ddp_config, set_learning_rates

LR, HEAD_LR, MIN_LR = 1e-3, 5e-3, 1e-4
WARMUP, DECAY, TRAIN = 4, 20, 30


def expected(style: str, it: int, peak: float, floor: float) -> float:
    """The schedule written out by hand (Megatron-LM's definitions, in iterations)."""
    if it <= WARMUP:
        return peak * it / WARMUP
    if style == "constant":
        return peak
    if it > DECAY:
        return floor
    if style == "inverse-square-root":
        return max(floor, peak * math.sqrt(WARMUP) / math.sqrt(it))
    ratio = (it - WARMUP) / (DECAY - WARMUP)
    coeff = 1 - ratio if style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1)
    return floor + coeff * (peak - floor)


def optimizer():
    policy, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [policy], "wd_mult": 1.0},
                              {"params": [head], HEAD_GROUP_KEY: True, "base_weight_decay": 0.5}], lr=0.0)


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "inverse-square-root"])
def test_policy_and_head_follow_the_schedule(style):
    decaying = style != "constant"
    optim = OptimConfig(lr=LR, sprm_lr=HEAD_LR, lr_warmup_iters=WARMUP, lr_decay_style=style,
                        lr_decay_iters=DECAY if decaying else None, min_lr=MIN_LR if decaying else None,
                        weight_decay=0.1)
    opt = optimizer()
    head_floor = MIN_LR * HEAD_LR / LR if decaying else HEAD_LR
    seen = []
    for it in range(1, TRAIN + 1):
        out = set_learning_rates(opt, optim, it, TRAIN)
        policy, head = opt.param_groups
        want = expected(style, it, LR, MIN_LR if decaying else LR)
        assert policy["lr"] == pytest.approx(want, rel=1e-12) and out["lr"] == policy["lr"]
        assert head["lr"] == pytest.approx(expected(style, it, HEAD_LR, head_floor), rel=1e-12)
        assert out["sprm lr"] == head["lr"]
        assert policy["weight_decay"] == 0.1 and head["weight_decay"] == 0.5  # each group keeps its own decay
        seen.append(policy["lr"])
    assert seen[WARMUP - 1] == pytest.approx(LR)  # the warm-up ends at the peak
    if decaying:
        assert seen[-1] == pytest.approx(MIN_LR) and min(seen[WARMUP:]) == pytest.approx(MIN_LR)
        assert all(a >= b for a, b in zip(seen[WARMUP - 1:], seen[WARMUP:]))  # never rises after the warm-up
    else:
        assert seen[WARMUP:] == [LR] * (TRAIN - WARMUP)


def test_the_decay_defaults_to_the_whole_run():
    optim = OptimConfig(lr=LR, lr_decay_style="linear", min_lr=0.0)
    opt = optimizer()
    assert set_learning_rates(opt, optim, TRAIN // 2, TRAIN)["lr"] == pytest.approx(LR / 2)
    assert set_learning_rates(opt, optim, TRAIN, TRAIN)["lr"] == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("kwargs, words", [
    (dict(min_lr=1e-5), "--lr-decay-style"),
    (dict(lr_decay_iters=10), "--lr-decay-style"),
    (dict(lr_decay_style="cosine", min_lr=1e-2, lr=1e-3), "above --lr"),
    (dict(lr_decay_style="cosine", lr_decay_iters=0), "--lr-decay-iters must be >= 1"),
])
def test_a_schedule_that_cannot_mean_anything_is_refused(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        OptimConfig(**kwargs)


def test_a_warm_up_as_long_as_the_decay_is_refused():
    with pytest.raises(ConfigError, match="--lr-warmup-iters 10 leaves nothing of the cosine decay"):
        lr_schedule(OptimConfig(lr_decay_style="cosine", lr_warmup_iters=10), train_iters=10)
    assert lr_schedule(OptimConfig(lr_warmup_iters=10), train_iters=10)["lr_decay_style"] == "constant"


def test_megatron_lm_resumes_the_same_schedule_from_the_checkpoint_state():
    """The scheduler state we save, loaded by megatron-core's scheduler as Megatron-LM does (steps in samples),
    gives the learning rate our run uses at every later iteration."""
    optim = OptimConfig(lr=LR, lr_warmup_iters=WARMUP, lr_decay_style="cosine", lr_decay_iters=DECAY, min_lr=MIN_LR)
    opt, batch, at = optimizer(), 16, 7
    set_learning_rates(opt, optim, at, TRAIN)
    state = scheduler_state(opt, at, batch, lr_schedule(optim, TRAIN))
    theirs = OptimizerParamScheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0), init_lr=0.0,
                                     max_lr=1.0, min_lr=0.0, lr_warmup_steps=1, lr_decay_steps=2,
                                     lr_decay_style="linear", start_wd=0.0, end_wd=0.0, wd_incr_steps=1,
                                     wd_incr_style="constant", use_checkpoint_opt_param_scheduler=True)
    theirs.load_state_dict(state)
    for it in range(at, TRAIN + 1):
        theirs.num_steps = it * batch
        ours = set_learning_rates(opt, optim, it, TRAIN)["lr"]
        assert theirs.get_lr({}) == pytest.approx(ours, rel=1e-12), it


def test_the_ddp_flags_reach_megatron_core():
    """What the DP=2 equivalence test in test_training.py runs with (it cannot see the config from outside)."""
    plain = ddp_config(parse_args([]))
    assert not plain.overlap_grad_reduce and not plain.grad_reduce_in_fp32 and not plain.use_distributed_optimizer
    config = ddp_config(parse_args(["--overlap-grad-reduce", "--ddp-bucket-size", "4000",
                                    "--accumulate-allreduce-grads-in-fp32", "--use-distributed-optimizer"]))
    assert config.overlap_grad_reduce and config.grad_reduce_in_fp32 and config.use_distributed_optimizer
    assert config.bucket_size == 4000
    with pytest.raises(ConfigError, match="--ddp-bucket-size must be >= 1"):
        parse_args(["--ddp-bucket-size", "0"])
