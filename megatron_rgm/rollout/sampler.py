"""Batched sampling from RGMModel with a KV cache, scoring steps in the same forward passes.

Every forward (the prompt's prefill, then one token per decode step) leaves the
``--sprm-layer`` feature of its last position captured; the head turns it into
a logit at once. That position is the one *before* the token it samples, so
when the sampled token ends a step, its score is already there: no second pass.
After generation the step rules (:class:`megatron_rgm.steps.StepSegmenter`)
pick which of those per-position logits are step scores.

Tensor parallelism: logits are gathered at run time and every TP rank draws
the same tokens from an identically seeded generator (on the model's device,
so logits never leave it). Pipeline parallelism:
each stage keeps its own KV cache; a forward sends the stage's hidden states
to the next stage, the last stage samples, and the token is broadcast back
over the pipeline group (per-token log-probs and head logits at the end).

Decode steps run megatron-core's ``flash_decode`` KV-cache path (see
:mod:`megatron_rgm.rollout.decode_attention`): a key is rotated once, when it
is cached, and a step's attention is one call, instead of re-rotating and
repeating the whole cache in every layer at every step. The k samples share
their prompt: it is prefilled once (batch 1) and its KV cache copied to the k
rows. The head runs on the new position only (``2c^2`` multiply-adds a
sequence a step).

:meth:`Sampler.generate_batch` decodes many prompts' samples in one pool of
cache slots, a finished sequence's slot taken by a waiting one
(:mod:`megatron_rgm.rollout.batching`); :meth:`Sampler.generate` is that call
with one prompt. Each sample draws from its own generator, seeded by (the
prompt's seed, its index), so what it samples does not depend on what is
decoded beside it. Models off the flash-decode path (an HF model, megatron-core's
default path, a full recompute) run one prompt's k samples in lockstep instead.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_rgm.compat.mcore import inference_mode
from megatron_rgm.config import ConfigError
from megatron_rgm.rollout import decode_attention
from megatron_rgm.rollout.batching import Request, SlotPool, copy_prompt_cache, sample_generator
from megatron_rgm.rollout.sampling import Rollout, SamplingParams, draw
from megatron_rgm.steps import StepSegmenter

__all__ = ["Sampler", "SamplingParams", "Rollout"]


def _head_logits(head: torch.nn.Module, feature: torch.Tensor) -> torch.Tensor:
    """The head's logits ``[b]`` at one position per row (``feature`` ``[b, h]``), in eval mode.

    What ``model.sprm.score`` computes there, without its step-mask gather and backbone-gradient
    scaling (nothing to differentiate here) or the module calls: two matmuls, 2c^2 multiply-adds a row.
    """
    first, last = head[0], head[-1]
    if (len(head) == 4 and isinstance(first, torch.nn.Linear) and isinstance(head[1], torch.nn.ReLU)
            and isinstance(head[2], torch.nn.Dropout) and isinstance(last, torch.nn.Linear) and not head.training):
        x = F.relu(F.linear(feature.to(first.weight.dtype), first.weight, first.bias))
        return F.linear(x, last.weight, last.bias).view(-1).float()
    return head(feature.to(first.weight.dtype)).view(-1).float()


class Sampler:
    """Samples continuations of a prompt from an RGMModel (this rank's pipeline stage).

    Args:
        model: an :class:`RGMModel` chunk (unwrapped; no virtual pipeline stages).
        vocab_size: the real vocabulary (TP padding rows are never sampled).
        segmenter: step rules for the scores (None: no step scores).
        tokenizer: decodes tokens for ``stop_strings``.
        score_steps: False samples without the head (benchmarks the cost of scoring).
        fast_decode: decode through megatron-core's flash-decode KV-cache path (keys rotated once, one
            attention call per layer; :mod:`megatron_rgm.rollout.decode_attention`) where it applies;
            False: megatron-core's default path, which re-rotates and repeats the whole cache every step.
    """

    def __init__(self, model, vocab_size: int, segmenter: StepSegmenter | None = None, tokenizer=None,
                 score_steps: bool = True, fast_decode: bool = True, pipeline: bool = True):
        self.pp = 1
        if pipeline and dist.is_initialized():  # pipeline=False: a model outside megatron's parallel state
            from megatron.core import parallel_state as ps

            self.pp = ps.get_pipeline_model_parallel_world_size()
        self.first = self.last = True
        if self.pp > 1:
            self.first, self.last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
            self.prev, self.next = ps.get_pipeline_model_parallel_prev_rank(), ps.get_pipeline_model_parallel_next_rank()
            self.pp_group, self.last_rank = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_last_rank()
        self.model = model
        self.vocab_size = vocab_size
        self.segmenter = segmenter
        self.tokenizer = tokenizer
        self.score_steps = score_steps  # False: plain sampling (benchmarks the cost of scoring)
        self.fast_decode = fast_decode  # False: megatron-core's default KV-cache path (see _decode_path)

    def _forward(self, tokens, positions, context):
        """(last-position logits ``[b, V]``, head logits ``[b]``) on the last stage; (None, None) elsewhere."""
        if not self.first:
            cfg = self.model.config
            hidden = torch.empty(tokens.shape[1], tokens.shape[0], cfg.hidden_size, dtype=cfg.pipeline_dtype,
                                 device=tokens.device)
            dist.recv(hidden, src=self.prev)
            self.model.set_input_tensor(hidden)
        out = self.model(tokens, positions, None, inference_context=context, runtime_gather_output=True)
        if not self.last:
            dist.send(out.contiguous(), dst=self.next)
            return None, None
        logits = out[:, -1, : self.vocab_size].float()
        head = None
        if self.score_steps and self.model.sprm_head is not None:
            feature = self.model.sprm.feature()  # [s, b, h]: the head reads the last position only
            head = _head_logits(self.model.sprm_head, feature[-1])
        return logits, head

    def _is_megatron(self) -> bool:
        """A megatron-core model (its KV cache is the StaticInferenceContext's), not a subclass's own model."""
        return hasattr(getattr(self.model, "config", None), "flash_decode")

    def _decode_path(self, use_cache: bool):
        """megatron-core's flash-decode KV-cache path for this generate call, where it applies (see
        :mod:`megatron_rgm.rollout.decode_attention`); else its default path."""
        if (not use_cache or not self.fast_decode or not self._is_megatron()
                or not decode_attention.supported(self.model)):
            return contextlib.nullcontext()
        return decode_attention.flash_decode(self.model)

    def _check_request(self, prompt_ids: list[int], num_samples: int, params: SamplingParams) -> int:
        """The sequence length the request needs; ConfigError when it cannot be served."""
        if num_samples < 1:
            raise ConfigError(f"k (samples per prompt) must be >= 1, got {num_samples}")
        if not prompt_ids:
            raise ConfigError("empty prompt: give at least one token")
        limit = self.model.max_sequence_length
        new = params.budget(len(prompt_ids), limit)
        if new < 1 or len(prompt_ids) + new > limit:
            raise ConfigError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max(new, 1)}) exceeds the "
                              f"model's {limit} positions: shorten the prompt or lower max_new_tokens")
        return len(prompt_ids) + new

    def _continuous(self) -> bool:
        """Whether the slots of a call may decode at different offsets: megatron-core's flash-decode path."""
        return self.fast_decode and self._is_megatron() and decode_attention.supported(self.model)

    # --- one prompt's k samples in lockstep (HF models, megatron-core's default path, a full recompute) --------

    def _forward_at(self, req: Request, t: int, context, share: bool):
        """The forward that predicts position ``t``: one decode step, the shared prompt's prefill, or everything
        before ``t`` (the first step without a cache, and every step of a full recompute)."""
        positions = torch.arange(t, device=req.tokens.device).unsqueeze(0).expand(req.k, t)
        if context is not None and t > len(req.prompt):
            context.enable_decode_mode()
            return self._forward(req.tokens[:, t - 1:t], positions[:, t - 1:t], context)
        if share:  # the k samples share the prompt: prefill it once, copy its KV cache to every row
            logits, head = self._forward(req.tokens[:1, :t], positions[:1], context)
            copy_prompt_cache(context, 0, list(range(1, req.k)), t)
            if logits is None:
                return None, None
            return logits.expand(req.k, -1).contiguous(), None if head is None else head.expand(req.k)
        return self._forward(req.tokens[:, :t], positions, context)

    def _next_tokens(self, req: Request, done: torch.Tensor, t: int, logits, head, gens) -> torch.Tensor:
        """Position ``t``'s tokens (0 in finished rows), drawn on the last stage and sent to every stage."""
        nxt = torch.zeros(req.k, dtype=torch.long, device=req.tokens.device)
        if self.last:
            if head is not None:
                req.position_logits[:, t - 1] = head
            live = (~done).nonzero().flatten()
            nxt[live], req.log_probs[live, t] = draw(logits[live], req.tokens[live, :t], req.params,
                                                     [gens[j] for j in live.tolist()])
        if self.pp > 1:  # every stage needs the token for its next step
            dist.broadcast(nxt, src=self.last_rank, group=self.pp_group)
        return nxt

    def _finished(self, req: Request, done: torch.Tensor, texts: list[str], nxt: torch.Tensor,
                  eos: torch.Tensor) -> torch.Tensor:
        """Rows that end with ``nxt``: an EOS token, or a stop string that is new (it ends inside this piece)."""
        finished = ~done & torch.isin(nxt, eos)
        stops = req.params.stop_strings if self.tokenizer is not None else []
        window = max((len(x) for x in stops), default=0)
        for i in range(req.k) if stops else ():
            if done[i]:
                continue
            piece = self.tokenizer.decode([int(nxt[i])])
            texts[i] += piece
            if any(x in texts[i][-(len(piece) + window):] for x in stops):
                finished[i] = True
        return finished

    def _lockstep(self, req: Request, use_cache: bool) -> None:
        """``req``'s k samples decoded together, one position a step, until every one has ended."""
        from megatron.core.inference.contexts import StaticInferenceContext

        device = req.tokens.device
        n = len(req.prompt)
        req.tokens[:, :n] = torch.tensor(req.prompt, dtype=torch.long, device=device)
        gens = [sample_generator(req.params, j, device) for j in range(req.k)]
        context = StaticInferenceContext(req.k, req.max_len) if use_cache else None
        eos = torch.tensor(req.params.eos_token_ids or [-1], device=device)
        done = torch.zeros(req.k, dtype=torch.bool, device=device)
        texts = [""] * req.k
        share = use_cache and req.k > 1 and self._is_megatron()
        with self._decode_path(use_cache), (inference_mode() if use_cache else contextlib.nullcontext()):
            for t in range(n, req.max_len):
                logits, head = self._forward_at(req, t, context, share)
                if use_cache:
                    context.sequence_len_offset = t
                nxt = self._next_tokens(req, done, t, logits, head, gens)
                req.tokens[:, t] = nxt
                finished = self._finished(req, done, texts, nxt, eos)
                req.lengths.masked_fill_(finished, t + 1)
                done |= finished
                if bool(done.all()):
                    break

    # --- results -------------------------------------------------------------------------------------------------

    def _rollout(self, req: Request) -> Rollout:
        """The request's rows up to the longest, on the CPU, past each row's end zeroed, with the step scores."""
        if self.pp > 1:
            dist.broadcast(req.log_probs, src=self.last_rank, group=self.pp_group)
            dist.broadcast(req.position_logits, src=self.last_rank, group=self.pp_group)
        p0, b = len(req.prompt), req.k
        lengths = req.lengths.cpu()
        s = int(lengths.max())
        tokens = req.tokens[:, :s].cpu()
        log_probs, position_logits = req.log_probs[:, :s].cpu(), req.position_logits[:, :s].cpu()
        keep = torch.arange(s).unsqueeze(0) < lengths.unsqueeze(1)
        tokens = torch.where(keep, tokens, torch.zeros_like(tokens))
        response = (torch.arange(s).unsqueeze(0) >= p0) & keep
        if self.segmenter is not None:
            layout = self.segmenter(tokens, response_mask=response)
            step_mask, cu = layout.mask, layout.cu_steps
            step_logits = position_logits[step_mask]
        else:
            step_mask = torch.zeros_like(tokens, dtype=torch.bool)
            cu = torch.zeros(b + 1, dtype=torch.int32)
            step_logits = torch.zeros(0)
        stopped = torch.tensor(req.stopped, dtype=torch.bool)
        return Rollout(tokens, p0, lengths, log_probs * response, position_logits * keep, step_logits, cu, step_mask,
                       stopped)

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], num_samples: int, params: SamplingParams,
                 use_cache: bool = True) -> Rollout:
        """``num_samples`` continuations of one prompt (:meth:`generate_batch` with one prompt).

        Args:
            prompt_ids: the prompt's token ids.
            num_samples: k.
            params: decoding options.
            use_cache: False recomputes the whole sequence each step (for testing the cache).
        """
        return self.generate_batch([prompt_ids], num_samples, [params], use_cache=use_cache)[0]

    @torch.no_grad()
    def generate_batch(self, prompts: list[list[int]], num_samples: int, params: list[SamplingParams],
                       max_batch: int | None = None, use_cache: bool = True, stopper=None) -> list[Rollout]:
        """``num_samples`` continuations of each prompt, decoded together (continuous batching).

        Args:
            prompts: each prompt's token ids.
            num_samples: k, samples per prompt.
            params: each prompt's decoding options (its seed keys its samples' generators).
            max_batch: sequences decoded at once (cache slots); default: every prompt's k samples.
            use_cache: False recomputes the whole sequence each step (for testing the cache).
            stopper: an early-stopping rule, ``stopper(pool) -> slots to end now`` after each decode step
                (:class:`megatron_rgm.rollout.batching.SlotPool`; continuous batching only).

        Returns:
            One :class:`Rollout` per prompt, as :meth:`generate` gives it for that prompt alone.
        """
        if len(params) != len(prompts):
            raise ConfigError(f"generate_batch got {len(prompts)} prompts and {len(params)} sampling parameters: "
                              "pass one per prompt")
        if max_batch is not None and max_batch < 1:
            raise ConfigError(f"max_batch (sequences decoded at once) must be >= 1, got {max_batch}")
        requests = [Request(list(p), num_samples, par, self._check_request(p, num_samples, par))
                    for p, par in zip(prompts, params)]
        self.model.eval()
        with self._whole_sequences():
            self._run(requests, num_samples, max_batch, use_cache, stopper)
        return [self._rollout(req) for req in requests]

    @contextlib.contextmanager
    def _whole_sequences(self):
        """Sequence and context parallelism switched off while sampling, as megatron-core's own inference does
        for sequence parallelism (a decode step's one token cannot be split): every TP and CP rank runs whole
        sequences. (The trainer samples on CP rank 0 and sends the rollouts to the others.)"""
        config = getattr(self.model, "config", None)
        sp = self._is_megatron() and config.sequence_parallel
        if not sp and (not self._is_megatron() or config.context_parallel_size == 1):
            yield
            return
        from megatron.core.transformer.utils import set_model_to_sequence_parallel  # megatron-core models only

        from megatron_rgm.model.context_parallel import context_parallel_off
        if sp:
            set_model_to_sequence_parallel(self.model, False)
        try:
            with context_parallel_off([self.model]):
                yield
        finally:
            if sp:
                set_model_to_sequence_parallel(self.model, True)

    def _run(self, requests: list[Request], num_samples: int, max_batch: int | None, use_cache: bool,
             stopper) -> None:
        device = next(self.model.parameters()).device
        if requests and use_cache and self._continuous():
            slots = min(max_batch or num_samples * len(requests), num_samples * len(requests))
            with self._decode_path(True), inference_mode():
                SlotPool(self, requests, slots, device, stopper).run()
        elif stopper is not None:
            raise ConfigError("early stopping runs in continuous batching, which needs a megatron-core model on its "
                              "flash-decode path (not an HF model, a full recompute or fast_decode=False)")
        else:
            for req in requests:
                req.allocate(device)
                self._lockstep(req, use_cache)
