"""Helpers shared by test workers (run under torchrun) and in-process tests."""

from __future__ import annotations

import torch

from megatron_rgm.arguments import parse_args

SEQ, BATCH, VOCAB = 16, 2, 512


def tiny_argv(tp: int = 1, pp: int = 1, *, sp: bool = False, recompute: int = 0,
              last_stage_layers: int | None = None, untied: bool = False, head_dropout: float = 0.0,
              grad_scale: float = 1.0, num_layers: int = 4, extra: list[str] | None = None) -> list[str]:
    argv = ["--preset", "tiny", "--num-layers", str(num_layers), "--seq-length", str(SEQ),
            "--vocab-size", str(VOCAB), "--micro-batch-size", str(BATCH),
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--sprm-dropout", str(head_dropout), "--sprm-backbone-grad-scale", str(grad_scale),
            "--hidden-dropout", "0", "--attention-dropout", "0"]
    if sp:
        argv.append("--sequence-parallel")
    if recompute:
        # Chunks of `recompute` layers: with 2 the feature layer (2 of 0..3) sits
        # inside a checkpointed chunk, not at its end.
        argv += ["--recompute-granularity", "full", "--recompute-method", "uniform",
                 "--recompute-num-layers", str(recompute)]
    if last_stage_layers is not None:
        argv += ["--decoder-last-pipeline-num-layers", str(last_stage_layers)]
    if untied:
        argv.append("--untie-embeddings-and-output-weights")
    return argv + (extra or [])


def tiny_args(**kw):
    return parse_args(tiny_argv(**kw))


def fixed_batch(seed: int = 0):
    """Token ids, positions, a step mask and loss weights, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ).contiguous()
    mask = torch.rand(BATCH, SEQ, generator=g) < 0.3
    mask[0, 0] = True
    mask[1, SEQ - 1] = True
    logit_w = torch.randn(BATCH, SEQ, VOCAB, generator=g) * 1e-2
    head_w = torch.randn(int(mask.sum()), generator=g)
    return ids, pos, mask, logit_w, head_w


def probe_loss(logits_full: torch.Tensor, head_logits: torch.Tensor, logit_w, head_w) -> torch.Tensor:
    """A loss touching every logit and every head logit with fixed random weights."""
    return (logits_full * logit_w).sum() + (head_logits * head_w).sum()
