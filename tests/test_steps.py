"""Step-token discovery and step masks: each rule on hand-worked examples, with real tokenizers."""

from __future__ import annotations

import io

import pytest
import torch

from megatron_rgm.config import ConfigError
from megatron_rgm.steps import (
    StepLayout,
    StepSegmenter,
    single_token_id,
    step_token_ids,
)
from megatron_rgm.tokenizer import decode_token, encode

S, T0, T1 = 50, 60, 61  # step token, <think>, </think> in the synthetic-id examples


def _scored(tokens, **kw):
    seg = StepSegmenter([S], think_start=kw.pop("think_start", T0), think_end=kw.pop("think_end", T1))
    layout = seg(torch.tensor([tokens]), **kw)
    return layout.mask[0].nonzero().flatten().tolist()


def test_score_position_is_before_the_step_token():
    #        0  1  2  3  4  5
    assert _scored([1, 2, S, 3, 4, S]) == [1, 4]


def test_only_the_first_of_a_run_counts():
    #        0  1  2  3  4  5  6  7
    assert _scored([1, S, S, S, 2, S, 3, S]) == [0, 4, 6]


def test_none_directly_after_think():
    #        0  1   2  3  4
    assert _scored([1, T0, S, 2, S]) == [3]


def test_only_between_think_tags():
    #        0  1  2   3  4  5  6   7  8  9
    assert _scored([1, S, T0, 2, S, 3, T1, 4, S, 5]) == [3]


def test_unclosed_think_runs_to_the_end_and_no_tags_means_everything():
    assert _scored([T0, 2, S, 3, S]) == [1, 3]
    assert _scored([2, S, 3, S]) == [0, 2]
    # A tokenizer without think tokens: the tag ids are ordinary tokens.
    assert _scored([1, T0, S, 2, S], think_start=None, think_end=None) == [1, 3]


def test_closing_tag_before_opening_is_ignored():
    # </think> before any <think> does not close the region that starts later.
    assert _scored([T1, 2, S, T0, 3, S, T1, 4, S]) == [4]


def test_response_mask_excludes_the_prompt():
    tokens = [1, S, 2, S, 3, S]
    response = torch.tensor([[False, False, False, True, True, True]])
    assert _scored(tokens, response_mask=response) == [2, 4]


def test_step_token_at_position_zero_has_no_score_position():
    assert _scored([S, 1, S]) == [1]


def test_packed_layout_matches_dense_mask():
    seg = StepSegmenter([S])
    tokens = torch.tensor([[1, S, 2, S], [3, 4, 5, 6], [S, 1, 2, S]])
    layout = seg(tokens)
    assert layout.cu_steps.tolist() == [0, 2, 2, 3]
    assert layout.positions.tolist() == [0, 2, 2]
    assert layout.cu_steps.dtype == torch.int32
    again = StepLayout.from_mask(layout.mask)
    assert torch.equal(again.positions, layout.positions) and torch.equal(again.cu_steps, layout.cu_steps)


# --- real tokenizers, trained here -------------------------------------------------------------

LINES = [
    "<think>First add 3 and 4 to get 7.\n\nThen double it to get 14.\n\n</think>The answer is \\boxed{14}.\n\n",
    "<think>Start from 10.\n\nSubtract 2 to get 8.\n\n.\n\nHalve it to get 4.\n\n</think>So \\boxed{4}.",
    "Question: what is 2 plus 2? Reason step by step.\n\n",
] * 20


@pytest.fixture(scope="module")
def sentencepiece_model():
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(LINES), model_writer=buf, vocab_size=400, model_type="bpe",
        user_defined_symbols=[".\n\n", "<think>", "</think>"], normalization_rule_name="identity",
        remove_extra_whitespaces=False, byte_fallback=True, minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


@pytest.fixture(scope="module")
def bpe_tokenizer():
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<think>", "</think>"], show_progress=False)
    tok.train_from_iterator(LINES, trainer)
    tok.add_tokens([AddedToken(".\n\n", normalized=False)])
    return tok


def _hand_worked(tokenizer):
    text = "<think>.\n\nAdd 3.\n\n.\n\nGet 7.\n\n</think>Done.\n\n"
    ids = encode(tokenizer, text)
    seg = StepSegmenter.from_tokenizer(tokenizer)
    steps = set(seg.step_ids.tolist())
    occurrences = [i for i, t in enumerate(ids) if t in steps]
    # Step-token occurrences, by hand: [0] right after <think> (no), [1] "Add 3." (yes),
    # [2] second of a run (no), [3] "Get 7." (yes), [4] after </think> (no).
    assert len(occurrences) == 5, [tokenizer.decode([t]) if hasattr(tokenizer, "decode") else t for t in ids]
    expected = [occurrences[1] - 1, occurrences[3] - 1]
    assert seg(torch.tensor([ids])).mask[0].nonzero().flatten().tolist() == expected


@pytest.mark.parametrize("name", ["sentencepiece_model", "bpe_tokenizer"])
def test_hand_worked_with_real_tokenizers(request, name):
    tokenizer = request.getfixturevalue(name)
    ids = step_token_ids(tokenizer)
    assert single_token_id(tokenizer, ".\n\n") in ids
    for i in ids:
        assert ".\n\n" in decode_token(tokenizer, i)
    _hand_worked(tokenizer)


def test_configurable_step_strings(bpe_tokenizer):
    ids = step_token_ids(bpe_tokenizer, ["\n\n"])
    assert set(step_token_ids(bpe_tokenizer)) <= set(ids)


def test_tokenizer_without_step_token_is_a_clear_error(sentencepiece_model):
    with pytest.raises(ConfigError, match="has no token whose text contains '。'.*--sprm-step-tokens"):
        step_token_ids(sentencepiece_model, ["。"])
