"""Entry point: ``torchrun -m megatron_rgm.pretrain [flags]`` (or ``srun python -m megatron_rgm.pretrain``).

Stages (``--stage``):

* ``rgm`` (default): joint GRPO + SPR training, :mod:`megatron_rgm.training.loop`;
  rollouts sampled from ``--prompts`` or read from ``--rollouts STORE``;
* ``sft``: the language-model warm start on ``--sft-data`` texts, same loop;
* ``backbone-check``: RGMModel at the requested layout, wrapped in megatron
  DDP with megatron's optimizer, trained on a synthetic next-token task
  (arithmetic progressions of token ids) with the head scoring random
  positions: needs no data, and proves model, layout, DDP and optimizer.
"""

from __future__ import annotations

import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rgm import distributed
from megatron_rgm.arguments import Args, check_stage, parse_args
from megatron_rgm.checkpoint import latest_iteration, load_checkpoint, save_checkpoint
from megatron_rgm.config import ConfigError
from megatron_rgm.model import build_model
from megatron_rgm.model.context_parallel import split_batch
from megatron_rgm.model.load import recorded_geometry
from megatron_rgm.rollout.sampling import derive_seed
from megatron_rgm.training.batching import check_context_parallel
from megatron_rgm.training.loop import TrainingError, train


def synthetic_batch(args: Args, generator: torch.Generator):
    """Rows ``(start + step * i) mod V`` with random start and step: a learnable next-token task.

    Returns:
        tokens ``[b, s]``, labels ``[b, s]``, positions ``[b, s]``, step mask ``[b, s]``.
    """
    b, s = args.run.micro_batch_size, args.seq_length
    vocab = args.model.vocab_size
    start = torch.randint(0, vocab, (b, 1), generator=generator)
    step = torch.randint(1, 4, (b, 1), generator=generator)
    seq = (start + step * torch.arange(s + 1)) % vocab
    step_mask = torch.rand(b, s, generator=generator) < 0.05
    positions = torch.arange(s).expand(b, s)
    return seq[:, :-1], seq[:, 1:], positions, step_mask


def _loss_func(stats: dict, output):
    token_loss, step_logits = output
    total = token_loss.float().sum()
    whole = torch.stack([total.detach(), torch.tensor(float(token_loss.numel()), device=total.device)])
    if parallel_state.get_context_parallel_world_size() > 1:  # this rank holds a share of the micro-batch
        torch.distributed.all_reduce(whole, group=parallel_state.get_context_parallel_group())
    # The share's part of the micro-batch's mean: megatron multiplies it by the CP size, DDP averages over DP x CP.
    loss = total / whole[1]
    stats.setdefault("score", []).append(torch.sigmoid(step_logits.detach()).mean() if step_logits.numel() else None)
    return loss, {"lm loss": whole[0] / whole[1]}


def _forward_step(stats: dict, data_iterator, model):
    tokens, labels, positions, step_mask = next(data_iterator)
    b = split_batch(dict(tokens=tokens, labels=labels, position_ids=positions, step_mask=step_mask))  # CP: a share
    output = model(b["tokens"], b["position_ids"], None, labels=b["labels"], step_mask=b["step_mask"])
    return output, partial(_loss_func, stats)


def backbone_check(args: Args) -> list[float]:
    """Run the backbone check; returns the LM loss per iteration (last stage ranks; [] elsewhere)."""
    info = distributed.initialize(args.parallel)
    dp = parallel_state.get_data_parallel_world_size()
    micro = args.run.micro_batch_size
    global_batch = args.run.global_batch_size or micro * dp
    if global_batch % (micro * dp):
        raise ConfigError(
            f"--global-batch-size {global_batch} is not a multiple of --micro-batch-size {micro} x "
            f"data-parallel size {dp}: change one of them"
        )
    num_micro = global_batch // (micro * dp)

    chunks = build_model(args)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=args.optim.use_distributed_optimizer)
    model = [DistributedDataParallel(args.transformer, ddp_config, m) for m in chunks]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.optim.lr, weight_decay=0.0, clip_grad=1.0,
                        use_distributed_optimizer=args.optim.use_distributed_optimizer,
                        bf16=args.transformer.bf16, params_dtype=args.transformer.params_dtype),
        model,
    )
    args.transformer.finalize_model_grads_func = finalize_model_grads
    args.transformer.grad_scale_func = optimizer.scale_loss

    # Each iteration's batches are a function of (seed, data-parallel rank, iteration), as in the training
    # loop: a run resumed at another TP/PP layout (whose per-rank RNG states do not load) sees the same data.
    gen, dp_rank = torch.Generator(), parallel_state.get_data_parallel_rank()
    start_iter = 1
    if args.run.load:
        # A save directory with a finished checkpoint, or one iter_XXXXXXX directory; an empty
        # --load directory starts a new run (Megatron-LM's behaviour).
        if latest_iteration(args.run.load) is not None or (Path(args.run.load) / "metadata.json").exists():
            start_iter = load_checkpoint(args.run.load, model, optimizer=optimizer).iteration + 1
    forward_backward = get_forward_backward_func()
    last_stage = parallel_state.is_pipeline_last_stage()
    losses = []
    for it in range(start_iter, args.run.train_iters + 1):
        start = time.time()
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        gen.manual_seed(derive_seed(args.parallel.seed, dp_rank, it))
        batches = [synthetic_batch(args, gen) for _ in range(num_micro)]
        stats: dict = {}
        reports = forward_backward(
            forward_step_func=partial(_forward_step, stats),
            data_iterator=[iter(batches) for _ in model] if len(model) > 1 else iter(batches),
            model=model,
            num_microbatches=num_micro,
            seq_length=args.seq_length,
            micro_batch_size=micro,
            forward_only=False,
        )
        _, grad_norm, _ = optimizer.step()
        elapsed = (time.time() - start) * 1000
        if last_stage and reports:
            loss = torch.stack([r["lm loss"] for r in reports]).mean().item()
            losses.append(loss)
            scores = [s for s in stats.get("score", []) if s is not None]
            score = torch.stack(scores).mean().item() if scores else float("nan")
            if (parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_context_parallel_rank() == 0
                    and parallel_state.get_data_parallel_rank() == 0):
                print(f" iteration {it:8d}/{args.run.train_iters:8d} | lm loss: {loss:.6E} | "
                      f"grad norm: {grad_norm:.3f} | mean step score: {score:.4f} | "
                      f"elapsed time per iteration (ms): {elapsed:.1f}", flush=True)
        if args.run.save and (it == args.run.train_iters or (args.run.save_interval and it % args.run.save_interval == 0)):
            save_checkpoint(args.run.save, it, model, optimizer=optimizer,
                            extra=args.model_record())
    if info.rank == 0:
        print("backbone check done: model, layout, DDP and optimizer ran", flush=True)
    return losses


def run(args: Args):
    """Run ``--stage``: the backbone check's losses, or the training loop's per-iteration metrics."""
    check_stage(args)
    check_context_parallel(args)
    if args.run.stage == "backbone-check":
        return backbone_check(args)

    return train(args)


_COMM_FAILURE = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout", "socket",
                 "broken pipe", "peer")


def _lost_peers(e: BaseException) -> bool:
    """True for a collective that failed because another rank died or stopped answering."""
    return isinstance(e, getattr(dist, "DistError", ())) or (
        isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _COMM_FAILURE))


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv, recorded=recorded_geometry)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run(args)
    except (ConfigError, distributed.LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        distributed.shutdown()
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        distributed.shutdown()
        return 1
    except Exception as e:
        if not (dist.is_initialized() and _lost_peers(e)):
            raise
        rank = dist.get_rank()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: rank {rank} lost its peers (a rank died, or a collective waited longer than "
              f"--distributed-timeout-minutes {args.parallel.distributed_timeout_minutes:g}): {first}. Nothing was "
              "saved after the last checkpoint: find the dead rank's error, then resume with --load", file=sys.stderr,
              flush=True)
        os._exit(1)  # the process group is broken: tearing it down could wait on the dead rank
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
