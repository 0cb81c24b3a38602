"""Micro-batches under a token budget, and several samples packed into one row.

:func:`plan_microbatches` groups one optimizer step's samples by length so that each micro-batch holds at most
``budget`` tokens: padded rows (``rows x longest``) or, packed, the samples' own lengths summed into one row.
:func:`collate_packed` builds such a row: every sample keeps its own positions (0, 1, ...), an attention mask
confines each sample to itself (causal inside it), and the per-token advantages, the step mask and the
trajectory layout of the SPR loss (``cu_steps``, ``correct``) follow the samples, so a sample's log-probs, step
logits and losses are the ones it has alone in a padded row. :func:`empty_batch` is the micro-batch a rank runs
when the other data-parallel ranks need more micro-batches than it does (nothing in it is trained on).
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_rgm.data.store import Trajectory


def input_length(sample: Trajectory, limit: int) -> int:
    """Positions ``sample`` takes as model input (tokens - 1, at most ``limit``)."""
    return max(1, min(len(sample.tokens) - 1, limit))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_microbatches(lengths: list[int], budget: int, pack: bool, multiple: int = 1) -> list[list[int]]:
    """Sample indices of each micro-batch, longest samples first.

    Args:
        lengths: each sample's input length (:func:`input_length`).
        budget: tokens per micro-batch (``--max-tokens-per-microbatch``); at least every length.
        pack: True: the lengths of a micro-batch sum to at most ``budget`` (one packed row, first-fit
            decreasing); False: ``rows x`` the longest length, rounded up to ``multiple``, at most ``budget``.
        multiple: what a padded row's length is rounded up to (the model's length multiple).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if pack:
        bins: list[list[int]] = []
        room: list[int] = []
        for i in order:
            for b, free in enumerate(room):
                if lengths[i] <= free:
                    bins[b].append(i)
                    room[b] -= lengths[i]
                    break
            else:
                bins.append([i])
                room.append(budget - lengths[i])
        return bins
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * round_up(lengths[groups[-1][0]], multiple) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def collate_packed(samples: list[Trajectory], length: int, limit: int, *, advantages: torch.Tensor | None = None,
                   rl: bool = True, spr: bool = True) -> dict:
    """One row ``[1, length]`` holding ``samples`` back to back (see the module docstring).

    Args:
        samples: the micro-batch; their input lengths (:func:`input_length` with ``limit``) sum to at most
            ``length``.
        length: the row's length (a multiple of the model's length multiple); the tail is padding.
        limit: the longest input a sample keeps (``--max-position-embeddings``).
        advantages: ``[b]`` GRPO advantages, spread over each sample's tokens.
        rl, spr: as for :func:`megatron_rgm.data.sources.collate`.
    """
    lens = [input_length(s, limit) for s in samples]
    if sum(lens) > length:
        raise ValueError(f"samples of {sum(lens)} input tokens do not fit a packed row of {length}")
    tokens = torch.zeros(length + 1, dtype=torch.long)
    labels = torch.zeros(length, dtype=torch.long)
    loss_mask = torch.zeros(length)
    old = torch.zeros(length)
    adv = torch.zeros(length)
    positions = torch.zeros(length, dtype=torch.long)
    segment = torch.full((length,), len(samples), dtype=torch.long)  # the padding is a segment of its own
    step_mask = torch.zeros(length, dtype=torch.bool)
    steps = []
    offset = 0
    for i, (s, n) in enumerate(zip(samples, lens)):
        ids = torch.as_tensor(np.asarray(s.tokens[:n + 1], dtype=np.int64))
        tokens[offset:offset + n] = ids[:n]
        labels[offset:offset + n] = ids[1:n + 1]
        loss_mask[offset:offset + n] = torch.as_tensor(np.asarray(s.response_mask[1:n + 1], dtype=np.float32))
        old[offset:offset + n] = torch.as_tensor(np.asarray(s.log_probs[1:n + 1], dtype=np.float32))
        if advantages is not None:
            adv[offset:offset + n] = float(advantages[i])
        positions[offset:offset + n] = torch.arange(n)
        segment[offset:offset + n] = i
        pos = np.asarray(s.step_positions, dtype=np.int64)
        pos = pos[pos < n]
        step_mask[offset + pos] = True
        steps.append(len(pos))
        offset += n
    positions[offset:] = torch.arange(length - offset)
    batch = {"tokens": tokens[:length].unsqueeze(0), "labels": labels.unsqueeze(0),
             "loss_mask": loss_mask.unsqueeze(0), "position_ids": positions.unsqueeze(0),
             "attention_mask": packed_attention_mask(segment),
             "cu_seqlens": torch.tensor([0, *np.cumsum(lens)], dtype=torch.int32)}
    if rl:
        batch["old_log_probs"] = old.unsqueeze(0)
        if spr:
            batch.update(step_mask=step_mask.unsqueeze(0), correct=torch.tensor([s.correct for s in samples]),
                         cu_steps=torch.tensor([0, *np.cumsum(steps)], dtype=torch.int32))
        if advantages is not None:
            batch["advantages"] = adv.unsqueeze(0)
    return batch


def packed_attention_mask(segment: torch.Tensor) -> torch.Tensor:
    """``[1, 1, s, s]`` bool, True where attention is masked (megatron's convention): across samples, or ahead."""
    s = segment.numel()
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return (~(causal & (segment[:, None] == segment[None, :]))).view(1, 1, s, s)


def empty_batch(length: int, *, rl: bool = True, spr: bool = True, advantages: bool = True) -> dict:
    """A one-row micro-batch with nothing to train on: no response token, no step."""
    batch = {"tokens": torch.zeros(1, length, dtype=torch.long), "labels": torch.zeros(1, length, dtype=torch.long),
             "loss_mask": torch.zeros(1, length)}
    if rl:
        batch["old_log_probs"] = torch.zeros(1, length)
        if spr:
            batch.update(step_mask=torch.zeros(1, length, dtype=torch.bool), correct=torch.zeros(1, dtype=torch.bool))
        if advantages:
            batch["advantages"] = torch.zeros(1)
    return batch
