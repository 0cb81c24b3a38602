"""Bad inputs to the converter: one clear message each, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import LLAMA31_ROPE, make_hf
from megatron_rgm.config import ConfigError
from megatron_rgm.convert import hf_to_mcore, mcore_to_hf
from megatron_rgm.head import load_head


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf("qwen2", tmp_path_factory.mktemp("bad") / "hf")


def copy_with(hf: Path, dst: Path, edit=None, config_edit=None) -> Path:
    dst.mkdir()
    tensors = load_file(str(hf / "model.safetensors"))
    if edit:
        edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    cfg = json.loads((hf / "config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def expect_error(hf: Path, out: Path, message: str, **kw) -> None:
    with pytest.raises(ConfigError) as err:
        hf_to_mcore(str(hf), str(out), **kw)
    assert message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)
    assert not out.exists(), "a failed conversion left output behind"


def test_missing_path_and_file_instead_of_dir(tmp_path):
    expect_error(tmp_path / "nope", tmp_path / "out", "does not exist")
    f = tmp_path / "file"
    f.write_text("x")
    expect_error(f, tmp_path / "out", "is a file")


def test_missing_tensor(hf_dir, tmp_path):
    bad = copy_with(hf_dir, tmp_path / "hf", edit=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    expect_error(bad, tmp_path / "out", "missing 1 tensors, e.g. ['model.layers.1.mlp.up_proj.weight']")


def test_unexpected_tensor(hf_dir, tmp_path):
    bad = copy_with(hf_dir, tmp_path / "hf", edit=lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    expect_error(bad, tmp_path / "out", "does not know, e.g. ['model.extra.weight']")


def test_wrongly_shaped_tensor(hf_dir, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)

    bad = copy_with(hf_dir, tmp_path / "hf", edit=edit)
    expect_error(bad, tmp_path / "out", "model.layers.0.self_attn.k_proj.weight has shape (16, 64), expected (32, 64)")


def test_unsupported_architecture(hf_dir, tmp_path):
    bad = copy_with(hf_dir, tmp_path / "hf", config_edit=lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    expect_error(bad, tmp_path / "out", "architecture ['GPT2LMHeadModel'] is not supported")


def test_output_not_empty(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        hf_to_mcore(str(hf_dir), str(out))
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("case, message", [
    ("wrong_width", "0.weight has shape (64, 32), expected (64, 64)"),
    ("foreign_keys", "has keys ['classifier.bias', 'classifier.weight'], expected"),
    ("pickled_module", "is not a plain tensor state dict"),
    ("not_a_file", "is not a file"),
])
def test_bad_head_files(tmp_path, case, message):
    f = tmp_path / "score_module.pt"
    if case == "wrong_width":
        torch.save(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Dropout(),
                                       torch.nn.Linear(64, 1)).state_dict(), f)
    elif case == "foreign_keys":
        torch.save(torch.nn.Sequential().state_dict() | {"classifier.weight": torch.zeros(1, 64),
                                                        "classifier.bias": torch.zeros(1)}, f)
    elif case == "pickled_module":
        torch.save(torch.nn.Linear(64, 1), f)  # a whole module: loading it would run pickle
    else:
        f = tmp_path
    with pytest.raises(ConfigError, match=None) as err:
        load_head(f, 64)
    assert message in str(err.value)


def test_head_file_checked_before_anything_is_written(hf_dir, tmp_path):
    f = tmp_path / "score_module.pt"
    torch.save({"0.weight": torch.zeros(2, 2)}, f)
    expect_error(hf_dir, tmp_path / "out", "has keys ['0.weight']", head_file=str(f))


def test_mcore_to_hf_bad_paths(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        mcore_to_hf(str(tmp_path / "nope"), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="--dtype 'int8'"):
        mcore_to_hf(str(tmp_path), str(tmp_path / "out"), dtype="int8")


@pytest.mark.parametrize("edit, message", [
    (dict(use_sliding_window=True, sliding_window=16), "sliding_window=16 (sliding-window attention)"),
    (dict(layer_types=["full_attention", "sliding_attention"] * 2),
     "layer_types with 2 'sliding_attention' layers"),
    # transformers 5 writes RoPE scaling as rope_parameters (rope_scaling null): both are read.
    (dict(rope_scaling=None, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                              "original_max_position_embeddings": 64, "attention_factor": 2.0}),
     "YaRN attention_factor=2.0 (converted: the one the factor and mscales give)"),
    (dict(rope_scaling=None, rope_parameters={"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e4}),
     "rope_type='longrope' (converted: linear, llama3 and yarn)"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_type='dynamic'"),
    (dict(rope_scaling={**LLAMA31_ROPE, "original_max_position_embeddings": 4096}),
     "llama3 RoPE scaling with {'original_max_position_embeddings': 4096}"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    (dict(mlp_bias=True), "mlp_bias=true"),
])
def test_features_the_conversion_does_not_carry_are_refused(hf_dir, tmp_path, edit, message):
    bad = copy_with(hf_dir, tmp_path / "hf", config_edit=lambda c: c.update(edit))
    expect_error(bad, tmp_path / "out", message)


def test_rope_scalings_that_convert_and_windows_that_are_off():
    from megatron_rgm.convert.mapping import HFArch

    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
            "intermediate_size": 96, "num_attention_heads": 4, "vocab_size": 300}
    llama31 = HFArch.from_config({**base, "rope_parameters": {**LLAMA31_ROPE, "rope_theta": 5e5}}).model_config()
    assert (llama31.use_rope_scaling, llama31.rope_scaling_factor, llama31.rotary_base) == (True, 8.0, 500000)
    linear = HFArch.from_config({**base, "rope_scaling": {"type": "linear", "factor": 2.0}}).model_config()
    assert (linear.use_rope_scaling, linear.rotary_seq_len_interpolation_factor) == (False, 2.0)
    # Qwen2's config names a window it does not use; Mistral's null window is none.
    for off in ({"use_sliding_window": False, "sliding_window": 4096}, {"sliding_window": None},
                {"layer_types": ["full_attention"] * 2}):
        assert not HFArch.from_config({**base, **off}).model_config().use_rope_scaling


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory):
    return make_hf("gpt_oss", tmp_path_factory.mktemp("bad_oss") / "hf")


@pytest.mark.parametrize("edit, message", [
    (dict(quantization_config={"quant_method": "fp8"}), "quantization_config 'fp8' (converted: the hub's mxfp4"),
    (dict(swiglu_alpha=1.5), "swiglu_alpha=1.5 (megatron-core's quick_gelu has 1.702)"),
    (dict(layer_types=["sliding_attention", "full_attention", "full_attention", "sliding_attention"]),
     "(converted: every layer windowed, or every K-th layer full)"),
    (dict(layer_types=["sliding_attention", "chunked_attention", "sliding_attention", "full_attention"]),
     "layer_types ['chunked_attention']"),
    (dict(attention_bias=False), "attention_bias=false"),
    (dict(layer_types=None), "no layer_types in the config (transformers would take GPT-OSS's defaults)"),
    (dict(rope_parameters=None, rope_scaling=None), "no rope_parameters in the config"),
])
def test_gpt_oss_features_the_conversion_does_not_carry_are_refused(gpt_oss_dir, tmp_path, edit, message):
    bad = copy_with(gpt_oss_dir, tmp_path / "hf", config_edit=lambda c: c.update(edit))
    expect_error(bad, tmp_path / "out", message)


def test_gpt_oss_windows_every_other_layer_convert(gpt_oss_dir):
    """The hub's pattern, windowed layers 0, 2, ... (1-based 1, 3, ...): megatron-core's skip frequency 2."""
    from megatron_rgm.convert.mapping import HFArch

    cfg = json.loads((gpt_oss_dir / "config.json").read_text())
    model = HFArch.from_config(cfg).model_config()
    assert (model.sliding_window, model.window_attn_skip_freq, model.softmax_type) == (8, 2, "learnable")
    assert (model.position_embedding_type, model.rotary_scaling_factor, model.yarn_correction_range_round_to_int,
            model.yarn_original_max_position_embeddings) == ("yarn", 4.0, False, 64)
    every = HFArch.from_config({**cfg, "layer_types": ["sliding_attention"] * 4}).model_config()
    assert (every.sliding_window, every.window_attn_skip_freq) == (8, None)
    # YaRN's original length: a top-level value first (as transformers reads it), else the RoPE dict's.
    top = HFArch.from_config({**cfg, "original_max_position_embeddings": 32}).model_config()
    assert top.yarn_original_max_position_embeddings == 32
