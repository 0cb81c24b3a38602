"""Megatron-Bridge checkpoints: the model a Bridge save records in ``iter_XXXXXXX/run_config.yaml``.

Megatron-Bridge (its HF import, ``AutoBridge.import_ckpt``, and its training loop) writes megatron-core dist
checkpoints with Megatron-LM's tensor names, but keeps no ``args`` in the common state: the model is the
``model:`` section of ``run_config.yaml`` (``ConfigContainer.to_yaml``), in one of two shapes:

* a model provider (``GPTModelProvider``, or a family's ``Qwen2ModelProvider``, ``Llama31ModelProvider``, ...): a
  megatron-core ``TransformerConfig`` and the GPT model's options, all at one level;
* a builder-backed config (``_builder_`` set): the GPT model's options, with the ``TransformerConfig`` under
  ``transformer:``.

Functions are written as ``{_target_: torch.nn.functional.silu, _call_: false}`` (or a plain name in the second
shape). The HF import saves its tokenizer in ``iter_XXXXXXX/tokenizer/`` and no optimizer or RNG state.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from megatron_rgm.checkpoint import RUN_CONFIG
from megatron_rgm.config import ConfigError, ModelConfig

TOKENIZER_DIR = "tokenizer"  # beside run_config.yaml

# Bridge's fields of features RGMModel does not build -> is the value one it would have to build?
_UNSUPPORTED = {
    "num_moe_experts": lambda v: v not in (None, 0, 1),
    "multi_latent_attention": bool,
    "window_size": lambda v: v is not None,
    "softmax_type": lambda v: v not in (None, "vanilla"),
    "rotary_percent": lambda v: v not in (None, 1, 1.0),
    "rotary_interleaved": bool,
    "mtp_num_layers": lambda v: v not in (None, 0),
    "apply_residual_connection_post_layernorm": bool,
    "layernorm_zero_centered_gamma": bool,
    "qk_l2_norm": bool,
    "attention_output_gate": bool,
    "heterogeneous_layers_config_path": lambda v: v is not None,
    "heterogeneous_layers_config_encoded_json": lambda v: v is not None,
}


def read_run_config(directory: Path) -> dict | None:
    """The parsed ``run_config.yaml`` of a checkpoint directory, or None where there is none.

    Raises:
        ConfigError: the file is not YAML a Bridge writer makes (no ``model:`` mapping).
    """
    path = Path(directory) / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not readable YAML ({e}): pass a checkpoint written by Megatron-Bridge") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ConfigError(f"{path} has no model: section: it is not a Megatron-Bridge run config")
    return config


def _function_name(value) -> str | None:
    """``silu`` of ``{_target_: torch.nn.functional.silu, _call_: false}`` or of ``"silu"``."""
    if isinstance(value, dict):
        value = value.get("_target_")
    return str(value).rsplit(".", 1)[-1] if value else None


def bridge_model(model: dict, padded_vocab_size: int, where: str) -> tuple[ModelConfig, int | None]:
    """The :class:`ModelConfig` of a Bridge ``model:`` section and the real vocabulary it records.

    Args:
        padded_vocab_size: the embedding's rows in the checkpoint (Bridge pads for the layout it ran at, or not).

    Raises:
        ConfigError: a feature RGMModel does not build, or a missing geometry field (named).
    """
    fields = {**(model.get("transformer") or {}), **{k: v for k, v in model.items() if k != "transformer"}}
    refused = [f"{name}={fields[name]!r}" for name, bad in _UNSUPPORTED.items()
               if fields.get(name) is not None and bad(fields[name])]
    position = fields.get("position_embedding_type", "learned_absolute")
    if position not in ("rope", "learned_absolute"):
        refused.append(f"position_embedding_type={position!r}")
    norm = fields.get("normalization", "LayerNorm")
    if norm not in ("LayerNorm", "RMSNorm"):
        refused.append(f"normalization={norm!r}")
    gated = bool(fields.get("gated_linear_unit", False))
    act = _function_name(fields.get("activation_func")) or "gelu"
    if act != ("silu" if gated else "gelu"):  # what RGMModel builds: SwiGLU, or a plain GeLU MLP
        refused.append(f"activation_func={act!r} with gated_linear_unit={gated}")
    if refused:
        raise ConfigError(f"Megatron-Bridge checkpoint {where} was trained with {', '.join(refused)}, which "
                          "megatron-rgm does not build: it cannot be loaded here")
    missing = [n for n in ("num_layers", "hidden_size", "num_attention_heads", "seq_length") if not fields.get(n)]
    if missing:
        raise ConfigError(f"Megatron-Bridge checkpoint {where}: its run_config.yaml records no {', '.join(missing)} "
                          "under model: (a truncated or hand-written file?)")
    seq = int(fields["seq_length"])
    bf16 = bool(fields.get("bf16", False))
    interpolation = fields.get("seq_len_interpolation_factor")
    scaled = bool(fields.get("rope_scaling", False))  # Llama 3.x; Bridge writes a factor of 1.0 when it is off
    config = ModelConfig(
        num_layers=int(fields["num_layers"]), hidden_size=int(fields["hidden_size"]),
        ffn_hidden_size=fields.get("ffn_hidden_size"), num_attention_heads=int(fields["num_attention_heads"]),
        num_query_groups=fields.get("num_query_groups") or int(fields["num_attention_heads"]),
        kv_channels=fields.get("kv_channels"), vocab_size=padded_vocab_size, make_vocab_size_divisible_by=1,
        seq_length=seq, max_position_embeddings=fields.get("max_position_embeddings") or seq, normalization=norm,
        norm_epsilon=float(fields.get("layernorm_epsilon", 1e-5)), position_embedding_type=position,
        rotary_base=int(fields.get("rotary_base", 10000)), use_rope_scaling=scaled,
        rope_scaling_factor=float(fields["rope_scaling_factor"]) if scaled else ModelConfig.rope_scaling_factor,
        rotary_seq_len_interpolation_factor=float(interpolation) if interpolation not in (None, 1) else None,
        add_qkv_bias=bool(fields.get("add_qkv_bias", False)), qk_layernorm=bool(fields.get("qk_layernorm", False)),
        swiglu=gated, disable_bias_linear=not fields.get("add_bias_linear", True),
        untie_embeddings_and_output_weights=not fields.get("share_embeddings_and_output_weights", True),
        bf16=bf16, fp16=not bf16 and bool(fields.get("fp16", False)))
    vocab = fields.get("vocab_size")
    return config, int(vocab) if vocab else None
