"""Decoding options, the distribution a token is drawn from (temperature, top-k, top-p, repetition penalty),
and the record of a sampled batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_rgm.config import ConfigError, decode_escapes, option


def derive_seed(*parts: int) -> int:
    """One 32-bit seed from integers (run seed, iteration or prompt index, ...): numpy's SeedSequence, so
    neighbouring inputs give unrelated streams. The seed of each prompt's draws in training rollouts, offline
    rollouts and the backbone check's data."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


BEST_OF_N_PENALTY = 1.05  # the reference's repetition penalty when it samples Best-of-N candidates
# The most new tokens a sample gets by default: the reference's Best-of-N budget and the paper's response length.
# A model with more positions (131k for R1-Distill) would otherwise reserve a KV cache of that length per sample.
RESPONSE_BUDGET = 32768


def room(length: int, limit: int) -> int:
    """The default budget of new tokens after ``length`` tokens in ``limit`` positions (< 1: there is none)."""
    return min(limit - length, RESPONSE_BUDGET)


@dataclass
class SamplingParams:
    """Decoding options. The defaults are the reference's for its Qwen-family policies (T=0.6, top-p 0.95) and a
    budget sized from the model: every position the prompt leaves, up to the paper's 32k (:data:`RESPONSE_BUDGET`),
    not a number chosen for a toy. No repetition penalty by default: rollouts that train keep the
    policy's own distribution (their log-probs are the old policy's); Best-of-N samples with the reference's
    1.05 (:data:`BEST_OF_N_PENALTY`)."""

    temperature: float = option(0.6, "0: greedy")
    top_p: float = option(0.95)
    top_k: int = option(0, "0: off")
    repetition_penalty: float = option(1.0, "1: off")
    max_new_tokens: int | None = option(None, "new tokens per sample (default: every position of the model the "
                                        f"prompt leaves, at most {RESPONSE_BUDGET})")
    eos_token_ids: list[int] = option(default_factory=list, cli=False)  # the tokenizer's EOS, set by the caller
    stop_strings: list[str] = option(help="strings that end a sample (escapes such as \\n are decoded)",
                                     default_factory=list, flag="--stop", parse=decode_escapes)
    seed: int = option(0)

    def budget(self, prompt_length: int, limit: int) -> int:
        """New tokens a prompt of ``prompt_length`` gets within the model's ``limit`` positions (may be < 1:
        the caller refuses that)."""
        return self.max_new_tokens if self.max_new_tokens is not None else room(prompt_length, limit)

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
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
        stopped: ``[b]`` bool, the sequences an early-stopping rule ended (None: no rule ran).
    """

    tokens: torch.Tensor
    prompt_length: int
    lengths: torch.Tensor
    log_probs: torch.Tensor
    position_logits: torch.Tensor
    step_logits: torch.Tensor
    cu_steps: torch.Tensor
    step_mask: torch.Tensor
    stopped: torch.Tensor | None = None

    def response_mask(self) -> torch.Tensor:
        idx = torch.arange(self.tokens.shape[1]).unsqueeze(0)
        return (idx >= self.prompt_length) & (idx < self.lengths.unsqueeze(1))


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Top-k and top-p filtering of ``[b, V]`` logits (already temperature-scaled).

    The definition the sampler draws by; it draws over :func:`nucleus`'s candidates, which are the same.
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


CANDIDATES = 64  # first guess at the size of a top-p nucleus (grown until it holds the nucleus)


def nucleus(scaled: torch.Tensor, p: SamplingParams, lse: torch.Tensor):
    """The tokens :func:`filter_logits` keeps, without sorting the vocabulary.

    Args:
        scaled: ``[b, V]`` temperature-scaled logits.
        lse: ``[b, 1]`` their logsumexp.

    Returns:
        ``(logits [b, n], ids [b, n])``: the ``n`` largest logits of each row, in descending order, the
        ones :func:`filter_logits` drops set to ``-inf``; ``None`` when nothing is filtered (top-k and top-p off).
        Top-p needs only the largest logits: every token after the first that brings the cumulative
        probability to ``top_p`` is dropped, so ``n`` grows (x8) until the ``n`` largest hold ``top_p``.
    """
    vocab = scaled.shape[-1]
    top_k = p.top_k if p.top_k and p.top_k < vocab else 0
    if not top_k and p.top_p >= 1.0:
        return None
    n = top_k or min(CANDIDATES, vocab)
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


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's rule: a logit of a token already in the sequence is divided by the penalty if positive, else multiplied."""
    if penalty == 1.0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def _row_width(kept: int, first: int, vocab: int) -> int:
    """The candidates :func:`nucleus` takes for one row alone: ``first``, grown x8 until it holds ``kept``."""
    n = first
    while n < kept and n < vocab:
        n = min(8 * n, vocab)
    return n


def draw(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams, gens: list[torch.Generator]):
    """Each row's next token, drawn from its own generator, and its log-prob under the temperature-scaled,
    unfiltered distribution.

    The filters run on all rows at once; the draw itself is a row's own: its multinomial is over as many
    candidates as :func:`nucleus` takes for that row alone, so a row draws the same token whatever rows are
    drawn beside it (and what drawing it alone gives).

    Args:
        logits: ``[b, V]``.
        seen: ``[b, n]`` each row's tokens so far, for the repetition penalty (a row shorter than ``n`` repeats
            one of its own tokens in the rest).
        gens: one generator a row.

    Returns:
        ``(tokens [b], log_probs [b])``.
    """
    logits = repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        nxt = logits.argmax(-1)
        return nxt, (logits.gather(-1, nxt[:, None]) - torch.logsumexp(logits, -1, keepdim=True)).squeeze(-1)
    scaled = logits / params.temperature
    lse = torch.logsumexp(scaled, -1, keepdim=True)
    kept = nucleus(scaled, params, lse)
    picks = []
    if kept is None:
        probs = torch.exp(scaled - lse)
        for i, gen in enumerate(gens):
            picks.append(torch.multinomial(probs[i:i + 1], 1, generator=gen)[0])
    else:
        candidates, ids = kept
        vocab = scaled.shape[-1]
        first = candidates.shape[-1] if params.top_k and params.top_k < vocab else min(CANDIDATES, vocab)
        counts = torch.isfinite(candidates).sum(-1).tolist()
        for i, gen in enumerate(gens):
            n = _row_width(counts[i], first, vocab)
            choice = torch.multinomial(torch.softmax(candidates[i:i + 1, :n], -1), 1, generator=gen)
            picks.append(ids[i, choice[0]])
    nxt = torch.stack(picks).view(-1)
    return nxt, (scaled.gather(-1, nxt[:, None]) - lse).squeeze(-1)
