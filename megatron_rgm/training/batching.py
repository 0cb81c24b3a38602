"""One optimizer step's micro-batches, and the loss scales that make the step's loss independent of them.

Fixed-size micro-batches (``--micro-batch-size``) are padded to one length agreed over every rank. With
``--max-tokens-per-microbatch`` the samples are grouped by length under that budget, padded (``rows x
longest``) or packed into one row each (``--pack-sequences``), and the ranks agree on the number of micro-batches
(a rank with fewer runs empty ones); with pipeline parallelism the stages then exchange each micro-batch's shape.

The loss is normalised over the optimizer step, not per micro-batch (megatron-core's
``calculate_per_token_loss``): the policy term (and the LM loss) is a token-mean over every response token of
the step on every data-parallel rank, and each micro-batch's SPR term weighs as its share of the step's steps.
So a regrouping of the samples changes neither the policy term nor a plain mean over steps (``--sprm-loss bce``);
the SPR loss itself stays as the method defines it per micro-batch (mask counts summed over data-parallel ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_rgm.config import ConfigError
from megatron_rgm.data.packing import collate_packed, empty_batch, input_length, plan_microbatches, round_up
from megatron_rgm.data.sources import collate, to_device
from megatron_rgm.data.store import Trajectory
from megatron_rgm.training.metrics import device


def length_multiple(args) -> int:
    """What an input length is rounded up to: 8, times the TP size under sequence parallelism, times ``2 x cp``
    under context parallelism (every rank's share is two equal chunks)."""
    par = args.parallel
    cp = par.context_parallel_size
    return 8 * (par.tensor_model_parallel_size if par.sequence_parallel else 1) * (2 * cp if cp > 1 else 1)


def check_context_parallel(args) -> None:
    """What a run under context parallelism needs, refused at start rather than mid-run (``args``: the run's
    :class:`megatron_rgm.arguments.Args`)."""
    par, run = args.parallel, args.run
    cp = par.context_parallel_size
    if cp == 1:
        return
    multiple = length_multiple(args)
    if run.stage == "backbone-check":  # its sequences are not padded to multiples of 8, only split
        multiple //= 8
        if args.seq_length % multiple:
            raise ConfigError(f"--seq-length {args.seq_length} does not split into {2 * cp} equal chunks for "
                              f"--context-parallel-size {cp}: use a multiple of {multiple}")
        return
    if args.max_position_embeddings % multiple:
        raise ConfigError(f"--max-position-embeddings {args.max_position_embeddings} is not a multiple of {multiple}: "
                          f"a sample that long could not be split into {2 * cp} equal chunks for "
                          f"--context-parallel-size {cp}; use a multiple of {multiple}")
    if run.stage == "rgm" and args.data.prompts:
        if args.data.rollout_backend == "vllm":
            raise ConfigError("--rollout-backend vllm starts one engine per model-parallel group, and context-"
                              "parallel ranks would each start their own: use --rollout-backend native with "
                              "--context-parallel-size > 1, or --context-parallel-size 1")
        if args.model.transformer_impl != "local":
            raise ConfigError("rollouts sampled in the loop run with context parallelism switched off, which needs "
                              "--transformer-impl local: use it, or sample with tools/generate_rollouts.py and "
                              "train with --rollouts")


class MicroBatcher:
    """Turns the samples of one optimizer step into its micro-batch dicts, on the model's device.

    Args:
        args: the run's arguments.
    """

    def __init__(self, args):
        self.run = args.run
        self.limit = args.max_position_embeddings
        self.multiple = length_multiple(args)

    def __call__(self, samples: list[Trajectory], advantages: torch.Tensor | None, length: int, *, rl: bool = True,
                 spr: bool = True) -> list[dict]:
        """``length``: the padded length of fixed-size micro-batches (ignored under a token budget); ``rl``,
        ``spr``: the batch keys (:func:`megatron_rgm.data.sources.collate`)."""
        kw = dict(rl=rl, spr=spr)
        budget = self.run.max_tokens_per_microbatch
        if not budget:
            batches = self.padded(samples, advantages, length, **kw)
        else:
            lengths = [input_length(s, self.limit) for s in samples]
            plan = plan_microbatches(lengths, budget, self.run.pack_sequences, self.multiple)
            batches = []
            for group in plan:
                picked = [samples[i] for i in group]
                adv = None if advantages is None else advantages[group]
                if self.run.pack_sequences:
                    row = round_up(sum(lengths[i] for i in group), self.multiple)
                    batches.append(collate_packed(picked, row, self.limit, advantages=adv, **kw))
                else:
                    longest = min(self.limit, round_up(max(lengths[i] for i in group), self.multiple))
                    batches.append(collate(picked, longest, advantages=adv, **kw))
            count = torch.tensor([len(batches)], device=device())
            dist.all_reduce(count, op=dist.ReduceOp.MAX)  # every rank runs as many micro-batches
            batches += [empty_batch(self.multiple, **kw, advantages=advantages is not None)
                        for _ in range(int(count) - len(batches))]
        batches = [to_device(b, device()) for b in batches]
        add_loss_scales(batches)
        return batches

    def padded(self, samples: list[Trajectory], advantages: torch.Tensor | None, length: int, **kw) -> list[dict]:
        """``--micro-batch-size`` samples at a time, in order, padded to ``length`` (on the host)."""
        micro = self.run.micro_batch_size
        return [collate(samples[i:i + micro], length, **kw,
                        advantages=None if advantages is None else advantages[i:i + micro])
                for i in range(0, len(samples), micro)]


def add_loss_scales(batches: list[dict]) -> None:
    """Sets each batch's ``spr_scale``: (the step's tokens) x (its steps / the step's steps), over DP ranks.

    megatron divides the summed loss of the step by its token count (the per-micro-batch counts
    :func:`megatron_rgm.integration.rgm_loss_func` returns, summed over data-parallel ranks); the SPR term
    multiplied by this scale comes out as the step-weighted mean of the micro-batches' SPR losses.
    """
    if not batches or "step_mask" not in batches[0]:
        return
    local = torch.tensor([sum(float(b["loss_mask"].sum()) for b in batches),
                          sum(float(b["step_mask"].sum()) for b in batches)], dtype=torch.float64, device=device())
    if ps.model_parallel_is_initialized() and ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(local, group=ps.get_data_parallel_group())
    tokens, steps = local.tolist()
    for b in batches:
        b["spr_scale"] = tokens * float(b["step_mask"].sum()) / steps if steps else 0.0
