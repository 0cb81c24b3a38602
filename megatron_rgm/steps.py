"""Where the steps of a reasoning trajectory end, and which hidden states the SPRM head scores.

Rules (those of the reference implementation):

* a *step token* is any token whose decoded text contains one of the step
  strings (default ``".\\n\\n"``);
* only the first of a run of consecutive step tokens ends a step;
* a step token directly after ``<think>`` ends no step;
* when the sequence has ``<think>``, only tokens after it and before the next
  ``</think>`` count; with neither tag, the whole response counts;
* the head reads the hidden state at the position *before* the step token
  (the state that predicts the delimiter).

Works with sentencepiece processors, HF ``tokenizers.Tokenizer`` and
transformers tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from megatron_rgm.config import ConfigError
from megatron_rgm.tokenizer import decode_token, encode, vocab_size_of

THINK_START, THINK_END = "<think>", "</think>"


def _tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def step_token_ids(tokenizer: Any, step_strings: Sequence[str] = (".\n\n",)) -> list[int]:
    """Ids of every token whose decoded text contains one of ``step_strings``.

    Raises:
        ConfigError: the tokenizer has no such token.
    """
    wanted = [s for s in step_strings if s]
    ids = [i for i in range(vocab_size_of(tokenizer)) if any(s in decode_token(tokenizer, i) for s in wanted)]
    if not ids:
        raise ConfigError(
            f"tokenizer {_tokenizer_name(tokenizer)} has no token whose text contains "
            f"{' or '.join(repr(s) for s in wanted)}: pass --sprm-step-tokens with the strings that end a "
            "reasoning step for this tokenizer (e.g. '\\n\\n')"
        )
    return ids


def single_token_id(tokenizer: Any, text: str) -> int | None:
    """The id of ``text`` if it is one token of this tokenizer, else None."""
    if hasattr(tokenizer, "piece_to_id"):  # sentencepiece: encode() may add a dummy prefix
        i = tokenizer.piece_to_id(text)
        return i if tokenizer.id_to_piece(i) == text else None
    if hasattr(tokenizer, "get_vocab"):
        i = tokenizer.get_vocab().get(text)
        if i is not None:
            return int(i)
    ids = encode(tokenizer, text)
    return ids[0] if len(ids) == 1 else None


@dataclass
class StepLayout:
    """Score positions of a batch, dense and packed.

    Attributes:
        mask: ``[b, s]`` bool, True at each position whose hidden state is scored.
        positions: ``[S]`` int64 column of each scored position, row-major (trajectory by trajectory).
        cu_steps: ``[b + 1]`` int32 offsets: trajectory t owns ``positions[cu_steps[t]:cu_steps[t+1]]``.
    """

    mask: torch.Tensor
    positions: torch.Tensor
    cu_steps: torch.Tensor

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "StepLayout":
        rows, cols = mask.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=mask.shape[0])
        cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
        cu[1:] = counts.cumsum(0)
        return cls(mask=mask, positions=cols, cu_steps=cu)


class StepSegmenter:
    """Turns token ids into the positions the SPRM head scores.

    Args:
        step_ids: ids of step tokens.
        think_start: id of ``<think>`` (None if the tokenizer has no such single token).
        think_end: id of ``</think>``.
    """

    def __init__(self, step_ids: Iterable[int], think_start: int | None = None, think_end: int | None = None):
        self.step_ids = torch.tensor(sorted(set(int(i) for i in step_ids)), dtype=torch.long)
        if self.step_ids.numel() == 0:
            raise ConfigError("no step token ids given: pass --sprm-step-tokens")
        self.think_start = think_start
        self.think_end = think_end

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, step_strings: Sequence[str] = (".\n\n",)) -> "StepSegmenter":
        return cls(
            step_token_ids(tokenizer, step_strings),
            single_token_id(tokenizer, THINK_START),
            single_token_id(tokenizer, THINK_END),
        )

    def _thinking_region(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` bool: after the first ``<think>`` and before the next ``</think>``."""
        region = torch.ones_like(tokens, dtype=torch.bool)
        if self.think_start is not None:
            is_start = tokens == self.think_start
            start_before = (is_start.cumsum(1) - is_start.long()) > 0  # a <think> strictly earlier
            region = torch.where(is_start.any(1, keepdim=True), start_before, region)
        if self.think_end is not None:
            is_end = (tokens == self.think_end) & region
            region = region & (is_end.cumsum(1) == 0)
        return region

    def __call__(self, tokens: torch.Tensor, response_mask: torch.Tensor | None = None) -> StepLayout:
        """Score positions for a batch.

        Args:
            tokens: ``[b, s]`` token ids (prompt + response).
            response_mask: ``[b, s]`` bool, True on response tokens (only
                those can end a step); None: every token.

        Returns:
            :class:`StepLayout` whose mask marks the position before each
            step-ending token.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        is_step = torch.isin(tokens, self.step_ids.to(tokens.device))
        prev = torch.zeros_like(tokens[:, :1])
        prev_tokens = torch.cat([prev, tokens[:, :-1]], dim=1)
        prev_is_step = torch.cat([torch.zeros_like(is_step[:, :1]), is_step[:, :-1]], dim=1)
        ends = is_step & ~prev_is_step
        if self.think_start is not None:
            ends &= prev_tokens != self.think_start
        ends &= self._thinking_region(tokens)
        if response_mask is not None:
            if response_mask.shape != tokens.shape:
                raise ValueError(
                    f"response_mask has shape {tuple(response_mask.shape)}, tokens {tuple(tokens.shape)}"
                )
            ends &= response_mask.to(torch.bool)
        ends[:, 0] = False  # no position before the first token
        score = torch.zeros_like(ends)
        score[:, :-1] = ends[:, 1:]
        return StepLayout.from_mask(score)
