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
}


# The paper's rollout length for each policy (--max-response-length): 8k-token responses, 32k for the 32B
# policies. The tiny preset keeps DataConfig's default, its sequence length.
RESPONSE_LENGTH = {"deepscaler-1.5b": 8192, "qwen2.5-1.5b": 8192, "r1-distill-qwen-7b": 8192, "qwen2.5-7b": 8192,
                   "qwq-32b": 32768, "qwen3-32b": 32768}


def preset(name: str) -> dict:
    """A copy of the named preset's flag defaults (``dest`` names): its geometry and its rollout length."""
    if name not in PRESETS:
        raise ConfigError(f"unknown --preset {name!r}: choose one of {', '.join(PRESETS)}")
    lengths = {"max_response_length": RESPONSE_LENGTH[name]} if name in RESPONSE_LENGTH else {}
    return {**PRESETS[name], **lengths}
