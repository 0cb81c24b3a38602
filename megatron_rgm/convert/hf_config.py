"""The HF ``config.json`` of a model built from megatron_rgm flags (a natively trained checkpoint's export), and
a Qwen2 config rewritten as the equal Llama."""

from __future__ import annotations

from megatron_rgm.config import ModelConfig
from megatron_rgm.convert.mapping import LLAMA3_FIXED, HFArch


def as_llama(config: dict) -> dict:
    """A Qwen2 ``config.json`` as the equal Llama: ``attention_bias`` (q/k/v and o_proj), the o_proj bias zero
    (:func:`hf_tensors` writes it). How a Qwen2-geometry model with a tokenizer other than Qwen2's byte-level BPE
    is exported: transformers 5 loads every ``qwen2`` model's tokenizer as ``Qwen2Tokenizer``, which rebuilds a
    byte-level pipeline whatever ``tokenizer.json`` says, while a Llama's ``tokenizer.json`` is read as written."""
    out = {**config, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": True,
           "mlp_bias": False}
    return out


def served_config(config: dict, sentencepiece: bool) -> dict:
    """The config a model is served under: a Qwen2 geometry with a sentencepiece vocabulary as the equal Llama
    (:func:`as_llama` says why), any other as it is. The export and the vLLM push both name tensors by it."""
    return as_llama(config) if sentencepiece and HFArch.from_config(config).kind == "qwen2" else config


def hf_config_from_args(args, vocab_size: int) -> dict | None:
    """The HF ``config.json`` of a model built from megatron_rgm flags, or None when no HF class matches.

    Qwen2 (QKV bias), Qwen3 (QK norm), Qwen3-MoE (experts, QK norm), Llama and Mistral (a window on every
    layer) map: RMSNorm, SwiGLU, RoPE (scaled or YaRN), no linear biases; GPT-OSS: its clamped quick-GELU
    experts, biases, sinks and windows. Used when a natively trained checkpoint is saved, so that
    ``mcore-to-hf`` can export it.

    Args:
        args: :class:`megatron_rgm.arguments.Args`.
        vocab_size: the tokenizer's vocabulary (the unpadded rows are exported).
    """
    m, t = args.model, args.transformer
    rope = hf_rope_scaling(m)
    if m.normalization != "RMSNorm" or m.position_embedding_type not in ("rope", "yarn") or rope is None:
        return None
    common = {"vocab_size": vocab_size, "hidden_size": t.hidden_size, "num_hidden_layers": t.num_layers,
              "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_query_groups,
              "head_dim": t.kv_channels, "max_position_embeddings": args.max_position_embeddings,
              "rope_theta": float(args.rotary_base), "rms_norm_eps": t.layernorm_epsilon,
              "tie_word_embeddings": args.share_embeddings_and_output_weights,
              "torch_dtype": "bfloat16" if t.bf16 else "float16" if t.fp16 else "float32", **rope}
    if m.quick_geglu:
        return _gpt_oss(m, t, common)
    if (not m.swiglu or t.add_bias_linear or m.glu_linear_offset or m.activation_func_clamp_value is not None
            or m.softmax_type != "vanilla"):
        return None
    qk_norm = bool(t.qk_layernorm)
    if qk_norm and t.add_qkv_bias:
        return None
    if t.num_moe_experts and not qk_norm:
        return None  # experts without QK norm match no HF class converted here (Qwen3-MoE has it)
    kind = "Qwen3ForCausalLM" if qk_norm else "Qwen2ForCausalLM" if t.add_qkv_bias else "LlamaForCausalLM"
    kind = "Qwen3MoeForCausalLM" if t.num_moe_experts else kind
    window = {}
    if m.sliding_window:  # Mistral: a Llama with a window on every layer
        if kind != "LlamaForCausalLM" or m.window_attn_skip_freq:
            return None
        kind, window = "MistralForCausalLM", {"sliding_window": m.sliding_window}
    model_type = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama",
                  "Qwen3MoeForCausalLM": "qwen3_moe", "MistralForCausalLM": "mistral"}[kind]
    return {"architectures": [kind], "model_type": model_type, **common, "intermediate_size": t.ffn_hidden_size,
            "hidden_act": "silu", "attention_bias": bool(t.add_qkv_bias), **window, **_hf_moe(t)}


def _gpt_oss(m: ModelConfig, t, common: dict) -> dict | None:
    """GPT-OSS's ``config.json`` of a model with its layer (None where a part of it differs)."""
    if not (t.num_moe_experts and t.add_bias_linear and m.glu_linear_offset == 1.0 and m.softmax_type == "learnable"
            and m.activation_func_clamp_value is not None and not t.qk_layernorm and not m.moe_router_pre_softmax):
        return None
    skip = m.window_attn_skip_freq
    types = ["sliding_attention" if m.sliding_window and (not skip or (i + 1) % skip) else "full_attention"
             for i in range(t.num_layers)]
    # GPT-OSS's config defaults to YaRN: plain RoPE is written out.
    rope = {} if "rope_scaling" in common else {"rope_parameters": {"rope_type": "default",
                                                                    "rope_theta": common["rope_theta"]}}
    return {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", **common, **rope,
            "intermediate_size": t.moe_ffn_hidden_size, "attention_bias": True, "layer_types": types,
            "sliding_window": m.sliding_window or 128, "num_local_experts": t.num_moe_experts,
            "num_experts_per_tok": t.moe_router_topk, "router_aux_loss_coef": t.moe_aux_loss_coeff,
            "swiglu_limit": m.activation_func_clamp_value}


def _hf_moe(t) -> dict:
    """``config.json``'s Qwen3-MoE fields of a TransformerConfig with experts (none for a dense one)."""
    if not t.num_moe_experts:
        return {}
    return {"num_experts": t.num_moe_experts, "moe_intermediate_size": t.moe_ffn_hidden_size,
            "num_experts_per_tok": t.moe_router_topk, "norm_topk_prob": not t.moe_router_pre_softmax,
            "router_aux_loss_coef": t.moe_aux_loss_coeff, "decoder_sparse_step": 1, "mlp_only_layers": []}


def hf_rope_scaling(model: ModelConfig) -> dict | None:
    """``config.json``'s ``rope_scaling`` for a model's RoPE scaling (read by transformers 4 and 5), else nothing;
    None for a YaRN attention factor HF's keys cannot express."""
    if model.position_embedding_type == "yarn":
        yarn = {"rope_type": "yarn", "factor": model.rotary_scaling_factor, "beta_fast": model.yarn_beta_fast,
                "original_max_position_embeddings": model.yarn_original_max_position_embeddings,
                "beta_slow": model.yarn_beta_slow, "truncate": model.yarn_correction_range_round_to_int}
        if model.mscale and model.mscale_all_dim:
            yarn.update(mscale=model.mscale, mscale_all_dim=model.mscale_all_dim)
        elif (model.mscale, model.mscale_all_dim) != (1.0, 0.0):
            return None  # HF reads the mscales only in pairs
        return {"rope_scaling": yarn}
    if model.use_rope_scaling:
        return {"rope_scaling": {"rope_type": "llama3", "factor": model.rope_scaling_factor, **LLAMA3_FIXED}}
    if model.rotary_seq_len_interpolation_factor not in (None, 1):
        return {"rope_scaling": {"rope_type": "linear", "factor": float(model.rotary_seq_len_interpolation_factor)}}
    return {}
