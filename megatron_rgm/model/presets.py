"""Model geometries by name (the policies of the paper, and a CPU-sized one).

Values come from the public HF configs of each policy; a preset sets defaults
that explicit command-line flags override.
"""

from __future__ import annotations

from megatron_rgm.config import ConfigError

# Qwen2-family defaults shared by the presets below.
_QWEN2 = dict(
    normalization="RMSNorm",
    norm_epsilon=1e-6,
    position_embedding_type="rope",
    add_qkv_bias=True,
    qk_layernorm=False,
    swiglu=True,
    disable_bias_linear=True,
    untie_embeddings_and_output_weights=True,
)

PRESETS: dict[str, dict] = {
    # CPU-sized: trains in minutes on two cores.
    "tiny": dict(
        _QWEN2,
        num_layers=4,
        hidden_size=128,
        ffn_hidden_size=352,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=512,
        seq_length=256,
        max_position_embeddings=512,
        rotary_base=10000,
        untie_embeddings_and_output_weights=False,
    ),
    # DeepScaleR-1.5B-Preview = DeepSeek-R1-Distill-Qwen-1.5B geometry.
    "deepscaler-1.5b": dict(
        _QWEN2, num_layers=28, hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12,
        num_query_groups=2, vocab_size=151936, seq_length=8192, max_position_embeddings=131072,
        rotary_base=10000,
    ),
    "qwen2.5-1.5b": dict(
        _QWEN2, num_layers=28, hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12,
        num_query_groups=2, vocab_size=151936, seq_length=8192, max_position_embeddings=32768,
        rotary_base=1000000, untie_embeddings_and_output_weights=False,
    ),
    "r1-distill-qwen-7b": dict(
        _QWEN2, num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28,
        num_query_groups=4, vocab_size=152064, seq_length=8192, max_position_embeddings=131072,
        rotary_base=10000,
    ),
    "qwen2.5-7b": dict(
        _QWEN2, num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28,
        num_query_groups=4, vocab_size=152064, seq_length=8192, max_position_embeddings=32768,
        rotary_base=1000000,
    ),
    "qwq-32b": dict(
        _QWEN2, num_layers=64, hidden_size=5120, ffn_hidden_size=27648, num_attention_heads=40,
        num_query_groups=8, vocab_size=152064, seq_length=32768, max_position_embeddings=40960,
        rotary_base=1000000, norm_epsilon=1e-5,
    ),
    # XBai-o4 geometry: Qwen3-32B (qk-norm, no QKV bias, head dim 128 != hidden/heads).
    "qwen3-32b": dict(
        _QWEN2, num_layers=64, hidden_size=5120, ffn_hidden_size=25600, num_attention_heads=64,
        num_query_groups=8, kv_channels=128, vocab_size=151936, seq_length=32768,
        max_position_embeddings=40960, rotary_base=1000000, add_qkv_bias=False, qk_layernorm=True,
    ),
    # Qwen3-30B-A3B: 128 experts of 768 in every layer, 8 per token (top 8 renormalised), QK norm.
    "qwen3-30b-a3b": dict(
        _QWEN2, num_layers=48, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=32,
        num_query_groups=4, kv_channels=128, vocab_size=151936, seq_length=32768,
        max_position_embeddings=40960, rotary_base=1000000, add_qkv_bias=False, qk_layernorm=True,
        num_experts=128, moe_ffn_hidden_size=768, moe_router_topk=8, moe_aux_loss_coeff=0.001,
    ),
    # GPT-OSS-20B (its bf16 layout): 32 experts of 2880, 4 per token; biases on every linear; a learned sink
    # per head; windows of 128 on every other layer; YaRN x32 over 4096 positions, unrounded; the clamped
    # quick-GELU gate. router_aux_loss_coef 0.9 as its config.json has it.
    "gpt-oss-20b": dict(
        _QWEN2, num_layers=24, hidden_size=2880, ffn_hidden_size=2880, num_attention_heads=64,
        num_query_groups=8, kv_channels=64, vocab_size=201088, seq_length=32768, norm_epsilon=1e-5,
        max_position_embeddings=131072, rotary_base=150000, position_embedding_type="yarn",
        rotary_scaling_factor=32.0, yarn_original_max_position_embeddings=4096,
        yarn_correction_range_round_to_int=False, swiglu=False, quick_geglu=True, glu_linear_offset=1.0,
        activation_func_clamp_value=7.0, disable_bias_linear=False, softmax_type="learnable", sliding_window=128,
        window_attn_skip_freq=2, num_experts=32, moe_ffn_hidden_size=2880, moe_router_topk=4,
        moe_aux_loss_coeff=0.9,
    ),
}


# The paper's rollout length for each policy (--max-response-length): 8k-token responses, 32k for the 32B
# policies. The tiny preset keeps DataConfig's default, its sequence length.
RESPONSE_LENGTH = {"deepscaler-1.5b": 8192, "qwen2.5-1.5b": 8192, "r1-distill-qwen-7b": 8192, "qwen2.5-7b": 8192,
                   "qwq-32b": 32768, "qwen3-32b": 32768, "qwen3-30b-a3b": 32768, "gpt-oss-20b": 32768}
# The paper samples GPT-OSS-20B at temperature 1.0; the others at --rollout-temperature's default, 0.6.
ROLLOUT_TEMPERATURE = {"gpt-oss-20b": 1.0}


def preset(name: str) -> dict:
    """A copy of the named preset's flag defaults (``dest`` names): its geometry, rollout length and, where the
    paper sets one, rollout temperature."""
    if name not in PRESETS:
        raise ConfigError(f"unknown --preset {name!r}: choose one of {', '.join(PRESETS)}")
    lengths = {"max_response_length": RESPONSE_LENGTH[name]} if name in RESPONSE_LENGTH else {}
    sampling = {"rollout_temperature": ROLLOUT_TEMPERATURE[name]} if name in ROLLOUT_TEMPERATURE else {}
    return {**PRESETS[name], **lengths, **sampling}


def sizes(p: dict, head_mult: int = 2) -> dict[str, float]:
    """Millions of parameters of a model (a preset's values, or ModelConfig's fields as a dict): the SPRM head
    (``Linear(c, mult c), Linear(mult c, 1)``), the backbone, and the backbone a token passes through (its
    experts: top-k of them). Vocabulary rows as given (before padding for tensor parallelism)."""
    c, layers, vocab = p["hidden_size"], p["num_layers"], p["vocab_size"]
    heads, groups = p["num_attention_heads"], p.get("num_query_groups") or p["num_attention_heads"]
    d = p.get("kv_channels") or c // heads
    biased = not p.get("disable_bias_linear", False)
    attention = c * d * (heads + 2 * groups) + heads * d * c + (c if biased else 0)
    attention += d * (heads + 2 * groups) if biased or p.get("add_qkv_bias") else 0
    attention += heads if p.get("softmax_type", "vanilla") == "learnable" else 0  # a sink per head
    attention += 2 * d if p.get("qk_layernorm") else 0
    gated = 3 if p.get("swiglu") or p.get("quick_geglu") else 2

    def mlp(width: int) -> int:
        return gated * c * width + ((gated - 1) * width + c if biased else 0)

    experts, topk = p.get("num_experts"), p.get("moe_router_topk", 2)
    width = p.get("moe_ffn_hidden_size") or p.get("ffn_hidden_size") or 4 * c
    router = experts * c + (experts if biased else 0) if experts else 0
    per_layer = attention + router + 2 * c + (mlp(width) * experts if experts else mlp(width))
    active = attention + router + 2 * c + (mlp(width) * topk if experts else mlp(width))
    embeddings = vocab * c * (2 if p.get("untie_embeddings_and_output_weights") else 1) + c
    head = c * head_mult * c + head_mult * c + head_mult * c + 1
    return {"head": head / 1e6, "backbone": (layers * per_layer + embeddings) / 1e6,
            "active": (layers * active + embeddings) / 1e6}


if __name__ == "__main__":
    for name in PRESETS:
        n = sizes(preset(name))
        print(f"{name:>18}: SPRM head {n['head']:8.2f}M   backbone {n['backbone'] / 1e3:8.2f}B"
              f"   per token {n['active'] / 1e3:8.2f}B")
