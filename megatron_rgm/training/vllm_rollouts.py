"""Colocated rollouts by vLLM (``--rollout-backend vllm``): the engine samples, the trainer scores.

Each data-parallel replica has one engine, started by its first model-parallel rank with random weights.
Before every iteration's rollouts the policy's weights are gathered from the ranks (TP shards, pipeline stages,
experts) under HF names and pushed into it (:mod:`megatron_rgm.rollout.weight_sync`); nothing is written to
disk. The engine returns tokens and its own log-probs; one forward of the policy then gives the old log-probs GRPO
uses and the head's step scores, so the ratio starts from the trainer's numbers. ``rollout kl`` is the mean of
vLLM's minus the trainer's log-prob of the sampled tokens, both of the unscaled logits (vLLM reports its
temperature-scaled log-probs only after top-p has cut the distribution). It is 0 up to rounding when the engine
runs the trainer's model, and moves when a push is stale or faulty or a kernel errs. It is a KL estimate only for
samples drawn at temperature 1 without filtering; at other settings read it as a mean log-ratio (either sign).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_rgm.config import ConfigError
from megatron_rgm.convert.mapping import HFArch
from megatron_rgm.data.sources import collate, to_device
from megatron_rgm.data.store import Trajectory
from megatron_rgm.model import unwrap
from megatron_rgm.rollout.rewards import make_verifier
from megatron_rgm.rollout.sampling import SamplingParams, derive_seed
from megatron_rgm.rollout.vllm_engine import VLLMEngine
from megatron_rgm.rollout.weight_sync import engine_dir, hf_config, hf_state
from megatron_rgm.tokenizer import SentencePieceTokenizer, prompt_ids
from megatron_rgm.training.metrics import device, dp_sum
from megatron_rgm.training.step import policy_log_probs_and_step_logits


class VLLMRollouts:
    """One vLLM engine per data-parallel replica, on its first model-parallel rank.

    Args:
        args: the run's arguments.
        model: the policy's chunks (one: virtual pipeline stages are refused).
        tokenizer: the run's tokenizer.
        vocab: the tokenizer's vocabulary.
    """

    def __init__(self, args, model: list, tokenizer, vocab: int):
        if len(model) > 1:
            raise ConfigError("--rollout-backend vllm gathers one model chunk per stage: drop "
                              "--num-layers-per-virtual-pipeline-stage, or use --rollout-backend native")
        self.args, self.model, self.tokenizer, self.vocab = args, model, tokenizer, vocab
        self.group = ps.get_model_parallel_group()
        self.leader = dist.get_global_rank(self.group, 0)
        config = hf_config(args, vocab, isinstance(tokenizer, SentencePieceTokenizer))
        self.arch = HFArch.from_config(config)
        self.engine = None
        if dist.get_rank() == self.leader:
            data = args.data
            self._dir = tempfile.TemporaryDirectory(prefix="rgm-vllm-model-")
            directory = engine_dir(Path(self._dir.name), config, tokenizer, data.prompt_template)
            dtype = "bfloat16" if args.transformer.bf16 else "float16" if args.transformer.fp16 else "float32"
            self.engine = VLLMEngine(str(directory), python=data.vllm_python, dtype=dtype, seed=args.parallel.seed,
                                     threads=torch.get_num_threads(), max_model_len=args.max_position_embeddings,
                                     kv_cache_bytes=int(data.vllm_kv_cache_gb * 2**30),
                                     max_num_seqs=data.rollout_max_batch or 256, dummy=True,
                                     gpu_memory=data.vllm_gpu_memory)

    def push(self) -> None:
        """The policy's current weights into the engine (collective over the replica's model-parallel group)."""
        state = hf_state(unwrap(self.model[0]), self.arch)
        if self.engine is not None:
            self.engine.load_weights(state.items())

    def sample(self, prompts, seed: int, iteration: int, segmenter) -> list[list[Trajectory]]:
        """``--grpo-group-size`` graded samples of each ``(index, prompt)``: vLLM's tokens and log-probs."""
        data = self.args.data
        limit = self.args.max_position_embeddings
        requests, params, budgets = [], [], []
        eos = self.tokenizer.eos_token_id
        for index, prompt in prompts:
            ids = prompt_ids(self.tokenizer, data.prompt_template, prompt["problem"])
            if limit - len(ids) < 1:
                raise ConfigError(f"prompt {prompt.get('id', index)} has {len(ids)} tokens, more than the model's "
                                  f"{limit} positions: raise --max-position-embeddings or drop it")
            requests.append(ids)
            budgets.append(min(data.max_response_length, limit - len(ids)))
            params.append(SamplingParams(temperature=data.temperature, top_p=data.top_p,
                                         eos_token_ids=[eos] if eos is not None else [],
                                         seed=derive_seed(seed, iteration, index)))
        self.push()
        box = [self.engine.generate(requests, data.group_size, params, budgets) if self.engine else None]
        dist.broadcast_object_list(box, src=self.leader, group=self.group)
        verifier = make_verifier(data.verifier)
        groups = []
        for (index, prompt), ids, outs in zip(prompts, requests, box[0]):
            group = []
            for new, logprobs in outs:
                tokens = np.asarray(ids + new, dtype=np.int64)
                response = np.arange(len(tokens)) >= len(ids)
                mask = segmenter(torch.as_tensor(tokens)[None], torch.as_tensor(response)[None]).mask[0]
                grade = verifier(self.tokenizer.decode(new), str(prompt["answer"]))
                group.append(Trajectory(tokens=tokens, response_mask=response,
                                        log_probs=np.asarray([0.0] * len(ids) + logprobs, dtype=np.float32),
                                        step_positions=mask.nonzero().flatten().numpy(), reward=grade.reward,
                                        correct=grade.reward > 0, prompt_id=index, group_id=index))
            groups.append(group)
        return groups

    def score(self, groups: list[list[Trajectory]], length: int, micro: int) -> dict[str, float]:
        """Replace each sample's log-probs by the policy's and set its step scores (one forward); returns
        ``rollout kl``: vLLM's minus the trainer's log-prob of the unscaled logits, averaged over the sampled tokens
        of all replicas."""
        samples = [s for g in groups for s in g]
        batches = [to_device(collate(samples[i:i + micro], length, rl=True, spr=True), device())
                   for i in range(0, len(samples), micro)]
        log_probs, step_logits, counts = policy_log_probs_and_step_logits(
            self.model, batches, length, micro, (self.args.data.temperature or 1.0, 1.0), self.vocab)
        # The last stage computed them; the replica's other stages take them from it.
        box = [(log_probs, step_logits, counts)]
        pp_group = ps.get_pipeline_model_parallel_group()
        dist.broadcast_object_list(box, src=dist.get_global_rank(pp_group, ps.get_pipeline_model_parallel_world_size()
                                                                 - 1), group=pp_group)
        log_probs, step_logits, counts = box[0]
        rows = torch.cat(log_probs, dim=1) if log_probs else torch.zeros(2, 0, length)
        cu = np.concatenate([[0], np.cumsum(counts.numpy())])
        gap, tokens = 0.0, 0
        for i, s in enumerate(samples):
            n = len(s.tokens)
            sampled, raw = np.zeros((2, n), dtype=np.float32)
            sampled[1:], raw[1:] = rows[0, i, :n - 1].numpy(), rows[1, i, :n - 1].numpy()  # label t: token t + 1
            response = np.asarray(s.response_mask, dtype=bool)
            gap += float((s.log_probs[response] - raw[response]).sum())
            tokens += int(response.sum())
            s.log_probs = sampled * response
            s.step_scores = torch.sigmoid(step_logits[int(cu[i]):int(cu[i + 1])]).numpy()
        gap, tokens = dp_sum(ps, [gap, float(tokens)])
        return {"rollout kl": gap / tokens if tokens else float("nan")}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
            self._dir.cleanup()
