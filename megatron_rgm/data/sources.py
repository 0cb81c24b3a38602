"""What the training loop feeds the model: samples, their padding into micro-batches, and their sources.

A sample is one :class:`megatron_rgm.data.store.Trajectory` (prompt + response
token ids, which tokens are the response, the sampling policy's log-probs, the
scored positions, the reward), the record a rollout store holds too. :func:`collate` turns samples into the batch
dicts :func:`megatron_rgm.integration.forward_step` consumes: the input is
``tokens[:-1]``, the labels ``tokens[1:]``, and a scored position ``i`` (the
state before the step token ``i + 1``) keeps its index.

Sources: :class:`PromptSource` (prompts jsonl, a fixed order per epoch drawn
from the seed, the same at any layout), :class:`StoreSource` (groups of a
rollout store, round-robin), :class:`SFTSource` (texts for the warm start).
Each is a pure function of the iteration number, so a resumed run reads what
the uninterrupted one would have read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megatron_rgm.config import ConfigError
from megatron_rgm.data.benchmarks import load_benchmark, read_jsonl
from megatron_rgm.data.store import RolloutStore, Trajectory
from megatron_rgm.tokenizer import encode


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``n`` items used in ``epoch`` (seeded: identical on every rank and on resume)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def global_slice(n_items: int, per_iter: int, iteration: int, seed: int) -> list[int]:
    """Indices of the ``per_iter`` items of ``iteration`` (1-based), walking seeded epoch permutations."""
    start = (iteration - 1) * per_iter
    out = []
    for pos in range(start, start + per_iter):
        epoch, i = divmod(pos, n_items)
        out.append(int(epoch_order(n_items, seed, epoch)[i]))
    return out


class PromptSource:
    """Prompts of a jsonl file (``load_benchmark`` keys), split over data-parallel ranks per iteration."""

    def __init__(self, path: str, problem_key: str | None, answer_key: str | None, per_iter: int, seed: int):
        self.prompts = load_benchmark(path, problem_key, answer_key)
        if not self.prompts:
            raise ConfigError(f"--prompts {path} holds no prompts")
        self.per_iter, self.seed = per_iter, seed

    def for_iteration(self, iteration: int, dp_rank: int, dp_size: int) -> list[tuple[int, dict]]:
        """``(prompt index, prompt)`` pairs this data-parallel rank samples in ``iteration``."""
        picked = global_slice(len(self.prompts), self.per_iter, iteration, self.seed)
        return [(i, self.prompts[i]) for i in picked[dp_rank::dp_size]]


class StoreSource:
    """Groups (same ``group_id``) of a rollout store, ``per_iter`` groups per iteration over all DP ranks."""

    def __init__(self, path: str, per_iter: int, seed: int, tokenizer_fingerprint: str | None = None):
        self.store = RolloutStore(path, "r", tokenizer=tokenizer_fingerprint)
        groups: dict[int, list[int]] = {}
        for i, g in enumerate(self.store.group_ids()):
            groups.setdefault(int(g), []).append(i)
        if not groups:
            raise ConfigError(f"rollout store {path} holds no trajectories: generate some with "
                              "tools/generate_rollouts.py")
        self.groups = [groups[k] for k in sorted(groups)]
        self.per_iter, self.seed = per_iter, seed

    def for_iteration(self, iteration: int, dp_rank: int, dp_size: int) -> list[list[Trajectory]]:
        picked = global_slice(len(self.groups), self.per_iter, iteration, self.seed)[dp_rank::dp_size]
        return [[self.store[i] for i in self.groups[g]] for g in picked]


def read_sft(path: str, tokenizer, eos_id: int | None) -> list[tuple[list[int], int]]:
    """``(token ids, prompt length)`` per line of a jsonl of ``{"text"}`` or ``{"prompt", "response"}``.

    The loss covers the response (the whole text for ``{"text"}``) and an end-of-sequence token.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--sft-data {p} does not exist: write it first (python -m megatron_rgm.tasks.prepare "
                          "writes one for the synthetic task)")
    out = []
    for n, row in enumerate(read_jsonl(p), 1):  # corrupt lines are reported with their number there
        if "text" in row:
            ids, prompt_len = encode(tokenizer, row["text"]), 0
        elif "prompt" in row and "response" in row:
            prompt = encode(tokenizer, row["prompt"])
            ids, prompt_len = prompt + encode(tokenizer, row["response"]), len(prompt)
        else:
            raise ConfigError(f"{p}: record {n} has neither 'text' nor 'prompt' and 'response': give one of them")
        out.append((ids + ([eos_id] if eos_id is not None else []), prompt_len))
    if not out:
        raise ConfigError(f"--sft-data {p} holds no texts")
    return out


class SFTSource:
    """Texts of ``--sft-data``, ``per_iter`` per iteration over all data-parallel ranks."""

    def __init__(self, path: str, tokenizer, per_iter: int, seed: int):
        self.texts = read_sft(path, tokenizer, tokenizer.eos_token_id)
        self.per_iter, self.seed = per_iter, seed

    def for_iteration(self, iteration: int, dp_rank: int, dp_size: int) -> list[tuple[list[int], int]]:
        picked = global_slice(len(self.texts), self.per_iter, iteration, self.seed)
        return [self.texts[i] for i in picked[dp_rank::dp_size]]


def sft_sample(ids: list[int], prompt_len: int) -> Trajectory:
    tokens = np.asarray(ids, dtype=np.int64)
    mask = np.arange(len(ids)) >= max(prompt_len, 1)
    return Trajectory(tokens=tokens, response_mask=mask, log_probs=np.zeros(len(ids), np.float32),
                      step_positions=np.zeros(0, np.int64), reward=0.0, correct=False, prompt_id=0, group_id=0)


def padded_length(samples: list[Trajectory], multiple: int, limit: int) -> int:
    """Input length (tokens - 1) of the longest sample, rounded up to ``multiple``, at most ``limit``."""
    longest = max((len(s.tokens) - 1 for s in samples), default=1)
    return min(limit, -(-longest // multiple) * multiple)


def to_device(batch: dict, device: torch.device) -> dict:
    """``batch``'s tensors moved to ``device`` (the model's: a micro-batch is built on the host)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def collate(samples: list[Trajectory], length: int, *, advantages: torch.Tensor | None = None, rl: bool = True,
            spr: bool = True) -> dict:
    """Micro-batch dict for :func:`megatron_rgm.integration.forward_step`, right-padded to ``length``.

    Args:
        samples: the micro-batch.
        length: input length (a sample longer than ``length + 1`` tokens is cut).
        advantages: ``[b]`` GRPO advantages (with ``rl``).
        rl: True: GRPO (+ SPR) keys; False: language modelling on the response tokens.
        spr: with ``rl``, the SPR keys (``step_mask``, ``correct``); False: GRPO alone.
    """
    b = len(samples)
    tokens = torch.zeros(b, length + 1, dtype=torch.long)
    response = torch.zeros(b, length + 1, dtype=torch.bool)
    old = torch.zeros(b, length + 1, dtype=torch.float32)
    step_mask = torch.zeros(b, length, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = min(len(s.tokens), length + 1)
        tokens[i, :n] = torch.as_tensor(s.tokens[:n], dtype=torch.long)
        response[i, :n] = torch.as_tensor(np.asarray(s.response_mask[:n], dtype=bool))
        old[i, :n] = torch.as_tensor(np.asarray(s.log_probs[:n], dtype=np.float32))
        pos = torch.as_tensor(np.asarray(s.step_positions, dtype=np.int64))
        step_mask[i, pos[pos < length]] = True
    batch = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
             "loss_mask": response[:, 1:].float()}
    if rl:
        batch["old_log_probs"] = old[:, 1:].contiguous()
        if spr:
            batch.update(step_mask=step_mask, correct=torch.tensor([s.correct for s in samples]))
        if advantages is not None:
            batch["advantages"] = advantages.float()
    return batch
