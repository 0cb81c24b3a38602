"""How a problem becomes a prompt: a template string, or the tokenizer's own chat template (real Qwen vocabulary)."""

from __future__ import annotations

import pytest

from helpers import CHATML, qwen_vocab
from megatron_rgm.config import PROMPT_TEMPLATE, ConfigError, DataConfig
from megatron_rgm.tokenizer import load_tokenizer, prompt_ids, prompt_text

PROBLEM = "What is 7 + 5?"


def test_a_template_string_is_formatted():
    assert prompt_text(None, PROMPT_TEMPLATE, PROBLEM) == "What is 7 + 5?\n<think>\n"
    assert prompt_text(None, "Q: {problem}\nA:", PROBLEM) == "Q: What is 7 + 5?\nA:"


def test_chat_renders_the_tokenizers_template_with_its_special_tokens():
    tok = qwen_vocab("qwen2")
    text = prompt_text(tok, "chat", PROBLEM)
    assert text == "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    ids = prompt_ids(tok, "chat", PROBLEM)
    im_start, think = (tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<think>"))
    assert ids[0] == im_start and ids[-2] == think and ids.count(im_start) == 2  # parsed as special tokens
    assert tok.decode(ids) == text


def test_chat_template_survives_save_and_conversion_copy(tmp_path):
    from megatron_rgm.convert.hf_io import copy_tokenizer_files

    qwen_vocab("qwen2").save_pretrained(tmp_path / "tok")
    (tmp_path / "copy").mkdir()
    copied = copy_tokenizer_files(tmp_path / "tok", tmp_path / "copy")
    # transformers 5 keeps the template in its own file, 4.x in tokenizer_config.json: both are copied.
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(copied)
    if (tmp_path / "tok" / "chat_template.jinja").exists():
        assert "chat_template.jinja" in copied
    again = load_tokenizer(tmp_path / "copy")
    assert again.chat_template == CHATML
    assert prompt_ids(again, "chat", PROBLEM) == prompt_ids(qwen_vocab("qwen2"), "chat", PROBLEM)


def test_chat_without_a_chat_template_is_refused(tmp_path):
    from megatron_rgm.tasks.prepare import prepare

    task = prepare(tmp_path / "task", seed=0, n_train=4, n_eval=2, n_sft=4)
    with pytest.raises(ConfigError, match="--prompt-template chat: tokenizer .* has no chat template"):
        prompt_ids(load_tokenizer(task["tokenizer"]), "chat", PROBLEM)


def test_template_checks():
    assert DataConfig(prompt_template="chat").prompt_template == "chat"
    with pytest.raises(ConfigError, match="has no {problem} field.*'chat'"):
        DataConfig(prompt_template="Q:")


def test_the_hf_scorer_scores_a_response_behind_its_chat_prompt():
    import torch
    import transformers

    from megatron_rgm.head import SPRMHead
    from megatron_rgm.hf import RGMScorer
    from megatron_rgm.tokenizer import encode

    tok = qwen_vocab("qwen2")
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256))
    scorer = RGMScorer(model, SPRMHead(32, 2, 0.0), tok)
    response = "7 + 5 = 12.\n\nSo the sum is 12.\n\n</think>\n\\boxed{12}"
    chat = scorer.score_responses([PROBLEM], [response])[0]
    by_hand = encode(tok, "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert chat == scorer.score_ids([by_hand + encode(tok, response)])[0]
    assert len(chat.step_scores) == 2 and chat.step_positions[0] > len(by_hand)
    plain = scorer.score_responses([PROBLEM], [response], prompt_template=PROMPT_TEMPLATE)[0]
    assert plain.step_positions == [p - len(by_hand) + len(prompt_ids(tok, PROMPT_TEMPLATE, PROBLEM))
                                    for p in chat.step_positions]
    with pytest.raises(ConfigError, match="got 2 problems and 1 responses"):
        scorer.score_responses([PROBLEM, PROBLEM], [response])
    # Only the response ends steps, as in sampling: a problem that holds the step string, behind a template
    # that opens no <think>, adds no step (scoring the whole sequence finds its two as well).
    two_steps = "Two numbers.\n\nAdd them.\n\nWhat is 7 + 5?"
    ids = prompt_ids(tok, "Q: {problem}\nA: ", two_steps)
    alone = scorer.score_responses([two_steps], [response], prompt_template="Q: {problem}\nA: ")[0]
    assert len(alone.step_scores) == 2 and min(alone.step_positions) >= len(ids)
    assert len(scorer.score_ids([ids + encode(tok, response)])[0].step_scores) == 4
