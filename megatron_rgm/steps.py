"""Where the steps of a reasoning trajectory end, and which hidden states the SPRM head scores.

What marks a step is a *rule* over the step strings (default ``".\\n\\n"``), recorded with every
checkpoint and export so that a head is always applied with the rule it was trained with:

* ``exact`` (the reference implementation's): a step token is a token whose text *is* a step string;
* ``contains`` (the paper's wording): a token whose text contains one; on the Qwen2.5 vocabulary that is
  46 ids for ``".\\n\\n"`` (``").\\n\\n"``, ``".\\n\\n\\n"``, ...) instead of one;
* ``text``: a step string matched in the text itself, wherever the tokens cut it: on a vocabulary with no
  ``".\\n\\n"`` token (Qwen3.5/3.6: ``"."`` and ``"\\n\\n"`` apart) it still finds the end of a sentence
  before a paragraph break. Every token that holds a character of a match is a step token, so a delimiter
  over two tokens is one run of two.

Then, for all three rules:

* only the first of a run of consecutive step tokens ends a step;
* a step token directly after ``<think>`` ends no step;
* when the sequence has ``<think>``, only tokens after it and before the next
  ``</think>`` count; with neither tag, the whole response counts;
* the head reads the hidden state at the position *before* the first step token
  (the state that predicts the delimiter, or the token where it starts).

Works with sentencepiece processors, HF ``tokenizers.Tokenizer`` and
transformers tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from megatron_rgm.config import STEP_RULES, ConfigError, RGMConfig
from megatron_rgm.tokenizer import encode, token_texts

THINK_START, THINK_END = "<think>", "</think>"


def _tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def _check_rule(rule: str) -> None:
    if rule not in STEP_RULES:
        raise ConfigError(f"--sprm-step-rule must be one of {', '.join(STEP_RULES)}, got {rule!r}")


def step_token_ids(tokenizer: Any, step_strings: Sequence[str] = (".\n\n",), rule: str = "contains") -> list[int]:
    """Ids of every token whose text is (``exact``) or contains (``contains``) one of ``step_strings``.

    Raises:
        ConfigError: the tokenizer has no such token, or ``rule`` is not a token-id rule.
    """
    _check_rule(rule)
    if rule == "text":
        raise ConfigError("the text rule matches step strings in the text, not as token ids: use "
                          "StepSegmenter.from_tokenizer(tokenizer, step_strings, rule='text')")
    wanted = [s for s in step_strings if s]
    match = (lambda t: t in wanted) if rule == "exact" else (lambda t: any(s in t for s in wanted))
    ids = [i for i, text in enumerate(token_texts(tokenizer)) if match(text)]
    if not ids:
        what = "is" if rule == "exact" else "contains"
        raise ConfigError(
            f"tokenizer {_tokenizer_name(tokenizer)} has no token whose text {what} "
            f"{' or '.join(repr(s) for s in wanted)} (--sprm-step-rule {rule}): pass --sprm-step-rule text to match "
            "the strings across tokens, or --sprm-step-tokens with strings that end a reasoning step for this "
            "tokenizer"
        )
    return ids


def single_token_id(tokenizer: Any, text: str) -> int | None:
    """The id of ``text`` if it is one token of this tokenizer, else None."""
    if hasattr(tokenizer, "piece_to_id"):  # sentencepiece: encode() may add a dummy prefix
        i = tokenizer.piece_to_id(text)
        return i if tokenizer.id_to_piece(i) == text else None
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if hasattr(backend, "token_to_id"):  # tokenizers: a lookup, not a copy of the vocabulary
        i = backend.token_to_id(text)
        if i is not None:
            return int(i)
    elif hasattr(tokenizer, "get_vocab"):
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
        step_ids: ids of step tokens (what the ``exact`` and ``contains`` rules find).
        think_start: id of ``<think>`` (None if the tokenizer has no such single token).
        think_end: id of ``</think>``.
        rule: the rule the ids came from, for the record (``exact`` / ``contains``; ``ids``: given by hand).
    """

    def __init__(self, step_ids: Iterable[int], think_start: int | None = None, think_end: int | None = None,
                 rule: str = "ids"):
        self.step_ids = torch.tensor(sorted(set(int(i) for i in step_ids)), dtype=torch.long)
        if self.step_ids.numel() == 0:
            raise ConfigError("no step token ids given: pass --sprm-step-tokens")
        self.think_start = think_start
        self.think_end = think_end
        self.rule = rule

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, step_strings: Sequence[str] = (".\n\n",),
                       rule: str = "exact") -> "StepSegmenter":
        """The segmenter of ``rule`` (``exact`` | ``contains`` | ``text``) over ``step_strings``."""
        _check_rule(rule)
        think = single_token_id(tokenizer, THINK_START), single_token_id(tokenizer, THINK_END)
        if rule == "text":
            return TextStepSegmenter(token_texts(tokenizer), step_strings, *think)
        return cls(step_token_ids(tokenizer, step_strings, rule), *think, rule=rule)

    @classmethod
    def from_config(cls, tokenizer: Any, rgm: RGMConfig) -> "StepSegmenter":
        """The segmenter of a head's ``--sprm-step-tokens`` and ``--sprm-step-rule``."""
        return cls.from_tokenizer(tokenizer, rgm.sprm_step_tokens, rgm.sprm_step_rule)

    def step_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` bool: the step tokens of ``tokens``, before the run, ``<think>`` and region rules."""
        return torch.isin(tokens, self.step_ids.to(tokens.device))

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
        is_step = self.step_tokens(tokens)
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


class TextStepSegmenter(StepSegmenter):
    """The ``text`` rule: step strings matched in the concatenated text of the tokens.

    A token's text is its own decoded piece (:func:`megatron_rgm.tokenizer.token_texts`), so a match is found
    the same way in generated ids and in the tokenization of the same text, however the tokens cut it.

    Args:
        texts: the text of each token id.
        step_strings: the delimiters.
        think_start, think_end: as for :class:`StepSegmenter`.
    """

    def __init__(self, texts: Sequence[str], step_strings: Sequence[str], think_start: int | None = None,
                 think_end: int | None = None):
        self.delimiters = tuple(s for s in step_strings if s)
        if not self.delimiters:
            raise ConfigError("--sprm-step-tokens needs at least one non-empty string")
        self.texts = [*texts, ""]  # the last: the text of any id past the tokenizer (padded vocabulary rows)
        self.lengths = np.array([len(t) for t in self.texts], dtype=np.int64)
        self.step_ids = None
        self.think_start = think_start
        self.think_end = think_end
        self.rule = "text"

    def _row(self, ids: list[int]) -> np.ndarray:
        past = len(self.texts) - 1
        ids = [i if 0 <= i < past else past for i in ids]
        text = "".join(self.texts[i] for i in ids)
        covered = np.zeros(len(text) + 1, dtype=np.int64)
        for delimiter in self.delimiters:
            at = text.find(delimiter)
            while at >= 0:  # overlapping matches too: "\n\n" twice in "\n\n\n"
                covered[at + 1:at + 1 + len(delimiter)] = 1
                at = text.find(delimiter, at + 1)
        covered = np.cumsum(covered)  # covered[j]: how many characters before j belong to a match
        ends = np.cumsum(self.lengths[ids])
        starts = ends - self.lengths[ids]
        return covered[ends] > covered[starts]  # the token holds a character of a match

    def step_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[0] == 0:
            return torch.zeros_like(tokens, dtype=torch.bool)
        marks = [self._row(row) for row in tokens.cpu().tolist()]
        return torch.from_numpy(np.stack(marks)).reshape(tokens.shape).to(tokens.device)
