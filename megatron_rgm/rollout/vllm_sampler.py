"""Sampling by vLLM over an HF export, scoring by the same weights: the native samplers' interface, vLLM's decoding.

:class:`VLLMSampler` has :meth:`generate_batch` as :class:`~megatron_rgm.rollout.sampler.Sampler` has it, so
Best-of-N and offline rollouts run on it unchanged. vLLM draws the tokens; one forward of the export's
transformers model over each prompt's k finished samples then gives their log-probs and the SPRM head's step
scores (vLLM's forward does not expose the head's layer). ``times`` keeps the seconds each part took, so the
scoring pass's cost is reported beside the generation's.
"""

from __future__ import annotations

import time

import torch

from megatron_rgm.config import ConfigError
from megatron_rgm.hf import head_logits
from megatron_rgm.rollout.sampling import Rollout, SamplingParams
from megatron_rgm.rollout.vllm_engine import VLLMEngine


class VLLMSampler:
    """vLLM's samples with the export's log-probs and step scores.

    Args:
        scorer: the export's :class:`megatron_rgm.hf.RGMScorer` (model, head, feature hook).
        segmenter: step rules.
        engine: a :class:`VLLMEngine` over the same export.
    """

    def __init__(self, scorer, segmenter, engine: VLLMEngine):
        self.scorer, self.segmenter, self.engine = scorer, segmenter, engine
        self.position_limit = scorer.model.config.max_position_embeddings
        self.pad_id = 0
        self.times = {"generate": 0.0, "score": 0.0}
        self.tokens = {"generated": 0}

    def generate_batch(self, prompts: list[list[int]], num_samples: int, params: list[SamplingParams],
                       max_batch: int | None = None, stopper=None) -> list[Rollout]:
        """``num_samples`` samples of each prompt (vLLM schedules them; ``max_batch`` is its ``max_num_seqs``,
        fixed when the engine started)."""
        if stopper is not None:
            raise ConfigError("reflective early stopping reads the head during decoding, which vLLM's forward does "
                              "not run: drop --bon-prune-margin, or use --backend megatron")
        if len(params) != len(prompts):
            raise ConfigError(f"generate_batch got {len(prompts)} prompts and {len(params)} sampling parameters: "
                              "pass one per prompt")
        budgets = []
        for ids, p in zip(prompts, params):
            if p.temperature > 2:
                raise ConfigError(f"--temperature {p.temperature}: vLLM samples at 2 at most; lower it, or use "
                                  "--backend hf")
            budget = p.budget(len(ids), self.position_limit)
            if budget < 1 or len(ids) + budget > self.position_limit:
                raise ConfigError(f"a prompt of {len(ids)} tokens with {budget} new tokens does not fit the model's "
                                  f"{self.position_limit} positions: shorten it or lower --max-new-tokens")
            budgets.append(budget)
        t = time.time()
        outputs = self.engine.generate(prompts, num_samples, params, budgets)
        self.times["generate"] += time.time() - t
        t = time.time()
        rollouts = [self._score(ids, [new for new, _ in group], p) for ids, group, p in zip(prompts, outputs, params)]
        self.times["score"] += time.time() - t
        return rollouts

    @torch.no_grad()
    def _score(self, prompt: list[int], samples: list[list[int]], params: SamplingParams) -> Rollout:
        """One forward over a prompt's samples (right-padded): log-probs of the sampled tokens under the
        temperature-scaled distribution (no repetition penalty) and the head's step logits."""
        self.tokens["generated"] += sum(map(len, samples))
        p0 = len(prompt)
        lengths = torch.tensor([p0 + len(s) for s in samples])
        width = int(lengths.max())
        tokens = torch.full((len(samples), width), self.pad_id, dtype=torch.long)
        for i, s in enumerate(samples):
            tokens[i, :int(lengths[i])] = torch.tensor(prompt + s, dtype=torch.long)
        idx = torch.arange(width)[None]
        valid = idx < lengths[:, None]
        response = valid & (idx >= p0)
        layout = self.segmenter(tokens, response)
        model = self.scorer.model
        device = next(model.parameters()).device
        out = model(input_ids=tokens.to(device), attention_mask=valid.long().to(device))
        log_probs = torch.zeros(tokens.shape)
        for i in range(len(samples)):  # a row at a time: one [s, V] float32 copy, not k of them
            logits = out.logits[i, :-1, : model.config.vocab_size].float() / (params.temperature or 1.0)
            log_probs[i, 1:] = (logits.gather(-1, tokens[i, 1:, None].to(device))[:, 0]
                                - torch.logsumexp(logits, -1)).cpu()
        log_probs *= response
        steps = head_logits(self.scorer.head, self.scorer.feature.value, layout.mask.to(device)).float().cpu()
        return Rollout(tokens, p0, lengths, log_probs, torch.zeros(tokens.shape), steps, layout.cu_steps.cpu(),
                       layout.mask.cpu())

    def close(self) -> None:
        self.engine.close()

