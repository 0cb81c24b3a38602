"""The forward passes of an iteration, through megatron-core's pipeline schedules.

:func:`forward_backward` runs any step function over micro-batches on every stage; the training
step itself is :func:`megatron_rgm.integration.forward_step`. Here also the frozen reference model
(KL term) and the forward-only pass that collects the head's step logits for calibration.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rgm.checkpoint import load_checkpoint, rng_state, set_rng_state
from megatron_rgm.integration import batch_inputs, forward_step
from megatron_rgm.model import build_model, unwrap
from megatron_rgm.model.context_parallel import gather_sequence, gather_step_logits, split_batch
from megatron_rgm.rl import chunked_log_probs_and_entropy


def forward_backward(model: list, batches: list[dict], length: int, micro_batch_size: int, step_func,
                     forward_only: bool = False) -> list[dict]:
    """``step_func`` over ``batches`` (one micro-batch each) on this stage's chunks; the last stage's reports."""
    return get_forward_backward_func()(
        forward_step_func=step_func,
        data_iterator=[iter(batches) for _ in model] if len(model) > 1 else iter(batches),
        model=model, num_microbatches=len(batches), seq_length=length, micro_batch_size=micro_batch_size,
        forward_only=forward_only)


def training_step_func(args, vocab: int, iteration: int | None = None):
    """The GRPO + SPR step of ``iteration`` (``--sprm-only``: the SPR term alone; with ``--sprm-mask-warmup-iters
    N``, plain BCE for the head on iterations 1..N)."""
    rgm = args.rgm
    if iteration and iteration <= args.run.sprm_mask_warmup_iters:  # iterations count from 1 (0: outside a run)
        rgm = replace(rgm, sprm_loss="bce")
    return partial(forward_step, rgm_config=rgm, grpo=args.grpo, vocab_size=vocab, policy_loss=not args.run.sprm_only)


TRAINING_HOOKS = ("grad_scale_func", "finalize_model_grads_func", "no_sync_func", "grad_sync_func", "param_sync_func")


def reference_model(args, policy: list) -> list:
    """The frozen policy the KL term pulls towards: ``--pretrained-checkpoint``, else ``policy`` as initialised.

    Building draws initial weights, so the run's random streams are saved and restored around it.
    """
    saved = rng_state()
    # The policy's training hooks on the shared TransformerConfig are bound to its DDP and optimizer; megatron's
    # experts deep-copy the config, which cannot copy those (process groups): the reference is built without them.
    hooks = {name: getattr(args.transformer, name) for name in TRAINING_HOOKS}
    for name in TRAINING_HOOKS:
        setattr(args.transformer, name, None)
    try:
        ref = build_model(args)
    finally:
        for name, value in hooks.items():
            setattr(args.transformer, name, value)
    set_rng_state(saved)
    if args.run.pretrained_checkpoint:
        load_checkpoint(args.run.pretrained_checkpoint, ref)
    else:
        for r, m in zip(ref, policy):
            r.load_state_dict(unwrap(m).state_dict())
    for r in ref:
        r.eval()
        r.requires_grad_(False)
    if args.run.offload_reference:
        offload_weights(ref)
    return ref


def offload_weights(modules: list) -> None:
    """Frozen weights to host memory (pinned, kept: a later offload only drops the device copy); on a CPU run,
    where the weights already are in host memory, nothing changes."""
    for m in modules:
        for p in m.parameters():
            if p.device.type == "cpu":
                continue
            host = getattr(p, "_rgm_host", None)
            if host is None:
                host = p._rgm_host = p.data.cpu().pin_memory()
            p.data = host


def onload_weights(modules: list) -> None:
    """The weights :func:`offload_weights` put in host memory back on the current device (a GPU)."""
    for m in modules:
        for p in m.parameters():
            if getattr(p, "_rgm_host", None) is not None and p.device.type == "cpu":
                p.data = p._rgm_host.to(torch.cuda.current_device(), non_blocking=True)


@torch.no_grad()
def add_reference_log_probs(ref: list, batches: list[dict], length: int, micro_batch_size: int, grpo,
                            vocab: int) -> None:
    """Adds ``ref_log_probs`` to each batch (last stage; other stages only pass activations)."""

    def step(data_iterator, model):
        whole = next(data_iterator)
        batch = split_batch(whole)  # context parallelism: this rank's share, gathered back below
        tokens, positions, attention_mask, kwargs = batch_inputs(batch)
        out = model(tokens, positions, attention_mask, **kwargs)

        def loss(output):
            mine = chunked_log_probs_and_entropy(output, batch["labels"], vocab, grpo.temperature,
                                                 entropy=False)[0].detach()
            whole["ref_log_probs"] = gather_sequence(mine, whole["tokens"].shape[1])
            return torch.zeros((), device=output.device), {}
        return out, loss

    forward_backward(ref, batches, length, micro_batch_size, step, forward_only=True)


def head_step_logits(model: list, batches: list[dict], length: int, micro_batch_size: int):
    """The head's step logits ``[S]`` (last stage; empty elsewhere) and each trajectory's step count, in eval mode."""
    _, logits, counts = policy_log_probs_and_step_logits(model, batches, length, micro_batch_size, (), 0)
    return logits, counts


@torch.no_grad()
def policy_log_probs_and_step_logits(model: list, batches: list[dict], length: int, micro_batch_size: int,
                                     temperatures: tuple[float, ...], vocab: int):
    """One eval-mode forward of the policy over ``batches``: per micro-batch the log-probs ``[t, b, s]`` of its
    labels under ``logits / T`` for each of ``temperatures`` (none: no log-probs), and the head's step logits ``[S]`` with each row's
    step count (last stage; empty elsewhere). What a sampler's own passes give, for samples drawn elsewhere."""
    log_probs, collected, counts = [], [], []

    def step(data_iterator, chunk):
        whole = next(data_iterator)
        batch = split_batch(whole)  # context parallelism: this rank's share, gathered back below
        tokens, positions, attention_mask, kwargs = batch_inputs(batch)
        out = chunk(tokens, positions, attention_mask, step_mask=batch["step_mask"], **kwargs)
        counts.append(whole["step_mask"].sum(1).cpu())
        length = whole["tokens"].shape[1]

        def loss(output):
            if temperatures:
                log_probs.append(torch.stack([
                    gather_sequence(chunked_log_probs_and_entropy(output[0], batch["labels"], vocab, t,
                                                                  entropy=False)[0].float(), length).cpu()
                    for t in temperatures]))
            collected.append(gather_step_logits(output[1].detach().float(), whole).cpu())
            return torch.zeros((), device=output[1].device), {}
        return out, loss

    for m in model:
        m.eval()
    forward_backward(model, batches, length, micro_batch_size, step, forward_only=True)
    for m in model:
        m.train()
    return (log_probs, torch.cat(collected) if collected else torch.zeros(0),
            torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long))
