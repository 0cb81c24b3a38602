"""hf-to-mcore reads only each rank's slice: the slices equal the full tensors' shards, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_rgm.convert.hf_io import HFCheckpoint
from megatron_rgm.convert.mapping import megatron_tensor
from megatron_rgm.convert.slices import megatron_shard

# kind: (config class, extra config); heads 8 / KV groups 4 so that TP=4 divides them.
CONFIGS = {
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),  # QKV bias, separate output layer
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True)),  # QK norm, tied
    "llama_bf16": ("LlamaConfig", dict(tie_word_embeddings=False, torch_dtype="bfloat16")),
}


def make(kind: str, out: Path) -> HFCheckpoint:
    import transformers

    cls, extra = CONFIGS[kind]
    dtype = torch.bfloat16 if extra.get("torch_dtype") == "bfloat16" else torch.float32
    cfg = getattr(transformers, cls)(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                                     **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # norms too: a slice of ones would hide a wrong offset
    model.save_pretrained(out)
    return HFCheckpoint(out)


def megatron_names(arch) -> list[str]:
    names = ["embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight"]
    for i in range(arch.num_layers):
        p = f"decoder.layers.{i}."
        names += [p + n for n in ("input_layernorm.weight", "pre_mlp_layernorm.weight",
                                  "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                                  "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")]
        if arch.qkv_bias:
            names.append(p + "self_attention.linear_qkv.bias")
        if arch.qk_norm:
            names += [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"]
    return names


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_rank_slices_equal_shards_of_full_tensors(kind, tmp_path, monkeypatch):
    from megatron_rgm.convert import slices
    from megatron_rgm.model.state import partition, shard

    def no_fallback(name, *args):
        raise AssertionError(f"{name} fell back to reading the full tensor")

    monkeypatch.setattr(slices, "megatron_tensor", no_fallback)
    hf = make(kind, tmp_path / kind)
    arch = hf.arch
    model = SimpleNamespace(config=SimpleNamespace(gated_linear_unit=True))
    for size, padded in ((1, 384), (2, 512), (4, 1024)):  # at TP=4, ranks 2 and 3 hold only padding rows
        for name in megatron_names(arch):
            dim, gated = partition(model, name, None)
            full = megatron_tensor(name, hf.get, arch, padded)
            for rank in range(size):
                want = shard(full, dim, gated, rank, size)
                got = megatron_shard(name, hf, arch, padded, dim, gated, rank, size)
                assert got.dtype == want.dtype and got.is_contiguous(), (name, size, rank)
                assert torch.equal(got, want), (name, size, rank)


def test_column_slices_read_in_row_blocks(tmp_path):
    hf = make("llama_bf16", tmp_path / "m")
    name = "model.layers.1.mlp.down_proj.weight"  # [64, 96]
    full = hf.get(name)
    for block in (1, 96 * 2 * 5, 1 << 20):  # one row, 5 rows (the last block short), everything at once
        out = torch.empty(64, 24, dtype=torch.bfloat16)
        hf.read_into(name, out, cols=(48, 72), block_bytes=block)
        assert torch.equal(out, full[:, 48:72])
    out = torch.empty(3, 96, dtype=torch.bfloat16)
    assert torch.equal(hf.read_into(name, out, rows=(10, 13)), full[10:13])
    with pytest.raises(ValueError, match="expected a contiguous CPU"):
        hf.read_into(name, torch.empty(3, 96), rows=(10, 13))  # wrong dtype


def test_producer_fills_views_of_parameters_and_refuses_strangers():
    from megatron_rgm.convert.stream_save import param_producer

    model = torch.nn.Sequential(torch.nn.Linear(4, 6, bias=False), torch.nn.Linear(6, 1))
    source = {"0.weight": torch.arange(24.0).reshape(6, 4), "1.weight": torch.ones(1, 6)}
    calls = []

    def make_shard(name, param):
        calls.append(name)
        return source[name].clone()

    produce = param_producer(model, make_shard, keep=lambda name: name.startswith("1.bias"))
    w = model[0].weight.detach()
    top, bottom = w[:3].view(1, 3, 4), w[3:]  # like the gated FC1's two halves, the first with a layer axis
    assert torch.equal(produce(top), source["0.weight"][:3].view(1, 3, 4))
    assert torch.equal(produce(bottom), source["0.weight"][3:])
    assert calls == ["0.weight"]  # both halves from one read
    assert torch.equal(produce(model[1].weight.detach()), source["1.weight"])
    assert produce(model[1].bias.detach()) is None  # kept: written as it is
    with pytest.raises(RuntimeError, match="view of no parameter"):
        produce(torch.zeros(2))


def test_validate_names_truncated_and_inconsistent_files(tmp_path):
    from megatron_rgm.config import ConfigError

    hf = make("qwen2", tmp_path / "ok")
    hf.validate()
    data = (hf.path / "model.safetensors").read_bytes()
    for case in ("truncated", "inconsistent"):
        d = tmp_path / case
        d.mkdir()
        (d / "config.json").write_text((hf.path / "config.json").read_text())
        if case == "truncated":
            (d / "model.safetensors").write_bytes(data[:-100])
            message = "is truncated (tensor"
        else:
            n = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + n])
            name = "model.norm.weight"
            start, end = header[name]["data_offsets"]
            header[name]["data_offsets"] = [start, end - 4]  # one float short of its shape
            raw = json.dumps(header).encode()
            raw += b" " * (-len(raw) % 8)
            (d / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
            message = f"tensor {name} holds {end - start - 4} bytes, but its shape (64,) and dtype F32 need {end - start}"
        with pytest.raises(ConfigError) as err:
            HFCheckpoint(d).validate()
        assert message in str(err.value), str(err.value)
