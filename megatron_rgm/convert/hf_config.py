"""The HF ``config.json`` of a model built from megatron_rgm flags (a natively trained checkpoint's export), and
a Qwen2 config rewritten as the equal Llama."""

from __future__ import annotations

import torch

from megatron_rgm.config import ModelConfig
from megatron_rgm.convert.mapping import LLAMA3_FIXED


def as_llama(config: dict) -> dict:
    """A Qwen2 ``config.json`` as the equal Llama: ``attention_bias`` (q/k/v and o_proj), the o_proj bias zero
    (:func:`hf_tensors` writes it). How a Qwen2-geometry model with a tokenizer other than Qwen2's byte-level BPE
    is exported: transformers 5 loads every ``qwen2`` model's tokenizer as ``Qwen2Tokenizer``, which rebuilds a
    byte-level pipeline whatever ``tokenizer.json`` says, while a Llama's ``tokenizer.json`` is read as written."""
    out = {**config, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": True,
           "mlp_bias": False}
    return out


def hf_config_from_args(args, vocab_size: int) -> dict | None:
    """The HF ``config.json`` of a model built from megatron_rgm flags, or None when no HF class matches.

    Qwen2 (QKV bias), Qwen3 (QK norm) and Llama map: RMSNorm, SwiGLU, RoPE, no
    linear biases. Used when a natively trained checkpoint is saved, so that
    ``mcore-to-hf`` can export it.

    Args:
        args: :class:`megatron_rgm.arguments.Args`.
        vocab_size: the tokenizer's vocabulary (the unpadded rows are exported).
    """
    t = args.transformer
    if (t.normalization != "RMSNorm" or not t.gated_linear_unit or t.add_bias_linear
            or args.position_embedding_type != "rope" or t.activation_func is not torch.nn.functional.silu
            or t.glu_linear_offset or t.activation_func_clamp_value is not None or t.window_size is not None
            or t.softmax_type != "vanilla"):
        return None
    qk_norm = bool(t.qk_layernorm)
    if qk_norm and t.add_qkv_bias:
        return None
    if t.num_moe_experts and not qk_norm:
        return None  # experts without QK norm match no HF class converted here (Qwen3-MoE has it)
    kind = "Qwen3ForCausalLM" if qk_norm else "Qwen2ForCausalLM" if t.add_qkv_bias else "LlamaForCausalLM"
    kind = "Qwen3MoeForCausalLM" if t.num_moe_experts else kind
    model_type = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama",
                  "Qwen3MoeForCausalLM": "qwen3_moe"}[kind]
    dtype = "bfloat16" if t.bf16 else "float16" if t.fp16 else "float32"
    return {
        "architectures": [kind], "model_type": model_type, "vocab_size": vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.ffn_hidden_size, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_query_groups,
        "head_dim": t.kv_channels, "max_position_embeddings": args.max_position_embeddings,
        "rope_theta": float(args.rotary_base), "rms_norm_eps": t.layernorm_epsilon, "hidden_act": "silu",
        "tie_word_embeddings": args.share_embeddings_and_output_weights, "attention_bias": bool(t.add_qkv_bias),
        "torch_dtype": dtype, **hf_rope_scaling(args.model), **_hf_moe(t),
    }


def _hf_moe(t) -> dict:
    """``config.json``'s Qwen3-MoE fields of a TransformerConfig with experts (none for a dense one)."""
    if not t.num_moe_experts:
        return {}
    return {"num_experts": t.num_moe_experts, "moe_intermediate_size": t.moe_ffn_hidden_size,
            "num_experts_per_tok": t.moe_router_topk, "norm_topk_prob": not t.moe_router_pre_softmax,
            "router_aux_loss_coef": t.moe_aux_loss_coeff, "decoder_sparse_step": 1, "mlp_only_layers": []}


def hf_rope_scaling(model: ModelConfig) -> dict:
    """``config.json``'s ``rope_scaling`` for a model's RoPE scaling (read by transformers 4 and 5), else nothing."""
    if model.use_rope_scaling:
        return {"rope_scaling": {"rope_type": "llama3", "factor": model.rope_scaling_factor, **LLAMA3_FIXED}}
    if model.rotary_seq_len_interpolation_factor not in (None, 1):
        return {"rope_scaling": {"rope_type": "linear", "factor": float(model.rotary_seq_len_interpolation_factor)}}
    return {}
