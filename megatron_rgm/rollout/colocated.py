"""Colocated rollouts: the policy being trained samples each iteration's groups, scoring steps as it goes.

Every draw is seeded by (run seed, iteration, prompt index), so a resumed run samples what the
uninterrupted one would have. With ``--save-rollouts`` each replica also appends its groups to a
rollout store (the same records ``tools/generate_rollouts.py`` writes).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist

from megatron_rgm.config import ConfigError, DataConfig
from megatron_rgm.data.store import RolloutStore, Trajectory, tokenizer_fingerprint
from megatron_rgm.rollout.rewards import make_verifier
from megatron_rgm.rollout.sampler import Sampler, SamplingParams
from megatron_rgm.rollout.sampling import derive_seed
from megatron_rgm.steps import StepSegmenter
from megatron_rgm.tokenizer import prompt_ids


def sample_groups(model, vocab: int, tokenizer, segmenter: StepSegmenter, data: DataConfig, prompts, seed: int,
                  iteration: int) -> list[list[Trajectory]]:
    """``data.group_size`` graded samples of each ``(index, prompt)`` of ``prompts``, drawn by ``model``: every
    prompt's samples decoded together in one pool of ``--rollout-max-batch`` slots (continuous batching).

    Raises:
        ConfigError: a prompt leaves no room to generate in the model's positions (naming it).
    """
    sampler = Sampler(model, vocab, segmenter, tokenizer)
    verifier = make_verifier(data.verifier)
    eos = tokenizer.eos_token_id
    requests, params = [], []
    for index, prompt in prompts:
        ids = prompt_ids(tokenizer, data.prompt_template, prompt["problem"])
        room = model.max_sequence_length - len(ids)
        if room < 1:
            raise ConfigError(f"prompt {prompt.get('id', index)} has {len(ids)} tokens, more than the model's "
                              f"{model.max_sequence_length} positions: raise --max-position-embeddings or drop it")
        requests.append(ids)
        params.append(SamplingParams(temperature=data.temperature, top_p=data.top_p,
                                     max_new_tokens=min(data.max_response_length, room),
                                     eos_token_ids=[eos] if eos is not None else [],
                                     seed=derive_seed(seed, iteration, index)))
    rollouts = sampler.generate_batch(requests, data.group_size, params, max_batch=data.rollout_max_batch)
    groups = []
    for (index, prompt), ids, r in zip(prompts, requests, rollouts):
        probs = torch.sigmoid(r.step_logits)
        group = []
        for j in range(data.group_size):
            n = int(r.lengths[j])
            text = tokenizer.decode(r.tokens[j, len(ids):n].tolist())
            grade = verifier(text, str(prompt["answer"]))
            lo, hi = int(r.cu_steps[j]), int(r.cu_steps[j + 1])
            group.append(Trajectory(tokens=r.tokens[j, :n].numpy(), response_mask=np.arange(n) >= len(ids),
                                log_probs=r.log_probs[j, :n].numpy(),
                                step_positions=r.step_mask[j, :n].nonzero().flatten().numpy(),
                                reward=grade.reward, correct=grade.reward > 0, prompt_id=index,
                                group_id=index, step_scores=probs[lo:hi].numpy()))
        groups.append(group)
    return groups


class RolloutRecorder:
    """``--save-rollouts``: each replica appends its groups to the store (opened on first use; collective)."""

    def __init__(self, path: str, tokenizer, data: DataConfig):
        self.path, self.tokenizer, self.data = path, tokenizer, data
        self.store = None

    def append(self, iteration: int, groups: list[list[Trajectory]], dp_rank: int, writer: bool) -> None:
        """Record ``groups`` (group id = iteration x 1e6 + prompt index); only ``writer`` ranks write."""
        if self.store is None:
            fp = tokenizer_fingerprint(self.tokenizer)
            if dist.get_rank() == 0:
                RolloutStore(self.path, "a", tokenizer=fp,
                             attrs={"k": self.data.group_size, "source": "megatron_rgm.pretrain",
                                    "temperature": self.data.temperature})
            dist.barrier()
            self.store = RolloutStore(self.path, "a", tokenizer=fp)
        if not writer:
            return
        self.store.append(dp_rank, [replace(s, group_id=iteration * 1_000_000 + s.prompt_id)
                                    for g in groups for s in g])
