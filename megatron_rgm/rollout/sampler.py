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
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_rgm.compat.mcore import inference_mode
from megatron_rgm.config import ConfigError
from megatron_rgm.steps import StepSegmenter


@dataclass
class SamplingParams:
    """Decoding options (the reference samples at T=0.6, top-p 0.95, repetition penalty 1.05)."""

    temperature: float = 0.6  # 0: greedy
    top_p: float = 0.95
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    eos_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class Rollout:
    """Samples of one batch.

    Attributes:
        tokens: ``[b, s]`` prompt + response (right-padded with ``pad_id`` after each end).
        prompt_length: length of the (shared) prompt.
        lengths: ``[b]`` total length of each sequence (prompt + response).
        log_probs: ``[b, s]`` log-probability of each sampled token under the
            temperature-scaled distribution (0 at prompt and padding positions).
        position_logits: ``[b, s]`` head logit at every position that sampled a token (0 elsewhere).
        step_logits: ``[S]`` head logits of the steps (packed), with ``cu_steps`` ``[b + 1]``.
    """

    tokens: torch.Tensor
    prompt_length: int
    lengths: torch.Tensor
    log_probs: torch.Tensor
    position_logits: torch.Tensor
    step_logits: torch.Tensor
    cu_steps: torch.Tensor
    step_mask: torch.Tensor

    def response_mask(self) -> torch.Tensor:
        idx = torch.arange(self.tokens.shape[1]).unsqueeze(0)
        return (idx >= self.prompt_length) & (idx < self.lengths.unsqueeze(1))


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Top-k and top-p filtering of ``[b, V]`` logits (already temperature-scaled).

    The definition the sampler draws by; it draws over :func:`_nucleus`'s candidates, which are the same.
    """
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = probs.cumsum(-1) - probs >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


_CANDIDATES = 64  # first guess at the size of a top-p nucleus (grown until it holds the nucleus)


def _nucleus(scaled: torch.Tensor, p: SamplingParams, lse: torch.Tensor):
    """The tokens :func:`_filter` keeps, without sorting the vocabulary.

    Args:
        scaled: ``[b, V]`` temperature-scaled logits.
        lse: ``[b, 1]`` their logsumexp.

    Returns:
        ``(logits [b, n], ids [b, n])``: the ``n`` largest logits of each row, in descending order, the
        ones :func:`_filter` drops set to ``-inf``; ``None`` when nothing is filtered (top-k and top-p off).
        Top-p needs only the largest logits: every token after the first that brings the cumulative
        probability to ``top_p`` is dropped, so ``n`` grows (x8) until the ``n`` largest hold ``top_p``.
    """
    vocab = scaled.shape[-1]
    top_k = p.top_k if p.top_k and p.top_k < vocab else 0
    if not top_k and p.top_p >= 1.0:
        return None
    n = top_k or min(_CANDIDATES, vocab)
    while True:
        logits, ids = torch.topk(scaled, n, dim=-1)  # sorted, largest first
        if p.top_p >= 1.0:
            return logits, ids
        # top-p over the distribution that top-k left (renormalised), else over the whole vocabulary
        probs = torch.softmax(logits, -1) if top_k else torch.exp(logits - lse)
        cum = probs.cumsum(-1)
        if top_k or n == vocab or bool((cum[:, -1] >= p.top_p).all()):
            break
        n = min(8 * n, vocab)
    drop = cum - probs >= p.top_p  # the mass before a token already reaches top_p (the first always stays)
    return logits.masked_fill(drop, float("-inf")), ids


def _repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's rule: a logit of a token already in the sequence is divided by the penalty if positive, else multiplied."""
    if penalty == 1.0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


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


def _replicate_prompt_cache(context, b: int, length: int) -> None:
    """Copy row 0 of every layer's KV cache (``[s, b, heads, d]``, its first ``length`` positions) to rows 1..b-1."""
    for entry in context.key_value_memory_dict.values():
        if not (isinstance(entry, tuple) and len(entry) == 2 and all(x.shape[1] >= b for x in entry)):
            raise RuntimeError(f"unexpected KV cache entry in the inference context: {type(entry)}")
        for memory in entry:
            memory[:length, 1:b] = memory[:length, :1]


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
                 score_steps: bool = True, fast_decode: bool = True):
        from megatron.core import parallel_state as ps

        self.pp = ps.get_pipeline_model_parallel_world_size() if dist.is_initialized() else 1
        self.first = self.pp == 1 or ps.is_pipeline_first_stage()
        self.last = self.pp == 1 or ps.is_pipeline_last_stage()
        if self.pp > 1:
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
            if self.model.config.sequence_parallel:
                last = torch.ones(feature.shape[1], 1, dtype=torch.bool, device=feature.device)
                head = self.model.sprm.score(self.model.sprm_head, feature[-1:], last).view(-1)
            else:
                head = _head_logits(self.model.sprm_head, feature[-1])
        return logits, head

    def _sample(self, logits, tokens, params: SamplingParams, gen: torch.Generator):
        """(next tokens ``[b]``, their log-probs under the temperature-scaled, unfiltered distribution).

        Draws from the distribution :func:`_filter` leaves, but over the top-k / top-p candidates only
        (:func:`_nucleus`): no sort and no multinomial over the whole vocabulary.
        """
        logits = _repetition_penalty(logits, tokens, params.repetition_penalty)
        if params.temperature == 0:
            nxt = logits.argmax(-1)
            return nxt, (logits.gather(-1, nxt[:, None]) - torch.logsumexp(logits, -1, keepdim=True)).squeeze(-1)
        scaled = logits / params.temperature
        lse = torch.logsumexp(scaled, -1, keepdim=True)
        kept = _nucleus(scaled, params, lse)
        if kept is None:
            nxt = torch.multinomial(torch.exp(scaled - lse), 1, generator=gen)
        else:
            candidates, ids = kept
            nxt = ids.gather(-1, torch.multinomial(torch.softmax(candidates, -1), 1, generator=gen))
        return nxt.squeeze(-1), (scaled.gather(-1, nxt) - lse).squeeze(-1)

    def _is_megatron(self) -> bool:
        """A megatron-core model (its KV cache is the StaticInferenceContext's), not a subclass's own model."""
        return hasattr(getattr(self.model, "config", None), "flash_decode")

    def _decode_path(self, use_cache: bool):
        """megatron-core's flash-decode KV-cache path for this generate call, where it applies (see
        :mod:`megatron_rgm.rollout.decode_attention`); else its default path."""
        from megatron_rgm.rollout import decode_attention

        if (not use_cache or not getattr(self, "fast_decode", True) or not self._is_megatron()
                or not decode_attention.supported(self.model)):
            return contextlib.nullcontext()
        return decode_attention.flash_decode(self.model)

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], num_samples: int, params: SamplingParams,
                 use_cache: bool = True) -> Rollout:
        """``num_samples`` continuations of one prompt.

        Args:
            prompt_ids: the prompt's token ids.
            num_samples: k, the batch size.
            params: decoding options.
            use_cache: False recomputes the whole sequence each step (for testing the cache).
        """
        from megatron.core.inference.contexts import StaticInferenceContext

        if num_samples < 1:
            raise ConfigError(f"k (samples per prompt) must be >= 1, got {num_samples}")
        if not prompt_ids:
            raise ConfigError("empty prompt: give at least one token")
        max_len = len(prompt_ids) + params.max_new_tokens
        limit = self.model.max_sequence_length
        if max_len > limit:
            raise ConfigError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                              f"exceeds the model's {limit} positions: shorten the prompt or lower max_new_tokens")
        self.model.eval()
        b, p0 = num_samples, len(prompt_ids)
        device = next(self.model.parameters()).device
        # Everything the loop touches lives on the model's device and is preallocated: no per-step host copies
        # (one host read a step, ``done.all()``, ends the loop early; stop strings add a decode per token).
        tokens = torch.zeros(b, max_len, dtype=torch.long, device=device)
        tokens[:, :p0] = torch.tensor(prompt_ids, dtype=torch.long, device=device)
        positions = torch.arange(max_len, device=device).unsqueeze(0).expand(b, max_len)
        gen = torch.Generator(device=device).manual_seed(params.seed)
        log_probs = torch.zeros(b, max_len, device=device)
        position_logits = torch.zeros(b, max_len, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        lengths = torch.full((b,), max_len, dtype=torch.long, device=device)
        context = StaticInferenceContext(b, max_len) if use_cache else None
        eos = torch.tensor(params.eos_token_ids or [-1], device=device)
        stops = params.stop_strings if self.tokenizer is not None else []
        window = max((len(x) for x in stops), default=0)
        texts = [""] * b
        s = p0
        share = use_cache and b > 1 and self._is_megatron()
        with self._decode_path(use_cache), (inference_mode() if use_cache else contextlib.nullcontext()):
            for t in range(p0, max_len):
                if use_cache and t > p0:
                    context.enable_decode_mode()
                    logits, head = self._forward(tokens[:, t - 1:t], positions[:, t - 1:t], context)
                elif share:  # the k samples share the prompt: prefill it once, copy its KV cache to every row
                    logits, head = self._forward(tokens[:1, :t], positions[:1, :t], context)
                    _replicate_prompt_cache(context, b, t)
                    if logits is not None:
                        logits = logits.expand(b, -1).contiguous()
                        head = None if head is None else head.expand(b)
                else:
                    logits, head = self._forward(tokens[:, :t], positions[:, :t], context)
                if use_cache:
                    context.sequence_len_offset = t
                if self.last:
                    if head is not None:
                        position_logits[:, t - 1] = head
                    nxt, lp = self._sample(logits, tokens[:, :t], params, gen)
                    nxt = nxt.masked_fill(done, 0)
                    log_probs[:, t] = lp.masked_fill(done, 0.0)
                else:
                    nxt = torch.zeros(b, dtype=torch.long, device=device)
                if self.pp > 1:  # every stage needs the token for its next step
                    dist.broadcast(nxt, src=self.last_rank, group=self.pp_group)
                tokens[:, t] = nxt
                s = t + 1
                finished = ~done & torch.isin(nxt, eos)
                if stops:
                    for i in range(b):
                        if not done[i]:
                            piece = self.tokenizer.decode([int(nxt[i])])
                            texts[i] += piece
                            # A stop string that is new ends inside this piece.
                            if any(x in texts[i][-(len(piece) + window):] for x in stops):
                                finished[i] = True
                lengths.masked_fill_(finished, t + 1)
                done |= finished
                if bool(done.all()):
                    break
        if self.pp > 1:
            dist.broadcast(log_probs, src=self.last_rank, group=self.pp_group)
            dist.broadcast(position_logits, src=self.last_rank, group=self.pp_group)
        tokens, lengths = tokens[:, :s].cpu(), lengths.cpu()
        log_probs, position_logits = log_probs[:, :s].cpu(), position_logits[:, :s].cpu()
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
        return Rollout(tokens, p0, lengths.clamp(max=s), log_probs * response, position_logits, step_logits, cu,
                       step_mask)
