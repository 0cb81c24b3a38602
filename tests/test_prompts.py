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
